//! Internal events: each struct is one thing that happened; `emit()` logs it once and moves its
//! metric, so dashboards and logs always agree. Errors are logged here, where they are handled.

use crate::metrics;

pub struct LeaseAcquired<'a> {
    pub epoch: i64,
    pub holder_id: &'a str,
}
impl LeaseAcquired<'_> {
    pub fn emit(self) {
        tracing::info!(
            epoch = self.epoch,
            holder_id = self.holder_id,
            "lease acquired: this node is the leader"
        );
        let m = metrics();
        m.lease_is_leader.set(1);
        m.lease_epoch.set(self.epoch);
        m.lease_transitions.with_label_values(&["leader"]).inc();
    }
}

pub struct LeaseLost<'a> {
    pub epoch: i64,
    pub reason: &'a str,
}
impl LeaseLost<'_> {
    pub fn emit(self) {
        tracing::warn!(
            epoch = self.epoch,
            reason = self.reason,
            "lease lost: demoted to standby"
        );
        let m = metrics();
        m.lease_is_leader.set(0);
        m.lease_transitions.with_label_values(&["standby"]).inc();
    }
}

pub struct LeaseReleased {
    pub epoch: i64,
}
impl LeaseReleased {
    pub fn emit(self) {
        tracing::info!(epoch = self.epoch, "lease released: standbys notified");
        let m = metrics();
        m.lease_is_leader.set(0);
        m.lease_transitions.with_label_values(&["standby"]).inc();
    }
}

pub struct LeaseRenewFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub remaining_ms: u128,
}
impl LeaseRenewFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %self.error, remaining_ms = self.remaining_ms as u64, "lease renewal failed; retrying before the demotion deadline");
        metrics().lease_renew_failures.inc();
    }
}

pub struct MqttConnected<'a> {
    pub broker: &'a str,
    pub session_present: bool,
    pub reconnect: bool,
}
impl MqttConnected<'_> {
    pub fn emit(self) {
        tracing::info!(
            broker = self.broker,
            session_present = self.session_present,
            "connected to broker"
        );
        let m = metrics();
        m.mqtt_connected.set(1);
        if self.reconnect {
            m.mqtt_reconnects.inc();
        }
    }
}

pub struct MqttDisconnected<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub retry_in_ms: u128,
}
impl MqttDisconnected<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %self.error, retry_in_ms = self.retry_in_ms as u64, "broker connection lost or refused; reconnecting");
        let m = metrics();
        m.mqtt_connected.set(0);
        m.mqtt_connection_errors.inc();
    }
}

/// The broker resumed our connection without the session: whatever it had queued is gone.
pub struct MqttSessionLost<'a> {
    pub client_id: &'a str,
}
impl MqttSessionLost<'_> {
    pub fn emit(self) {
        tracing::error!(client_id = self.client_id, "broker had no session for this client id (session_present=false): messages queued while no leader was connected may be lost; check broker persistence and persistent_client_expiration");
        metrics().mqtt_session_lost.inc();
    }
}

/// Disconnected again and again right after connecting: someone else uses our client id.
pub struct MqttClientIdConflict<'a> {
    pub client_id: &'a str,
    pub quick_disconnects: u32,
}
impl MqttClientIdConflict<'_> {
    pub fn emit(self) {
        tracing::error!(client_id = self.client_id, quick_disconnects = self.quick_disconnects, "repeatedly disconnected right after connecting: another process is using this MQTT client id");
        metrics().mqtt_client_id_conflicts.inc();
    }
}

/// The session's subscriptions match the wanted topics (every filter subscribed, refused or
/// unsubscribed): the "devices subscribed" line of a (re)connect or of a change of `devices`.
pub struct TopicsSubscribed<'a> {
    pub configured: &'a [String],
    pub devices: usize,
    pub subscribed: usize,
    pub refused: usize,
    pub took_ms: u128,
}
impl TopicsSubscribed<'_> {
    pub fn emit(self) {
        if self.refused > 0 {
            tracing::warn!(configured = ?self.configured, device_topics = self.devices, subscribed = self.subscribed, refused = self.refused, took_ms = self.took_ms as u64, "topics subscribed, some refused by the broker (see /health/mqtt)");
        } else {
            tracing::info!(configured = ?self.configured, device_topics = self.devices, subscribed = self.subscribed, took_ms = self.took_ms as u64, "topics subscribed");
        }
    }
}

