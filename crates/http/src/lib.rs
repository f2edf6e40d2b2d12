//! The HTTP surface of a node: health for orchestrators and people, metrics for Prometheus.
//!
//! Every answer is computed from live state (the lease handle, the metrics, a timed database
//! probe), never from a flag someone forgot to update: "ok" must mean working.
//!
//! # Layout
//! - [`HttpState`]: what the handlers read.
//! - [`router`]: the routes; [`serve`]: binds and runs until cancelled.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use leasehold_lease::{LeaseHandle, Role};
use leasehold_store::Pool;
use leasehold_telemetry::metrics;
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
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/lease", get(lease))
        .route("/health/mqtt", get(mqtt))
        .route("/health/database", get(database))
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

/// A leader whose local deadline passed while it still believes it leads is stuck.
fn stuck(s: &HttpState) -> bool {
    matches!(role_of(s), Role::Leader { .. }) && s.lease.as_ref().is_some_and(|l| !l.is_valid())
}

async fn db_probe(s: &HttpState) -> Value {
    let Some(pool) = &s.pool else {
        return json!({"reachable": false, "error": "no database configured"});
    };
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(2), async {
        let c = leasehold_store::pooled(pool).await?;
        c.simple_query("SELECT 1").await?;
        Ok::<_, leasehold_store::StoreError>(())
    })
    .await;
    match res {
        Ok(Ok(())) => json!({"reachable": true, "latency_ms": start.elapsed().as_secs_f64() * 1e3}),
        Ok(Err(e)) => json!({"reachable": false, "error": e.to_string()}),
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
            "seconds_since_renew": metrics().seconds_since_renew(),
        }),
    }
}

fn mqtt_view() -> Value {
    let m = metrics();
    json!({
        "connected": m.mqtt_connected.get() == 1,
        "subscribed_topics": m.mqtt_subscribed_topics.get(),
        "pending": m.messages_pending.get(),
        "reconnects": m.mqtt_reconnects.get(),
    })
}

async fn health(State(s): State<HttpState>) -> Response {
    let db = db_probe(&s).await;
    let db_ok = db["reachable"].as_bool().unwrap_or(false);
    let mqtt = mqtt_view();
    let mqtt_ok = mqtt["connected"].as_bool().unwrap_or(false);
    let role = role_of(&s);
    let needs_mqtt = s.observer || matches!(role, Role::Leader { .. });
    let mut problems = Vec::new();
    if !db_ok {
        problems.push("database unreachable");
    }
    if needs_mqtt && !mqtt_ok {
        problems.push("not connected to the broker");
    }
    if stuck(&s) {
        problems.push("leader past its renewal deadline");
    }
    let age = metrics().data_age.get();
    let body = json!({
        "status": if problems.is_empty() { "ok" } else { "unhealthy" },
        "problems": problems,
        "role": role_name(&s),
        "instance": s.instance_id,
        "mode": s.mode,
        "version": s.version,
        "lease": lease_view(&s),
        "mqtt": mqtt,
        "database": db,
        "newest_data_age_seconds": if age < 0.0 { Value::Null } else { json!(age) },
    });
    (code(problems.is_empty()), Json(body)).into_response()
}

async fn live(State(s): State<HttpState>) -> Response {
    if stuck(&s) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"live": false, "reason": "leader past its renewal deadline: renewals stopped"})),
        )
            .into_response()
    } else {
        Json(json!({"live": true, "role": role_name(&s)})).into_response()
    }
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
                view["database"] = json!({
                    "holder_id": r.holder_id, "instance_id": r.instance_id, "epoch": r.epoch,
                    "expires_in_ms": r.expires_in_ms, "live": r.is_live(),
                    "acquired_at": r.acquired_at.to_rfc3339(), "renewed_at": r.renewed_at.to_rfc3339(),
                });
            }
            Ok(Ok(None)) => view["database"] = json!(null),
            Ok(Err(e)) => view["database_error"] = json!(e.to_string()),
            Err(_) => view["database_error"] = json!("timed out after 2s"),
        }
    }
    Json(view).into_response()
}

async fn mqtt(State(s): State<HttpState>) -> Response {
    let v = mqtt_view();
    let needs = s.observer || matches!(role_of(&s), Role::Leader { .. });
    let ok = !needs || v["connected"].as_bool().unwrap_or(false);
    (code(ok), Json(v)).into_response()
}

async fn database(State(s): State<HttpState>) -> Response {
    let db = db_probe(&s).await;
    let ok = db["reachable"].as_bool().unwrap_or(false);
    (code(ok), Json(db)).into_response()
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
