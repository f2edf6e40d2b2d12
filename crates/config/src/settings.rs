//! Every setting, declared once: a field of [`NodeSettings`] or of [`ClusterValues`], with its
//! doc comment, its default and how its text is read. Which structure holds a field is what
//! makes it a node or a cluster setting; its name in upper case is its environment variable and
//! its flag (`--set NAME=VALUE`), in lower case its key in a config file. Nothing else lists the
//! settings: [`KEYS`] and [`CLUSTER_SETTINGS`] are read from the two structures.
//!
//! Every layer gives a setting as text (a file's numbers and arrays are turned into the text the
//! environment would hold), so the three layers accept the same values; each field is read from
//! its text by one of the [`text`] kinds, and written back to it the same way (what
//! `config show` prints and drift compares).

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use serde::de::{self, Deserializer, IntoDeserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::{LogFormat, Mode};

/// How this host runs: how it reaches the database and the broker, its credentials and TLS files,
/// its name, mode, HTTP address, logging and resources. Kept in each host's file, environment or
/// flags.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// This node's name (`leasehold status`, `written_by`). Unset: the host name.
    #[serde(default, with = "text::string::opt")]
    pub instance_id: Option<String>,
    /// `production` campaigns for the lease; `development` observes; `disabled`: no MQTT.
    #[serde(default = "default::mode", with = "text::mode")]
    pub mqtt_mode: Mode,
    /// PostgreSQL URL or libpq `key=value` string; every database command needs it.
    #[serde(default, with = "text::secret::opt")]
    pub database_url: Option<Secret>,
    /// Connections for HTTP answers and topic reloads.
    #[serde(default = "default::count::<4>", with = "text::count")]
    pub database_pool_size: usize,
    /// Ingest only while commits are synchronously replicated; ack once a standby flushed them.
    #[serde(default, with = "text::flag")]
    pub require_sync_replication: bool,
    /// The broker (`mqtt://` or `mqtts://`, may carry `user:password@`). Unset: 127.0.0.1:1883.
    #[serde(default, with = "text::secret::opt")]
    pub mqtt_url: Option<Secret>,
    /// Overrides the host of `MQTT_URL`.
    #[serde(default, with = "text::string::opt")]
    pub mqtt_host: Option<String>,
    /// Overrides the port of `MQTT_URL`.
    #[serde(default, with = "text::port::opt")]
    pub mqtt_port: Option<u16>,
    /// Broker user name (overrides `MQTT_URL`'s).
    #[serde(default, with = "text::string::opt")]
    pub mqtt_username: Option<String>,
    /// Broker password (overrides `MQTT_URL`'s).
    #[serde(default, with = "text::secret::opt")]
    pub mqtt_password: Option<Secret>,
    /// PEM CA(s) of the broker's certificate (`mqtts://` only). Unset: the system roots.
    #[serde(default, with = "text::string::opt")]
    pub mqtt_ca_file: Option<String>,
    /// PEM client certificate, with `MQTT_CLIENT_KEY`.
    #[serde(default, with = "text::string::opt")]
    pub mqtt_client_cert: Option<String>,
    /// PEM client key, with `MQTT_CLIENT_CERT`.
    #[serde(default, with = "text::string::opt")]
    pub mqtt_client_key: Option<String>,
    /// Overrides the client id derived from the cluster's identity (warned about).
    #[serde(default, with = "text::string::opt")]
    pub mqtt_client_id: Option<String>,
    /// MQTT keep-alive.
    #[serde(default = "default::secs::<10>", with = "text::duration")]
    pub mqtt_keep_alive: Duration,
    /// Cap of the reconnect backoff.
    #[serde(default = "default::secs::<30>", with = "text::duration")]
    pub mqtt_reconnect_max: Duration,
    /// A leader that cannot reach the broker this long hands over (zero: never).
    #[serde(default = "default::secs::<20>", with = "text::duration")]
    pub mqtt_step_down_after: Duration,
    /// The lease row, also part of the derived MQTT client id.
    #[serde(default = "default::lease_name", with = "text::string")]
    pub lease_name: String,
    /// Lease lifetime on the database clock.
    #[serde(default = "default::secs::<10>", with = "text::duration")]
    pub lease_ttl: Duration,
    /// How often the leader renews. Unset: a third of `LEASE_TTL`.
    #[serde(default, with = "text::duration::opt")]
    pub lease_renew_interval: Option<Duration>,
    /// How often standbys try to acquire.
    #[serde(default = "default::secs::<1>", with = "text::duration")]
    pub lease_poll_interval: Duration,
    /// Received-but-unacknowledged messages a leader holds. Unset: 10 × `BATCH_MAX_ROWS`,
    /// within 10000..=50000.
    #[serde(default, with = "text::count::opt")]
    pub max_pending: Option<usize>,
    /// Their payload and topic bytes. Unset: 4 MiB, or `MAX_PAYLOAD_BYTES` if larger.
    #[serde(default, with = "text::size::opt")]
    pub max_pending_bytes: Option<usize>,
    /// Health and metrics listener.
    #[serde(default = "default::http_addr", with = "text::address")]
    pub http_addr: SocketAddr,
    /// `json` for log shippers, `pretty` for people.
    #[serde(default = "default::log_format", with = "text::log_format")]
    pub log_format: LogFormat,
    /// A tracing filter.
    #[serde(default = "default::log_level", with = "text::string")]
    pub log_level: String,
}

