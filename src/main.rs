//! The `leasehold` binary: all behaviour lives in `leasehold-node`; this only hands over the exit code.

/// jemalloc, not glibc's malloc: a batch allocates a few objects per message and frees them
/// together, which glibc serves from its bins (a tenth of the leader's instructions per message,
/// docs/performance.md); mimalloc cost less still but held more memory than G5's bound allows.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    leasehold_node::cli::main()
}
