//! Cluster settings and node settings.
//!
//! A **cluster setting** decides what a message becomes: which filters are subscribed, how a
//! payload is read, where it is written, when alerts fire, what is pruned. Two nodes that
//! disagreed on one would store different things depending on which of them leads, so cluster
//! settings live in the database as numbered versions (`leasehold config apply`), the same for
//! every node. A **node setting** is how one host reaches the database and the broker, its name,
//! mode, HTTP address, logging and resources; it stays in that host's file, environment or flags.
//!
//! [`ClusterSettings`] is the stored form: the cluster settings a document sets (unset ones are
//! their defaults) and its `[[routes]]`, written as canonical TOML.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::routes::RawRoutes;
use crate::{shown_secret, Config, Origin, Sources, CLUSTER_SETTINGS};

/// The cluster settings one document sets, as their text, and its `[[routes]]`.
#[derive(Clone, Default)]
pub struct ClusterSettings {
    pub(crate) values: BTreeMap<&'static str, String>,
    pub(crate) routes: Option<RawRoutes>,
    pub(crate) formats: Option<Vec<crate::FormatSpec>>,
}

/// Holds the webhook URL in clear: shown only through [`ClusterSettings::to_shown_toml`].
impl std::fmt::Debug for ClusterSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_shown_toml())
    }
}

impl ClusterSettings {
    /// Reads a stored configuration (or a file given to `config apply`) that holds only cluster
    /// settings; a node setting in it is refused, naming it.
    pub fn parse(text: &str, origin: Origin) -> Result<ClusterSettings, crate::ConfigError> {
        let sources = Sources::from_toml(text, origin.clone())?;
        if let Some((key, _)) = sources.node_settings_set().into_iter().next() {
            return Err(node_setting_refused(key, &origin));
        }
        Ok(sources.cluster())
    }

    /// The canonical TOML, secrets in clear: what the database stores. Settings in the order
    /// of [`CLUSTER_SETTINGS`], then each route with its columns in their order.
    pub fn to_toml(&self) -> String {
        self.write(|_, v| v.to_string())
    }

    /// The canonical TOML with secrets masked: what `config show` prints.
    pub fn to_shown_toml(&self) -> String {
        self.write(shown_secret)
    }

    fn write(&self, show: impl Fn(&str, &str) -> String) -> String {
        let mut out = String::new();
        for key in CLUSTER_SETTINGS.iter() {
            if let Some(v) = self.values.get(key) {
                let _ = writeln!(
                    out,
                    "{} = {}",
                    key.to_lowercase(),
                    toml::Value::String(show(key, v))
                );
            }
        }
        for route in self.routes.iter().flat_map(|r| &r.routes) {
            out.push_str("\n[[routes]]\n");
            out.push_str(&toml::to_string(&route.fields).unwrap_or_default());
            if !route.columns.is_empty() {
                out.push_str("\n[routes.columns]\n");
                for (name, v) in &route.columns {
                    let _ = writeln!(out, "{} = {v}", toml::Value::String(name.clone()));
                }
            }
        }
        out.push_str(&crate::formats::to_toml(
            self.formats.as_deref().unwrap_or_default(),
        ));
        out
    }

    /// These settings over the defaults alone (no host's node settings): what `config show`,
    /// `diff` and `history` compare.
    pub fn effective(&self, origin: Origin) -> Result<Config, crate::ConfigError> {
        let none = Sources::gather(None, Vec::new(), Vec::new())?;
        Config::load(&none.with_cluster(self, origin))
    }

    /// The text of setting `key`, if this document sets it.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Sets `key` (a cluster setting) to `value`.
    pub fn set(&mut self, key: &str, value: String) {
        if let Some(k) = CLUSTER_SETTINGS.iter().find(|k| **k == key) {
            self.values.insert(k, value);
        }
    }

    /// Only the setting `key` of these (for checking one setting at a time).
    pub fn only(&self, key: &str) -> ClusterSettings {
        ClusterSettings {
            values: self
                .values
                .iter()
                .filter(|(k, _)| **k == key)
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            routes: None,
            formats: None,
        }
    }

