//! An outside review of routes, attacking them as a user migrating a real table would: numbers
//! that a float would change, and keys equal for the column's type but spelled differently in
//! one batch. Each test failed before its fix (or is ignored, saying why).

use std::time::Duration;

use anyhow::{ensure, Result};
use leasehold_testkit::eventually;
use leasehold_testkit::publish::publish_all;

use crate::helpers::{check, msg};
use crate::routes::{count_reaches, routed, spawn};

/// `(reason, error)` of every dead letter of `route`, oldest first.
async fn dead_letters(c: &crate::helpers::Cluster, route: &str) -> Result<Vec<(String, String)>> {
    Ok(c.pg
        .client()
        .await?
        .query(
            "SELECT reason, error FROM dead_letters WHERE route = $1 ORDER BY id",
            &[&route],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A bigint from `"9007199254740993.0"` was read through an `f64` and stored as
/// `9007199254740992`; `"1e-400"` underflowed to `0` and was stored as an integer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integers_are_read_exactly_never_through_a_float() {
    let mut c = routed(
        "CREATE TABLE counters (id text PRIMARY KEY, big bigint, small smallint)",
        r#"
[[routes]]
name = "counters"
topics = ["c/+"]
table = "counters"
key = ["id"]
[routes.columns]
id = "topic[1]"
big = "$.big"
small = "$.small"
"#,
    )
    .await
    .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![
                msg("c/a", r#"{"big":"9007199254740993.0"}"#),
                msg("c/b", r#"{"big":"-9223372036854775808","small":"12.5e1"}"#),
                msg("c/c", r#"{"big":"1e-400"}"#),
                msg("c/d", r#"{"small":"0.00001e5"}"#),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM counters", 3).await?;
        count_reaches(&c, "SELECT count(*) FROM dead_letters", 1).await?;
        let db = c.pg.client().await?;
        let rows: Vec<(String, Option<i64>, Option<i16>)> = db
            .query("SELECT id, big, small FROM counters ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        ensure!(
            rows == [
                ("a".to_string(), Some(9_007_199_254_740_993), None),
                ("b".to_string(), Some(i64::MIN), Some(125)),
                ("d".to_string(), None, Some(1)),
            ],
            "{rows:?}"
        );
        let dead = dead_letters(&c, "counters").await?;
        ensure!(
            dead.len() == 1
                && dead[0].0 == "mapping_failed"
                && dead[0]
                    .1
                    .contains(r#"column "big": the string "1e-400" is not an integer"#),
            "{dead:?}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// With `on_conflict = "nothing"`, two messages whose keys are equal for the column's type but
/// spelled differently (`100` and `1e2` in a numeric key, `ABC` and `abc` in a citext key) in one
/// batch went into one insert: the database skipped the second, and because the inserted key
/// matched it too, it was counted as written — acknowledged, neither stored nor dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_spelled_two_ways_in_one_batch_is_a_conflict_not_a_silent_loss() {
    let mut c = routed(
        "CREATE EXTENSION IF NOT EXISTS citext;
         CREATE TABLE by_num (k numeric PRIMARY KEY, v text);
         CREATE TABLE by_name (k citext PRIMARY KEY, v text);",
        r#"
[[routes]]
name = "num"
topics = ["n"]
table = "by_num"
key = ["k"]
[routes.columns]
k = "$.k"
v = "$.v"

[[routes]]
name = "name"
topics = ["s"]
table = "by_name"
key = ["k"]
[routes.columns]
k = "$.k"
v = "$.v"
"#,
    )
    .await
    .expect("servers");
    c.extra_env.push(("BATCH_MAX_WAIT", "1s".to_string()));
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![
                msg("n", r#"{"k":"100","v":"first"}"#),
                msg("n", r#"{"k":"1e2","v":"second"}"#),
                msg("n", r#"{"k":"100.0","v":"first"}"#),
                msg("s", r#"{"k":"ABC","v":"first"}"#),
                msg("s", r#"{"k":"abc","v":"second"}"#),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM by_num", 1).await?;
        count_reaches(&c, "SELECT count(*) FROM by_name", 1).await?;
        eventually(Duration::from_secs(15), "two conflicts", || async {
            Ok(c.count("SELECT count(*) FROM dead_letters").await? >= 2)
        })
        .await?;
        ensure!(
            c.count("SELECT count(*) FROM by_num WHERE v = 'first'")
                .await?
                == 1
                && c.count("SELECT count(*) FROM by_name WHERE v = 'first'")
                    .await?
                    == 1,
            "the first by arrival is stored"
        );
        for route in ["num", "name"] {
            let dead = dead_letters(&c, route).await?;
            ensure!(
                dead.len() == 1
                    && dead[0].0 == "conflict"
                    && dead[0].1.contains("a different row is stored"),
                "{route}: {dead:?}"
            );
        }
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A JSON number is parsed into an `f64` before it reaches a `numeric` column, so a value with
/// more than 17 significant digits is stored rounded (`12345678901234567890.123` as
/// `12345678901234567000`), where the consumer it replaces (or PostgreSQL's own
/// `(payload->>'v')::numeric`) keeps every digit. A number string (`"12345678901234567890.123"`)
/// is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs serde_json's arbitrary_precision (a workspace-wide change of how JSON numbers are held)"]
async fn a_json_number_reaches_a_numeric_column_with_every_digit() {
    let mut c = routed(
        "CREATE TABLE amounts (id text PRIMARY KEY, n numeric)",
        r#"
[[routes]]
name = "amounts"
topics = ["a/+"]
table = "amounts"
key = ["id"]
[routes.columns]
id = "topic[1]"
n = "$.n"
"#,
    )
    .await
    .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![
                msg("a/string", r#"{"n":"12345678901234567890.123"}"#),
                msg("a/number", r#"{"n":12345678901234567890.123}"#),
            ],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM amounts", 2).await?;
        let stored: Vec<(String, String)> =
            c.pg.client()
                .await?
                .query("SELECT id, n::text FROM amounts ORDER BY id", &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
        ensure!(
            stored.iter().all(|(_, n)| n == "12345678901234567890.123"),
            "{stored:?}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A `BEFORE INSERT` trigger that normalizes the key (`upper(code)`, a common habit of tables
/// fed by several writers) made every row it stored also a `not_stored` dead letter: the key
/// the insert returned no longer equalled the key sent, so the row looked skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_normalizes_the_key_is_not_a_dead_letter_for_a_stored_row() {
    let mut c = routed(
        "CREATE TABLE codes (code text PRIMARY KEY, v int);
         CREATE FUNCTION upper_code() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.code := upper(NEW.code); RETURN NEW; END $$;
         CREATE TRIGGER upper_code BEFORE INSERT ON codes
           FOR EACH ROW EXECUTE FUNCTION upper_code();",
        r#"
[[routes]]
name = "codes"
topics = ["k/+"]
table = "codes"
key = ["code"]
[routes.columns]
code = "topic[1]"
v = "$.v"
"#,
    )
    .await
    .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![msg("k/abc", r#"{"v":1}"#), msg("k/def", r#"{"v":2}"#)],
        )
        .await?;
        count_reaches(
            &c,
            "SELECT count(*) FROM codes WHERE code IN ('ABC', 'DEF')",
            2,
        )
        .await?;
        // A later message (after the rows committed) proves the earlier batches were settled.
        publish_all(
            c.mq.port,
            vec![msg("devices/d1/telemetry", r#"{"ts":1700000000,"v":3}"#)],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM telemetry", 1).await?;
        let dead = dead_letters(&c, "codes").await?;
        ensure!(dead.is_empty(), "{dead:?}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A JSON array fills an array column (`int[]`, `text[]`). Before the fix it was sent as JSON
/// text (`[1,2]`), which PostgreSQL refuses as a malformed array literal, so every such message
/// was a `rejected_by_database` dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_fills_an_array_column() {
    let mut c = routed(
        "CREATE TABLE arrays (id text PRIMARY KEY, a int[], t text[])",
        r#"
[[routes]]
name = "arrays"
topics = ["a/+"]
table = "arrays"
key = ["id"]
[routes.columns]
id = "topic[1]"
a = "$.a"
t = "$.t"
"#,
    )
    .await
    .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(
            c.mq.port,
            vec![msg("a/x", r#"{"a":[1,2],"t":["a b","c,d",null]}"#)],
        )
        .await?;
        count_reaches(&c, "SELECT count(*) FROM arrays", 1).await?;
        let n = c
            .count(
                "SELECT count(*) FROM arrays WHERE a = '{1,2}' AND t = ARRAY['a b', 'c,d', NULL]",
            )
            .await?;
        ensure!(n == 1, "the arrays as sent");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Two `"nothing"` routes into one table with the same key from one message: the second
/// route's identical row was dead-lettered as `not_stored` ("neither took the row nor holds one
/// with its key"), although the first route stored that very row in the same statement; it is a
/// duplicate. (Two `"update"` routes into one table work: the later route's row wins.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routes_into_one_table_store_one_row_and_no_dead_letter() {
    let mut c = routed(
        "CREATE TABLE one (id text PRIMARY KEY, v int, src text);
         CREATE TABLE two (id text PRIMARY KEY, v int, src text);",
        r#"
[[routes]]
name = "a"
topics = ["m/+"]
table = "one"
key = ["id"]
[routes.columns]
id = "topic[1]"
v = "$.v"

[[routes]]
name = "b"
topics = ["m/#"]
table = "one"
key = ["id"]
[routes.columns]
id = "topic[1]"
v = "$.v"

[[routes]]
name = "c"
topics = ["m/+"]
table = "two"
key = ["id"]
on_conflict = "update"
[routes.columns]
id = "topic[1]"
v = "$.v"
src = "'c'"

[[routes]]
name = "d"
topics = ["m/#"]
table = "two"
key = ["id"]
on_conflict = "update"
[routes.columns]
id = "topic[1]"
v = "$.v"
src = "'d'"
"#,
    )
    .await
    .expect("servers");
    let res = async {
        spawn(&mut c, "node-a")?;
        c.wait_leader().await?;
        publish_all(c.mq.port, vec![msg("m/x", r#"{"v":1}"#)]).await?;
        count_reaches(&c, "SELECT count(*) FROM two WHERE src = 'd'", 1).await?;
        eventually(Duration::from_secs(15), "route b settled", || async {
            let m = crate::routes::metrics(&c, "node-a").await?;
            Ok(
                leasehold_testkit::metric(&m, "leasehold_messages_duplicate_total{route=\"b\"}")
                    == Some(1.0),
            )
        })
        .await?;
        ensure!(c.count("SELECT count(*) FROM one").await? == 1, "one row");
        ensure!(
            c.count("SELECT count(*) FROM dead_letters").await? == 0,
            "no dead letter"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
