//! Observability plumbing shared by every crate.
//!
//! # Layout
//! - [`metrics()`]: the process-wide registry of every exported metric (listed in
//!   `docs/interfaces.md`, "Metrics"). Only [`events`] change it.
//! - [`events`]: one struct per notable event; `emit()` writes the log line and moves the metric,
//!   so the two can never disagree.
//! - [`status`]: the node's own state as typed values ([`NodeStatus`], a `watch` channel),
//!   written by the component that owns each part and read by `/health` and the heartbeat.
//! - [`replication`]: whether the database's commits are synchronously replicated (typed).
//! - [`init_logging`]: JSON or pretty logs, level from `LOG_LEVEL`.

pub mod events;
pub mod replication;
pub mod status;

pub use status::{
    Check, CheckLevel, Checks, ConfigStatus, FailedSubscription, NodeStatus, Status,
    SubscriptionStatus,
};

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Declares [`Metrics`], each metric's field beside its definition, and `Metrics::registered`,
/// which defines every metric and registers it in a new registry.
macro_rules! metrics {
    ($($vis:vis $field:ident: $ty:ty = $new:expr,)*) => {
        /// Every metric Leasehold exports.
        pub struct Metrics {
            registry: Registry,
            last_renew: Mutex<Option<Instant>>,
            $($vis $field: $ty,)*
        }

        impl Metrics {
            fn registered() -> prometheus::Result<Self> {
                let r = Registry::new();
                Ok(Metrics {
                    $($field: reg(&r, $new),)*
                    last_renew: Mutex::new(None),
                    registry: r,
                })
            }
        }
    };
}

