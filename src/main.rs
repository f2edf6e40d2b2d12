//! The `leasehold` binary: all behaviour lives in `leasehold-node`; this only hands over the exit code.

fn main() -> std::process::ExitCode {
    leasehold_node::cli::main()
}
