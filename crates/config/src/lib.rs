//! Leasehold's configuration.
//!
//! Every setting is declared once, as a field of one of two `serde` structures: [`NodeSettings`]
//! (how this host runs) or [`ClusterValues`] (what a message becomes; stored in the cluster's
//! database). The field's doc comment says what it is, its `default` what it is unset, its kind
//! ([`text`]) how its text is read and written back. Its name in upper case is its environment
//! variable and flag (`LEASE_TTL`, `--set LEASE_TTL=5s`), in lower case its key in a TOML file
//! (`lease_ttl = "10s"`, or `[lease]` `ttl = "10s"`). `figment` merges file < environment < flags
//! and remembers which layer set each value, so every error names the setting and that layer in
//! one line (docs/configuration.md).
//!
//! # Layout
//! - `settings`: the two structures, the lists of their names read from them ([`KEYS`],
//!   [`CLUSTER_SETTINGS`], [`NODE_SETTINGS`]), and each kind of value's text ([`text`]).
//! - `sources`: [`Sources`], the layers merged by `figment`, and the errors that name a setting.
//! - `cluster`: [`ClusterSettings`], the stored form of a cluster configuration (canonical TOML);
//!   drift and differences between two configurations.
//! - `load`: [`Config::load`], the only constructor: the defaults that follow other settings,
//!   then every rule in one `validate()`.
//! - [`Config`]: both structures and what follows from them, as the rest of the workspace reads it.
//! - [`redact_url`] / [`redact`]: strip secrets before anything is logged or served.
//! - [`derive_client_id`] / [`ClientId`]: the MQTT client id of the cluster's shared session.

use std::fmt;
use std::time::Duration;

// `redact` and `redact_url`: every secret a URL or connection string can carry, stripped before
// anything is logged, served or printed.
pub mod cluster;
mod formats;
mod load;
mod redact;
pub mod routes;
mod settings;
mod sources;

pub use cluster::{ClusterSettings, Drift};
pub use formats::{notes as format_notes, Format, FormatSpec};
pub use redact::{is_secret_name, redact, redact_url, LIBPQ_KEYWORDS, MASK};
pub use routes::{OnConflict, PathStep, RouteSpec, Source};
pub use settings::{
    is_cluster_setting, ClusterValues, Keys, NodeSettings, Secret, CLUSTER_SETTINGS, KEYS,
    NODE_SETTINGS,
};
pub use sources::Sources;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid {key}={value:?} (from {origin}): {reason}")]
    Invalid {
        key: String,
        value: String,
        origin: Origin,
        reason: String,
    },
    #[error("{key} is required but not set (environment variable, --{flag} or `{file_key}` in the config file)", flag = key.to_lowercase().replace('_', "-"), file_key = key.to_lowercase())]
    Missing { key: String },
    #[error("unknown setting {key:?} in {origin}; known settings: {}", KEYS.iter().collect::<Vec<_>>().join(", "))]
    Unknown { key: String, origin: Origin },
    /// A node setting where only cluster settings belong (`leasehold config apply FILE`).
    #[error("{key} (in {origin}) is a node setting: it belongs to each host's environment or config file, not to the cluster's configuration (docs/configuration.md)")]
    NodeSetting { key: String, origin: Origin },
    #[error("unsafe lease timing: {0}")]
    UnsafeLease(String),
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
    /// A `[[formats]]` entry: `entry` is `formats[N]` (1-based).
    #[error("{entry}: {message}")]
    Format { entry: String, message: String },
    /// A `[[routes]]` entry of the config file: `route` is `routes[N] "name"` (1-based).
    #[error("{route}: {}{message}", column.as_ref().map(|c| format!("column {c:?}: ")).unwrap_or_default())]
    Route {
        route: String,
        column: Option<String>,
        message: String,
    },
}

/// How an [`Origin::Cluster`] names itself (followed by the version).
pub(crate) const CLUSTER_ORIGIN: &str = "cluster configuration ";