/// What a message becomes: what is subscribed, how a payload is read, where it is written, when
/// alerts fire and what is pruned. Stored in the cluster's database, the same for every node
/// (`leasehold config apply`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterValues {
    /// Topic filters subscribed (with the enabled rows of `devices`).
    #[serde(default = "default::topics", with = "text::list")]
    pub mqtt_topics: Vec<String>,
    /// Where the device id sits in the topic.
    #[serde(default = "default::device_topic_pattern", with = "text::string")]
    pub device_topic_pattern: String,
    /// Larger payloads are dead letters (their head kept).
    #[serde(default = "default::size::<262144>", with = "text::size")]
    pub max_payload_bytes: usize,
    /// How far back the first copy of a redelivered timestamp-less message is looked for.
    #[serde(default = "default::secs::<3600>", with = "text::duration")]
    pub redelivery_window: Duration,
    /// Messages per write transaction.
    #[serde(default = "default::count::<1000>", with = "text::count")]
    pub batch_max_rows: usize,
    /// Longest wait for a batch to fill, from its first message.
    #[serde(default = "default::millis::<50>", with = "text::duration")]
    pub batch_max_wait: Duration,
    /// A batch closes once its payloads reach this many bytes (bounds one statement's memory).
    #[serde(default = "default::size::<4194304>", with = "text::size")]
    pub batch_max_bytes: usize,
    /// Data age that is a warning; also the window of device coverage.
    #[serde(default = "default::secs::<300>", with = "text::duration")]
    pub stale_warning: Duration,
    /// Data age that is critical.
    #[serde(default = "default::secs::<600>", with = "text::duration")]
    pub stale_critical: Duration,
    /// Slack-compatible webhook for alert changes.
    #[serde(default, with = "text::secret::opt")]
    pub alert_webhook_url: Option<Secret>,
    /// How often alerts are evaluated.
    #[serde(default = "default::secs::<15>", with = "text::duration")]
    pub alert_check_interval: Duration,
    /// How long "no leader" or "leader off the broker" must last before it is an alert.
    #[serde(default = "default::secs::<30>", with = "text::duration")]
    pub alert_grace: Duration,
    /// Event-like alerts count what happened within this window.
    #[serde(default = "default::secs::<600>", with = "text::duration")]
    pub alert_window: Duration,
    /// Readings in `telemetry` older than this are removed, a whole day partition at a time
    /// (never row by row). Unset: every reading is kept.
    #[serde(default, with = "text::duration::opt")]
    pub telemetry_retention: Option<Duration>,
    /// Dead letters older than this are deleted.
    #[serde(default = "default::days::<30>", with = "text::duration")]
    pub dead_letter_retention: Duration,
    /// Resolved alerts older than this are deleted (open ones are kept).
    #[serde(default = "default::days::<90>", with = "text::duration")]
    pub alert_retention: Duration,
    /// `lease_history` rows older than this are deleted.
    #[serde(default = "default::days::<90>", with = "text::duration")]
    pub lease_history_retention: Duration,
    /// `cluster_nodes` rows not seen for this long are deleted.
    #[serde(default = "default::days::<7>", with = "text::duration")]
    pub cluster_node_retention: Duration,
    /// How often the tables above are pruned.
    #[serde(default = "default::secs::<3600>", with = "text::duration")]
    pub retention_interval: Duration,
    /// The Sparkplug B host id the leader publishes its state under (`spBv1.0/STATE/<id>`) when
    /// a `[[formats]]` entry reads `sparkplug_b`. Unset: the cluster's MQTT client id.
    #[serde(default, with = "text::string::opt")]
    pub sparkplug_host_id: Option<String>,
}

