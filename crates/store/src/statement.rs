//! The batch statement, generated once per connection from the routes' descriptions
//! ([`ResolvedRoute`]): the built-in route into `telemetry` and every `[[routes]]` entry go through
//! the same text, so each gets the same fence, redelivery, duplicate and conflict rules.
//!
//! One statement (one round trip, one implicit transaction):
//!
//! 1. `fence` locks the lease row `FOR SHARE` if, and only if, this holder still holds it at this
//!    epoch and it has not expired on the database clock. A concurrent takeover (an `UPDATE` of
//!    that row) waits for this statement to finish, and this statement waits for a takeover in
//!    progress and then re-checks the new row version: a stale writer commits before a takeover or
//!    not at all. Every insert below is conditional on it.
//! 2. `g`: the batch's messages that have a row in some route, once each (topic, payload text,
//!    receipt time, packet id, DUP). Columns that come from the message are read from here, so a
//!    payload crosses the wire once however many routes take it. (The optimistic statement
//!    unnests the same arrays with each route's rows instead: no join.)
//! 3. Per route `k`: `q{k}` its rows (one array per column sent, aligned with `g`'s messages:
//!    NULL where the route has no row of a message); `again{k}` (routes that map
//!    `content_hash` and `mqtt_pkid`) the DUP-flagged timestamp-less rows whose first copy is
//!    stored, skipped; `i{k}` the insert, `ON CONFLICT (key)`; `m{k}` the rows it did not take
//!    (computed only when fewer rows came back than were sent); `c{k}` those rows against the
//!    row that holds their key — in the table's snapshot, or inserted earlier in this statement by
//!    this route or an earlier one into the same table — the same content is a duplicate, a
//!    different one a conflict (dead-lettered); `ra{k}` conflicts that are redeliveries of a
//!    conflict already dead-lettered; `u{k}` rows neither taken nor held (a trigger skipped them).
//! 4. `newest`: the newest receipt among the rows `telemetry` took, recorded for data age
//!    (`telemetry_newest`) when it is a second newer than the record.
//! 5. `dead`: decode and mapping failures (skipping their own redeliveries, `dl_again`), and every
//!    route's conflicts and unstored rows.
//!
//! A redelivery's first copy is looked for only after `floor`: within the redelivery window and
//! among the last `redelivery_span` readings stored before it — the broker reuses a packet id
//! after 65,535 deliveries, so an older copy with the same id is another publish.
//!
//! Parameters are arrays (`unnest`), so their count depends only on the routes. One statement
//! rather than BEGIN / check / insert / COMMIT keeps the share lock only for the server-side
//! execution time: a multi-round-trip transaction would hold it across round trips and starve
//! the leader's own renewals.

use std::fmt::Write as _;

use leasehold_config::{OnConflict, Source};

use crate::routes::{ColumnKind, ResolvedColumn, ResolvedRoute};

/// How a value is sent in its column's array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Text,
    Int8,
    Bool,
    Time,
}

impl Wire {
    fn array(self) -> &'static str {
        match self {
            Wire::Text => "text[]",
            Wire::Int8 => "int8[]",
            Wire::Bool => "bool[]",
            Wire::Time => "timestamptz[]",
        }
    }
}

/// How a column's value reaches the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// One value per row, in an array of this type.
    Sent(Wire),
    /// From the message (`g`) or a parameter of the statement: never sent per row.
    Shared,
}

/// How column `c`'s values travel: what the message or the statement already holds is not sent
/// again per row; the rest goes in the narrowest array PostgreSQL reads without parsing text.
pub fn carry(c: &ResolvedColumn) -> Carry {
    use ColumnKind::*;
    match (&c.source, c.kind) {
        (Source::Topic | Source::WrittenBy | Source::ContentHash, Text)
        | (Source::PossibleDuplicate, Bool)
        | (Source::Payload, Text | Json | Jsonb)
        | (Source::ReceivedAt, Timestamptz)
        | (Source::LeaseEpoch, Int8)
        | (Source::PacketId, Int4 | Int8) => Carry::Shared,
        (_, Int2 | Int4 | Int8) => Carry::Sent(Wire::Int8),
        (_, Bool) => Carry::Sent(Wire::Bool),
        (_, Timestamptz) => Carry::Sent(Wire::Time),
        _ => Carry::Sent(Wire::Text),
    }
}

/// The columns of `route` sent per row ([`Carry::Sent`]), in parameter order, with their wire.
pub(crate) fn sent_columns(route: &ResolvedRoute) -> impl Iterator<Item = (usize, Wire)> + '_ {
    route
        .columns
        .iter()
        .enumerate()
        .filter_map(|(j, c)| match carry(c) {
            Carry::Sent(w) => Some((j, w)),
            Carry::Shared => None,
        })
}

/// Whether a column's value comes from the message (not from who wrote it, when, or how it
/// was delivered): only these decide whether a row with a stored key is a duplicate or a conflict.
pub fn from_message(source: &Source) -> bool {
    !matches!(
        source,
        Source::ReceivedAt
            | Source::WrittenBy
            | Source::LeaseEpoch
            | Source::ContentHash
            | Source::PacketId
            | Source::PossibleDuplicate
    )
}

/// Quotes `s` as an SQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Parameters before the routes' own: the fence and who writes ($1..$4), the redelivery window
/// and span ($5, $6), the messages ($7..$13), the dead letters ($14..$24).
pub const FIXED_PARAMS: usize = 24;

/// After the fence ([`crate::queries::FENCE_CTE`]): the messages and the dead letters.
const HEAD: &str = "g AS MATERIALIZED (
        SELECT * FROM unnest($7::int[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
                             $12::int[], $13::bool[])
             AS u(i, tp, p, rcv, h, k, dup)),
    dl AS MATERIALIZED (
        SELECT * FROM unnest($14::int[], $15::text[], $16::bytea[], $17::int[], $18::text[], $19::text[],
                             $20::timestamptz[], $21::text[], $22::int[], $23::bool[], $24::text[])
             AS u(i, tp, p, sz, reason, e, rcv, h, k, dup, route))";

/// The messages' columns but their positions, as `g` names them, and their arrays.
const MESSAGE_COLUMNS: [(&str, &str); 6] = [
    ("tp", "$8::text[]"),
    ("p", "$9::text[]"),
    ("rcv", "$10::timestamptz[]"),
    ("h", "$11::text[]"),
    ("k", "$12::int[]"),
    ("dup", "$13::bool[]"),
];

