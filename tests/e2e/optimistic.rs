//! The writer's optimistic statement (`BatchWriter::write_optimistic`, migration 12): a batch
//! without a redelivery is written without `ON CONFLICT`, and whatever that statement cannot
//! tell apart — a key already stored, a row a trigger skipped, two keys equal only once cast —
//! fails it whole and is written by the full statement instead. The outcome and the table must
//! be exactly the full statement's, case by case and over generated batches compared with a
//! twin database written by the full statement alone.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use leasehold_store::{BatchOutcome, BatchWriter, Fence, RouteRow, StoreError};
use leasehold_testkit::Postgres;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};

use crate::helpers::{owned_row, owned_writer};

/// The two tests read the process's fallback counter, which the other's writes move: one at a
/// time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `owned(id numeric PRIMARY KEY, v int)`: a trigger skips a negative `v`; `1e2` and `100` are
/// one key once cast.
const SCHEMA: &str = "CREATE TABLE owned (id numeric PRIMARY KEY, v int);
     CREATE FUNCTION skip_negative() RETURNS trigger LANGUAGE plpgsql AS $$
     BEGIN IF NEW.v < 0 THEN RETURN NULL; END IF; RETURN NEW; END $$;
     CREATE TRIGGER skip_negative BEFORE INSERT ON owned
         FOR EACH ROW EXECUTE FUNCTION skip_negative();
     INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
     VALUES ('mqtt-ingest', 'h1', 'a', 1, now() + interval '1 hour')";

fn fence() -> Fence {
    Fence {
        lease_name: "mqtt-ingest".into(),
        holder_id: "h1".into(),
        epoch: 1,
    }
}

/// A database with the schema, and a writer into `telemetry` and `owned` (route 1).
async fn writer(pg: &Postgres) -> Result<BatchWriter> {
    let mut admin = leasehold_store::connect(&pg.url(), "test").await?;
    if admin
        .query_opt("SELECT 1 FROM pg_tables WHERE tablename = 'owned'", &[])
        .await?
        .is_none()
    {
        leasehold_store::migrate(&mut admin).await?;
        admin.batch_execute(SCHEMA).await?;
    }
    owned_writer(pg, &admin).await
}

/// Row `idx` of route `owned`: key `id` (as sent: `1e2` and `100` are one key), value `v`.
fn row(idx: usize, id: &str, v: i32) -> RouteRow {
    owned_row(idx, id, v, 9, false)
}

/// Attempts and fallbacks of the optimistic statement in this process so far.
fn optimistic() -> (u64, u64) {
    let m = leasehold_telemetry::metrics();
    (
        m.db_query_duration
            .with_label_values(&["write_optimistic"])
            .get_sample_count(),
        m.db_query_errors
            .with_label_values(&["write_optimistic"])
            .get(),
    )
}

