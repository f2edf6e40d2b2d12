//! Routes against the live database: the start-up check of `leasehold run` and the
//! `leasehold routes` command, which prints what each route writes where.

use std::process::ExitCode;

use anyhow::Context;
use leasehold_config::Config;
use leasehold_store::routes::{self, ResolvedRoute, RouteProblem};
use serde_json::json;

/// Exit code of `leasehold routes` (and of a node that refuses to start) when a route has a
/// problem: the configuration does not fit the database.
pub const EXIT_ROUTE_PROBLEM: u8 = crate::cli::EXIT_CONFIG;

/// A node refused to start: its routes do not fit the database. `main` prints each problem on a
/// line of its own and exits [`EXIT_ROUTE_PROBLEM`].
#[derive(Debug, thiserror::Error)]
#[error("routes do not fit the database: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct RoutesRefused(pub Vec<RouteProblem>);

/// Resolves the configured routes at start, before the lease is campaigned for: any problem
/// refuses the start (a route that cannot write would dead-letter or stall every message).
pub async fn check_at_start(
    cfg: &Config,
    pool: &leasehold_store::Pool,
) -> anyhow::Result<Vec<ResolvedRoute>> {
    if cfg.routes.is_empty() {
        return Ok(Vec::new());
    }
    let c = leasehold_store::pooled(pool)
        .await
        .context("checking routes")?;
    let (resolved, problems) = routes::resolve(&c, &cfg.routes)
        .await
        .context("checking routes")?;
    if !problems.is_empty() {
        return Err(RoutesRefused(problems).into());
    }
    for r in &resolved {
        tracing::info!(route = %r.spec.name, table = %r.qualified, topics = ?r.spec.topics, columns = r.columns.len(), "route checked");
    }
    Ok(resolved)
}

/// The configured routes against the catalog, each in its place: one that does not resolve now
/// (its table gone, renamed or not granted) is [`ResolvedRoute::unresolved`] with its problems,
/// to run suspended: a broken route stops only itself. The database unreachable is an error.
pub async fn resolve_each(
    cfg: &Config,
    pool: &leasehold_store::Pool,
) -> anyhow::Result<(Vec<ResolvedRoute>, Vec<Option<String>>)> {
    if cfg.routes.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let c = leasehold_store::pooled(pool)
        .await
        .context("checking routes")?;
    resolve_on(&c, &cfg.routes).await
}

/// [`resolve_each`] on a connection of the caller's.
pub async fn resolve_on(
    c: &leasehold_store::Client,
    specs: &[leasehold_config::RouteSpec],
) -> anyhow::Result<(Vec<ResolvedRoute>, Vec<Option<String>>)> {
    let (resolved, problems) = routes::resolve(c, specs).await.context("checking routes")?;
    let mut out = (Vec::new(), Vec::new());
    for spec in specs {
        let mine = problems_of(&problems, &spec.name);
        match resolved.iter().find(|r| r.spec.name == spec.name) {
            Some(r) if mine.is_none() => {
                out.0.push(r.clone());
                out.1.push(None);
            }
            _ => {
                let mine = mine.unwrap_or_default();
                tracing::error!(route = %spec.name, problems = %mine, "route does not fit the database now: it runs suspended (its messages are route_unavailable dead letters) until it does");
                out.0.push(ResolvedRoute::unresolved(spec.clone()));
                out.1.push(Some(mine));
            }
        }
    }
    Ok(out)
}

/// What a check of the catalog found wrong with route `name`, joined; `None` when it fits.
pub(crate) fn problems_of(problems: &[RouteProblem], name: &str) -> Option<String> {
    let mine: Vec<String> = problems
        .iter()
        .filter(|p| p.route == name)
        .map(ToString::to_string)
        .collect();
    (!mine.is_empty()).then(|| mine.join("; "))
}

