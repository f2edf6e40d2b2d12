//! Command line. Flags override environment variables, which override the config file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use leasehold_config::{redact, Config, LogFormat, Sources};
use tokio_util::sync::CancellationToken;

use crate::{admin, node, routes_cmd, simulate};

#[derive(Parser, Debug)]
#[command(
    name = "leasehold",
    version,
    about = "Leader-elected, highly available MQTT -> PostgreSQL ingestion",
    long_about = "Leader-elected, highly available MQTT -> PostgreSQL ingestion.\n\nSettings come from a TOML file (--config), environment variables (DATABASE_URL, MQTT_URL, LEASE_TTL, ...) and flags, each overriding the previous. See docs/configuration.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Settings accepted by every command.
#[derive(Args, Clone, Default)]
pub struct Settings {
    /// TOML file with settings (the environment names in lower case, or nested sections) and
    /// routes (LEASEHOLD_CONFIG).
    #[arg(long, global = true, value_name = "FILE", env = "LEASEHOLD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Any setting, by its environment name, e.g. --set LEASE_TTL=5s (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// PostgreSQL URL (DATABASE_URL).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// MQTT broker URL, mqtt://host:port or mqtts://host:port (MQTT_URL).
    #[arg(long, global = true)]
    pub mqtt_url: Option<String>,
    /// This node's name (INSTANCE_ID, default: hostname).
    #[arg(long, global = true)]
    pub instance_id: Option<String>,
    /// production, development or disabled (MQTT_MODE).
    #[arg(long, global = true)]
    pub mode: Option<String>,
    /// HTTP listen address (HTTP_ADDR).
    #[arg(long, global = true)]
    pub http_addr: Option<String>,
    /// Lease name (LEASE_NAME).
    #[arg(long, global = true)]
    pub lease_name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: campaign for the lease; the leader ingests MQTT into PostgreSQL.
    Run,
    /// Apply the database migrations and exit.
    Migrate,
    /// Show the lease holder, epoch, expiry, nodes alive and newest data age (exit 0 when a leader exists).
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check what the guarantees stand on: the broker's queue, payload and QoS limits, the
    /// database's durability, replication, privileges, clock and round trip, the cluster's
    /// client id (exit 1 on a problem).
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Ask the current leader to hand over gracefully to a standby.
    StepDown {
        /// How long to wait for another node to take over.
        #[arg(long, default_value = "10s", value_parser = leasehold_config::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Check the [[routes]] of --config (or of the active cluster configuration) against the database and print what each writes where.
    ///
    /// For every route: its table as resolved, topics, key, on_conflict and each column with its type and source; then the default route (telemetry) and every problem, one line each. Exit 0 when all routes fit, 2 when any has a problem, 1 when the database cannot be reached.
    Routes {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run dead letters again through the active configuration (after fixing a mapping, a
    /// column or a route's table).
    ///
    /// Each dead letter that now succeeds is written and removed in one transaction, under the
    /// leader's lease; what still fails stays, with its new reason. Exactly once with two replays
    /// at once or a failover in the middle. Needs a leader. Exit 0 when the replay ran to its end
    /// (the summary counts as not processed what another replay held or someone removed).
    Replay {
        /// Only this route's dead letters (`default`: the default route's).
        #[arg(long)]
        route: Option<String>,
        /// Only dead letters of this reason (`route_unavailable`, `mapping_failed`, `not_json`, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only dead letters received within this long before the replay starts (e.g. 2h).
        #[arg(long, value_parser = leasehold_config::parse_duration)]
        since: Option<std::time::Duration>,
        /// Do everything, then roll it back: what would be stored and what would fail.
        #[arg(long)]
        dry_run: bool,
    },
    /// The cluster's configuration in its database: apply, show, history, diff.
    ///
    /// Cluster settings (topics, decoding, limits, routes, alert thresholds, retention) are
    /// stored as numbered versions, the same for every node, applied live. See
    /// docs/configuration.md.
    #[command(subcommand)]
    Config(crate::config_cmd::ConfigCommand),
    /// Publish a simulated device fleet's readings (numbered, timestamped) to the broker.
    Simulate(simulate::SimArgs),
}

/// SIGPIPE: the process ends quietly, by the signal's default action, when its standard output
/// is a pipe or socket whose reader is gone (`leasehold config history | head`); any other
/// broken pipe — a socket the broker or the database closed, written with `writev`, which cannot
/// ask not to raise it — is left to fail that write with EPIPE, handled where it is (before:
/// the default action killed `leasehold doctor` when the broker reset its probe's connection).
extern "C" fn quiet_on_closed_stdout(_: libc::c_int) {
    let mut out = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll, signal and raise are async-signal-safe; `out` lives on this frame; errno
    // is put back for the interrupted code. The signal raised here is blocked until the handler
    // returns, then ends the process with the default action.
    unsafe {
        let errno = *libc::__errno_location();
        if libc::poll(&mut out, 1, 0) == 1 && out.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
        *libc::__errno_location() = errno;
    }
}

/// The flags hold URLs and `--set` values in clear.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |v: &Option<String>| v.as_deref().map(leasehold_config::redact_url);
        f.debug_struct("Settings")
            .field("config", &self.config)
            .field(
                "set",
                &self.set.iter().map(|s| redact(s)).collect::<Vec<_>>(),
            )
            .field("database_url", &shown(&self.database_url))
            .field("mqtt_url", &shown(&self.mqtt_url))
            .field("instance_id", &self.instance_id)
            .field("mode", &self.mode)
            .field("http_addr", &self.http_addr)
            .field("lease_name", &self.lease_name)
            .finish()
    }
}

impl Settings {
    fn flags(&self) -> Result<Vec<(String, String)>, String> {
        let mut out = Vec::new();
        for kv in &self.set {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--set expects KEY=VALUE, got {:?}", redact(kv)))?;
            out.push((k.trim().to_string(), v.to_string()));
        }
        let named = [
            ("DATABASE_URL", &self.database_url),
            ("MQTT_URL", &self.mqtt_url),
            ("INSTANCE_ID", &self.instance_id),
            ("MQTT_MODE", &self.mode),
            ("HTTP_ADDR", &self.http_addr),
            ("LEASE_NAME", &self.lease_name),
        ];
        out.extend(
            named
                .into_iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.clone()?))),
        );
        Ok(out)
    }

    /// Loads the configuration from file, environment and these flags.
    pub fn load(&self) -> Result<Config, String> {
        let flags = self.flags()?;
        let sources = Sources::gather(self.config.as_deref(), std::env::vars(), flags)
            .map_err(|e| e.to_string())?;
        Config::load(&sources).map_err(|e| e.to_string())
    }
}

