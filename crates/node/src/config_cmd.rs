//! `leasehold config`: the cluster's configuration versions in its database. Needs only the
//! database: it works with every node stopped, and nodes apply a new version live.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use leasehold_config::cluster::{node_setting_refused, version_origin};
use leasehold_config::{ClusterSettings, Config, ConfigError, Origin, Sources};
use leasehold_store::config::{self as stored, ApplyError, NewVersion, StoredConfig};
use leasehold_store::Client;

use crate::cli::EXIT_CONFIG;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check FILE's cluster settings and routes (against the database's catalog), then store
    /// them as the new active version. One line per problem and exit 2 on any; nothing stored.
    Apply {
        /// TOML with cluster settings and [[routes]] only (node settings are refused).
        #[arg(required_unless_present = "version", conflicts_with = "version")]
        file: Option<PathBuf>,
        /// Apply a stored version again as the new one (a rollback).
        #[arg(long)]
        version: Option<i64>,
        /// Check and show what would change; store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the active version (or --version N) as TOML, secrets masked.
    Show {
        #[arg(long)]
        version: Option<i64>,
        /// Every cluster setting's effective value, machine-readable.
        #[arg(long)]
        json: bool,
    },
    /// Every version: when, by whom, what changed.
    History {
        #[arg(long)]
        json: bool,
    },
    /// What FILE would change against the active version.
    Diff { file: PathBuf },
}

pub async fn command(cfg: &Config, cmd: ConfigCommand) -> anyhow::Result<ExitCode> {
    let mut c = crate::admin::connect(cfg, "leasehold-config").await?;
    // Works before any node ever started: the table may not exist yet.
    leasehold_store::migrate(&mut c).await?;
    match cmd {
        ConfigCommand::Apply {
            file,
            version,
            dry_run,
        } => apply(cfg, &c, file.as_deref(), version, dry_run).await,
        ConfigCommand::Show { version, json } => show(&c, version, json).await,
        ConfigCommand::History { json } => history(&c, json).await,
        ConfigCommand::Diff { file } => diff(&c, &file).await,
    }
}