/// Declares a field-less enum with each variant's text beside it: the enum (with the attributes
/// given), `ALL` (every variant, in the order given) and `as_str` (the variant's text).
#[macro_export]
macro_rules! named {
    ($(#[$m:meta])* $vis:vis enum $name:ident { $($(#[$vm:meta])* $v:ident = $t:literal,)* }) => {
        $(#[$m])*
        $vis enum $name {
            $($(#[$vm])* $v,)*
        }

        impl $name {
            /// Every variant, in the order declared.
            pub const ALL: [$name; [$($t),*].len()] = [$($name::$v),*];

            /// The variant's text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $t,)*
                }
            }
        }
    };
}

/// Where a raw value came from, so an error can point at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(String),
    Env,
    Flag,
    /// The cluster's configuration in its database (`cluster configuration version 3`).
    Cluster(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "config file {p}"),
            Origin::Env => f.write_str("environment"),
            Origin::Flag => f.write_str("command line"),
            Origin::Cluster(what) => write!(f, "{CLUSTER_ORIGIN}{what}"),
        }
    }
}

/// A raw setting as errors, `Debug` and `config show` may show it: a secret setting masked whole,
/// a URL setting redacted, anything else redacted as text (a URL pasted into the wrong setting
/// included).
pub fn shown_secret(key: &str, v: &str) -> String {
    match key {
        // Not a URL at all (a typo): its text may be a token; nothing of it is shown.
        "ALERT_WEBHOOK_URL" if !v.contains("://") => MASK.into(),
        "DATABASE_URL" | "MQTT_URL" | "ALERT_WEBHOOK_URL" => redact_url(v),
        k if is_secret_name(k) => MASK.into(),
        _ => redact(v),
    }
}

named! {
    /// What the node does with MQTT (names kept from the system Leasehold replaces).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Mode {
        /// Campaign for the lease; the leader ingests and writes.
        Production = "production",
        /// Observe with a private clean session; never write, never take the lease.
        Development = "development",
        /// No MQTT at all.
        Disabled = "disabled",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Broker address and credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// PEM file of the CA(s) that signed the broker's certificate; the system roots when unset.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate and key presented to a broker that requires client certificates.
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

impl fmt::Debug for MqttEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .finish()
    }
}

impl fmt::Display for MqttEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        match &self.username {
            Some(u) => write!(f, "{scheme}://{u}:***@{}:{}", self.host, self.port),
            None => write!(f, "{scheme}://{}:{}", self.host, self.port),
        }
    }
}

/// Lease timings; [`LeaseTimings::demote_after`] is derived, never configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    pub ttl: Duration,
    pub renew_interval: Duration,
    pub poll_interval: Duration,
}

impl LeaseTimings {
    /// How long after *sending* its last successful renewal a leader may keep ingesting.
    pub fn demote_after(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// Refuses timings where a leader could still be writing after its lease expired.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let deadline = self.demote_after();
        if self.poll_interval.is_zero() {
            return Err(ConfigError::UnsafeLease(
                "LEASE_POLL_INTERVAL must be greater than 0".into(),
            ));
        }
        if self.renew_interval.is_zero() || self.renew_interval >= deadline {
            return Err(ConfigError::UnsafeLease(format!(
                "LEASE_RENEW_INTERVAL ({}) must be above 0 and below the demotion deadline 2/3 x LEASE_TTL ({}); LEASE_TTL is {}",
                fmt_dur(self.renew_interval),
                fmt_dur(deadline),
                fmt_dur(self.ttl)
            )));
        }
        if self.ttl < Duration::from_millis(300) {
            return Err(ConfigError::UnsafeLease(format!(
                "LEASE_TTL ({}) must be at least 300ms",
                fmt_dur(self.ttl)
            )));
        }
        Ok(())
    }
}

/// Formats a duration the way the settings accept it (`1s 500ms`).
pub fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Default `MAX_PENDING_BYTES` (or `MAX_PAYLOAD_BYTES` if that is larger): payload and topic
/// bytes a leader holds received and unacknowledged. The writer's copies of a batch (decoded rows,
/// statement parameters) come on top, about three more times; measured draining a backlog of
/// 200 KiB payloads, peak resident memory was ~22 MiB + ~4 x MAX_PENDING_BYTES (44 MiB with
/// this default, against the 64 MiB bound of docs/performance.md). 16 max-size payloads, or over
/// 20,000 typical readings: no limit on throughput.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Highest accepted `MAX_PENDING_BYTES` (the ingest's byte budget is a semaphore of u32 permits).
pub const MAX_PENDING_BYTES_LIMIT: usize = 4 * 1024 * 1024 * 1024 - 1;

