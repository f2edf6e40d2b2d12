//! The cluster's identity at the broker. Two clusters (two databases) using one client id
//! share one broker session: each acknowledges messages into its own database, so each loses
//! what the other took. A leader claims its client id at the start of every term with a
//! retained message on `leasehold/clusters/<client id>` naming its database; the check reads
//! the claim and compares it with this node's database.

use std::time::Duration;

use chrono::{DateTime, Utc};
use leasehold_config::{ClientId, Config, CLAIM_TOPIC_PREFIX};
use leasehold_telemetry::Check;
use serde::{Deserialize, Serialize};

use crate::database::Facts;
use crate::mqtt::{options, random_suffix, Conn, ProbeError};

/// A leader's claim on its client id: which database (and so which cluster) uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub cluster_id: String,
    pub database: String,
    /// `pg_control_system()`'s identifier, the same on a physical standby promoted by a
    /// failover; `None` when the role may not read it.
    pub system_identifier: Option<String>,
    pub lease_name: String,
    pub instance: String,
    pub epoch: i64,
    pub claimed_at: DateTime<Utc>,
}

impl Claim {
    /// Whether both claims come from the same database (a failover keeps it the same).
    pub fn same_database(&self, other: &Claim) -> bool {
        self.cluster_id == other.cluster_id
            && self.database == other.database
            && match (&self.system_identifier, &other.system_identifier) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    fn describe(&self) -> String {
        format!(
            "cluster {} (database {:?}{}, instance {}, epoch {}, claimed {})",
            self.cluster_id,
            self.database,
            self.system_identifier
                .as_deref()
                .map(|s| format!(" on system {s}"))
                .unwrap_or_default(),
            self.instance,
            self.epoch,
            self.claimed_at.to_rfc3339()
        )
    }
}

/// The claim's topic: `leasehold/clusters/<client id>`, wildcards and separators of an
/// explicit id replaced by `_`.
pub fn claim_topic(client_id: &str) -> String {
    let safe: String = client_id
        .chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect();
    format!("{CLAIM_TOPIC_PREFIX}{safe}")
}

/// Publishes `claim` retained, QoS 1, on a temporary connection of its own.
pub async fn publish(cfg: &Config, client_id: &str, claim: &Claim) -> Result<(), ProbeError> {
    let body = serde_json::to_vec(claim).unwrap_or_default();
    let id = format!("leasehold-claim-{}", random_suffix());
    let (mut c, _) = Conn::open(options(cfg, &id, true)).await?;
    let res = c
        .publish_all(
            &claim_topic(client_id),
            true,
            [body],
            Duration::from_secs(5),
        )
        .await;
    c.close().await;
    res.map(|_| ())
}

/// What the broker holds on the claim topic: nothing, a claim, or something unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Nothing,
    Claim(Claim),
    Unreadable(String),
}

/// Reads the retained claim on `client_id` (a retained message arrives right after SUBACK).
pub async fn read(cfg: &Config, client_id: &str) -> Result<Found, ProbeError> {
    let topic = claim_topic(client_id);
    let mut c = Conn::temporary(cfg).await?;
    let codes = c.subscribe(std::slice::from_ref(&topic)).await?;
    if !matches!(
        codes.first(),
        Some(rumqttc::SubscribeReasonCode::Success(_))
    ) {
        c.close().await;
        return Err(ProbeError::Refused("a subscription to the claim topic"));
    }
    let got = c
        .collect(&topic, 1, Duration::from_secs(1), Duration::from_secs(2))
        .await;
    c.close().await;
    Ok(match got?.first() {
        None => Found::Nothing,
        Some(p) => match serde_json::from_slice::<Claim>(&p.payload) {
            Ok(claim) => Found::Claim(claim),
            Err(e) => Found::Unreadable(e.to_string()),
        },
    })
}

/// This node's claim, as its leader would publish it.
pub fn ours(cfg: &Config, facts: &Facts, epoch: i64) -> Option<Claim> {
    Some(Claim {
        cluster_id: facts.cluster.as_ref()?.cluster_id.clone(),
        database: facts.database.database.clone(),
        system_identifier: facts.database.system_identifier.clone(),
        lease_name: cfg.node.lease_name.clone(),
        instance: cfg.instance_id.clone(),
        epoch,
        claimed_at: Utc::now(),
    })
}

