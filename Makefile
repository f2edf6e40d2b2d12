# Leasehold: two commands on a fresh machine.
#   make demo   - a local cluster (own Postgres + Mosquitto under .demo/, two nodes, a simulator)
#   make test   - the whole suite against real servers the suite starts itself
SHELL := /bin/bash
export PATH := $(PATH):/usr/sbin

.PHONY: demo test deps build lint fmt clean

deps:
	@./scripts/install-deps.sh

build:
	cargo build --release -p leasehold -p leasehold-testkit --bins

demo: deps build
	LEASEHOLD_BIN=target/release/leasehold ./target/release/leasehold-demo

test: deps
	cargo test --workspace --all-targets --no-fail-fast

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf .demo
	cargo clean
