//! `leasehold migrate`, `status` and `step-down`: short-lived commands for operators.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use leasehold_config::Config;
use leasehold_store::queries::{self, ClusterReport};
use serde::Serialize;
use serde_json::json;

/// Exit code of `status` when no node holds the lease.
pub const EXIT_NO_LEADER: u8 = 3;

/// Command `app`'s connection to `DATABASE_URL`.
pub(crate) async fn connect(cfg: &Config, app: &str) -> anyhow::Result<leasehold_store::Client> {
    connect_to(cfg.require_database_url()?, app).await
}

/// Command `app`'s connection to `url`; an error names the server, never its password.
pub(crate) async fn connect_to(url: &str, app: &str) -> anyhow::Result<leasehold_store::Client> {
    leasehold_store::connect(url, app)
        .await
        .with_context(|| format!("cannot connect to {}", leasehold_config::redact_url(url)))
}

pub async fn migrate(cfg: &Config) -> anyhow::Result<ExitCode> {
    let mut c = connect(cfg, "leasehold-migrate").await?;
    let applied = leasehold_store::migrate(&mut c).await?;
    if applied.is_empty() {
        println!("schema is up to date");
    } else {
        println!("applied migrations: {applied:?}");
    }
    Ok(ExitCode::SUCCESS)
}

fn secs(ms: i64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

pub async fn status(cfg: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let c = connect(cfg, "leasehold-status").await?;
    let r = Report::read(&c, cfg).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&r.json())?);
    } else {
        r.print();
    }
    Ok(r.leader()
        .map_or(ExitCode::from(EXIT_NO_LEADER), |_| ExitCode::SUCCESS))
}

/// What `leasehold status` shows, read once.
struct Report {
    /// What `/cluster` shows too.
    report: ClusterReport,
    age: Option<f64>,
    open_alerts: Vec<leasehold_store::alerts::AlertRow>,
    cluster: ClusterView,
    /// How the database replicates commits, or why that could not be read.
    replication: Result<leasehold_store::replication::ReplicationStatus, String>,
    routes: Vec<RouteLine>,
    /// The active cluster configuration, and where this host's own settings differ from it.
    config: ConfigView,
    /// The Sparkplug B edge nodes recorded (none: the cluster reads no Sparkplug).
    sparkplug: leasehold_store::sparkplug::Summary,
}

/// The active cluster configuration as `status` shows it.
#[derive(Serialize, Default)]
struct ConfigView {
    version: Option<i64>,
    applied_at: Option<String>,
    applied_by: Option<String>,
    /// This host's own cluster settings that the active version overrides.
    drift: Vec<String>,
    /// Why the active version could not be read with this host's node settings.
    error: Option<String>,
}

impl ConfigView {
    /// The active version over `cfg`'s node settings (what a node on this host would run), or
    /// `cfg` itself when there is none or it does not load here.
    async fn read(
        c: &leasehold_store::Client,
        cfg: &Config,
    ) -> anyhow::Result<(ConfigView, Config)> {
        let Some(s) = leasehold_store::config::active(c).await? else {
            return Ok((ConfigView::default(), cfg.clone()));
        };
        let (effective, error) = match crate::cluster_config::over(cfg, &s) {
            Ok(e) => (e, None),
            Err(e) => (cfg.clone(), Some(e.to_string())),
        };
        let view = ConfigView {
            version: Some(s.version),
            applied_at: Some(s.applied_at.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
            applied_by: Some(s.applied_by),
            drift: cfg
                .drift(&effective)
                .iter()
                .map(ToString::to_string)
                .collect(),
            error,
        };
        Ok((view, effective))
    }

    fn print(&self, nodes: &[queries::NodeRow]) {
        match (self.version, &self.applied_at, &self.applied_by) {
            (Some(v), Some(at), Some(by)) => {
                let running: Vec<String> = nodes
                    .iter()
                    .filter(|n| n.alive)
                    .map(|n| match n.config_version {
                        Some(nv) => format!("{} runs {nv}", n.instance_id),
                        None => format!("{} runs none", n.instance_id),
                    })
                    .collect();
                println!(
                    "CONFIG   cluster configuration version {v} (applied {at} by {by}); {}",
                    if running.is_empty() { "no node alive".to_string() } else { running.join(", ") }
                );
            }
            _ => println!("CONFIG   no cluster configuration stored yet (the first production node imports its own)"),
        }
        if let Some(e) = &self.error {
            println!("WARNING  the active configuration does not run with this host's node settings: {e}");
        }
        for d in &self.drift {
            println!("WARNING  this host: {d}");
        }
    }
}

/// `status --json`: the cluster report `/cluster` shows, and what only `status` adds.
#[derive(Serialize)]
struct StatusJson<'a> {
    #[serde(flatten)]
    report: &'a ClusterReport,
    #[serde(flatten)]
    more: serde_json::Value,
}

