//! Retention (docs/guarantees.md, G5): the tables the node fills for operations lose their old rows, in small
//! batches, on production nodes only; recent rows and open alerts stay. Old rows are written
//! directly with SQL and pruning is driven by a short RETENTION_INTERVAL.

use std::time::Duration;

use crate::helpers::{check, Cluster, BIN};
use anyhow::ensure;
use leasehold_testkit::eventually;
use leasehold_testkit::publish::publish_all;

/// 2,490 dead letters past the 30-day default and 10 within it, cloned from a real one (so the
/// insert does not depend on the table's other columns); alerts, lease history and nodes on
/// both sides of their defaults (90, 90 and 7 days); and an alert still open after 200 days.
const OLD_AND_RECENT: &str = "
BEGIN;
INSERT INTO dead_letters
SELECT (jsonb_populate_record(NULL::dead_letters, to_jsonb(d) || jsonb_build_object(
        'id', nextval('dead_letters_id_seq'),
        'content_hash', d.content_hash || '-' || g,
        'error', CASE WHEN g <= 2490 THEN 'old' ELSE 'recent' END,
        'received_at', now() - CASE WHEN g <= 2490 THEN interval '31 days' ELSE interval '29 days' END))).*
FROM dead_letters d, generate_series(1, 2500) g
WHERE d.id = (SELECT min(id) FROM dead_letters);
INSERT INTO alerts (kind, level, message, opened_at, resolved_at, opened_by, resolved_by) VALUES
    ('test_old_resolved', 'warning', 'x', now() - interval '100 days', now() - interval '91 days', 't', 't'),
    ('test_recent_resolved', 'warning', 'x', now() - interval '100 days', now() - interval '89 days', 't', 't'),
    ('test_old_open', 'critical', 'x', now() - interval '200 days', NULL, 't', NULL);
INSERT INTO lease_history (service_name, epoch, holder_id, instance_id, acquired_at) VALUES
    ('test-lease', 1, 'h1', 'i1', now() - interval '91 days'),
    ('test-lease', 2, 'h2', 'i2', now() - interval '89 days');
INSERT INTO cluster_nodes (holder_id, instance_id, role, mode, version, started_at, last_seen) VALUES
    ('gone-8d', 'gone', 'standby', 'production', '0', now() - interval '9 days', now() - interval '8 days'),
    ('gone-6d', 'gone', 'standby', 'production', '0', now() - interval '9 days', now() - interval '6 days');
COMMIT;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_operational_rows_are_pruned_in_batches_and_recent_ones_kept() {
    let mut c = Cluster::start().await.expect("servers");
    c.extra_env = vec![("RETENTION_INTERVAL", "300ms".into())];
    let res = async {
        c.spawn("node-a")?;
        c.spawn_with("laptop", &[("MQTT_MODE", "development".into())])?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![("devices/d1/telemetry".into(), b"{broken".to_vec())],
        )
        .await?;
        eventually(Duration::from_secs(15), "a dead letter", || async {
            Ok(c.count("SELECT count(*) FROM dead_letters").await? == 1)
        })
        .await?;
        c.pg.client().await?.batch_execute(OLD_AND_RECENT).await?;

        let old = [
            "SELECT count(*) FROM dead_letters WHERE error = 'old'",
            "SELECT count(*) FROM alerts WHERE kind = 'test_old_resolved'",
            "SELECT count(*) FROM lease_history WHERE service_name = 'test-lease' AND epoch = 1",
            "SELECT count(*) FROM cluster_nodes WHERE holder_id = 'gone-8d'",
        ];
        eventually(Duration::from_secs(30), "old rows pruned", || async {
            for sql in old {
                if c.count(sql).await? != 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        for (sql, want) in [
            ("SELECT count(*) FROM dead_letters WHERE error = 'recent'", 10),
            ("SELECT count(*) FROM dead_letters WHERE error NOT IN ('old', 'recent')", 1),
            ("SELECT count(*) FROM alerts WHERE kind = 'test_recent_resolved'", 1),
            ("SELECT count(*) FROM alerts WHERE kind = 'test_old_open'", 1),
            ("SELECT count(*) FROM lease_history WHERE service_name = 'test-lease' AND epoch = 2", 1),
            ("SELECT count(*) FROM cluster_nodes WHERE holder_id = 'gone-6d'", 1),
        ] {
            let n = c.count(sql).await?;
            ensure!(n == want, "{sql}: {n}, expected {want} kept");
        }

        // One round deleted the 2,490 in batches of at most 1,000, and said so.
        let log = c.node("node-a").log();
        let line = log
            .lines()
            .find(|l| l.contains("retention: old rows deleted") && l.contains("dead_letters"));
        ensure!(
            line.is_some_and(|l| l.contains("deleted=2490") && l.contains("batches=3")),
            "node-a's retention log line: {line:?}"
        );
        for table in ["alerts", "lease_history", "cluster_nodes"] {
            ensure!(
                log.lines().any(|l| l.contains("retention: old rows deleted")
                    && l.contains(&format!("\"{table}\""))
                    && l.contains("deleted=1")),
                "node-a logged no pruning of {table}"
            );
        }
        ensure!(
            !c.node("laptop").log().contains("retention: old rows deleted"),
            "an observer pruned"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

#[test]
fn retention_settings_are_checked_at_start_with_one_line_naming_the_setting() {
    for (key, value, says) in [
        ("DEAD_LETTER_RETENTION", "10m", "at least 1h"),
        ("ALERT_RETENTION", "ninety days", "duration"),
        ("LEASE_HISTORY_RETENTION", "30m", "at least 1h"),
        ("CLUSTER_NODE_RETENTION", "0s", "at least 1h"),
        ("RETENTION_INTERVAL", "0s", "greater than 0"),
    ] {
        let out = std::process::Command::new(BIN)
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", "postgres://u:pw@127.0.0.1:1/x")
            .env(key, value)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{key}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(says),
            "{key}={value}: {stderr}"
        );
    }
}
