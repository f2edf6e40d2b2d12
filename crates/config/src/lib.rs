//! Leasehold's configuration.
//!
//! Every setting has one name: its environment variable (`LEASE_TTL`). The TOML file uses the same
//! name in lower case (`lease_ttl = "10s"`), flags pass `KEY=VALUE` pairs. Layers are merged as raw
//! strings first (file < environment < flags) and parsed once, so an error can always name the
//! setting and the layer it came from in one line.
//!
//! # Layout
//! - [`Sources`]: the raw layers.
//! - [`Config`]: the parsed, validated result; [`Config::load`] is the only constructor.
//! - [`redact_url`]: strips passwords before anything is logged or served.
//! - [`derive_client_id`] / [`ClientId`]: the MQTT client id of the cluster's shared session.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

// `redact` and `redact_url`: every secret a URL or connection string can carry, stripped before
// anything is logged, served or printed.
mod redact;

pub use redact::{is_secret_name, redact, redact_url, LIBPQ_KEYWORDS, MASK};

/// Every setting Leasehold reads, as its environment name.
pub const KEYS: &[&str] = &[
    "INSTANCE_ID",
    "MQTT_MODE",
    "DATABASE_URL",
    "DATABASE_POOL_SIZE",
    "MQTT_URL",
    "MQTT_HOST",
    "MQTT_PORT",
    "MQTT_USERNAME",
    "MQTT_PASSWORD",
    "MQTT_CA_FILE",
    "MQTT_CLIENT_CERT",
    "MQTT_CLIENT_KEY",
    "MQTT_CLIENT_ID",
    "MQTT_TOPICS",
    "MQTT_KEEP_ALIVE",
    "MQTT_RECONNECT_MAX",
    "MQTT_STEP_DOWN_AFTER",
    "DEVICE_TOPIC_PATTERN",
    "LEASE_NAME",
    "LEASE_TTL",
    "LEASE_RENEW_INTERVAL",
    "LEASE_POLL_INTERVAL",
    "BATCH_MAX_ROWS",
    "BATCH_MAX_WAIT",
    "BATCH_MAX_BYTES",
    "REDELIVERY_WINDOW",
    "MAX_PAYLOAD_BYTES",
    "MAX_PENDING",
    "MAX_PENDING_BYTES",
    "HTTP_ADDR",
    "STALE_WARNING",
    "STALE_CRITICAL",
    "ALERT_WEBHOOK_URL",
    "ALERT_CHECK_INTERVAL",
    "ALERT_GRACE",
    "ALERT_WINDOW",
    "DEAD_LETTER_RETENTION",
    "ALERT_RETENTION",
    "LEASE_HISTORY_RETENTION",
    "CLUSTER_NODE_RETENTION",
    "RETENTION_INTERVAL",
    "LOG_FORMAT",
    "LOG_LEVEL",
];

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
    #[error("unknown setting {key:?} in {origin}; known settings: {}", KEYS.join(", "))]
    Unknown { key: String, origin: Origin },
    #[error("unsafe lease timing: {0}")]
    UnsafeLease(String),
    #[error("cannot read config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// Where a raw value came from, so an error can point at the right place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(String),
    Env,
    Flag,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File(p) => write!(f, "config file {p}"),
            Origin::Env => f.write_str("environment"),
            Origin::Flag => f.write_str("command line"),
        }
    }
}

/// The raw layers before parsing.
#[derive(Default, Clone)]
pub struct Sources {
    values: BTreeMap<String, (String, Origin)>,
}

/// Raw values hold the secrets in clear: shown only as [`shown_value`] shows them.
impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.values
                    .iter()
                    .map(|(k, (v, o))| (k, (shown_value(k, v), o))),
            )
            .finish()
    }
}