/// How far back `leasehold status` counts dead letters per route.
const DEAD_LETTERS_WITHIN_SECS: f64 = 3600.0;

/// A route as `leasehold status` shows it: from this configuration, with its recent dead letters.
#[derive(Serialize)]
struct RouteLine {
    name: String,
    table: String,
    topics: Vec<String>,
    key: Vec<String>,
    on_conflict: &'static str,
    /// False for a route named by dead letters but absent from this configuration.
    configured: bool,
    #[serde(rename = "dead_letters_last_hour")]
    dead_letters: i64,
    /// Why the leader holds it suspended, as its heartbeat last reported; `None` while it writes.
    suspended: Option<String>,
}

impl RouteLine {
    /// The default route, each configured route, then any other route recent dead letters name.
    fn all(cfg: &Config, dead: &[(Option<String>, i64)]) -> Vec<RouteLine> {
        let count = |name: Option<&str>| {
            dead.iter()
                .filter(|(r, _)| r.as_deref() == name)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        let mut lines = vec![RouteLine {
            name: "default".into(),
            table: "telemetry".into(),
            topics: cfg.cluster.mqtt_topics.clone(),
            key: vec!["device_id".into(), "topic".into(), "ts".into()],
            on_conflict: "nothing",
            configured: true,
            dead_letters: count(None),
            suspended: None,
        }];
        lines.extend(cfg.routes.iter().map(|r| RouteLine {
            name: r.name.clone(),
            table: r.table.clone(),
            topics: r.topics.clone(),
            key: r.key.clone(),
            on_conflict: r.on_conflict.as_str(),
            configured: true,
            dead_letters: count(Some(&r.name)),
            suspended: None,
        }));
        let unknown = dead
            .iter()
            .filter_map(|(name, n)| Some((name.as_ref()?, *n)));
        lines.extend(
            unknown
                .filter(|(name, _)| !cfg.routes.iter().any(|r| &r.name == *name))
                .map(|(name, n)| RouteLine {
                    name: name.clone(),
                    table: "?".into(),
                    topics: Vec::new(),
                    key: Vec::new(),
                    on_conflict: "?",
                    configured: false,
                    dead_letters: n,
                    suspended: None,
                }),
        );
        lines
    }

    fn print(&self) {
        if let Some(why) = &self.suspended {
            println!("ROUTE    {} SUSPENDED: {why}", self.name);
        }
        if self.configured {
            println!(
                "ROUTE    {} -> {} [{}] key ({}), on_conflict {}: {} dead letters in the last hour",
                self.name,
                self.table,
                self.topics.join(", "),
                self.key.join(", "),
                self.on_conflict,
                self.dead_letters
            );
        } else {
            println!(
                "ROUTE    {} (not in this configuration): {} dead letters in the last hour",
                self.name, self.dead_letters
            );
        }
    }
}

impl Report {
    async fn read(c: &leasehold_store::Client, cfg: &Config) -> anyhow::Result<Report> {
        let report = ClusterReport::read(c, &cfg.node.lease_name).await?;
        let age = queries::newest_data_age(c).await?;
        let open_alerts: Vec<_> = leasehold_alerts::recent(c, 50)
            .await?
            .into_iter()
            .filter(|a| a.resolved_at.is_none())
            .collect();
        let alive: Vec<_> = report.nodes.iter().filter(|n| n.alive).collect();
        let cluster = ClusterView::read(c, cfg, &alive).await;
        let replication = leasehold_store::replication::status(c)
            .await
            .map_err(|e| e.database_text());
        let dead = queries::dead_letters_by_route(c, DEAD_LETTERS_WITHIN_SECS).await?;
        let (config, effective) = ConfigView::read(c, cfg).await?;
        let mut routes = RouteLine::all(&effective, &dead);
        let suspended = leasehold_store::alerts::suspended_routes(
            c,
            &cfg.node.lease_name,
            std::time::Duration::from_secs(120),
        )
        .await?;
        for (name, _, error) in suspended {
            if let Some(r) = routes.iter_mut().find(|r| r.name == name) {
                r.suspended = Some(error);
            }
        }
        let sparkplug = leasehold_store::sparkplug::summary(c).await?;
        Ok(Report {
            sparkplug,
            routes,
            config,
            replication,
            report,
            age,
            open_alerts,
            cluster,
        })
    }