/// Judges what the broker holds on this cluster's client id.
pub fn judge_claim(client_id: &str, ours: &Claim, found: &Found) -> Check {
    const ID: &str = "cluster.claim";
    match found {
        Found::Nothing => Check::ok(
            ID,
            format!("no other cluster claims client id {client_id} at the broker"),
        ),
        Found::Claim(c) if c.same_database(ours) => Check::ok(
            ID,
            format!("client id {client_id} is claimed by this cluster ({})", c.describe()),
        ),
        Found::Claim(c) => Check::problem(
            ID,
            format!(
                "client id {client_id} is claimed at the broker by another cluster: {}; this node's is cluster {} (database {:?}{}). Two clusters on one session each acknowledge the other's messages into their own database: both lose data",
                c.describe(),
                ours.cluster_id,
                ours.database,
                ours.system_identifier
                    .as_deref()
                    .map(|s| format!(" on system {s}"))
                    .unwrap_or_default()
            ),
            "give each cluster its own client id: unset MQTT_CLIENT_ID (the derived id differs for every database), or stop the other cluster (docs/runbook.md, \"Another cluster uses this client id\")",
        ),
        Found::Unreadable(e) => Check::warning(
            ID,
            format!("the broker holds an unreadable claim on client id {client_id}: {e}"),
            "see what publishes on leasehold/clusters/ (only Leasehold's leaders should)",
        ),
    }
}

/// The cluster's identity and the client id in use: an explicit one is a warning.
pub fn identity(cfg: &Config, facts: Option<&Facts>) -> (Check, Option<ClientId>) {
    const ID: &str = "cluster.identity";
    if facts.is_none() && cfg.node.mqtt_client_id.is_none() {
        return (
            Check::problem(
                ID,
                "the cluster's identity could not be read (see database.connect), so the session's client id is unknown",
                "make the database reachable",
            ),
            None,
        );
    }
    let cluster = facts.and_then(|f| f.cluster.as_ref());
    match cfg.client_id(cluster.map(|c| c.cluster_id.as_str())) {
        Ok(id) => {
            let said = format!(
                "cluster {}, lease {}, session client id {} ({})",
                cluster.map(|c| c.cluster_id.as_str()).unwrap_or("unknown"),
                cfg.node.lease_name,
                id.id,
                id.source.as_str()
            );
            let check = match id.warning() {
                Some(w) => Check::warning(ID, said, w),
                None => Check::ok(ID, said),
            };
            (check, Some(id))
        }
        Err(e) => (
            Check::problem(
                ID,
                e.to_string(),
                "restore the cluster_identity row or set MQTT_CLIENT_ID (docs/runbook.md, \"The cluster's identity\")",
            ),
            None,
        ),
    }
}

/// Reads and judges the claim on this cluster's client id.
pub async fn claim_check(cfg: &Config, client_id: &ClientId, facts: &Facts) -> Check {
    let Some(ours) = ours(cfg, facts, 0) else {
        return Check::warning(
            "cluster.claim",
            "the cluster's identity is unknown: the claim at the broker was not compared",
            "run `leasehold migrate`",
        );
    };
    match read(cfg, &client_id.id).await {
        Ok(found) => judge_claim(&client_id.id, &ours, &found),
        Err(ProbeError::Refused(what)) => Check::warning(
            "cluster.claim",
            format!("the broker refused {what} {}: another cluster using this client id cannot be detected", claim_topic(&client_id.id)),
            "allow Leasehold's user to subscribe to and publish retained messages on leasehold/clusters/# (docs/deployment.md, \"Mosquitto\")",
        ),
        Err(e) => Check::problem(
            "cluster.claim",
            format!("could not read the claim at the broker {}: {e}", cfg.mqtt),
            "check MQTT_URL, the credentials and that the broker is running",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_telemetry::CheckLevel;

    fn claim(cluster: &str, db: &str, system: Option<&str>) -> Claim {
        Claim {
            cluster_id: cluster.into(),
            database: db.into(),
            system_identifier: system.map(str::to_string),
            lease_name: "ingest".into(),
            instance: "a".into(),
            epoch: 3,
            claimed_at: Utc::now(),
        }
    }

    #[test]
    fn a_claim_by_another_database_is_a_problem_naming_both() {
        let ours = claim("c1", "leasehold", Some("71"));
        assert_eq!(
            judge_claim("x", &ours, &Found::Nothing).level,
            CheckLevel::Ok
        );
        let same = Found::Claim(claim("c1", "leasehold", Some("71")));
        assert_eq!(judge_claim("x", &ours, &same).level, CheckLevel::Ok);
        let other = Found::Claim(claim("c2", "leasehold", Some("99")));
        let c = judge_claim("x", &ours, &other);
        assert_eq!(c.level, CheckLevel::Problem);
        assert!(
            c.summary.contains("c1") && c.summary.contains("c2"),
            "{}",
            c.summary
        );
        // Another PostgreSQL system with the same cluster id: a copy of the database.
        let copy = Found::Claim(claim("c1", "leasehold", Some("99")));
        assert_eq!(judge_claim("x", &ours, &copy).level, CheckLevel::Problem);
    }

    #[test]
    fn the_claim_topic_has_no_wildcards() {
        assert_eq!(claim_topic("lh-abc-123"), "leasehold/clusters/lh-abc-123");
        assert_eq!(claim_topic("a/b+#"), "leasehold/clusters/a_b__");
        assert!(leasehold_config::is_own_topic(&claim_topic("x")));
    }
}
