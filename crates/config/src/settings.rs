//! The settings as one declarative structure: nested sections, every field optional (unset means
//! "the default"), unknown keys refused. [`SETTINGS`] names each field's environment variable,
//! which is also its flag (`--set NAME=VALUE`) and its flat key in a config file (lower case).
//!
//! Values are read from their text whatever scalar type a layer gave (environment and flags give
//! strings, a TOML file may give numbers or arrays), so the three layers accept the same values.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::{LogFormat, Mode};

/// Every setting: its environment name and its path in the nested structure.
pub const SETTINGS: &[(&str, &str)] = &[
    ("INSTANCE_ID", "instance_id"),
    ("MQTT_MODE", "mqtt.mode"),
    ("DATABASE_URL", "database.url"),
    ("DATABASE_POOL_SIZE", "database.pool_size"),
    (
        "REQUIRE_SYNC_REPLICATION",
        "database.require_sync_replication",
    ),
    ("MQTT_URL", "mqtt.url"),
    ("MQTT_HOST", "mqtt.host"),
    ("MQTT_PORT", "mqtt.port"),
    ("MQTT_USERNAME", "mqtt.username"),
    ("MQTT_PASSWORD", "mqtt.password"),
    ("MQTT_CA_FILE", "mqtt.ca_file"),
    ("MQTT_CLIENT_CERT", "mqtt.client_cert"),
    ("MQTT_CLIENT_KEY", "mqtt.client_key"),
    ("MQTT_CLIENT_ID", "mqtt.client_id"),
    ("MQTT_TOPICS", "mqtt.topics"),
    ("MQTT_KEEP_ALIVE", "mqtt.keep_alive"),
    ("MQTT_RECONNECT_MAX", "mqtt.reconnect_max"),
    ("MQTT_STEP_DOWN_AFTER", "mqtt.step_down_after"),
    ("DEVICE_TOPIC_PATTERN", "ingest.device_topic_pattern"),
    ("LEASE_NAME", "lease.name"),
    ("LEASE_TTL", "lease.ttl"),
    ("LEASE_RENEW_INTERVAL", "lease.renew_interval"),
    ("LEASE_POLL_INTERVAL", "lease.poll_interval"),
    ("BATCH_MAX_ROWS", "batch.max_rows"),
    ("BATCH_MAX_WAIT", "batch.max_wait"),
    ("BATCH_MAX_BYTES", "batch.max_bytes"),
    ("REDELIVERY_WINDOW", "ingest.redelivery_window"),
    ("MAX_PAYLOAD_BYTES", "ingest.max_payload_bytes"),
    ("MAX_PENDING", "ingest.max_pending"),
    ("MAX_PENDING_BYTES", "ingest.max_pending_bytes"),
    ("HTTP_ADDR", "http.addr"),
    ("STALE_WARNING", "stale.warning"),
    ("STALE_CRITICAL", "stale.critical"),
    ("ALERT_WEBHOOK_URL", "alert.webhook_url"),
    ("ALERT_CHECK_INTERVAL", "alert.check_interval"),
    ("ALERT_GRACE", "alert.grace"),
    ("ALERT_WINDOW", "alert.window"),
    ("DEAD_LETTER_RETENTION", "retention.dead_letters"),
    ("ALERT_RETENTION", "retention.alerts"),
    ("LEASE_HISTORY_RETENTION", "retention.lease_history"),
    ("CLUSTER_NODE_RETENTION", "retention.cluster_nodes"),
    ("RETENTION_INTERVAL", "retention.interval"),
    ("LOG_FORMAT", "log.format"),
    ("LOG_LEVEL", "log.level"),
];

/// The environment names of every setting (what `KEYS.contains(..)` and error messages use).
pub struct Keys;

/// Every setting Leasehold reads, as its environment name.
pub const KEYS: Keys = Keys;

impl Keys {
    pub fn contains(&self, key: &str) -> bool {
        path_of(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = &'static str> {
        SETTINGS.iter().map(|(env, _)| *env)
    }
}

/// The nested path of the setting named `env`.
pub fn path_of(env: &str) -> Option<&'static str> {
    SETTINGS.iter().find(|(e, _)| *e == env).map(|(_, p)| *p)
}