/// The broker refused topic filters (SUBACK 0x80) or granted them below QoS 1: nothing on them
/// reaches the session reliably. Never reported as subscribed; retried with backoff.
pub struct SubscriptionsRefused<'a> {
    /// (filter, reason) of this SUBACK's failures.
    pub refused: &'a [(String, String)],
    pub retry_in_ms: u128,
    /// Whether to write the log line (a refusal retried every few seconds is logged when it is
    /// new and then about once a minute; the counter counts every one).
    pub log: bool,
}
impl SubscriptionsRefused<'_> {
    pub fn emit(self) {
        if self.log {
            let first: Vec<String> = self
                .refused
                .iter()
                .take(5)
                .map(|(f, r)| format!("{f} ({r})"))
                .collect();
            tracing::error!(count = self.refused.len(), first = ?first, retry_in_ms = self.retry_in_ms as u64, "broker refused topic filter(s): nothing published on them reaches the session; check the broker ACL; retrying");
        }
        metrics()
            .mqtt_subscribe_failures
            .inc_by(self.refused.len() as u64);
    }
}

/// A batch committed (its rows' counts per route are [`RouteCommitted`]).
pub struct BatchCommitted {
    pub rows: usize,
    pub dead_lettered: u64,
    pub duration: std::time::Duration,
}
impl BatchCommitted {
    pub fn emit(self) {
        tracing::debug!(
            rows = self.rows,
            dead_lettered = self.dead_lettered,
            ms = self.duration.as_millis() as u64,
            "batch committed"
        );
        let m = metrics();
        m.batch_rows.observe(self.rows as f64);
        m.batch_write_duration.observe(self.duration.as_secs_f64());
    }
}

/// The `route` label of the default route (messages into `telemetry`).
pub const DEFAULT_ROUTE: &str = "default";

/// A batch's rows of one route committed (dead letters are [`DeadLettered`]).
pub struct RouteCommitted<'a> {
    pub route: &'a str,
    pub written: u64,
    pub duplicates: u64,
    pub conflicts: u64,
}
impl RouteCommitted<'_> {
    pub fn emit(self) {
        let m = metrics();
        m.messages_written
            .with_label_values(&[self.route])
            .inc_by(self.written);
        m.messages_duplicate
            .with_label_values(&[self.route])
            .inc_by(self.duplicates);
        m.messages_conflict
            .with_label_values(&[self.route])
            .inc_by(self.conflicts);
    }
}

pub struct DeadLettered<'a> {
    pub topic: &'a str,
    pub reason: &'static str,
    pub error: &'a str,
    /// The named route(s) the row was for (comma-separated), or [`DEFAULT_ROUTE`].
    pub route: &'a str,
}
impl DeadLettered<'_> {
    pub fn emit(self) {
        tracing::warn!(
            topic = self.topic,
            reason = self.reason,
            error = self.error,
            route = self.route,
            "message dead-lettered"
        );
        metrics()
            .messages_dead_lettered
            .with_label_values(&[self.reason, self.route])
            .inc();
    }
}

/// PostgreSQL refused a reading the decoder accepted; it is isolated from its batch and
/// dead-lettered (the `DeadLettered` event follows on commit).
pub struct RowRejected<'a> {
    pub topic: &'a str,
    pub error: &'a str,
}
impl RowRejected<'_> {
    pub fn emit(self) {
        tracing::warn!(
            topic = self.topic,
            error = self.error,
            "PostgreSQL rejected a reading; isolated from its batch, it goes to dead_letters"
        );
    }
}

pub struct WriteFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
    pub kind: &'static str,
    pub attempt: u32,
    pub retry_in_ms: u128,
}
impl WriteFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %self.error, attempt = self.attempt, retry_in_ms = self.retry_in_ms as u64, "batch write failed; nothing acknowledged, retrying");
        metrics().write_errors.with_label_values(&[self.kind]).inc();
    }
}

pub struct WriteFenced {
    pub epoch: i64,
}
impl WriteFenced {
    pub fn emit(self) {
        tracing::error!(epoch = self.epoch, "write refused by fencing: lease no longer held; batch rolled back, nothing acknowledged");
        metrics().write_errors.with_label_values(&["fenced"]).inc();
    }
}

