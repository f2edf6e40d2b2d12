//! Sparkplug B edge nodes as the primary host knows them (`sparkplug_nodes`, migration 11): the
//! births that name their metrics' aliases and the last sequence number of each. The leader
//! loads them at the start of its term and records what a batch changed, under the fence.

use chrono::{DateTime, Utc};
use leasehold_decode::sparkplug::{Change, Node, NodeKey};
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

/// Records what a batch changed of `nodes` if and only if `fence` holds
/// ([`StoreError::Fenced`], nothing written, otherwise): the whole row of a node whose births,
/// death or staleness changed, the sequence number alone of the others.
pub async fn record(
    c: &impl GenericClient,
    fence: &Fence,
    nodes: &[(NodeKey, Change, Node)],
) -> Result<()> {
    let json = |v: Result<serde_json::Value, serde_json::Error>| {
        v.map_err(|e| StoreError::Refused(format!("a Sparkplug node cannot be written: {e}")))
    };
    let (mut g, mut e, mut online, mut bd, mut seq, mut stale) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut birth, mut death, mut metrics, mut devices) = (vec![], vec![], vec![], vec![]);
    let (mut sg, mut se, mut ss) = (vec![], vec![], vec![]);
    for ((group, node), change, n) in nodes {
        let s = n.seq.map(i32::from);
        match change {
            Change::Whole => {
                g.push(group.as_str());
                e.push(node.as_str());
                online.push(n.online);
                bd.push(n.bd_seq.map(|b| b as i64));
                seq.push(s);
                stale.push(n.stale);
                birth.push(n.birth_at);
                death.push(n.death_at);
                metrics.push(json(serde_json::to_value(&n.metrics))?);
                devices.push(json(serde_json::to_value(&n.devices))?);
            }
            Change::Seq => {
                sg.push(group.as_str());
                se.push(node.as_str());
                ss.push(s);
            }
        }
    }
    let sql = format!(
        "WITH {FENCE_CTE},
         whole AS (
            INSERT INTO sparkplug_nodes AS n (group_id, edge_node_id, online, bd_seq, seq, stale,
                                              birth_at, death_at, metrics, devices, lease_epoch)
            SELECT u.g, u.e, u.o, u.b, u.s, u.st, u.ba, u.da, u.m, u.d, $3
            FROM unnest($4::text[], $5::text[], $6::bool[], $7::int8[], $8::int4[], $9::bool[],
                        $10::timestamptz[], $11::timestamptz[], $12::jsonb[], $13::jsonb[])
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
            FROM unnest($14::text[], $15::text[], $16::int4[]) AS u(g, e, s)
            WHERE n.group_id = u.g AND n.edge_node_id = u.e AND EXISTS (SELECT 1 FROM fence)
            RETURNING 1)
         SELECT (SELECT count(*) FROM fence) AS held, (SELECT count(*) FROM whole) AS whole,
                (SELECT count(*) FROM seqs) AS seqs"
    );
    let params: Vec<&(dyn ToSql + Sync)> = vec![
        &fence.lease_name,
        &fence.holder_id,
        &fence.epoch,
        &g,
        &e,
        &online,
        &bd,
        &seq,
        &stale,
        &birth,
        &death,
        &metrics,
        &devices,
        &sg,
        &se,
        &ss,
    ];
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
            Ok(Summary {
                edge_nodes: r.try_get("nodes")?,
                edge_nodes_online: r.try_get("online")?,
                devices_online: r.try_get("devices")?,
                last_birth: r.try_get("last_birth")?,
                stale: r.try_get("stale")?,
            })
        },
    )
    .await
}
