//! What ships in `deploy/` and `docker-compose.yml`, checked with the real tools: promtool, a
//! real Prometheus scraping two running nodes (every dashboard panel must return data),
//! docker-compose, systemd-analyze, and the systemd notify protocol of a running node.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::helpers::{check, Cluster, BIN};
use anyhow::{bail, ensure, Context, Result};
use leasehold_testkit::eventually;
use leasehold_testkit::prometheus::Prometheus;
use leasehold_testkit::publish::{numbered_from, publish_all, Stream};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (make deps installs it)"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn prometheus_rules_pass_promtool_checks_and_unit_tests() -> Result<()> {
    let dir = root().join("deploy/prometheus");
    let out = run(Command::new("promtool")
        .args(["check", "rules", "rules.yml"])
        .current_dir(&dir))?;
    ensure!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let out = run(Command::new("promtool")
        .args(["test", "rules", "rules_test.yml"])
        .current_dir(&dir))?;
    ensure!(out.contains("SUCCESS"), "{out}");
    run(Command::new("promtool")
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir))?;
    Ok(())
}

#[test]
fn docker_compose_file_is_valid_and_has_the_whole_stack() -> Result<()> {
    let f = root().join("docker-compose.yml");
    let f = f.to_str().context("path")?;
    // The broker's user is created by the operator first: without its password the file refuses.
    let refused = Command::new("docker-compose")
        .args(["-f", f, "config", "-q"])
        .env_remove("LEASEHOLD_MQTT_PASSWORD")
        .output()?;
    ensure!(
        !refused.status.success(),
        "compose ran without the broker user's password"
    );
    let compose = |args: &[&str]| {
        run(Command::new("docker-compose")
            .args(["-f", f])
            .args(args)
            .env("LEASEHOLD_MQTT_PASSWORD", "test-only"))
    };
    compose(&["config", "-q"])?;
    let services = compose(&["config", "--services"])?;
    for s in [
        "postgres",
        "mosquitto",
        "node-a",
        "node-b",
        "prometheus",
        "grafana",
    ] {
        ensure!(
            services.lines().any(|l| l == s),
            "no {s} service:\n{services}"
        );
    }
    // The files the stack mounts exist.
    let config = compose(&["config"])?;
    for p in [
        "deploy/mosquitto/mosquitto.conf",
        "deploy/mosquitto/acl",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/rules.yml",
        "deploy/grafana/provisioning",
        "deploy/grafana/dashboards",
    ] {
        ensure!(config.contains(p), "compose does not mount {p}");
        ensure!(root().join(p).exists(), "{p} missing");
    }
    Ok(())
}

