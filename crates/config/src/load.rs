//! From the nested settings to a [`Config`]: defaults (some follow other settings), the broker
//! endpoint, then every rule a value must keep in one [`Config::validate`].

use std::time::Duration;

use crate::settings::NodeSettings;
use crate::{
    fmt_dur, redact_url, validate_filter, Config, ConfigError, LeaseTimings, MqttEndpoint, Sources,
    DEFAULT_MAX_PENDING_BYTES, MAX_PENDING_BYTES_LIMIT, MIN_RETENTION, MIN_TELEMETRY_RETENTION,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Config {
    /// Parses and validates the merged layers.
    pub fn load(s: &Sources) -> Result<Config, ConfigError> {
        let (node, cluster) = s.settings()?;
        let lease = LeaseTimings {
            ttl: node.lease_ttl,
            renew_interval: node.lease_renew_interval.unwrap_or(node.lease_ttl / 3),
            poll_interval: node.lease_poll_interval,
        };
        let cfg = Config {
            instance_id: node.instance_id.clone().unwrap_or_else(|| {
                hostname::get()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_else(|| "leasehold".into())
            }),
            mqtt: endpoint(s, &node)?,
            lease,
            max_pending: node
                .max_pending
                .unwrap_or((cluster.batch_max_rows * 10).clamp(10_000, 50_000)),
            max_pending_bytes: node
                .max_pending_bytes
                .unwrap_or(DEFAULT_MAX_PENDING_BYTES.max(cluster.max_payload_bytes)),
            routes: s.routes()?,
            formats: s.formats().to_vec(),
            node,
            cluster,
            sources: s.clone(),
        };
        cfg.validate(s)?;
        Ok(cfg)
    }

    /// Every rule on the values, single and across settings, in one place; `s` names where a
    /// refused value was set.
    fn validate(&self, s: &Sources) -> Result<(), ConfigError> {
        self.lease.validate()?;
        crate::routes::validate(&self.routes)?;
        validate_tls_files(&self.mqtt, s)?;
        for t in &self.cluster.mqtt_topics {
            validate_filter(t).map_err(|reason| s.invalid("MQTT_TOPICS", t, reason))?;
        }
        let pattern = &self.cluster.device_topic_pattern;
        s.rule(
            pattern.split('/').any(|seg| seg == "{device_id}"),
            "DEVICE_TOPIC_PATTERN",
            pattern,
            "must contain a {device_id} segment, e.g. devices/{device_id}/telemetry",
        )?;
        if let Some(url) = self.cluster.alert_webhook_url.as_deref() {
            let (scheme, rest) = url.split_once("://").unwrap_or(("", ""));
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            s.rule(
                matches!(scheme, "http" | "https") && !host.is_empty() && !host.ends_with('@'),
                "ALERT_WEBHOOK_URL",
                url,
                "must be an http:// or https:// URL, e.g. https://hooks.slack.com/services/...",
            )?;
        }
        if let Some(id) = &self.cluster.sparkplug_host_id {
            s.rule(
                !id.is_empty() && !id.contains(['/', '+', '#']) && !id.starts_with('$'),
                "SPARKPLUG_HOST_ID",
                id,
                "must be one topic level: not empty, without '/', '+' or '#', not starting with '$'",
            )?;
        }
        self.validate_durations(s)?;
        self.validate_limits(s)
    }

    /// Durations: each within its bounds, and those that must agree with another.
    fn validate_durations(&self, s: &Sources) -> Result<(), ConfigError> {
        let at_least = |key: &str, d: Duration, min: Duration, reason: String| {
            s.rule(d >= min, key, fmt_dur(d), reason)
        };
        let nonzero = |key: &str, d: Duration| {
            at_least(
                key,
                d,
                Duration::from_nanos(1),
                "must be greater than 0".into(),
            )
        };
        let c = &self.cluster;
        s.rule(
            c.stale_critical >= c.stale_warning,
            "STALE_CRITICAL",
            fmt_dur(c.stale_critical),
            format!(
                "must not be below STALE_WARNING ({})",
                fmt_dur(c.stale_warning)
            ),
        )?;
        at_least(
            "MQTT_KEEP_ALIVE",
            self.node.mqtt_keep_alive,
            Duration::from_secs(1),
            "must be at least 1s".into(),
        )?;
        nonzero("REDELIVERY_WINDOW", c.redelivery_window)?;
        s.rule(
            c.redelivery_window <= 7 * DAY,
            "REDELIVERY_WINDOW",
            fmt_dur(c.redelivery_window),
            "must be at most 7d (a broker keeps a session's in-flight messages no longer than its persistent_client_expiration)",
        )?;
        nonzero("ALERT_CHECK_INTERVAL", c.alert_check_interval)?;
        nonzero("ALERT_WINDOW", c.alert_window)?;
        let r = c.retention();
        for (key, d, judged_in_window) in [
            ("DEAD_LETTER_RETENTION", r.dead_letters, true),
            ("ALERT_RETENTION", r.alerts, false),
            ("LEASE_HISTORY_RETENTION", r.lease_history, true),
            ("CLUSTER_NODE_RETENTION", r.cluster_nodes, false),
        ] {
            let reason = format!("must be at least {}", fmt_dur(MIN_RETENTION));
            at_least(key, d, MIN_RETENTION, reason)?;
            if judged_in_window {
                let reason = format!(
                    "must be at least ALERT_WINDOW ({}): alerts count these rows within it",
                    fmt_dur(c.alert_window)
                );
                at_least(key, d, c.alert_window, reason)?;
            }
        }
        if let Some(d) = r.telemetry {
            let reason = format!(
                "must be at least {} (readings are removed a day partition at a time)",
                fmt_dur(MIN_TELEMETRY_RETENTION)
            );
            at_least("TELEMETRY_RETENTION", d, MIN_TELEMETRY_RETENTION, reason)?;
            s.rule(
                d <= 36_500 * DAY,
                "TELEMETRY_RETENTION",
                fmt_dur(d),
                "must be at most 100y (unset keeps every reading)",
            )?;
        }
        nonzero("RETENTION_INTERVAL", r.interval)
    }

    /// What a leader holds at once: batch rows, pending messages and their bytes.
    fn validate_limits(&self, s: &Sources) -> Result<(), ConfigError> {
        let (rows, pending) = (self.cluster.batch_max_rows, self.max_pending);
        s.rule(
            rows <= 100_000,
            "BATCH_MAX_ROWS",
            rows,
            "must be at most 100000",
        )?;
        s.rule(
            pending <= 50_000,
            "MAX_PENDING",
            pending,
            "must be at most 50000: MQTT packet ids are 16 bits and must not wrap while messages are held",
        )?;
        s.rule(
            pending >= rows,
            "MAX_PENDING",
            pending,
            format!("must be at least BATCH_MAX_ROWS ({rows})"),
        )?;
        let (bytes, payload) = (self.max_pending_bytes, self.cluster.max_payload_bytes);
        s.rule(
            bytes <= MAX_PENDING_BYTES_LIMIT,
            "MAX_PENDING_BYTES",
            bytes,
            format!("must be at most {}MiB", MAX_PENDING_BYTES_LIMIT >> 20),
        )?;
        s.rule(
            bytes >= payload,
            "MAX_PENDING_BYTES",
            bytes,
            format!("must be at least MAX_PAYLOAD_BYTES ({payload} bytes): one message of the largest accepted size must fit"),
        )
    }
}

/// The broker's TLS files: readable, only with a TLS URL, and a client certificate with its key.
fn validate_tls_files(ep: &MqttEndpoint, s: &Sources) -> Result<(), ConfigError> {
    let files = [
        ("MQTT_CA_FILE", &ep.ca_file),
        ("MQTT_CLIENT_CERT", &ep.client_cert),
        ("MQTT_CLIENT_KEY", &ep.client_key),
    ];
    for (key, path) in files {
        let Some(path) = path else { continue };
        let invalid = |reason: String| s.invalid(key, path.display(), reason);
        if !ep.tls {
            return Err(invalid(
                "TLS files need a TLS broker URL: set MQTT_URL=mqtts://host:8883".into(),
            ));
        }
        std::fs::File::open(path).map_err(|e| invalid(format!("cannot read the file: {e}")))?;
    }
    if let (Some(path), None) | (None, Some(path)) = (&ep.client_cert, &ep.client_key) {
        let (key, other) = match ep.client_cert {
            Some(_) => ("MQTT_CLIENT_CERT", "MQTT_CLIENT_KEY"),
            None => ("MQTT_CLIENT_KEY", "MQTT_CLIENT_CERT"),
        };
        return Err(s.invalid(key, path.display(), format!("a client certificate needs both MQTT_CLIENT_CERT and MQTT_CLIENT_KEY; {other} is not set")));
    }
    Ok(())
}

/// The broker: `MQTT_URL`, then the settings that override its parts.
fn endpoint(s: &Sources, m: &NodeSettings) -> Result<MqttEndpoint, ConfigError> {
    let mut ep = MqttEndpoint {
        host: "127.0.0.1".into(),
        port: 1883,
        tls: false,
        username: None,
        password: None,
        ca_file: m.mqtt_ca_file.as_ref().map(Into::into),
        client_cert: m.mqtt_client_cert.as_ref().map(Into::into),
        client_key: m.mqtt_client_key.as_ref().map(Into::into),
    };
    if let Some(url) = m.mqtt_url.as_deref() {
        let invalid = |reason: &str| s.invalid("MQTT_URL", redact_url(url), reason.into());
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
    if let Some(h) = &m.mqtt_host {
        ep.host = h.clone();
    }
    ep.port = m.mqtt_port.unwrap_or(ep.port);
    if m.mqtt_username.is_some() {
        ep.username = m.mqtt_username.clone();
    }
    if let Some(p) = &m.mqtt_password {
        ep.password = Some(p.expose().to_string());
    }
    Ok(ep)
}
