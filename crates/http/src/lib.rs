//! The HTTP surface of a node: health for orchestrators and people, metrics for Prometheus.
//!
//! Every answer is computed from live state (the lease handle, the node's status as its components
//! last wrote it, a timed database probe), never from a metric read back or a flag someone forgot
//! to update: "ok" must mean working.
//!
//! # Layout
//! - [`HttpState`]: what the handlers read.
//! - [`router`]: the routes; [`serve`]: binds and runs until cancelled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use leasehold_config::redact;
use leasehold_lease::{LeaseHandle, Role};
use leasehold_store::queries::ClusterReport;
use leasehold_store::Pool;
use leasehold_telemetry::status::MqttStatus;
use leasehold_telemetry::{metrics, NodeStatus};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on HTTP_ADDR={addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub instance_id: String,
    pub mode: &'static str,
    pub version: &'static str,
    /// `None` in `disabled` and `development` modes: they never lead.
    pub lease: Option<LeaseHandle>,
    pub pool: Option<Pool>,
    pub lease_name: String,
    /// Whether this node's role needs a broker connection (leader or observer).
    pub observer: bool,
    /// `None` without a database.
    pub alerts: Option<leasehold_alerts::AlertsHandle>,
    /// `STALE_WARNING` and `STALE_CRITICAL` as the cluster's configuration says now.
    pub stale: tokio::sync::watch::Receiver<(Duration, Duration)>,
    /// The client id of the cluster's shared session (production nodes), and where it came from.
    pub mqtt_client_id: Option<leasehold_config::ClientId>,
    /// The cluster's identity, read from the database at start.
    pub cluster_id: Option<String>,
    /// What the node's components last reported (broker connection, subscriptions, data age).
    pub status: NodeStatus,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/lease", get(lease))
        .route("/health/mqtt", get(mqtt))
        .route("/health/database", get(database))
        .route("/health/recent-data", get(recent_data))
        .route("/health/alerts", get(alerts))
        .route("/health/alerts/check", post(alerts_check))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Serves on `listener` until `cancel`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    cancel: CancellationToken,
) -> Result<(), HttpError> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(HttpError::Serve)
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// 200 when working as required, 503 otherwise: what load balancers and orchestrators act on.
fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn role_of(s: &HttpState) -> Role {
    s.lease.as_ref().map(|l| l.role()).unwrap_or(Role::Standby)
}

fn role_name(s: &HttpState) -> &'static str {
    match (&s.lease, s.observer) {
        (None, true) => "observer",
        (None, false) => "disabled",
        (Some(l), _) => l.role().as_str(),
    }
}

/// Leading or draining past the local deadline: renewals stopped, or a demotion hangs.
fn stuck(s: &HttpState) -> bool {
    s.lease.as_ref().is_some_and(|l| l.is_stuck())
}

async fn db_probe(s: &HttpState) -> Value {
    let Some(pool) = &s.pool else {
        return json!({"reachable": false, "error": "no database configured"});
    };
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(2), async {
        let c = leasehold_store::pooled(pool).await?;
        leasehold_store::queries::ping(&**c).await?;
        Ok::<_, leasehold_store::StoreError>(())
    })
    .await;
    match res {
        Ok(Ok(())) => json!({"reachable": true, "latency_ms": start.elapsed().as_secs_f64() * 1e3}),
        Ok(Err(e)) => json!({"reachable": false, "error": redact(&e.to_string())}),
        Err(_) => json!({"reachable": false, "error": "timed out after 2s"}),
    }
}

fn lease_view(s: &HttpState) -> Value {
    match &s.lease {
        None => json!({"participating": false}),
        Some(l) => json!({
            "participating": true,
            "name": s.lease_name,
            "holder_id": l.holder_id,
            "role": l.role().as_str(),
            "epoch": l.role().epoch(),
            "local_deadline_in_ms": l.remaining().map(|d| d.as_millis() as u64),
            "seconds_since_renew": l.since_renew().map(|d| d.as_secs_f64()),
        }),
    }
}

