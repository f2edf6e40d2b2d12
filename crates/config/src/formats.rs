//! `[[formats]]`: how the payloads of some topic filters are read. A topic matching no entry is
//! `json`; the first entry (in file order) whose filters match a topic decides.

use serde::{Deserialize, Serialize};

use crate::{validate_filter, ConfigError};

crate::named! {
    /// How a payload becomes readings. One more format plugs in here and in `leasehold-decode`'s
    /// `formats`, nowhere else.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Format {
        /// A JSON object is one reading; an array of objects, one reading per element.
        Json = "json",
        /// The payload is one value (a JSON scalar or bare UTF-8 text): `{"value": ...}`.
        Value = "value",
        /// An RFC 8428 SenML pack: one reading per device and instant.
        Senml = "senml",
        /// Sparkplug B: protobuf, metrics named by the edge node's births (read in order by the
        /// leader, which keeps the births in the database).
        SparkplugB = "sparkplug_b",
    }
}

/// One `[[formats]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatSpec {
    /// MQTT filters whose topics' payloads are read this way.
    pub topics: Vec<String>,
    pub format: Format,
    /// Where the device id sits in these topics, when not where `DEVICE_TOPIC_PATTERN` says
    /// (`stat/{device_id}/POWER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_topic_pattern: Option<String>,
}

/// Takes `[[formats]]` out of a TOML document (it has no environment or flag form).
pub(crate) fn take(
    table: &mut toml::Table,
    path: &str,
) -> Result<Option<Vec<FormatSpec>>, ConfigError> {
    let Some(value) = table.remove("formats") else {
        return Ok(None);
    };
    let err = |entry: String, message: String| ConfigError::Format { entry, message };
    let toml::Value::Array(items) = value else {
        return Err(err(
            "formats".into(),
            format!("must be a list of tables, written [[formats]] (in {path})"),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let entry = format!("formats[{}]", i + 1);
        let spec: FormatSpec = item.try_into().map_err(|e: toml::de::Error| {
            let m = e.message().replace(
                "unknown variant",
                "unknown format; `format` must be json, value, senml or sparkplug_b, got",
            );
            err(entry.clone(), m)
        })?;
        if spec.topics.is_empty() {
            return Err(err(entry, "topics must name at least one filter".into()));
        }
        if let Some(p) = &spec.device_topic_pattern {
            if !p.split('/').any(|seg| seg == "{device_id}") {
                return Err(err(
                    entry,
                    format!("device_topic_pattern {p:?} must contain a {{device_id}} segment, e.g. stat/{{device_id}}/POWER"),
                ));
            }
        }
        if let Some(t) = spec.topics.iter().find(|t| {
            spec.format == Format::SparkplugB
                && !matches!(t.split('/').next(), Some("spBv1.0" | "+" | "#"))
        }) {
            return Err(err(
                entry,
                format!("topic {t:?} is read as sparkplug_b but is not in the Sparkplug B namespace: use spBv1.0/#"),
            ));
        }
        if spec.format == Format::SparkplugB && spec.device_topic_pattern.is_some() {
            return Err(err(
                entry,
                "device_topic_pattern does not apply to sparkplug_b: the device id is the topic's group/edge_node[/device]".into(),
            ));
        }
        for t in &spec.topics {
            validate_filter(t)
                .map_err(|reason| err(entry.clone(), format!("topic {t:?}: {reason}")))?;
        }
        out.push(spec);
    }
    Ok(Some(out))
}

/// Whether every topic filter `b` matches is matched by filter `a` too.
fn covers(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(p), Some(q)) if p == q => {}
            _ => return false,
        }
    }
}