impl ClusterValues {
    /// The retention settings as the pruning round reads them.
    pub fn retention(&self) -> crate::Retention {
        crate::Retention {
            telemetry: self.telemetry_retention,
            dead_letters: self.dead_letter_retention,
            alerts: self.alert_retention,
            lease_history: self.lease_history_retention,
            cluster_nodes: self.cluster_node_retention,
            interval: self.retention_interval,
        }
    }
}

/// The node settings, by environment name, in declaration order.
pub static NODE_SETTINGS: LazyLock<Vec<&'static str>> = LazyLock::new(names::<NodeSettings>);

/// The cluster settings, by environment name, in declaration order. Every other setting is a
/// node setting.
pub static CLUSTER_SETTINGS: LazyLock<Vec<&'static str>> = LazyLock::new(names::<ClusterValues>);

/// Whether the setting named `key` (its environment name) is a cluster setting.
pub fn is_cluster_setting(key: &str) -> bool {
    CLUSTER_SETTINGS.contains(&key)
}

/// The environment names of every setting (what `KEYS.contains(..)` and error messages use).
pub struct Keys;

/// Every setting Leasehold reads, as its environment name.
pub const KEYS: Keys = Keys;

impl Keys {
    pub fn contains(&self, key: &str) -> bool {
        self.iter().any(|k| k == key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &'static str> {
        NODE_SETTINGS.iter().chain(CLUSTER_SETTINGS.iter()).copied()
    }
}

/// The setting a key of a config file's `[section]` names: `SECTION_KEY` (`[lease] ttl` is
/// `LEASE_TTL`), or for the sections older files used around other names, the key alone
/// (`[ingest] max_payload_bytes`) or the key with the section after it (`[retention]
/// alerts` is `ALERT_RETENTION`, `dead_letters` is `DEAD_LETTER_RETENTION`).
pub fn in_section(section: &str, key: &str) -> Option<&'static str> {
    let singular = key.strip_suffix('s').unwrap_or(key);
    [
        format!("{section}_{key}"),
        key.to_string(),
        format!("{key}_{section}"),
        format!("{singular}_{section}"),
    ]
    .into_iter()
    .find_map(|c| KEYS.iter().find(|k| k.eq_ignore_ascii_case(&c)))
}

/// The fields of `T`, in upper case, read from the list its `Deserialize` hands a deserializer
/// (so the structure itself is the only list).
fn names<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    let fields = match T::deserialize(FieldProbe) {
        Err(Probed(Some(fields))) => fields,
        _ => &[],
    };
    fields
        .iter()
        .map(|f| &*Box::leak(f.to_uppercase().into_boxed_str()))
        .collect()
}

/// A deserializer that only asks a structure for its field names.
struct FieldProbe;

#[derive(Debug, thiserror::Error)]
#[error("field probe")]
struct Probed(Option<&'static [&'static str]>);

