# Leasehold: two commands on a fresh machine.
#   make demo   - a local cluster (own Postgres + Mosquitto under .demo/, two nodes, a simulator)
#   make test   - the whole suite against real servers the suite starts itself
SHELL := /bin/bash
export PATH := $(PATH):/usr/sbin

.PHONY: demo test chaos bench bench-drain fuzz deps build lint fmt clean

# Fault matrix: TRIALS per fault within BUDGET (make chaos TRIALS=3 BUDGET=5m).
TRIALS ?= 10
BUDGET ?= 10m

deps:
	@./scripts/install-deps.sh

build:
	cargo build --release -p leasehold -p leasehold-testkit --bins

demo: deps build
	LEASEHOLD_BIN=target/release/leasehold ./target/release/leasehold-demo

# The end-to-end suite is one test binary (tests/e2e). Its fault-matrix test runs last and alone,
# as it did with a binary of its own (see tests/e2e/chaos.rs); it runs even if the first step fails.
test: deps
	@status=0; \
	cargo test --workspace --all-targets --no-fail-fast || status=$$?; \
	cargo test --workspace --test e2e -- --ignored chaos:: || status=$$?; \
	exit $$status

# Then the asynchronous-replication run, lossy on purpose: it prints what a failover loses when the
# database's commits are not synchronously replicated (docs/deployment.md).
chaos: deps
	cargo build --release -p leasehold -p leasehold-chaos --bins --features leasehold/testing
	@status=0; \
	./target/release/leasehold-chaos --trials $(TRIALS) --budget $(BUDGET) --bin target/release/leasehold --json target/chaos/chaos.json || status=$$?; \
	cargo test --test e2e -- --ignored --nocapture dbfailover::asynchronous || status=$$?; \
	exit $$status

# Side-by-side throughput/latency/memory (target/bench/bench.json), then the micro-benchmarks.
bench: deps
	cargo build --release -p leasehold -p leasehold-bench -p leasehold-flushdelay
	./target/release/leasehold-bench --messages 100000 --upsert-messages 100000 --outage-secs 60 --json target/bench/bench.json
	cargo bench -p leasehold-decode -p leasehold-node --bench decode --bench batch -- --warm-up-time 1 --measurement-time 3

# Only the routes phase: RUNS x (100,000 queued messages drained into telemetry, through a typed
# route and as gateway arrays, three times each and judged by the medians; then twice into a telemetry of
# HISTORY_ROWS older readings, each time followed by the same table with its history detached),
# with leader, PostgreSQL and broker CPU per message; about a minute a run, plus some six minutes to
# load the history (HISTORY_ROWS=0 skips it).
RUNS ?= 3
HISTORY_ROWS ?= 20000000
bench-drain: deps
	cargo build --release -p leasehold -p leasehold-bench
	./target/release/leasehold-bench --only routes --runs $(RUNS) --messages 100000 --history-rows $(HISTORY_ROWS)

# Fuzz the decoder for FUZZ_TIME seconds (fuzz/, cargo-fuzz). Its nightly features are enabled on
# the stable toolchain with RUSTC_BOOTSTRAP=1. New inputs go to fuzz/target/corpus (the committed
# seeds in fuzz/corpus/decode stay as they are; copy a finding there, small, to keep it); a crash is
# saved under fuzz/artifacts/decode/. `make test` replays the committed corpus on stable.
FUZZ_TIME ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
	mkdir -p fuzz/target/corpus
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode target/corpus corpus/decode -- \
		-max_total_time=$(FUZZ_TIME) -max_len=300000 -timeout=10 -print_final_stats=1

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

clean:
	rm -rf .demo
	cargo clean