/// The leader stops taking in and acknowledging messages: its commits are not synchronously
/// replicated and `REQUIRE_SYNC_REPLICATION` is on (the broker keeps the messages meanwhile).
pub struct IngestHeld<'a> {
    pub reason: &'a str,
}
impl IngestHeld<'_> {
    pub fn emit(self) {
        tracing::error!(reason = self.reason, "ingest held: commits are not synchronously replicated (REQUIRE_SYNC_REPLICATION); nothing is acknowledged until a synchronous standby has them");
        metrics().ingest_held.set(1);
    }
}

/// Commits are synchronously replicated again: the held acknowledgements go out, intake resumes.
pub struct IngestResumed<'a> {
    pub held: std::time::Duration,
    pub why: &'a str,
}
impl IngestResumed<'_> {
    pub fn emit(self) {
        tracing::info!(
            held_ms = self.held.as_millis() as u64,
            why = self.why,
            "ingest hold released"
        );
        metrics().ingest_held.set(0);
    }
}

/// A batch PostgreSQL committed locally without its synchronous standby.
pub struct CommitUnreplicated<'a> {
    /// The server's warning, or why the writer judged it so.
    pub why: &'a str,
    /// Whether the batch's messages are left unacknowledged for the broker to redeliver (the
    /// term ends) rather than held until a standby has them.
    pub redelivered: bool,
}
impl CommitUnreplicated<'_> {
    pub fn emit(self) {
        tracing::warn!(
            why = self.why,
            redelivered = self.redelivered,
            "a batch was committed locally but not replicated: it is not acknowledged"
        );
        metrics().commits_unreplicated.inc();
    }
}

/// One database statement ran (`leasehold_store`'s measured entry point emits it for every one).
/// The caller logs a failure where it handles it; this only counts it.
pub struct DbQuery<'a> {
    /// The operation's label, e.g. `lease_renew`, `write_batch`.
    pub op: &'static str,
    pub elapsed: std::time::Duration,
    pub error: Option<&'a dyn std::fmt::Display>,
}
impl DbQuery<'_> {
    pub fn emit(self) {
        let m = metrics();
        m.db_query_duration
            .with_label_values(&[self.op])
            .observe(self.elapsed.as_secs_f64());
        if let Some(error) = self.error {
            tracing::debug!(op = self.op, error = %error, "database statement failed");
            m.db_query_errors.with_label_values(&[self.op]).inc();
        }
    }
}

pub struct PendingOverflow {
    /// `MAX_PENDING` or `MAX_PENDING_BYTES`, whichever is full.
    pub setting: &'static str,
    pub limit: usize,
    pub pending: usize,
    pub pending_bytes: usize,
}
impl PendingOverflow {
    pub fn emit(self) {
        tracing::warn!(
            setting = self.setting,
            limit = self.limit,
            pending = self.pending,
            pending_bytes = self.pending_bytes,
            "{} reached: pausing intake, messages stay queued at the broker",
            self.setting
        );
        // A pause refuses nothing; `messages_pending` / `messages_pending_bytes` show it.
    }
}

/// A lease campaign or renewal succeeded; `took` is its round trip.
pub struct LeaseRenewed {
    pub took: std::time::Duration,
}
impl LeaseRenewed {
    pub fn emit(self) {
        let m = metrics();
        m.lease_renew_duration.observe(self.took.as_secs_f64());
        m.renewed_now();
    }
}

/// The session's subscriptions changed (granted, refused, pending): exported as gauges.
pub struct SubscriptionsChanged<'a> {
    pub status: &'a crate::SubscriptionStatus,
}
impl SubscriptionsChanged<'_> {
    pub fn emit(self) {
        metrics().set_subscriptions(self.status);
    }
}

/// The messages held (received, not yet acknowledged) changed.
pub struct PendingChanged {
    pub pending: usize,
    pub pending_bytes: usize,
}
impl PendingChanged {
    pub fn emit(self) {
        let m = metrics();
        m.messages_pending.set(self.pending as i64);
        m.messages_pending_bytes.set(self.pending_bytes as i64);
    }
}

/// Messages received from the broker, counted together: a run handed to the writer.
pub struct MessagesReceived {
    pub count: u64,
}
impl MessagesReceived {
    pub fn emit(self) {
        metrics().messages_received.inc_by(self.count);
    }
}

/// A message decoded by an observer (development mode), never written.
pub struct MessageObserved;
impl MessageObserved {
    pub fn emit(self) {
        metrics().messages_observed.inc();
    }
}

