//! One function per fault: inject it into a running trial, repair it, and return what was
//! measured — fault (or repair) to the first commit under a new epoch, or cut to the watchdog's
//! exit — with the problems only that fault can show.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use leasehold_testkit::proxy::Proxy;
use leasehold_testkit::{http, metric};

use crate::env::{Env, Node};
use crate::fault::Fault;
use crate::probes::wait_new_epoch;
use crate::problem::Problem;
use crate::trial::Run;
use crate::{sleep, POLL, TTL};

/// What injecting a fault measured and found.
#[derive(Default)]
pub(crate) struct Injected {
    pub measured: Option<Duration>,
    pub problems: Vec<Problem>,
}

impl Injected {
    fn measured(measured: Option<Duration>) -> Injected {
        Injected {
            measured,
            problems: Vec::new(),
        }
    }
}

pub(crate) async fn inject(env: &mut Env, run: &Run) -> Result<Injected> {
    match run.fault {
        Fault::Kill9 => kill9(env, run).await,
        Fault::Sigstop => sigstop(env, run).await,
        Fault::DbCut | Fault::BrokerCut => cut(env, run).await,
        Fault::BrokerRestart | Fault::BrokerKill | Fault::BrokerKillNoSave => {
            broker_down(env, run).await
        }
        Fault::PgRestart => pg_restart(env, run).await,
        Fault::PgSlowBelow => pg_slow_below(env, run).await,
        Fault::PgSlowAbove => pg_slow_above(env, run).await,
        Fault::SimultaneousStart => simultaneous_start(env).await,
        Fault::HungDemotion => hung_demotion(env, run).await,
        Fault::StepDown => step_down(env, run).await,
        Fault::Sigterm => sigterm(env, run).await,
        Fault::DbPrimaryLost | Fault::DbSwitchover => anyhow::bail!(
            "{} runs on a replicated database of its own (dbfault), not here",
            run.fault.name()
        ),
    }
}

impl Run {
    /// Time from the fault to the first commit of the run under a newer epoch.
    async fn failover(&self, env: &Env, timeout: Duration) -> Option<Duration> {
        wait_new_epoch(env, &self.name, self.epoch, self.fault_at, timeout).await
    }

    /// Time from now (the repair) to the first commit of the run under any epoch.
    async fn resume(&self, env: &Env) -> Option<Duration> {
        let repaired = Utc::now();
        wait_new_epoch(env, &self.name, 0, repaired, Duration::from_secs(20)).await
    }
}

fn signal_leader(env: &mut Env, run: &Run, signal: i32) -> Result<()> {
    env.node(&run.leader)?
        .proc
        .as_ref()
        .context("leader")?
        .signal(signal);
    Ok(())
}

async fn kill9(env: &mut Env, run: &Run) -> Result<Injected> {
    env.node(&run.leader)?
        .proc
        .as_mut()
        .context("leader")?
        .kill9();
    Ok(Injected::measured(
        run.failover(env, Duration::from_secs(20)).await,
    ))
}

async fn sigstop(env: &mut Env, run: &Run) -> Result<Injected> {
    signal_leader(env, run, libc::SIGSTOP)?;
    let measured = run.failover(env, Duration::from_secs(20)).await;
    sleep(TTL).await;
    signal_leader(env, run, libc::SIGCONT)?;
    sleep(TTL).await;
    Ok(Injected::measured(measured))
}

/// The leader's proxy to PostgreSQL (`DbCut`) or to the broker (`BrokerCut`).
fn cut_proxy(node: &mut Node, fault: Fault) -> &mut Proxy {
    if fault == Fault::DbCut {
        &mut node.db
    } else {
        &mut node.mqtt
    }
}

/// The leader cut off (blackholed) until a new epoch commits, then restored.
async fn cut(env: &mut Env, run: &Run) -> Result<Injected> {
    cut_proxy(env.node(&run.leader)?, run.fault).blackhole();
    let measured = run.failover(env, Duration::from_secs(20)).await;
    cut_proxy(env.node(&run.leader)?, run.fault).restore();
    sleep(TTL).await;
    Ok(Injected::measured(measured))
}

/// The broker restarted, or killed (after an autosave for `BrokerKill`), and started again.
async fn broker_down(env: &mut Env, run: &Run) -> Result<Injected> {
    if run.fault == Fault::BrokerKill {
        // Let the broker save everything it acknowledged (autosave_interval 1 s).
        run.publisher.pause();
        sleep(Duration::from_millis(2500)).await;
    }
    if run.fault == Fault::BrokerRestart {
        env.cluster.mq.stop();
    } else {
        env.cluster.mq.kill();
    }
    env.cluster.mq.start_again().await?;
    run.publisher.resume();
    Ok(Injected::measured(run.resume(env).await))
}

async fn pg_restart(env: &mut Env, run: &Run) -> Result<Injected> {
    env.cluster.pg.stop()?;
    env.cluster.pg.start_again().await?;
    env.reconnect_db().await?;
    Ok(Injected::measured(run.resume(env).await))
}

