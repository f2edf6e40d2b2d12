//! `leasehold replay`'s statements: dead letters selected and locked (`FOR UPDATE SKIP LOCKED`,
//! so two replays at once never take the same one), then removed in the same transaction as
//! the fenced batch statement that wrote them again ([`BatchWriter::write`]). A transaction that
//! does not commit leaves every dead letter where it was.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::op::{self, Op};
use crate::{BatchWriter, Result, StoreError};

/// Which dead letters to replay, fixed when the replay starts ([`Selection::fix`]): what it
/// counted then is what it replays, however long that takes.
#[derive(Debug, Clone)]
pub struct Selection {
    /// A route's name (`default`: the default route's, `route IS NULL`); a dead letter of
    /// several routes (`a,b`) is one of each.
    pub route: Option<String>,
    pub reason: Option<String>,
    /// Received after this instant: a window counted back on the database's clock, the one that
    /// stamped `received_at`, so a dead letter does not drop out of it while the replay runs.
    pub received_after: Option<DateTime<Utc>>,
    /// The newest dead letter then: one written later (by this replay, failing again, or by
    /// the leader) is not taken.
    pub upto: i64,
}

impl Selection {
    /// `route`, `reason` and the last `within` (if given), as of now.
    pub async fn fix(
        c: &impl tokio_postgres::GenericClient,
        route: Option<String>,
        reason: Option<String>,
        within: Option<Duration>,
    ) -> Result<Selection> {
        op::one(
            c,
            Op::Replay,
            "SELECT CASE WHEN $1::float8 IS NOT NULL
                         THEN clock_timestamp() - make_interval(secs => $1) END AS after,
                    (SELECT coalesce(max(id), 0) FROM dead_letters) AS upto",
            &[&within.map(|d| d.as_secs_f64())],
            |r| {
                Ok(Selection {
                    route,
                    reason,
                    received_after: r.try_get("after")?,
                    upto: r.try_get("upto")?,
                })
            },
        )
        .await
    }
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
    AND ($3::timestamptz IS NULL OR received_at > $3)
    AND id <= $4";

/// How many dead letters `sel` selects, by reason.
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
        &[&sel.route, &sel.reason, &sel.received_after, &sel.upto],
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
        self.held_since = None;
        Ok(())
    }

    /// `COMMIT` (or `ROLLBACK` when `commit` is false: a dry run, or a failed statement).
    /// A `COMMIT` waits for locks (a route's deferred trigger) only for what is left of the
    /// hold limit.
    pub async fn finish(&mut self, commit: bool) -> Result<()> {
        let bound = commit.then(|| self.hold_left_sql());
        (self.hold_limit, self.held_since) = (None, None);
        let sql = match bound {
            None => "ROLLBACK".to_string(),
            Some(Ok(None)) => "COMMIT".to_string(),
            // One message, one round trip: no wait for this client in between.
            Some(Ok(Some(bound))) => format!("{bound}; COMMIT"),
            Some(Err(e)) => {
                op::batch(&self.client, Op::Replay, "ROLLBACK").await?;
                return Err(e);
            }
        };
        op::batch(&self.client, Op::Replay, &sql).await
    }

    /// Locks up to `limit` dead letters of `sel` with an id after `after` (in id order),
    /// skipping those another replay holds; or, with `ids`, those of them still there and free.
    pub async fn lock_dead_letters(
        &self,
        sel: &Selection,
        after: i64,
        limit: i64,
        ids: Option<&[i64]>,
    ) -> Result<Vec<StoredDeadLetter>> {
        let sql = format!(
            "SELECT id, topic, payload, size, received_at, mqtt_pkid, possible_duplicate, reason, error, route
             FROM dead_letters
             WHERE {WHERE} AND id > $5 AND ($7::bigint[] IS NULL OR id = ANY($7))
             ORDER BY id LIMIT $6 FOR UPDATE SKIP LOCKED"
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
                &sel.upto,
                &after,
                &limit,
                &ids,
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
    /// Bounded by what is left of the hold limit, set in the same flight.
    pub async fn delete_dead_letters(&self, ids: &[i64]) -> Result<u64> {
        let bound = self.hold_left_sql()?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
        let (set, deleted) = tokio::join!(
            biased;
            self.batch_if(bound.as_deref()),
            op::exec(
                &self.client,
                Op::Replay,
                "DELETE FROM dead_letters WHERE id = ANY($1)",
                &params,
            ),
        );
        set.map_err(StoreError::Db)?;
        deleted
    }

    /// A dead letter whose row the database refuses again keeps its place with the database's
    /// new words; 0 when another replay holds it now or removed it (it was unlocked for this).
    pub async fn refuse_dead_letter(&self, id: i64, error: &str) -> Result<u64> {
        op::exec(
            &self.client,
            Op::Replay,
            "UPDATE dead_letters SET reason = 'rejected_by_database', error = $2
             WHERE id = (SELECT id FROM dead_letters WHERE id = $1 FOR UPDATE SKIP LOCKED)",
            &[&id, &error],
        )
        .await
    }
}