impl de::Error for Probed {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Probed(None)
    }
}

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = Probed;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probed> {
        Err(Probed(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probed> {
        Err(Probed(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Reads one structure from settings given as (lower-case key, text) pairs; an error names the
/// field that refused its text.
pub(crate) fn read<T: for<'de> Deserialize<'de>>(
    values: Vec<(String, String)>,
) -> Result<T, (String, String)> {
    let map = de::value::MapDeserializer::<_, de::value::Error>::new(
        values.into_iter().map(|(k, v)| (k, v.into_deserializer())),
    );
    serde_path_to_error::deserialize(map).map_err(|e| {
        let field = e.path().to_string();
        (field, e.into_inner().to_string())
    })
}

/// Every field of `T` written back as its text (unset: empty), by environment name: what
/// `config show` prints and drift compares.
pub(crate) fn texts<T: Serialize>(values: &T) -> std::collections::BTreeMap<String, String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(values) else {
        return Default::default();
    };
    map.into_iter()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null => String::new(),
                other => other.to_string(),
            };
            (k.to_uppercase(), text)
        })
        .collect()
}

/// A value that can hold a secret (a URL with a password, a password, a webhook's token): its
/// `Debug` shows it as errors and logs may, never in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value in clear, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Read where the value is used; `Debug` still masks it.
impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = match self.0.contains("://") || self.0.contains('=') {
            true => crate::redact_url(&self.0),
            false => crate::MASK.into(),
        };
        write!(f, "{shown:?}")
    }
}

/// The defaults that are constants, as serde's `default = "..."` names them.
mod default {
    use super::*;

    pub fn count<const N: usize>() -> usize {
        N
    }
    pub fn size<const N: usize>() -> usize {
        N
    }
    pub fn secs<const N: u64>() -> Duration {
        Duration::from_secs(N)
    }
    pub fn millis<const N: u64>() -> Duration {
        Duration::from_millis(N)
    }
    pub fn days<const N: u64>() -> Duration {
        Duration::from_secs(N * 24 * 3600)
    }
    pub fn mode() -> Mode {
        Mode::Production
    }
    pub fn lease_name() -> String {
        "mqtt-ingest".into()
    }
    pub fn topics() -> Vec<String> {
        vec!["devices/+/telemetry".into()]
    }
    pub fn device_topic_pattern() -> String {
        "devices/{device_id}/#".into()
    }
    pub fn http_addr() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 8080))
    }
    pub fn log_format() -> LogFormat {
        LogFormat::Pretty
    }
    pub fn log_level() -> String {
        "info".into()
    }
}

/// Each kind of value: how its text is read and written. A kind's `opt` is the same for a setting
/// whose default is not a constant (unset: `None`).
pub mod text {
    use super::*;
    use serde::Serializer;

    macro_rules! kind {
        ($(#[$doc:meta])* $name:ident: $t:ty, read = $read:expr, write = $write:expr) => {
            $(#[$doc])*
            pub mod $name {
                use super::*;

                pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                    let text = String::deserialize(d)?;
                    let read: fn(&str) -> Result<$t, String> = $read;
                    read(text.trim()).map_err(de::Error::custom)
                }

                pub fn serialize<S: Serializer>(v: &$t, s: S) -> Result<S::Ok, S::Error> {
                    let write: fn(&$t) -> String = $write;
                    s.serialize_str(&write(v))
                }

                // Not every kind has a setting whose default follows another.
                #[allow(dead_code)]
                pub mod opt {
                    use super::*;

                    pub fn deserialize<'de, D: Deserializer<'de>>(
                        d: D,
                    ) -> Result<Option<$t>, D::Error> {
                        super::deserialize(d).map(Some)
                    }

                    pub fn serialize<S: Serializer>(v: &Option<$t>, s: S) -> Result<S::Ok, S::Error> {
                        match v {
                            Some(v) => super::serialize(v, s),
                            None => s.serialize_none(),
                        }
                    }
                }
            }
        };
    }

    kind!(string: String, read = |v| Ok(v.to_string()), write = |v| v.clone());
    kind!(secret: Secret, read = |v| Ok(Secret(v.to_string())), write = |v| v.0.clone());
    kind!(
        /// Through `humantime`, so `300s` and `5m` are one value.
        duration: Duration,
        read = |v| {
            humantime::parse_duration(v)
                .map_err(|_| "expected a duration such as 10s, 500ms or 5m".to_string())
        },
        write = |v| crate::fmt_dur(*v)
    );
    kind!(count: usize, read = positive_int, write = |v| v.to_string());
    kind!(size: usize, read = byte_size, write = |v| v.to_string());
    kind!(
        port: u16,
        read = |v| {
            v.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| "expected a port from 1 to 65535".to_string())
        },
        write = |v| v.to_string()
    );
    kind!(
        address: SocketAddr,
        read = |v| {
            v.parse()
                .map_err(|_| "expected an address such as 0.0.0.0:8080".into())
        },
        write = |v| v.to_string()
    );
    kind!(
        /// Comma-separated (a file's array arrives joined with commas).
        list: Vec<String>,
        read = |v| {
            Ok(v.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect())
        },
        write = |v| v.join(",")
    );
    kind!(
        mode: Mode,
        read = |v| match v.to_ascii_lowercase().as_str() {
            "production" => Ok(Mode::Production),
            "development" => Ok(Mode::Development),
            "disabled" => Ok(Mode::Disabled),
            _ => Err("expected production, development or disabled".into()),
        },
        write = |v| v.as_str().to_string()
    );
    kind!(
        log_format: LogFormat,
        read = |v| match v.to_ascii_lowercase().as_str() {
            "json" => Ok(LogFormat::Json),
            "pretty" | "text" => Ok(LogFormat::Pretty),
            _ => Err("expected json or pretty".into()),
        },
        write = |v| match v {
            LogFormat::Json => "json".into(),
            LogFormat::Pretty => "pretty".into(),
        }
    );
    kind!(
        flag: bool,
        read = |v| match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("{v:?} is not true or false")),
        },
        write = |v| v.to_string()
    );
}