    /// The settings this document sets, by environment name, in the order of [`CLUSTER_SETTINGS`].
    pub fn keys(&self) -> impl Iterator<Item = &'static str> + '_ {
        CLUSTER_SETTINGS
            .iter()
            .copied()
            .filter(|k| self.values.contains_key(k))
    }

    /// Whether it has a `[[routes]]` list.
    pub fn has_routes(&self) -> bool {
        self.routes.is_some()
    }
}

/// How a stored version is named where its values are refused.
pub fn version_origin(version: i64) -> Origin {
    Origin::Cluster(format!("version {version}"))
}

/// The one-line refusal of a node setting where only cluster settings belong.
pub fn node_setting_refused(key: &str, origin: &Origin) -> crate::ConfigError {
    crate::ConfigError::NodeSetting {
        key: key.into(),
        origin: origin.clone(),
    }
}

/// A cluster setting a node was given (file, environment or flag) that the active cluster
/// configuration overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub setting: String,
    /// What this node's own file, environment or flags say (secrets masked).
    pub here: String,
    /// What the cluster runs (secrets masked).
    pub active: String,
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} here but {} in the cluster's configuration (ignored here)",
            self.setting, self.here, self.active
        )
    }
}

impl Config {
    /// This host's node settings with the cluster settings of `cluster` over them: what the
    /// node runs. Errors name the setting and `origin` (the stored version, or a file).
    pub fn with_cluster(
        &self,
        cluster: &ClusterSettings,
        origin: Origin,
    ) -> Result<Config, crate::ConfigError> {
        Config::load(&self.sources.with_cluster(cluster, origin))
    }

    /// The cluster settings this host's own file, environment and flags set (what a first start
    /// imports as version 1).
    pub fn own_cluster_settings(&self) -> ClusterSettings {
        self.sources.cluster()
    }

    /// Where this host's own cluster settings differ from those of `active`, which it runs.
    pub fn drift(&self, active: &Config) -> Vec<Drift> {
        drift(&self.sources, self, active)
    }

    /// The layers this configuration was loaded from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Every cluster setting's effective value as text (secrets masked), in the order of
    /// [`CLUSTER_SETTINGS`]: what `config show --json`, `config diff` and drift compare.
    pub fn cluster_values(&self) -> Vec<(&'static str, String)> {
        self.cluster_values_as(true)
    }

    /// Every cluster setting's effective value, secrets as they are (for comparing only): each
    /// field of [`ClusterValues`] written back as its text.
    fn cluster_values_as(&self, masked: bool) -> Vec<(&'static str, String)> {
        let mut texts = crate::settings::texts(&self.cluster);
        CLUSTER_SETTINGS
            .iter()
            .map(|key| {
                let text = texts.remove(*key).unwrap_or_default();
                let text = match *key {
                    // A set: order and repeats do not change what is subscribed.
                    "MQTT_TOPICS" => {
                        let mut t: Vec<&str> = self
                            .cluster
                            .mqtt_topics
                            .iter()
                            .map(String::as_str)
                            .collect();
                        t.sort_unstable();
                        t.dedup();
                        t.join(",")
                    }
                    _ if masked && !text.is_empty() => shown_secret(key, &text),
                    _ => text,
                };
                (*key, text)
            })
            .collect()
    }

