//! The run, one function per measured phase, in the order they run: the broker ceiling, Leasehold
//! (live, latency, capacity), the per-message upsert, the baselines' capacity, the outage, and
//! the slow-flush pass. Each phase's consumer is the only session on the broker while it runs: a
//! leader still subscribed during a baseline would store the baseline's messages first and turn
//! its upserts into conflicts, which commit without a flush.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use leasehold_testkit::{eventually, memory_of, Dir, Mosquitto, NodeProc, Postgres};

use crate::args::{Args, Child, Only};
use crate::child::{self, ChildReport};
use crate::mqtt::{create_session, drop_session, publish};
use crate::probes::{check_upsert_wrote, count, fsync_per_sec};
use crate::report::{mib, Leasehold, Outage, Results, SlowFlush, Upsert};
use crate::rig::{
    latency_run, leader_summary, leasehold_live, stop_node, upsert_run, wait_leading, Rig,
    LEADER_SESSION,
};
use crate::route::{drain_and_stop, routes_phase, Drain, Routes, Target};

/// The first PostgreSQL's settings: commit timestamps for the rates, and `pg_stat_statements`
/// (when this PostgreSQL ships it) for what each drain's statements cost.
fn pg_conf() -> String {
    let mut conf = String::from("track_commit_timestamp = on\nshared_buffers = 256MB\n");
    let statements = leasehold_testkit::pg_bin()
        .ok()
        .and_then(|b| Some(b.parent()?.join("lib/pg_stat_statements.so")));
    if statements.is_some_and(|p| p.exists()) {
        conf.push_str("shared_preload_libraries = 'pg_stat_statements'\n");
    }
    conf
}

/// Every phase, then the table, the checks and the JSON report.
pub async fn orchestrate(o: Args) -> Result<()> {
    let bin = std::fs::canonicalize(&o.bin)
        .with_context(|| format!("{} (cargo build --release)", o.bin.display()))?;
    let pg = Postgres::start_durable_with(Dir::temp("leasehold-bench-pg-")?, &pg_conf()).await?;
    let mq = Mosquitto::start().await?;
    let logs = tempfile::Builder::new()
        .prefix("leasehold-bench-")
        .tempdir()?;
    let mut rig = Rig::new(&bin, &mq, logs.path(), pg).await?;
    if let Some(Only::Routes) = o.only {
        return routes_only(&rig, o.messages, o.runs, o.history_rows).await;
    }
    let n = o.messages;
    let fsync = fsync_per_sec(&[]);
    eprintln!(
        "bench: {n} messages per approach; PostgreSQL durable (fsync, synchronous_commit on); this disk: {} fdatasync/s",
        fsync.map(|f| format!("{f:.0}")).unwrap_or_else(|| "?".into())
    );
    let ceiling = ceiling_live(&rig, n).await?;
    // Leasehold before the upsert, whose latency run needs Leasehold's rate.
    let mut leasehold = leasehold_phase(&rig, n).await?;
    let upsert = upsert_phase(&rig, o.upsert_messages, leasehold.half).await?;
    let (ceiling_cap, upsert_cap) = baseline_capacity(&rig, n, o.upsert_messages).await?;
    eprintln!(
        "bench: capacity (queued drain): ceiling {:.0}, upsert {:.0}, leasehold {:.0} msg/s",
        ceiling_cap.rate, upsert_cap.rate, leasehold.capacity
    );
    let routes = routes_phase(&rig, n, "", o.history_rows).await?;
    let outage = outage_phase(&mut rig, &mut leasehold, o.outage_secs).await?;
    // The first PostgreSQL is done with; the slow-flush pass gets the machine to itself.
    drop(rig);
    let slow_flush = if o.flush_latency_us > 0 {
        let shim = match &o.flush_shim {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("libleasehold_flushdelay.so"),
        };
        let pass = SlowPass {
            bin: &bin,
            shim: &shim,
            latency_us: o.flush_latency_us,
            mq: &mq,
            logs: logs.path(),
        };
        Some(pass.run(n, o.upsert_messages).await?)
    } else {
        None
    };
    let results = Results {
        fsync,
        messages: n,
        ceiling,
        ceiling_cap,
        upsert,
        upsert_cap,
        leasehold,
        outage,
        slow_flush,
        routes,
    };
    results.report(&o.json)
}

