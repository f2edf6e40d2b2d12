//! The deployment checks in the node: `leasehold doctor`, the same checks in the background at
//! start (shown in `/health`), the leader's claim on its client id at the start of each term,
//! and the replication status the heartbeat refreshes.

use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use leasehold_config::Config;
use leasehold_doctor::{cluster, CheckLevel};
use leasehold_store::Pool;
use leasehold_telemetry::status::ReplicationRead;
use leasehold_telemetry::{events, NodeStatus};
use tokio_util::sync::CancellationToken;

/// `leasehold doctor`: one line per check; exit 1 on any problem.
pub async fn doctor(own: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    // The cluster's configuration as the nodes run it (topics, routes, limits), when it can be
    // read; the database's own checks say why when it cannot.
    let active = async {
        let url = own.node.database_url.as_deref()?;
        let c = leasehold_store::connect(url, "leasehold-doctor")
            .await
            .ok()?;
        crate::cluster_config::effective(own, &c).await.ok()
    }
    .await;
    let cfg = active.as_ref().unwrap_or(own);
    let checks = leasehold_doctor::run(cfg).await;
    let worst = checks.worst();
    if as_json {
        let body = serde_json::json!({
            "status": worst.as_str(),
            "ran_at": checks.ran_at.to_rfc3339(),
            "checks": checks.checks,
        });
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        for line in leasehold_doctor::lines(&checks) {
            println!("{line}");
        }
    }
    Ok(if worst == CheckLevel::Problem {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// At start, in the background: runs the checks once, logs each line that is not ok, and puts
/// them in the status (`/health`). Never delays the lease: it runs beside it.
pub async fn at_start(cfg: Config, status: NodeStatus, cancel: CancellationToken) {
    // Ended by the node stopping: the probes clean up what they left at the broker first.
    let Some(checks) = leasehold_doctor::run_until(&cfg, &cancel).await else {
        return;
    };
    for c in checks.checks.iter().filter(|c| c.level != CheckLevel::Ok) {
        events::CheckFound { check: c }.emit();
    }
    tracing::info!(
        worst = checks.worst().as_str(),
        checks = checks.checks.len(),
        "deployment checks done (shown in /health)"
    );
    status.set_checks(checks);
}

/// The leader's claim on its client id for term `epoch`, published beside the term: a refusal
/// or an unreachable broker is a warning, never a stall.
pub async fn claim(
    cfg: Config,
    client_id: String,
    cluster_id: Option<String>,
    pool: Pool,
    epoch: i64,
    cancel: CancellationToken,
) {
    let Some(cluster_id) = cluster_id else {
        return;
    };
    let work = async {
        let database = {
            let c = leasehold_store::pooled(&pool).await?;
            leasehold_store::deployment::database_identity(&**c).await?
        };
        let claim = cluster::Claim {
            cluster_id,
            database: database.database,
            system_identifier: database.system_identifier,
            lease_name: cfg.node.lease_name.clone(),
            instance: cfg.instance_id.clone(),
            epoch,
            claimed_at: Utc::now(),
        };
        cluster::publish(&cfg, &client_id, &claim)
            .await
            .map_err(|e| anyhow::anyhow!(e))
    };
    let res = tokio::select! {
        _ = cancel.cancelled() => return,
        r = tokio::time::timeout(Duration::from_secs(15), work) => r,
    };
    match res {
        Ok(Ok(())) => {
            tracing::info!(epoch, topic = %cluster::claim_topic(&client_id), "claimed the client id at the broker")
        }
        Ok(Err(e)) => {
            tracing::warn!(epoch, error = %e, "could not publish the cluster's claim on its client id; ingest goes on")
        }
        Err(_) => tracing::warn!(
            epoch,
            "publishing the cluster's claim on its client id timed out; ingest goes on"
        ),
    }
}

/// Reads how the database replicates commits into the status and the gauges.
pub async fn read_replication(pool: &Pool, status: &NodeStatus) {
    let work = async {
        let c = leasehold_store::pooled(pool).await?;
        leasehold_store::replication::status(&**c).await
    };
    let result = match tokio::time::timeout(Duration::from_secs(2), work).await {
        Ok(Ok(r)) => {
            events::ReplicationChecked { status: &r }.emit();
            Ok(r)
        }
        Ok(Err(e)) => Err(leasehold_config::redact(&e.to_string())),
        Err(_) => Err("timed out after 2s".to_string()),
    };
    status.set_replication(ReplicationRead {
        read_at: Utc::now(),
        result,
    });
}
