//! `leasehold replay`'s statements: dead letters selected and locked (`FOR UPDATE SKIP LOCKED`,
//! so two replays at once never take the same one), then removed in the same transaction as
//! the fenced batch statement that wrote them again ([`BatchWriter::write`]). A transaction that
//! does not commit leaves every dead letter where it was.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::op::{self, Op};
use crate::{BatchWriter, Result};

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// A route's name (`default`: the default route's, `route IS NULL`); a dead letter of
    /// several routes (`a,b`) is one of each.
    pub route: Option<String>,
    pub reason: Option<String>,
    /// Received after this instant ([`window_start`]): fixed when the replay starts, so a
    /// dead letter selected then is not left out of a later chunk by a window that moved.
    pub received_after: Option<DateTime<Utc>>,
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub size: i32,
    pub received_at: DateTime<Utc>,
    pub pkid: Option<i32>,
    pub dup: bool,
    pub reason: String,
    pub error: String,
    pub route: Option<String>,
}

const WHERE: &str = "($1::text IS NULL
        OR ($1 = 'default' AND route IS NULL)
        OR $1 = ANY(string_to_array(route, ',')))
    AND ($2::text IS NULL OR reason = $2)
    AND ($3::timestamptz IS NULL OR received_at > $3)";

/// The start of a window of `within` before now, on the database's clock (the one that stamped
/// `received_at`).
pub async fn window_start(
    c: &impl tokio_postgres::GenericClient,
    within: Duration,
) -> Result<DateTime<Utc>> {
    op::one(
        c,
        Op::Replay,
        "SELECT clock_timestamp() - make_interval(secs => $1) AS at",
        &[&within.as_secs_f64()],
        |r| r.try_get("at"),
    )
    .await
}

/// The newest dead letter's id (0: none).
pub async fn newest_id(c: &impl tokio_postgres::GenericClient) -> Result<i64> {
    op::one(
        c,
        Op::Replay,
        "SELECT coalesce(max(id), 0) AS id FROM dead_letters",
        &[],
        |r| r.try_get("id"),
    )
    .await
}

/// How many dead letters `sel` selects now, by reason.
pub async fn count(
    c: &impl tokio_postgres::GenericClient,
    sel: &Selection,
) -> Result<Vec<(String, i64)>> {
    let sql = format!(
        "SELECT reason, count(*) AS n FROM dead_letters WHERE {WHERE} GROUP BY 1 ORDER BY 1"
    );
    op::all(
        c,
        Op::Replay,
        sql.as_str(),
        &[&sel.route, &sel.reason, &sel.received_after],
        |r| Ok((r.try_get("reason")?, r.try_get("n")?)),
    )
    .await
}

impl BatchWriter {
    /// `BEGIN`: the statements up to [`BatchWriter::finish`] are one transaction. From its first
    /// [`BatchWriter::write`], which takes the lease row, each statement runs, each wait for a
    /// lock lasts (a deferred trigger's at `COMMIT` too, where no statement timeout runs), and
    /// each wait for this client lasts, at most `hold_limit` ([`crate::Fence::step_limit`] of the
    /// leader's TTL): a replay stopped in the middle (Ctrl-Z) loses its session, and a statement
    /// held up under the row (a trigger waiting for a lock) is cancelled, rather than hold up the
    /// leader's renewals.
    pub async fn begin(&mut self, hold_limit: Duration) -> Result<()> {
        op::batch(&self.client, Op::Replay, "BEGIN").await?;
        self.hold_limit = Some(hold_limit);
        Ok(())
    }

    /// `COMMIT` (or `ROLLBACK` when `commit` is false: a dry run, or a failed statement).
    pub async fn finish(&mut self, commit: bool) -> Result<()> {
        self.hold_limit = None;
        let sql = if commit { "COMMIT" } else { "ROLLBACK" };
        op::batch(&self.client, Op::Replay, sql).await
    }

    /// Locks up to `limit` dead letters of `sel` with an id in `(after, upto]` (in id order),
    /// skipping those another replay holds; or, with `ids`, those of them still there and free.
    /// `upto` is the newest id when the replay started: a dead letter it writes anew (one that
    /// still fails) is not taken again.
    pub async fn lock_dead_letters(
        &self,
        sel: &Selection,
        (after, upto): (i64, i64),
        limit: i64,
        ids: Option<&[i64]>,
    ) -> Result<Vec<StoredDeadLetter>> {
        let sql = format!(
            "SELECT id, topic, payload, size, received_at, mqtt_pkid, possible_duplicate, reason, error, route
             FROM dead_letters
             WHERE {WHERE} AND id > $4 AND id <= $7 AND ($6::bigint[] IS NULL OR id = ANY($6))
             ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED"
        );
        let ids = ids.map(<[i64]>::to_vec);
        op::all(
            &self.client,
            Op::Replay,
            sql.as_str(),
            &[
                &sel.route,
                &sel.reason,
                &sel.received_after,
                &after,
                &limit,
                &ids,
                &upto,
            ],
            |r| {
                from_row!(r => StoredDeadLetter {
                    id, topic, payload, size, received_at, pkid: "mqtt_pkid",
                    dup: "possible_duplicate", reason, error, route,
                })
            },
        )
        .await
    }

    /// Removes the replayed dead letters (those that fail again were written anew, with their
    /// new reason, by the batch statement of the same transaction).
    pub async fn delete_dead_letters(&self, ids: &[i64]) -> Result<u64> {
        op::exec(
            &self.client,
            Op::Replay,
            "DELETE FROM dead_letters WHERE id = ANY($1)",
            &[&ids],
        )
        .await
    }

    /// A dead letter whose row the database refuses again keeps its place with the database's
    /// new words.
    pub async fn refuse_dead_letter(&self, id: i64, error: &str) -> Result<u64> {
        op::exec(
            &self.client,
            Op::Replay,
            "UPDATE dead_letters SET reason = 'rejected_by_database', error = $2 WHERE id = $1",
            &[&id, &error],
        )
        .await
    }
}