metrics! {
    pub lease_is_leader: IntGauge = IntGauge::new("leasehold_lease_is_leader", "1 while this node holds the lease and may write")?,
    pub lease_epoch: IntGauge = IntGauge::new("leasehold_lease_epoch", "Epoch (fencing token) of the lease this node last held")?,
    pub config_version: IntGauge = IntGauge::new("leasehold_config_version", "The cluster configuration version this node runs (0: none stored)")?,
    pub route_suspended: IntGaugeVec = IntGaugeVec::new(Opts::new("leasehold_route_suspended", "1 while the leader holds a route suspended (its table cannot be written: its messages are route_unavailable dead letters)"), &["route"])?,
    pub telemetry_partitions: IntGauge = IntGauge::new("leasehold_telemetry_partitions", "Partitions of telemetry, the default one included, after the leader's last partition round")?,
    pub telemetry_partitions_dropped: IntCounter = IntCounter::new("leasehold_telemetry_partitions_dropped_total", "Partitions of telemetry dropped by TELEMETRY_RETENTION (every reading in them older than it)")?,
    pub sparkplug_edge_nodes_online: IntGauge = IntGauge::new("leasehold_sparkplug_edge_nodes_online", "Sparkplug B edge nodes online (born and not dead), as the leader holds them")?,
    pub sparkplug_devices_online: IntGauge = IntGauge::new("leasehold_sparkplug_devices_online", "Sparkplug B devices online (of edge nodes online), as the leader holds them")?,
    pub sparkplug_births: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_sparkplug_births_total", "Sparkplug B births read (NBIRTH: kind=node, DBIRTH: kind=device)"), &["kind"])?,
    pub sparkplug_deaths: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_sparkplug_deaths_total", "Sparkplug B deaths read (NDEATH: kind=node, DDEATH: kind=device)"), &["kind"])?,
    pub sparkplug_rebirths_requested: IntCounter = IntCounter::new("leasehold_sparkplug_rebirths_requested_total", "Rebirth requests (NCMD Node Control/Rebirth) sent: an unknown alias, no birth held, a sequence gap")?,
    pub sparkplug_last_birth: Gauge = Gauge::new("leasehold_sparkplug_last_birth_timestamp_seconds", "Time of the newest Sparkplug B birth the leader holds (Unix seconds; 0: none)")?,
    pub telemetry_dropped_bytes: IntCounter = IntCounter::new("leasehold_telemetry_dropped_bytes_total", "Bytes on disk (indexes included) of the telemetry partitions TELEMETRY_RETENTION dropped")?,
    pub lease_transitions: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_lease_transitions_total", "Role changes of this node"), &["to"])?,
    pub lease_renew_duration: Histogram = Histogram::with_opts(HistogramOpts::new("leasehold_lease_renew_duration_seconds", "Round trip of lease acquire/renew statements").buckets(secs_buckets()))?,
    pub lease_renew_failures: IntCounter = IntCounter::new("leasehold_lease_renew_failures_total", "Lease renewals that failed or timed out")?,
    lease_seconds_since_renew: Gauge = Gauge::new("leasehold_lease_seconds_since_renew", "Seconds since this node last renewed the lease successfully (-1 when it never did)")?,
    pub mqtt_connected: IntGauge = IntGauge::new("leasehold_mqtt_connected", "1 while connected to the broker")?,
    pub mqtt_reconnects: IntCounter = IntCounter::new("leasehold_mqtt_reconnects_total", "Connections to the broker after the first of a term")?,
    pub mqtt_connection_errors: IntCounter = IntCounter::new("leasehold_mqtt_connection_errors_total", "Broker connection errors")?,
    pub mqtt_session_lost: IntCounter = IntCounter::new("leasehold_mqtt_session_lost_total", "Resumed connections whose CONNACK said the broker had no session (queued messages lost)")?,
    pub mqtt_client_id_conflicts: IntCounter = IntCounter::new("leasehold_mqtt_client_id_conflicts_total", "Disconnects right after connecting: another process uses the client id")?,
    pub mqtt_subscribed_topics: IntGauge = IntGauge::new("leasehold_mqtt_subscribed_topics", "Topic filters the session is subscribed to with QoS 1 or above (granted by SUBACK)")?,
    pub mqtt_subscriptions_pending: IntGauge = IntGauge::new("leasehold_mqtt_subscriptions_pending", "Topic filters still to subscribe or unsubscribe before the session matches the wanted topics")?,
    pub mqtt_subscriptions_failed: IntGauge = IntGauge::new("leasehold_mqtt_subscriptions_failed", "Wanted topic filters the broker refused (SUBACK 0x80) or granted below QoS 1; retried with backoff")?,
    pub mqtt_subscribe_failures: IntCounter = IntCounter::new("leasehold_mqtt_subscribe_failures_total", "Topic filters refused by SUBACK (0x80) or granted below QoS 1, every attempt counted")?,
    pub messages_received: IntCounter = IntCounter::new("leasehold_messages_received_total", "Messages received from the broker")?,
    pub messages_written: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_messages_written_total", "Rows committed, by route (default: telemetry)"), &["route"])?,
    pub messages_duplicate: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_messages_duplicate_total", "Messages already stored (the same reading again, or a redelivery), skipped, by route"), &["route"])?,
    pub messages_conflict: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_messages_conflict_total", "Rows whose key was stored with different values: dead-lettered as conflicts, by route"), &["route"])?,
    pub messages_dead_lettered: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_messages_dead_lettered_total", "Messages committed to dead_letters, by reason and route"), &["reason", "route"])?,
    pub messages_pending: IntGauge = IntGauge::new("leasehold_messages_pending", "Messages received and not yet acknowledged")?,
    pub messages_pending_bytes: IntGauge = IntGauge::new("leasehold_messages_pending_bytes", "Payload and topic bytes of the messages received and not yet acknowledged (bounded by MAX_PENDING_BYTES)")?,
    pub messages_observed: IntCounter = IntCounter::new("leasehold_messages_observed_total", "Messages decoded in development (observer) mode, never written")?,
    pub messages_overflow: IntCounter = IntCounter::new("leasehold_messages_overflow_total", "Messages refused by the ingest. Always 0: when MAX_PENDING or MAX_PENDING_BYTES is full the ingest pauses reading (pinging the broker meanwhile) instead of refusing; kept for existing dashboards")?,
    pub acks_dropped_stale: IntCounter = IntCounter::new("leasehold_acks_dropped_stale_total", "Acks not sent because their message came on an earlier connection")?,
    pub batch_rows: Histogram = Histogram::with_opts(HistogramOpts::new("leasehold_batch_rows", "Messages per committed batch").buckets(vec![1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0]))?,
    pub batch_write_duration: Histogram = Histogram::with_opts(HistogramOpts::new("leasehold_batch_write_duration_seconds", "Duration of one batch transaction").buckets(secs_buckets()))?,
    pub write_errors: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_write_errors_total", "Failed batch transactions"), &["kind"])?,
    pub ingest_latency: Histogram = Histogram::with_opts(HistogramOpts::new("leasehold_ingest_latency_seconds", "From receipt of a message to the commit of its batch").buckets(secs_buckets()))?,
    pub data_age: Gauge = Gauge::new("leasehold_data_age_seconds", "Age of the newest telemetry row (-1 when there is none)")?,
    pub cluster_nodes_alive: IntGauge = IntGauge::new("leasehold_cluster_nodes_alive", "Nodes that heartbeated recently")?,
    pub build_info: IntGaugeVec = IntGaugeVec::new(Opts::new("leasehold_build_info", "Build information"), &["version"])?,
    pub devices_enabled: IntGauge = IntGauge::new("leasehold_devices_enabled", "Enabled rows of devices, as of the last alert evaluation")?,
    pub devices_heard: IntGauge = IntGauge::new("leasehold_devices_heard", "Enabled devices whose newest reading arrived within STALE_WARNING")?,
    pub alerts_firing: IntGaugeVec = IntGaugeVec::new(Opts::new("leasehold_alerts_firing", "1 while this node's last evaluation found the alert's condition"), &["kind"])?,
    pub alert_changes: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_alert_changes_total", "Alerts this node opened, escalated or resolved (it won the change in the alerts table)"), &["kind", "action"])?,
    pub alert_notifications: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_alert_notifications_total", "Alert webhook deliveries by outcome"), &["result"])?,
    pub db_query_duration: HistogramVec = HistogramVec::new(HistogramOpts::new("leasehold_db_query_duration_seconds", "Duration of database statements by operation, failed ones included").buckets(secs_buckets()), &["op"])?,
    pub db_query_errors: IntCounterVec = IntCounterVec::new(Opts::new("leasehold_db_query_errors_total", "Database statements that failed, by operation"), &["op"])?,
    pub db_sync_replication: IntGauge = IntGauge::new("leasehold_db_sync_replication", "1 while the database's commits are synchronously replicated (a commit waits for a standby in sync), 0 when not; -1 until read")?,
    pub db_standbys: IntGaugeVec = IntGaugeVec::new(Opts::new("leasehold_db_standbys", "Standbys streaming from the database, by sync_state (hidden: the role may not see it)"), &["sync_state"])?,
    pub ingest_held: IntGauge = IntGauge::new("leasehold_ingest_held", "1 while the leader holds intake and acknowledgements because its commits are not synchronously replicated (REQUIRE_SYNC_REPLICATION)")?,
    pub commits_unreplicated: IntCounter = IntCounter::new("leasehold_commits_unreplicated_total", "Batches PostgreSQL committed locally without its synchronous standby (a cancelled wait for replication, or no standby in sync under REQUIRE_SYNC_REPLICATION): held or left unacknowledged, never acknowledged as durable")?,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique; a clash is a programming error caught by the first test.
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn secs_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    fn new() -> prometheus::Result<Self> {
        let m = Metrics::registered()?;
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Series exist from the start, so increase() sees the first transition.
        for to in ["leader", "standby"] {
            m.lease_transitions.with_label_values(&[to]);
        }
        for c in [
            &m.messages_written,
            &m.messages_duplicate,
            &m.messages_conflict,
        ] {
            c.with_label_values(&[events::DEFAULT_ROUTE]);
        }
        m.lease_seconds_since_renew.set(-1.0);
        m.data_age.set(-1.0);
        m.db_sync_replication.set(-1);
        Ok(m)
    }

    /// Records a successful renewal (for `leasehold_lease_seconds_since_renew`).
    fn renewed_now(&self) {
        if let Ok(mut g) = self.last_renew.lock() {
            *g = Some(Instant::now());
        }
    }

    /// Seconds since the last successful renewal, if any.
    fn seconds_since_renew(&self) -> Option<f64> {
        self.last_renew
            .lock()
            .ok()
            .and_then(|g| g.map(|t| t.elapsed().as_secs_f64()))
    }

    /// Exports the subscription counts (the status itself lives in [`status::NodeStatus`]).
    fn set_subscriptions(&self, status: &SubscriptionStatus) {
        self.mqtt_subscribed_topics.set(status.subscribed as i64);
        self.mqtt_subscriptions_pending.set(status.pending as i64);
        self.mqtt_subscriptions_failed
            .set(status.failed_total as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.lease_seconds_since_renew
            .set(self.seconds_since_renew().unwrap_or(-1.0));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics::new().expect("static metric definitions are valid"))
}

/// Installs the global subscriber. `json` for machines (systemd, Loki), `pretty` for people.
///
/// Every line goes through [`leasehold_config::redact`] on its way out: the code that formats a
/// URL redacts it, and this catches what it cannot reach (a library's error text, a `Debug` of
/// someone else's type). Colours only on a terminal: escape codes in a file or the journal
/// split `name=value` apart.
pub fn init_logging(json: bool, level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid LOG_LEVEL={level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(RedactingStderr);
    let res = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.with_target(false).try_init()
    };
    res.map_err(|e| e.to_string())
}

/// Standard error, with each formatted event redacted as a whole (the formatter writes one
/// event with one `write_all`, so a secret is never split across two calls).
struct RedactingStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingStderr
    }
}

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let line = redact_bytes(buf);
        std::io::stderr().lock().write_all(line.as_bytes())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn redact_bytes(buf: &[u8]) -> String {
    leasehold_config::redact(&String::from_utf8_lossy(buf))
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_lines_are_redacted_whole() {
        let pretty = "2026-01-01T00:00:00Z  WARN database not reachable error=db error url=postgres://u:pw1@h/db?password=pw2\n";
        let json = r#"{"level":"INFO","message":"starting","config":"Config { database_url: Some(\"host=h password='pw3 pw4'\") }"}"#;
        for line in [pretty, json] {
            let shown = super::redact_bytes(line.as_bytes());
            for s in ["pw1", "pw2", "pw3", "pw4"] {
                assert!(!shown.contains(s), "{s} in {shown}");
            }
            assert_eq!(shown.ends_with('\n'), line.ends_with('\n'));
        }
    }

    #[test]
    fn a_replication_read_moves_the_replication_gauges() {
        use crate::replication::{ReplicationStatus, Standby};
        let standby = |sync_state: Option<&str>| Standby {
            application_name: Some("b".into()),
            state: Some("streaming".into()),
            sync_state: sync_state.map(str::to_string),
            flush_lag_ms: None,
            replay_lag_ms: None,
        };
        let mut status = ReplicationStatus {
            synchronous_commit: "on".into(),
            synchronous_standby_names: "b".into(),
            sync_standbys: vec![standby(Some("sync"))],
            async_standbys: vec![standby(Some("async")), standby(None)],
            details_visible: true,
            hidden_standbys: 1,
            in_recovery: false,
        };
        let m = super::metrics();
        let standbys = |s: &str| m.db_standbys.with_label_values(&[s]).get();
        crate::events::ReplicationChecked { status: &status }.emit();
        assert_eq!(m.db_sync_replication.get(), 1);
        assert_eq!(
            (
                standbys("sync"),
                standbys("async"),
                standbys("hidden"),
                standbys("quorum")
            ),
            (1, 1, 1, 0)
        );
        status.sync_standbys.clear();
        crate::events::ReplicationChecked { status: &status }.emit();
        assert_eq!((m.db_sync_replication.get(), standbys("sync")), (0, 0));
    }

    #[test]
    fn every_documented_metric_is_exported() {
        let m = super::metrics();
        m.lease_transitions.with_label_values(&["leader"]).inc();
        m.messages_dead_lettered
            .with_label_values(&["not_json", "default"])
            .inc();
        m.messages_written.with_label_values(&["default"]).inc();
        m.messages_duplicate.with_label_values(&["default"]).inc();
        m.write_errors.with_label_values(&["db"]).inc();
        let text = m.encode();
        for name in [
            "leasehold_lease_is_leader",
            "leasehold_lease_epoch",
            "leasehold_lease_transitions_total",
            "leasehold_lease_renew_duration_seconds",
            "leasehold_lease_seconds_since_renew",
            "leasehold_mqtt_connected",
            "leasehold_mqtt_reconnects_total",
            "leasehold_mqtt_subscribed_topics",
            "leasehold_messages_received_total",
            "leasehold_messages_written_total",
            "leasehold_messages_duplicate_total",
            "leasehold_messages_dead_lettered_total",
            "leasehold_messages_pending",
            "leasehold_batch_rows",
            "leasehold_batch_write_duration_seconds",
            "leasehold_write_errors_total",
            "leasehold_ingest_latency_seconds",
            "leasehold_data_age_seconds",
            "leasehold_cluster_nodes_alive",
            "leasehold_build_info",
            "leasehold_db_sync_replication",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "missing {name}");
        }
    }
}
