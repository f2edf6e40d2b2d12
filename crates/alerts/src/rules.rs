//! The alert rules: what can be wrong ([`Kind`], [`Level`]), and [`judge`], which turns the
//! [`Facts`] into [`Finding`]s. Pure, so every rule is tested without a cluster.

use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::facts::Facts;

leasehold_config::named! {
    /// Everything that can be wrong with the cluster, as stored in `alerts.kind`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Kind {
        DataStale = "data_stale",
        NoLeader = "no_leader",
        LeaderMqttDisconnected = "leader_mqtt_disconnected",
        MqttSessionLost = "mqtt_session_lost",
        MqttClientIdFight = "mqtt_client_id_fight",
        DeadLettersRising = "dead_letters_rising",
        LeaseFlapping = "lease_flapping",
        MqttSubscriptionRefused = "mqtt_subscription_refused",
        Replication = "replication",
        ConfigOutdated = "config_outdated",
        RouteSuspended = "route_suspended",
    }
}

leasehold_config::named! {
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Level {
        Warning = "warning",
        Critical = "critical",
    }
}

impl Level {
    /// The level as stored in `alerts.level` (anything but `critical` is a warning).
    pub fn from_stored(s: &str) -> Level {
        if s == Level::Critical.as_str() {
            Level::Critical
        } else {
            Level::Warning
        }
    }
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub level: Level,
    pub message: String,
    pub details: Value,
}

/// The thresholds alerts are judged against.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    pub stale_warning: Duration,
    pub stale_critical: Duration,
    /// How long "no leader" or "leader not connected" must last before it is an alert: a failover
    /// or a broker restart that heals itself within this is not worth a page.
    pub grace: Duration,
    /// Event-like alerts (session lost, client-id fight, dead letters, flapping) count what happened
    /// within this window and resolve once it has passed quietly.
    pub window: Duration,
    /// This many changes of leader within `window` is flapping.
    pub flap_changes: i64,
    /// `REQUIRE_SYNC_REPLICATION`: commits that are not synchronously replicated stop the
    /// leader's intake, so they are critical rather than a warning.
    pub require_sync_replication: bool,
}

/// One rule: its finding when its condition holds.
type Rule = fn(&Facts, &Thresholds) -> Option<Finding>;

/// Every rule, in the order findings are reported.
const RULES: [Rule; 11] = [
    data_stale,
    no_leader,
    leader_mqtt_disconnected,
    session_lost,
    client_id_fight,
    dead_letters_rising,
    subscriptions_refused,
    lease_flapping,
    replication,
    config_outdated,
    route_suspended,
];