/// `--only routes`: the routes phase `runs` times, each into emptied tables, then one line per
/// drain (`make bench-drain`: the write path's cost in a minute or two).
async fn routes_only(rig: &Rig<'_>, n: u64, runs: u32, history_rows: u64) -> Result<()> {
    let mut all: Vec<Routes> = Vec::new();
    for i in 1..=runs {
        rig.db
            .batch_execute("TRUNCATE telemetry, dead_letters; DROP TABLE IF EXISTS bench_route")
            .await?;
        // Alone: VACUUM cannot run in the implicit transaction of a multi-statement query.
        rig.db.batch_execute("VACUUM ANALYZE telemetry").await?;
        all.push(routes_phase(rig, n, &format!("-{i}"), history_rows).await?);
    }
    println!("\nroute    run  msg/s    leader us/msg (after its start)  PostgreSQL us/msg (after the leader's start)  broker us/msg   (.: each drain of the route below it, which shows their medians; gateway: readings, 50 per message; sparkplug: DDATA of 20 metrics by alias; history: default into a telemetry of {history_rows} older rows; empty: the same with the history detached, alternating)");
    for (i, r) in all.iter().enumerate() {
        let mut drains: Vec<(&str, &Drain)> = Vec::new();
        for (name, all, median) in [
            ("default", &r.default_rounds, &r.default),
            ("typed", &r.typed_rounds, &r.typed),
            ("gateway", &r.gateway_rounds, &r.gateway),
        ] {
            drains.extend(all.iter().map(|d| (".", d)));
            drains.push((name, median));
        }
        drains.push(("sparkplug", &r.sparkplug));
        for (h, e) in r.history.iter().zip(&r.history_empty) {
            drains.extend([("history", h), ("empty", e)]);
        }
        for (name, d) in drains {
            println!(
                "{name:<9} {:>3}  {:>7.0}  {:>6} ({:>6})  {:>28} ({:>6})  {:>13}",
                i + 1,
                d.rate,
                us(d.leader_cpu_us),
                us(d.leader_cpu_us_after_start(r.leader_start_cpu_ms)),
                us(d.postgres_cpu_us),
                us(d.postgres_cpu_us_after_start(r.postgres_start_cpu_ms)),
                us(d.broker_cpu_us)
            );
        }
    }
    Ok(())
}

fn us(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "?".into())
}