    fn leader(&self) -> Option<&queries::LeaseRow> {
        self.report.leader.as_ref()
    }

    fn json(&self) -> StatusJson<'_> {
        let cluster = &self.cluster;
        let more = json!({
            "cluster": {
                "id": cluster.identity.as_ref().map(|i| &i.cluster_id),
                "created_at": cluster.identity.as_ref().map(|i| i.created_at.to_rfc3339()),
                "default_client_id": cluster.default_client_id,
                "error": cluster.error,
            },
            "warnings": cluster.warnings,
            "newest_data_age_seconds": self.age,
            "alerts_open": self.open_alerts,
            "replication": match &self.replication {
                Ok(r) => json!(r.view()),
                Err(e) => json!({"error": e}),
            },
            "routes": self.routes,
            "config": self.config,
            "sparkplug": {
                "edge_nodes": self.sparkplug.edge_nodes,
                "edge_nodes_online": self.sparkplug.edge_nodes_online,
                "devices_online": self.sparkplug.devices_online,
                "awaiting_rebirth": self.sparkplug.stale,
                "last_birth_at": self.sparkplug.last_birth.map(|t| t.to_rfc3339()),
            },
        });
        StatusJson {
            report: &self.report,
            more,
        }
    }

    fn print(&self) {
        let cluster = &self.cluster;
        match (&cluster.identity, &cluster.default_client_id) {
            (Some(i), Some(d)) => println!(
                "CLUSTER  {} (created {}); default MQTT client id {d} for lease {:?}",
                i.cluster_id,
                i.created_at.format("%Y-%m-%d %H:%M:%S UTC"),
                self.report.lease_name
            ),
            _ => println!(
                "CLUSTER  identity unknown: {}",
                cluster.error.as_deref().unwrap_or("-")
            ),
        }
        match (self.leader(), &self.report.lease) {
            (Some(l), _) => println!(
                "LEADER   {} (epoch {}, lease expires in {}, holder {})",
                l.instance_id,
                l.epoch,
                secs(l.expires_in_ms),
                l.holder_id
            ),
            (None, Some(l)) => println!(
                "NO LEADER  lease {:?} expired {} ago (last holder {}, epoch {})",
                self.report.lease_name,
                secs(-l.expires_in_ms),
                l.instance_id,
                l.epoch
            ),
            (None, None) => println!(
                "NO LEADER  lease {:?} has never been taken",
                self.report.lease_name
            ),
        }
        println!("NODES    {} alive", self.report.nodes_alive);
        for n in self.report.nodes.iter().take(20) {
            print_node(n);
        }
        self.config.print(&self.report.nodes);
        for w in &cluster.warnings {
            println!("WARNING  {w}");
        }
        match &self.replication {
            Ok(r) if r.synchronously_replicated() => println!(
                "DATABASE commits synchronously replicated (synchronous_commit {}, in sync: {})",
                r.synchronous_commit,
                r.sync_standbys
                    .iter()
                    .map(|s| s.application_name.as_deref().unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Ok(r) => println!(
                "DATABASE commits NOT synchronously replicated: {}",
                r.why_not().unwrap_or_default()
            ),
            Err(e) => println!("DATABASE replication unknown: {e}"),
        }
        for r in &self.routes {
            r.print();
        }
        let sp = &self.sparkplug;
        if sp.edge_nodes > 0 {
            println!(
                "SPARKPLUG {} of {} edge nodes online, {} devices online, {} awaiting a rebirth; last birth {}",
                sp.edge_nodes_online,
                sp.edge_nodes,
                sp.devices_online,
                sp.stale,
                sp.last_birth
                    .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            );
        }
        match self.age {
            Some(a) => println!("DATA     newest row received {a:.1}s ago"),
            None => println!("DATA     no rows yet"),
        }
        if self.open_alerts.is_empty() {
            println!("ALERTS   none open");
        } else {
            println!("ALERTS   {} open", self.open_alerts.len());
            for a in &self.open_alerts {
                println!(
                    "  {:<8} {:<26} since {}  {}",
                    a.level.to_uppercase(),
                    a.kind,
                    a.opened_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    a.message
                );
            }
        }
    }
}

fn print_node(n: &queries::NodeRow) {
    let client_id = match (&n.mqtt_client_id, &n.mqtt_client_id_source) {
        (Some(id), Some(source)) => format!("  client id {id} ({source})"),
        _ => String::new(),
    };
    println!(
        "  {:<20} {:<9} {:<12} {:<6} {:<13} seen {:.1}s ago  v{}  config {}  {}{client_id}",
        n.instance_id,
        n.role,
        n.mode,
        if n.alive { "alive" } else { "gone" },
        match (n.mqtt_connected, n.role.as_str()) {
            (true, _) => "mqtt up",
            (false, "leader" | "observer") => "MQTT DOWN",
            (false, _) => "-",
        },
        n.last_seen_seconds_ago,
        n.version,
        n.config_version.map_or("-".into(), |v| v.to_string()),
        n.http_url.as_deref().unwrap_or("-")
    );
}

/// The cluster's identity and what `status` must warn about the client ids its nodes use.
struct ClusterView {
    identity: Option<queries::ClusterIdentity>,
    /// The id production nodes without `MQTT_CLIENT_ID` use for this `LEASE_NAME`.
    default_client_id: Option<String>,
    error: Option<String>,
    warnings: Vec<String>,
}

impl ClusterView {
    async fn read(
        c: &leasehold_store::Client,
        cfg: &Config,
        alive: &[&queries::NodeRow],
    ) -> ClusterView {
        let (identity, mut error) = match queries::cluster_identity(c).await {
            Ok(Some(i)) => (Some(i), None),
            Ok(None) => (
                None,
                Some(leasehold_config::ClientIdError::NoIdentity.to_string()),
            ),
            // A schema older than migration 4: `leasehold migrate` creates the identity.
            Err(e) => (None, Some(format!("{e} (run `leasehold migrate`)"))),
        };
        let default_client_id = identity.as_ref().and_then(|i| {
            leasehold_config::derive_client_id(&i.cluster_id, &cfg.node.lease_name)
                .map_err(|e| error = Some(e.to_string()))
                .ok()
        });
        let explicit = alive
            .iter()
            .filter(|n| n.mqtt_client_id_source.as_deref() == Some("explicit"));
        let mut warnings: Vec<String> = explicit.map(|n| format!(
            "{} uses MQTT_CLIENT_ID={} set explicitly: a machine started with a copy of its configuration and another database takes this cluster's broker session; unset MQTT_CLIENT_ID to use the derived id{}",
            n.instance_id,
            n.mqtt_client_id.as_deref().unwrap_or("?"),
            default_client_id.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
        )).collect();
        let mut ids: Vec<&str> = alive
            .iter()
            .filter_map(|n| n.mqtt_client_id.as_deref())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > 1 {
            warnings.push(format!(
                "the nodes use different MQTT client ids ({}): they do not share one broker session, so a failover does not resume what the previous leader left queued (all nodes of one LEASE_NAME must use the same id)",
                ids.join(", ")
            ));
        }
        ClusterView {
            identity,
            default_client_id,
            error,
            warnings,
        }
    }
}

pub async fn step_down(cfg: &Config, timeout: Duration) -> anyhow::Result<ExitCode> {
    let c = connect(cfg, "leasehold-step-down").await?;
    let Some(before) = queries::lease(&c, &cfg.node.lease_name)
        .await?
        .filter(|l| l.is_live())
    else {
        anyhow::bail!(
            "no leader holds lease {:?}: nothing to step down",
            cfg.node.lease_name
        );
    };
    println!(
        "asking {} (epoch {}) to hand over...",
        before.instance_id, before.epoch
    );
    // NOTIFY reaches only sessions listening at that instant: a leader whose LISTEN connection
    // is reconnecting would miss a single request. Repeat it until the holder changes.
    let started = Instant::now();
    let mut last_sent: Option<Instant> = None;
    while started.elapsed() < timeout {
        if last_sent.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
            queries::request_step_down(&c, &cfg.node.lease_name, &before.holder_id).await?;
            last_sent = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(now) = queries::lease(&c, &cfg.node.lease_name).await? {
            if now.holder_id != before.holder_id && now.is_live() {
                println!(
                    "leadership moved from {} (epoch {}) to {} (epoch {}) in {} ms",
                    before.instance_id,
                    before.epoch,
                    now.instance_id,
                    now.epoch,
                    started.elapsed().as_millis()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    anyhow::bail!(
        "no other node took over within {}: is a standby running? ({} may lead again after its back-off)",
        leasehold_config::fmt_dur(timeout),
        before.instance_id
    )
}
