//! The typed route beside the default route: the same queued messages drained by a leader whose
//! `[[routes]]` extracts them into typed columns of a user table (`on_conflict = "update"`), and
//! what each drain cost the leader's and PostgreSQL's CPU per message.

use std::time::Duration;

use anyhow::Result;
use leasehold_testkit::{eventually, memory_of, NodeProc};
use serde::Serialize;

use crate::mqtt::{create_session, drop_session, publish};
use crate::probes::{cpu_seconds, postgres_cpu_seconds};
use crate::rig::{leader_summary, stop_node, Rig, LEADER_SESSION};

/// The user table of the typed route: four values from the JSON, the payload, the receipt time.
const TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_route (
    device_id   text        NOT NULL,
    ts          timestamptz NOT NULL,
    run         text        NOT NULL,
    seq         bigint      NOT NULL,
    received_at timestamptz NOT NULL,
    dados       jsonb       NOT NULL,
    PRIMARY KEY (device_id, ts))";

const ROUTE: &str = r#"[[routes]]
name = "typed"
topics = ["devices/+/telemetry"]
table = "bench_route"
key = ["device_id", "ts"]
on_conflict = "update"

[routes.columns]
device_id = "$.device_id"
ts = "timestamp"
run = "$.run"
seq = "$.seq"
received_at = "received_at"
dados = "payload"
"#;

/// Which table a drain writes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No routes: `telemetry`.
    Default,
    /// The typed route into `bench_route`.
    Typed,
}

impl Target {
    fn table(self) -> &'static str {
        match self {
            Target::Default => "telemetry",
            Target::Typed => "bench_route",
        }
    }

    fn run_of(self) -> &'static str {
        match self {
            Target::Default => "payload->>'run'",
            Target::Typed => "run",
        }
    }
}

/// One drain of a queued session.
#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub messages: u64,
    /// First receipt to last commit.
    pub rate: f64,
    pub peak_rss: u64,
    /// The leader's CPU (user + system, its whole life) per message, microseconds.
    pub leader_cpu_us: Option<f64>,
    /// PostgreSQL's CPU over the drain per message, microseconds.
    pub postgres_cpu_us: Option<f64>,
}

/// The typed route's drain and the default route's, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Routes {
    pub default: Drain,
    pub typed: Drain,
}

impl Routes {
    pub fn ratio(&self) -> f64 {
        self.typed.rate / self.default.rate.max(1e-9)
    }
}

/// The leader stopped, `n` messages of `run` queued in its session, then drained by a new leader
/// writing `target`.
pub async fn drain(rig: &Rig<'_>, run: &str, n: u64, target: Target) -> Result<(Drain, NodeProc)> {
    create_session(rig.mq.port, LEADER_SESSION).await?;
    publish(rig.mq.port, run, n, 0).await?;
    let extra = match target {
        Target::Default => vec![],
        Target::Typed => {
            rig.db.batch_execute(TABLE).await?;
            let file = rig.logs.join("typed-route.toml");
            std::fs::write(&file, ROUTE)?;
            vec![("LEASEHOLD_CONFIG", file.display().to_string())]
        }
    };
    let pg_before = postgres_cpu_seconds(&rig.pg.data_dir());
    let node = rig.spawn_node_with(&format!("bench-leader-{run}"), &extra)?;
    let count = format!(
        "SELECT count(*) FROM {} WHERE {} = $1",
        target.table(),
        target.run_of()
    );
    eventually(
        Duration::from_secs(300),
        &format!("leasehold to drain {run} into {}", target.table()),
        || async {
            let c: i64 = rig.db.query_one(count.as_str(), &[&run]).await?.get(0);
            Ok(c >= n as i64)
        },
    )
    .await?;
    let leader_cpu = cpu_seconds(node.pid(), false);
    let pg_after = postgres_cpu_seconds(&rig.pg.data_dir());
    let r = rig
        .db
        .query_one(
            format!(
                "SELECT count(*), extract(epoch from max(pg_xact_commit_timestamp(xmin)) - min(received_at))::float8
                 FROM {} WHERE {} = $1",
                target.table(),
                target.run_of()
            )
            .as_str(),
            &[&run],
        )
        .await?;
    let (rows, secs): (i64, Option<f64>) = (r.get(0), r.get(1));
    let per_msg = |s: Option<f64>| s.map(|s| s * 1e6 / n.max(1) as f64);
    let d = Drain {
        messages: rows as u64,
        rate: rows as f64 / secs.unwrap_or(0.0).max(1e-9),
        peak_rss: memory_of(node.pid()).map(|m| m.0).unwrap_or(0),
        leader_cpu_us: per_msg(leader_cpu),
        postgres_cpu_us: per_msg(pg_before.zip(pg_after).map(|(b, a)| a - b)),
    };
    eprintln!(
        "bench: {} drain {:.0} msg/s, CPU per message: leader {} us, PostgreSQL {} us; leader: {}",
        target.table(),
        d.rate,
        fmt_us(d.leader_cpu_us),
        fmt_us(d.postgres_cpu_us),
        leader_summary(&node).await
    );
    Ok((d, node))
}

fn fmt_us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "?".into())
}

/// The default route's drain, then the typed route's, of the same `n` messages.
pub async fn routes_phase(rig: &Rig<'_>, n: u64) -> Result<Routes> {
    let default = drain_and_stop(rig, "route-default", n, Target::Default).await?;
    let typed = drain_and_stop(rig, "route-typed", n, Target::Typed).await?;
    Ok(Routes { default, typed })
}

/// [`drain`], then the leader stopped and its session deleted.
pub async fn drain_and_stop(rig: &Rig<'_>, run: &str, n: u64, target: Target) -> Result<Drain> {
    let (d, mut node) = drain(rig, run, n, target).await?;
    stop_node(&mut node).await?;
    drop_session(rig.mq.port, LEADER_SESSION).await?;
    Ok(d)
}