/// Phase 1, the broker ceiling: the same publisher, live, into a subscriber that only acknowledges.
async fn ceiling_live(rig: &Rig<'_>, n: u64) -> Result<ChildReport> {
    let port = rig.mq.port;
    create_session(port, "bench-ceiling").await?;
    let child = tokio::spawn(child::spawn(Child::Ceiling {
        port,
        client_id: "bench-ceiling".into(),
        n,
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = publish(port, "ceiling", n, 0).await?;
    let ceiling = child.await??;
    drop_session(port, "bench-ceiling").await?;
    eprintln!(
        "bench: ceiling {:.0} msg/s (publisher took {:.1}s)",
        ceiling.rate,
        t.as_secs_f64()
    );
    Ok(ceiling)
}

/// Phase 3, Leasehold, live; then its latency at half of that rate, live; then its capacity.
async fn leasehold_phase(rig: &Rig<'_>, n: u64) -> Result<Leasehold> {
    let live = leasehold_live(rig, "leasehold", n).await?;
    let (mut node, rows, rate, peak_rss) = (live.node, live.rows, live.rate, live.peak_rss);
    eprintln!(
        "bench: leasehold {rate:.0} msg/s (publisher took {:.1}s), peak RSS {:.1} MiB",
        live.publish_time.as_secs_f64(),
        mib(peak_rss)
    );
    let half = (rate / 2.0).max(1.0) as u64;
    let (p50, p99) = latency_run(rig, "latency", half, n).await?;
    eprintln!("bench: leasehold latency at {half} msg/s: p50 {p50:.1} ms, p99 {p99:.1} ms");
    stop_node(&mut node).await?;
    let (capacity, drain_peak) = leasehold_capacity(rig, n).await?;
    Ok(Leasehold {
        rows,
        rate,
        capacity,
        peak_rss: peak_rss.max(drain_peak),
        half,
        p50,
        p99,
    })
}

/// Capacity: the leader stopped, the same messages queued in its session, then drained into
/// `telemetry`. Returns the drain's rate and the new leader's RSS.
async fn leasehold_capacity(rig: &Rig<'_>, n: u64) -> Result<(f64, u64)> {
    let d = drain_and_stop(rig, "leasehold-cap", n, Target::Default).await?;
    Ok((d.rate, d.peak_rss))
}

/// Phase 2, the per-message upsert, live with the same publisher (it falls behind; the broker
/// queues); then at `half` of Leasehold's rate for its latency.
async fn upsert_phase(rig: &Rig<'_>, un: u64, half: u64) -> Result<Upsert> {
    eprintln!("bench: publishing {un} to the per-message upsert (about 1k/s on this machine class: this takes a while)");
    let live = upsert_run(rig, "upsert", un, 0, 900).await?;
    eprintln!("bench: per-message upsert {:.0} msg/s", live.rate);
    let at_half_n = half * 5;
    let at_half = upsert_run(rig, "upsert-live", at_half_n, half, 15).await?;
    Ok(Upsert {
        live,
        at_half,
        at_half_n,
    })
}

/// Capacity of the two baselines: each drains a session into which the messages were queued.
async fn baseline_capacity(rig: &Rig<'_>, n: u64, un: u64) -> Result<(ChildReport, ChildReport)> {
    let port = rig.mq.port;
    create_session(port, "bench-ceiling-cap").await?;
    publish(port, "ceiling-cap", n, 0).await?;
    let ceiling_cap = child::spawn(Child::Ceiling {
        port,
        client_id: "bench-ceiling-cap".into(),
        n,
    })
    .await?;
    drop_session(port, "bench-ceiling-cap").await?;
    let cap_n = un.min(20_000);
    create_session(port, "bench-upsert-cap").await?;
    publish(port, "upsert-cap", cap_n, 0).await?;
    let upsert_cap = child::spawn(Child::Upsert {
        port,
        pg_url: rig.pg.url(),
        client_id: "bench-upsert-cap".into(),
        n: cap_n,
        max_secs: 900,
    })
    .await?;
    drop_session(port, "bench-upsert-cap").await?;
    check_upsert_wrote(&rig.db, "upsert-cap", upsert_cap.messages).await?;
    Ok((ceiling_cap, upsert_cap))
}

/// Memory across a database outage under load (`secs` 0: none, the leader only started and
/// stopped); the new leader's RSS is added to Leasehold's peak.
async fn outage_phase(
    rig: &mut Rig<'_>,
    leasehold: &mut Leasehold,
    secs: u64,
) -> Result<Option<Outage>> {
    let mut node = rig.spawn_node("bench-leader")?;
    wait_leading(&node).await?;
    let outage = if secs > 0 {
        Some(measure_outage(rig, &node, leasehold.rate, secs).await?)
    } else {
        None
    };
    let rss = memory_of(node.pid()).map(|m| m.0).unwrap_or(0);
    leasehold.peak_rss = leasehold.peak_rss.max(rss);
    stop_node(&mut node).await?;
    drop_session(rig.mq.port, LEADER_SESSION).await?;
    Ok(outage)
}

/// PostgreSQL stopped for `secs` while the publisher goes on at a quarter of Leasehold's rate;
/// the leader's RSS sampled every second before, during and after.
async fn measure_outage(
    rig: &mut Rig<'_>,
    node: &NodeProc,
    lh_rate: f64,
    secs: u64,
) -> Result<Outage> {
    let rate = (lh_rate / 4.0).clamp(100.0, 2000.0) as u64;
    let total = rate * (secs + 20);
    let port = rig.mq.port;
    let pubt = tokio::spawn(async move { publish(port, "outage", total, rate).await });
    let mut samples = Vec::new();
    let sample = |samples: &mut Vec<f64>| {
        if let Some((_, rss)) = memory_of(node.pid()) {
            samples.push(mib(rss));
        }
    };
    for _ in 0..5 {
        sample(&mut samples);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let before = samples.iter().cloned().fold(0.0, f64::max);
    rig.pg.stop()?;
    eprintln!("bench: PostgreSQL stopped for {secs}s under {rate} msg/s");
    let mut during = Vec::new();
    for _ in 0..secs {
        sample(&mut during);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rig.pg.start_again().await?;
    let db2 = rig.pg.client().await?;
    pubt.await??;
    eventually(
        Duration::from_secs(120),
        "the outage run stored",
        || async { Ok(count(&db2, "outage").await? >= total as i64) },
    )
    .await?;
    let mut after = Vec::new();
    sample(&mut after);
    let stored = count(&db2, "outage").await?;
    let max_during = during.iter().cloned().fold(0.0, f64::max);
    let mut all = samples.clone();
    all.extend(during.iter().cloned());
    all.extend(after.iter().cloned());
    Ok(Outage {
        seconds: secs,
        publish_rate: rate,
        rss_before_mib: before,
        rss_max_during_mib: max_during,
        rss_after_mib: after.first().cloned().unwrap_or(0.0),
        samples_mib: all,
        published: total,
        stored,
    })
}

/// Phase 4, Leasehold and the per-message upsert again, live with the same broker and publisher,
/// on a PostgreSQL whose every flush takes `latency_us` (the `leasehold-flushdelay` shim): the
/// commit cost of the machine class of docs/performance.md, which sets the upsert's rate.
struct SlowPass<'a> {
    bin: &'a Path,
    shim: &'a Path,
    latency_us: u64,
    mq: &'a Mosquitto,
    logs: &'a Path,
}

impl SlowPass<'_> {
    async fn run(&self, n: u64, un: u64) -> Result<SlowFlush> {
        if !self.shim.exists() {
            bail!(
                "{} not found (cargo build --release -p leasehold-flushdelay, or --flush-latency-us 0)",
                self.shim.display()
            );
        }
        let latency_us = self.latency_us;
        let env = [
            ("LD_PRELOAD", self.shim.display().to_string()),
            ("LEASEHOLD_FLUSH_LATENCY_US", latency_us.to_string()),
        ];
        let fsync = fsync_per_sec(&env);
        eprintln!(
            "bench: slow-flush pass: PostgreSQL flushes take {latency_us} us (measured {} fdatasync/s)",
            fsync
                .map(|f| format!("{f:.0}"))
                .unwrap_or_else(|| "?".into())
        );
        let pg = Postgres::start_durable_env(
            Dir::temp("leasehold-bench-pg-slow-")?,
            "track_commit_timestamp = on\nshared_buffers = 256MB\nwal_sync_method = fdatasync",
            &env,
        )
        .await?;
        let rig = Rig::new(self.bin, self.mq, self.logs, pg).await?;
        let mut live = leasehold_live(&rig, "slow-leasehold", n).await?;
        let (rows, lh_rate, lh_peak) = (live.rows, live.rate, live.peak_rss);
        let half = (lh_rate / 2.0).max(1.0) as u64;
        let (p50, p99) = latency_run(&rig, "slow-latency", half, n).await?;
        eprintln!(
            "bench: slow flush: leader: {}",
            leader_summary(&live.node).await
        );
        stop_node(&mut live.node).await?;
        drop_session(self.mq.port, LEADER_SESSION).await?;
        eprintln!("bench: slow flush: leasehold {lh_rate:.0} msg/s; at {half} msg/s p50 {p50:.1} ms, p99 {p99:.1} ms");
        eprintln!("bench: slow flush: publishing {un} to the per-message upsert (about 1k/s: this takes a while)");
        let up = upsert_run(&rig, "slow-upsert", un, 0, 900).await?;
        eprintln!("bench: slow flush: per-message upsert {:.0} msg/s", up.rate);
        Ok(SlowFlush {
            flush_latency_us: latency_us,
            fdatasync_per_sec: fsync,
            upsert_messages: up.messages,
            upsert_rate: up.rate,
            upsert_peak_rss_mib: mib(up.peak_rss),
            leasehold_messages: rows as u64,
            leasehold_rate: lh_rate,
            leasehold_peak_rss_mib: mib(lh_peak),
            latency_rate: half,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            ratio_to_upsert: lh_rate / up.rate.max(1e-9),
        })
    }
}