/// The leader's queries delayed below the demotion deadline: the lease must not change.
async fn pg_slow_below(env: &mut Env, run: &Run) -> Result<Injected> {
    env.node(&run.leader)?.db.set_delay(TTL / 5);
    sleep(TTL * 3).await;
    env.node(&run.leader)?.db.set_delay(Duration::ZERO);
    let mut injected = Injected::default();
    if env.leader().await?.map(|l| l.1) != Some(run.epoch) {
        injected.problems.push(Problem::FalseFailover);
    }
    Ok(injected)
}

async fn pg_slow_above(env: &mut Env, run: &Run) -> Result<Injected> {
    env.node(&run.leader)?.db.set_delay(TTL * 4 / 5);
    let measured = run.failover(env, Duration::from_secs(20)).await;
    env.node(&run.leader)?.db.set_delay(Duration::ZERO);
    sleep(TTL).await;
    Ok(Injected::measured(measured))
}

/// All nodes killed, then three started at the same instant: one leader, no shared epoch.
async fn simultaneous_start(env: &mut Env) -> Result<Injected> {
    for n in &mut env.nodes {
        if let Some(p) = n.proc.as_mut() {
            p.kill9();
        }
    }
    // Let the old lease expire so all three campaign from the same start line.
    sleep(TTL + POLL).await;
    env.add_node_stopped("node-c").await?;
    // All three at (nearly) the same instant: spawning takes microseconds each.
    for name in ["node-a", "node-b", "node-c"] {
        env.relaunch(name)?;
    }
    let mut injected = Injected::default();
    let most = most_leaders_at_once(env, TTL * 3).await;
    if most > 1 {
        injected.problems.push(Problem::SeveralLeaders(most));
    }
    let shared = env.epochs_written_by_several().await?;
    if shared > 0 {
        injected.problems.push(Problem::SharedEpochs(shared));
    }
    Ok(injected)
}

/// The most nodes that said they led at the same time, sampled every 50 ms for `window`.
async fn most_leaders_at_once(env: &Env, window: Duration) -> usize {
    let mut most = 0;
    let start = Instant::now();
    while start.elapsed() < window {
        let mut leaders = 0;
        for n in &env.nodes {
            if let Some(p) = &n.proc {
                if let Ok((_, m)) = http(p.http_port(), "GET", "/metrics").await {
                    if metric(&m, "leasehold_lease_is_leader") == Some(1.0) {
                        leaders += 1;
                    }
                }
            }
        }
        most = most.max(leaders);
        sleep(Duration::from_millis(50)).await;
    }
    most
}

/// A lone leader with the hang switch cut from PostgreSQL: the watchdog must exit it (code 70)
/// before the TTL; then the normal pair takes over and receives what it never acknowledged.
async fn hung_demotion(env: &mut Env, run: &Run) -> Result<Injected> {
    // The others are stopped, the standby first so the leader's graceful stop has nobody to
    // hand over to.
    env.nodes.sort_by_key(|n| n.name == run.leader);
    for n in &mut env.nodes {
        if let Some(mut p) = n.proc.take() {
            p.signal(libc::SIGTERM);
            let _ = p.wait_exit(Duration::from_secs(10)).await;
        }
    }
    let hung = "node-a".to_string();
    env.node(&hung)?.extra = vec![("FAILPOINTS", "demotion-hang=return".into())];
    env.relaunch(&hung)?;
    let (l, _) = env.wait_leader().await?;
    if l != hung {
        bail!("expected {hung} to lead, got {l}");
    }
    let cut_at = Instant::now();
    env.node(&hung)?.db.blackhole();
    let status = env
        .node(&hung)?
        .proc
        .as_mut()
        .context("hung node")?
        .wait_exit(TTL * 3)
        .await?;
    let mut injected = Injected::measured(Some(cut_at.elapsed()));
    if status.code() != Some(70) {
        injected.problems.push(Problem::WatchdogExit(status));
    }
    env.node(&hung)?.db.restore();
    env.node(&hung)?.extra.clear();
    env.relaunch("node-a")?;
    env.relaunch("node-b")?;
    env.wait_leader().await?;
    Ok(injected)
}

/// `leasehold step-down` during full-rate ingest.
async fn step_down(env: &mut Env, run: &Run) -> Result<Injected> {
    let out = tokio::process::Command::new(&env.cluster.bin)
        .args(["step-down", "--database-url", &env.cluster.pg.url()])
        .output()
        .await?;
    let mut injected = Injected::default();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        injected.problems.push(Problem::StepDownFailed(stderr));
    }
    injected.measured = run.failover(env, Duration::from_secs(10)).await;
    Ok(injected)
}

async fn sigterm(env: &mut Env, run: &Run) -> Result<Injected> {
    signal_leader(env, run, libc::SIGTERM)?;
    Ok(Injected::measured(
        run.failover(env, Duration::from_secs(10)).await,
    ))
}