/// The message columns (of `g`, see [`MESSAGE_COLUMNS`]) that column `c`'s value reads
/// ([`Described::value`]).
fn message_reads(c: &ResolvedColumn) -> &'static [&'static str] {
    if carry(c) != Carry::Shared {
        return &[];
    }
    match c.source {
        Source::Topic => &["tp"],
        Source::Payload => &["p"],
        Source::ReceivedAt => &["rcv"],
        Source::ContentHash => &["h"],
        Source::PossibleDuplicate => &["dup", "h"],
        Source::WrittenBy | Source::LeaseEpoch => &[],
        // As `value` reads every other shared column.
        _ => &["k"],
    }
}

/// After [`HEAD`] in the full statement: the floor of a redelivery's first copy, and the dead
/// letters that are redeliveries.
const REDELIVERY: &str = "first_dup AS MATERIALIZED (
        SELECT min(rcv) AS at FROM (SELECT rcv FROM g WHERE dup UNION ALL SELECT rcv FROM dl WHERE dup) u),
    floor AS MATERIALIZED (
        SELECT CASE WHEN d.at IS NOT NULL THEN greatest(d.at - $5::interval,
            coalesce(leasehold_telemetry_floor(d.at, $6), '-infinity'::timestamptz))
            END AS f
        FROM first_dup d),
    dl_again AS MATERIALIZED (
        SELECT dl.i FROM dl
        WHERE dl.dup AND EXISTS (
            SELECT 1 FROM dead_letters y
            WHERE y.content_hash = dl.h AND y.mqtt_pkid = dl.k
              AND y.received_at > (SELECT f FROM floor) AND y.received_at < dl.rcv))";

const DEAD_ARM: &str = "SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup, route FROM dl
        WHERE EXISTS (SELECT 1 FROM fence) AND dl.i NOT IN (SELECT i FROM dl_again)";

/// `dead`: the insert of `arms` (each a `SELECT` of a dead letter's columns) into `dead_letters`.
fn dead_cte(arms: &[String]) -> String {
    format!(
        "dead AS (
        INSERT INTO dead_letters (topic, payload, size, reason, error, received_at, written_by,
                                  lease_epoch, content_hash, mqtt_pkid, possible_duplicate, route)
        {}
        RETURNING 1)",
        arms.join("\n        UNION ALL\n        ")
    )
}

/// What a batch statement records besides the routes' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Records {
    /// The Sparkplug B edge nodes' record after the routes' parameters
    /// ([`crate::sparkplug::record_ctes`], [`crate::sparkplug::NODE_PARAMS`]).
    pub nodes: bool,
    /// The newest receipt `telemetry` took, for data age ([`Described::newest_cte`]). Not for
    /// `leasehold replay`, whose transaction spans several statements: it would hold the one
    /// row every batch statement of the leader updates across all of them.
    pub newest: bool,
}

/// The content hash of message `g` (sent when the writer computed it, else computed here).
const MESSAGE_HASH: &str = "coalesce(g.h, encode(substr(sha256(convert_to(g.tp, 'UTF8') || '\\x00'::bytea || convert_to(g.p, 'UTF8')), 1, 16), 'hex'))";

/// The statement for `routes` (`defaults[k][j]`: the default expression of column `j` of route
/// `k`, when it has one). Parameters: [`FIXED_PARAMS`], then per route its rows' positions and
/// one array per column sent ([`carry`]), each aligned with the messages' arrays; then what
/// `records` asks for.
pub fn batch_sql(
    routes: &[ResolvedRoute],
    defaults: &[Vec<Option<String>>],
    records: Records,
) -> String {
    let mut ctes = vec![
        crate::queries::FENCE_CTE.to_string(),
        HEAD.to_string(),
        REDELIVERY.to_string(),
    ];
    let mut arms = vec![DEAD_ARM.to_string()];
    let mut outputs = String::new();
    let (described, param) = describe(routes, defaults);
    for (k, d) in described.iter().enumerate() {
        ctes.push(d.ctes(&described[..k]));
        arms.extend(d.dead_arms());
        let _ = write!(
            outputs,
            ",
           (SELECT count(*) FROM i{k}) AS written_{k},
           ARRAY(SELECT i FROM c{k} WHERE same UNION ALL SELECT i FROM ra{k}{again}) AS duplicates_{k},
           ARRAY(SELECT i FROM c{k} WHERE NOT same AND i NOT IN (SELECT i FROM ra{k})) AS conflicts_{k},
           ARRAY(SELECT i FROM u{k}) AS unstored_{k}",
            again = if d.again.is_some() {
                format!(" UNION ALL SELECT i FROM again{k}")
            } else {
                String::new()
            }
        );
    }
    if records.newest {
        ctes.extend(described.iter().find_map(Described::newest_cte));
    }
    ctes.push(dead_cte(&arms));
    if records.nodes {
        ctes.push(crate::sparkplug::record_ctes(param + 1));
    }
    format!(
        "WITH {}
    SELECT (SELECT count(*) FROM fence) AS held,
           (SELECT count(*) FROM dead) AS dead_lettered,
           ARRAY(SELECT i FROM dl_again) AS redelivered{outputs}",
        ctes.join(",\n    ")
    )
}

/// The optimistic statement for `routes`: the same parameters as [`batch_sql`]'s (prepared
/// with its types, so the redelivery window and span go unused), its rows inserted without
/// `ON CONFLICT`. For a batch without a redelivery whose keys are all new, which is nearly every
/// batch: PostgreSQL's speculative insertion (the arbiter index searched before each row, then
/// the row confirmed) cost about a quarter of the statement on a partitioned `telemetry`. Any
/// key already stored fails it whole (`unique_violation`), and so does a row the table did not
/// take (a trigger or rule skipped it: `leasehold_all_stored`, migration 12); nothing of it is
/// kept, and the writer runs [`batch_sql`]'s statement instead, which tells each case apart.
pub fn optimistic_sql(
    routes: &[ResolvedRoute],
    defaults: &[Vec<Option<String>>],
    records: Records,
) -> String {
    let mut ctes = vec![crate::queries::FENCE_CTE.to_string(), HEAD.to_string()];
    let (mut outputs, mut all) = (String::new(), Vec::new());
    let (described, param) = describe(routes, defaults);
    for (k, d) in described.iter().enumerate() {
        let (cols, exprs, _, _) = d.insert_parts("q");
        let order = d.order();
        let rows = d.rows_cte(true);
        ctes.push(format!(
            "{}
    i{k} AS (
        INSERT INTO {table} ({cols})
        SELECT {exprs} FROM q{k} q
        WHERE EXISTS (SELECT 1 FROM fence){order}
        RETURNING {returned})",
            rows,
            table = d.route.qualified,
            returned = d.received_column().unwrap_or("1"),
        ));
        let _ = write!(
            outputs,
            ",
           (SELECT count(*) FROM i{k}) AS written_{k}, '{{}}'::int[] AS duplicates_{k},
           '{{}}'::int[] AS conflicts_{k}, '{{}}'::int[] AS unstored_{k}"
        );
        all.push(format!("(SELECT count(*) FROM i{k}) = {}", d.rows_count()));
    }
    if records.newest {
        ctes.extend(described.iter().find_map(Described::newest_cte));
    }
    // No redelivery in the batch: every dead letter is new.
    ctes.push(dead_cte(&[
        "SELECT tp, p, sz, reason, e, rcv, $4, $3, h, k, dup, route FROM dl
        WHERE EXISTS (SELECT 1 FROM fence)"
            .to_string(),
    ]));
    if records.nodes {
        ctes.push(crate::sparkplug::record_ctes(param + 1));
    }
    format!(
        "WITH {}
    SELECT (SELECT count(*) FROM fence) AS held,
           (SELECT count(*) FROM dead) AS dead_lettered,
           '{{}}'::int[] AS redelivered{outputs},
           leasehold_all_stored(NOT EXISTS (SELECT 1 FROM fence) OR ({})) AS all_stored",
        ctes.join(",\n    "),
        all.join(" AND ")
    )
}

