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
