//! `make chaos`: the fault matrix. Prints a table, writes JSON, exits non-zero if any trial broke a
//! guarantee or a bound.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use leasehold_chaos::{run_matrix, Fault, Options};

#[derive(Parser, Debug)]
#[command(about = "Repeated fault-injection trials against real leasehold processes")]
struct Args {
    /// Trials per fault.
    #[arg(long, default_value_t = 10)]
    trials: usize,
    /// Faults to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// Steady publishing rate, messages per second.
    #[arg(long, default_value_t = 300)]
    rate: u64,
    /// Publishing rate of the full-rate faults (step-down, SIGTERM).
    #[arg(long, default_value_t = 3000)]
    full_rate: u64,
    /// Wall-clock budget, e.g. 10m; trials past it are skipped.
    #[arg(long, default_value = "10m", value_parser = humantime_like)]
    budget: Duration,
    /// The leasehold binary under test.
    #[arg(long, default_value = "target/release/leasehold")]
    bin: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/chaos/chaos.json")]
    json: PathBuf,
}

fn humantime_like(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("bad duration {s:?}: use s, m or h")),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let a = Args::parse();
    let bin = match std::fs::canonicalize(&a.bin) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "chaos: {}: {e} (build it first: cargo build --release)",
                a.bin.display()
            );
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        bin,
        trials: a.trials,
        faults: if a.faults.is_empty() {
            Fault::ALL.to_vec()
        } else {
            a.faults
        },
        rate: a.rate,
        full_rate: a.full_rate,
        budget: a.budget,
    };
    let report = match run_matrix(&opts).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: could not run: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.table());
    if let Some(dir) = a.json.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_string_pretty(&report).map(|j| std::fs::write(&a.json, j)) {
        Ok(Ok(())) => println!("JSON report: {}", a.json.display()),
        Ok(Err(e)) => eprintln!("chaos: writing {}: {e}", a.json.display()),
        Err(e) => eprintln!("chaos: encoding the report: {e}"),
    }
    if report.failures().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