fn mqtt_view(m: &MqttStatus) -> Value {
    let subs = &m.subscriptions;
    let now = Instant::now();
    let failed: Vec<Value> = subs
        .failed
        .iter()
        .map(|f| {
            json!({
                "filter": f.filter,
                "error": f.reason,
                "attempts": f.attempts,
                "failing_for_seconds": now.saturating_duration_since(f.since).as_secs_f64(),
                "retry_in_seconds": f.retry_at.saturating_duration_since(now).as_secs_f64(),
            })
        })
        .collect();
    json!({
        "connected": m.connected,
        "subscribed_topics": subs.subscribed,
        "devices": subs.device_topics,
        "subscriptions": {
            "ledger_loaded": subs.loaded,
            "wanted": subs.wanted,
            "configured": subs.configured,
            "device_topics": subs.device_topics,
            "subscribed": subs.subscribed,
            "pending": subs.pending,
            "failed_total": subs.failed_total,
            "failed": failed,
            "subscribe_failures_total": m.subscribe_failures,
        },
        "pending": m.pending,
        "pending_bytes": m.pending_bytes,
        "reconnects": m.reconnects,
    })
}

/// Adds the shared session's client id, its source and, for an explicit one, the warning.
fn with_client_id(mut v: Value, s: &HttpState) -> Value {
    v["cluster_id"] = json!(s.cluster_id);
    if let Some(c) = &s.mqtt_client_id {
        v["client_id"] = json!(c.id);
        v["client_id_source"] = json!(c.source.as_str());
        v["derived_client_id"] = json!(c.derived);
        if let Some(w) = c.warning() {
            v["client_id_warning"] = json!(w);
        }
    }
    v
}

async fn health(State(s): State<HttpState>) -> Response {
    let db = db_probe(&s).await;
    let db_ok = db["reachable"].as_bool().unwrap_or(false);
    let m = s.status.mqtt();
    let mqtt = with_client_id(mqtt_view(&m), &s);
    let mqtt_ok = m.connected;
    let role = role_of(&s);
    let needs_mqtt = s.observer || matches!(role, Role::Leader { .. });
    let mut problems = Vec::new();
    if !db_ok {
        problems.push("database unreachable");
    }
    if needs_mqtt && !mqtt_ok {
        problems.push("not connected to the broker");
    }
    // Why it still leads, cut off from the broker: no standby reaches it either.
    let keeps_lease = m.keeps_lease.clone().filter(|_| !mqtt_ok);
    // A leader whose subscriptions are not yet granted is not ingesting everything yet: what is
    // published on a topic before its SUBACK never reaches the session.
    if matches!(role, Role::Leader { .. })
        && mqtt_ok
        && (!m.subscriptions.loaded || m.subscriptions.pending > 0)
    {
        problems.push("subscribing to its topics");
    }
    if stuck(&s) {
        problems.push("leader past its renewal deadline");
    }
    // REQUIRE_SYNC_REPLICATION: the writer holds intake while commits are not replicated.
    let ingest_hold = s.status.ingest_hold();
    if matches!(role, Role::Leader { .. }) && ingest_hold.is_some() {
        problems.push("not ingesting: commits are not synchronously replicated");
    }
    // Every commit waits for a standby that is not there: nothing is written, and no node can
    // renew or take the lease, whatever this node's role.
    if s.status
        .replication()
        .and_then(|r| r.result.ok())
        .is_some_and(|r| r.commits_blocked())
    {
        problems.push(
            "commits hang: synchronous_standby_names names no standby that is in sync, so every commit (the lease's too) waits",
        );
    }
    // A newest row stamped ahead of the database's clock has no meaningful age yet.
    let age = s.status.cluster().newest_data_age.filter(|a| *a >= 0.0);
    let body = json!({
        "status": if problems.is_empty() { "ok" } else { "unhealthy" },
        "problems": problems,
        "warnings": warnings(&s),
        "role": role_name(&s),
        "instance": s.instance_id,
        "mode": s.mode,
        "version": s.version,
        "lease": lease_view(&s),
        "mqtt": mqtt,
        "database": db,
        "newest_data_age_seconds": age,
        "ingest_hold": ingest_hold,
        "keeps_lease": keeps_lease,
        "routes": s.status.routes(),
        "config": s.status.config(),
        "sparkplug": s.status.sparkplug(),
    });
    let body = with_checks(body, &s);
    (code(problems.is_empty()), Json(body)).into_response()
}

/// Adds the deployment checks run at start (`checks`, `checks_ran_at`, `checks_status`:
/// `pending` until they finished). They inform; they do not change the status code.
fn with_checks(mut v: Value, s: &HttpState) -> Value {
    match s.status.checks() {
        Some(c) => {
            v["checks_status"] = json!(c.worst().as_str());
            v["checks_ran_at"] = json!(c.ran_at.to_rfc3339());
            v["checks"] = json!(c.checks);
        }
        None => {
            v["checks_status"] = json!("pending");
            v["checks_ran_at"] = Value::Null;
            v["checks"] = json!([]);
        }
    }
    v
}