    /// What changes from `self` to `after`: one line per setting and per route.
    pub fn changes(&self, after: &Config) -> Vec<String> {
        let mut out = Vec::new();
        for ((key, _), (_, shown_a, shown_b)) in differing(self, after) {
            out.push(match shown_a == shown_b {
                // Only a secret part differs (a webhook's token): said, not shown.
                true => format!("{key}: changed (a secret: not shown)"),
                false => format!("{key}: {} -> {}", shown(&shown_a), shown(&shown_b)),
            });
        }
        for r in &self.routes {
            out.extend(match after.routes.iter().find(|n| n.name == r.name) {
                None => Some(format!("route {:?} removed", r.name)),
                Some(n) => (n != r).then(|| format!("route {:?} changed", r.name)),
            });
        }
        for n in &after.routes {
            if !self.routes.iter().any(|r| r.name == n.name) {
                out.push(format!("route {:?} added", n.name));
            }
        }
        if self.formats != after.formats {
            out.push("formats changed".into());
        }
        let names = |c: &Config| c.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        if out.is_empty() && names(self) != names(after) {
            out.push("routes reordered".into());
        }
        out
    }
}

/// The cluster settings whose values differ between `a` and `b` (secrets compared in full): each
/// key with both raw values, then both as shown.
#[allow(clippy::type_complexity)]
fn differing(a: &Config, b: &Config) -> Vec<((&'static str, String), (String, String, String))> {
    a.cluster_values_as(false)
        .into_iter()
        .zip(b.cluster_values_as(false))
        .zip(a.cluster_values().into_iter().zip(b.cluster_values()))
        .filter(|(((_, ra), (_, rb)), _)| ra != rb)
        .map(|(((key, ra), (_, rb)), ((_, sa), (_, sb)))| ((key, ra), (rb, sa, sb)))
        .collect()
}

fn shown(v: &str) -> String {
    if v.is_empty() {
        "(unset)".into()
    } else {
        v.to_string()
    }
}

/// The cluster settings `own` (this node's file, environment and flags, loaded as `own_cfg`)
/// sets that differ from the configuration it runs (`active`): each named once.
pub fn drift(own: &Sources, own_cfg: &Config, active: &Config) -> Vec<Drift> {
    let set: Vec<&str> = own.cluster().keys().collect();
    let mut out: Vec<Drift> = differing(own_cfg, active)
        .into_iter()
        .filter(|((key, _), _)| set.contains(key))
        .map(|((key, _), (_, here, there))| Drift {
            setting: key.to_string(),
            here: shown(&here),
            active: shown(&there),
        })
        .collect();
    if own.has_formats() && own_cfg.formats != active.formats {
        let list = |c: &Config| {
            let f: Vec<String> = c
                .formats
                .iter()
                .map(|f| {
                    let pattern = f
                        .device_topic_pattern
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default();
                    format!("{} {}{pattern}", f.topics.join(","), f.format.as_str())
                })
                .collect();
            format!("[{}]", f.join("; "))
        };
        out.push(Drift {
            setting: "formats".into(),
            here: list(own_cfg),
            active: list(active),
        });
    }
    if own.has_routes() && own_cfg.routes != active.routes {
        let names = |c: &Config| {
            let n: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
            format!("[{}]", n.join(", "))
        };
        out.push(Drift {
            setting: "routes".into(),
            here: names(own_cfg),
            active: names(active),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(toml: &str, env: &[(&str, &str)]) -> Sources {
        let path = crate::tests::file(toml);
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Sources::gather(Some(&path), env, Vec::new()).expect("sources")
    }

    const ROUTES: &str = r#"
mqtt_topics = ["devices/+/telemetry", "extra/+/data"]
[stale]
warning = "2m"
[[routes]]
name = "plant"
topics = ["plant/+/data"]
table = "plant_readings"
key = ["device", "ts"]
[routes.columns]
ts = "timestamp"
device = "topic[1]"
"weird name" = "$.a.b"
temp = "$.temp"
"#;

    #[test]
    fn the_stored_form_reads_back_to_the_same_configuration() {
        let s = sources(ROUTES, &[("LEASE_TTL", "9s"), ("BATCH_MAX_ROWS", "300")]);
        let cluster = s.cluster();
        assert_eq!(
            cluster.keys().collect::<Vec<_>>(),
            ["MQTT_TOPICS", "BATCH_MAX_ROWS", "STALE_WARNING"]
        );
        let text = cluster.to_toml();
        let again = ClusterSettings::parse(&text, Origin::Cluster("version 1".into()))
            .expect("stored form parses");
        assert_eq!(
            again.to_toml(),
            text,
            "canonical: a second round is identical"
        );
        let a = Config::load(&s).expect("load");
        let none = Sources::gather(None, Vec::new(), Vec::new()).expect("empty");
        let b = Config::load(&none.with_cluster(&again, Origin::Cluster("version 1".into())))
            .expect("load stored");
        assert_eq!(a.cluster_values(), b.cluster_values());
        assert_eq!(a.routes, b.routes, "columns keep their order");
        assert_eq!(
            a.routes[0]
                .columns
                .iter()
                .map(|c| c.0.as_str())
                .collect::<Vec<_>>(),
            ["ts", "device", "weird name", "temp"]
        );
    }

    #[test]
    fn a_node_setting_is_refused_where_only_cluster_settings_belong() {
        let e = ClusterSettings::parse(
            "mqtt_topics = \"a/#\"\ndatabase_url = \"postgres://u:secret@h/db\"\n",
            Origin::File("x.toml".into()),
        )
        .expect_err("refused");
        let line = e.to_string();
        assert!(
            line.contains("DATABASE_URL") && line.contains("node setting"),
            "{line}"
        );
        assert!(!line.contains("secret"), "{line}");
    }

    #[test]
    fn the_cluster_version_overrides_this_hosts_cluster_settings_and_keeps_its_node_settings() {
        let own = sources(
            "mqtt_topics = \"mine/#\"\nlease_ttl = \"12s\"\n",
            &[("STALE_WARNING", "1m")],
        );
        let stored = ClusterSettings::parse(
            "mqtt_topics = \"theirs/#\"\n",
            Origin::Cluster("version 4".into()),
        )
        .expect("parse");
        let cfg = Config::load(&own.with_cluster(&stored, Origin::Cluster("version 4".into())))
            .expect("load");
        assert_eq!(cfg.cluster.mqtt_topics, ["theirs/#"]);
        assert_eq!(
            cfg.cluster.stale_warning,
            std::time::Duration::from_secs(300),
            "unset: the default, not this host's"
        );
        assert_eq!(
            cfg.lease.ttl,
            std::time::Duration::from_secs(12),
            "node setting kept"
        );
        let own_cfg = Config::load(&own).expect("own");
        let d = drift(&own, &own_cfg, &cfg);
        let names: Vec<&str> = d.iter().map(|d| d.setting.as_str()).collect();
        assert_eq!(names, ["MQTT_TOPICS", "STALE_WARNING"]);
        assert!(d[0].to_string().contains("mine/#") && d[0].to_string().contains("theirs/#"));
    }

    #[test]
    fn an_equal_value_written_differently_is_not_drift() {
        let own = sources("stale_warning = \"300s\"\n", &[]);
        let stored =
            ClusterSettings::parse("stale_warning = \"5m\"\n", Origin::Cluster("v".into()))
                .expect("parse");
        let active =
            Config::load(&own.with_cluster(&stored, Origin::Cluster("v".into()))).expect("load");
        let own_cfg = Config::load(&own).expect("own");
        assert!(drift(&own, &own_cfg, &active).is_empty());
    }

    #[test]
    fn a_stored_bad_value_names_the_setting_and_the_version() {
        let own = sources("", &[]);
        let stored = ClusterSettings::parse(
            "batch_max_rows = \"many\"\n",
            Origin::Cluster("version 7".into()),
        )
        .expect("parse keeps text");
        let e = Config::load(&own.with_cluster(&stored, Origin::Cluster("version 7".into())))
            .expect_err("refused");
        let line = e.to_string();
        assert!(
            line.contains("BATCH_MAX_ROWS") && line.contains("cluster configuration version 7"),
            "{line}"
        );
    }

    #[test]
    fn changes_name_each_setting_and_route() {
        let a = Config::load(&sources(ROUTES, &[])).expect("a");
        let b = Config::load(&sources("mqtt_topics = \"devices/+/telemetry\"\n", &[])).expect("b");
        let c = a.changes(&b);
        assert!(
            c.iter().any(|l| l.starts_with(
                "MQTT_TOPICS: devices/+/telemetry,extra/+/data -> devices/+/telemetry"
            )),
            "{c:?}"
        );
        assert!(
            c.iter().any(|l| l.starts_with("STALE_WARNING: 2m -> 5m")),
            "{c:?}"
        );
        assert!(c.contains(&"route \"plant\" removed".to_string()), "{c:?}");
        assert!(b.changes(&a).contains(&"route \"plant\" added".to_string()));
        assert!(a.changes(&a).is_empty());
    }

    #[test]
    fn every_cluster_setting_is_a_setting_and_rendered_once_in_order() {
        let cfg = Config::load(&sources("", &[])).expect("defaults");
        let rendered: Vec<&str> = cfg.cluster_values().iter().map(|(k, _)| *k).collect();
        assert_eq!(rendered, *CLUSTER_SETTINGS);
        for key in CLUSTER_SETTINGS.iter() {
            assert!(crate::KEYS.contains(key), "{key} is not a setting");
        }
        let docs = include_str!("../../../docs/configuration.md");
        let cluster_table = docs
            .split("### Cluster settings")
            .nth(1)
            .and_then(|t| t.split("## ").next())
            .expect("docs/configuration.md has a cluster settings table");
        let node_table = docs
            .split("### Node settings")
            .nth(1)
            .and_then(|t| t.split("### Cluster settings").next())
            .expect("docs/configuration.md has a node settings table");
        for key in crate::KEYS.iter() {
            let row = format!("`{key}`");
            let (want, other) = match crate::is_cluster_setting(key) {
                true => (cluster_table, node_table),
                false => (node_table, cluster_table),
            };
            assert!(
                want.contains(&row),
                "{key} is missing from its table in docs/configuration.md"
            );
            assert!(
                !other.contains(&format!("| {row}")),
                "{key} is in the wrong table of docs/configuration.md"
            );
        }
    }

    #[test]
    fn secrets_are_masked_where_shown_and_kept_where_stored() {
        let s = sources(
            "alert_webhook_url = \"https://hooks.example/x?token=abc123\"\n",
            &[],
        );
        let c = s.cluster();
        assert!(c.to_toml().contains("abc123"));
        assert!(
            !c.to_shown_toml().contains("abc123"),
            "{}",
            c.to_shown_toml()
        );
        assert!(!format!("{c:?}").contains("abc123"));
        let cfg = Config::load(&s).expect("load");
        assert!(!format!("{:?}", cfg.cluster_values()).contains("abc123"));
    }
}
#[cfg(test)]
mod webhook_tests {
    use super::*;

    fn cfg(toml: &str) -> Config {
        ClusterSettings::parse(toml, Origin::File("x".into()))
            .expect("parse")
            .effective(Origin::File("x".into()))
            .expect("load")
    }

    #[test]
    fn a_changed_token_is_a_change_never_shown() {
        let a = cfg("alert_webhook_url = \"https://hooks.example/services/T0/B0/TOKENAAA\"\n");
        let b = cfg("alert_webhook_url = \"https://hooks.example/services/T0/B0/TOKENBBB\"\n");
        let c = a.changes(&b);
        assert_eq!(c, ["ALERT_WEBHOOK_URL: changed (a secret: not shown)"]);
    }

    #[test]
    fn a_webhook_that_is_no_url_is_refused_without_its_text() {
        let e = ClusterSettings::parse(
            "alert_webhook_url = \"hooks.example/T0/TOKENCCC\"\n",
            Origin::File("x".into()),
        )
        .expect("parse")
        .effective(Origin::File("x".into()))
        .expect_err("refused")
        .to_string();
        assert!(
            e.contains("ALERT_WEBHOOK_URL") && !e.contains("TOKENCCC"),
            "{e}"
        );
    }
}
