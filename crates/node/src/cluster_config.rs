//! The cluster configuration a node runs: the active stored version over this host's node
//! settings, read at start (a first start imports this node's own cluster settings as version 1)
//! and applied live when a new version is announced.
//!
//! [`Active`] is published on a `watch` channel; each consumer applies it at its own boundary:
//! the writer between batches, the ingest by (un)subscribing, alerts and retention on their next
//! round, a new leadership term from the start.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use leasehold_config::cluster::version_origin;
use leasehold_config::{ClusterSettings, Config, Mode};
use leasehold_store::config::{self as stored, StoredConfig, CONFIG_CHANNEL};
use leasehold_store::listener::Notice;
use leasehold_store::routes::ResolvedRoute;
use leasehold_store::Pool;
use leasehold_telemetry::{events, ConfigStatus, NodeStatus};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the node runs: the effective configuration and its routes, resolved against the catalog.
#[derive(Clone)]
pub struct Active {
    /// `None`: the database holds no version (a node that may not import one).
    pub version: Option<i64>,
    pub cfg: Config,
    /// Every route of `cfg`, in its order; one whose table does not resolve now is
    /// [`ResolvedRoute::unresolved`] and suspended.
    pub routes: Vec<ResolvedRoute>,
    /// Per route: why it runs suspended (its table does not fit now), or `None`.
    pub suspended: Vec<Option<String>>,
}

pub type ActiveRx = watch::Receiver<Arc<Active>>;

/// The active version cannot run with this host's node settings: a start-up configuration
/// error (exit 2), one line naming the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRefused(pub String);

/// A missed NOTIFY (the LISTEN connection was down) is caught up within this.
const POLL: Duration = Duration::from_secs(10);

/// At start: the active version (a production node's first start on an empty table imports
/// its own cluster settings as version 1), with the routes resolved. Any problem refuses the
/// start, in one line naming the setting and the version.
pub async fn start(own: &Config, pool: &Pool, status: &NodeStatus) -> anyhow::Result<Active> {
    let c = leasehold_store::pooled(pool)
        .await
        .context("reading the cluster configuration")?;
    let found = stored::active(&**c)
        .await
        .context("reading the cluster configuration")?;
    let found = match found {
        None if own.node.mqtt_mode == Mode::Production => {
            // What is imported must run: the routes are checked before they are stored.
            crate::routes_cmd::check_at_start(own, pool).await?;
            let by = format!("import by {}", own.instance_id);
            let toml = own.own_cluster_settings().to_toml();
            Some(stored::import(&**c, &toml, &by).await?)
        }
        found => found,
    };
    let active = match &found {
        Some(s) => load(own, pool, s).await.map_err(ConfigRefused)?,
        // Its own configuration, never checked before: refused as a first start is.
        None => {
            let routes = crate::routes_cmd::check_at_start(own, pool).await?;
            Active {
                version: None,
                cfg: own.clone(),
                suspended: vec![None; routes.len()],
                routes,
            }
        }
    };
    tracing::info!(version = active.version.unwrap_or(0), config = ?active.cfg, "the configuration this node runs (its node settings, the cluster's version)");
    applied(own, status, &active, &[], false);
    Ok(active)
}

/// `active` is what the node runs now: its event, this host's drift from it, the status.
fn applied(own: &Config, status: &NodeStatus, active: &Active, changes: &[String], live: bool) {
    let version = active.version;
    events::ConfigApplied {
        version,
        changes,
        live,
    }
    .emit();
    let drift = report_drift(own, active);
    status.set_config(ConfigStatus {
        version,
        latest: version,
        drift,
        problem: None,
    });
}

/// The stored version `s` over `own`'s node settings.
pub fn over(own: &Config, s: &StoredConfig) -> Result<Config, leasehold_config::ConfigError> {
    let origin = version_origin(s.version);
    own.with_cluster(
        &ClusterSettings::parse(&s.settings, origin.clone())?,
        origin,
    )
}