/// How the database replicates commits, as the node last read it (`null` before the first read).
fn replication_view(s: &HttpState) -> Value {
    match s.status.replication() {
        None => Value::Null,
        Some(r) => {
            let mut v = match &r.result {
                Ok(status) => json!(status.view()),
                Err(e) => json!({"error": e}),
            };
            v["read_at"] = json!(r.read_at.to_rfc3339());
            v
        }
    }
}

/// What works but is weaker than it should be: an explicitly set `MQTT_CLIENT_ID`; standbys that
/// stream while none is in sync (a database failover now can lose acknowledged messages — the
/// `replication` alert's warning, said here before it happens).
fn warnings(s: &HttpState) -> Vec<String> {
    let mut w: Vec<String> = s
        .mqtt_client_id
        .as_ref()
        .and_then(|c| c.warning())
        .into_iter()
        .collect();
    if let Some(Ok(r)) = s.status.replication().map(|r| r.result) {
        if let Some(why) = r.why_not().filter(|_| r.standbys().count() > 0) {
            w.push(format!(
                "commits are not synchronously replicated although standbys stream ({why}): a database failover now can lose messages already acknowledged"
            ));
        }
    }
    let config = s.status.config();
    w.extend(config.drift.iter().cloned());
    if let (Some(latest), Some(problem)) = (config.latest, &config.problem) {
        w.push(format!(
            "the cluster configuration's version {latest} cannot run on this node, which keeps version {}: {problem}",
            config.version.map_or("none".into(), |v| v.to_string())
        ));
    }
    w
}

async fn live(State(s): State<HttpState>) -> Response {
    let reason = if s.lease.as_ref().is_some_and(|l| l.is_idle_leader()) {
        "holds the lease but runs no leadership term: not ingesting"
    } else if stuck(&s) {
        "past the lease deadline while leading or draining: renewals stopped or demotion hangs"
    } else {
        return Json(json!({"live": true, "role": role_name(&s)})).into_response();
    };
    let body = json!({"live": false, "reason": reason});
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn ready(State(s): State<HttpState>) -> Response {
    let db = db_probe(&s).await;
    let ok = db["reachable"].as_bool().unwrap_or(false);
    (
        code(ok),
        Json(json!({"ready": ok, "role": role_name(&s), "database": db})),
    )
        .into_response()
}

async fn lease(State(s): State<HttpState>) -> Response {
    let mut view = lease_view(&s);
    if let Some(pool) = &s.pool {
        let row = async {
            let c = leasehold_store::pooled(pool).await?;
            leasehold_store::queries::lease(&**c, &s.lease_name).await
        };
        match tokio::time::timeout(Duration::from_secs(2), row).await {
            Ok(Ok(Some(r))) => {
                view["database"] = json!(r);
                view["database"]["live"] = json!(r.is_live());
            }
            Ok(Ok(None)) => view["database"] = json!(null),
            Ok(Err(e)) => view["database_error"] = json!(redact(&e.to_string())),
            Err(_) => view["database_error"] = json!("timed out after 2s"),
        }
    }
    Json(view).into_response()
}

/// 503 when this node needs the broker and is not connected, or when the broker refuses some
/// of the wanted topic filters (nothing published on them reaches the session).
async fn mqtt(State(s): State<HttpState>) -> Response {
    let m = s.status.mqtt();
    let mut v = with_client_id(mqtt_view(&m), &s);
    let needs = s.observer || matches!(role_of(&s), Role::Leader { .. });
    let mut problems = Vec::new();
    if needs && !m.connected {
        problems.push("not connected to the broker".to_string());
    }
    let failed = m.subscriptions.failed_total;
    if needs && failed > 0 {
        problems.push(format!(
            "the broker refused {failed} topic filter(s): see subscriptions.failed"
        ));
    }
    let ok = problems.is_empty();
    v["problems"] = json!(problems);
    (code(ok), Json(v)).into_response()
}

async fn database(State(s): State<HttpState>) -> Response {
    let mut db = db_probe(&s).await;
    db["replication"] = replication_view(&s);
    let ok = db["reachable"].as_bool().unwrap_or(false);
    (code(ok), Json(db)).into_response()
}

/// A 503 with the reason: the endpoint could not get its answer. The reason is redacted: it is
/// a driver's error text, and the answer goes to anyone who can reach the port.
fn unavailable(error: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": redact(&error.to_string())})),
    )
        .into_response()
}

