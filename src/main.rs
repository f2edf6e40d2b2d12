//! The `leasehold` binary: all behaviour lives in `leasehold-node`; this only hands over the exit code.

/// jemalloc, not glibc's malloc: a batch allocates some six objects per message and frees them a
/// thousand at a time, more than glibc's per-thread cache holds, so most went through its bins (a
/// fifth of the leader's instructions; docs/performance.md, `#allocator`). mimalloc cost less
/// still, but held more memory than G5's bound allows.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    leasehold_node::cli::main()
}