/// The version a `config show` output names in its first line (`# cluster configuration
/// version N, ...`), if the file starts with one.
fn shown_version(text: &str) -> Option<i64> {
    let rest = text
        .lines()
        .next()?
        .strip_prefix("# cluster configuration version ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Reads a file given to `apply` or `diff`: its cluster settings, or one line per problem.
fn read_file(path: &Path) -> Result<ClusterSettings, Vec<String>> {
    let origin = Origin::File(path.display().to_string());
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    if text.trim().is_empty() {
        return Err(vec![format!("{} is empty: applied, it would set every cluster setting to its default and remove every route; write at least one setting (a default one will do) to mean that", path.display())]);
    }
    let sources = Sources::from_toml(&text, origin.clone()).map_err(|e| vec![e.to_string()])?;
    let node: Vec<String> = sources
        .node_settings_set()
        .into_iter()
        .map(|(key, _)| node_setting_refused(key, &origin).to_string())
        .collect();
    match node.is_empty() {
        true => Ok(sources.cluster()),
        false => Err(node),
    }
}

/// Every problem of `new` as this host would run it: each setting alone, then together (rules
/// between settings, routes), then the routes against the catalog.
async fn check(
    cfg: &Config,
    c: &Client,
    new: &ClusterSettings,
    origin: &Origin,
    running: &[leasehold_config::RouteSpec],
) -> anyhow::Result<Result<Config, Vec<String>>> {
    let mut problems: Vec<String> = Vec::new();
    for key in new.keys() {
        if let Err(e) = cfg.with_cluster(&new.only(key), origin.clone()) {
            // Alone among defaults a setting can clash with another's default (a STALE_WARNING
            // of an hour against STALE_CRITICAL's ten minutes): only its own errors count here;
            // how the file's settings fit together is the whole file's to say, below.
            let about_another =
                matches!(&e, ConfigError::Invalid { key: k, .. } if !k.eq_ignore_ascii_case(key));
            if !about_another {
                problems.push(e.to_string());
            }
        }
    }
    let whole = match cfg.with_cluster(new, origin.clone()) {
        Ok(whole) => whole,
        Err(e) => {
            let line = e.to_string();
            if !problems.contains(&line) {
                problems.push(line);
            }
            return Ok(Err(problems));
        }
    };
    let (_, route_problems) = leasehold_store::routes::resolve(c, &whole.routes).await?;
    for p in route_problems {
        // A route the active version runs as it is, whose table broke since: it runs suspended
        // either way; it does not block every other change.
        let unchanged = whole
            .routes
            .iter()
            .find(|r| r.name == p.route)
            .is_some_and(|r| running.contains(r));
        match unchanged {
            true => println!("  note: {p} (unchanged: it stays suspended until its table fits)"),
            false => problems.push(p.to_string()),
        }
    }
    Ok(match problems.is_empty() {
        true => Ok(whole),
        false => Err(problems),
    })
}

fn refuse(lines: &[String]) -> ExitCode {
    for l in lines {
        eprintln!(
            "leasehold: config apply refused: {}",
            leasehold_config::redact(l)
        );
    }
    ExitCode::from(EXIT_CONFIG)
}

/// The active version's effective settings (defaults when none is stored).
fn effective(active: Option<&StoredConfig>) -> anyhow::Result<Config> {
    let cluster = match active {
        Some(s) => ClusterSettings::parse(&s.settings, version_origin(s.version))?,
        None => ClusterSettings::default(),
    };
    let origin = active.map_or(Origin::Default, |s| version_origin(s.version));
    Ok(cluster.effective(origin)?)
}

async fn apply(
    cfg: &Config,
    c: &Client,
    file: Option<&Path>,
    from_version: Option<i64>,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let active = stored::active(c).await?;
    let (mut new, origin) = match (file, from_version) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let (Some(shown), Some(a)) = (shown_version(&text), &active) {
                if shown != a.version {
                    return Ok(refuse(&[format!(
                        "{} was shown from version {shown}, but version {} is active now (applied {} by {}): this would undo its changes; see `leasehold config diff {}` and apply again (or remove the file's first line to apply it as it is)",
                        path.display(),
                        a.version,
                        a.applied_at.format("%Y-%m-%d %H:%M:%S UTC"),
                        a.applied_by,
                        path.display()
                    )]));
                }
            }
            match read_file(path) {
                Ok(new) => (new, Origin::File(path.display().to_string())),
                Err(lines) => return Ok(refuse(&lines)),
            }
        }
        (None, Some(v)) => match stored::version(c, v).await? {
            Some(s) => (
                ClusterSettings::parse(&s.settings, version_origin(v))?,
                version_origin(v),
            ),
            None => return Ok(refuse(&[format!("there is no version {v}")])),
        },
        (None, None) => return Ok(refuse(&["give a FILE or --version N".into()])),
    };
    if let Err(line) = keep_masked_secrets(&mut new, active.as_ref()) {
        return Ok(refuse(&[line]));
    }
    let active_cfg = effective(active.as_ref())?;
    let new_cfg = match check(cfg, c, &new, &origin, &active_cfg.routes).await? {
        Ok(n) => n,
        Err(lines) => return Ok(refuse(&lines)),
    };
    let changes = active_cfg.changes(&new_cfg);
    let after = active.as_ref().map(|a| a.version);
    if changes.is_empty() && active.is_some() {
        println!(
            "no change: this is what version {} already says; nothing stored",
            after.unwrap_or(0)
        );
        return Ok(ExitCode::SUCCESS);
    }
    for line in &changes {
        println!("  {line}");
    }
    let subscribed: Vec<&str> = new_cfg
        .cluster
        .mqtt_topics
        .iter()
        .chain(new_cfg.routes.iter().flat_map(|r| &r.topics))
        .map(String::as_str)
        .collect();
    for note in leasehold_config::format_notes(&new_cfg.formats, &subscribed) {
        println!("  note: {note}");
    }
    if dry_run {
        println!("dry run: every check passed; nothing stored");
        return Ok(ExitCode::SUCCESS);
    }
    let by = applied_by();
    let summary = match from_version {
        Some(v) => format!("rollback to version {v}\n{}", changes.join("\n")),
        None => changes.join("\n"),
    };
    let res = stored::apply(
        c,
        &NewVersion {
            after,
            settings: &new.to_toml(),
            applied_by: &by,
            changes: &summary,
        },
    )
    .await;
    match res {
        Ok(v) => {
            println!("version {v} applied by {by}; every node runs it within seconds (leasehold status shows each node's version)");
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ ApplyError::Conflict { .. }) => Ok(refuse(&[e.to_string()])),
        Err(ApplyError::Store(e)) => Err(e.into()),
    }
}

