//! Component tests on real servers: fencing, the lease protocol, acks across reconnects, and
//! concurrent migrations.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_config::{LeaseTimings, MqttEndpoint};
use leasehold_ingest::{IngestConfig, MqttIngest};
use leasehold_lease::{Lease, LeaseConfig, Role};
use leasehold_store::{BatchWriter, Fence, RouteRow, StoreError};
use leasehold_testkit::publish::publish_all;
use leasehold_testkit::{eventually, Mosquitto, Postgres};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

async fn migrated() -> Result<Postgres> {
    let pg = Postgres::start().await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate(&mut c).await?;
    Ok(pg)
}

fn row(device: &str, secs: i64) -> RouteRow {
    let ts = chrono::DateTime::from_timestamp(secs, 0).unwrap_or_default();
    RouteRow::reading(
        secs as usize,
        device,
        &format!("devices/{device}/telemetry"),
        ts,
        "{}",
    )
}

/// The lease held by `h1` at epoch 7 for a minute, and a writer under it (statements bounded by
/// `timeout`).
async fn leased_writer(
    pg: &Postgres,
    timeout: Duration,
) -> Result<(tokio_postgres::Client, BatchWriter, Fence)> {
    let admin = pg.client().await?;
    admin
        .execute(
            "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
             VALUES ('mqtt-ingest', 'h1', 'a', 7, now() + interval '1 minute')",
            &[],
        )
        .await?;
    let w = BatchWriter::connect(
        &pg.url(),
        "a".into(),
        timeout,
        leasehold_store::DEFAULT_REDELIVERY_WINDOW,
    )
    .await?;
    let fence = Fence {
        lease_name: "mqtt-ingest".into(),
        holder_id: "h1".into(),
        epoch: 7,
    };
    Ok((admin, w, fence))
}

#[tokio::test]
async fn a_writer_whose_epoch_was_bumped_cannot_commit_a_single_row() -> Result<()> {
    let pg = migrated().await?;
    let (admin, mut w, fence) = leased_writer(&pg, Duration::from_secs(10)).await?;
    let out = w.write(&fence, &[row("d", 1)], &[]).await?;
    ensure!(out.routes[0].written == 1);

    // Another holder takes over: epoch 8.
    admin
        .execute(
            "UPDATE instance_lock SET holder_id = 'h2', instance_id = 'b', epoch = 8",
            &[],
        )
        .await?;
    let err = w.write(&fence, &[row("d", 2), row("d", 3)], &[]).await;
    ensure!(
        matches!(err, Err(StoreError::Fenced { epoch: 7 })),
        "expected fenced, got {err:?}"
    );

    // Same holder and epoch but expired on the database clock: fenced too.
    admin.execute("UPDATE instance_lock SET holder_id = 'h1', epoch = 7, expires_at = now() - interval '1 ms'", &[]).await?;
    let err = w.write(&fence, &[row("d", 4)], &[]).await;
    ensure!(
        matches!(err, Err(StoreError::Fenced { .. })),
        "expired lease must fence, got {err:?}"
    );

    let n: i64 = admin
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    ensure!(n == 1, "{n} rows: a fenced writer committed");
    Ok(())
}

/// Row `secs` of `device` (as [`row`]), message `idx` of its statement, received at
/// `received_at`.
fn received(
    idx: usize,
    device: &str,
    secs: i64,
    received_at: chrono::DateTime<chrono::Utc>,
) -> RouteRow {
    let mut r = row(device, secs);
    r.idx = idx;
    Arc::make_mut(&mut r.message).received_at = received_at;
    r
}