impl Sources {
    /// Layers the TOML file (if any), then the process environment, then `flags`.
    pub fn gather(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut s = Sources::default();
        if let Some(path) = file {
            s.layer_file(path)?;
        }
        for (k, v) in env {
            if KEYS.contains(&k.as_str()) {
                s.values.insert(k, (v, Origin::Env));
            }
        }
        for (k, v) in flags {
            let key = k.to_uppercase().replace('-', "_");
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Unknown {
                    key: redact(&k),
                    origin: Origin::Flag,
                });
            }
            s.values.insert(key, (v, Origin::Flag));
        }
        Ok(s)
    }

    fn layer_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: shown.clone(),
                reason: e.message().to_string(),
            })?;
        for (k, v) in table {
            let key = k.to_uppercase();
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::Unknown {
                    key: k,
                    origin: Origin::File(shown.clone()),
                });
            }
            let raw = match v {
                toml::Value::String(s) => s,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|i| match i {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            self.values.insert(key, (raw, Origin::File(shown.clone())));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<(&str, &Origin)> {
        self.values
            .get(key)
            .filter(|(v, _)| !v.trim().is_empty())
            .map(|(v, o)| (v.trim(), o))
    }

    fn parse<T>(
        &self,
        key: &str,
        default: T,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some((v, origin)) => f(v).map_err(|reason| ConfigError::Invalid {
                key: key.into(),
                value: shown_value(key, v),
                origin: origin.clone(),
                reason,
            }),
        }
    }

    fn string(&self, key: &str) -> Option<String> {
        self.get(key).map(|(v, _)| v.to_string())
    }
}

/// A raw setting as errors and `Debug` may show it: a secret setting masked whole, a URL setting
/// redacted, anything else redacted as text (a URL pasted into the wrong setting included).
fn shown_value(key: &str, v: &str) -> String {
    match key {
        "DATABASE_URL" | "MQTT_URL" | "ALERT_WEBHOOK_URL" => redact_url(v),
        k if is_secret_name(k) => MASK.into(),
        _ => redact(v),
    }
}

/// What the node does with MQTT (names kept from the system Leasehold replaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Campaign for the lease; the leader ingests and writes.
    Production,
    /// Observe with a private clean session; never write, never take the lease.
    Development,
    /// No MQTT at all.
    Disabled,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Production => "production",
            Mode::Development => "development",
            Mode::Disabled => "disabled",
        }
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
/// this default, against the 64 MiB bound of SPEC section 15). 16 max-size payloads, or over
/// 20,000 typical readings: no limit on throughput.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Highest accepted `MAX_PENDING_BYTES` (the ingest's byte budget is a semaphore of u32 permits).
pub const MAX_PENDING_BYTES_LIMIT: usize = 4 * 1024 * 1024 * 1024 - 1;

/// The parsed, validated configuration of one node.
#[derive(Clone)]
pub struct Config {
    pub instance_id: String,
    pub mode: Mode,
    pub database_url: Option<String>,
    pub database_pool_size: usize,
    pub mqtt: MqttEndpoint,
    /// `MQTT_CLIENT_ID`, when set: overrides the client id derived from the cluster's identity
    /// (see [`Config::client_id`]).
    pub mqtt_client_id: Option<String>,
    pub mqtt_topics: Vec<String>,
    pub mqtt_keep_alive: Duration,
    pub mqtt_reconnect_max: Duration,
    /// A leader that cannot reach the broker this long hands over (zero: never).
    pub mqtt_step_down_after: Duration,
    pub device_topic_pattern: String,
    pub lease_name: String,
    pub lease: LeaseTimings,
    pub batch_max_rows: usize,
    pub batch_max_wait: Duration,
    /// A batch closes once its payloads reach this many bytes (bounds one statement's memory).
    pub batch_max_bytes: usize,
    /// How far back the first copy of a redelivered timestamp-less message is looked for.
    pub redelivery_window: Duration,
    pub max_payload_bytes: usize,
    pub max_pending: usize,
    /// Payload and topic bytes of received-but-unacknowledged messages (G5: bounded in bytes).
    pub max_pending_bytes: usize,
    pub http_addr: SocketAddr,
    pub stale_warning: Duration,
    pub stale_critical: Duration,
    pub alert_webhook_url: Option<String>,
    /// How often every node evaluates alerts.
    pub alert_check_interval: Duration,
    /// How long "no leader" or "leader off the broker" must last before it is an alert.
    pub alert_grace: Duration,
    /// Event-like alerts count what happened within this window.
    pub alert_window: Duration,
    pub retention: Retention,
    pub log_format: LogFormat,
    pub log_level: String,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("instance_id", &self.instance_id)
            .field("mode", &self.mode)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("mqtt", &self.mqtt)
            .field("mqtt_client_id", &self.mqtt_client_id)
            .field("mqtt_topics", &self.mqtt_topics)
            .field("lease_name", &self.lease_name)
            .field("lease", &self.lease)
            .field("batch_max_rows", &self.batch_max_rows)
            .field("batch_max_wait", &self.batch_max_wait)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("redelivery_window", &self.redelivery_window)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .field("max_pending", &self.max_pending)
            .field("max_pending_bytes", &self.max_pending_bytes)
            .field("http_addr", &self.http_addr)
            .field(
                "alert_webhook_url",
                &self.alert_webhook_url.as_deref().map(redact_url),
            )
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

/// Parses a human-readable duration (`10s`, `500ms`, `5m`) with the error text settings use.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    duration(v)
}