/// The parsed, validated configuration of one node: its own settings, the cluster's, and what
/// follows from them.
#[derive(Clone, Debug)]
pub struct Config {
    /// This host's settings.
    pub node: NodeSettings,
    /// The cluster's settings: the active stored version once the database holds one.
    pub cluster: ClusterValues,
    /// `INSTANCE_ID`, or the host name.
    pub instance_id: String,
    /// The broker: `MQTT_URL` with the settings that override its parts.
    pub mqtt: MqttEndpoint,
    pub lease: LeaseTimings,
    /// `MAX_PENDING`, or its default that follows `BATCH_MAX_ROWS`.
    pub max_pending: usize,
    /// `MAX_PENDING_BYTES`, or its default that follows `MAX_PAYLOAD_BYTES`.
    pub max_pending_bytes: usize,
    /// `[[routes]]`, in their order; empty: only the default route (`telemetry`).
    pub routes: Vec<RouteSpec>,
    /// `[[formats]]`, in their order; empty: every payload is `json`.
    pub formats: Vec<FormatSpec>,
    /// The layers this was loaded from, so that the cluster's stored settings can be put over
    /// this host's own ([`Config::with_cluster`]).
    sources: Sources,
}

/// Parses a human-readable duration (`10s`, `500ms`, `5m`) with the error text settings use.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("{e}; expected a duration such as 10s, 500ms or 5m"))
}

/// How long the tables a node fills for operations keep their rows (docs/configuration.md). Production nodes
/// delete older rows every `interval`, in small batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// `None`: readings are kept forever.
    pub telemetry: Option<Duration>,
    pub dead_letters: Duration,
    /// Resolved alerts only: an open alert is kept however old it is.
    pub alerts: Duration,
    pub lease_history: Duration,
    pub cluster_nodes: Duration,
    pub interval: Duration,
}

/// Retention shorter than this would make the tables useless for looking back at an incident.
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(3600);
/// `telemetry` is dropped a day partition at a time: a shorter retention could not be kept.
pub(crate) const MIN_TELEMETRY_RETENTION: Duration = Duration::from_secs(86_400);

impl Config {
    /// The client id of the cluster's shared session: `MQTT_CLIENT_ID` when set, otherwise
    /// derived from the cluster's identity (read from its database) and `LEASE_NAME`.
    pub fn client_id(&self, cluster_id: Option<&str>) -> Result<ClientId, ClientIdError> {
        let derived = cluster_id
            .map(|id| derive_client_id(id, &self.node.lease_name))
            .transpose()?;
        Ok(match (&self.node.mqtt_client_id, derived) {
            (Some(explicit), derived) => ClientId {
                id: explicit.clone(),
                source: ClientIdSource::Explicit,
                derived,
            },
            (None, Some(d)) => ClientId {
                id: d.clone(),
                source: ClientIdSource::Derived,
                derived: Some(d),
            },
            (None, None) => return Err(ClientIdError::NoIdentity),
        })
    }

    /// The database URL, or the one-line error every database command gives without it.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.node
            .database_url
            .as_deref()
            .ok_or(ConfigError::Missing {
                key: "DATABASE_URL".into(),
            })
    }
}

named! {
    /// Where the client id of the cluster's shared session comes from.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ClientIdSource {
        /// Derived from the cluster's identity and `LEASE_NAME`: the default.
        Derived = "derived",
        /// Set with `MQTT_CLIENT_ID`.
        Explicit = "explicit",
    }
}

/// The client id a production node uses for the cluster's shared persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    pub id: String,
    pub source: ClientIdSource,
    /// The id derived from the cluster's identity, when it is known (for an explicit id: the one
    /// the node would use without `MQTT_CLIENT_ID`).
    pub derived: Option<String>,
}