/// Data age's record of the newest receipt (`telemetry_newest.at`) is kept by the statements
/// that store the readings, so it never needs `telemetry` read at a new term (whose heartbeat
/// used to read `max(received_at)` of every partition to take in a deposed leader's last
/// batches).
#[tokio::test]
async fn every_statement_that_stores_readings_records_the_newest_receipt() -> Result<()> {
    let pg = migrated().await?;
    let (admin, mut w, fence) = leased_writer(&pg, Duration::from_secs(10)).await?;
    let record = || async {
        let r = admin
            .query_one("SELECT at, epoch FROM telemetry_newest", &[])
            .await?;
        anyhow::Ok((
            r.get::<_, Option<chrono::DateTime<chrono::Utc>>>(0),
            r.get::<_, Option<i64>>(1),
        ))
    };
    let table_newest = || async {
        anyhow::Ok(
            admin
                .query_one("SELECT max(received_at) FROM telemetry", &[])
                .await?
                .get::<_, Option<chrono::DateTime<chrono::Utc>>>(0),
        )
    };
    // Microseconds, as PostgreSQL keeps them.
    let at = |secs_ago: i64| {
        let t = chrono::Utc::now() - chrono::TimeDelta::seconds(secs_ago);
        chrono::DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
    };
    ensure!(record().await? == (None, None), "nothing recorded yet");
    // The optimistic statement: the newest of its receipts (the term is the heartbeat's).
    let (t1, t2) = (at(30), at(20));
    let out = w
        .write_optimistic(
            &fence,
            &[received(0, "a", 1, t2), received(1, "b", 1, t1)],
            &[],
        )
        .await?;
    ensure!(out.routes[0].written == 2, "{out:?}");
    ensure!(record().await? == (Some(t2), None), "{:?}", record().await?);
    // An older receipt does not move it back.
    w.write_optimistic(&fence, &[received(0, "c", 1, at(40))], &[])
        .await?;
    ensure!(record().await? == (Some(t2), None), "not moved back");
    // Rows the table did not take (a duplicate and a conflict, newer receipts) are not
    // recorded: the optimistic statement fails on them, and the full one records the rows it
    // took.
    let t3 = at(10);
    let mut conflict = received(1, "b", 1, at(5));
    Arc::make_mut(&mut conflict.message).payload = bytes::Bytes::from_static(b"{\"other\": 1}");
    let out = w
        .write_optimistic(
            &fence,
            &[
                received(0, "a", 1, at(5)),
                conflict,
                received(2, "d", 1, t3),
            ],
            &[],
        )
        .await?;
    ensure!(
        out.routes[0].written == 1
            && out.routes[0].duplicates.len() == 1
            && out.routes[0].conflicts.len() == 1,
        "{out:?}"
    );
    ensure!(record().await? == (Some(t3), None), "{:?}", record().await?);
    ensure!(
        table_newest().await? == Some(t3),
        "exactly what the table holds"
    );
    // Less than a second newer: not recorded (a version of the row per batch otherwise).
    let soon = t3 + chrono::TimeDelta::milliseconds(500);
    w.write(&fence, &[received(0, "e", 2, soon)], &[]).await?;
    ensure!(record().await? == (Some(t3), None), "within a second");
    // `leasehold replay`'s writer records nothing.
    let mut replay = BatchWriter::connect(
        &pg.url(),
        "a (replay)".into(),
        Duration::from_secs(10),
        leasehold_store::DEFAULT_REDELIVERY_WINDOW,
    )
    .await?
    .without_data_age()
    .await?;
    replay
        .write_optimistic(&fence, &[received(0, "r", 1, at(2))], &[])
        .await?;
    ensure!(record().await? == (Some(t3), None), "replay's writer");
    // A receipt past the database's clock (a leader's clock ahead) is not recorded.
    w.write_optimistic(&fence, &[received(0, "e", 1, at(-600))], &[])
        .await?;
    ensure!(record().await? == (Some(t3), None), "a future receipt");
    // A fenced writer records nothing; the next term's statements record (the term itself is
    // its heartbeat's to record).
    admin
        .execute("UPDATE instance_lock SET epoch = 8", &[])
        .await?;
    let late = at(1);
    ensure!(
        matches!(
            w.write_optimistic(&fence, &[received(0, "f", 1, late)], &[])
                .await,
            Err(StoreError::Fenced { .. })
        ),
        "fenced"
    );
    ensure!(record().await? == (Some(t3), None), "fenced: not recorded");
    let next = Fence { epoch: 8, ..fence };
    w.write_optimistic(&next, &[received(0, "f", 1, late)], &[])
        .await?;
    ensure!(
        record().await? == (Some(late), None),
        "{:?}",
        record().await?
    );
    Ok(())
}

/// A leader's heartbeat records its term for data age (`queries::note_term`) without waiting
/// behind a statement that holds the record, and fills a record that holds no time (a database
/// readings reached before migration 10), was removed, or follows a term that recorded
/// nothing, from what the table holds.
#[tokio::test]
async fn a_new_term_is_recorded_without_waiting_and_a_missing_time_is_taken_from_the_table(
) -> Result<()> {
    use leasehold_store::queries::note_term;
    let pg = migrated().await?;
    let db = pg.client().await?;
    db.batch_execute(
        "INSERT INTO telemetry (device_id, topic, ts, payload, received_at, written_by, lease_epoch)
         VALUES ('d', 't', now(), '{}', '2026-01-02T03:04:05Z', 'old', 1)",
    )
    .await?;
    // (the table's receipt is recorded, the epoch), or `None` without a record.
    let record = || async {
        let r = db
            .query_opt(
                "SELECT at IS NOT DISTINCT FROM '2026-01-02T03:04:05Z', epoch FROM telemetry_newest",
                &[],
            )
            .await?;
        anyhow::Ok(r.map(|r| (r.get::<_, bool>(0), r.get::<_, Option<i64>>(1))))
    };
    // No time yet: taken from the table.
    ensure!(note_term(&db, 3).await?, "recorded");
    let filled = Some((true, Some(3)));
    ensure!(record().await? == filled, "{:?}", record().await?);
    // An older term changes nothing.
    ensure!(
        note_term(&db, 2).await?,
        "an older term is recorded already"
    );
    ensure!(record().await? == filled, "{:?}", record().await?);
    // Held by a statement in flight: not waited for, and asked again later.
    let mut other = leasehold_store::connect(&pg.url(), "test").await?;
    let tx = other.transaction().await?;
    tx.execute("UPDATE telemetry_newest SET at = at", &[])
        .await?;
    let held = tokio::time::timeout(Duration::from_secs(10), note_term(&db, 4)).await;
    ensure!(matches!(held, Ok(Ok(false))), "not waited for: {held:?}");
    tx.rollback().await?;
    ensure!(note_term(&db, 4).await?, "recorded once free");
    // A removed record is made again, with the table's newest receipt.
    db.batch_execute("DELETE FROM telemetry_newest").await?;
    ensure!(note_term(&db, 5).await?, "made again");
    ensure!(
        record().await? == Some((true, Some(5))),
        "{:?}",
        record().await?
    );
    // The next term trusts the record; after a term that recorded nothing (a leader of a
    // release before migration 10 stores without recording), the table is read.
    db.batch_execute("UPDATE telemetry_newest SET at = '2000-01-01Z'")
        .await?;
    ensure!(note_term(&db, 6).await?, "the next term");
    ensure!(
        record().await? == Some((false, Some(6))),
        "the next term reads nothing: {:?}",
        record().await?
    );
    ensure!(note_term(&db, 8).await?, "a term later");
    ensure!(
        record().await? == Some((true, Some(8))),
        "{:?}",
        record().await?
    );
    // Once recorded, a beat writes nothing: not even with no time recorded (no reading reached
    // `telemetry` since), which is read from the table once a term.
    let version = || async {
        anyhow::Ok(
            db.query_one("SELECT xmin::text FROM telemetry_newest", &[])
                .await?
                .get::<_, String>(0),
        )
    };
    let before = version().await?;
    ensure!(note_term(&db, 8).await?, "again");
    ensure!(version().await? == before, "a beat wrote the record");
    db.batch_execute("UPDATE telemetry_newest SET at = NULL")
        .await?;
    let before = version().await?;
    ensure!(note_term(&db, 8).await?, "no time, this term");
    ensure!(version().await? == before, "read again in the same term");
    ensure!(note_term(&db, 9).await?, "no time, the next term");
    ensure!(
        record().await? == Some((true, Some(9))),
        "{:?}",
        record().await?
    );
    Ok(())
}