/// Each route described, and the last parameter they take.
fn describe<'a>(
    routes: &'a [ResolvedRoute],
    defaults: &'a [Vec<Option<String>>],
) -> (Vec<Described<'a>>, usize) {
    let mut param = FIXED_PARAMS;
    let described = routes
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let d = Described::new(k, r, defaults.get(k), param);
            param += 1 + d.sent.len();
            d
        })
        .collect();
    (described, param)
}

/// The columns that identify a redelivery of a timestamp-less row (see [`Source::ContentHash`]).
struct Again {
    /// The key column holding the reading's time (receipt time when it had none).
    ts: usize,
    hash: usize,
    pkid: usize,
    /// The route's `received_at` column (`timestamptz`), which counts its own table's last
    /// readings for the floor; `None` for `telemetry`, whose rows the common floor counts.
    rcv: Option<usize>,
}

/// One route as the statement sees it.
struct Described<'a> {
    k: usize,
    route: &'a ResolvedRoute,
    defaults: Option<&'a Vec<Option<String>>>,
    /// Columns sent per row, in parameter order.
    sent: Vec<usize>,
    /// The first parameter of this route (its rows' positions).
    first_param: usize,
    again: Option<Again>,
}

impl<'a> Described<'a> {
    fn new(
        k: usize,
        route: &'a ResolvedRoute,
        defaults: Option<&'a Vec<Option<String>>>,
        param: usize,
    ) -> Self {
        let sent = sent_columns(route).map(|(j, _)| j).collect();
        let again = match (
            route.column_of(&Source::ContentHash),
            route.column_of(&Source::PacketId),
            route
                .key
                .iter()
                .copied()
                // Compared with the database's times below: a `text` or `date` column cannot
                // be (a text column would not even prepare), so such a route has no rule.
                .find(|&j| {
                    route.columns[j].source == Source::Timestamp
                        && matches!(
                            route.columns[j].kind,
                            ColumnKind::Timestamptz | ColumnKind::Timestamp
                        )
                }),
        ) {
            (Some(hash), Some(pkid), Some(ts)) => {
                // A packet id is reused after 65,535 deliveries: without `received_at` a named
                // route's table cannot tell how many readings lie between two copies, and the
                // common floor counts only `telemetry`'s. No rule then (a redelivery is stored
                // again, marked), rather than a new publish taken for an old one.
                let rcv = route.columns.iter().position(|c| {
                    c.source == Source::ReceivedAt && c.kind == ColumnKind::Timestamptz
                });
                (route.is_default() || rcv.is_some()).then_some(Again {
                    ts,
                    hash,
                    pkid,
                    rcv: rcv.filter(|_| !route.is_default()),
                })
            }
            _ => None,
        };
        Described {
            k,
            route,
            defaults,
            sent,
            first_param: param + 1,
            again,
        }
    }

    fn default(&self, j: usize) -> Option<&str> {
        self.defaults
            .and_then(|d| d.get(j))
            .and_then(|d| d.as_deref())
    }

    /// The value of column `j` for row alias `r` (of `q{k}`) and its message `g`, cast to the
    /// column's type; with `fill`, a NULL takes the column's default. Text goes in uncast: an
    /// explicit cast to `varchar(3)` would cut a longer value silently, where storing text into
    /// the column refuses it ("value too long"), which isolates that row as the database's refusal.
    fn value(&self, j: usize, r: &str, g: &str, fill: bool) -> String {
        let c = &self.route.columns[j];
        let v = match carry(c) {
            Carry::Shared => {
                return match (&c.source, c.kind) {
                    (Source::Topic, _) => format!("{g}.tp"),
                    (Source::Payload, ColumnKind::Jsonb) => format!("{g}.p::jsonb"),
                    (Source::Payload, ColumnKind::Json) => format!("{g}.p::json"),
                    (Source::Payload, _) => format!("{g}.p"),
                    (Source::ReceivedAt, _) => format!("{g}.rcv"),
                    (Source::WrittenBy, _) => "$4::text".into(),
                    (Source::LeaseEpoch, _) => "$3::int8".into(),
                    (Source::ContentHash, _) => format!("{g}.h"),
                    (Source::PossibleDuplicate, _) => format!("({g}.dup AND {g}.h IS NOT NULL)"),
                    _ => format!("{g}.k"),
                }
            }
            Carry::Sent(wire) => {
                let natural = match wire {
                    Wire::Text => c.kind == ColumnKind::Text,
                    Wire::Int8 => c.sql_type == "bigint",
                    Wire::Bool => c.sql_type == "boolean",
                    Wire::Time => c.sql_type == "timestamp with time zone",
                };
                match (natural, c.kind) {
                    (true, _) => format!("{r}.v{j}"),
                    (false, ColumnKind::Jsonb) => format!("{r}.v{j}::jsonb"),
                    _ => format!("CAST({r}.v{j} AS {})", c.sql_type),
                }
            }
        };
        match self.default(j).filter(|_| fill) {
            Some(d) => format!("coalesce({v}, ({d}))"),
            None => v,
        }
    }