fn duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v)
        .map_err(|e| format!("{e}; expected a duration such as 10s, 500ms or 5m"))
}

fn nonzero_duration(v: &str) -> Result<Duration, String> {
    match duration(v)? {
        d if d.is_zero() => Err("must be greater than 0".into()),
        d => Ok(d),
    }
}

fn positive_int(v: &str) -> Result<usize, String> {
    match v.replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    }
}

fn byte_size(v: &str) -> Result<usize, String> {
    let lower = v.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1024),
        ("mib", 1024 * 1024),
        ("gib", 1024 * 1024 * 1024),
        ("kb", 1000),
        ("mb", 1_000_000),
        ("gb", 1_000_000_000),
        ("b", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| {
        lower
            .strip_suffix(suffix)
            .map(|n| (n.trim().to_string(), *m))
    })
    .unwrap_or((lower.clone(), 1));
    let n = positive_int(&num).map_err(|e| {
        if num.trim_start_matches('0').is_empty() && !num.is_empty() {
            e
        } else {
            "expected a size such as 262144, 256KiB, 1MiB or 1GiB".to_string()
        }
    })?;
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

fn mqtt_endpoint(s: &Sources) -> Result<MqttEndpoint, ConfigError> {
    let mut ep = MqttEndpoint {
        host: "127.0.0.1".into(),
        port: 1883,
        tls: false,
        username: None,
        password: None,
        ca_file: None,
        client_cert: None,
        client_key: None,
    };
    if let Some((url, origin)) = s.get("MQTT_URL") {
        let invalid = |reason: &str| ConfigError::Invalid {
            key: "MQTT_URL".into(),
            value: redact_url(url),
            origin: origin.clone(),
            reason: reason.into(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected mqtt://host:port or mqtts://host:port"))?;
        ep.tls = match scheme {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(invalid("scheme must be mqtt:// or mqtts://")),
        };
        ep.port = if ep.tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        let hostport = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                ep.username = Some(u.to_string()).filter(|u| !u.is_empty());
                ep.password = Some(p.to_string()).filter(|p| !p.is_empty());
                hp
            }
            None => rest,
        };
        match hostport.rsplit_once(':') {
            Some((h, p)) => {
                ep.host = h.to_string();
                ep.port = p
                    .parse()
                    .map_err(|_| invalid("port must be a number from 1 to 65535"))?;
            }
            None => ep.host = hostport.to_string(),
        }
        if ep.host.is_empty() {
            return Err(invalid("missing host"));
        }
    }
    if let Some(h) = s.string("MQTT_HOST") {
        ep.host = h;
    }
    ep.port = s.parse("MQTT_PORT", ep.port, |v| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| "expected a port from 1 to 65535".to_string())
    })?;
    if let Some(u) = s.string("MQTT_USERNAME") {
        ep.username = Some(u);
    }
    if let Some(p) = s.string("MQTT_PASSWORD") {
        ep.password = Some(p);
    }
    let file = |key: &str| -> Result<Option<std::path::PathBuf>, ConfigError> {
        let Some((v, origin)) = s.get(key) else {
            return Ok(None);
        };
        let invalid = |reason: String| ConfigError::Invalid {
            key: key.into(),
            value: v.to_string(),
            origin: origin.clone(),
            reason,
        };
        if !ep.tls {
            return Err(invalid(
                "TLS files need a TLS broker URL: set MQTT_URL=mqtts://host:8883".into(),
            ));
        }
        std::fs::File::open(v).map_err(|e| invalid(format!("cannot read the file: {e}")))?;
        Ok(Some(v.into()))
    };
    ep.ca_file = file("MQTT_CA_FILE")?;
    ep.client_cert = file("MQTT_CLIENT_CERT")?;
    ep.client_key = file("MQTT_CLIENT_KEY")?;
    if ep.client_cert.is_some() != ep.client_key.is_some() {
        let (key, other) = if ep.client_cert.is_some() {
            ("MQTT_CLIENT_CERT", "MQTT_CLIENT_KEY")
        } else {
            ("MQTT_CLIENT_KEY", "MQTT_CLIENT_CERT")
        };
        let (v, origin) = s.get(key).unwrap_or(("", &Origin::Default));
        return Err(ConfigError::Invalid {
            key: key.into(),
            value: v.to_string(),
            origin: origin.clone(),
            reason: format!("a client certificate needs both MQTT_CLIENT_CERT and MQTT_CLIENT_KEY; {other} is not set"),
        });
    }
    Ok(ep)
}