/// Runs `work` on a pooled connection with a deadline; the error becomes a 503 body.
async fn with_db<T, E, F, Fut>(s: &HttpState, work: F) -> Result<T, Response>
where
    F: FnOnce(leasehold_store::PooledClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let Some(pool) = &s.pool else {
        return Err(unavailable("no database configured"));
    };
    let run = async {
        let c = leasehold_store::pooled(pool)
            .await
            .map_err(|e| e.to_string())?;
        work(c).await.map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| unavailable("database did not answer within 5s"))?
        .map_err(unavailable)
}

/// `ok` / `warning` / `critical` by the age of the newest row, and device coverage.
async fn recent_data(State(s): State<HttpState>) -> Result<Response, Response> {
    let (stale_warning, stale_critical) = *s.stale.borrow();
    let window = stale_warning;
    let (age, cov) = with_db(&s, |c| async move {
        let age = leasehold_store::queries::newest_data_age(&**c).await?;
        let cov = leasehold_store::queries::device_coverage(&**c, window, 20).await?;
        Ok::<_, leasehold_store::StoreError>((age, cov))
    })
    .await?;
    let status = match age {
        None => "warning",
        Some(a) if a >= stale_critical.as_secs_f64() => "critical",
        Some(a) if a >= stale_warning.as_secs_f64() => "warning",
        Some(_) => "ok",
    };
    let body = json!({
        "status": status,
        "newest_data_age_seconds": age,
        "reason": if age.is_none() { Some("no telemetry stored yet") } else { None },
        "stale_warning_seconds": stale_warning.as_secs_f64(),
        "stale_critical_seconds": stale_critical.as_secs_f64(),
        "devices": {
            "window_seconds": window.as_secs_f64(),
            "enabled": cov.enabled,
            "heard": cov.heard,
            "coverage": if cov.enabled > 0 { json!(cov.heard as f64 / cov.enabled as f64) } else { Value::Null },
            "silent": cov.silent,
        },
    });
    Ok((code(status != "critical"), Json(body)).into_response())
}

/// Recent alerts, on the shared pool: reading them is the same on every node, observers too.
async fn alerts(State(s): State<HttpState>) -> Result<Response, Response> {
    let rows = with_db(
        &s,
        |c| async move { leasehold_alerts::recent(&c, 50).await },
    )
    .await?;
    let open: Vec<_> = rows.iter().filter(|r| r.resolved_at.is_none()).collect();
    Ok(Json(json!({"open": open, "recent": rows})).into_response())
}

/// Evaluates now; answers with what was found and what changed (`fresh` false: the result of an
/// evaluation within the last second, which stands for a new one). Rate-limited by the
/// evaluator: 429 with `Retry-After` while one runs and none is that recent. An observer answers
/// 409: it does not evaluate.
async fn alerts_check(State(s): State<HttpState>) -> Response {
    use leasehold_alerts::AlertError;
    let Some(h) = s.alerts.clone() else {
        return unavailable("no database configured");
    };
    match h.check().await {
        Ok(c) => {
            let mut body = json!(c.report);
            body["fresh"] = json!(c.fresh);
            Json(body).into_response()
        }
        Err(e @ AlertError::NotEvaluating) => (
            StatusCode::CONFLICT,
            Json(json!({"error": e.to_string(), "evaluates": false, "mode": s.mode})),
        )
            .into_response(),
        Err(e @ AlertError::Busy { retry_after }) => {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, secs.to_string())],
                Json(json!({"error": e.to_string(), "retry_after_seconds": secs})),
            )
                .into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// The cluster report (every node seen in the last day, who leads), and which node answered.
async fn cluster(State(s): State<HttpState>) -> Result<Response, Response> {
    /// `/cluster`'s answer: the report `leasehold status --json` shows too, plus who answered.
    #[derive(serde::Serialize)]
    struct Answer {
        #[serde(flatten)]
        report: ClusterReport,
        answered_by: String,
    }
    let lease_name = s.lease_name.clone();
    let report = with_db(&s, |c| async move {
        ClusterReport::read(&**c, &lease_name).await
    })
    .await?;
    Ok(Json(Answer {
        report,
        answered_by: s.instance_id,
    })
    .into_response())
}

async fn metrics_text() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().encode(),
    )
        .into_response()
}