#[tokio::test]
async fn a_takeover_waits_for_the_fenced_transaction_in_flight() -> Result<()> {
    // The fence takes FOR SHARE on the lease row: a new holder's acquire cannot complete while an
    // old writer's transaction that passed the check is still open, so it commits before the
    // takeover or not at all.
    let pg = migrated().await?;
    let mut old = pg.client().await?;
    old.execute(
        "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
         VALUES ('mqtt-ingest', 'h1', 'a', 1, now() - interval '1 second' + interval '1 second' * 0.5)",
        &[],
    )
    .await?;
    old.execute(
        "UPDATE instance_lock SET expires_at = now() + interval '300 ms'",
        &[],
    )
    .await?;
    let tx = old.transaction().await?;
    let held = tx
        .query_opt(
            "SELECT 1 FROM instance_lock WHERE service_name = 'mqtt-ingest' AND holder_id = 'h1' AND epoch = 1 AND expires_at > clock_timestamp() FOR SHARE",
            &[],
        )
        .await?;
    ensure!(held.is_some());
    tokio::time::sleep(Duration::from_millis(400)).await; // past expiry, transaction still open
    use leasehold_store::lease::{Attempt::Campaign, LeaseConn};
    let new = LeaseConn::connect(&pg.url(), Duration::from_secs(5)).await?;
    let acquire = tokio::spawn(async move {
        new.acquire(Campaign, "mqtt-ingest", "h2", "b", Duration::from_secs(5))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !acquire.is_finished(),
        "the takeover did not wait for the in-flight fenced transaction"
    );
    tx.commit().await?;
    let epoch = acquire.await??;
    ensure!(epoch == Some(2), "takeover epoch {epoch:?}");
    Ok(())
}

#[tokio::test]
async fn a_fenced_transaction_whose_client_stops_does_not_hold_the_lease_row() -> Result<()> {
    // `leasehold replay` writes under the leader's lease in a transaction of several statements.
    // Stopped between two of them (Ctrl-Z, a suspended laptop), it would hold the lease row
    // FOR SHARE until it woke up, and the leader could not renew: the cluster would stop. Its
    // session is ended instead, after `Fence::step_limit` without a statement.
    let pg = migrated().await?;
    let (admin, mut w, fence) = leased_writer(&pg, Duration::from_secs(60)).await?;
    let ttl = Duration::from_secs(3);
    w.begin(Fence::step_limit(ttl)).await?;
    let out = w.write(&fence, &[row("d", 1)], &[]).await?;
    ensure!(out.routes[0].written == 1);
    // The replay stops here, its transaction open. The leader's renewal waits for the lease row
    // at most its statement timeout (5 s here).
    use leasehold_store::lease::{Attempt::Renewal, LeaseConn};
    let leader = LeaseConn::connect(&pg.url(), Duration::from_secs(5)).await?;
    let renewed = leader
        .acquire(Renewal, "mqtt-ingest", "h1", "a", ttl)
        .await
        .context("the leader's renewal waited for the stopped transaction")?;
    ensure!(renewed == Some(7), "renewal: {renewed:?}");
    // The stopped transaction ended without committing.
    let late = w.finish(true).await;
    ensure!(late.is_err(), "the stopped transaction committed: {late:?}");
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    ensure!(rows == 0, "{rows} rows of the stopped transaction");
    Ok(())
}

/// A `gate` table whose one row the returned client's open transaction holds `FOR UPDATE`, and
/// `trigger` on `telemetry` calling `wait_at_gate()`, which waits for that row.
async fn closed_gate(pg: &Postgres, trigger: &str) -> Result<tokio_postgres::Client> {
    let admin = pg.client().await?;
    admin
        .batch_execute(&format!(
            "CREATE TABLE gate (one int); INSERT INTO gate VALUES (1);
             CREATE FUNCTION wait_at_gate() RETURNS trigger LANGUAGE plpgsql
                 AS $$ BEGIN PERFORM 1 FROM gate FOR UPDATE; RETURN NEW; END $$;
             {trigger} EXECUTE FUNCTION wait_at_gate();"
        ))
        .await?;
    let gate = pg.client().await?;
    gate.batch_execute("BEGIN; SELECT 1 FROM gate FOR UPDATE")
        .await?;
    Ok(gate)
}

/// The leader renews every 100 ms until `held_up` ends (ten times at least), each renewal
/// waiting at most 2 s for the lease row; then what `held_up` gave.
async fn renewing_while<T: Send + 'static>(
    pg: &Postgres,
    held_up: tokio::task::JoinHandle<T>,
) -> Result<T> {
    use leasehold_store::lease::{Attempt::Renewal, LeaseConn};
    let leader = LeaseConn::connect(&pg.url(), Duration::from_secs(2)).await?;
    let mut renewals = 0;
    while !held_up.is_finished() || renewals < 10 {
        let renewed = leader
            .acquire(Renewal, "mqtt-ingest", "h1", "a", Duration::from_secs(3))
            .await
            .with_context(|| {
                format!("renewal {renewals}: the held-up statement held the lease row")
            })?;
        ensure!(renewed == Some(7), "renewal {renewals}: {renewed:?}");
        renewals += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(held_up.await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_statement_held_up_under_the_lease_row_is_cancelled_at_the_step_limit(
) -> Result<()> {
    // A replay's write takes the lease row, then waits inside its statement: here a trigger
    // waiting for a lock. Bounded by the writer's own 60 s, it would hold the leader's renewals
    // that long; its transaction bounds it at `Fence::step_limit`.
    let pg = migrated().await?;
    let (admin, mut w, fence) = leased_writer(&pg, Duration::from_secs(60)).await?;
    let gate = closed_gate(
        &pg,
        "CREATE TRIGGER wait_at_gate BEFORE INSERT ON telemetry FOR EACH ROW",
    )
    .await?;
    w.begin(Fence::step_limit(Duration::from_secs(3))).await?;
    let write = tokio::spawn(async move { w.write(&fence, &[row("d", 1)], &[]).await });
    let out = renewing_while(&pg, write).await?;
    ensure!(
        matches!(&out, Err(e) if e.sqlstate() == Some("57014")),
        "the held-up write: {out:?}"
    );
    gate.batch_execute("ROLLBACK").await?;
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    ensure!(rows == 0, "{rows} rows of the cancelled write");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_trigger_waiting_at_commit_does_not_hold_the_lease_row() -> Result<()> {
    // A route's deferred trigger runs at COMMIT, where PostgreSQL runs no statement timeout: one
    // waiting for a lock there held the lease row with no bound. The lock wait is bounded.
    let pg = migrated().await?;
    let (admin, mut w, fence) = leased_writer(&pg, Duration::from_secs(60)).await?;
    let gate = closed_gate(
        &pg,
        "CREATE CONSTRAINT TRIGGER wait_at_gate AFTER INSERT ON telemetry
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW",
    )
    .await?;
    w.begin(Fence::step_limit(Duration::from_secs(3))).await?;
    let out = w.write(&fence, &[row("d", 1)], &[]).await?;
    ensure!(out.routes[0].written == 1);
    let commit = tokio::spawn(async move { w.finish(true).await });
    let done = renewing_while(&pg, commit).await?;
    ensure!(
        matches!(&done, Err(e) if e.sqlstate() == Some("55P03")),
        "the held-up commit: {done:?}"
    );
    gate.batch_execute("ROLLBACK").await?;
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM telemetry", &[])
        .await?
        .get(0);
    ensure!(rows == 0, "{rows} rows of the failed commit");
    Ok(())
}

#[tokio::test]
async fn a_pooled_connection_given_back_inside_a_transaction_holds_no_lock_for_long() -> Result<()>
{
    // `/health/data` reads device coverage in a transaction, under a 5 s timeout: a timeout in
    // the middle gives the connection back to the pool with the transaction open, holding its
    // lock on `telemetry`. A partition step (ACCESS EXCLUSIVE) would wait for it, and the
    // leader's inserts behind the step.
    let pg = migrated().await?;
    let pool = leasehold_store::pool(&pg.url(), "test", 1)?;
    let leak = |pool: leasehold_store::Pool| async move {
        let c = leasehold_store::pooled(&pool).await?;
        c.batch_execute("BEGIN; SELECT count(*) FROM telemetry")
            .await?;
        anyhow::Ok(())
    };
    // Taken again at once: not that transaction's connection.
    leak(pool.clone()).await?;
    let c = leasehold_store::pooled(&pool).await?;
    // In a simple query's own transaction, the transaction and the statement start together.
    let fresh = c
        .simple_query("SELECT now() = statement_timestamp() AS fresh")
        .await?
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("fresh").map(str::to_string),
            _ => None,
        });
    ensure!(
        fresh.as_deref() == Some("t"),
        "the pool gave out a connection inside a transaction: {fresh:?}"
    );
    drop(c);
    // Not taken again: its transaction ends by itself, within the pool's 5 s bound.
    leak(pool.clone()).await?;
    let admin = pg.client().await?;
    admin
        .batch_execute(
            "SET lock_timeout = '15s';
             BEGIN; LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE; COMMIT",
        )
        .await
        .context("the pooled connection's transaction kept its lock")?;
    Ok(())
}

fn lease_cfg(pg: &Postgres, holder: &str) -> LeaseConfig {
    LeaseConfig {
        database_url: pg.url(),
        lease_name: "mqtt-ingest".into(),
        instance_id: holder.into(),
        holder_id: format!("{holder}-1"),
        timings: LeaseTimings {
            ttl: Duration::from_secs(3),
            renew_interval: Duration::from_secs(1),
            poll_interval: Duration::from_millis(500),
        },
    }
}

#[tokio::test]
async fn lease_one_leader_stable_epoch_and_release_wakes_the_standby() -> Result<()> {
    let pg = migrated().await?;
    let listener = leasehold_store::listener::Listener::new(pg.url());
    let notices = listener.sender();
    let stop_listener = CancellationToken::new();
    tokio::spawn(listener.run(stop_listener.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (la, ha) = Lease::new(lease_cfg(&pg, "a"), Some(notices.subscribe()));
    let (lb, hb) = Lease::new(lease_cfg(&pg, "b"), Some(notices.subscribe()));
    let (ca, cb) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(la.run(ca.clone()));
    tokio::spawn(lb.run(cb.clone()));
    eventually(Duration::from_secs(10), "a leader", || async {
        Ok(ha.role() != Role::Standby || hb.role() != Role::Standby)
    })
    .await?;
    // Several renewals later: still exactly one leader, same epoch.
    let (leader, standby) = if ha.role() != Role::Standby {
        (&ha, &hb)
    } else {
        (&hb, &ha)
    };
    let epoch = leader.role().epoch().context("epoch")?;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    ensure!(
        leader.role() == Role::Leader { epoch },
        "leader changed: {:?}",
        leader.role()
    );
    ensure!(standby.role() == Role::Standby);
    ensure!(leader.is_valid() && !standby.is_valid());

    // Step down: draining, then (once the term says so) released; the standby takes over at
    // once thanks to NOTIFY, well before its next poll would matter.
    leader.step_down();
    eventually(Duration::from_secs(2), "draining", || async {
        Ok(matches!(leader.role(), Role::Draining { .. }))
    })
    .await?;
    leader.term_drained();
    let took = eventually(Duration::from_secs(3), "the standby to lead", || async {
        Ok(standby.role() == Role::Leader { epoch: epoch + 1 })
    })
    .await?;
    ensure!(took < Duration::from_millis(400), "hand-over took {took:?}");
    ensure!(leader.role() == Role::Standby);
    // The old leader backs off and does not take it back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        standby.role() == Role::Leader { epoch: epoch + 1 },
        "flapped: {:?}",
        standby.role()
    );
    ca.cancel();
    cb.cancel();
    stop_listener.cancel();
    Ok(())
}

#[tokio::test]
async fn a_leader_that_cannot_renew_demotes_itself_before_the_ttl() -> Result<()> {
    let mut pg = migrated().await?;
    let (l, h) = Lease::new(lease_cfg(&pg, "a"), None);
    let cancel = CancellationToken::new();
    tokio::spawn(l.run(cancel.clone()));
    eventually(Duration::from_secs(10), "leading", || async {
        Ok(h.role() != Role::Standby)
    })
    .await?;
    let mut role = h.watch();
    let last_ok = std::time::Instant::now();
    pg.stop()?; // database gone: renewals fail; the node must stop on its own clock
    eventually(Duration::from_secs(5), "self-demotion", || async {
        Ok(h.role() == Role::Standby)
    })
    .await?;
    let took = last_ok.elapsed();
    ensure!(
        took < Duration::from_secs(3),
        "still leading {took:?} after renewals stopped (TTL 3s)"
    );
    ensure!(!h.is_valid());
    role.borrow_and_update();
    cancel.cancel();
    Ok(())
}

fn ingest_cfg(port: u16, client_id: &str) -> IngestConfig {
    IngestConfig {
        endpoint: MqttEndpoint {
            host: "127.0.0.1".into(),
            port,
            tls: false,
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        },
        client_id: client_id.into(),
        clean_session: false,
        manual_acks: true,
        keep_alive: Duration::from_secs(5),
        reconnect_max: Duration::from_millis(500),
        max_payload_bytes: 1024 * 1024,
        max_pending: 100,
        max_pending_bytes: 1024 * 1024,
        topics: vec!["acktest/#".into()],
        expect_session: false,
        sparkplug_host: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_held_across_a_reconnect_is_not_sent_on_the_new_connection() -> Result<()> {
    let mut mq = Mosquitto::start_with(
        leasehold_testkit::Dir::temp("leasehold-mqtt-")?,
        "log_type all",
    )
    .await?;
    let (topics_tx, topics_rx) = watch::channel(None);
    let (ingest, acker, mut rx) = MqttIngest::new(
        ingest_cfg(mq.port, "ack-test"),
        topics_rx.clone(),
        Arc::new(|| true),
    );
    let cancel = CancellationToken::new();
    let run = tokio::spawn(ingest.run(cancel.clone(), CancellationToken::new()));

    // Establish the session: publish until something arrives, ack it on its own connection.
    let start = std::time::Instant::now();
    loop {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "subscription never became active"
        );
        publish_all(mq.port, vec![("acktest/warmup".into(), b"w".to_vec())]).await?;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            acker.ack(vec![m]);
            break;
        }
    }
    while let Ok(m) = rx.try_recv() {
        acker.ack(vec![m]);
    }

    publish_all(mq.port, vec![("acktest/a".into(), b"A".to_vec())]).await?;
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await?
        .context("A")?;
    ensure!(first.payload.as_ref() == b"A");

    // The connection drops (broker restart; the session is persisted) before A is committed.
    mq.stop();
    mq.start_again().await?;
    let again = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await?
        .context("A redelivered")?;
    ensure!(
        again.payload.as_ref() == b"A" && again.conn != first.conn,
        "redelivery on a new connection"
    );

    // The late ack for the first delivery must not go out: its packet id now names `again`.
    acker.ack(vec![first]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel.cancel();
    run.await??;
    drop(again);
    drop(topics_tx);

    // A new session owner must still receive A: nothing acknowledged it.
    let (ingest2, acker2, mut rx2) = MqttIngest::new(
        ingest_cfg(mq.port, "ack-test"),
        topics_rx,
        Arc::new(|| true),
    );
    let cancel2 = CancellationToken::new();
    let run2 = tokio::spawn(ingest2.run(cancel2.clone(), CancellationToken::new()));
    let third = tokio::time::timeout(Duration::from_secs(10), rx2.recv())
        .await
        .with_context(|| format!("A was lost: a stale ack acknowledged it\n{}", mq.log()))?
        .context("channel closed")?;
    ensure!(third.payload.as_ref() == b"A");
    acker2.ack(vec![third]);
    cancel2.cancel();
    run2.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_migrating_at_the_same_instant_do_not_race() -> Result<()> {
    let pg = Postgres::start().await?;
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = pg.url();
        tasks.push(tokio::spawn(async move {
            let mut c = leasehold_store::connect(&url, "m").await?;
            leasehold_store::migrate(&mut c).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await??.len();
    }
    ensure!(
        applied == leasehold_store::MIGRATIONS.len(),
        "applied {applied} times"
    );
    Ok(())
}

/// A migration through a slow link: its session must never sit idle inside its transaction,
/// where a node stopped at that moment would hold the migration's locks (on `telemetry` too)
/// until its connection is found dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_never_waits_for_its_node_inside_its_transaction() -> Result<()> {
    use leasehold_testkit::proxy::Proxy;
    let pg = Postgres::start().await?;
    let db = pg.client().await?;
    let mut direct = leasehold_store::connect(&pg.url(), "test").await?;
    let last = leasehold_store::MIGRATIONS.len() as i32;
    leasehold_store::migrate_up_to(&mut direct, last - 1).await?;
    let proxy = Proxy::start(pg.port).await?;
    let url = pg.url_via(proxy.port);
    let mut slow = leasehold_store::connect(&url, "slow-migrate").await?;
    proxy.set_delay(Duration::from_millis(500));
    let run = tokio::spawn(async move { leasehold_store::migrate(&mut slow).await });
    let mut states = std::collections::BTreeSet::new();
    while !run.is_finished() {
        let seen: Option<String> = db
            .query_opt(
                "SELECT state FROM pg_stat_activity WHERE application_name = 'slow-migrate'",
                &[],
            )
            .await?
            .and_then(|r| r.get(0));
        states.extend(seen);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let applied = run.await??;
    ensure!(applied == vec![last], "applied {applied:?}");
    ensure!(
        states.contains("idle") && !states.contains("idle in transaction"),
        "the migrating session's states: {states:?}"
    );
    Ok(())
}

/// A node that stops holding the migration lock (its process stopped, its link cut) keeps the
/// others from starting only for `migrate::IDLE_LIMIT`, not until its connection is found dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_holding_the_migration_lock_lets_the_others_migrate() -> Result<()> {
    use leasehold_testkit::proxy::Proxy;
    let pg = Postgres::start().await?;
    let db = pg.client().await?;
    let proxy = Proxy::start(pg.port).await?;
    let url = pg.url_via(proxy.port);
    let mut stopped = leasehold_store::connect(&url, "stopped-migrate").await?;
    proxy.set_delay(Duration::from_millis(500));
    let _stopped = tokio::spawn(async move { leasehold_store::migrate(&mut stopped).await });
    eventually(
        Duration::from_secs(20),
        "the stopped node holding the migration lock",
        || async {
            Ok(db
                .query_opt(
                    "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                     WHERE l.locktype = 'advisory' AND l.granted
                       AND a.application_name = 'stopped-migrate'",
                    &[],
                )
                .await?
                .is_some())
        },
    )
    .await?;
    proxy.blackhole();
    let mut other = leasehold_store::connect(&pg.url(), "other").await?;
    let applied = tokio::time::timeout(
        Duration::from_secs(60),
        leasehold_store::migrate(&mut other),
    )
    .await
    .context("the stopped node's session kept the migration lock")??;
    ensure!(
        applied.len() == leasehold_store::MIGRATIONS.len(),
        "applied {applied:?}"
    );
    Ok(())
}

/// The ledger records each migration's sha256: an installation from before the checksums gains
/// them on its next start, and a migration changed after it was applied stops the start, named.
#[tokio::test]
async fn a_migration_changed_after_it_was_applied_is_refused_by_name() -> Result<()> {
    use leasehold_store::migrate::Problem;
    let pg = Postgres::start().await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    // As a release before the checksums left it: the ledger without the column.
    leasehold_store::migrate_up_to(&mut c, 3).await?;
    c.batch_execute("ALTER TABLE leasehold_schema_migrations DROP COLUMN checksum")
        .await?;
    let applied = leasehold_store::migrate(&mut c).await?;
    let later: Vec<i32> = leasehold_store::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| *v > 3)
        .collect();
    ensure!(applied == later, "applied {applied:?}");
    let ledger: Vec<(i32, Option<String>)> = c
        .query(
            "SELECT version, checksum FROM leasehold_schema_migrations ORDER BY version",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get("version"), r.get("checksum")))
        .collect();
    let expected: Vec<(i32, Option<String>)> = leasehold_store::MIGRATIONS
        .iter()
        .map(|m| (m.version, Some(m.checksum())))
        .collect();
    ensure!(ledger == expected, "ledger {ledger:?}");
    ensure!(leasehold_store::migrate(&mut c).await?.is_empty());

    // V2 as applied differs from the file the binary carries.
    c.execute(
        "UPDATE leasehold_schema_migrations SET checksum = repeat('0', 64) WHERE version = 2",
        &[],
    )
    .await?;
    match leasehold_store::migrate(&mut c).await {
        Err(
            e @ StoreError::Migration {
                version: 2,
                problem: Problem::Changed { .. },
                ..
            },
        ) => {
            ensure!(e.to_string().contains("V2__operations.sql"), "{e}");
        }
        other => anyhow::bail!("expected the changed V2 to be refused, got {other:?}"),
    }
    // The advisory lock was released on the way out: another session migrates (and is refused).
    let mut other = leasehold_store::connect(&pg.url(), "test").await?;
    let again =
        tokio::time::timeout(Duration::from_secs(5), leasehold_store::migrate(&mut other)).await?;
    ensure!(
        matches!(again, Err(StoreError::Migration { version: 2, .. })),
        "{again:?}"
    );
    Ok(())
}

/// An installation filled under the key (device_id, ts) by the previous release moves to
/// (device_id, topic, ts) without losing, changing or duplicating a row.
#[tokio::test]
async fn the_reading_identity_migration_keeps_every_row_of_a_filled_database() -> Result<()> {
    let pg = Postgres::start().await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    leasehold_store::migrate_up_to(&mut c, 2).await?;
    // What the previous writer stored: timestamped readings, timestamp-less readings keyed by
    // their content hash, and dead letters keyed by theirs.
    c.batch_execute(
        "INSERT INTO telemetry (device_id, ts, payload, topic, received_at, written_by, lease_epoch, content_hash)
         SELECT 'dev-' || (i % 50), to_timestamp(1700000000 + i), jsonb_build_object('seq', i),
                'devices/dev-' || (i % 50) || '/telemetry', now(), 'old', 1,
                CASE WHEN i % 10 = 0 THEN md5(i::text) END
         FROM generate_series(1, 5000) i;
         INSERT INTO dead_letters (topic, payload, error, received_at, written_by, lease_epoch, content_hash)
         SELECT 'devices/x/telemetry', convert_to('bad ' || i, 'UTF8'), 'payload is not valid JSON', now(), 'old', 1, md5('dl' || i)
         FROM generate_series(1, 30) i;",
    )
    .await?;
    let fingerprint = "SELECT count(*), md5(string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s', device_id, ts, payload, topic,
                              received_at, written_by, lease_epoch, content_hash), ',' ORDER BY device_id, ts))
                       FROM telemetry";
    let before = c.query_one(fingerprint, &[]).await?;
    let applied = leasehold_store::migrate(&mut c).await?;
    ensure!(applied.contains(&3), "applied {applied:?}");
    let after = c.query_one(fingerprint, &[]).await?;
    ensure!(before.get::<_, i64>(0) == 5000 && after.get::<_, i64>(0) == 5000);
    ensure!(
        before.get::<_, String>(1) == after.get::<_, String>(1),
        "rows changed"
    );
    let dead: i64 = c
        .query_one("SELECT count(*) FROM dead_letters WHERE size = octet_length(payload) AND reason = 'unknown'", &[])
        .await?
        .get(0);
    ensure!(dead == 30, "dead letters carried over: {dead}");
    let key: String = c
        .query_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'telemetry_pkey'",
            &[],
        )
        .await?
        .get(0);
    ensure!(key == "PRIMARY KEY (device_id, topic, ts)", "{key}");
    // The new identity: another topic at a stored (device_id, ts) is another reading.
    c.execute(
        "INSERT INTO telemetry (device_id, ts, payload, topic, received_at, written_by, lease_epoch)
         VALUES ('dev-1', to_timestamp(1700000001), '{}', 'devices/dev-1/humidity', now(), 'new', 2)",
        &[],
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_subscription_ledger_is_written_only_under_the_lease() -> Result<()> {
    use leasehold_store::queries::{self, LedgerWrite};
    let pg = migrated().await?;
    let c = pg.client().await?;
    c.execute(
        "INSERT INTO instance_lock (service_name, holder_id, instance_id, epoch, expires_at)
         VALUES ('mqtt-ingest', 'h1', 'a', 3, now() + interval '1 minute')",
        &[],
    )
    .await?;
    let fence = Fence {
        lease_name: "mqtt-ingest".into(),
        holder_id: "h1".into(),
        epoch: 3,
    };
    let f: Vec<String> = vec!["a/1".into(), "a/2".into(), "a/3".into()];
    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Pending(&f)).await?;
    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Granted(&f[..2], &[1, 1])).await?;
    let why = vec!["refused by the broker (SUBACK 0x80)".to_string()];
    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Refused(&f[2..], &why)).await?;
    let rows = queries::ledger(&c, "cid").await?;
    let shown: Vec<(&str, bool)> = rows
        .iter()
        .map(|r| (r.topic_filter.as_str(), r.subscribed))
        .collect();
    ensure!(
        shown == vec![("a/1", true), ("a/2", true), ("a/3", false)],
        "{shown:?}"
    );
    let refused = queries::refused_subscriptions(&c, Duration::from_secs(60), 5).await?;
    ensure!(
        refused.count == 1 && refused.latest[0].0 == "a/3",
        "{refused:?}"
    );
    ensure!(
        queries::ledger(&c, "other").await?.is_empty(),
        "keyed by client id"
    );

    // A node whose lease epoch is not the current one changes nothing.
    let stale = Fence {
        epoch: 2,
        ..fence.clone()
    };
    let res = queries::write_ledger(&c, &stale, "cid", &LedgerWrite::Removed(&f)).await;
    ensure!(matches!(res, Err(StoreError::Fenced { .. })), "{res:?}");
    let res = queries::write_ledger(&c, &stale, "cid", &LedgerWrite::Forget).await;
    ensure!(matches!(res, Err(StoreError::Fenced { .. })), "{res:?}");
    ensure!(queries::ledger(&c, "cid").await?.len() == 3);

    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Removed(&f[..1])).await?;
    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Granted(&f[2..], &[1])).await?;
    ensure!(
        queries::refused_subscriptions(&c, Duration::from_secs(60), 5)
            .await?
            .count
            == 0,
        "a granted filter is no longer refused"
    );
    ensure!(queries::ledger(&c, "cid").await?.len() == 2);
    queries::write_ledger(&c, &fence, "cid", &LedgerWrite::Forget).await?;
    ensure!(queries::ledger(&c, "cid").await?.is_empty());
    Ok(())
}

