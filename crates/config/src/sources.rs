//! The layers (file < environment < flags), merged by `figment`. Each value keeps the name of the
//! layer it came from, so any error can say where a bad value was set.

use std::fmt;
use std::path::Path;

use figment::value::{Dict, Empty, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use crate::routes::{self, RawRoutes, RouteSpec};
use crate::settings::{self, in_section, ClusterValues, NodeSettings};
use crate::ClusterSettings;
use crate::FormatSpec;
use crate::{redact, shown_secret, ConfigError, Origin};

/// The merged layers before parsing.
#[derive(Clone)]
pub struct Sources {
    figment: Figment,
    /// `[[routes]]` of the file, kept apart: figment's tables would lose the columns' order, and
    /// routes have no environment or flag form.
    routes: Option<RawRoutes>,
    /// `[[formats]]` of the file (no environment or flag form either).
    formats: Option<Vec<FormatSpec>>,
}

/// Raw values hold the secrets in clear: shown only as `shown_secret` shows them.
impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = crate::KEYS.iter().filter_map(|key| {
            let (v, origin) = self.raw(key)?;
            Some((key, (shown_secret(key, &v), origin)))
        });
        f.debug_map().entries(set).finish()
    }
}

impl Sources {
    /// Layers the TOML file (if any), then the process environment, then `flags`.
    pub fn gather(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::new();
        let (mut routes, mut formats) = (None, None);
        if let Some(path) = file {
            let (layer, raw, f) = file_layer(path)?;
            figment = figment.merge(layer);
            (routes, formats) = (raw, f);
        }
        let env = env
            .into_iter()
            .filter(|(k, _)| crate::KEYS.contains(k))
            .map(|(k, v)| (k.to_lowercase(), v));
        figment = figment.merge(Layer::new(Origin::Env, env));
        let mut named = Vec::new();
        for (k, v) in flags {
            let key = k.to_uppercase().replace('-', "_");
            if !crate::KEYS.contains(&key) {
                return Err(ConfigError::Unknown {
                    key: redact(&k),
                    origin: Origin::Flag,
                });
            }
            named.push((key.to_lowercase(), v));
        }
        Ok(Sources {
            figment: figment.merge(Layer::new(Origin::Flag, named)),
            routes,
            formats,
        })
    }

    /// A TOML document alone (no environment, no flags): what `config apply` reads, and what a
    /// cluster configuration is stored as.
    pub fn from_toml(text: &str, origin: Origin) -> Result<Self, ConfigError> {
        let (layer, routes, formats) = text_layer(text, origin)?;
        Ok(Sources {
            figment: Figment::new().merge(layer),
            routes,
            formats,
        })
    }

    /// The cluster settings these layers set (not their defaults), and their `[[routes]]`.
    pub fn cluster(&self) -> ClusterSettings {
        let values = crate::CLUSTER_SETTINGS
            .iter()
            .filter_map(|key| {
                let (text, origin) = self.raw(key)?;
                (origin != Origin::Default).then_some((*key, text))
            })
            .collect();
        ClusterSettings {
            values,
            routes: self.routes.clone(),
            formats: self.formats.clone(),
        }
    }

    /// The node settings these layers set, with where (what `config apply` refuses).
    pub fn node_settings_set(&self) -> Vec<(&'static str, Origin)> {
        crate::KEYS
            .iter()
            .filter(|k| !crate::is_cluster_setting(k))
            .filter_map(|k| Some((k, self.raw(k)?.1)))
            .filter(|(_, origin)| *origin != Origin::Default)
            .collect()
    }

    /// These layers' node settings with `cluster`'s cluster settings over them: every cluster
    /// setting `cluster` leaves unset is its default, whatever a file, the environment or a flag
    /// of this host says.
    pub fn with_cluster(&self, cluster: &ClusterSettings, origin: Origin) -> Sources {
        let values = crate::CLUSTER_SETTINGS.iter().map(|key| {
            let text = cluster.values.get(key).cloned().unwrap_or_default();
            (key.to_lowercase(), text)
        });
        Sources {
            figment: self.figment.clone().merge(Layer::new(origin, values)),
            routes: cluster.routes.clone(),
            formats: cluster.formats.clone(),
        }
    }