    /// `stored IS NOT DISTINCT FROM sent`, for types without equality (json, anything unknown)
    /// compared as their text.
    fn same(stored: &str, sent: &str, kind: ColumnKind) -> String {
        match kind {
            ColumnKind::Json => {
                format!("{stored}::text::jsonb IS NOT DISTINCT FROM {sent}::text::jsonb")
            }
            ColumnKind::Other => format!("{stored}::text IS NOT DISTINCT FROM {sent}::text"),
            _ => format!("{stored} IS NOT DISTINCT FROM {sent}"),
        }
    }

    /// `x.key = value` for every key column (`x` a row of the table).
    fn stored_key(&self, x: &str, r: &str, g: &str) -> String {
        self.route
            .key
            .iter()
            .map(|&j| {
                let c = &self.route.columns[j];
                format!("{x}.{} = {}", c.quoted, self.compared_value(j, r, g))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The value of column `j` as the column's own type and collation compare it: text into
    /// `char(n)` or `varchar(n)` cast to it (`'ab '` is `'ab'` for `char(n)`), which, for a row
    /// the insert took or skipped, never cuts it (a value too long fails the insert first); text
    /// under the column's collation (`ABC` is `abc` under a case-insensitive one).
    fn compared_value(&self, j: usize, r: &str, g: &str) -> String {
        let c = &self.route.columns[j];
        let v = self.value(j, r, g, false);
        let v = if c.kind == ColumnKind::Text && c.sql_type != "text" {
            format!("CAST({v} AS {})", c.sql_type)
        } else {
            v
        };
        match &c.collation {
            Some(collation) => format!("({v} COLLATE {collation})"),
            None => v,
        }
    }

    /// Whether `stored` (column `j` of a row) holds what row `r` (message `g`) gives it. A NULL
    /// sent to a column with a default took that default: it contradicts nothing stored (a
    /// default such as `now()` differs at every evaluation).
    fn same_value(&self, j: usize, stored: &str, r: &str, g: &str) -> String {
        let c = &self.route.columns[j];
        let v = self.compared_value(j, r, g);
        let same = Self::same(stored, &v, c.kind);
        match self.default(j) {
            Some(_) => format!("({v} IS NULL OR {same})"),
            None => same,
        }
    }

    /// Whether the stored row `x` holds what row `r` (message `g`) would have stored.
    fn compared_with_table(&self, x: &str, r: &str, g: &str) -> String {
        let parts: Vec<String> = (0..self.route.columns.len())
            .filter(|&j| from_message(&self.route.columns[j].source))
            .map(|j| {
                let c = &self.route.columns[j];
                self.same_value(j, &format!("{x}.{}", c.quoted), r, g)
            })
            .collect();
        if parts.is_empty() {
            "true".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// The columns both `self` and `other` map from the message, as `(mine, theirs)`.
    fn shared_columns(&self, other: &Described<'_>) -> Vec<(usize, usize)> {
        (0..self.route.columns.len())
            .filter_map(|j| {
                let name = &self.route.columns[j].name;
                other
                    .route
                    .columns
                    .iter()
                    .position(|c| &c.name == name)
                    .map(|o| (j, o))
            })
            .collect()
    }

    /// An earlier row `p` (message `pg`) of `other` (this route or an earlier one into the same
    /// table) with the key of row `r` (message `g`): the condition, and whether `p` carries the
    /// same content. `None` when `other` does not map every key column.
    fn earlier_row(&self, other: &Described<'_>, r: &str) -> Option<(String, String)> {
        let shared = self.shared_columns(other);
        let keys_equal: Option<Vec<String>> = self
            .route
            .key
            .iter()
            .map(|&j| {
                let (_, o) = shared.iter().find(|(mine, _)| *mine == j)?;
                Some(format!(
                    "{} = {}",
                    other.compared_value(*o, "p", "pg"),
                    self.compared_value(j, r, "g")
                ))
            })
            .collect();
        let mut keys_equal = keys_equal?.join(" AND ");
        if other.k == self.k {
            keys_equal.push_str(&format!(" AND p.i < {r}.i"));
        }
        let compared: Vec<String> = shared
            .iter()
            .filter(|(j, _)| from_message(&self.route.columns[*j].source))
            .map(|&(j, o)| {
                let theirs = other.compared_value(o, "p", "pg");
                let same = self.same_value(j, &theirs, r, "g");
                match other.default(o) {
                    Some(_) => format!("({theirs} IS NULL OR {same})"),
                    None => same,
                }
            })
            .collect();
        let compared = if compared.is_empty() {
            "true".into()
        } else {
            compared.join(" AND ")
        };
        Some((keys_equal, compared))
    }

    /// The routes whose rows inserted earlier in this statement may hold a skipped row's key
    /// ("nothing" only: an "update" row replaces): this one, and earlier ones into the same table.
    fn earlier<'b>(&'b self, before: &'b [Described<'b>]) -> Vec<&'b Described<'b>> {
        match self.route.spec.on_conflict {
            OnConflict::Update => Vec::new(),
            OnConflict::Nothing => std::iter::once(self)
                .filter(|me| !me.exact_key())
                .chain(
                    before
                        .iter()
                        .filter(|b| b.route.qualified == self.route.qualified),
                )
                .collect(),
        }
    }

    /// Whether the batch's comparison of this route's keys is SQL's equality (text, integers,
    /// booleans, `timestamptz`): then no two rows of one part share a key in the table either,
    /// and the insert's order does not matter.
    fn exact_key(&self) -> bool {
        self.route.key.iter().all(|&j| {
            let c = &self.route.columns[j];
            match carry(c) {
                // A user's text column may have any collation (`ABC` = `abc`, `ab` = `ab `):
                // only `telemetry`'s are known to compare bytes.
                _ if c.kind == ColumnKind::Text => self.route.is_default(),
                Carry::Sent(Wire::Text) => false,
                Carry::Sent(Wire::Time) => c.kind == ColumnKind::Timestamptz,
                _ => true,
            }
        })
    }

    /// The insert's order: by message unless the rows' keys compare exactly (see
    /// [`Described::exact_key`]).
    fn order(&self) -> &'static str {
        match self.exact_key() {
            true => "",
            false => "\n        ORDER BY q.i",
        }
    }

    /// `q{k}`: the route's rows, from its arrays (aligned with the messages', NULL positions
    /// where the route has no row). With `messages`, for the optimistic statement, which reads
    /// it once: each row with the message columns the route maps, from the same `unnest`
    /// ([`MESSAGE_COLUMNS`]), not materialized, and not read at all when the route has no row
    /// in the batch — where a join with `g` and the materialization cost about a tenth of
    /// PostgreSQL's time on a batch.
    fn rows_cte(&self, messages: bool) -> String {
        let mut arrays = vec![format!("${}::int[]", self.first_param)];
        let mut names = vec!["i".to_string()];
        if messages {
            for (name, array) in MESSAGE_COLUMNS {
                if self
                    .route
                    .columns
                    .iter()
                    .any(|c| message_reads(c).contains(&name))
                {
                    arrays.push(array.to_string());
                    names.push(name.to_string());
                }
            }
        }
        for (n, &j) in self.sent.iter().enumerate() {
            if let Carry::Sent(wire) = carry(&self.route.columns[j]) {
                arrays.push(format!("${}::{}", self.first_param + 1 + n, wire.array()));
                names.push(format!("v{j}"));
            }
        }
        let (materialized, gate) = match messages {
            true => (String::new(), format!(" AND {} > 0", self.rows_count())),
            false => ("MATERIALIZED ".to_string(), String::new()),
        };
        format!(
            "q{} AS {materialized}(
        SELECT * FROM unnest({}) AS u({}) WHERE i IS NOT NULL{gate}),",
            self.k,
            arrays.join(", "),
            names.join(", ")
        )
    }

    /// How many rows the route has in the batch (its positions that are not NULL).
    fn rows_count(&self) -> String {
        format!(
            "(SELECT count(x) FROM unnest(${}::int[]) x)",
            self.first_param
        )
    }

    /// `again{k}` (routes with [`Again`]), and how the insert and the skipped rows' check leave
    /// its rows out.
    fn again_cte(&self) -> (String, String, String) {
        let Some(a) = &self.again else {
            return (String::new(), String::new(), String::new());
        };
        let (k, r) = (self.k, self.route);
        let other_keys: String = r
            .key
            .iter()
            .filter(|&&j| j != a.ts)
            .map(|&j| {
                let v = self.value(j, "q", "g", false);
                format!("x.{} = {v} AND ", r.columns[j].quoted)
            })
            .collect();
        let hash = self.value(a.hash, "q", "g", false);
        // A `timestamp` column holds the time in UTC: compared as such, whatever the session's
        // TimeZone (a plain comparison with `timestamptz` would read it in that zone).
        let utc = |t: &str| match r.columns[a.ts].kind {
            ColumnKind::Timestamp => format!("({t} AT TIME ZONE 'UTC')"),
            _ => t.to_string(),
        };
        let copy = match r.is_default() {
            // `telemetry`'s look-ups go through functions (migration 9): PostgreSQL prepares
            // every partition of every table a statement names when it starts, even for a
            // look-up that never runs; a function's query is prepared when called, for the one
            // partition its values select. Its key is (device_id, topic, ts): the function looks
            // up the first two and the window of the third.
            true => format!(
                "leasehold_telemetry_copy({}, {}, (SELECT f FROM floor), g.rcv, {hash}, g.k)",
                self.value(r.key[0], "q", "g", false),
                self.value(r.key[1], "q", "g", false),
            ),
            false => format!(
                "EXISTS (
            SELECT 1 FROM {table} x
            WHERE {other_keys}x.{ts} > {floor} AND x.{ts} < {rcv}
              AND x.{h} = {hash} AND x.{pk} = g.k)",
                table = r.qualified,
                ts = r.columns[a.ts].quoted,
                floor = utc(&match a.rcv {
                    None => "(SELECT f FROM floor)".to_string(),
                    Some(j) => format!(
                        "(SELECT greatest(f, (SELECT x.{c} FROM {t} x WHERE x.{c} < (SELECT at FROM first_dup)
                                         ORDER BY x.{c} DESC OFFSET $6 LIMIT 1)) FROM floor)",
                        c = r.columns[j].quoted,
                        t = r.qualified
                    ),
                }),
                rcv = utc("g.rcv"),
                h = r.columns[a.hash].quoted,
                pk = r.columns[a.pkid].quoted,
            ),
        };
        let cte = format!(
            "
    again{k} AS MATERIALIZED (
        SELECT q.i FROM q{k} q JOIN g ON g.i = q.i
        WHERE (SELECT f FROM floor) IS NOT NULL AND g.dup AND {hash} IS NOT NULL AND {copy}),",
        );
        (
            cte,
            format!(" AND q.i NOT IN (SELECT i FROM again{k})"),
            format!(" - (SELECT count(*) FROM again{k})"),
        )
    }

    /// The insert's target columns, values (of row `q` and its message `g`) and conflict clause.
    fn insert_parts(&self, g: &str) -> (String, String, String, String) {
        let r = self.route;
        let cols: Vec<&str> = r.columns.iter().map(|c| c.quoted.as_str()).collect();
        let exprs: Vec<String> = (0..r.columns.len())
            .map(|j| self.value(j, "q", g, true))
            .collect();
        let keys: Vec<&str> = r
            .key
            .iter()
            .map(|&j| r.columns[j].quoted.as_str())
            .collect();
        let non_key: Vec<String> = (0..r.columns.len())
            .filter(|j| !r.key.contains(j))
            .map(|j| format!("{0} = EXCLUDED.{0}", r.columns[j].quoted))
            .collect();
        let action = match r.spec.on_conflict {
            OnConflict::Update if !non_key.is_empty() => {
                format!("DO UPDATE SET {}", non_key.join(", "))
            }
            _ => "DO NOTHING".to_string(),
        };
        (cols.join(", "), exprs.join(", "), keys.join(", "), action)
    }

    /// Where a skipped row's key may be held by a row of this statement: the condition for the
    /// skipped rows' check, and the arms comparing with that row.
    fn earlier_parts(&self, before: &[Described<'_>]) -> (String, String) {
        let k = self.k;
        // A row skipped although neither the table's snapshot nor this route's insert holds
        // its key: an earlier row of this statement holds it — a key equal only once cast
        // (`1e2` and `100` numeric, `ABC` and `abc` citext), or a row an earlier route into the
        // same table inserted. It is compared with that row instead: a duplicate or a conflict,
        // never a row counted as written and lost.
        let earlier = self.earlier(before);
        let earlier_exists: String = earlier
            .iter()
            .filter_map(|o| {
                let (keys_equal, _) = self.earlier_row(o, "q")?;
                Some(format!(
                    "\n               OR EXISTS (SELECT 1 FROM q{} p JOIN g pg ON pg.i = p.i WHERE {keys_equal})",
                    o.k
                ))
            })
            .collect();
        let by_earlier: String = earlier
            .iter()
            .enumerate()
            .filter_map(|(n, o)| {
                let (keys_equal, compared) = self.earlier_row(o, "m")?;
                Some(format!(
                    "
            UNION ALL
            SELECT {} AS o, p.i AS pi, m.i, ({compared}) AS same, NULL::bigint AS epoch
            FROM m{k} m JOIN g ON g.i = m.i JOIN (q{} p JOIN g pg ON pg.i = p.i) ON {keys_equal}",
                    n + 1,
                    o.k
                ))
            })
            .collect();
        (earlier_exists, by_earlier)
    }

    /// The route's CTEs; `before` are the routes earlier in the statement.
    fn ctes(&self, before: &[Described<'_>]) -> String {
        let k = self.k;
        let r = self.route;
        let table = &r.qualified;
        let mut out = self.rows_cte(false);
        let (again, skip_again, again_count) = self.again_cte();
        out.push_str(&again);
        let (cols, exprs, keys, action) = self.insert_parts("g");
        let (earlier_exists, by_earlier) = self.earlier_parts(before);
        let epoch = r
            .column_of(&Source::LeaseEpoch)
            .map_or("NULL::bigint".to_string(), |j| {
                format!("x.{}::bigint", r.columns[j].quoted)
            });
        let name = self.route_value();
        let _ = write!(
            out,
            "
    i{k} AS (
        INSERT INTO {table} ({cols})
        SELECT {exprs} FROM q{k} q JOIN g ON g.i = q.i
        WHERE EXISTS (SELECT 1 FROM fence){skip_again}{order}
        ON CONFLICT ({keys}) {action}
        RETURNING {keys}{returned}),
    m{k} AS MATERIALIZED (
        SELECT q.* FROM q{k} q JOIN g ON g.i = q.i
        WHERE EXISTS (SELECT 1 FROM fence)
          AND (SELECT count(*) FROM i{k}) < (SELECT count(*) FROM q{k}){again_count}{skip_again}
          AND (NOT EXISTS (SELECT 1 FROM i{k} x WHERE {ins_key}){earlier_exists})),
    c{k} AS MATERIALIZED (
        SELECT DISTINCT ON (i) i, same, epoch FROM (
            SELECT 0 AS o, 0 AS pi, m.i, ({compared}) AS same, {epoch} AS epoch
            FROM m{k} m JOIN g ON g.i = m.i {stored}{by_earlier}) u
        ORDER BY i, o, pi),
    ra{k} AS MATERIALIZED (
        SELECT c.i FROM c{k} c JOIN g ON g.i = c.i
        WHERE NOT c.same AND g.dup AND EXISTS (
            SELECT 1 FROM dead_letters y
            WHERE y.content_hash = {MESSAGE_HASH} AND y.mqtt_pkid = g.k
              AND y.route IS NOT DISTINCT FROM {name} AND y.reason = 'conflict'
              AND y.received_at > (SELECT f FROM floor) AND y.received_at < g.rcv)),
    u{k} AS MATERIALIZED (
        SELECT m.i FROM m{k} m WHERE m.i NOT IN (SELECT i FROM c{k}))",
            returned = self
                .received_column()
                .map_or(String::new(), |c| format!(", {c}")),
            ins_key = self.stored_key("x", "q", "g"),
            order = self.order(),
            compared = self.compared_with_table("x", "m", "g"),
            stored = match r.is_default() {
                true => format!(
                    "CROSS JOIN LATERAL leasehold_telemetry_row({}, {}, {}) x",
                    self.value(r.key[0], "m", "g", false),
                    self.value(r.key[1], "m", "g", false),
                    self.value(r.key[2], "m", "g", false),
                ),
                false => format!("JOIN {table} x ON {}", self.stored_key("x", "m", "g")),
            },
        );
        out
    }

    /// The built-in route's `received_at`, which its insert returns for [`Self::newest_cte`].
    fn received_column(&self) -> Option<&str> {
        let r = self.route;
        r.is_default()
            .then(|| r.column_of(&Source::ReceivedAt))
            .flatten()
            .map(|j| r.columns[j].quoted.as_str())
    }

    /// For data age (migration 10): the newest receipt among the rows `telemetry` took,
    /// recorded by the statement that stored them. A record made later (at a heartbeat) would
    /// leave out a deposed leader's last batches, and a new term would then have to read
    /// `max(received_at)` of every partition to take them in. The term is recorded by its
    /// leader's heartbeat ([`crate::queries::note_term`]), which reads the epoch recorded before
    /// it. At most once a second of receipts: one row updated by every batch would leave a
    /// version per batch behind a long-running snapshot (`pg_dump`), and data age is told in
    /// seconds. A receipt more than a minute past the database's clock (a leader's clock
    /// ahead) is not recorded, and a fenced statement stores nothing, so records nothing.
    /// `None` for a route other than the built-in one.
    fn newest_cte(&self) -> Option<String> {
        let rcv = self.received_column()?;
        Some(format!(
            "newest AS (
        UPDATE telemetry_newest n SET at = greatest(n.at, w.at)
        FROM (SELECT max({rcv}) AS at FROM i{k}
              WHERE {rcv} <= clock_timestamp() + interval '1 minute') w
        WHERE w.at >= coalesce(n.at + interval '1 second', '-infinity'))",
            k = self.k
        ))
    }

    /// The `route` of this route's dead letters: NULL for the built-in route.
    fn route_value(&self) -> String {
        if self.route.is_default() {
            "NULL::text".into()
        } else {
            literal(&self.route.spec.name)
        }
    }

    /// How this route's dead letters' errors begin.
    fn prefix(&self) -> String {
        if self.route.is_default() {
            String::new()
        } else {
            format!("route {}: ", self.route.spec.name)
        }
    }

    /// The dead letters of this route's conflicts and unstored rows.
    fn dead_arms(&self) -> [String; 2] {
        let k = self.k;
        let r = self.route;
        let name = self.route_value();
        let prefix = literal(&self.prefix());
        let table = literal(&r.qualified);
        let key_names = literal(
            &r.key
                .iter()
                .map(|&j| r.columns[j].name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        );
        let key_text = r
            .key
            .iter()
            .map(|&j| {
                format!(
                    "coalesce(({})::text, 'NULL')",
                    self.value(j, "m", "g", false)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let message = "g.tp, convert_to(g.p, 'UTF8'), octet_length(g.p)";
        let tail = format!("g.rcv, $4, $3, {MESSAGE_HASH}, g.k, g.dup, {name}");
        [
            format!(
                "SELECT {message}, 'conflict',
               {prefix} || format('conflict: a different row is stored in %s for key (%s) = (%s)', {table}, {key_names}, concat_ws(', ', {key_text}))
                 || coalesce(' (written at epoch ' || c.epoch || ')', '') || '; this one was not stored',
               {tail}
        FROM c{k} c JOIN m{k} m ON m.i = c.i JOIN g ON g.i = c.i
        WHERE NOT c.same AND c.i NOT IN (SELECT i FROM ra{k})"
            ),
            format!(
                "SELECT {message}, 'not_stored',
               {prefix} || format('%s neither took the row nor holds one with its key (a trigger or rule skipped it)', {table}),
               {tail}
        FROM u{k} u JOIN g ON g.i = u.i"
            ),
        ]
    }
}

/// The default expressions of the columns of `routes` that have one, read from the catalog.
pub(crate) const DEFAULTS_SQL: &str = "SELECT pg_get_expr(d.adbin, d.adrelid)
    FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
    WHERE d.adrelid = to_regclass($1) AND a.attname = $2";

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_config::RouteSpec;

    /// What the leader's writer records besides its rows, before a Sparkplug B message.
    const RECORDS: Records = Records {
        nodes: false,
        newest: true,
    };

    fn column(name: &str, source: Source, sql_type: &str, kind: ColumnKind) -> ResolvedColumn {
        ResolvedColumn {
            name: name.into(),
            quoted: format!("\"{name}\""),
            source,
            sql_type: sql_type.into(),
            kind,
            not_null: false,
            has_default: false,
            collation: None,
        }
    }

    fn route(name: &str, table: &str, on_conflict: OnConflict) -> ResolvedRoute {
        let columns = vec![
            // Not `text`: a key the batch and the table may compare differently.
            column(
                "id",
                Source::TopicSegment(1),
                "character varying(8)",
                ColumnKind::Text,
            ),
            column(
                "at",
                Source::Timestamp,
                "timestamp with time zone",
                ColumnKind::Timestamptz,
            ),
            column(
                "v",
                Source::JsonPath(vec![]),
                "numeric(5,2)",
                ColumnKind::Numeric,
            ),
            column("by", Source::WrittenBy, "text", ColumnKind::Text),
        ];
        resolved(name, table, &["id", "at"], on_conflict, columns)
    }

    /// Route `name` into `public.table` with `columns`, keyed by `key`.
    fn resolved(
        name: &str,
        table: &str,
        key: &[&str],
        on_conflict: OnConflict,
        columns: Vec<ResolvedColumn>,
    ) -> ResolvedRoute {
        let spec = RouteSpec {
            name: name.into(),
            topics: vec!["eq/+/d".into()],
            table: table.into(),
            key: key.iter().map(|k| k.to_string()).collect(),
            on_conflict,
            columns: columns
                .iter()
                .map(|c| (c.name.clone(), c.source.clone()))
                .collect(),
        };
        ResolvedRoute::new(spec, "public".into(), table.into(), columns)
    }

    /// Every message column the optimistic `INSERT` reads is in its route's `unnest`, for every
    /// source into every kind of column ([`message_reads`] against [`Described::value`]).
    #[test]
    fn the_optimistic_insert_reads_only_what_its_unnest_holds() {
        use ColumnKind::*;
        let kinds = [
            (Text, "text"),
            (Int2, "smallint"),
            (Int4, "integer"),
            (Int8, "bigint"),
            (Numeric, "numeric"),
            (Float4, "real"),
            (Float8, "double precision"),
            (Bool, "boolean"),
            (Timestamptz, "timestamp with time zone"),
            (Timestamp, "timestamp without time zone"),
            (Date, "date"),
            (Jsonb, "jsonb"),
            (Json, "json"),
            (Uuid, "uuid"),
            (Other, "inet"),
        ];
        let sources = [
            Source::TopicSegment(0),
            Source::Topic,
            Source::Payload,
            Source::JsonPath(vec![]),
            Source::Timestamp,
            Source::ReceivedAt,
            Source::WrittenBy,
            Source::LeaseEpoch,
            Source::DeviceId,
            Source::Literal("x".into()),
            Source::ContentHash,
            Source::PacketId,
            Source::PossibleDuplicate,
        ];
        for source in &sources {
            for (kind, sql_type) in kinds {
                let columns = vec![
                    column("id", Source::TopicSegment(1), "text", Text),
                    column("c", source.clone(), sql_type, kind),
                ];
                let r = resolved("r", "t", &["id"], OnConflict::Nothing, columns);
                let fast = optimistic_sql(&[r], &[], RECORDS);
                let q0 = &fast[fast.find("q0 AS (").expect("q0")..];
                let between = |from: &str, to: &str| -> String {
                    let at = q0.find(from).expect(from) + from.len();
                    q0[at..at + q0[at..].find(to).expect(to)].to_string()
                };
                let names = between("AS u(", ")");
                let names: Vec<&str> = names.split(", ").collect();
                let insert = between("SELECT ", " FROM q0 q");
                for read in insert.split("q.").skip(1) {
                    let name: String = read
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        names.contains(&name.as_str()),
                        "{source:?} into {sql_type}: q.{name} is not unnested ({names:?})\n{fast}"
                    );
                }
            }
        }
    }

    fn sql(routes: &[ResolvedRoute]) -> String {
        batch_sql(routes, &[], RECORDS)
    }

    #[test]
    fn only_the_built_in_routes_rows_are_recorded_for_data_age_and_only_when_asked() {
        let both = [
            ResolvedRoute::telemetry(),
            route("owned", "owned", OnConflict::Nothing),
        ];
        let without = Records {
            newest: false,
            ..RECORDS
        };
        for (s, recorded) in [
            (batch_sql(&both, &[], RECORDS), true),
            (optimistic_sql(&both, &[], RECORDS), true),
            (batch_sql(&both, &[], without), false),
            (optimistic_sql(&both, &[], without), false),
            (batch_sql(&both[1..], &[], RECORDS), false),
        ] {
            assert_eq!(s.contains("UPDATE telemetry_newest"), recorded, "{s}");
            if recorded {
                assert!(s.contains("max(\"received_at\") AS at FROM i0"), "{s}");
            }
        }
    }

    #[test]
    fn the_optimistic_statement_inserts_without_on_conflict_behind_the_fence_and_checks_all_stored()
    {
        let routes = [
            ResolvedRoute::telemetry(),
            route("owned", "owned", OnConflict::Update),
        ];
        let fast = optimistic_sql(&routes, &[], RECORDS);
        assert!(!fast.contains("ON CONFLICT"), "{fast}");
        assert_eq!(
            fast.matches("WHERE EXISTS (SELECT 1 FROM fence)").count(),
            3,
            "{fast}"
        );
        assert!(fast.contains("INSERT INTO telemetry ("), "{fast}");
        assert!(fast.contains(
            "leasehold_all_stored(NOT EXISTS (SELECT 1 FROM fence) OR ((SELECT count(*) FROM i0) = (SELECT count(x) FROM unnest($25::int[]) x) AND (SELECT count(*) FROM i1) = (SELECT count(x) FROM unnest($28::int[]) x)))"
        ), "{fast}");
        // Each route's rows come with their message's columns from one `unnest`: no join, no
        // materialization.
        assert!(!fast.contains("JOIN g"), "{fast}");
        assert!(!fast.contains("q0 AS MATERIALIZED"), "{fast}");
        // Only the message columns a route maps, and nothing read for a route without rows.
        assert!(fast.contains(
            "unnest($28::int[], $29::text[], $30::timestamptz[], $31::text[]) AS u(i, v0, v1, v2) WHERE i IS NOT NULL AND (SELECT count(x) FROM unnest($28::int[]) x) > 0)"
        ), "{fast}");
        assert!(
            fast.contains("SELECT q.v0, q.tp, q.v2, q.p::jsonb, q.rcv, "),
            "{fast}"
        );
        // The full statement's parameters, but the redelivery window and span.
        let params = |s: &str| -> std::collections::BTreeSet<usize> {
            s.split('$')
                .skip(1)
                .filter_map(|t| {
                    let n: String = t.chars().take_while(char::is_ascii_digit).collect();
                    n.parse().ok()
                })
                .collect()
        };
        let mut want = params(&sql(&routes));
        want.retain(|&p| p != 5 && p != 6);
        assert_eq!(params(&fast), want);
        for col in [
            "held",
            "dead_lettered",
            "redelivered",
            "written_1",
            "unstored_1",
        ] {
            assert!(fast.contains(&format!("AS {col}")), "{col}: {fast}");
        }
    }

    #[test]
    fn telemetry_is_route_zero_with_its_redelivery_rule_and_shared_columns() {
        let s = sql(&[ResolvedRoute::telemetry()]);
        // Sent per row: device_id and ts; the rest from the message (g) or $3/$4.
        assert!(s.contains("unnest($25::int[], $26::text[], $27::timestamptz[]) AS u(i, v0, v2)"));
        assert!(!s.contains("$28"));
        assert!(s.contains(
            "SELECT q.v0, g.tp, q.v2, g.p::jsonb, g.rcv, $4::text, $3::int8, g.h, g.k, (g.dup AND g.h IS NOT NULL)"
        ));
        assert!(s.contains("ON CONFLICT (\"device_id\", \"topic\", \"ts\") DO NOTHING"));
        // A DUP-flagged timestamp-less reading whose first copy is stored is skipped.
        assert!(s.contains("again0 AS MATERIALIZED"));
        assert!(s.contains(
            "leasehold_telemetry_copy(q.v0, g.tp, (SELECT f FROM floor), g.rcv, g.h, g.k)"
        ));
        // Every look-up into `telemetry` goes through a function: the statement names the
        // table only where it inserts (its partitions are prepared only as rows reach them).
        assert!(s.contains("INSERT INTO telemetry"));
        assert!(!s.contains("FROM telemetry") && !s.contains("JOIN telemetry"));
        assert!(s.contains("CROSS JOIN LATERAL leasehold_telemetry_row(m.v0, g.tp, m.v2) x"));
        assert!(s.contains("leasehold_telemetry_floor(d.at, $6)"));
        // Its key is compared exactly in the batch: no order to keep, no earlier row to look for.
        assert!(!s.contains("ORDER BY q.i") && !s.contains("p.i < q.i"));
        // Its dead letters carry no route; a conflict names the epoch that stored the row.
        assert!(s.contains("y.route IS NOT DISTINCT FROM NULL::text"));
        assert!(s.contains("x.\"lease_epoch\"::bigint AS epoch"));
    }

    #[test]
    fn every_insert_is_behind_the_fence_and_every_route_settles_its_skipped_rows() {
        let s = sql(&[
            ResolvedRoute::telemetry(),
            route("a", "t", OnConflict::Nothing),
            route("b", "t", OnConflict::Nothing),
            route("c", "u", OnConflict::Update),
        ]);
        assert_eq!(
            s.matches("INSERT INTO").count(),
            5,
            "four routes and the dead letters"
        );
        assert_eq!(
            s.matches("WHERE EXISTS (SELECT 1 FROM fence)").count(),
            1 + 2 * 4,
            "the dead letters, then each route's insert and its skipped rows"
        );
        assert!(s.contains("ON CONFLICT (\"id\", \"at\") DO NOTHING"));
        assert!(s.contains("ON CONFLICT (\"id\", \"at\") DO UPDATE SET \"v\" = EXCLUDED.\"v\", \"by\" = EXCLUDED.\"by\""));
        // written_by is not compared: a redelivery written by another node is a duplicate.
        assert!(!s.contains("x.\"by\" IS NOT DISTINCT"));
        // "nothing": a skipped row is compared with earlier rows of its route, and of earlier
        // routes into the same table (b with a), never of another table or an "update" route.
        let id = |a: &str| format!("CAST({a}.v0 AS character varying(8))");
        assert!(s.contains(&format!(
            "OR EXISTS (SELECT 1 FROM q1 p JOIN g pg ON pg.i = p.i WHERE {} = {}",
            id("p"),
            id("q")
        )));
        for q in ["q1", "q2"] {
            let on = format!(
                "JOIN ({q} p JOIN g pg ON pg.i = p.i) ON {} = {}",
                id("p"),
                id("m")
            );
            assert!(s.contains(&on), "{on}");
        }
        assert!(!s.contains("FROM q3 p"));
        // Parameters: 24 fixed, telemetry 1 + 2, then per route 1 + 3 (written_by is shared).
        assert!(s.contains("$39::text[]") && !s.contains("$40"));
        assert!(s.contains("written_3") && s.contains("unstored_3"));
    }

    #[test]
    fn a_default_fills_a_null_and_casts_follow_the_column() {
        let s = batch_sql(
            &[route("a", "t", OnConflict::Nothing)],
            &[vec![None, None, Some("0".into()), None]],
            RECORDS,
        );
        assert!(s.contains("coalesce(CAST(q.v2 AS numeric(5,2)), (0))"));
        assert!(
            s.contains("q.v0, q.v1,"),
            "text and timestamptz go in uncast"
        );
    }
}
