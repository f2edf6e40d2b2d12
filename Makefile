# Leasehold: two commands on a fresh machine.
#   make demo   - a local cluster (own Postgres + Mosquitto under .demo/, two nodes, a simulator)
#   make test   - the whole suite against real servers the suite starts itself
SHELL := /bin/bash
export PATH := $(PATH):/usr/sbin

.PHONY: demo test chaos bench deps build lint fmt clean

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

# Side-by-side throughput/latency/memory (target/bench/bench.json), then the micro-benchmarks.
bench: deps
	cargo build --release -p leasehold -p leasehold-bench -p leasehold-flushdelay
	./target/release/leasehold-bench --messages 100000 --upsert-messages 100000 --outage-secs 60 --json target/bench/bench.json
	cargo bench -p leasehold-decode -p leasehold-node --bench decode --bench batch -- --warm-up-time 1 --measurement-time 3

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf .demo
	cargo clean
