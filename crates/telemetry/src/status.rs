//! What a node knows about itself now, as typed values.
//!
//! Each part has one owner that writes it (the ingest task its MQTT part, the heartbeat the
//! cluster part and the replication, the start-up checks the checks); `/health` and the
//! heartbeat read it. Metrics show the same facts to Prometheus, but nothing reads a metric back
//! to decide anything: a gauge is an export, not state.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::replication::ReplicationStatus;

/// The node's status, as last written by its owners.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub mqtt: MqttStatus,
    pub cluster: ClusterStatus,
    /// The deployment checks run at start; `None` until they finished.
    pub checks: Option<Checks>,
    /// How the database replicates commits, as the heartbeat last read it.
    pub replication: Option<ReplicationRead>,
    /// Why the leader's writer holds intake now (`REQUIRE_SYNC_REPLICATION` and commits not
    /// synchronously replicated); `None` while it ingests. Written by the writer.
    pub ingest_hold: Option<String>,
    /// Named routes, written by the writer on every committed batch (empty without routes).
    pub routes: Vec<RouteCounts>,
    /// The lease epoch whose writer last said which routes are suspended (`None` between
    /// terms): the heartbeat reports the suspensions only of its own term.
    pub routes_term: Option<i64>,
    /// The cluster configuration this node runs, written by its configuration task.
    pub config: ConfigStatus,
    /// The Sparkplug B edge nodes this node's writer holds (a leader reading `sparkplug_b`).
    pub sparkplug: Option<SparkplugStatus>,
}

/// A leader's Sparkplug B view, written by its writer after each batch that changed it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SparkplugStatus {
    pub host_id: Option<String>,
    pub edge_nodes: usize,
    pub edge_nodes_online: usize,
    pub devices_online: usize,
    pub last_birth_at: Option<DateTime<Utc>>,
    /// Rebirth requests this node sent since it started.
    pub rebirths_requested: u64,
}

/// The cluster configuration a node runs, and where its own settings disagree with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigStatus {
    /// The version it runs; `None` when the database holds none (or the node has no database).
    pub version: Option<i64>,
    /// The newest version it has seen; above `version` while that one cannot run here.
    pub latest: Option<i64>,
    /// Each cluster setting this node's own file, environment or flags set differently (ignored).
    pub drift: Vec<String>,
    /// Why `latest` does not run here, when it does not.
    pub problem: Option<String>,
}

leasehold_config::named! {
    /// How one deployment check came out.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
    #[serde(rename_all = "lowercase")]
    pub enum CheckLevel {
        Ok = "ok",
        /// Works, but something G2 stands on is weaker than it should be.
        Warning = "warning",
        /// Something that loses or misroutes data: `leasehold doctor` exits 1.
        Problem = "problem",
    }
}

/// One check of the deployment (`leasehold doctor`, and at start).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Stable name, e.g. `broker.queue`, `database.durability`.
    pub id: String,
    pub level: CheckLevel,
    /// What was found.
    pub summary: String,
    /// What to change, when something should change.
    pub fix: Option<String>,
}

impl Check {
    fn new(id: &str, level: CheckLevel, summary: impl Into<String>, fix: Option<String>) -> Self {
        Check {
            id: id.to_string(),
            level,
            summary: summary.into(),
            fix,
        }
    }

    pub fn ok(id: &str, summary: impl Into<String>) -> Self {
        Check::new(id, CheckLevel::Ok, summary, None)
    }

    pub fn warning(id: &str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(id, CheckLevel::Warning, summary, Some(fix.into()))
    }

    pub fn problem(id: &str, summary: impl Into<String>, fix: impl Into<String>) -> Self {
        Check::new(id, CheckLevel::Problem, summary, Some(fix.into()))
    }

    /// One line: `level  id: summary; fix`.
    pub fn line(&self) -> String {
        let fix = self
            .fix
            .as_ref()
            .map_or(String::new(), |f| format!(" -> {f}"));
        format!(
            "{:<8} {}: {}{fix}",
            self.level.as_str(),
            self.id,
            self.summary
        )
    }
}

/// The checks of one run and when they ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checks {
    pub ran_at: DateTime<Utc>,
    pub checks: Vec<Check>,
}

impl Checks {
    /// The worst level found (`Ok` for no checks).
    pub fn worst(&self) -> CheckLevel {
        self.checks
            .iter()
            .map(|c| c.level)
            .max()
            .unwrap_or(CheckLevel::Ok)
    }
}

