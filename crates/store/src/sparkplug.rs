//! Sparkplug B edge nodes as the primary host knows them (`sparkplug_nodes`, migration 11): the
//! births that name their metrics' aliases and the last sequence number of each. The leader
//! loads them at the start of its term and records what a batch changed, under the fence.

use chrono::{DateTime, Utc};
use leasehold_decode::sparkplug::{Change, Node, NodeChange, NodeKey};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use crate::op::{self, Op};
use crate::queries::FENCE_CTE;
use crate::{Fence, Result, StoreError};

/// Every edge node recorded.
pub async fn load(c: &impl GenericClient) -> Result<Vec<(NodeKey, Node)>> {
    let rows = op::all(
        c,
        Op::SparkplugLoad,
        "SELECT group_id, edge_node_id, online, bd_seq, seq, stale, birth_at, death_at, metrics,
                devices
         FROM sparkplug_nodes",
        &[],
        |r| {
            Ok((
                (
                    r.try_get::<_, String>("group_id")?,
                    r.try_get::<_, String>("edge_node_id")?,
                ),
                r.try_get::<_, bool>("online")?,
                r.try_get::<_, Option<i64>>("bd_seq")?,
                r.try_get::<_, Option<i32>>("seq")?,
                r.try_get::<_, bool>("stale")?,
                r.try_get::<_, Option<DateTime<Utc>>>("birth_at")?,
                r.try_get::<_, Option<DateTime<Utc>>>("death_at")?,
                r.try_get::<_, serde_json::Value>("metrics")?,
                r.try_get::<_, serde_json::Value>("devices")?,
            ))
        },
    )
    .await?;
    rows.into_iter()
        .map(
            |(key, online, bd_seq, seq, stale, birth_at, death_at, metrics, devices)| {
                let bad = |e: serde_json::Error| {
                    StoreError::Refused(format!(
                        "sparkplug_nodes row of {}/{} cannot be read: {e}",
                        key.0, key.1
                    ))
                };
                let node = Node {
                    online,
                    bd_seq: bd_seq.map(|b| b as u64),
                    seq: seq.map(|s| s as u8),
                    stale,
                    birth_at,
                    death_at,
                    metrics: serde_json::from_value(metrics).map_err(bad)?,
                    devices: serde_json::from_value(devices).map_err(bad)?,
                };
                Ok((key, node))
            },
        )
        .collect()
}

/// What a batch changed of edge nodes, as the parameters of [`record_ctes`]: the whole row of a
/// node whose births, death or staleness changed, the sequence number alone of the others.
#[derive(Default)]
pub struct NodeArrays<'a> {
    g: Vec<&'a str>,
    e: Vec<&'a str>,
    online: Vec<bool>,
    bd: Vec<Option<i64>>,
    seq: Vec<Option<i32>>,
    stale: Vec<bool>,
    birth: Vec<Option<DateTime<Utc>>>,
    death: Vec<Option<DateTime<Utc>>>,
    metrics: Vec<serde_json::Value>,
    devices: Vec<serde_json::Value>,
    sg: Vec<&'a str>,
    se: Vec<&'a str>,
    ss: Vec<Option<i32>>,
}

/// Parameters [`NodeArrays`] adds to a statement.
pub const NODE_PARAMS: usize = 13;

impl<'a> NodeArrays<'a> {
    pub fn new(nodes: &'a [NodeChange]) -> Result<Self> {
        let json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| StoreError::Refused(format!("a Sparkplug node cannot be written: {e}")))
        };
        let mut a = NodeArrays::default();
        for ((group, node), change, n) in nodes {
            let s = n.seq.map(i32::from);
            match change {
                Change::Whole => {
                    a.g.push(group.as_str());
                    a.e.push(node.as_str());
                    a.online.push(n.online);
                    a.bd.push(n.bd_seq.map(|b| b as i64));
                    a.seq.push(s);
                    a.stale.push(n.stale);
                    a.birth.push(n.birth_at);
                    a.death.push(n.death_at);
                    a.metrics.push(json(serde_json::to_value(&n.metrics))?);
                    a.devices.push(json(serde_json::to_value(&n.devices))?);
                }
                Change::Seq => {
                    a.sg.push(group.as_str());
                    a.se.push(node.as_str());
                    a.ss.push(s);
                }
            }
        }
        Ok(a)
    }

    /// Appends the [`NODE_PARAMS`] arrays, in [`record_ctes`]'s order.
    pub fn push<'p>(&'p self, params: &mut Vec<&'p (dyn ToSql + Sync)>) {
        params.extend([
            &self.g as &(dyn ToSql + Sync),
            &self.e,
            &self.online,
            &self.bd,
            &self.seq,
            &self.stale,
            &self.birth,
            &self.death,
            &self.metrics,
            &self.devices,
            &self.sg,
            &self.se,
            &self.ss,
        ]);
    }
}