/// The stored version `s` over this host's node settings, its routes resolved (one that does not
/// fit the catalog now runs suspended: a broken table stops only its route); the error is one
/// line naming the setting that does not fit this host.
async fn load(own: &Config, pool: &Pool, s: &StoredConfig) -> Result<Active, String> {
    let cfg = over(own, s).map_err(|e| e.to_string())?;
    let (routes, suspended) = crate::routes_cmd::resolve_each(&cfg, pool)
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(Active {
        version: Some(s.version),
        cfg,
        routes,
        suspended,
    })
}

/// What a command on this host runs with: the active version over `own`'s node settings (`own`
/// itself when the database holds none).
pub async fn effective(own: &Config, c: &leasehold_store::Client) -> anyhow::Result<Config> {
    let Some(s) = stored::active(c).await? else {
        return Ok(own.clone());
    };
    Ok(over(own, &s)?)
}

/// Logs each of this host's own cluster settings that the running version overrides.
fn report_drift(own: &Config, active: &Active) -> Vec<String> {
    if active.version.is_none() {
        return Vec::new();
    }
    let drift: Vec<String> = own
        .drift(&active.cfg)
        .iter()
        .map(ToString::to_string)
        .collect();
    for d in &drift {
        events::ConfigDrift { drift: d }.emit();
    }
    drift
}

/// Follows the active version: on its NOTIFY (and every [`POLL`]) reads it, and publishes it
/// when it runs here. A version that cannot run here is refused: the node keeps the one it
/// runs, and says why (`/health`, the `config_outdated` alert).
pub struct Watcher {
    pub own: Config,
    pub pool: Pool,
    pub notices: broadcast::Receiver<Notice>,
    pub tx: watch::Sender<Arc<Active>>,
    pub status: NodeStatus,
}

impl Watcher {
    pub async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut refused: Option<String> = None;
        // A poll that other notifications do not postpone.
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = poll.tick() => {}
                n = self.notices.recv() => match n {
                    Ok(Notice::Notify { channel, .. }) if channel != CONFIG_CHANNEL => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    // The LISTEN task is gone (shutting down): the poll still runs.
                    Err(broadcast::error::RecvError::Closed) => {
                        self.notices = broadcast::channel(1).1;
                    }
                },
            }
            if let Err(e) = self.refresh(&mut refused).await {
                tracing::debug!(error = %e, "reading the cluster configuration failed; retrying");
            }
        }
    }

    async fn refresh(&mut self, refused: &mut Option<String>) -> anyhow::Result<()> {
        let c = leasehold_store::pooled(&self.pool).await?;
        let Some(latest) = stored::active(&**c).await? else {
            return Ok(());
        };
        drop(c);
        let current = self.tx.borrow().clone();
        if Some(latest.version) == current.version {
            return Ok(());
        }
        match load(&self.own, &self.pool, &latest).await {
            Ok(next) => {
                *refused = None;
                let changes = current.cfg.changes(&next.cfg);
                applied(&self.own, &self.status, &next, &changes, true);
                self.tx.send_replace(Arc::new(next));
            }
            Err(problem) => {
                if refused.as_ref() != Some(&problem) {
                    events::ConfigRefused {
                        version: latest.version,
                        running: current.version,
                        error: &problem,
                    }
                    .emit();
                }
                let mut st = self.status.config();
                st.latest = Some(latest.version);
                st.problem = Some(problem.clone());
                self.status.set_config(st);
                *refused = Some(problem);
            }
        }
        Ok(())
    }
}

/// A channel of what `f` makes of the active configuration, kept up to date by a task of
/// `tracker` until `cancel`: each consumer watches only its own part.
pub fn derived<T>(
    active: &ActiveRx,
    f: fn(&Active) -> T,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> watch::Receiver<T>
where
    T: PartialEq + Send + Sync + 'static,
{
    let mut rx = active.clone();
    let (tx, out) = watch::channel(f(&rx.borrow_and_update()));
    let cancel = cancel.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // This task is the channel's only sender.
                    let next = f(&rx.borrow_and_update());
                    if *tx.borrow() != next {
                        tx.send_replace(next);
                    }
                }
            }
        }
    });
    out
}