/// Acks not written because their messages came on an earlier connection.
pub struct AcksDroppedStale {
    pub count: u64,
}
impl AcksDroppedStale {
    pub fn emit(self) {
        tracing::info!(
            count = self.count,
            "acks dropped: their messages arrived on an earlier connection and will be redelivered"
        );
        metrics().acks_dropped_stale.inc_by(self.count);
    }
}

/// The broker connection is closed on purpose (drain, stop), or dropped before a reconnect.
pub struct MqttClosed;
impl MqttClosed {
    pub fn emit(self) {
        metrics().mqtt_connected.set(0);
    }
}

/// A batch's messages were committed and handed back to be acknowledged; `waited` is each
/// one's time from receipt to commit.
pub struct MessagesCommitted<I: Iterator<Item = std::time::Duration>> {
    pub waited: I,
}
impl<I: Iterator<Item = std::time::Duration>> MessagesCommitted<I> {
    pub fn emit(self) {
        // Observed locally (plain adds) and flushed once per batch, not three atomics a message.
        let lat = metrics().ingest_latency.local();
        for w in self.waited {
            lat.observe(w.as_secs_f64());
        }
        lat.flush();
    }
}

/// The heartbeat read the cluster's view from the database.
pub struct ClusterRead {
    pub alive_nodes: usize,
    pub newest_data_age: Option<f64>,
}
impl ClusterRead {
    pub fn emit(self) {
        let m = metrics();
        m.cluster_nodes_alive.set(self.alive_nodes as i64);
        m.data_age.set(self.newest_data_age.unwrap_or(-1.0));
    }
}

/// The node read how the database replicates its commits.
pub struct ReplicationChecked<'a> {
    pub status: &'a crate::replication::ReplicationStatus,
}
impl ReplicationChecked<'_> {
    pub fn emit(self) {
        let m = metrics();
        m.db_sync_replication
            .set(i64::from(self.status.synchronously_replicated()));
        let mut counts: std::collections::BTreeMap<&str, i64> =
            ["sync", "quorum", "potential", "async", "hidden"]
                .into_iter()
                .map(|k| (k, 0))
                .collect();
        for s in self.status.standbys() {
            *counts
                .entry(s.sync_state.as_deref().unwrap_or("hidden"))
                .or_insert(0) += 1;
        }
        for (state, n) in counts {
            m.db_standbys.with_label_values(&[state]).set(n);
        }
    }
}

/// A deployment check found something to change: logged once per run, by level.
pub struct CheckFound<'a> {
    pub check: &'a crate::status::Check,
}
impl CheckFound<'_> {
    pub fn emit(self) {
        let c = self.check;
        let fix = c.fix.as_deref().unwrap_or("");
        match c.level {
            crate::status::CheckLevel::Ok => {
                tracing::debug!(check = %c.id, summary = %c.summary, "deployment check ok")
            }
            crate::status::CheckLevel::Warning => {
                tracing::warn!(check = %c.id, summary = %c.summary, fix, "deployment check: warning")
            }
            crate::status::CheckLevel::Problem => {
                tracing::error!(check = %c.id, summary = %c.summary, fix, "deployment check: problem")
            }
        }
    }
}

/// An alert evaluation finished: what it found, as gauges.
pub struct AlertsEvaluated<'a> {
    pub devices_enabled: i64,
    pub devices_heard: i64,
    /// Every alert kind, and whether its condition holds now.
    pub firing: &'a [(&'a str, bool)],
}
impl AlertsEvaluated<'_> {
    pub fn emit(self) {
        let m = metrics();
        m.devices_enabled.set(self.devices_enabled);
        m.devices_heard.set(self.devices_heard);
        for (kind, firing) in self.firing {
            m.alerts_firing
                .with_label_values(&[kind])
                .set(i64::from(*firing));
        }
    }
}

/// This node won an alert's change in the `alerts` table (opened, escalated, resolved).
pub struct AlertChanged<'a> {
    pub alert_id: i64,
    pub kind: &'a str,
    /// `opened`, `escalated`, `updated` or `resolved`.
    pub action: &'a str,
    pub critical: bool,
    pub message: &'a str,
}
impl AlertChanged<'_> {
    pub fn emit(self) {
        metrics()
            .alert_changes
            .with_label_values(&[self.kind, self.action])
            .inc();
        let (id, kind, action, message) = (self.alert_id, self.kind, self.action, self.message);
        if action == "resolved" {
            tracing::info!(alert_id = id, kind, "alert resolved");
        } else if self.critical {
            tracing::error!(alert_id = id, kind, action, message, "alert");
        } else {
            tracing::warn!(alert_id = id, kind, action, message, "alert");
        }
    }
}