    /// Whether these layers have a `[[routes]]` list (an empty one included).
    pub(crate) fn has_routes(&self) -> bool {
        self.routes.is_some()
    }

    /// Whether these layers have a `[[formats]]` list.
    pub(crate) fn has_formats(&self) -> bool {
        self.formats.is_some()
    }

    /// `[[formats]]`, checked.
    pub(crate) fn formats(&self) -> &[FormatSpec] {
        self.formats.as_deref().unwrap_or_default()
    }

    /// The file's `[[routes]]`, parsed (their rules between fields are checked by `validate`).
    pub(crate) fn routes(&self) -> Result<Vec<RouteSpec>, ConfigError> {
        self.routes.as_ref().map_or(Ok(Vec::new()), routes::parse)
    }

    /// Both structures, or the first bad value as a one-line error naming its setting.
    pub(crate) fn settings(&self) -> Result<(NodeSettings, ClusterValues), ConfigError> {
        let set = |keys: &[&'static str]| -> Vec<(String, String)> {
            keys.iter()
                .filter_map(|k| Some((k.to_lowercase(), self.raw(k)?.0)))
                .collect()
        };
        let refused = |(field, reason): (String, String)| {
            let key = field.to_uppercase();
            let value = self
                .raw(&key)
                .map_or_else(String::new, |(v, _)| shown_secret(&key, &v));
            ConfigError::Invalid {
                origin: self.origin(&field),
                key,
                value,
                reason,
            }
        };
        let node = settings::read(set(&crate::settings::NODE_SETTINGS)).map_err(refused)?;
        let cluster = settings::read(set(&crate::CLUSTER_SETTINGS)).map_err(refused)?;
        Ok((node, cluster))
    }

    /// The raw text of the setting named `key` and where it was set, if it was.
    pub(crate) fn raw(&self, key: &str) -> Option<(String, Origin)> {
        let path = key.to_lowercase();
        let value = self.figment.find_value(&path).ok()?;
        let text = match &value {
            Value::Empty(..) => return None,
            Value::Array(_, items) => items.iter().map(show).collect::<Vec<_>>().join(","),
            other => show(other),
        };
        Some((text, self.origin(&path)))
    }

    /// Where the setting at `path` was set.
    fn origin(&self, path: &str) -> Origin {
        self.figment
            .find_metadata(path)
            .map_or(Origin::Default, origin_of)
    }

    /// A rule: `Ok` when `ok` holds, else `value` of `key` is refused for `reason`.
    pub(crate) fn rule(
        &self,
        ok: bool,
        key: &str,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Result<(), ConfigError> {
        match ok {
            true => Ok(()),
            false => Err(self.invalid(key, value, reason.into())),
        }
    }

    /// A value of `key` that parsed but breaks a rule: names the setting and where it was set.
    pub(crate) fn invalid(
        &self,
        key: &str,
        value: impl fmt::Display,
        reason: String,
    ) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            value: shown_secret(key, &value.to_string()),
            origin: self.origin(&key.to_lowercase()),
            reason,
        }
    }
}

