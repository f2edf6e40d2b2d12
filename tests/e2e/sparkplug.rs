//! Sparkplug B (docs/sparkplug.md) against an edge node built on a published library
//! (pysparkplug, driven by `tests/sparkplug/edge_node.py`): births, data by alias, deaths,
//! rebirth requests, the primary host's STATE, and store and forward across a leader's
//! `kill -9`, with the aliases resolved by the new leader from the database.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use leasehold_testkit::{eventually, http, metric};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::helpers::{check, msg, Cluster};
use leasehold_testkit::publish::publish_all;

const HOST: &str = "leasehold-test";
const NODE: &str = "plant/edge1";
const DEVICE: &str = "plant/edge1/pump1";

/// The cluster's configuration: Sparkplug topics read as `sparkplug_b`, under [`HOST`].
fn config(c: &Cluster) -> Result<String> {
    let path = c.logs.path().join("sparkplug.toml");
    std::fs::write(
        &path,
        format!(
            "mqtt_topics = [\"devices/+/telemetry\", \"spBv1.0/#\"]\n\
             [sparkplug]\nhost_id = \"{HOST}\"\n\
             [[formats]]\ntopics = [\"spBv1.0/#\"]\nformat = \"sparkplug_b\"\n"
        ),
    )?;
    Ok(path.display().to_string())
}

/// The edge node process: commands on its stdin, what it says on its stdout.
struct Edge {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::UnboundedReceiver<String>,
    said: Vec<String>,
}

impl Edge {
    fn start(port: u16) -> Result<Edge> {
        let root = env!("CARGO_MANIFEST_DIR");
        let python = format!("{root}/target/pyenv/bin/python");
        ensure!(
            std::path::Path::new(&python).exists(),
            "{python} is missing: run scripts/install-deps.sh (make test does)"
        );
        let mut child = tokio::process::Command::new(python)
            .arg(format!("{root}/tests/sparkplug/edge_node.py"))
            .args(["--port", &port.to_string(), "--host", HOST])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Edge {
            child,
            stdin,
            lines,
            said: Vec::new(),
        })
    }

    /// Waits for a line starting with `prefix` (remembering every line).
    async fn expect(&mut self, prefix: &str, within: Duration) -> Result<String> {
        if let Some(l) = self.said.iter().find(|l| l.starts_with(prefix)) {
            let l = l.clone();
            self.said.retain(|x| *x != l);
            return Ok(l);
        }
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .with_context(|| format!("the edge node did not say {prefix:?}: {:?}", self.said))?
                .with_context(|| format!("the edge node ended: {:?}", self.said))?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
            self.said.push(line);
        }
    }

    async fn run(&mut self, cmd: &str) -> Result<()> {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        self.expect(&format!("ok {cmd}"), Duration::from_secs(60))
            .await
            .map(|_| ())
    }

    /// Lines said so far that start with `prefix`.
    fn count(&mut self, prefix: &str) -> usize {
        while let Ok(l) = self.lines.try_recv() {
            self.said.push(l);
        }
        self.said.iter().filter(|l| l.starts_with(prefix)).count()
    }

    async fn quit(mut self) -> Result<()> {
        self.run("quit").await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }
}

async fn rows(c: &Cluster, device: &str, kind: &str) -> Result<i64> {
    c.count(&format!(
        "SELECT count(*) FROM telemetry WHERE device_id = '{device}' AND topic LIKE 'spBv1.0/%/{kind}/%'"
    ))
    .await
}

async fn wait_rows(c: &Cluster, device: &str, kind: &str, n: i64) -> Result<()> {
    eventually(
        Duration::from_secs(30),
        &format!("{n} {kind} rows of {device}"),
        || async { Ok(rows(c, device, kind).await? == n) },
    )
    .await?;
    Ok(())
}

/// Device readings (by their distinct temperatures) stored more than once.
async fn stored_twice(c: &Cluster) -> Result<i64> {
    c.count(
        "SELECT count(*) FROM (SELECT payload->>'temperature' FROM telemetry
         WHERE topic LIKE '%/DDATA/%' GROUP BY 1 HAVING count(*) > 1) d",
    )
    .await
}