/// Exit code for bad flags or settings.
pub const EXIT_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    // Fault tests configure failpoints through FAILPOINTS; kept for the process's life.
    #[cfg(feature = "testing")]
    let _failpoints = fail::FailScenario::setup();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            // clap quotes the offending argument: a URL given in the wrong place holds its password.
            eprint!("{}", redact(&e.render().to_string()));
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if !matches!(cli.cmd, Command::Run) {
        // A command's output piped into `head` ends quietly, as other command-line tools do.
        // SAFETY: installs an async-signal-safe handler before any thread is started.
        unsafe {
            libc::signal(
                libc::SIGPIPE,
                quiet_on_closed_stdout as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
    let cfg = match cli.settings.load() {
        Ok(c) => c,
        Err(e) => return config_error(redact(&e)),
    };
    let needs_db = match &cli.cmd {
        Command::Simulate(_) => false,
        Command::Run => cfg.node.mqtt_mode != leasehold_config::Mode::Disabled,
        _ => true,
    };
    if needs_db {
        if let Err(e) = cfg.require_database_url() {
            return config_error(e);
        }
    }
    // Commands for people log only warnings unless LOG_LEVEL says otherwise.
    let level = match (&cli.cmd, std::env::var("LOG_LEVEL").is_ok()) {
        (Command::Run, _) | (_, true) => cfg.node.log_level.clone(),
        _ => "warn".to_string(),
    };
    if let Err(e) =
        leasehold_telemetry::init_logging(cfg.node.log_format == LogFormat::Json, &level)
    {
        return config_error(e);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("leasehold: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(dispatch(cli.cmd, cfg));
    exit_code(result)
}

/// A configuration error, said on stderr: exit [`EXIT_CONFIG`].
fn config_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("leasehold: configuration error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

/// Runs command `cmd`.
async fn dispatch(cmd: Command, cfg: Config) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Run => {
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone())?;
            node::run(cfg, shutdown).await.map(|_| ExitCode::SUCCESS)
        }
        Command::Migrate => admin::migrate(&cfg).await,
        Command::Status { json } => admin::status(&cfg, json).await,
        Command::StepDown { timeout } => admin::step_down(&cfg, timeout).await,
        Command::Routes { json } => routes_cmd::command(&cfg, json).await,
        Command::Simulate(args) => simulate::run(&cfg, args).await,
        Command::Doctor { json } => crate::checks::doctor(&cfg, json).await,
        Command::Config(cmd) => crate::config_cmd::command(&cfg, cmd).await,
        Command::Replay {
            route,
            reason,
            since,
            dry_run,
        } => {
            let job = crate::replay::Job {
                database_url: cfg.require_database_url()?.to_string(),
                route,
                reason,
                since,
            };
            crate::replay::command(&cfg, job, dry_run).await
        }
    }
}

/// The exit code of a command's result; its error on stderr, one line per problem, redacted.
fn exit_code(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) if e.is::<crate::cluster_config::ConfigRefused>() => {
            config_error(redact(&format!("{e}")))
        }
        Err(e) if e.is::<routes_cmd::RoutesRefused>() => {
            // One line per problem: each names its route and column.
            for p in e
                .downcast_ref::<routes_cmd::RoutesRefused>()
                .iter()
                .flat_map(|r| &r.0)
            {
                eprintln!("leasehold: configuration error: {}", redact(&p.to_string()));
            }
            ExitCode::from(routes_cmd::EXIT_ROUTE_PROBLEM)
        }
        Err(e) => {
            // Errors of the database driver and the broker client, whatever they quote.
            eprintln!("leasehold: error: {}", redact(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT: graceful hand-over. Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut count = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            count += 1;
            if count == 1 {
                shutdown.cancel();
            } else {
                eprintln!("leasehold: second signal, exiting immediately");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