/// A scalar as the text a variable would hold.
fn show(v: &Value) -> String {
    match v {
        Value::String(_, s) => s.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => n
            .to_u128()
            .map(|n| n.to_string())
            .or_else(|| n.to_i128().map(|n| n.to_string()))
            .or_else(|| n.to_f64().map(|n| format!("{n:?}")))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

fn origin_of(md: &Metadata) -> Origin {
    match &md.source {
        Some(figment::Source::File(p)) => Origin::File(p.display().to_string()),
        _ if md.name.starts_with(crate::CLUSTER_ORIGIN) => {
            Origin::Cluster(md.name[crate::CLUSTER_ORIGIN.len()..].to_string())
        }
        _ if md.name == Origin::Flag.to_string() => Origin::Flag,
        _ if md.name == Origin::Env.to_string() => Origin::Env,
        _ => Origin::Default,
    }
}

/// One layer's values at their nested paths.
struct Layer {
    origin: Origin,
    data: Dict,
}

impl Layer {
    /// Values by lower-case key (environment, flags); an empty value unsets the setting.
    fn new(origin: Origin, values: impl IntoIterator<Item = (String, String)>) -> Self {
        let data = values.into_iter().map(|(k, v)| (k, Value::from(v)));
        Layer {
            origin,
            data: normalized(data.collect()),
        }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        let md = Metadata::named(self.origin.to_string());
        match &self.origin {
            Origin::File(p) => md.source(figment::Source::File(p.into())),
            _ => md,
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.data.clone())]))
    }
}

/// A config file: flat keys (`lease_ttl = "10s"`, the environment names in lower case) are moved to
/// their place in the structure; sections (`[lease]`) and lists of tables are taken as they are.
fn file_layer(path: &Path) -> Result<Document, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    text_layer(&text, Origin::File(shown))
}

/// A TOML document as a layer: a config file's, or a stored cluster configuration's.
/// A TOML document: its settings as a layer, its `[[routes]]` and its `[[formats]]`.
type Document = (Layer, Option<RawRoutes>, Option<Vec<FormatSpec>>);

fn text_layer(text: &str, origin: Origin) -> Result<Document, ConfigError> {
    let shown = match &origin {
        Origin::File(p) => p.clone(),
        other => other.to_string(),
    };
    let refused = |reason: String| ConfigError::File {
        path: shown.clone(),
        reason,
    };
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| refused(e.message().to_string()))?;
    let value = |v: toml::Value| Value::serialize(v).map_err(|e| refused(e.to_string()));
    let routes = routes::take_raw(&mut table, text, &shown)?;
    let formats = crate::formats::take(&mut table, &shown)?;
    let mut data = Dict::new();
    let mut put = |key: &str, v: toml::Value, written: String| -> Result<(), ConfigError> {
        if v.is_table() {
            return Err(refused(format!("{written} must be a value, not a table")));
        }
        let key = key.to_lowercase();
        // Both forms for one setting: which one was meant cannot be guessed.
        if data.contains_key(&key) {
            let upper = key.to_uppercase();
            let twice = format!("{upper} is set twice, as `{key}` and in its section; keep one");
            return Err(refused(twice));
        }
        data.insert(key, value(v)?);
        Ok(())
    };
    for (k, v) in table {
        let upper = k.to_uppercase();
        if crate::KEYS.contains(&upper) {
            put(&upper, v, k)?;
        } else if let toml::Value::Table(section) = v {
            for (sk, sv) in section {
                let written = format!("{k}.{sk}");
                match in_section(&k, &sk) {
                    Some(key) => put(key, sv, written)?,
                    None => {
                        return Err(ConfigError::Unknown {
                            key: written,
                            origin,
                        })
                    }
                }
            }
        } else {
            return Err(ConfigError::Unknown { key: k, origin });
        }
    }
    let layer = Layer {
        origin,
        data: normalized(data),
    };
    Ok((layer, routes, formats))
}

/// Strings trimmed, and empty ones made "unset" (so an empty variable overrides a file's value
/// with the default, as it always has).
fn normalized(dict: Dict) -> Dict {
    fn norm(v: Value) -> Value {
        match v {
            Value::String(tag, s) if s.trim().is_empty() => Value::Empty(tag, Empty::None),
            Value::String(tag, s) => Value::String(tag, s.trim().to_string()),
            Value::Dict(tag, d) => Value::Dict(tag, normalized(d)),
            Value::Array(tag, items) => Value::Array(tag, items.into_iter().map(norm).collect()),
            other => other,
        }
    }
    dict.into_iter().map(|(k, v)| (k, norm(v))).collect()
}