/// `leasehold routes`: every route resolved against the database, then its problems. Exit 0
/// when all fit, [`EXIT_ROUTE_PROBLEM`] otherwise (a database that cannot be reached is an error:
/// exit 1).
pub async fn command(own: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let c = crate::admin::connect(own, "leasehold-routes").await?;
    // Without [[routes]] of its own: the active cluster configuration's (what the nodes run).
    let active;
    let cfg = if own.own_cluster_settings().has_routes() {
        own
    } else {
        active = crate::cluster_config::effective(own, &c)
            .await
            .unwrap_or_else(|_| own.clone());
        &active
    };
    let (resolved, problems) = routes::resolve(&c, &cfg.routes).await?;
    // The default route's devices: the table may not exist before the first migration.
    let devices = leasehold_store::queries::device_topics(&c)
        .await
        .map_err(|e| e.database_text());
    let default = DefaultRoute {
        topics: &cfg.cluster.mqtt_topics,
        devices,
        shadowed: !cfg.routes.is_empty(),
    };
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(cfg, &resolved, &problems, &default))?
        );
    } else {
        print(cfg, &resolved, &problems, &default);
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ROUTE_PROBLEM)
    })
}

/// The route into `telemetry`: `MQTT_TOPICS` and the enabled devices' topics, for every message
/// no named route takes.
struct DefaultRoute<'a> {
    topics: &'a [String],
    devices: Result<Vec<String>, String>,
    /// Named routes exist: the default route takes only what none of them matches.
    shadowed: bool,
}

fn print(
    cfg: &Config,
    resolved: &[ResolvedRoute],
    problems: &[RouteProblem],
    default: &DefaultRoute<'_>,
) {
    for spec in &cfg.routes {
        let Some(r) = resolved.iter().find(|r| r.spec.name == spec.name) else {
            println!(
                "ROUTE {}  -> {} (not resolved: see problems)",
                spec.name, spec.table
            );
            println!("  topics       {}", spec.topics.join(", "));
            println!();
            continue;
        };
        let key: Vec<&str> = r.key.iter().map(|i| r.columns[*i].name.as_str()).collect();
        println!("ROUTE {}  -> {}", spec.name, r.qualified);
        println!("  topics       {}", spec.topics.join(", "));
        println!("  key          ({})", key.join(", "));
        println!("  on_conflict  {}", spec.on_conflict.as_str());
        let name_w = r.columns.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let type_w = r
            .columns
            .iter()
            .map(|c| c.sql_type.len())
            .max()
            .unwrap_or(0);
        for c in &r.columns {
            let notes: Vec<&str> = [(c.not_null, "not null"), (c.has_default, "default")]
                .into_iter()
                .filter_map(|(on, note)| on.then_some(note))
                .collect();
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join(", "))
            };
            println!(
                "  {:<name_w$}  {:<type_w$}  <- {}{notes}",
                c.name, c.sql_type, c.source
            );
        }
        println!();
    }
    let devices = match &default.devices {
        Ok(d) if d.is_empty() => "none enabled".to_string(),
        Ok(d) => d.join(", "),
        Err(e) => format!("cannot be read: {e}"),
    };
    println!("ROUTE default  -> telemetry");
    println!("  topics       {} (MQTT_TOPICS)", default.topics.join(", "));
    println!("  devices      {devices}");
    if default.shadowed {
        println!("  takes        messages no route above matches");
    }
    println!();
    if problems.is_empty() {
        println!("no problems");
    } else {
        println!("PROBLEMS ({})", problems.len());
        for p in problems {
            println!("  {p}");
        }
    }
}

fn to_json(
    cfg: &Config,
    resolved: &[ResolvedRoute],
    problems: &[RouteProblem],
    default: &DefaultRoute<'_>,
) -> serde_json::Value {
    let routes: Vec<_> = cfg
        .routes
        .iter()
        .map(|spec| {
            let r = resolved.iter().find(|r| r.spec.name == spec.name);
            json!({
                "name": spec.name,
                "table": r.map_or(spec.table.clone(), |r| r.qualified.clone()),
                "topics": spec.topics,
                "key": spec.key,
                "on_conflict": spec.on_conflict.as_str(),
                "resolved": r.is_some(),
                "columns": r.map(|r| r.columns.iter().map(|c| json!({
                    "name": c.name,
                    "type": c.sql_type,
                    "source": c.source.to_string(),
                    "not_null": c.not_null,
                    "default": c.has_default,
                })).collect::<Vec<_>>()),
            })
        })
        .collect();
    json!({
        "routes": routes,
        "default": {
            "table": "telemetry",
            "topics": default.topics,
            "devices": default.devices.as_ref().ok(),
            "devices_error": default.devices.as_ref().err(),
        },
        "problems": problems.iter().map(|p| json!({
            "route": p.route,
            "column": p.column,
            "message": p.message,
            "line": p.to_string(),
        })).collect::<Vec<_>>(),
    })
}