/// What an operator should hear about `formats` beside `subscribed` (the filters the cluster
/// subscribes): a filter an earlier entry takes every topic of (never used), a filter no
/// subscription covers (its messages may never arrive). One line each.
pub fn notes(formats: &[FormatSpec], subscribed: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, f) in formats.iter().enumerate() {
        for t in &f.topics {
            if let Some(j) = formats[..i]
                .iter()
                .position(|e| e.topics.iter().any(|o| covers(o, t)))
            {
                out.push(format!(
                    "formats[{}] topic {t:?} is never read as {}: formats[{}] takes its topics first",
                    i + 1,
                    f.format.as_str(),
                    j + 1
                ));
            }
            if !subscribed.iter().any(|s| covers(s, t)) {
                out.push(format!(
                    "formats[{}] topic {t:?} is not in MQTT_TOPICS nor a route's topics: unless a `devices` row subscribes it, its messages never arrive",
                    i + 1
                ));
            }
        }
    }
    out
}

/// `[[formats]]` as the stored form writes them.
pub(crate) fn to_toml(formats: &[FormatSpec]) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        formats: &'a [FormatSpec],
    }
    match formats.is_empty() {
        true => String::new(),
        false => format!(
            "\n{}",
            toml::to_string(&Doc { formats }).unwrap_or_default()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_text(text: &str) -> Result<Option<Vec<FormatSpec>>, ConfigError> {
        let mut t: toml::Table = text.parse().expect("toml");
        take(&mut t, "x.toml")
    }

    #[test]
    fn shadowed_and_unsubscribed_entries_are_named() {
        let f = take_text(
            "[[formats]]\ntopics = [\"stat/#\"]\nformat = \"value\"\n[[formats]]\ntopics = [\"stat/+/POWER\", \"senml/#\"]\nformat = \"senml\"\n",
        )
        .expect("ok")
        .expect("some");
        let n = notes(&f, &["stat/#", "devices/+/telemetry"]);
        assert_eq!(n.len(), 2, "{n:?}");
        assert!(
            n[0].contains("formats[2] topic \"stat/+/POWER\" is never read as senml"),
            "{n:?}"
        );
        assert!(n[1].contains("\"senml/#\" is not in MQTT_TOPICS"), "{n:?}");
        assert!(covers("a/+/c", "a/b/c") && covers("#", "a/+") && !covers("a/+", "a/#"));
    }

    #[test]
    fn entries_are_read_checked_and_written_back() {
        let f = take_text(
            "[[formats]]\ntopics = [\"tele/+/POWER\"]\nformat = \"value\"\n[[formats]]\ntopics = [\"senml/#\"]\nformat = \"senml\"\n",
        )
        .expect("ok")
        .expect("some");
        assert_eq!(f[0].format, Format::Value);
        assert_eq!(f[1].topics, ["senml/#"]);
        let again = take_text(&to_toml(&f)).expect("ok").expect("some");
        assert_eq!(again, f);
        for (text, want) in [
            ("[[formats]]\ntopics = [\"a\"]\nformat = \"csv\"\n", "formats[1]"),
            ("[[formats]]\ntopics = []\nformat = \"value\"\n", "at least one"),
            ("[[formats]]\ntopics = [\"a/#/b\"]\nformat = \"value\"\n", "a/#/b"),
            ("[[formats]]\ntopics = [\"a\"]\nformat = \"value\"\nwhat = 1\n", "what"),
            ("[[formats]]\ntopics = [\"a\"]\nformat = \"value\"\ndevice_topic_pattern = \"a/b\"\n", "{device_id}"),
            ("formats = 3\n", "list of tables"),
            ("[[formats]]\ntopics = [\"plant/#\"]\nformat = \"sparkplug_b\"\n", "not in the Sparkplug B namespace"),
            ("[[formats]]\ntopics = [\"spBv1.0/#\"]\nformat = \"sparkplug_b\"\ndevice_topic_pattern = \"spBv1.0/{device_id}/#\"\n", "does not apply to sparkplug_b"),
        ] {
            let e = take_text(text).expect_err(text).to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{text}: {e}");
        }
    }
}
