//! The adversarial corpus of real-world payloads (`tests/corpus/`, its README is the table of
//! cases and their expected outcomes) replayed end to end: every file published on its topic
//! through Mosquitto to the `leasehold` binary, a numbered good reading before each and after the
//! last. Each file must end as its row says (stored exactly once, under the device named, or one
//! dead letter with the reason named), every good reading must be stored exactly once (the stream
//! never stalls behind a bad payload), and the node must stay live.

use std::path::Path;
use std::time::Duration;

use crate::helpers::{check, Cluster};
use anyhow::{bail, ensure, Context, Result};
use leasehold_testkit::publish::{numbered, publish_all};
use leasehold_testkit::{eventually, http};

/// One row of the README's table.
#[derive(Debug)]
struct Case {
    file: String,
    topic: String,
    expected: Expected,
}

/// What a file ends as: `stored` (once), `stored ×N` (N readings: an array, a pack), under a
/// device when one is named, and/or `dead-lettered `reason`` (once, or `×M`).
#[derive(Debug, PartialEq)]
struct Expected {
    rows: usize,
    device: Option<String>,
    dead: usize,
    reason: Option<String>,
}

/// The count after `×` in `s`, if any.
fn times(s: &str) -> Option<usize> {
    let after = s.split('×').nth(1)?;
    after
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// The text between the first pair of backticks of `s`.
fn quoted(s: &str) -> Option<String> {
    let mut parts = s.split('`');
    parts.next()?;
    parts.next().map(str::to_string)
}

fn cases(dir: &Path) -> Result<Vec<Case>> {
    let readme = std::fs::read_to_string(dir.join("README.md"))?;
    let mut out = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = line.split(" | ").collect();
        ensure!(cols.len() == 4, "a row of four columns: {line}");
        let outcome = cols[3].trim_end_matches(" |").trim();
        let (stored, dead) = match outcome.split_once("dead-lettered") {
            Some((s, d)) => (s.trim().trim_end_matches(',').trim(), Some(d)),
            None => (outcome, None),
        };
        if !stored.is_empty() && !stored.starts_with("stored") {
            bail!("unknown outcome {outcome:?}");
        }
        let expected = Expected {
            rows: match stored.is_empty() {
                true => 0,
                false => times(stored).unwrap_or(1),
            },
            device: quoted(stored),
            dead: dead.map_or(0, |d| times(d).unwrap_or(1)),
            reason: match dead {
                Some(d) => Some(quoted(d).context("a reason")?),
                None => None,
            },
        };
        out.push(Case {
            file: quoted(cols[0]).context("a file")?,
            topic: quoted(cols[1]).context("a topic")?,
            expected,
        });
    }
    Ok(out)
}

/// The formats the corpus is read with (its README says which topics).
const FORMATS: &str = r#"
[[formats]]
topics = ["value/#"]
format = "value"
device_topic_pattern = "value/{device_id}/#"

[[formats]]
topics = ["senml/#"]
format = "senml"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_corpus_payload_ends_as_its_readme_says_and_the_stream_never_stalls() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let cases = cases(&dir).expect("tests/corpus/README.md");
    // Every file has a row and every row a file.
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/corpus")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f != "README.md")
        .collect();
    files.sort();
    let mut listed: Vec<String> = cases.iter().map(|c| c.file.clone()).collect();
    listed.sort();
    assert_eq!(files, listed, "tests/corpus and its README disagree");
    let mut topics: Vec<&str> = cases.iter().map(|c| c.topic.as_str()).collect();
    topics.sort();
    topics.dedup();
    assert_eq!(
        topics.len(),
        cases.len(),
        "each case needs a topic of its own"
    );

    let mut c = Cluster::start().await.expect("servers");
    c.extra_env
        .push(("MQTT_TOPICS", "devices/#,gw/#,value/#,senml/#".to_string()));
    let res = async {
        let file = c.logs.path().join("formats.toml");
        std::fs::write(&file, FORMATS)?;
        c.spawn_args("node-a", &["--config", &file.display().to_string()], &[])?;
        c.wait_leader().await?;
        let good = "devices/good-1/telemetry".to_string();
        let mut msgs = Vec::new();
        let mut seq = 0;
        for case in &cases {
            msgs.push((good.clone(), numbered("corpus", "good-1", seq).into_bytes()));
            seq += 1;
            let payload = std::fs::read(dir.join(&case.file))?;
            msgs.push((case.topic.clone(), payload));
        }
        msgs.push((good.clone(), numbered("corpus", "good-1", seq).into_bytes()));
        seq += 1;
        publish_all(c.mq.port, msgs).await?;
        // Every good reading, including the one after the last bad payload, in bounded time.
        c.assert_exactly_once("corpus", seq).await?;
        let db = c.pg.client().await?;
        let topics: Vec<&str> = cases.iter().map(|c| c.topic.as_str()).collect();
        let landed =
            || async { Ok(crate::helpers::topics_landed(&db, &topics).await? == cases.len()) };
        eventually(Duration::from_secs(20), "every corpus file landed", landed).await?;
        let mut wrong = Vec::new();
        for case in &cases {
            let stored: Vec<String> = db
                .query(
                    "SELECT device_id FROM telemetry WHERE topic = $1",
                    &[&case.topic],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let dead: Vec<(String, String)> = db
                .query(
                    "SELECT reason, error FROM dead_letters WHERE topic = $1",
                    &[&case.topic],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let e = &case.expected;
            let ok = stored.len() == e.rows
                && dead.len() == e.dead
                && e.device
                    .as_ref()
                    .is_none_or(|d| stored.iter().all(|s| s == d))
                && e.reason
                    .as_ref()
                    .is_none_or(|r| dead.iter().all(|(d, _)| d == r));
            if !ok {
                wrong.push(format!(
                    "{}: expected {:?}, got rows {stored:?} and dead letters {dead:?}",
                    case.file, case.expected
                ));
            }
        }
        ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
        let (code, body) = http(c.node("node-a").http_port(), "GET", "/health/live").await?;
        ensure!(code == 200, "/health/live {code}: {body}");
        ensure!(c.node_mut("node-a").try_status().is_none(), "node exited");
        println!(
            "{} corpus files and {seq} good readings, each where it belongs",
            cases.len()
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