/// How long the tables a node fills for operations keep their rows (SPEC G5). Production nodes
/// delete older rows every `interval`, in small batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub dead_letters: Duration,
    /// Resolved alerts only: an open alert is kept however old it is.
    pub alerts: Duration,
    pub lease_history: Duration,
    pub cluster_nodes: Duration,
    pub interval: Duration,
}

/// Retention shorter than this would make the tables useless for looking back at an incident.
const MIN_RETENTION: Duration = Duration::from_secs(3600);

fn retention(s: &Sources) -> Result<Retention, ConfigError> {
    const DAY: u64 = 24 * 3600;
    // Parsed (and reported) as its own setting first; read again here for the comparison.
    let alert_window = s.parse("ALERT_WINDOW", Duration::from_secs(600), nonzero_duration)?;
    let keep = |key: &str, default_days: u64, judged_in_window: bool| {
        s.parse(key, Duration::from_secs(default_days * DAY), |v| {
            let d = duration(v)?;
            if d < MIN_RETENTION {
                return Err(format!("must be at least {}", fmt_dur(MIN_RETENTION)));
            }
            if judged_in_window && d < alert_window {
                return Err(format!(
                    "must be at least ALERT_WINDOW ({}): alerts count these rows within it",
                    fmt_dur(alert_window)
                ));
            }
            Ok(d)
        })
    };
    Ok(Retention {
        dead_letters: keep("DEAD_LETTER_RETENTION", 30, true)?,
        alerts: keep("ALERT_RETENTION", 90, false)?,
        lease_history: keep("LEASE_HISTORY_RETENTION", 90, true)?,
        cluster_nodes: keep("CLUSTER_NODE_RETENTION", 7, false)?,
        interval: s.parse(
            "RETENTION_INTERVAL",
            Duration::from_secs(3600),
            nonzero_duration,
        )?,
    })
}