/// The replication of the database's commits and when it was read (or why it could not be).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationRead {
    pub read_at: DateTime<Utc>,
    pub result: Result<ReplicationStatus, String>,
}

/// What a named route wrote on this node since it started (`/health`'s `routes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouteCounts {
    pub name: String,
    /// `schema.table`, as stored in the catalog.
    pub table: String,
    pub written: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
    /// Why it is suspended (its table cannot be written now), or `None` while it writes.
    pub suspended: Option<String>,
}

/// The broker side, written by the ingest task of the current term (or of the observer).
#[derive(Debug, Clone, Default)]
pub struct MqttStatus {
    pub connected: bool,
    /// When a standby's probe last reached the broker (connected, credentials accepted).
    pub probe_reached: Option<Instant>,
    /// Why a leader cut off from the broker keeps the lease (no standby reached the broker
    /// either); `None` otherwise.
    pub keeps_lease: Option<String>,
    /// Connections after the first of a term, over the node's life.
    pub reconnects: u64,
    /// Topic filters refused or granted below QoS 1, every attempt counted.
    pub subscribe_failures: u64,
    /// When a resumed connection last found the broker without the session.
    pub session_lost_at: Option<DateTime<Utc>>,
    /// When repeated quick disconnects last showed another process using the client id.
    pub client_id_conflict_at: Option<DateTime<Utc>>,
    pub subscriptions: SubscriptionStatus,
    /// Messages received and not yet acknowledged, and their payload and topic bytes.
    pub pending: usize,
    pub pending_bytes: usize,
}

/// What the heartbeat last read from the database.
#[derive(Debug, Clone, Default)]
pub struct ClusterStatus {
    /// Nodes that heartbeated recently; `None` until the first heartbeat.
    pub alive_nodes: Option<usize>,
    /// Age of the newest stored reading on the database clock; `None` when there is none.
    pub newest_data_age: Option<f64>,
}

/// The session's subscriptions as the ingest task last reported them (`/health/mqtt`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionStatus {
    /// Whether the subscription ledger was read for the current connection.
    pub loaded: bool,
    /// Wanted filters: configured (`MQTT_TOPICS`) plus enabled `devices` topics.
    pub wanted: usize,
    pub configured: usize,
    pub device_topics: usize,
    /// Granted with QoS 1 or above.
    pub subscribed: usize,
    /// Still to subscribe or unsubscribe (including those in flight).
    pub pending: usize,
    /// Filters refused by this term's session so far, every attempt counted.
    pub refusals: u64,
    /// Wanted filters currently refused, and the first of them.
    pub failed_total: usize,
    pub failed: Vec<FailedSubscription>,
}

/// A wanted filter the broker refused (SUBACK 0x80) or granted below QoS 1.
#[derive(Debug, Clone, PartialEq)]
pub struct FailedSubscription {
    pub filter: String,
    pub reason: String,
    pub attempts: u32,
    pub since: Instant,
    pub retry_at: Instant,
}

/// Sets `slot` to `value`: whether that changed it.
fn replaced<T: PartialEq>(slot: &mut T, value: T) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

/// The node's status channel: cheap to clone, one per node (a fresh one per test node).
#[derive(Clone, Debug)]
pub struct NodeStatus(Arc<watch::Sender<Status>>);

impl Default for NodeStatus {
    fn default() -> Self {
        NodeStatus(Arc::new(watch::Sender::new(Status::default())))
    }
}

impl NodeStatus {
    /// The MQTT part, without copying the rest.
    pub fn mqtt(&self) -> MqttStatus {
        self.0.borrow().mqtt.clone()
    }

    pub fn cluster(&self) -> ClusterStatus {
        self.0.borrow().cluster.clone()
    }

    /// Changes the MQTT part (events: rare).
    pub fn update_mqtt(&self, f: impl FnOnce(&mut MqttStatus)) {
        self.0.send_modify(|s| f(&mut s.mqtt));
    }

    /// Sets the pending counts, which change with every message: readers are woken only when
    /// they differ.
    pub fn set_pending(&self, pending: usize, pending_bytes: usize) {
        self.0.send_if_modified(|s| {
            replaced(&mut s.mqtt.pending, pending)
                | replaced(&mut s.mqtt.pending_bytes, pending_bytes)
        });
    }