/// The CTEs `whole` and `seqs` that record [`NodeArrays`] given from parameter `$first` on,
/// behind the statement's `fence` (its lease epoch is `$3`): a batch statement carries them so
/// that the state its readings were read with commits with them, in one statement.
pub fn record_ctes(first: usize) -> String {
    let [g, e, o, b, s, st, ba, da, m, d, sg, se, ss]: [String; NODE_PARAMS] =
        std::array::from_fn(|k| format!("${}", first + k));
    format!(
        "whole AS (
        INSERT INTO sparkplug_nodes AS n (group_id, edge_node_id, online, bd_seq, seq, stale,
                                          birth_at, death_at, metrics, devices, lease_epoch)
        SELECT u.g, u.e, u.o, u.b, u.s, u.st, u.ba, u.da, u.m, u.d, $3
        FROM unnest({g}::text[], {e}::text[], {o}::bool[], {b}::int8[], {s}::int4[], {st}::bool[],
                    {ba}::timestamptz[], {da}::timestamptz[], {m}::jsonb[], {d}::jsonb[])
             AS u(g, e, o, b, s, st, ba, da, m, d)
        WHERE EXISTS (SELECT 1 FROM fence)
        ON CONFLICT (group_id, edge_node_id) DO UPDATE SET
            online = EXCLUDED.online, bd_seq = EXCLUDED.bd_seq, seq = EXCLUDED.seq,
            stale = EXCLUDED.stale, birth_at = EXCLUDED.birth_at,
            death_at = EXCLUDED.death_at, metrics = EXCLUDED.metrics,
            devices = EXCLUDED.devices, updated_at = now(),
            lease_epoch = EXCLUDED.lease_epoch
        RETURNING 1),
    seqs AS (
        UPDATE sparkplug_nodes n SET seq = u.s, updated_at = now(), lease_epoch = $3
        FROM unnest({sg}::text[], {se}::text[], {ss}::int4[]) AS u(g, e, s)
        WHERE n.group_id = u.g AND n.edge_node_id = u.e AND EXISTS (SELECT 1 FROM fence)
        RETURNING 1)"
    )
}

/// Records what a batch changed of `nodes` if and only if `fence` holds
/// ([`StoreError::Fenced`], nothing written, otherwise), in a statement of its own: for a batch
/// that wrote nothing (the others carry [`record_ctes`]).
pub async fn record(c: &impl GenericClient, fence: &Fence, nodes: &[NodeChange]) -> Result<()> {
    let arrays = NodeArrays::new(nodes)?;
    let sql = format!(
        "WITH {FENCE_CTE},
    {}
    SELECT (SELECT count(*) FROM fence) AS held, (SELECT count(*) FROM whole) AS whole,
           (SELECT count(*) FROM seqs) AS seqs",
        record_ctes(4)
    );
    let mut params: Vec<&(dyn ToSql + Sync)> =
        vec![&fence.lease_name, &fence.holder_id, &fence.epoch];
    arrays.push(&mut params);
    let held = op::one(c, Op::SparkplugRecord, &sql, &params, |r| {
        r.try_get::<_, i64>("held")
    })
    .await?;
    if held == 0 {
        return Err(StoreError::Fenced { epoch: fence.epoch });
    }
    Ok(())
}

/// Edge nodes and devices online, and the newest birth, as recorded (`leasehold status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub edge_nodes: i64,
    pub edge_nodes_online: i64,
    pub devices_online: i64,
    pub last_birth: Option<DateTime<Utc>>,
    /// Edge nodes whose data is refused until a rebirth (a sequence gap was seen).
    pub stale: i64,
}

pub async fn summary(c: &impl GenericClient) -> Result<Summary> {
    op::one(
        c,
        Op::SparkplugLoad,
        "SELECT count(*) AS nodes, count(*) FILTER (WHERE online) AS online,
                count(*) FILTER (WHERE stale) AS stale,
                coalesce(sum((SELECT count(*) FROM jsonb_each(n.devices) d
                              WHERE (d.value->>'online')::boolean)) FILTER (WHERE online), 0)::int8
                    AS devices,
                greatest(max(birth_at), max((SELECT max((d.value->>'birth_at')::timestamptz)
                                             FROM jsonb_each(n.devices) d))) AS last_birth
         FROM sparkplug_nodes n",
        &[],
        |r| {
            from_row!(r => Summary {
                edge_nodes: "nodes", edge_nodes_online: "online", devices_online: "devices",
                last_birth, stale,
            })
        },
    )
    .await
}
