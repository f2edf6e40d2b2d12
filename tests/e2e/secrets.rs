//! Secrets never leave the node (docs/configuration.md): the real binary is given a password in every form a
//! URL or connection string can carry one, and none of them may appear in its logs (pretty and
//! JSON, at debug level), in any HTTP answer, or in the output of the CLI, errors included.

use std::process::{Command, Output};
use std::time::Duration;

use crate::helpers::{check, Cluster, BIN};
use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{numbered_from, publish_all};
use leasehold_testkit::webhook::WebhookReceiver;
use leasehold_testkit::{eventually, free_port, http};
use serde_json::Value;

/// Every secret handed to the nodes, each a distinct word so that a leak of any part shows.
const SECRETS: &[&str] = &[
    // URL user info, percent-encoded, and as tokio-postgres decodes it.
    "Userinfo%2FPw9f3",
    "Userinfo/Pw9f3",
    "Pw9f3",
    // `?password=` in the URL's query.
    "QueryPw7c1",
    // libpq key=value, quoted, with spaces.
    "Pw3b8",
    "quoted words",
    // MQTT_URL user info and MQTT_PASSWORD.
    "MqttUrlPw5d2",
    "MqttEnvPw4e6",
    // The webhook's path (Slack's token is the path).
    "secret-token",
    "B000",
    // Only in the CLI error cases.
    "SslPw8a1",
    "Pw6c4",
    "SetPw1d9",
];

fn assert_clean(what: &str, text: &str) -> Result<()> {
    for s in SECRETS {
        ensure!(!text.contains(s), "{what} shows {s:?}:\n{text}");
    }
    Ok(())
}

fn url_form(port: u16) -> String {
    format!("postgres://postgres:Userinfo%2FPw9f3@127.0.0.1:{port}/postgres?password=QueryPw7c1&connect_timeout=5")
}

fn kv_form(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=postgres password='Kv Pw3b8 quoted words' connect_timeout=5")
}