/// The environment name of the setting at `path`.
pub fn env_of(path: &str) -> Option<&'static str> {
    SETTINGS.iter().find(|(_, p)| *p == path).map(|(e, _)| *e)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    #[serde(deserialize_with = "string")]
    pub instance_id: Option<String>,
    pub database: Database,
    pub mqtt: Mqtt,
    pub lease: Lease,
    pub batch: Batch,
    pub ingest: Ingest,
    pub http: Http,
    pub stale: Stale,
    pub alert: Alert,
    pub retention: Retention,
    pub log: Log,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Database {
    #[serde(deserialize_with = "string")]
    pub url: Option<String>,
    #[serde(deserialize_with = "count")]
    pub pool_size: Option<usize>,
    #[serde(deserialize_with = "flag")]
    pub require_sync_replication: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mqtt {
    #[serde(deserialize_with = "mode")]
    pub mode: Option<Mode>,
    #[serde(deserialize_with = "string")]
    pub url: Option<String>,
    #[serde(deserialize_with = "string")]
    pub host: Option<String>,
    #[serde(deserialize_with = "port")]
    pub port: Option<u16>,
    #[serde(deserialize_with = "string")]
    pub username: Option<String>,
    #[serde(deserialize_with = "string")]
    pub password: Option<String>,
    #[serde(deserialize_with = "string")]
    pub ca_file: Option<String>,
    #[serde(deserialize_with = "string")]
    pub client_cert: Option<String>,
    #[serde(deserialize_with = "string")]
    pub client_key: Option<String>,
    #[serde(deserialize_with = "string")]
    pub client_id: Option<String>,
    #[serde(deserialize_with = "list")]
    pub topics: Option<Vec<String>>,
    #[serde(deserialize_with = "duration")]
    pub keep_alive: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub step_down_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lease {
    #[serde(deserialize_with = "string")]
    pub name: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub ttl: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub renew_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub poll_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Batch {
    #[serde(deserialize_with = "count")]
    pub max_rows: Option<usize>,
    #[serde(deserialize_with = "duration")]
    pub max_wait: Option<Duration>,
    #[serde(deserialize_with = "size")]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingest {
    #[serde(deserialize_with = "string")]
    pub device_topic_pattern: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub redelivery_window: Option<Duration>,
    #[serde(deserialize_with = "size")]
    pub max_payload_bytes: Option<usize>,
    #[serde(deserialize_with = "count")]
    pub max_pending: Option<usize>,
    #[serde(deserialize_with = "size")]
    pub max_pending_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Http {
    #[serde(deserialize_with = "address")]
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Stale {
    #[serde(deserialize_with = "duration")]
    pub warning: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub critical: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Alert {
    #[serde(deserialize_with = "string")]
    pub webhook_url: Option<String>,
    #[serde(deserialize_with = "duration")]
    pub check_interval: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub grace: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    #[serde(deserialize_with = "duration")]
    pub dead_letters: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub alerts: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub lease_history: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub cluster_nodes: Option<Duration>,
    #[serde(deserialize_with = "duration")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Log {
    #[serde(deserialize_with = "log_format")]
    pub format: Option<LogFormat>,
    #[serde(deserialize_with = "string")]
    pub level: Option<String>,
}

/// Reads any scalar as its text; an array as its items joined with commas (a list in a file is the
/// comma-separated list of the environment).
struct Text;

impl<'de> Visitor<'de> for Text {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a number or a list")
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Some(format!("{v:?}")))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Scalar>()? {
            items.extend(item.0);
        }
        Ok(Some(items.join(",")))
    }
}

/// One item of a list.
struct Scalar(Option<String>);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Text).map(Scalar)
    }
}

/// Reads a setting's text (trimmed; empty is unset) and parses it with `parse`.
fn text<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    match d.deserialize_option(Text)? {
        Some(v) if !v.trim().is_empty() => parse(v.trim()).map(Some).map_err(de::Error::custom),
        _ => Ok(None),
    }
}

fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    text(d, |v| Ok(v.to_string()))
}

/// Through `humantime-serde`, from the text, so a file's `mqtt_step_down_after = 0` still reads.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    text(d, |v| {
        humantime_serde::deserialize(de::value::StrDeserializer::<de::value::Error>::new(v))
            .map_err(|_| "expected a duration such as 10s, 500ms or 5m".to_string())
    })
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    text(d, positive_int)
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    text(d, byte_size)
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    text(d, |v| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| "expected a port from 1 to 65535".to_string())
    })
}

fn address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    text(d, |v| {
        v.parse()
            .map_err(|_| "expected an address such as 0.0.0.0:8080".into())
    })
}

fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    text(d, |v| {
        Ok(v.split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect())
    })
}

fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mode>, D::Error> {
    text(d, |v| match v.to_ascii_lowercase().as_str() {
        "production" => Ok(Mode::Production),
        "development" => Ok(Mode::Development),
        "disabled" => Ok(Mode::Disabled),
        _ => Err("expected production, development or disabled".into()),
    })
}

fn log_format<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
    text(d, |v| match v.to_ascii_lowercase().as_str() {
        "json" => Ok(LogFormat::Json),
        "pretty" | "text" => Ok(LogFormat::Pretty),
        _ => Err("expected json or pretty".into()),
    })
}

fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    text(d, |v| match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    })
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
    use figment::error::Kind;
    use figment::providers::Serialized;
    use figment::Figment;

    /// The fields of the section at `path`, read from serde's "unknown field" error; `None` for
    /// a setting (it refuses the probe as a value instead).
    fn fields(path: &str) -> Option<Vec<&'static str>> {
        let probe = Serialized::default(format!("{path}.not_a_field").trim_start_matches('.'), 1);
        match Figment::from(probe)
            .extract::<Settings>()
            .map_err(|e| e.kind)
        {
            Err(Kind::UnknownField(_, known)) => Some(known.to_vec()),
            _ => None,
        }
    }

    /// [`SETTINGS`] and the structure name the same settings: nothing without an environment
    /// name, no environment name without a field.
    #[test]
    fn every_field_has_an_environment_name_and_back() {
        let mut paths = Vec::new();
        for top in fields("").expect("top level") {
            match fields(top) {
                Some(section) => paths.extend(section.iter().map(|f| format!("{top}.{f}"))),
                None => paths.push(top.to_string()),
            }
        }
        let mut declared: Vec<String> = SETTINGS.iter().map(|(_, p)| p.to_string()).collect();
        paths.sort();
        declared.sort();
        assert_eq!(paths, declared);
    }
}