impl ClientId {
    /// What an operator must be told about an explicit client id, `None` for a derived one.
    pub fn warning(&self) -> Option<String> {
        (self.source == ClientIdSource::Explicit).then(|| {
            format!(
                "MQTT_CLIENT_ID={} is set explicitly: the broker session is named by this setting, not by the cluster's identity in its database, so any machine started with a copy of this configuration and another database takes this session and acknowledges its messages into that database; unset MQTT_CLIENT_ID to use the derived id{}",
                self.id,
                match &self.derived {
                    Some(d) => format!(" ({d})"),
                    None => String::new(),
                }
            )
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClientIdError {
    #[error("the database has no cluster identity (table cluster_identity is empty), so the MQTT client id of the cluster's session cannot be derived; restore its row from a backup (docs/runbook.md, \"The cluster's identity\") or set MQTT_CLIENT_ID")]
    NoIdentity,
    #[error("the cluster identity {0:?} is not a UUID")]
    BadIdentity(String),
}

/// The default client id of the cluster's shared session: `lh-` + the first 12 hex digits of
/// the cluster's identity (48 random bits) + `-` + the first 7 hex digits of SHA-256 of
/// `LEASE_NAME`. 23 characters, the longest id MQTT 3.1.1 obliges every broker to accept, in
/// the characters it obliges them to accept (`0-9a-zA-Z`, plus `-`, which every common broker
/// accepts). The identity's prefix is readable: `leasehold status` shows the identity in full,
/// the broker's log shows the client id, and the two can be matched by eye.
pub fn derive_client_id(cluster_id: &str, lease_name: &str) -> Result<String, ClientIdError> {
    use sha2::{Digest, Sha256};
    let hex: String = cluster_id
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ClientIdError::BadIdentity(cluster_id.to_string()));
    }
    let lease = format!("{:x}", Sha256::digest(lease_name.as_bytes()));
    Ok(format!("lh-{}-{}", &hex[..12], &lease[..7]))
}

/// Where a cluster's leader claims its client id at the broker (retained, QoS 1):
/// `leasehold/clusters/<client id>`, holding the identity of the cluster's database.
pub const CLAIM_TOPIC_PREFIX: &str = "leasehold/clusters/";
/// Where `leasehold doctor` probes the broker: `leasehold/doctor/<random>`.
pub const PROBE_TOPIC_PREFIX: &str = "leasehold/doctor/";

impl Config {
    /// The Sparkplug B host id when the cluster reads Sparkplug (a `[[formats]]` entry
    /// `sparkplug_b`): `SPARKPLUG_HOST_ID`, else the session's client id.
    pub fn sparkplug_host_id(&self, client_id: &str) -> Option<String> {
        self.formats
            .iter()
            .any(|f| f.format == Format::SparkplugB)
            .then(|| {
                self.cluster
                    .sparkplug_host_id
                    .clone()
                    .unwrap_or_else(|| client_id.to_string())
            })
    }
}

/// Whether `topic` is one Leasehold publishes on itself (a claim or a probe): a leader
/// subscribed to `#` receives them, and must not store them as readings.
pub fn is_own_topic(topic: &str) -> bool {
    topic.starts_with(CLAIM_TOPIC_PREFIX) || topic.starts_with(PROBE_TOPIC_PREFIX)
}

/// Most levels a filter may have: Mosquitto disconnects a client that subscribes deeper.
pub const MAX_FILTER_LEVELS: usize = 201;

/// Checks an MQTT topic filter the way a broker would. A filter the broker rejects does not
/// fail alone: the broker drops the connection that subscribed it (Mosquitto: "Invalid
/// subscription string ... disconnecting"), and every reconnect would send it again.
pub fn validate_filter(f: &str) -> Result<(), String> {
    if f.is_empty() || f.len() > 65535 {
        return Err("topic filter must be 1 to 65535 bytes".into());
    }
    if let Some(c) = f.chars().find(|c| {
        let u = *c as u32;
        u <= 0x1F
            || (0x7F..=0x9F).contains(&u)
            || (0xFDD0..=0xFDEF).contains(&u)
            || (u & 0xFFFF) >= 0xFFFE
    }) {
        return Err(format!(
            "topic filter contains the control or non-character U+{:04X}, which brokers refuse",
            c as u32
        ));
    }
    let segs: Vec<&str> = f.split('/').collect();
    if segs.len() > MAX_FILTER_LEVELS {
        return Err(format!(
            "topic filter has more than {MAX_FILTER_LEVELS} levels, which brokers refuse"
        ));
    }
    for (i, seg) in segs.iter().enumerate() {
        if seg.contains('#') && (*seg != "#" || i != segs.len() - 1) {
            return Err("'#' must be a whole, last level of the filter".into());
        }
        if seg.contains('+') && *seg != "+" {
            return Err("'+' must be a whole level of the filter".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let s = Sources::gather(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            Vec::new(),
        )?;
        Config::load(&s)
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = load(&[]).expect("defaults load");
        assert_eq!(c.lease.ttl, Duration::from_secs(10));
        assert_eq!(c.lease.renew_interval, Duration::from_secs(10) / 3);
        assert_eq!(c.lease.poll_interval, Duration::from_secs(1));
        assert_eq!(c.cluster.batch_max_rows, 1000);
        assert_eq!(c.cluster.batch_max_wait, Duration::from_millis(50));
        assert_eq!(c.cluster.max_payload_bytes, 256 * 1024);
        assert_eq!(c.node.mqtt_client_id, None);
        assert_eq!(c.node.mqtt_mode, Mode::Production);
        assert_eq!(c.node.http_addr.to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn flags_override_env_override_file() {
        let path = file("lease_ttl = \"30s\"\nbatch_max_rows = 5\ninstance_id = \"file\"\nmqtt_topics = [\"a/#\", \"b/+\"]\n");
        let s = Sources::gather(
            Some(&path),
            vec![
                ("LEASE_TTL".into(), "20s".into()),
                ("INSTANCE_ID".into(), "env".into()),
            ],
            vec![("instance-id".into(), "flag".into())],
        )
        .expect("gather");
        let c = Config::load(&s).expect("load");
        assert_eq!(c.lease.ttl, Duration::from_secs(20));
        assert_eq!(c.cluster.batch_max_rows, 5);
        assert_eq!(c.instance_id, "flag");
        assert_eq!(c.cluster.mqtt_topics, vec!["a/#", "b/+"]);
    }

    #[test]
    fn bad_values_name_the_setting_in_one_line() {
        let e = load(&[("LEASE_TTL", "ten seconds")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LEASE_TTL") && !e.contains('\n'), "{e}");
        let e = load(&[("BATCH_MAX_ROWS", "0")]).unwrap_err().to_string();
        assert!(e.contains("BATCH_MAX_ROWS"), "{e}");
        let e = load(&[("MQTT_MODE", "prod")]).unwrap_err().to_string();
        assert!(e.contains("MQTT_MODE"), "{e}");
        let e = load(&[("MQTT_TOPICS", "a/#/b")]).unwrap_err().to_string();
        assert!(e.contains("MQTT_TOPICS"), "{e}");
    }

    #[test]
    fn max_pending_bytes_takes_sizes_and_must_hold_one_payload() {
        let c = load(&[]).expect("defaults");
        assert_eq!(c.max_pending_bytes, DEFAULT_MAX_PENDING_BYTES);
        let c = load(&[("MAX_PENDING_BYTES", "16MiB")]).expect("16MiB");
        assert_eq!(c.max_pending_bytes, 16 * 1024 * 1024);
        let e = load(&[("MAX_PENDING_BYTES", "100KiB")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MAX_PENDING_BYTES") && e.contains("MAX_PAYLOAD_BYTES") && !e.contains('\n'),
            "{e}"
        );
        let e = load(&[("MAX_PAYLOAD_BYTES", "9MiB"), ("MAX_PENDING_BYTES", "8MiB")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_PENDING_BYTES"), "{e}");
        // Unset, it grows with MAX_PAYLOAD_BYTES.
        let c = load(&[("MAX_PAYLOAD_BYTES", "9MiB")]).expect("default follows");
        assert_eq!(c.max_pending_bytes, 9 * 1024 * 1024);
        let e = load(&[("MAX_PENDING_BYTES", "lots")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_PENDING_BYTES"), "{e}");
        let e = load(&[("MAX_PENDING_BYTES", "8192MiB")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MAX_PENDING_BYTES"), "{e}");
    }

    #[test]
    fn filters_a_broker_would_disconnect_for_are_invalid() {
        for ok in [
            "devices/+/telemetry",
            "a/#",
            "#",
            "+",
            "plant/ünïcødé/✓",
            "$SYS/broker/#",
        ] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        let deep = vec!["a"; MAX_FILTER_LEVELS].join("/");
        assert!(validate_filter(&deep).is_ok());
        for bad in [
            "plant/pump-7/data\n",
            "plant/\tpump",
            "a/\u{7f}",
            "a/\u{85}/b",
            "a/\u{fdd0}",
            "a/\u{fffe}",
            "a/\u{1ffff}",
            "a/#/b",
            "a/b+",
            "",
        ] {
            assert!(validate_filter(bad).is_err(), "{bad:?}");
        }
        assert!(validate_filter(&format!("{deep}/a")).is_err(), "too deep");
    }

    #[test]
    fn unsafe_lease_timing_is_refused() {
        // renew 7s is past the 2/3 x 10s deadline: the leader would demote between renewals.
        let e = load(&[("LEASE_TTL", "10s"), ("LEASE_RENEW_INTERVAL", "7s")]).unwrap_err();
        assert!(matches!(e, ConfigError::UnsafeLease(_)));
        assert!(e.to_string().contains("LEASE_RENEW_INTERVAL"));
        assert!(load(&[("LEASE_TTL", "10s"), ("LEASE_RENEW_INTERVAL", "6s")]).is_ok());
    }

    #[test]
    fn secrets_do_not_leak() {
        let c = load(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
            ("MQTT_URL", "mqtt://dev:s3cret@broker:1884"),
        ])
        .expect("load");
        let shown = format!("{c:?} {}", c.mqtt);
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert_eq!(c.mqtt.port, 1884);
        assert_eq!(c.mqtt.password.as_deref(), Some("s3cret"));
    }

    /// Every form a secret can take in the settings, through every way a setting is shown:
    /// `Debug` of the configuration and of the raw layers, and each configuration error.
    #[test]
    fn no_form_of_a_secret_is_shown() {
        let env = [
            (
                "DATABASE_URL",
                "postgres://u:pw-userinfo@db/x?password=pw-query&sslpassword=pw-ssl",
            ),
            ("MQTT_URL", "mqtt://dev:pw-mqtt-url@broker:1884"),
            ("MQTT_PASSWORD", "pw-mqtt-env"),
            (
                "ALERT_WEBHOOK_URL",
                "https://hooks.slack.com/services/T0/B0/pw-webhook",
            ),
        ];
        let secrets = [
            "pw-userinfo",
            "pw-query",
            "pw-ssl",
            "pw-mqtt-url",
            "pw-mqtt-env",
            "pw-webhook",
            "pw-kv",
            "with spaces",
        ];
        let check = |shown: &str| {
            for s in secrets {
                assert!(!shown.contains(s), "{s:?} shown in {shown}");
            }
        };
        let c = load(&env).expect("load");
        let shown = format!("{c:?}");
        check(&shown);
        assert!(shown.contains("hooks.slack.com"), "{shown}");
        assert!(shown.contains("db/x?password=***"), "{shown}");
        let sources = Sources::gather(
            None,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            vec![(
                "database-url".into(),
                "host=db password='pw-kv with spaces'".into(),
            )],
        )
        .expect("gather");
        check(&format!("{sources:?}"));
        let c = Config::load(&sources).expect("load");
        check(&format!("{c:?}"));

        // Errors: a bad URL, a secret pasted into another setting, an unknown flag holding a URL.
        let errors = [
            load(&[("MQTT_URL", "mqtt://dev:pw-mqtt-url@broker:port")]),
            load(&[("MQTT_URL", "http://dev:pw-mqtt-url@broker")]),
            load(&[
                ("LEASE_NAME", "x"),
                ("MQTT_PORT", "postgres://u:pw-userinfo@h"),
            ]),
            load(&[("MQTT_KEEP_ALIVE", "password=pw-kv")]),
            Sources::gather(
                None,
                Vec::new(),
                vec![(
                    "postgres://u:pw-userinfo@h/db?password".into(),
                    "pw-query".into(),
                )],
            )
            .and_then(|s| Config::load(&s)),
        ];
        for e in errors {
            let e = e.expect_err("refused").to_string();
            check(&e);
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn retention_defaults_and_one_line_errors() {
        let c = load(&[]).expect("defaults");
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(
            c.cluster.retention(),
            Retention {
                telemetry: None,
                dead_letters: 30 * day,
                alerts: 90 * day,
                lease_history: 90 * day,
                cluster_nodes: 7 * day,
                interval: Duration::from_secs(3600),
            }
        );
        let c = load(&[
            ("DEAD_LETTER_RETENTION", "2w"),
            ("RETENTION_INTERVAL", "10m"),
        ])
        .expect("valid");
        assert_eq!(c.cluster.retention().dead_letters, 14 * day);
        assert_eq!(c.cluster.retention().interval, Duration::from_secs(600));
        let c = load(&[("TELEMETRY_RETENTION", "400d")]).expect("valid");
        assert_eq!(c.cluster.retention().telemetry, Some(400 * day));
        for (env, setting, says) in [
            (
                vec![("DEAD_LETTER_RETENTION", "thirty days")],
                "DEAD_LETTER_RETENTION",
                "duration",
            ),
            (
                vec![("ALERT_RETENTION", "5m")],
                "ALERT_RETENTION",
                "at least 1h",
            ),
            (
                vec![("LEASE_HISTORY_RETENTION", "0s")],
                "LEASE_HISTORY_RETENTION",
                "at least 1h",
            ),
            (
                vec![("CLUSTER_NODE_RETENTION", "-1d")],
                "CLUSTER_NODE_RETENTION",
                "duration",
            ),
            (
                vec![("RETENTION_INTERVAL", "0s")],
                "RETENTION_INTERVAL",
                "greater than 0",
            ),
            (
                vec![("TELEMETRY_RETENTION", "23h")],
                "TELEMETRY_RETENTION",
                "at least 1d",
            ),
            (
                vec![("TELEMETRY_RETENTION", "300000y")],
                "TELEMETRY_RETENTION",
                "at most 100y",
            ),
            (
                vec![("ALERT_WINDOW", "3h"), ("DEAD_LETTER_RETENTION", "2h")],
                "DEAD_LETTER_RETENTION",
                "ALERT_WINDOW",
            ),
            (
                vec![("ALERT_WINDOW", "3h"), ("LEASE_HISTORY_RETENTION", "2h")],
                "LEASE_HISTORY_RETENTION",
                "ALERT_WINDOW",
            ),
        ] {
            let e = load(&env).expect_err("refused").to_string();
            assert!(
                e.contains(setting) && e.contains(says) && !e.contains('\n'),
                "{env:?}: {e}"
            );
        }
    }

    #[test]
    fn the_default_client_id_is_derived_from_the_cluster_identity_and_the_lease_name() {
        let a = "5f0c1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
        let b = "0b1c2d3e-4f5a-4b6c-9d7e-8f9a0b1c2d3e";
        let id = derive_client_id(a, "mqtt-ingest").expect("derive");
        // Stable: the broker session must be found again after any restart or upgrade.
        assert_eq!(id, "lh-5f0c1a2b3c4d-6256c66");
        assert!(id.len() <= 23, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        assert_eq!(
            derive_client_id(&a.to_uppercase(), "mqtt-ingest"),
            Ok(id.clone())
        );
        assert_ne!(derive_client_id(b, "mqtt-ingest").expect("derive"), id);
        assert_ne!(derive_client_id(a, "other").expect("derive"), id);
        assert!(derive_client_id("not-a-uuid", "x").is_err());

        let c = load(&[]).expect("load");
        let cid = c.client_id(Some(a)).expect("client id");
        assert_eq!(cid.source, ClientIdSource::Derived);
        assert_eq!(cid.id, id);
        assert_eq!(cid.warning(), None);
        // A production node never falls back to a default it could not derive from its database.
        assert_eq!(c.client_id(None), Err(ClientIdError::NoIdentity));
    }

    #[test]
    fn an_explicit_client_id_overrides_and_is_warned_about() {
        let c = load(&[("MQTT_CLIENT_ID", "plant-7")]).expect("load");
        let a = "5f0c1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
        let cid = c.client_id(Some(a)).expect("client id");
        assert_eq!(cid.id, "plant-7");
        assert_eq!(cid.source, ClientIdSource::Explicit);
        let w = cid.warning().expect("a warning");
        assert!(
            w.contains("MQTT_CLIENT_ID=plant-7") && w.contains("lh-5f0c1a2b3c4d-"),
            "{w}"
        );
        assert_eq!(c.client_id(None).expect("explicit").id, "plant-7");
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let path = file("lease_tl = \"30s\"\n");
        let e = Sources::gather(Some(&path), Vec::new(), Vec::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Unknown { .. }));
    }

    /// A configuration file holding `text`, removed when the returned path is dropped.
    pub(crate) fn file(text: &str) -> tempfile::TempPath {
        let mut f = tempfile::Builder::new()
            .prefix("leasehold-config-")
            .suffix(".toml")
            .tempfile()
            .expect("temporary file");
        std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        f.into_temp_path()
    }

    fn load_file(path: &Path, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(&Sources::gather(Some(path), env, Vec::new())?)
    }

    #[test]
    fn nested_sections_read_as_the_flat_keys_do() {
        let flat = file("lease_ttl = \"30s\"\nmqtt_step_down_after = 0\nbatch_max_rows = 5\nmqtt_url = \"mqtts://b:8884\"\nmqtt_topics = [\"a/#\", \"b/+\"]\nmax_pending_bytes = \"8MiB\"\ndead_letter_retention = \"2d\"\n",
        );
        let nested = file("[lease]\nttl = \"30s\"\n[batch]\nmax_rows = 5\n[mqtt]\nstep_down_after = 0\nurl = \"mqtts://b:8884\"\ntopics = [\"a/#\", \"b/+\"]\n[ingest]\nmax_pending_bytes = \"8MiB\"\n[retention]\ndead_letters = \"2d\"\n",
        );
        for path in [flat, nested] {
            let c = load_file(&path, &[]).expect("load");
            assert_eq!(c.lease.ttl, Duration::from_secs(30));
            assert_eq!(c.cluster.batch_max_rows, 5);
            assert_eq!(
                (c.mqtt.host.as_str(), c.mqtt.port, c.mqtt.tls),
                ("b", 8884, true)
            );
            assert_eq!(c.cluster.mqtt_topics, vec!["a/#", "b/+"]);
            assert_eq!(c.max_pending_bytes, 8 * 1024 * 1024);
            assert_eq!(
                c.cluster.retention().dead_letters,
                Duration::from_secs(2 * 24 * 3600)
            );
        }
    }

    #[test]
    fn one_setting_given_flat_and_nested_in_one_file_is_refused() {
        let path = file("lease_ttl = \"20s\"\n[lease]\nttl = \"30s\"\n");
        let e = load_file(&path, &[]).unwrap_err().to_string();
        assert!(
            e.contains("LEASE_TTL is set twice") && !e.contains('\n'),
            "{e}"
        );
        let other = file("lease_ttl = \"20s\"\n[lease]\nname = \"x\"\n");
        let c = load_file(&other, &[]).expect("different settings of one section mix");
        assert_eq!(
            (c.lease.ttl, c.node.lease_name.as_str()),
            (Duration::from_secs(20), "x")
        );
    }

    #[test]
    fn errors_say_which_layer_set_the_bad_value() {
        let path = file("device_topic_pattern = \"a/b\"\n[stale]\ncritical = \"1m\"\n");
        let shown = path.display().to_string();
        let e = load_file(&path, &[]).unwrap_err().to_string();
        assert!(
            e.contains("DEVICE_TOPIC_PATTERN") && e.contains(&shown),
            "{e}"
        );
        let e = load_file(&path, &[("DEVICE_TOPIC_PATTERN", "d/{device_id}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("STALE_CRITICAL") && e.contains(&shown), "{e}");
        let e = load(&[("STALE_WARNING", "20m")]).unwrap_err().to_string();
        assert!(
            e.contains("STALE_CRITICAL") && e.contains("(from default)"),
            "{e}"
        );
        let e = load(&[("MQTT_PORT", "x")]).unwrap_err().to_string();
        assert!(
            e.contains("MQTT_PORT") && e.contains("(from environment)"),
            "{e}"
        );
        let s = Sources::gather(None, Vec::new(), vec![("lease-ttl".into(), "x".into())])
            .expect("gather");
        let e = Config::load(&s).unwrap_err().to_string();
        assert!(
            e.contains("LEASE_TTL") && e.contains("(from command line)"),
            "{e}"
        );
    }

    #[test]
    fn an_empty_variable_unsets_the_file_value() {
        let path = file("mqtt_client_id = \"plant-7\"\nlease_ttl = \"30s\"\n");
        let c = load_file(&path, &[("MQTT_CLIENT_ID", " "), ("LEASE_TTL", "")]).expect("load");
        assert_eq!(c.node.mqtt_client_id, None);
        assert_eq!(c.lease.ttl, Duration::from_secs(10));
    }

    #[test]
    fn unknown_nested_keys_and_sections_are_errors() {
        for text in [
            "[mqtt]\nbogus = 1\n",
            "[bogus]\na = 1\n",
            "[[bogus]]\na = 1\n",
        ] {
            let e = load_file(&file(text), &[]).unwrap_err();
            assert!(matches!(e, ConfigError::Unknown { .. }), "{text}: {e:?}");
        }
    }
}
