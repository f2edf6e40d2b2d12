//! Operations surface: alerts raised by any node, recorded once per kind, posted to a real webhook
//! receiver on loopback with retries; `/cluster`, `/health/recent-data`, `/health/alerts` and
//! `leasehold status`.

use std::time::Duration;

use crate::helpers::{check, Cluster};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{numbered_from, publish_all};
use leasehold_testkit::webhook::WebhookReceiver;
use leasehold_testkit::{eventually, http};
use serde_json::Value;

/// Fast alert timings for tests: evaluate every 300 ms, no grace to speak of.
fn alert_env(hook: &WebhookReceiver, window: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ALERT_WEBHOOK_URL", hook.url.clone()),
        ("ALERT_CHECK_INTERVAL", "300ms".into()),
        ("ALERT_GRACE", "1s".into()),
        ("ALERT_WINDOW", window.into()),
    ]
}

fn reading(device: &str, seq: u64) -> (String, Vec<u8>) {
    // Timestamps near now, so that each reading is new.
    let base = chrono::Utc::now().timestamp_micros();
    (
        format!("devices/{device}/telemetry"),
        numbered_from(base, "ops", device, seq).into_bytes(),
    )
}

/// (id, level, open) of every alert of `kind`.
async fn alert_rows(c: &Cluster, kind: &str) -> Result<Vec<(i64, String, bool)>> {
    let db = c.pg.client().await?;
    let rows = db
        .query(
            "SELECT id, level, resolved_at IS NULL FROM alerts WHERE kind = $1 ORDER BY id",
            &[&kind],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

async fn wait_open(c: &Cluster, kind: &str, level: &str) -> Result<i64> {
    eventually(
        Duration::from_secs(30),
        &format!("{kind} open at {level}"),
        || async {
            Ok(alert_rows(c, kind)
                .await?
                .iter()
                .any(|(_, l, open)| *open && l == level))
        },
    )
    .await?;
    let rows = alert_rows(c, kind).await?;
    rows.iter()
        .find(|(_, _, open)| *open)
        .map(|r| r.0)
        .context("open alert vanished")
}

async fn wait_resolved(c: &Cluster, kind: &str, id: i64) -> Result<()> {
    eventually(
        Duration::from_secs(30),
        &format!("{kind} #{id} resolved"),
        || async {
            Ok(alert_rows(c, kind)
                .await?
                .iter()
                .any(|(i, _, open)| *i == id && !*open))
        },
    )
    .await?;
    Ok(())
}

/// The webhook texts delivered for alert `id` with `action`.
fn posts(hook: &WebhookReceiver, kind: &str, action: &str, id: i64) -> Result<usize> {
    let mut n = 0;
    for body in hook.delivered() {
        let v: Value = serde_json::from_str(&body).context("webhook body is JSON")?;
        let text = v["text"]
            .as_str()
            .context("Slack-compatible body has text")?;
        if text.contains(&format!("] {kind} ({action}, alert #{id},")) {
            n += 1;
        }
    }
    Ok(n)
}

async fn wait_post(hook: &WebhookReceiver, kind: &str, action: &str, id: i64) -> Result<()> {
    eventually(
        Duration::from_secs(30),
        &format!("webhook {kind} {action} #{id}"),
        || async { Ok(posts(hook, kind, action, id)? >= 1) },
    )
    .await?;
    Ok(())
}

/// After the run: every change of every alert row was posted exactly once, although two nodes
/// evaluated all along.
async fn assert_each_change_posted_once(c: &Cluster, hook: &WebhookReceiver) -> Result<()> {
    let db = c.pg.client().await?;
    for r in db
        .query("SELECT id, kind, resolved_at IS NOT NULL FROM alerts", &[])
        .await?
    {
        let (id, kind, resolved): (i64, String, bool) = (r.get(0), r.get(1), r.get(2));
        if resolved {
            // Resolution may still be in the receiver's retry path: wait for it, then count.
            wait_post(hook, &kind, "resolved", id).await?;
        }
        ensure!(
            posts(hook, &kind, "opened", id)? == 1,
            "alert #{id} {kind}: opened posted {} times",
            posts(hook, &kind, "opened", id)?
        );
        ensure!(
            posts(hook, &kind, "resolved", id)? == usize::from(resolved),
            "alert #{id} {kind}: resolved posted {} times",
            posts(hook, &kind, "resolved", id)?
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_data_and_dead_letters_open_escalate_resolve_and_are_posted_once_with_retries() {
    // The receiver fails the first two deliveries: retries must still get every change through.
    let hook = WebhookReceiver::start(2).await.expect("receiver");
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = alert_env(&hook, "4s");
    c.extra_env.push(("STALE_WARNING", "4s".into()));
    c.extra_env.push(("STALE_CRITICAL", "7s".into()));
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        c.wait_leader().await?;
        publish_all(c.mq.port, vec![reading("d1", 0)]).await?;
        publish_all(
            c.mq.port,
            vec![("devices/d1/telemetry".into(), b"{broken".to_vec())],
        )
        .await?;

        let dl = wait_open(&c, "dead_letters_rising", "warning").await?;
        wait_post(&hook, "dead_letters_rising", "opened", dl).await?;
        // No more dead letters: the window passes and it resolves by itself.
        wait_resolved(&c, "dead_letters_rising", dl).await?;

        // Data stops: warning, then critical on the same alert.
        let stale = wait_open(&c, "data_stale", "warning").await?;
        let again = wait_open(&c, "data_stale", "critical").await?;
        ensure!(stale == again, "escalation opened a second alert");
        wait_post(&hook, "data_stale", "escalated", stale).await?;
        let (code, body) = http(c.node("node-b").http_port(), "GET", "/health/recent-data").await?;
        ensure!(code == 503, "critical data age answers 503: {code} {body}");
        ensure!(body.contains(r#""status":"critical""#), "{body}");

        // Data flows again: resolved.
        publish_all(c.mq.port, vec![reading("d1", 1)]).await?;
        wait_resolved(&c, "data_stale", stale).await?;
        let (code, body) = http(c.node("node-a").http_port(), "GET", "/health/recent-data").await?;
        ensure!(
            code == 200 && body.contains(r#""status":"ok""#),
            "{code} {body}"
        );

        let (_, alerts) = http(c.node("node-a").http_port(), "GET", "/health/alerts").await?;
        let v: Value = serde_json::from_str(&alerts)?;
        let recent = v["recent"].as_array().context("recent alerts")?;
        ensure!(
            recent.iter().any(|a| a["id"] == stale
                && a["kind"] == "data_stale"
                && a["level"] == "critical"
                && !a["resolved_at"].is_null()),
            "/health/alerts lacks the resolved data_stale alert: {alerts}"
        );

        assert_each_change_posted_once(&c, &hook).await?;
        let attempts = hook.requests().len();
        let delivered = hook.delivered().len();
        ensure!(
            attempts == delivered + 2,
            "the two failed deliveries were retried: {attempts} attempts, {delivered} delivered"
        );
        ensure!(
            hook.requests().iter().all(|r| r.method == "POST"
                && r.path == "/hooks/T000/B000/secret-token"
                && r.content_type.as_deref() == Some("application/json")),
            "webhook requests: {:?}",
            hook.requests()
        );
        for n in ["node-a", "node-b"] {
            ensure!(
                !c.node(n).log().contains("secret-token"),
                "{n} logged the webhook URL"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leader_and_leader_off_the_broker_are_raised_by_the_nodes_that_remain() {
    let hook = WebhookReceiver::start(0).await.expect("receiver");
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = alert_env(&hook, "1m");
    let res = async {
        c.spawn("node-a")?;
        // A node that never leads still watches: the leader cannot report its own death.
        c.spawn_with("watcher", &[("MQTT_MODE", "disabled".into())])?;
        c.wait_leader().await?;

        // The broker goes away: the leader is still leading, but not receiving.
        c.mq.stop();
        let off = wait_open(&c, "leader_mqtt_disconnected", "critical").await?;
        wait_post(&hook, "leader_mqtt_disconnected", "opened", off).await?;
        c.mq.start_again().await?;
        wait_resolved(&c, "leader_mqtt_disconnected", off).await?;
        // Posted before the kill: the node that records a change posts it, and a node killed
        // before its post goes out takes the post with it (the change stays in `alerts`).
        wait_post(&hook, "leader_mqtt_disconnected", "resolved", off).await?;

        // The only production node dies: nobody leads.
        c.node_mut("node-a").kill9();
        let none = wait_open(&c, "no_leader", "critical").await?;
        let db = c.pg.client().await?;
        let by: String = db
            .query_one("SELECT opened_by FROM alerts WHERE id = $1", &[&none])
            .await?
            .get(0);
        ensure!(by == "watcher", "no_leader opened by {by}");
        wait_post(&hook, "no_leader", "opened", none).await?;
        let (_, status) = http(c.node("watcher").http_port(), "GET", "/health/alerts").await?;
        ensure!(status.contains(r#""kind":"no_leader""#), "{status}");

        // A replacement takes over: resolved.
        c.spawn("node-b")?;
        wait_resolved(&c, "no_leader", none).await?;
        wait_post(&hook, "no_leader", "resolved", none).await?;
        assert_each_change_posted_once(&c, &hook).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_fight_lost_session_and_flapping_are_alerts() {
    let hook = WebhookReceiver::start(0).await.expect("receiver");
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = alert_env(&hook, "2m");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, _) = c.wait_leader().await?;

        // A stray process with the cluster's client id keeps taking the connection.
        let (_, body) = http(c.node(&leader).http_port(), "GET", "/health/mqtt").await?;
        let v: Value = serde_json::from_str(&body)?;
        let client_id = v["client_id"].as_str().context("client_id")?.to_string();
        let rogue = tokio::spawn(fight(client_id, c.mq.port));
        let fight_id = wait_open(&c, "mqtt_client_id_fight", "critical").await;
        rogue.abort();
        let fight_id = fight_id?;
        wait_post(&hook, "mqtt_client_id_fight", "opened", fight_id).await?;

        // The broker comes back without its sessions (lost disk / no persistence).
        c.wait_leader().await?;
        c.mq.stop();
        c.mq.forget_sessions()?;
        c.mq.start_again().await?;
        let lost = wait_open(&c, "mqtt_session_lost", "critical").await?;
        wait_post(&hook, "mqtt_session_lost", "opened", lost).await?;

        // Leadership bounced between the two nodes: flapping.
        for _ in 0..4 {
            c.wait_leader().await?;
            let out = c.cli(&["step-down"])?;
            ensure!(
                out.status.success(),
                "step-down: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let flap = wait_open(&c, "lease_flapping", "warning").await?;
        wait_post(&hook, "lease_flapping", "opened", flap).await?;

        // status shows the open alerts to the person on call.
        let out = c.cli(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        for kind in [
            "mqtt_client_id_fight",
            "mqtt_session_lost",
            "lease_flapping",
        ] {
            ensure!(text.contains(kind), "status lacks {kind}:\n{text}");
        }
        assert_each_change_posted_once(&c, &hook).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Connects with `client_id` over and over, taking the session from whoever holds it.
async fn fight(client_id: String, port: u16) {
    loop {
        let mut opts = rumqttc::MqttOptions::new(&client_id, "127.0.0.1", port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5));
        let (_client, mut el) = rumqttc::AsyncClient::new(opts, 10);
        // Hold the connection briefly, then reconnect: each connect displaces the leader.
        let _ = tokio::time::timeout(Duration::from_millis(400), async {
            while el.poll().await.is_ok() {}
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_view_recent_data_coverage_and_status() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env
        .push(("MQTT_PASSWORD", "mqtt-secret-value".into()));
    c.extra_env.push(("MQTT_USERNAME", "ingest".into()));
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        let (leader, epoch) = c.wait_leader().await?;
        let db = c.pg.client().await?;
        db.batch_execute(
            "INSERT INTO devices (device_id, topic) VALUES
                ('m1', 'devices/m1/telemetry'), ('m2', 'devices/m2/telemetry'),
                ('m3', 'devices/m3/telemetry'), ('m4', 'devices/m4/telemetry')",
        )
        .await?;
        publish_all(c.mq.port, vec![reading("m1", 0), reading("m3", 0)]).await?;
        eventually(Duration::from_secs(15), "two readings stored", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? == 2)
        })
        .await?;

        let (code, body) = http(c.node("node-b").http_port(), "GET", "/health/recent-data").await?;
        ensure!(code == 200, "{code} {body}");
        let v: Value = serde_json::from_str(&body)?;
        ensure!(v["status"] == "ok", "{body}");
        ensure!(
            v["devices"]["enabled"] == 4 && v["devices"]["heard"] == 2,
            "{body}"
        );
        ensure!(v["devices"]["coverage"] == 0.5, "{body}");
        ensure!(
            v["devices"]["silent"] == serde_json::json!(["m2", "m4"]),
            "{body}"
        );

        // Both nodes appear with their roles; the view is the same from either node.
        eventually(
            Duration::from_secs(15),
            "both nodes in /cluster",
            || async {
                let (_, body) = http(c.node("node-b").http_port(), "GET", "/cluster").await?;
                let v: Value = serde_json::from_str(&body)?;
                Ok(v["nodes_alive"] == 2)
            },
        )
        .await?;
        for n in ["node-a", "node-b"] {
            let (code, body) = http(c.node(n).http_port(), "GET", "/cluster").await?;
            ensure!(code == 200, "{code} {body}");
            let v: Value = serde_json::from_str(&body)?;
            ensure!(v["leader"]["instance_id"] == leader.as_str(), "{body}");
            ensure!(v["leader"]["epoch"] == epoch, "{body}");
            let nodes = v["nodes"].as_array().context("nodes")?;
            let leads: Vec<_> = nodes.iter().filter(|x| x["leads"] == true).collect();
            ensure!(
                leads.len() == 1 && leads[0]["instance_id"] == leader.as_str(),
                "{body}"
            );
            ensure!(
                nodes
                    .iter()
                    .any(|x| x["role"] == "standby" && x["mode"] == "production"),
                "{body}"
            );
        }

        // Readable at 3 a.m., and machine-readable.
        let out = c.cli(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "status exit {:?}: {text}", out.status);
        ensure!(text.contains(&format!("LEADER   {leader}")), "{text}");
        ensure!(text.contains("NODES    2 alive"), "{text}");
        ensure!(text.contains("ALERTS"), "{text}");
        let out = c.cli(&["status", "--json"])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(v["leader"]["instance_id"] == leader.as_str(), "{v}");

        // Secrets stay out of every answer and every log line.
        for path in [
            "/health",
            "/health/mqtt",
            "/health/database",
            "/health/lease",
            "/cluster",
            "/health/recent-data",
            "/health/alerts",
        ] {
            for n in ["node-a", "node-b"] {
                let (_, body) = http(c.node(n).http_port(), "GET", path).await?;
                ensure!(
                    !body.contains("mqtt-secret-value"),
                    "{n} {path} shows the password"
                );
            }
        }
        let (code, _) = http(c.node("node-a").http_port(), "POST", "/health/alerts/check").await?;
        ensure!(code == 200, "alerts check: {code}");
        for n in ["node-a", "node-b"] {
            ensure!(
                !c.node(n).log().contains("mqtt-secret-value"),
                "{n} logged the password"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Alert thresholds change live: with data said to go stale after an hour, nothing opens; a
/// `config apply` of two seconds opens `data_stale` on the next rounds, and applying an hour
/// again resolves it, the node never restarted.
#[tokio::test]
async fn a_stale_threshold_applied_live_opens_and_resolves_data_stale_without_a_restart() {
    let hook = WebhookReceiver::start(0).await.expect("receiver");
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = alert_env(&hook, "60s");
    c.extra_env.push(("STALE_WARNING", "1h".into()));
    c.extra_env.push(("STALE_CRITICAL", "2h".into()));
    let res = async {
        c.spawn("node-a")?;
        c.wait_leader().await?;
        publish_all(c.mq.port, vec![reading("d1", 0)]).await?;
        eventually(Duration::from_secs(20), "the reading stored", || async {
            Ok(c.count("SELECT count(*) FROM telemetry").await? == 1)
        })
        .await?;
        let pid = c.node("node-a").pid();
        let file = |warning: &str, critical: &str| -> Result<String> {
            let path = c.logs.path().join(format!("stale-{warning}.toml"));
            std::fs::write(
                &path,
                format!(
                    "alert_webhook_url = \"{}\"\nalert_check_interval = \"300ms\"\n\
                     alert_grace = \"1s\"\nalert_window = \"60s\"\n\
                     stale_warning = \"{warning}\"\nstale_critical = \"{critical}\"\n",
                    hook.url
                ),
            )?;
            Ok(path.display().to_string())
        };
        // Data older than the new threshold, judged by the old one: nothing.
        eventually(Duration::from_secs(20), "data 3 s old", || async {
            let (_, b) = http(c.node("node-a").http_port(), "GET", "/health/recent-data").await?;
            let v: Value = serde_json::from_str(&b)?;
            Ok(v["newest_data_age_seconds"].as_f64().unwrap_or(0.0) > 3.0)
        })
        .await?;
        http(c.node("node-a").http_port(), "POST", "/health/alerts/check").await?;
        ensure!(
            alert_rows(&c, "data_stale").await?.is_empty(),
            "data_stale opened at an hour's threshold"
        );

        let applied = c.cli(&["config", "apply", &file("2s", "1h")?])?;
        ensure!(applied.status.success(), "{applied:?}");
        let id = wait_open(&c, "data_stale", "warning").await?;
        // Settings that do not fit together are still refused, naming the one at fault.
        let refused = c.cli(&["config", "apply", &file("1h", "30m")?])?;
        let err = String::from_utf8_lossy(&refused.stderr);
        ensure!(
            refused.status.code() == Some(2)
                && err.lines().count() == 1
                && err.contains("STALE_CRITICAL"),
            "{refused:?}"
        );
        // An hour and two (before: refused, each setting checked alone against the other's
        // default of ten minutes).
        let applied = c.cli(&["config", "apply", &file("1h", "2h")?])?;
        ensure!(applied.status.success(), "{applied:?}");
        wait_resolved(&c, "data_stale", id).await?;
        ensure!(c.node("node-a").pid() == pid, "the node restarted");
        Ok(())
    }
    .await;
    check(&c, res);
}