impl Config {
    /// Parses and validates the merged layers.
    pub fn load(s: &Sources) -> Result<Config, ConfigError> {
        let instance_id = s.string("INSTANCE_ID").unwrap_or_else(|| {
            hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "leasehold".into())
        });
        let mode = s.parse("MQTT_MODE", Mode::Production, |v| {
            match v.to_ascii_lowercase().as_str() {
                "production" => Ok(Mode::Production),
                "development" => Ok(Mode::Development),
                "disabled" => Ok(Mode::Disabled),
                _ => Err("expected production, development or disabled".into()),
            }
        })?;
        let lease_name = s
            .string("LEASE_NAME")
            .unwrap_or_else(|| "mqtt-ingest".into());
        let ttl = s.parse("LEASE_TTL", Duration::from_secs(10), duration)?;
        let lease = LeaseTimings {
            ttl,
            renew_interval: s.parse("LEASE_RENEW_INTERVAL", ttl / 3, duration)?,
            poll_interval: s.parse("LEASE_POLL_INTERVAL", Duration::from_secs(1), duration)?,
        };
        lease.validate()?;
        let max_payload_bytes = s.parse("MAX_PAYLOAD_BYTES", 256 * 1024, byte_size)?;
        let batch_max_rows = s.parse("BATCH_MAX_ROWS", 1000, |v| {
            positive_int(v).and_then(|n| {
                if n <= 100_000 {
                    Ok(n)
                } else {
                    Err("must be at most 100000".into())
                }
            })
        })?;
        let mqtt_topics: Vec<String> = s
            .string("MQTT_TOPICS")
            .unwrap_or_else(|| "devices/+/telemetry".into())
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        for t in &mqtt_topics {
            validate_filter(t).map_err(|reason| ConfigError::Invalid {
                key: "MQTT_TOPICS".into(),
                value: t.clone(),
                origin: s
                    .get("MQTT_TOPICS")
                    .map(|(_, o)| o.clone())
                    .unwrap_or(Origin::Default),
                reason,
            })?;
        }
        let device_topic_pattern = s
            .string("DEVICE_TOPIC_PATTERN")
            .unwrap_or_else(|| "devices/{device_id}/#".into());
        if !device_topic_pattern
            .split('/')
            .any(|seg| seg == "{device_id}")
        {
            return Err(ConfigError::Invalid {
                key: "DEVICE_TOPIC_PATTERN".into(),
                value: device_topic_pattern,
                origin: Origin::Env,
                reason: "must contain a {device_id} segment, e.g. devices/{device_id}/telemetry"
                    .into(),
            });
        }
        let stale_warning = s.parse("STALE_WARNING", Duration::from_secs(300), duration)?;
        let stale_critical = s.parse("STALE_CRITICAL", Duration::from_secs(600), duration)?;
        if stale_critical < stale_warning {
            return Err(ConfigError::Invalid {
                key: "STALE_CRITICAL".into(),
                value: fmt_dur(stale_critical),
                origin: s
                    .get("STALE_CRITICAL")
                    .map(|(_, o)| o.clone())
                    .unwrap_or(Origin::Default),
                reason: format!(
                    "must not be below STALE_WARNING ({})",
                    fmt_dur(stale_warning)
                ),
            });
        }
        let cfg = Config {
            mqtt_client_id: s.string("MQTT_CLIENT_ID"),
            instance_id,
            mode,
            database_url: s.string("DATABASE_URL"),
            database_pool_size: s.parse("DATABASE_POOL_SIZE", 4, positive_int)?,
            mqtt: mqtt_endpoint(s)?,
            mqtt_topics,
            mqtt_keep_alive: s.parse("MQTT_KEEP_ALIVE", Duration::from_secs(10), |v| {
                duration(v).and_then(|d| {
                    if d >= Duration::from_secs(1) {
                        Ok(d)
                    } else {
                        Err("must be at least 1s".into())
                    }
                })
            })?,
            mqtt_reconnect_max: s.parse("MQTT_RECONNECT_MAX", Duration::from_secs(30), duration)?,
            mqtt_step_down_after: s.parse(
                "MQTT_STEP_DOWN_AFTER",
                Duration::from_secs(20),
                duration,
            )?,
            device_topic_pattern,
            lease_name,
            lease,
            batch_max_rows,
            batch_max_wait: s.parse("BATCH_MAX_WAIT", Duration::from_millis(50), duration)?,
            batch_max_bytes: s.parse("BATCH_MAX_BYTES", 4 * 1024 * 1024, byte_size)?,
            redelivery_window: s.parse(
                "REDELIVERY_WINDOW",
                Duration::from_secs(3600),
                |v| {
                    nonzero_duration(v).and_then(|d| {
                        if d <= Duration::from_secs(7 * 24 * 3600) {
                            Ok(d)
                        } else {
                            Err("must be at most 7d (a broker keeps a session's in-flight messages no longer than its persistent_client_expiration)".into())
                        }
                    })
                },
            )?,
            max_payload_bytes,
            max_pending: s.parse(
                "MAX_PENDING",
                (batch_max_rows * 10).max(10_000),
                positive_int,
            )?,
            max_pending_bytes: s.parse(
                "MAX_PENDING_BYTES",
                DEFAULT_MAX_PENDING_BYTES.max(max_payload_bytes),
                |v| {
                    byte_size(v).and_then(|n| {
                        if n <= MAX_PENDING_BYTES_LIMIT {
                            Ok(n)
                        } else {
                            Err(format!(
                                "must be at most {}MiB",
                                MAX_PENDING_BYTES_LIMIT >> 20
                            ))
                        }
                    })
                },
            )?,
            http_addr: s.parse("HTTP_ADDR", SocketAddr::from(([0, 0, 0, 0], 8080)), |v| {
                v.parse()
                    .map_err(|_| "expected an address such as 0.0.0.0:8080".into())
            })?,
            stale_warning,
            stale_critical,
            alert_webhook_url: s.string("ALERT_WEBHOOK_URL"),
            alert_check_interval: s.parse(
                "ALERT_CHECK_INTERVAL",
                Duration::from_secs(15),
                nonzero_duration,
            )?,
            alert_grace: s.parse("ALERT_GRACE", Duration::from_secs(30), duration)?,
            alert_window: s.parse("ALERT_WINDOW", Duration::from_secs(600), nonzero_duration)?,
            retention: retention(s)?,
            log_format: s.parse("LOG_FORMAT", LogFormat::Pretty, |v| {
                match v.to_ascii_lowercase().as_str() {
                    "json" => Ok(LogFormat::Json),
                    "pretty" | "text" => Ok(LogFormat::Pretty),
                    _ => Err("expected json or pretty".into()),
                }
            })?,
            log_level: s.string("LOG_LEVEL").unwrap_or_else(|| "info".into()),
        };
        if cfg.max_pending > 50_000 {
            return Err(ConfigError::Invalid {
                key: "MAX_PENDING".into(),
                value: cfg.max_pending.to_string(),
                origin: s.get("MAX_PENDING").map(|(_, o)| o.clone()).unwrap_or(Origin::Default),
                reason: "must be at most 50000: MQTT packet ids are 16 bits and must not wrap while messages are held".into(),
            });
        }
        if cfg.max_pending_bytes < cfg.max_payload_bytes {
            return Err(ConfigError::Invalid {
                key: "MAX_PENDING_BYTES".into(),
                value: s
                    .get("MAX_PENDING_BYTES")
                    .map(|(v, _)| v.to_string())
                    .unwrap_or_else(|| cfg.max_pending_bytes.to_string()),
                origin: s
                    .get("MAX_PENDING_BYTES")
                    .map(|(_, o)| o.clone())
                    .unwrap_or(Origin::Default),
                reason: format!(
                    "must be at least MAX_PAYLOAD_BYTES ({} bytes): one message of the largest accepted size must fit",
                    cfg.max_payload_bytes
                ),
            });
        }
        if cfg.max_pending < cfg.batch_max_rows {
            return Err(ConfigError::Invalid {
                key: "MAX_PENDING".into(),
                value: cfg.max_pending.to_string(),
                origin: s
                    .get("MAX_PENDING")
                    .map(|(_, o)| o.clone())
                    .unwrap_or(Origin::Default),
                reason: format!("must be at least BATCH_MAX_ROWS ({})", cfg.batch_max_rows),
            });
        }
        Ok(cfg)
    }

    /// The client id of the cluster's shared session: `MQTT_CLIENT_ID` when set, otherwise
    /// derived from the cluster's identity (read from its database) and `LEASE_NAME`.
    pub fn client_id(&self, cluster_id: Option<&str>) -> Result<ClientId, ClientIdError> {
        let derived = cluster_id
            .map(|id| derive_client_id(id, &self.lease_name))
            .transpose()?;
        Ok(match (&self.mqtt_client_id, derived) {
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
        self.database_url.as_deref().ok_or(ConfigError::Missing {
            key: "DATABASE_URL".into(),
        })
    }
}

/// Where the client id of the cluster's shared session comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientIdSource {
    /// Derived from the cluster's identity and `LEASE_NAME`: the default.
    Derived,
    /// Set with `MQTT_CLIENT_ID`.
    Explicit,
}

