# Leasehold: two commands on a fresh machine.
#   make demo   - a local cluster (own Postgres + Mosquitto under .demo/, two nodes, a simulator)
#   make test   - the whole suite against real servers the suite starts itself
SHELL := /bin/bash
export PATH := $(PATH):/usr/sbin

.PHONY: demo test chaos deps build lint fmt clean

# Fault matrix: TRIALS per fault within BUDGET (make chaos TRIALS=3 BUDGET=5m).
TRIALS ?= 10
BUDGET ?= 10m

deps:
	@./scripts/install-deps.sh

build:
	cargo build --release -p leasehold -p leasehold-testkit --bins

demo: deps build
	LEASEHOLD_BIN=target/release/leasehold ./target/release/leasehold-demo

test: deps
	cargo test --workspace --all-targets --no-fail-fast

chaos: deps
	cargo build --release -p leasehold -p leasehold-chaos --bins
	./target/release/leasehold-chaos --trials $(TRIALS) --budget $(BUDGET) --bin target/release/leasehold --json target/chaos/chaos.json

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf .demo
	cargo clean