/// Runs the binary with only `env` (and PATH); stdout and stderr together.
fn leasehold(args: &[&str], env: &[(&str, String)]) -> Result<(Output, String)> {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .context("running leasehold")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out, text))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_form_of_a_secret_appears_in_logs_answers_or_cli_output() {
    let hook = WebhookReceiver::start(0).await.expect("receiver");
    let mut c = Cluster::start().await.expect("servers");
    let pg = c.pg.port;
    let mq = c.mq.port;
    let closed = free_port().expect("a free port");
    let res = async {
        let common = [
            ("LOG_LEVEL", "debug".to_string()),
            ("ALERT_WEBHOOK_URL", hook.url.clone()),
            ("ALERT_CHECK_INTERVAL", "300ms".to_string()),
            ("ALERT_WINDOW", "1m".to_string()),
        ];
        let mut a = common.to_vec();
        a.extend([
            ("DATABASE_URL", url_form(pg)),
            (
                "MQTT_URL",
                format!("mqtt://ingest:MqttUrlPw5d2@127.0.0.1:{mq}"),
            ),
        ]);
        c.spawn_with("node-a", &a)?;
        let mut b = common.to_vec();
        b.extend([
            ("DATABASE_URL", kv_form(pg)),
            ("MQTT_USERNAME", "ingest".to_string()),
            ("MQTT_PASSWORD", "MqttEnvPw4e6".to_string()),
            ("LOG_FORMAT", "json".to_string()),
        ]);
        c.spawn_with("node-b", &b)?;
        // A node that cannot reach its database logs its retries.
        c.spawn_with(
            "node-c",
            &[
                ("DATABASE_URL", url_form(closed)),
                ("LOG_LEVEL", "debug".to_string()),
            ],
        )?;
        c.wait_leader().await?;

        // Data and a dead letter, so that the webhook (its secret URL) is really used.
        let base = chrono::Utc::now().timestamp_micros();
        publish_all(
            mq,
            vec![
                (
                    "devices/d1/telemetry".into(),
                    numbered_from(base, "secrets", "d1", 0).into_bytes(),
                ),
                ("devices/d1/telemetry".into(), b"{broken".to_vec()),
            ],
        )
        .await?;
        eventually(Duration::from_secs(30), "a webhook delivered", || async {
            Ok(!hook.delivered().is_empty())
        })
        .await?;
        eventually(
            Duration::from_secs(15),
            "both nodes in /cluster",
            || async {
                let (_, body) = http(c.node("node-a").http_port(), "GET", "/cluster").await?;
                let v: Value = serde_json::from_str(&body)?;
                Ok(v["nodes_alive"] == 2)
            },
        )
        .await?;
        eventually(Duration::from_secs(15), "node-c retrying", || async {
            Ok(c.node("node-c").log().matches("retrying").count() >= 2)
        })
        .await?;

        for n in ["node-a", "node-b"] {
            let port = c.node(n).http_port();
            for path in [
                "/health",
                "/health/live",
                "/health/ready",
                "/health/lease",
                "/health/mqtt",
                "/health/database",
                "/health/recent-data",
                "/health/alerts",
                "/cluster",
                "/metrics",
            ] {
                let (_, body) = http(port, "GET", path).await?;
                assert_clean(&format!("{n} GET {path}"), &body)?;
            }
            let (code, body) = http(port, "POST", "/health/alerts/check").await?;
            ensure!(code == 200, "{n} check: {code} {body}");
            assert_clean(&format!("{n} POST /health/alerts/check"), &body)?;
        }

        // The CLI, with each form, and its error paths.
        for db in [url_form(pg), kv_form(pg)] {
            for args in [&["status"][..], &["status", "--json"], &["migrate"]] {
                let (out, text) = leasehold(args, &[("DATABASE_URL", db.clone())])?;
                ensure!(out.status.success(), "{args:?}: {text}");
                assert_clean(&format!("leasehold {args:?}"), &text)?;
            }
            let (out, text) = leasehold(&["status", "--database-url", &db], &[])?;
            ensure!(out.status.success(), "--database-url: {text}");
            assert_clean("leasehold status --database-url", &text)?;
        }
        let refused: Vec<(&str, String)> = vec![
            ("unreachable URL", url_form(closed)),
            ("unreachable key=value", kv_form(closed)),
            (
                "unsupported sslpassword",
                format!("postgres://postgres@127.0.0.1:{pg}/postgres?sslpassword=SslPw8a1"),
            ),
            (
                "unquoted value with spaces",
                format!("host=127.0.0.1 port={pg} password=Broken Pw6c4=x user=postgres"),
            ),
        ];
        for (case, db) in &refused {
            let (out, text) = leasehold(&["status"], &[("DATABASE_URL", db.clone())])?;
            ensure!(!out.status.success(), "{case}: succeeded: {text}");
            ensure!(text.contains("leasehold: error"), "{case}: {text}");
            assert_clean(&format!("leasehold status ({case})"), &text)?;
        }
        let misuse: [&[&str]; 3] = [
            // A URL where an argument is not expected: clap quotes it back.
            &["run", "postgres://postgres:SetPw1d9@127.0.0.1/postgres"],
            &[
                "status",
                "--set",
                "postgres://postgres:SetPw1d9@127.0.0.1/postgres",
            ],
            &["status", "--set", "postgres://u@h/db?password=SetPw1d9"],
        ];
        for args in misuse {
            let (out, text) = leasehold(args, &[])?;
            ensure!(out.status.code() == Some(2), "{args:?}: {text}");
            assert_clean(&format!("leasehold {args:?}"), &text)?;
        }

        // Every log, read last: everything above has been logged by now.
        for n in ["node-a", "node-b", "node-c"] {
            assert_clean(&format!("{n}'s log"), &c.node(n).log())?;
        }
        // The configuration was logged (redacted), so the check above is not vacuous.
        let a = c.node("node-a").log();
        ensure!(
            a.contains("starting leasehold node") && a.contains("?password=***"),
            "node-a did not log its redacted configuration"
        );
        let b = c.node("node-b").log();
        ensure!(
            b.contains("starting leasehold node") && b.contains("password='***'"),
            "node-b did not log its redacted configuration"
        );
        for line in b.lines().filter(|l| l.starts_with('{')) {
            serde_json::from_str::<Value>(line).with_context(|| {
                format!("node-b's log line is not JSON after redaction: {line}")
            })?;
        }
        Ok(())
    }
    .await;
    check(&c, res);
}
