//! Shared set-up for the end-to-end suite: a private Postgres and Mosquitto per test, real
//! `leasehold` processes of this package's binary, and queries that check every published
//! message landed exactly once. The harness is `leasehold_testkit::cluster`; this module only
//! points it at the binary Cargo built for the suite.

use std::ops::{Deref, DerefMut};

use anyhow::Result;
use leasehold_testkit::cluster;
use leasehold_testkit::{Mosquitto, Postgres};

pub use leasehold_testkit::cluster::{check, msg, topics_landed, POLL, TTL};

pub const BIN: &str = env!("CARGO_BIN_EXE_leasehold");

/// A [`cluster::Cluster`] running [`BIN`], with the test settings.
pub struct Cluster(cluster::Cluster);

impl Cluster {
    pub async fn start() -> Result<Self> {
        Ok(Cluster(cluster::Cluster::start(BIN).await?))
    }

    /// A cluster on servers the test configured itself (TLS, for instance).
    pub fn with_servers(pg: Postgres, mq: Mosquitto) -> Result<Self> {
        Ok(Cluster(cluster::Cluster::with_servers(BIN, pg, mq)?))
    }
}

impl Deref for Cluster {
    type Target = cluster::Cluster;

    fn deref(&self) -> &cluster::Cluster {
        &self.0
    }
}

impl DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut cluster::Cluster {
        &mut self.0
    }
}

/// A command's exit code (-1: killed by a signal), stdout and stderr.
pub fn out(o: &std::process::Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The route of the store-level tests: `o/<id>` into a table `owned(id, v)` the test makes, the
/// key `id` from the topic, `v` the whole payload; with a writer into `telemetry` and it.
pub async fn owned_writer(
    pg: &Postgres,
    admin: &leasehold_store::Client,
) -> Result<leasehold_store::BatchWriter> {
    use leasehold_config::{OnConflict, RouteSpec, Source};
    let spec = RouteSpec {
        name: "owned".into(),
        topics: vec!["o/+".into()],
        table: "owned".into(),
        key: vec!["id".into()],
        on_conflict: OnConflict::Nothing,
        columns: vec![
            ("id".into(), Source::TopicSegment(1)),
            ("v".into(), Source::JsonPath(vec![])),
        ],
    };
    let (routes, problems) = leasehold_store::routes::resolve(admin, &[spec]).await?;
    anyhow::ensure!(problems.is_empty(), "{problems:?}");
    let mut w = leasehold_store::BatchWriter::connect(
        &pg.url(),
        "a".into(),
        std::time::Duration::from_secs(10),
        leasehold_store::DEFAULT_REDELIVERY_WINDOW,
    )
    .await?;
    w.use_routes(
        std::iter::once(leasehold_store::routes::ResolvedRoute::telemetry())
            .chain(routes)
            .collect(),
    )
    .await?;
    Ok(w)
}

/// Row `idx` of [`owned_writer`]'s route: key `id`, value `v`, its message's packet id and DUP.
pub fn owned_row(idx: usize, id: &str, v: i32, pkid: i32, dup: bool) -> leasehold_store::RouteRow {
    leasehold_store::RouteRow {
        idx,
        route: 1,
        values: vec![
            leasehold_store::Value::Text(id.to_string()),
            leasehold_store::Value::Text(v.to_string()),
        ],
        message: std::sync::Arc::new(leasehold_store::Message {
            topic: format!("o/{id}"),
            payload: format!("{v}").into_bytes().into(),
            raw: None,
            label: None,
            received_at: chrono::Utc::now(),
            pkid,
            dup,
            content_hash: None,
        }),
    }
}