/// A secret as `config show` masked it (`https://hooks.slack.com/***`): the active version's
/// value when the mask stands for it, else refused (stored as it is, it would break delivery).
fn keep_masked_secrets(
    new: &mut ClusterSettings,
    active: Option<&StoredConfig>,
) -> Result<(), String> {
    const KEY: &str = "ALERT_WEBHOOK_URL";
    let Some(v) = new
        .value(KEY)
        .filter(|v| v.contains(leasehold_config::MASK))
    else {
        return Ok(());
    };
    let current = active
        .and_then(|a| ClusterSettings::parse(&a.settings, version_origin(a.version)).ok())
        .and_then(|c| c.value(KEY).map(str::to_string));
    match current {
        Some(cur) if leasehold_config::shown_secret(KEY, &cur) == v => {
            new.set(KEY, cur);
            Ok(())
        }
        _ => Err(format!("{KEY} holds {} (a value masked by `config show`) that is not the active version's: write the URL in full", leasehold_config::MASK)),
    }
}

/// `user@host` of whoever runs the command.
fn applied_by() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{user}@{host}")
}

async fn show(c: &Client, version: Option<i64>, json: bool) -> anyhow::Result<ExitCode> {
    let found = match version {
        Some(v) => stored::version(c, v).await?,
        None => stored::active(c).await?,
    };
    let Some(s) = found else {
        eprintln!(
            "leasehold: {}",
            match version {
                Some(v) => format!("there is no version {v}"),
                None => "no cluster configuration is stored yet: the first production node to start imports its own settings as version 1, or use `leasehold config apply FILE`".into(),
            }
        );
        return Ok(ExitCode::FAILURE);
    };
    let cluster = ClusterSettings::parse(&s.settings, version_origin(s.version))?;
    if json {
        let cfg = cluster.effective(version_origin(s.version))?;
        let settings: serde_json::Map<String, serde_json::Value> = cfg
            .cluster_values()
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
            .collect();
        let body = serde_json::json!({
            "version": s.version,
            "applied_at": s.applied_at.to_rfc3339(),
            "applied_by": s.applied_by,
            "settings": settings,
            "set": cluster.keys().collect::<Vec<_>>(),
            "routes": cfg.routes.iter().map(|r| &r.name).collect::<Vec<_>>(),
            "formats": cfg.formats,
            "toml": cluster.to_shown_toml(),
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!(
            "# cluster configuration version {}, applied {} by {}",
            s.version,
            s.applied_at.format("%Y-%m-%d %H:%M:%S UTC"),
            s.applied_by
        );
        print!("{}", cluster.to_shown_toml());
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(c: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let all = stored::history(c).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no cluster configuration is stored yet");
    }
    for s in &all {
        println!(
            "version {:<4} {}  {}",
            s.version,
            s.applied_at.format("%Y-%m-%d %H:%M:%S UTC"),
            s.applied_by
        );
        for line in s.changes.lines() {
            println!("    {}", leasehold_config::redact(line));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn diff(c: &Client, file: &Path) -> anyhow::Result<ExitCode> {
    let origin = Origin::File(file.display().to_string());
    let read =
        read_file(file).and_then(|new| new.effective(origin).map_err(|e| vec![e.to_string()]));
    let new_cfg = match read {
        Ok(n) => n,
        Err(lines) => {
            for l in lines {
                eprintln!("leasehold: config diff: {l}");
            }
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let active = stored::active(c).await?;
    let changes = effective(active.as_ref())?.changes(&new_cfg);
    let against = active.map_or("the defaults (no version stored)".into(), |a| {
        format!("version {}", a.version)
    });
    if changes.is_empty() {
        println!("no difference against {against}");
    } else {
        println!("against {against}:");
        for line in &changes {
            println!("  {line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