async fn health(c: &Cluster, node: &str) -> Result<Value> {
    let (_, body) = http(c.node(node).http_port(), "GET", "/health").await?;
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_edge_node_is_read_by_alias_and_a_new_leader_needs_no_rebirth() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let file = config(&c)?;
        c.spawn_args("a", &["--config", &file], &[])?;
        let (first, _) = c.wait_leader().await?;
        c.spawn_args("b", &["--config", &file], &[])?;
        let mut edge = Edge::start(c.mq.port)?;
        // The leader is the primary host: its STATE is online, retained, once it subscribed.
        edge.run("wait_state online").await?;
        let log = c.node(&first).log();
        let (subscribed, online) = (
            log.find("topics subscribed"),
            log.find("Sparkplug primary host online"),
        );
        ensure!(
            matches!((subscribed, online), (Some(s), Some(o)) if s < o),
            "online before the subscriptions: {subscribed:?} {online:?}"
        );
        edge.run("connect").await?;
        edge.run("ddata 20").await?;
        edge.run("ndata 5").await?;
        wait_rows(&c, DEVICE, "DBIRTH", 1).await?;
        wait_rows(&c, DEVICE, "DDATA", 20).await?;
        wait_rows(&c, NODE, "NBIRTH", 1).await?;
        wait_rows(&c, NODE, "NDATA", 5).await?;

        // Every datatype pysparkplug sends, read as JSON by its birth's datatype.
        let db = c.pg.client().await?;
        let birth: Value = db
            .query_one(
                "SELECT payload FROM telemetry WHERE topic = 'spBv1.0/plant/DBIRTH/edge1/pump1'",
                &[],
            )
            .await?
            .get(0);
        let want = json!({
            "temperature": 21.5, "pressure": 1.25, "count": 9223372036854775809u64,
            "offset": -5, "delta": -300, "level": -70000, "total": -1099511627776i64,
            "mode": 200, "port": 60000, "serial": 4000000000u32, "running": true,
            "label": "pump A", "note": "line\nbreak", "id": "6f1c7a52-8f6b-4d7e-9a51-2c1f0d3e4b5a",
            "blob": "AAH+", "samples": [-1, 2, 300], "curve": [0.5, -1.25],
            "flags": [true, false, true, true, false, false, false, false, true],
            "names": ["a", "bc"], "nothing": null, "timestamp": 5,
        });
        for (k, v) in want.as_object().context("object")? {
            ensure!(
                birth.get(k) == Some(v),
                "DBIRTH {k}: {:?}, not {v}: {birth}",
                birth.get(k)
            );
        }
        // Data by alias only: names resolved from the birth, values by its datatypes, each
        // reading at its payload's timestamp.
        let data = db
            .query(
                "SELECT payload, ts FROM telemetry WHERE topic = 'spBv1.0/plant/DDATA/edge1/pump1'
                 ORDER BY (payload->>'temperature')::float8",
                &[],
            )
            .await?;
        for (k, r) in data.iter().enumerate() {
            let p: Value = r.get(0);
            ensure!(
                p == json!({"temperature": k as f64 + 0.5, "pressure": k as f64 * 2.0,
                             "count": (1u64 << 63) + k as u64}),
                "DDATA {k}: {p}"
            );
        }
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters"
        );
        let h = health(&c, &first).await?;
        ensure!(
            h["sparkplug"]["edge_nodes_online"] == 1
                && h["sparkplug"]["devices_online"] == 1
                && h["sparkplug"]["host_id"] == HOST,
            "{}",
            h["sparkplug"]
        );
        let (code, so, _) = {
            let o = c.cli(&["status"])?;
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                (),
            )
        };
        ensure!(
            code == Some(0) && so.contains("SPARKPLUG 1 of 1 edge nodes online, 1 devices online"),
            "{so}"
        );

        // The leader dies: its will says the host is offline; the edge node stores and
        // forwards, and whatever it published meanwhile is queued for the cluster's session.
        c.node_mut(&first).kill9();
        edge.run("wait_state offline").await?;
        edge.run("ddata 10 100").await?;
        edge.run("wait_state online").await?;
        edge.expect("forwarded 10", Duration::from_secs(30)).await?;
        edge.run("ddata 10 200").await?;
        wait_rows(&c, DEVICE, "DDATA", 40).await?;
        let (second, _) = c.wait_leader().await?;
        ensure!(second != first, "b leads");
        // The new leader resolved every alias from the database: no rebirth was asked for,
        // nothing was dead-lettered, and the historical readings kept their own times.
        ensure!(
            edge.count("rebirth") == 0,
            "a rebirth was requested: {:?}",
            edge.said
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters"
        );
        ensure!(
            c.count(
                "SELECT count(*) FROM telemetry WHERE topic LIKE '%/DDATA/%'
                 AND (payload->>'temperature')::float8 >= 100"
            )
            .await?
                == 20,
            "the forwarded and the live readings"
        );
        let (_, m) = http(c.node(&second).http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_sparkplug_rebirths_requested_total") == Some(0.0)
                && metric(&m, "leasehold_sparkplug_edge_nodes_online") == Some(1.0),
            "{m}"
        );
        // Someone else says this host is offline: the host says online again (Sparkplug 3.0),
        // however the JSON is spaced.
        for said in [
            r#"{"online":false,"timestamp":1}"#,
            "{ \"online\" : false,\n  \"timestamp\" : 2 }",
        ] {
            let online_before = edge.count("state online");
            publish_all(c.mq.port, vec![msg(&format!("spBv1.0/STATE/{HOST}"), said)]).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while edge.count("state online") == online_before {
                ensure!(
                    tokio::time::Instant::now() < deadline,
                    "the host did not say online again after {said}: {:?}",
                    edge.said
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // The edge node dies: the broker publishes its will, the NDEATH of its session (its
        // bdSeq the NBIRTH's). (pysparkplug's own clean disconnect sends an NDEATH with the
        // *next* session's bdSeq, which a primary host must ignore, and Leasehold does.)
        edge.child.kill().await?;
        eventually(Duration::from_secs(15), "the edge node offline", || async {
            Ok(health(&c, &second).await?["sparkplug"]["edge_nodes_online"] == 0)
        })
        .await?;
        ensure!(
            health(&c, &second).await?["sparkplug"]["devices_online"] == 0,
            "its device died with it"
        );
        // A graceful hand-over says offline too (a DISCONNECT sends no will).
        let mut watch = Edge::start(c.mq.port)?;
        watch.run("wait_state online").await?;
        c.node(&second).signal(libc::SIGTERM);
        watch.run("wait_state offline").await?;
        watch.quit().await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_alias_a_sequence_gap_and_no_birth_are_dead_letters_and_ask_for_a_rebirth() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let file = config(&c)?;
        c.spawn_args("a", &["--config", &file], &[])?;
        c.wait_leader().await?;
        // An observer beside it reads the same messages with births of its own.
        c.spawn_args(
            "laptop",
            &["--config", &file],
            &[("MQTT_MODE", "development".into())],
        )?;
        eventually(
            Duration::from_secs(30),
            "the observer subscribed",
            || async {
                let (_, body) = http(c.node("laptop").http_port(), "GET", "/health/mqtt").await?;
                let v: Value = serde_json::from_str(&body)?;
                Ok(v["subscribed_topics"].as_u64().unwrap_or(0) >= 2
                    && v["subscriptions"]["pending"] == 0)
            },
        )
        .await?;
        let mut edge = Edge::start(c.mq.port)?;
        edge.run("wait_state online").await?;
        edge.run("connect").await?;
        edge.run("ddata 3").await?;
        wait_rows(&c, DEVICE, "DDATA", 3).await?;

        let reasons = || async {
            c.count("SELECT count(DISTINCT reason) FROM dead_letters")
                .await
        };
        edge.run("unknown_alias").await?;
        edge.expect("rebirth 1", Duration::from_secs(30)).await?;
        edge.run("ddata 2 10").await?;
        wait_rows(&c, DEVICE, "DDATA", 5).await?;
        wait_rows(&c, DEVICE, "DBIRTH", 2).await?;

        edge.run("gap").await?;
        edge.run("ddata 1 20").await?;
        edge.expect("rebirth 2", Duration::from_secs(30)).await?;
        edge.run("ddata 2 30").await?;
        wait_rows(&c, DEVICE, "DDATA", 7).await?;

        edge.run("ddeath").await?;
        eventually(Duration::from_secs(15), "the device offline", || async {
            Ok(health(&c, "a").await?["sparkplug"]["devices_online"] == 0)
        })
        .await?;
        edge.run("ddata 1 40").await?;
        edge.expect("rebirth 3", Duration::from_secs(30)).await?;

        let dead =
            c.pg.client()
                .await?
                .query(
                    "SELECT reason, error, topic FROM dead_letters ORDER BY id",
                    &[],
                )
                .await?;
        let got: Vec<(String, String)> = dead
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        ensure!(reasons().await? == 3 && got.len() == 3, "{got:?}");
        ensure!(
            got[0].0 == "unknown_alias" && got[0].1.contains("alias 999"),
            "{got:?}"
        );
        ensure!(
            got[1].0 == "sequence_gap" && got[1].1.contains("expected"),
            "{got:?}"
        );
        ensure!(
            got[2].0 == "no_birth" && got[2].1.contains(DEVICE),
            "{got:?}"
        );
        // The messages before each refusal and after each rebirth were stored, none twice.
        ensure!(stored_twice(&c).await? == 0, "a reading stored twice");
        let (_, m) = http(c.node("a").http_port(), "GET", "/metrics").await?;
        ensure!(
            metric(&m, "leasehold_sparkplug_rebirths_requested_total") == Some(3.0),
            "{m}"
        );
        if edge.count("timeout") > 0 {
            bail!("the edge node timed out: {:?}", edge.said);
        }
        // The observer resolved the aliases from the births it saw, and would have refused
        // what the leader refused.
        let log = c.node("laptop").log();
        ensure!(
            log.matches("observer: would dead-letter").count() == 3 && log.contains("alias 999"),
            "the observer's view: {}",
            log.lines()
                .filter(|l| l.contains("observer"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        edge.quit().await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A leader that dies right after committing a batch of QoS 0 device data, before anything else
/// of it: the next leader must hold the sequence number that batch was read with, or the edge
/// node's next message is a false `sequence_gap` (a dead letter and a rebirth for data nothing
/// lost). The state is recorded in the batch's own transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_dies_after_a_commit_leaves_the_next_the_sequence_it_read() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        let file = config(&c)?;
        c.spawn_args(
            "a",
            &["--config", &file],
            &[("FAILPOINTS", "crash-after-commit=return".to_string())],
        )?;
        let (first, _) = c.wait_leader().await?;
        ensure!(first == "a", "a leads");
        c.spawn_args("b", &["--config", &file], &[])?;
        let mut edge = Edge::start(c.mq.port)?;
        edge.run("wait_state online").await?;
        edge.run("connect").await?;
        wait_rows(&c, DEVICE, "DBIRTH", 1).await?;
        // The first batch of device data commits, and a dies (its will: offline). What the
        // edge node sends meanwhile is queued for the cluster's session or held and forwarded.
        // One DDATA: Sparkplug's data is QoS 0, so a second one already delivered to a when it
        // dies after the first one's batch (20 ms apart under load) is lost, a real gap.
        edge.run("ddata 1").await?;
        edge.run("wait_state offline").await?;
        edge.run("ddata 5 100").await?;
        edge.run("wait_state online").await?;
        let (second, _) = c.wait_leader().await?;
        ensure!(second == "b", "b leads");
        edge.run("ddata 5 200").await?;
        wait_rows(&c, DEVICE, "DDATA", 11).await?;
        let dead: Vec<(String, String)> =
            c.pg.client()
                .await?
                .query("SELECT reason, error FROM dead_letters ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        ensure!(dead.is_empty(), "dead letters: {dead:?}");
        ensure!(
            edge.count("rebirth") == 0,
            "a rebirth was requested: {:?}",
            edge.said
        );
        ensure!(stored_twice(&c).await? == 0, "a reading stored twice");
        edge.quit().await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_fills_a_narrow_historian_as_docs_sparkplug_md_shows() {
    let mut c = Cluster::start().await.expect("servers");
    let res = async {
        // The SQL and the route of docs/sparkplug.md, as written there.
        let doc = include_str!("../../docs/sparkplug.md");
        let block = |n: usize| {
            doc.split("```sql\n")
                .nth(n)
                .and_then(|s| s.split("```").next())
                .context("the historian SQL in docs/sparkplug.md")
        };
        let (view, table) = (block(1)?, block(2)?);
        let route = doc
            .split("```toml\n")
            .nth(2)
            .and_then(|s| s.split("```").next())
            .context("the historian route in docs/sparkplug.md")?;
        let o = c.cli(&["migrate"])?;
        ensure!(o.status.success(), "migrate: {o:?}");
        c.pg.client().await?.batch_execute(table).await?;
        let path = c.logs.path().join("historian.toml");
        std::fs::write(
            &path,
            format!(
                "mqtt_topics = [\"spBv1.0/#\"]\n[sparkplug]\nhost_id = \"{HOST}\"\n\
                 [[formats]]\ntopics = [\"spBv1.0/#\"]\nformat = \"sparkplug_b\"\n{route}"
            ),
        )?;
        c.spawn_args("a", &["--config", &path.display().to_string()], &[])?;
        c.wait_leader().await?;
        eventually(Duration::from_secs(30), "telemetry partitioned", || async {
            c.count(
                "SELECT count(*) FROM pg_partitioned_table WHERE partrelid = 'telemetry'::regclass",
            )
            .await
            .map(|n| n == 1)
        })
        .await?;
        c.pg.client().await?.batch_execute(view).await?;
        let mut edge = Edge::start(c.mq.port)?;
        edge.run("wait_state online").await?;
        edge.run("connect").await?;
        edge.run("ddata 4").await?;
        // One row per metric value: the DBIRTH's 21 metrics, then 3 metrics of each DDATA.
        eventually(Duration::from_secs(30), "the historian filled", || async {
            Ok(c.count("SELECT count(*) FROM historian").await? == 21 + 4 * 3)
        })
        .await?;
        // The route's `timestamp` is the payload's, not the metric named `timestamp`.
        ensure!(
            c.count("SELECT count(*) FROM historian_in WHERE ts < now() - interval '1 hour'")
                .await?
                == 0,
            "a reading timed by its metric named timestamp"
        );
        ensure!(
            c.count(
                "SELECT count(*) FROM historian WHERE device = 'plant/edge1/pump1'
                 AND metric = 'temperature' AND value = '3.5'::jsonb"
            )
            .await?
                == 1,
            "the last DDATA's temperature"
        );
        // The view over telemetry holds the node's readings (no route takes them); the
        // device's went to the route alone.
        ensure!(
            c.count(
                "SELECT count(*) FROM sparkplug_metrics WHERE device_id = 'plant/edge1'
                 AND metric = 'bdSeq'"
            )
            .await?
                == 1,
            "the NBIRTH's bdSeq in the view"
        );
        ensure!(
            c.count("SELECT count(*) FROM telemetry WHERE device_id = 'plant/edge1/pump1'")
                .await?
                == 0,
            "routed readings are not also in telemetry"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "dead letters"
        );
        // Two DDATA within one millisecond, the second with one metric more: each passes
        // through, the historian holds the four metrics of that instant, the first message's
        // value where both give one, and nothing is dead-lettered.
        edge.run("ddata_at_once 2 10").await?;
        eventually(Duration::from_secs(30), "both messages of one instant", || async {
            Ok(c.count("SELECT count(*) FROM historian_in").await? == 1 + 4 + 2)
        })
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM historian").await? == 21 + 4 * 3 + 4,
            "the metrics of one instant"
        );
        ensure!(
            c.count(
                "SELECT count(*) FROM historian WHERE metric = 'temperature' AND value = '10.5'::jsonb"
            )
            .await?
                == 1,
            "the first message's temperature at that instant"
        );
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "a message of the same instant dead-lettered"
        );
        edge.quit().await?;
        Ok(())
    }
    .await;
    check(&c, res);
}