    /// The last run of the deployment checks.
    pub fn checks(&self) -> Option<Checks> {
        self.0.borrow().checks.clone()
    }

    pub fn set_checks(&self, checks: Checks) {
        self.0.send_modify(|s| s.checks = Some(checks));
    }

    /// How the database replicates commits, as last read.
    pub fn replication(&self) -> Option<ReplicationRead> {
        self.0.borrow().replication.clone()
    }

    pub fn set_replication(&self, read: ReplicationRead) {
        self.0.send_modify(|s| s.replication = Some(read));
    }

    /// Why the leader holds intake now, if it does.
    pub fn ingest_hold(&self) -> Option<String> {
        self.0.borrow().ingest_hold.clone()
    }

    pub fn set_ingest_hold(&self, why: Option<String>) {
        self.0
            .send_if_modified(|s| replaced(&mut s.ingest_hold, why));
    }

    pub fn config(&self) -> ConfigStatus {
        self.0.borrow().config.clone()
    }

    pub fn set_config(&self, config: ConfigStatus) {
        self.0.send_if_modified(|s| replaced(&mut s.config, config));
    }

    pub fn update_cluster(&self, f: impl FnOnce(&mut ClusterStatus)) {
        self.0.send_modify(|s| f(&mut s.cluster));
    }

    pub fn sparkplug(&self) -> Option<SparkplugStatus> {
        self.0.borrow().sparkplug.clone()
    }

    /// Changes the Sparkplug part (the writer, after a batch that changed it).
    pub fn update_sparkplug(&self, f: impl FnOnce(&mut SparkplugStatus)) {
        self.0
            .send_modify(|s| f(s.sparkplug.get_or_insert_with(Default::default)));
    }

    pub fn routes(&self) -> Vec<RouteCounts> {
        self.0.borrow().routes.clone()
    }

    /// Changes the named routes' counts (the writer, once per batch).
    pub fn update_routes(&self, f: impl FnOnce(&mut Vec<RouteCounts>)) {
        self.0.send_modify(|s| f(&mut s.routes));
    }

    /// The named routes with the term whose writer said which are suspended, read together.
    pub fn routes_of_term(&self) -> (Option<i64>, Vec<RouteCounts>) {
        let s = self.0.borrow();
        (s.routes_term, s.routes.clone())
    }

    /// Changes the named routes and says which term's writer vouches for their suspensions
    /// (`None`: none does), in one change.
    pub fn update_routes_of_term(&self, term: Option<i64>, f: impl FnOnce(&mut Vec<RouteCounts>)) {
        self.0.send_modify(|s| {
            f(&mut s.routes);
            s.routes_term = term;
        });
    }

    /// Wakes when the status changed.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_that_changes_nothing_wakes_no_reader() {
        let s = NodeStatus::default();
        let mut rx = s.subscribe();
        rx.mark_unchanged();
        s.set_pending(0, 0);
        assert!(!rx.has_changed().unwrap_or(true));
        s.set_pending(3, 120);
        assert!(rx.has_changed().unwrap_or(false));
        assert_eq!((s.mqtt().pending, s.mqtt().pending_bytes), (3, 120));
    }

    #[test]
    fn checks_report_their_worst_level_and_print_one_line_each() {
        let checks = Checks {
            ran_at: Utc::now(),
            checks: vec![
                Check::ok("a.one", "fine"),
                Check::warning("a.two", "weak", "strengthen it"),
            ],
        };
        assert_eq!(checks.worst(), CheckLevel::Warning);
        assert_eq!(
            checks.checks[1].line(),
            "warning  a.two: weak -> strengthen it"
        );
        assert_eq!(checks.checks[0].line(), "ok       a.one: fine");
        let s = NodeStatus::default();
        assert!(s.checks().is_none());
        s.set_checks(checks.clone());
        assert_eq!(s.checks(), Some(checks));
    }

    #[test]
    fn owners_write_their_own_part() {
        let s = NodeStatus::default();
        let now = Utc::now();
        s.update_mqtt(|m| m.session_lost_at = Some(now));
        s.update_cluster(|c| c.newest_data_age = Some(1.5));
        assert_eq!(s.mqtt().session_lost_at, Some(now));
        assert_eq!(s.cluster().newest_data_age, Some(1.5));
    }
}