/// Judges the facts. Pure, so every rule is tested without a cluster.
pub fn judge(f: &Facts, t: &Thresholds) -> Vec<Finding> {
    RULES.iter().filter_map(|rule| rule(f, t)).collect()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// No new reading for `STALE_WARNING` (critical at `STALE_CRITICAL`), or none ever.
fn data_stale(f: &Facts, t: &Thresholds) -> Option<Finding> {
    match f.newest_data_age {
        Some(age) if age >= secs(t.stale_warning) => {
            let level = if age >= secs(t.stale_critical) {
                Level::Critical
            } else {
                Level::Warning
            };
            Some(Finding {
                kind: Kind::DataStale,
                level,
                message: format!(
                    "no new telemetry for {} (warning at {}, critical at {}); {} of {} enabled devices heard from in the last {}",
                    human(age),
                    human(secs(t.stale_warning)),
                    human(secs(t.stale_critical)),
                    f.devices_heard,
                    f.devices_enabled,
                    human(secs(t.stale_warning)),
                ),
                details: json!({"newest_data_age_seconds": age, "devices_enabled": f.devices_enabled, "devices_heard": f.devices_heard}),
            })
        }
        None if f.cluster_uptime >= secs(t.stale_warning) => Some(Finding {
            kind: Kind::DataStale,
            level: Level::Warning,
            message: format!(
                "no telemetry has ever been stored, and the cluster has been up for {}",
                human(f.cluster_uptime)
            ),
            details: json!({"newest_data_age_seconds": null}),
        }),
        _ => None,
    }
}

/// The lease expired (or was never taken) and nobody took it within `ALERT_GRACE`.
fn no_leader(f: &Facts, t: &Thresholds) -> Option<Finding> {
    match &f.lease {
        None if f.cluster_uptime >= secs(t.grace) && f.production_nodes_alive > 0 => {
            Some(Finding {
                kind: Kind::NoLeader,
                level: Level::Critical,
                message: format!(
                    "no node has ever taken the lease, although {} production node(s) are running",
                    f.production_nodes_alive
                ),
                details: json!({"production_nodes_alive": f.production_nodes_alive}),
            })
        }
        Some(l) if l.expired_for >= secs(t.grace) => Some(Finding {
            kind: Kind::NoLeader,
            level: Level::Critical,
            message: format!(
                "no leader for {}: the lease of {} (epoch {}) expired and no node took it; {} production node(s) alive. Nothing is being written.",
                human(l.expired_for),
                l.instance_id,
                l.epoch,
                f.production_nodes_alive
            ),
            details: json!({"last_holder": l.instance_id, "epoch": l.epoch, "expired_for_seconds": l.expired_for, "production_nodes_alive": f.production_nodes_alive}),
        }),
        _ => None,
    }
}

/// The live leader has been off the broker for `ALERT_GRACE`.
fn leader_mqtt_disconnected(f: &Facts, t: &Thresholds) -> Option<Finding> {
    let l = f.lease.as_ref().filter(|l| l.expired_for <= 0.0)?;
    let d = l.leader_disconnected_for.filter(|d| *d >= secs(t.grace))?;
    Some(Finding {
        kind: Kind::LeaderMqttDisconnected,
        level: Level::Critical,
        message: match l.standby_reaches_broker {
            true => format!(
                "leader {} (epoch {}) has not been connected to the broker for {}; it hands over to a standby that reaches the broker if this lasts MQTT_STEP_DOWN_AFTER",
                l.instance_id,
                l.epoch,
                human(d)
            ),
            false => format!(
                "the broker: no node has reached it — leader {} (epoch {}) not connected for {}, and no standby reached it within 15s either. Check the broker, the network to it and the MQTT credentials; the leader keeps the lease (a hand-over would not help) and the broker keeps what it queues",
                l.instance_id,
                l.epoch,
                human(d)
            ),
        },
        details: json!({"leader": l.instance_id, "epoch": l.epoch, "disconnected_for_seconds": d, "standby_reaches_broker": l.standby_reaches_broker}),
    })
}

/// A node found the broker without the cluster's session within `ALERT_WINDOW`.
fn session_lost(f: &Facts, t: &Thresholds) -> Option<Finding> {
    (!f.session_lost.is_empty()).then(|| Finding {
        kind: Kind::MqttSessionLost,
        level: Level::Critical,
        message: format!(
            "the broker had no session for the cluster's client id when {} reconnected (within the last {}): messages queued for it were lost. Check the broker's persistence.",
            f.session_lost.join(", "),
            human(secs(t.window))
        ),
        details: json!({"nodes": f.session_lost}),
    })
}

/// A node was disconnected right after connecting, again and again, within `ALERT_WINDOW`.
fn client_id_fight(f: &Facts, t: &Thresholds) -> Option<Finding> {
    (!f.client_id_conflicts.is_empty()).then(|| Finding {
        kind: Kind::MqttClientIdFight,
        level: Level::Critical,
        message: format!(
            "another process is using the cluster's MQTT client id: {} was disconnected right after connecting (within the last {})",
            f.client_id_conflicts.join(", "),
            human(secs(t.window))
        ),
        details: json!({"nodes": f.client_id_conflicts}),
    })
}

/// Messages dead-lettered within `ALERT_WINDOW`.
fn dead_letters_rising(f: &Facts, t: &Thresholds) -> Option<Finding> {
    (f.dead_letters_in_window > 0).then(|| Finding {
        kind: Kind::DeadLettersRising,
        level: Level::Warning,
        message: format!(
            "{} message(s) dead-lettered in the last {} (latest error: {})",
            f.dead_letters_in_window,
            human(secs(t.window)),
            f.latest_dead_letter_error.as_deref().unwrap_or("-")
        ),
        details: json!({"count": f.dead_letters_in_window, "latest_error": f.latest_dead_letter_error}),
    })
}

/// The broker refuses some of the session's topic filters.
fn subscriptions_refused(f: &Facts, _: &Thresholds) -> Option<Finding> {
    if f.subscriptions_refused <= 0 {
        return None;
    }
    let first: Vec<String> = f
        .refused_filters
        .iter()
        .map(|(filter, reason, attempts)| format!("{filter} ({reason}; {attempts} attempt(s))"))
        .collect();
    Some(Finding {
        kind: Kind::MqttSubscriptionRefused,
        level: Level::Critical,
        message: format!(
            "the broker refuses {} topic filter(s) of the cluster's session, so nothing published on them is received: {}. Check the broker's ACL for the cluster's user; the leader retries on its own.",
            f.subscriptions_refused,
            first.join(", ")
        ),
        details: json!({"count": f.subscriptions_refused, "filters": f.refused_filters.iter().map(|(filter, reason, attempts)| json!({"filter": filter, "error": reason, "attempts": attempts})).collect::<Vec<_>>()}),
    })
}

/// The leader holds a route suspended: its table cannot be written now (its messages become
/// `route_unavailable` dead letters); every other route flows. Resolves when the route resumes,
/// whether or not messages came for it meanwhile.
fn route_suspended(f: &Facts, _: &Thresholds) -> Option<Finding> {
    if f.suspended_routes.is_empty() {
        return None;
    }
    let routes: Vec<String> = f
        .suspended_routes
        .iter()
        .map(|(r, n, e)| format!("{r} ({n} dead letters in 2 min; {e})"))
        .collect();
    Some(Finding {
        kind: Kind::RouteSuspended,
        level: Level::Critical,
        message: format!(
            "suspended: {}. Its table cannot be written (gone, renamed, a column or a grant missing): fix the table; the route resumes by itself within seconds and replays its route_unavailable dead letters. Every other route keeps flowing",
            routes.join(", ")
        ),
        details: json!({"routes": f.suspended_routes.iter().map(|(r, n, e)| json!({"route": r, "dead_letters": n, "error": e})).collect::<Vec<_>>()}),
    })
}

/// A node alive runs another cluster configuration than the active one (it cannot run the new
/// one: its own node settings conflict, or it is an older binary).
fn config_outdated(f: &Facts, _: &Thresholds) -> Option<Finding> {
    if f.config_outdated.is_empty() {
        return None;
    }
    let nodes: Vec<String> = f
        .config_outdated
        .iter()
        .map(|n| match n.running {
            Some(v) => format!("{} runs version {v}", n.instance_id),
            None => format!("{} runs no stored version", n.instance_id),
        })
        .collect();
    let active = f.config_outdated[0].active;
    Some(Finding {
        kind: Kind::ConfigOutdated,
        level: Level::Warning,
        message: format!(
            "not every node runs the cluster configuration's active version {active}: {}. Its /health says why (a node setting that conflicts with the new version, or an older binary); it keeps the version it runs until fixed",
            nodes.join(", ")
        ),
        details: json!({"active": active, "nodes": f.config_outdated.iter().map(|n| json!({"instance_id": n.instance_id, "running": n.running})).collect::<Vec<_>>()}),
    })
}

/// Leadership changed `flap_changes` times within `ALERT_WINDOW`.
fn lease_flapping(f: &Facts, t: &Thresholds) -> Option<Finding> {
    (f.leader_changes_in_window >= t.flap_changes).then(|| Finding {
        kind: Kind::LeaseFlapping,
        level: Level::Warning,
        message: format!(
            "leadership changed {} times in the last {}",
            f.leader_changes_in_window,
            human(secs(t.window))
        ),
        details: json!({"changes": f.leader_changes_in_window}),
    })
}

/// Commits are not synchronously replicated: critical when `REQUIRE_SYNC_REPLICATION` holds
/// the leader's intake because of it; a warning when standbys stream but none is in sync (an
/// acknowledged message can be lost in a database failover now). A database with no standby
/// at all, and no requirement, is a deployment choice `leasehold doctor` reports, not an alert.
fn replication(f: &Facts, t: &Thresholds) -> Option<Finding> {
    let r = f.replication.as_ref()?;
    let why = r.why_not.as_ref()?;
    if t.require_sync_replication {
        Some(Finding {
            kind: Kind::Replication,
            level: Level::Critical,
            message: format!(
                "commits are not synchronously replicated ({why}): with REQUIRE_SYNC_REPLICATION the leader holds intake and nothing is being written (messages wait at the broker)"
            ),
            details: json!({"why": why, "standbys": r.standbys, "require_sync_replication": true}),
        })
    } else {
        (r.standbys > 0).then(|| Finding {
            kind: Kind::Replication,
            level: Level::Warning,
            message: format!(
                "commits are not synchronously replicated although {} standby(s) stream ({why}): a database failover now can lose messages already acknowledged to the broker",
                r.standbys
            ),
            details: json!({"why": why, "standbys": r.standbys, "require_sync_replication": false}),
        })
    }
}

/// `90` -> `1m 30s`: for messages read by people.
pub fn human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::facts::{LeaseFacts, ReplicationFacts};

    pub(crate) fn t() -> Thresholds {
        Thresholds {
            stale_warning: Duration::from_secs(300),
            stale_critical: Duration::from_secs(600),
            grace: Duration::from_secs(10),
            window: Duration::from_secs(600),
            flap_changes: 4,
            require_sync_replication: false,
        }
    }

    fn healthy() -> Facts {
        Facts {
            newest_data_age: Some(1.0),
            devices_enabled: 3,
            devices_heard: 3,
            cluster_uptime: 3600.0,
            production_nodes_alive: 2,
            config_outdated: Vec::new(),
            suspended_routes: Vec::new(),
            lease: Some(LeaseFacts {
                standby_reaches_broker: true,
                instance_id: "a".into(),
                epoch: 7,
                expired_for: -5.0,
                leader_disconnected_for: None,
            }),
            session_lost: vec![],
            client_id_conflicts: vec![],
            dead_letters_in_window: 0,
            latest_dead_letter_error: None,
            leader_changes_in_window: 1,
            subscriptions_refused: 0,
            refused_filters: vec![],
            replication: None,
        }
    }

    #[test]
    fn unreplicated_commits_are_critical_when_required_a_warning_with_standbys_else_nothing() {
        let mut f = healthy();
        f.replication = Some(ReplicationFacts {
            why_not: None,
            standbys: 1,
        });
        assert!(kinds(&f).is_empty(), "replicated");
        f.replication = Some(ReplicationFacts {
            why_not: Some("synchronous_standby_names is empty".into()),
            standbys: 0,
        });
        assert!(kinds(&f).is_empty(), "no standby, not required");
        let required = Thresholds {
            require_sync_replication: true,
            ..t()
        };
        let found = judge(&f, &required);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].kind, found[0].level),
            (Kind::Replication, Level::Critical)
        );
        assert!(found[0]
            .message
            .contains("synchronous_standby_names is empty"));
        f.replication = Some(ReplicationFacts {
            why_not: Some("synchronous_standby_names is empty".into()),
            standbys: 1,
        });
        assert_eq!(kinds(&f), vec![(Kind::Replication, Level::Warning)]);
    }

    fn lease(f: &mut Facts) -> &mut LeaseFacts {
        f.lease.as_mut().expect("healthy facts have a lease")
    }

    fn kinds(f: &Facts) -> Vec<(Kind, Level)> {
        judge(f, &t()).iter().map(|x| (x.kind, x.level)).collect()
    }

    #[test]
    fn a_healthy_cluster_has_no_findings() {
        assert!(kinds(&healthy()).is_empty());
    }

    #[test]
    fn stale_data_is_a_warning_then_critical() {
        let mut f = healthy();
        f.newest_data_age = Some(299.0);
        assert!(kinds(&f).is_empty());
        f.newest_data_age = Some(301.0);
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Warning)]);
        f.newest_data_age = Some(601.0);
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Critical)]);
        f.newest_data_age = None;
        assert_eq!(kinds(&f), vec![(Kind::DataStale, Level::Warning)]);
        f.cluster_uptime = 10.0;
        assert!(kinds(&f).is_empty(), "a fresh cluster is not stale yet");
    }

    #[test]
    fn an_expired_lease_is_no_leader_only_after_the_grace() {
        let mut f = healthy();
        lease(&mut f).expired_for = 3.0;
        assert!(kinds(&f).is_empty(), "an ordinary failover is not an alert");
        lease(&mut f).expired_for = 11.0;
        assert_eq!(kinds(&f), vec![(Kind::NoLeader, Level::Critical)]);
        f.lease = None;
        assert_eq!(kinds(&f), vec![(Kind::NoLeader, Level::Critical)]);
        f.production_nodes_alive = 0;
        assert!(kinds(&f).is_empty(), "never taken and nobody to take it");
    }

    #[test]
    fn a_leader_off_the_broker_after_the_grace() {
        let mut f = healthy();
        lease(&mut f).leader_disconnected_for = Some(5.0);
        assert!(kinds(&f).is_empty());
        lease(&mut f).leader_disconnected_for = Some(12.0);
        assert_eq!(
            kinds(&f),
            vec![(Kind::LeaderMqttDisconnected, Level::Critical)]
        );
    }

    #[test]
    fn events_in_the_window() {
        let mut f = healthy();
        f.session_lost = vec!["a".into()];
        f.client_id_conflicts = vec!["b".into()];
        f.dead_letters_in_window = 2;
        f.leader_changes_in_window = 4;
        assert_eq!(
            kinds(&f),
            vec![
                (Kind::MqttSessionLost, Level::Critical),
                (Kind::MqttClientIdFight, Level::Critical),
                (Kind::DeadLettersRising, Level::Warning),
                (Kind::LeaseFlapping, Level::Warning),
            ]
        );
        f.leader_changes_in_window = 3;
        assert!(!kinds(&f).contains(&(Kind::LeaseFlapping, Level::Warning)));
    }

    #[test]
    fn a_refused_subscription_is_critical_and_names_the_filter() {
        let mut f = healthy();
        f.subscriptions_refused = 1;
        f.refused_filters = vec![(
            "plant/secret/data".into(),
            "refused by the broker (SUBACK 0x80)".into(),
            3,
        )];
        let found = judge(&f, &t());
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].kind, found[0].level),
            (Kind::MqttSubscriptionRefused, Level::Critical)
        );
        assert!(
            found[0].message.contains("plant/secret/data"),
            "{}",
            found[0].message
        );
        assert_eq!(
            Kind::MqttSubscriptionRefused.as_str(),
            "mqtt_subscription_refused"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(5.4), "5s");
        assert_eq!(human(90.0), "1m 30s");
        assert_eq!(human(12_600.0), "3h 30m");
    }
}