#[test]
fn systemd_unit_verifies_and_env_examples_name_only_real_settings() -> Result<()> {
    let dir = root().join("deploy/systemd");
    let unit = std::fs::read_to_string(dir.join("leasehold.service"))?;
    for line in [
        "Type=notify",
        "Restart=always",
        "WatchdogSec=",
        "TimeoutStopSec=",
        "ExecStart=/usr/local/bin/leasehold run",
    ] {
        ensure!(unit.contains(line), "unit lacks {line}");
    }
    // systemd-analyze checks the binary exists: point it at the one just built.
    let tmp = tempfile::tempdir()?;
    let copy = tmp.path().join("leasehold.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/leasehold", BIN))?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("systemd-analyze")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "systemd-analyze verify: {err}");
    ensure!(
        !err.contains("leasehold.service:"),
        "systemd-analyze complained about the unit: {err}"
    );

    for host in ["host-a.env", "host-b.env"] {
        let text = std::fs::read_to_string(dir.join(host))?;
        let mut keys = Vec::new();
        for l in text.lines().map(str::trim) {
            let l = l.trim_start_matches('#');
            let Some((k, _)) = l.split_once('=') else {
                continue;
            };
            if k.chars().all(|c| c.is_ascii_uppercase() || c == '_') && !k.is_empty() {
                ensure!(
                    leasehold_config::KEYS.contains(k),
                    "{host}: {k} is not a setting"
                );
                keys.push(k.to_string());
            }
        }
        for k in [
            "INSTANCE_ID",
            "DATABASE_URL",
            "MQTT_URL",
            "ALERT_WEBHOOK_URL",
        ] {
            ensure!(keys.iter().any(|x| x == k), "{host} lacks {k}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tells_systemd_it_is_ready_feeds_the_watchdog_and_says_when_it_stops() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        c.spawn_with(
            "node-a",
            &[
                ("NOTIFY_SOCKET", path.display().to_string()),
                ("WATCHDOG_USEC", "400000".into()),
            ],
        )?;
        let mut seen: Vec<String> = Vec::new();
        let next = || async {
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(30), sock.recv(&mut buf))
                .await
                .context("no notify message within 30s")??;
            Ok::<_, anyhow::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        while seen.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
            seen.push(next().await?);
        }
        ensure!(seen[0].starts_with("READY=1"), "first message: {seen:?}");
        c.wait_leader().await?;

        c.node("node-a").signal(libc::SIGTERM);
        loop {
            let m = next().await?;
            if m == "STOPPING=1" {
                break;
            }
            ensure!(m == "WATCHDOG=1", "unexpected {m:?}");
        }
        let status = c
            .node_mut("node-a")
            .wait_exit(Duration::from_secs(20))
            .await?;
        ensure!(status.success(), "exit {status:?}");
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_panel_query_returns_data_from_a_real_prometheus_scraping_two_nodes() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        c.spawn("node-a")?;
        c.spawn("node-b")?;
        c.wait_leader().await?;
        let db = c.pg.client().await?;
        db.batch_execute(
            "INSERT INTO devices (device_id, topic) VALUES
                ('g1', 'devices/g1/telemetry'), ('g2', 'devices/g2/telemetry')",
        )
        .await?;
        // Traffic for every panel: readings, a duplicate, a dead letter.
        let base = chrono::Utc::now().timestamp_micros();
        let dup = numbered_from(base, "graf", "g1", 0).into_bytes();
        publish_all(
            c.mq.port,
            vec![
                ("devices/g1/telemetry".into(), dup.clone()),
                ("devices/g1/telemetry".into(), dup),
                ("devices/g2/telemetry".into(), b"not json".to_vec()),
            ],
        )
        .await?;
        let stream = Stream::start(c.mq.port, "graf-stream", 2, 50);

        let targets: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.http_port()))
            .collect();
        let rules = root().join("deploy/prometheus/rules.yml");
        let prom = Prometheus::start(&targets, &[rules.as_path()]).await?;

        let dash: Value = serde_json::from_str(&std::fs::read_to_string(
            root().join("deploy/grafana/dashboards/leasehold.json"),
        )?)?;
        let mut queries = Vec::new();
        for p in dash["panels"].as_array().context("panels")? {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            let targets = p["targets"].as_array().context("targets")?;
            ensure!(!targets.is_empty(), "panel {title} has no query");
            for t in targets {
                let expr = t["expr"].as_str().context("expr")?;
                // Grafana's variables, as Grafana would fill them for a 1-minute view.
                let expr = expr
                    .replace("$__rate_interval", "10s")
                    .replace("$__range", "1m")
                    .replace("$__interval", "1s");
                queries.push((title.clone(), expr));
            }
        }
        for title in [
            "Who leads",
            "Failovers",
            "Messages per second",
            "Batch write latency",
            "Receive-to-commit latency",
            "Pending messages",
            "Data age",
            "Device coverage",
            "Nodes alive",
        ] {
            ensure!(queries.iter().any(|(t, _)| t == title), "no panel {title}");
        }

        // Every query returns at least one series with a real number.
        let last = std::sync::Mutex::new(String::new());
        let waited = eventually(
            Duration::from_secs(60),
            "every panel query has data",
            || {
                let (prom, queries, last) = (&prom, &queries, &last);
                async move {
                    for (title, q) in queries {
                        let body = prom.query(q).await?;
                        let v: Value = serde_json::from_str(&body)?;
                        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
                        let numeric = result.iter().any(|r| {
                            r["value"][1]
                                .as_str()
                                .and_then(|x| x.parse::<f64>().ok())
                                .is_some_and(f64::is_finite)
                        });
                        if v["status"] != "success" || !numeric {
                            if let Ok(mut l) = last.lock() {
                                *l = format!("panel {title:?}: {q}\n -> {body}");
                            }
                            return Ok(false);
                        }
                    }
                    Ok(true)
                }
            },
        )
        .await;
        if waited.is_err() {
            let last = last.lock().map(|l| l.clone()).unwrap_or_default();
            bail!("{last}\nprometheus log:\n{}", prom.log());
        }

        // Who leads shows exactly one leader; the dead letter and the duplicate are counted.
        let v: Value = serde_json::from_str(&prom.query("sum(leasehold_lease_is_leader)").await?)?;
        ensure!(v["data"]["result"][0]["value"][1] == "1", "{v}");
        let v: Value = serde_json::from_str(
            &prom
                .query("sum(leasehold_messages_dead_lettered_total)")
                .await?,
        )?;
        ensure!(v["data"]["result"][0]["value"][1] == "1", "{v}");

        // The alert rules loaded and evaluate without errors against live series.
        let (_, body) = leasehold_testkit::http(prom.port, "GET", "/api/v1/rules").await?;
        let v: Value = serde_json::from_str(&body)?;
        let rules = v["data"]["groups"][0]["rules"]
            .as_array()
            .context("rules")?;
        ensure!(rules.len() == 8, "{body}");
        for r in rules {
            ensure!(
                r["health"] != "err",
                "rule {} failed: {}",
                r["name"],
                r["lastError"]
            );
        }
        stream.stop().await?;
        Ok(())
    }
    .await;
    check(&c, res);
}