/// Starting on an up-to-date schema takes no lock a reader holds (a backup's `pg_dump`, an idle
/// transaction): the checksum column is looked up, not re-added. A role that does not own the
/// ledger still starts an installation from before the checksums (as it did), and a failed
/// migration says the database's words.
#[tokio::test]
async fn migrating_waits_for_no_reader_a_non_owner_still_starts_and_failures_say_why() -> Result<()>
{
    let pg = migrated().await?;
    let owner = pg.client().await?;
    let reader = pg.client().await?;
    reader
        .batch_execute("BEGIN; SELECT count(*) FROM leasehold_schema_migrations")
        .await?;
    let mut c = leasehold_store::connect(&pg.url(), "test").await?;
    let up_to_date =
        tokio::time::timeout(Duration::from_secs(10), leasehold_store::migrate(&mut c)).await;
    ensure!(
        matches!(&up_to_date, Ok(Ok(applied)) if applied.is_empty()),
        "a start on an up-to-date schema waited for a reader: {up_to_date:?}"
    );
    reader.batch_execute("COMMIT").await?;

    // An installation from before the checksums, run by a role that may use but not alter it.
    owner
        .batch_execute(
            "ALTER TABLE leasehold_schema_migrations DROP COLUMN checksum;
             CREATE ROLE app LOGIN;
             GRANT CREATE ON SCHEMA public TO app;
             GRANT SELECT, INSERT, UPDATE ON leasehold_schema_migrations TO app",
        )
        .await?;
    let app_url = pg.url().replace("postgres@", "app@");
    let mut app = leasehold_store::connect(&app_url, "test").await?;
    let applied = leasehold_store::migrate(&mut app).await;
    ensure!(
        matches!(&applied, Ok(a) if a.is_empty()),
        "the non-owner role could not start: {applied:?}"
    );

    // A migration that fails shows why, in one line.
    owner.batch_execute("CREATE DATABASE fresh").await?;
    let fresh_url = pg.url().replace("/postgres?", "/fresh?");
    let fresh = leasehold_store::connect(&fresh_url, "test").await?;
    fresh
        .batch_execute("CREATE TABLE instance_lock (x int)")
        .await?;
    let mut fresh = fresh;
    let e = leasehold_store::migrate(&mut fresh)
        .await
        .err()
        .context("V1 cannot apply over a foreign instance_lock")?
        .to_string();
    ensure!(
        e.contains("V1__initial.sql") && e.contains("already exists"),
        "{e}"
    );
    Ok(())
}