/// An alert's webhook delivery ended: delivered after `attempts`, or given up with `error`.
pub struct AlertNotified<'a> {
    pub kind: &'a str,
    pub action: &'a str,
    pub attempts: usize,
    pub error: Option<&'a dyn std::fmt::Display>,
}
impl AlertNotified<'_> {
    pub fn emit(self) {
        let (kind, action) = (self.kind, self.action);
        let result = match self.error {
            None => {
                tracing::info!(
                    kind,
                    action,
                    attempts = self.attempts,
                    "alert webhook delivered"
                );
                "delivered"
            }
            // Handled here: the alert itself stays recorded in `alerts` and on /health/alerts.
            Some(e) => {
                tracing::error!(kind, action, error = %e, "alert webhook not delivered; the alert is still recorded in the alerts table");
                "failed"
            }
        };
        metrics()
            .alert_notifications
            .with_label_values(&[result])
            .inc();
    }
}

/// A node started running a cluster configuration version (at start, or applied live).
pub struct ConfigApplied<'a> {
    pub version: Option<i64>,
    /// One line per changed setting or route (empty at start).
    pub changes: &'a [String],
    pub live: bool,
}
impl ConfigApplied<'_> {
    pub fn emit(self) {
        let version = self.version.unwrap_or(0);
        if self.live {
            tracing::info!(version, changes = %self.changes.join("; "), "cluster configuration applied live");
        } else {
            tracing::info!(version, "running cluster configuration");
        }
        metrics().config_version.set(version);
    }
}

/// A cluster setting this node was given that the cluster's configuration overrides.
pub struct ConfigDrift<'a> {
    pub drift: &'a str,
}
impl ConfigDrift<'_> {
    pub fn emit(self) {
        tracing::warn!(drift = self.drift, "this node's own setting differs from the cluster's configuration and is ignored (leasehold config diff, docs/configuration.md)");
    }
}

/// A new cluster configuration version cannot run on this node: it keeps the one it runs.
pub struct ConfigRefused<'a> {
    pub version: i64,
    pub running: Option<i64>,
    pub error: &'a str,
}
impl ConfigRefused<'_> {
    pub fn emit(self) {
        tracing::error!(
            version = self.version,
            running = self.running.unwrap_or(0),
            error = self.error,
            "cluster configuration version cannot run on this node; keeping the one it runs"
        );
    }
}

/// A route's table could not be written (gone, renamed, a column or a grant missing): the route
/// is suspended, everything else keeps flowing.
pub struct RouteSuspended<'a> {
    pub route: &'a str,
    pub why: &'a str,
}
impl RouteSuspended<'_> {
    pub fn emit(self) {
        tracing::error!(route = self.route, why = self.why, "route suspended: its messages are route_unavailable dead letters until its table fits again (checked every few seconds); every other route keeps flowing");
        metrics()
            .route_suspended
            .with_label_values(&[self.route])
            .set(1);
    }
}

/// A suspended route's table fits again: it writes again.
pub struct RouteResumed<'a> {
    pub route: &'a str,
    pub suspended_for: std::time::Duration,
}
impl RouteResumed<'_> {
    pub fn emit(self) {
        tracing::info!(
            route = self.route,
            suspended_ms = self.suspended_for.as_millis() as u64,
            "route resumed: its table fits again; replaying its route_unavailable dead letters"
        );
        metrics()
            .route_suspended
            .with_label_values(&[self.route])
            .set(0);
    }
}

/// Whether a route is suspended, as the gauge shows it (the routes of a new term or version).
pub struct RouteState<'a> {
    pub route: &'a str,
    pub suspended: bool,
}
impl RouteState<'_> {
    pub fn emit(self) {
        metrics()
            .route_suspended
            .with_label_values(&[self.route])
            .set(i64::from(self.suspended));
    }
}

/// A step of the move of a plain `telemetry` into time partitions.
pub struct PartitioningStep<'a> {
    pub step: &'a str,
    pub detail: String,
}
impl PartitioningStep<'_> {
    pub fn emit(self) {
        tracing::info!(step = self.step, detail = %self.detail, "telemetry partitioning: step done");
    }
}