fn positive_int(v: &str) -> Result<usize, String> {
    match v.replace('_', "").parse::<usize>() {
        Ok(0) => Err("must be greater than 0".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    }
}

/// A size in bytes: a whole number, optionally with a unit (`256KiB`, `4MiB`, `1GiB`, `1MB`).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_one_class_and_every_section_key_finds_its_setting() {
        assert_eq!(NODE_SETTINGS.len() + CLUSTER_SETTINGS.len(), 46);
        for k in NODE_SETTINGS.iter() {
            assert!(!is_cluster_setting(k), "{k} is in both");
        }
        for (section, key, setting) in [
            ("lease", "ttl", "LEASE_TTL"),
            ("mqtt", "mode", "MQTT_MODE"),
            (
                "database",
                "require_sync_replication",
                "REQUIRE_SYNC_REPLICATION",
            ),
            ("ingest", "device_topic_pattern", "DEVICE_TOPIC_PATTERN"),
            ("ingest", "max_pending_bytes", "MAX_PENDING_BYTES"),
            ("retention", "telemetry", "TELEMETRY_RETENTION"),
            ("retention", "dead_letters", "DEAD_LETTER_RETENTION"),
            ("retention", "alerts", "ALERT_RETENTION"),
            ("retention", "lease_history", "LEASE_HISTORY_RETENTION"),
            ("retention", "cluster_nodes", "CLUSTER_NODE_RETENTION"),
            ("retention", "interval", "RETENTION_INTERVAL"),
            ("stale", "warning", "STALE_WARNING"),
            ("sparkplug", "host_id", "SPARKPLUG_HOST_ID"),
        ] {
            assert_eq!(in_section(section, key), Some(setting), "[{section}] {key}");
        }
        assert_eq!(in_section("lease", "nope"), None);
    }

    #[test]
    fn a_value_written_back_reads_the_same() {
        let c: ClusterValues = read(vec![
            ("stale_warning".into(), "300s".into()),
            ("mqtt_topics".into(), "a/#, b/+".into()),
        ])
        .expect("read");
        assert_eq!(c.stale_warning, Duration::from_secs(300));
        let texts = texts(&c);
        let again: ClusterValues = read(
            texts
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k.to_lowercase(), v))
                .collect(),
        )
        .expect("read back");
        assert_eq!(again, c);
        let (field, reason) = read::<ClusterValues>(vec![("batch_max_rows".into(), "0".into())])
            .expect_err("refused");
        assert_eq!(field, "batch_max_rows");
        assert!(reason.contains("greater than 0"), "{reason}");
    }
}
