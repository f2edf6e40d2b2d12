//! Leadership and failover, end to end: real Postgres, real Mosquitto, real `leasehold` processes.

use std::time::{Duration, Instant};

use crate::helpers::{check, Cluster, POLL, TTL};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::Stream;
use leasehold_testkit::{eventually, http, metric};

/// Starts numbered publishing for `run` and waits until `leader` has written `rows` rows.
async fn stream_until_written(c: &Cluster, run: &str, leader: &str, rows: i64) -> Result<Stream> {
    let stream = Stream::start(c.mq.port, run, 5, 200);
    c.wait_written(leader, rows, Duration::from_secs(10))
        .await?;
    Ok(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exactly_one_leader_and_the_standby_writes_nothing() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, epoch) = c.wait_leader().await?;
        let standby = c.other_than(&leader);
        let stream = Stream::start(c.mq.port, "one-leader", 5, 300);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("one-leader", n).await?;
        ensure!(c.written_by(&standby).await? == 0, "the standby wrote rows");
        ensure!(
            c.count("SELECT count(DISTINCT lease_epoch) FROM telemetry")
                .await?
                == 1,
            "rows from more than one epoch"
        );
        ensure!(
            c.leader().await? == Some((leader.clone(), epoch)),
            "leadership changed without a fault"
        );
        // Each node's own view agrees.
        let (code, body) = http(c.node(&standby).http_port(), "GET", "/health/lease").await?;
        ensure!(
            code == 200 && body.contains("\"role\":\"standby\""),
            "standby view: {body}"
        );
        let (_, body) = http(c.node(&leader).http_port(), "GET", "/health/lease").await?;
        ensure!(body.contains("\"role\":\"leader\""), "leader view: {body}");
        let (_, m) = http(c.node(&standby).http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_lease_is_leader") == Some(0.0),
            "standby metric"
        );
        ensure!(
            metric(&m, "leasehold_messages_written_total") == Some(0.0),
            "standby wrote"
        );
        let (_, m) = http(c.node(&leader).http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_lease_is_leader") == Some(1.0),
            "leader metric"
        );
        ensure!(
            metric(&m, "leasehold_messages_written_total") == Some(n as f64),
            "leader written_total"
        );
        // `leasehold status` names the leader and exits 0.
        let out = c.cli(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains(&leader),
            "status: {text}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_fails_over_within_ttl_plus_poll_and_loses_nothing() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, _) = c.wait_leader().await?;
        let standby = c.other_than(&leader);
        let stream = stream_until_written(&c, "kill9", &leader, 50).await?;
        let killed = Instant::now();
        c.node_mut(&leader).kill9();
        c.wait_written(&standby, 0, Duration::from_secs(15)).await?;
        let took = killed.elapsed();
        println!("kill -9 failover: standby writing after {took:?}");
        // Generous: TTL + poll interval, plus connect, batch and a loaded 2-core machine.
        ensure!(
            took < TTL + POLL + Duration::from_secs(2),
            "failover took {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("kill9", n).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstopped_leader_is_fenced_and_does_not_fight_for_the_client_id() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, old_epoch) = c.wait_leader().await?;
        let standby = c.other_than(&leader);
        let stream = stream_until_written(&c, "sigstop", &leader, 50).await?;
        c.node(&leader).signal(libc::SIGSTOP);
        c.wait_written(&standby, 0, Duration::from_secs(15)).await?;
        let old_rows = c
            .count(&format!(
                "SELECT count(*) FROM telemetry WHERE lease_epoch = {old_epoch}"
            ))
            .await?;
        // Resume the old leader well past its TTL and let it run alongside the new one.
        c.node(&leader).signal(libc::SIGCONT);
        let node_old = c.node(&leader).http_port();
        eventually(
            Duration::from_secs(10),
            "the resumed node to see itself as standby",
            || async {
                let (_, body) = http(node_old, "GET", "/health/lease").await?;
                Ok(body.contains("\"role\":\"standby\""))
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("sigstop", n).await?;
        let after = c
            .count(&format!(
                "SELECT count(*) FROM telemetry WHERE lease_epoch = {old_epoch}"
            ))
            .await?;
        ensure!(
            after == old_rows,
            "the paused leader committed {} rows after the takeover",
            after - old_rows
        );
        let (new_leader, new_epoch) = c.leader().await?.context("a leader")?;
        ensure!(
            new_leader == standby && new_epoch > old_epoch,
            "leadership went back: {new_leader} epoch {new_epoch}"
        );
        // No client-id fight: the new leader's broker connection was never taken over.
        let (_, m) = http(c.node(&standby).http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_mqtt_reconnects_total") == Some(0.0),
            "new leader was disconnected:\n{m}"
        );
        ensure!(
            metric(&m, "leasehold_mqtt_client_id_conflicts_total") == Some(0.0),
            "client id fight"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_over_within_a_second_and_loses_nothing() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, _) = c.wait_leader().await?;
        let standby = c.other_than(&leader);
        let stream = stream_until_written(&c, "sigterm", &leader, 50).await?;
        let sent = Instant::now();
        c.node(&leader).signal(libc::SIGTERM);
        c.wait_written(&standby, 0, Duration::from_secs(10)).await?;
        let took = sent.elapsed();
        println!("SIGTERM hand-over: standby writing after {took:?}");
        ensure!(
            took < Duration::from_secs(1),
            "graceful hand-over took {took:?}"
        );
        let status = c
            .node_mut(&leader)
            .wait_exit(Duration::from_secs(10))
            .await?;
        ensure!(status.success(), "old leader exited with {status}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("sigterm", n).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_down_command_moves_leadership_without_loss() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, epoch) = c.wait_leader().await?;
        let stream = stream_until_written(&c, "step-down", &leader, 20).await?;
        let out = tokio::process::Command::new(crate::helpers::BIN)
            .args(["step-down", "--database-url", &c.pg.url()])
            .output()
            .await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "step-down failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (new_leader, new_epoch) = c.leader().await?.context("a leader")?;
        ensure!(
            new_leader != leader && new_epoch == epoch + 1,
            "{new_leader} epoch {new_epoch}"
        );
        tokio::time::sleep(Duration::from_millis(700)).await;
        let n = stream.stop().await?;
        c.assert_exactly_once("step-down", n).await?;
        ensure!(
            c.leader().await?.map(|l| l.0) == Some(new_leader),
            "leadership flapped back"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_observes_without_writing_or_leading() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn_with("laptop", &[("MQTT_MODE", "development".to_string())])?;
        let port = c.node("laptop").http_port();
        // Subscribed, not only connected: its session is a clean one, and a message published
        // before its SUBACK is not for it.
        eventually(
            Duration::from_secs(15),
            "the observer subscribed",
            || async {
                let (_, m) = http(port, "GET", "/metrics").await?;
                Ok(
                    metric(&m, "leasehold_mqtt_subscribed_topics").unwrap_or(0.0) >= 1.0
                        && metric(&m, "leasehold_mqtt_subscriptions_pending") == Some(0.0),
                )
            },
        )
        .await?;
        let stream = Stream::start(c.mq.port, "observer", 3, 200);
        tokio::time::sleep(Duration::from_millis(800)).await;
        let n = stream.stop().await?;
        eventually(
            Duration::from_secs(10),
            "the observer to see every message",
            || async {
                let (_, m) = http(port, "GET", "/metrics").await?;
                Ok(metric(&m, "leasehold_messages_observed_total").unwrap_or(0.0) >= n as f64)
            },
        )
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM telemetry").await? == 0,
            "observer wrote rows"
        );
        ensure!(
            c.count("SELECT count(*) FROM instance_lock").await? == 0,
            "observer took the lease"
        );
        // A production node started later still receives everything queued for the shared
        // session? No: the session did not exist yet; but it leads and writes new traffic.
        c.spawn("prod")?;
        let (leader, _) = c.wait_leader().await?;
        ensure!(leader == "prod", "leader is {leader}");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demotion_that_hangs_is_ended_by_the_watchdog_before_the_ttl() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn_with(
            "hangs",
            &[("FAILPOINTS", "demotion-hang=return".to_string())],
        )?;
        let (_, epoch) = c.wait_leader().await?;
        // Another holder takes the lease: the next renewal demotes, and demotion hangs.
        let db = c.pg.client().await?;
        db.execute(
            "UPDATE instance_lock SET holder_id = 'thief', instance_id = 'thief', epoch = epoch + 1,
                 expires_at = now() + interval '1 minute'",
            &[],
        )
        .await?;
        let stolen = Instant::now();
        // Between the deadline and the watchdog's exit the process is stuck: it must not look
        // live to an orchestrator.
        let port = c.node("hangs").http_port();
        let mut seen_not_live = false;
        while c.node_mut("hangs").try_status().is_none() && stolen.elapsed() < TTL * 3 {
            if let Ok((503, body)) = http(port, "GET", "/health/live").await {
                seen_not_live |= body.contains("past the lease deadline");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = c.node_mut("hangs").wait_exit(TTL * 3).await?;
        let took = stolen.elapsed();
        ensure!(
            seen_not_live,
            "/health/live never said 503 while the demotion hung"
        );
        println!("watchdog ended the process {took:?} after the lease was taken (epoch {epoch})");
        ensure!(status.code() == Some(70), "exit status {status}");
        // Renewal within 1 s reveals the loss; the watchdog fires at most TTL/6 after the deadline.
        ensure!(
            took < TTL + Duration::from_secs(1),
            "watchdog took {took:?}"
        );
        ensure!(
            c.node("hangs").log().contains("watchdog"),
            "no watchdog log line"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_mode_serves_health_without_mqtt_or_the_lease() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn_with(
            "ops",
            &[
                ("MQTT_MODE", "disabled".to_string()),
                ("MQTT_URL", "mqtt://127.0.0.1:1".to_string()),
            ],
        )?;
        let port = c.node("ops").http_port();
        eventually(Duration::from_secs(15), "healthy", || async {
            Ok(http(port, "GET", "/health").await?.0 == 200)
        })
        .await?;
        let (_, body) = http(port, "GET", "/health").await?;
        ensure!(body.contains("\"role\":\"disabled\""), "{body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        ensure!(
            c.count("SELECT count(*) FROM instance_lock").await? == 0,
            "disabled node took the lease"
        );
        ensure!(
            c.count("SELECT count(*) FROM cluster_nodes WHERE mode = 'disabled'")
                .await?
                == 1,
            "no heartbeat"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