/// `(id, v)` of every row of `owned`, by id.
async fn table(pg: &Postgres) -> Result<Vec<(String, i32)>> {
    let db = pg.client().await?;
    Ok(db
        .query("SELECT id::text, v FROM owned ORDER BY id::text", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// What an outcome says of route `owned`, order aside.
fn said(o: &BatchOutcome) -> (u64, Vec<usize>, Vec<usize>, Vec<usize>, u64) {
    let r = &o.routes[1];
    let sorted = |v: &[usize]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    (
        r.written,
        sorted(&r.duplicates),
        sorted(&r.conflicts),
        sorted(&r.unstored),
        o.dead_lettered,
    )
}

#[tokio::test]
async fn what_the_optimistic_statement_cannot_tell_apart_the_full_one_writes() -> Result<()> {
    let _alone = ONE_AT_A_TIME.lock().await;
    let pg = Postgres::start().await?;
    // New keys: written by the optimistic statement alone.
    let mut w = writer(&pg).await?;
    let before = optimistic();
    let out = w
        .write_optimistic(&fence(), &[row(0, "1", 10), row(1, "2", 20)], &[])
        .await?;
    ensure!(said(&out) == (2, vec![], vec![], vec![], 0), "{out:?}");
    let after = optimistic();
    ensure!(
        after.0 > before.0 && after.1 == before.1,
        "written optimistically, without a fallback: {before:?} -> {after:?}"
    );
    // A key stored already (the same reading again without DUP, and a different one): the
    // full statement's duplicate and conflict, and the new key beside them written once.
    let mut w = writer(&pg).await?;
    let before = optimistic();
    let out = w
        .write_optimistic(
            &fence(),
            &[row(0, "1", 10), row(1, "2", 21), row(2, "3", 30)],
            &[],
        )
        .await?;
    ensure!(said(&out) == (1, vec![0], vec![1], vec![], 1), "{out:?}");
    ensure!(optimistic().1 == before.1 + 1, "one fallback");
    // After a fallback the next writes go straight to the full statement.
    let attempts = optimistic().0;
    let out = w
        .write_optimistic(&fence(), &[row(0, "4", 40)], &[])
        .await?;
    ensure!(said(&out) == (1, vec![], vec![], vec![], 0), "{out:?}");
    ensure!(
        optimistic().0 == attempts,
        "no optimistic attempt right after a fallback"
    );
    // A row the trigger skips: not_stored, and the other row of its batch written once.
    let mut w = writer(&pg).await?;
    let before = optimistic();
    let out = w
        .write_optimistic(&fence(), &[row(0, "5", -1), row(1, "6", 60)], &[])
        .await?;
    ensure!(said(&out) == (1, vec![], vec![], vec![0], 1), "{out:?}");
    ensure!(optimistic().1 == before.1 + 1, "one fallback");
    // Two keys equal only once cast, in one batch: the second is the first's duplicate.
    let mut w = writer(&pg).await?;
    let out = w
        .write_optimistic(&fence(), &[row(0, "1e2", 7), row(1, "100", 7)], &[])
        .await?;
    ensure!(said(&out) == (1, vec![1], vec![], vec![], 0), "{out:?}");
    ensure!(
        table(&pg).await?
            == [
                ("1".to_string(), 10),
                ("100".to_string(), 7),
                ("2".to_string(), 20),
                ("3".to_string(), 30),
                ("4".to_string(), 40),
                ("6".to_string(), 60)
            ],
        "{:?}",
        table(&pg).await?
    );
    // A lost fence: nothing written, whichever statement ran.
    pg.client()
        .await?
        .batch_execute("UPDATE instance_lock SET epoch = 2")
        .await?;
    let mut w = writer(&pg).await?;
    match w.write_optimistic(&fence(), &[row(0, "7", 70)], &[]).await {
        Err(StoreError::Fenced { epoch: 1 }) => {}
        other => anyhow::bail!("not fenced: {other:?}"),
    }
    ensure!(table(&pg).await?.len() == 6, "nothing written when fenced");
    Ok(())
}

/// One generated case: rows stored before, then a batch of keys unique as sent.
#[derive(Debug, Clone)]
struct Case {
    stored: BTreeMap<u8, i8>,
    batch: Vec<(String, i8)>,
}

fn case() -> impl Strategy<Value = Case> {
    let spelled = (0u8..40, 0usize..3).prop_map(|(id, how)| match how {
        // The same number spelled three ways: equal keys once cast.
        0 => id.to_string(),
        1 => format!("{id}.0"),
        _ => format!("{id}e0"),
    });
    (
        prop::collection::btree_map(0u8..40, -3i8..4, 0..20),
        prop::collection::btree_map(spelled, -3i8..4, 0..30),
    )
        .prop_map(|(stored, batch)| Case {
            stored,
            batch: batch.into_iter().collect(),
        })
}

#[test]
fn the_optimistic_statement_ends_as_the_full_one_does_over_generated_batches() {
    let _alone = ONE_AT_A_TIME.blocking_lock();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (one, twin) = rt
        .block_on(async { anyhow::Ok((Postgres::start().await?, Postgres::start().await?)) })
        .expect("postgres");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    });
    let result = runner.run(&case(), |c| {
        rt.block_on(async {
            let mut outs = Vec::new();
            for (pg, optimistic) in [(&one, true), (&twin, false)] {
                let mut w = writer(pg).await?;
                pg.client()
                    .await?
                    .batch_execute("TRUNCATE owned; DELETE FROM dead_letters")
                    .await?;
                let stored: Vec<RouteRow> = c
                    .stored
                    .iter()
                    .enumerate()
                    .map(|(i, (id, v))| row(i, &id.to_string(), i32::from(*v)))
                    .collect();
                w.write(&fence(), &stored, &[]).await?;
                let batch: Vec<RouteRow> = c
                    .batch
                    .iter()
                    .enumerate()
                    .map(|(i, (id, v))| row(i, id, i32::from(*v)))
                    .collect();
                let out = match optimistic {
                    true => w.write_optimistic(&fence(), &batch, &[]).await?,
                    false => w.write(&fence(), &batch, &[]).await?,
                };
                let dead: Vec<(String, String)> = pg
                    .client()
                    .await?
                    .query(
                        "SELECT topic, reason FROM dead_letters ORDER BY topic, reason",
                        &[],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                outs.push((said(&out), table(pg).await?, dead));
            }
            ensure!(
                outs[0] == outs[1],
                "optimistic {:?}\nfull       {:?}",
                outs[0],
                outs[1]
            );
            anyhow::Ok(())
        })
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