impl ClientIdSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientIdSource::Derived => "derived",
            ClientIdSource::Explicit => "explicit",
        }
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
    let lease: String = Sha256::digest(lease_name.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("lh-{}-{}", &hex[..12], &lease[..7]))
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
    if f.split('/').count() > MAX_FILTER_LEVELS {
        return Err(format!(
            "topic filter has more than {MAX_FILTER_LEVELS} levels, which brokers refuse"
        ));
    }
    let segs: Vec<&str> = f.split('/').collect();
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
        assert_eq!(c.batch_max_rows, 1000);
        assert_eq!(c.batch_max_wait, Duration::from_millis(50));
        assert_eq!(c.max_payload_bytes, 256 * 1024);
        assert_eq!(c.mqtt_client_id, None);
        assert_eq!(c.mode, Mode::Production);
        assert_eq!(c.http_addr.to_string(), "0.0.0.0:8080");
    }

    #[test]
    fn flags_override_env_override_file() {
        let dir = std::env::temp_dir().join(format!("lh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "lease_ttl = \"30s\"\nbatch_max_rows = 5\ninstance_id = \"file\"\nmqtt_topics = [\"a/#\", \"b/+\"]\n")
            .expect("write");
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
        assert_eq!(c.batch_max_rows, 5);
        assert_eq!(c.instance_id, "flag");
        assert_eq!(c.mqtt_topics, vec!["a/#", "b/+"]);
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
            c.retention,
            Retention {
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
        assert_eq!(c.retention.dead_letters, 14 * day);
        assert_eq!(c.retention.interval, Duration::from_secs(600));
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
        let dir = std::env::temp_dir().join(format!("lh-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "lease_tl = \"30s\"\n").expect("write");
        let e = Sources::gather(Some(&path), Vec::new(), Vec::new()).unwrap_err();
        assert!(matches!(e, ConfigError::Unknown { .. }));
    }
}