/// A partition of `telemetry` created (ahead of its day, or for readings waiting in the default
/// partition).
pub struct PartitionCreated<'a> {
    pub name: &'a str,
    pub range: String,
    pub moved_from_default: u64,
}
impl PartitionCreated<'_> {
    pub fn emit(self) {
        tracing::info!(
            partition = self.name,
            range = %self.range,
            moved_from_default = self.moved_from_default,
            "telemetry partition created"
        );
    }
}

/// A partition of `telemetry` dropped by retention.
pub struct PartitionDropped<'a> {
    pub name: &'a str,
    pub range: String,
    pub bytes: i64,
    pub rows_estimate: i64,
    pub older_than: &'a str,
}
impl PartitionDropped<'_> {
    pub fn emit(self) {
        tracing::info!(
            partition = self.name,
            range = %self.range,
            bytes = self.bytes,
            rows_estimate = self.rows_estimate,
            older_than = self.older_than,
            "retention: telemetry partition dropped"
        );
        let m = metrics();
        m.telemetry_partitions_dropped.inc();
        m.telemetry_dropped_bytes.inc_by(self.bytes.max(0) as u64);
    }
}

/// A partition round ended.
pub struct PartitionRound {
    pub partitions: usize,
    pub expired_in_default: u64,
}
impl PartitionRound {
    pub fn emit(self) {
        if self.expired_in_default > 0 {
            tracing::info!(
                deleted = self.expired_in_default,
                "retention: old readings deleted from telemetry's default partition"
            );
        }
        metrics().telemetry_partitions.set(self.partitions as i64);
    }
}

/// A partition round failed; the next one retries.
pub struct PartitionRoundFailed<'a> {
    pub error: &'a dyn std::fmt::Display,
}
impl PartitionRoundFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(error = %self.error, "telemetry partition round failed; retrying shortly (readings without a partition land in telemetry_default meanwhile)");
    }
}

/// A Sparkplug B birth (NBIRTH, DBIRTH) read: the aliases it defines apply from now on.
pub struct SparkplugBirth<'a> {
    pub node: &'a str,
    pub device: Option<&'a str>,
}
impl SparkplugBirth<'_> {
    pub fn emit(self) {
        tracing::info!(
            edge_node = self.node,
            device = self.device,
            "Sparkplug birth"
        );
        let kind = if self.device.is_some() {
            "device"
        } else {
            "node"
        };
        metrics().sparkplug_births.with_label_values(&[kind]).inc();
    }
}

/// A Sparkplug B death (NDEATH, DDEATH) read.
pub struct SparkplugDeath<'a> {
    pub node: &'a str,
    pub device: Option<&'a str>,
}
impl SparkplugDeath<'_> {
    pub fn emit(self) {
        tracing::info!(
            edge_node = self.node,
            device = self.device,
            "Sparkplug death"
        );
        let kind = if self.device.is_some() {
            "device"
        } else {
            "node"
        };
        metrics().sparkplug_deaths.with_label_values(&[kind]).inc();
    }
}

/// A rebirth request sent to an edge node (NCMD `Node Control/Rebirth`), or not sent.
pub struct SparkplugRebirthRequested<'a> {
    pub topic: &'a str,
    /// False when the connection's request queue was full (asked again on its next message).
    pub sent: bool,
}
impl SparkplugRebirthRequested<'_> {
    pub fn emit(self) {
        if self.sent {
            tracing::warn!(topic = self.topic, "Sparkplug rebirth requested");
            metrics().sparkplug_rebirths_requested.inc();
        } else {
            tracing::warn!(
                topic = self.topic,
                "Sparkplug rebirth request not sent: the connection's queue is full"
            );
        }
    }
}

/// The edge nodes and devices the leader holds online, after a batch changed them.
pub struct SparkplugOnline {
    pub edge_nodes: usize,
    pub devices: usize,
    pub last_birth: Option<chrono::DateTime<chrono::Utc>>,
}
impl SparkplugOnline {
    pub fn emit(self) {
        let m = metrics();
        m.sparkplug_edge_nodes_online.set(self.edge_nodes as i64);
        m.sparkplug_devices_online.set(self.devices as i64);
        m.sparkplug_last_birth.set(
            self.last_birth
                .map_or(0.0, |t| t.timestamp_millis() as f64 / 1e3),
        );
    }
}
