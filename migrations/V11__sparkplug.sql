-- Leasehold schema, version 11: Sparkplug B edge nodes, as the primary host knows them
-- (docs/sparkplug.md).
--
-- A data message names its metrics by the aliases its edge node's last birth (NBIRTH, DBIRTH)
-- defined, and carries a sequence number one above the previous message's. The leader keeps
-- both here, written under the lease's fence after each batch that changed them, so that the
-- next leader resolves every alias and checks every sequence without asking an edge node to
-- rebirth.
CREATE TABLE sparkplug_nodes (
    group_id     text        NOT NULL,
    edge_node_id text        NOT NULL,
    online       boolean     NOT NULL,
    -- The NBIRTH's bdSeq: an NDEATH with another one is an earlier session's.
    bd_seq       bigint,
    -- The last sequence number read (0..255).
    seq          integer,
    -- A sequence gap was seen: data is refused until the next NBIRTH.
    stale        boolean     NOT NULL DEFAULT false,
    birth_at     timestamptz,
    death_at     timestamptz,
    -- The NBIRTH's metrics: [[name, alias, datatype], ...].
    metrics      jsonb       NOT NULL DEFAULT '[]',
    -- Each device: {"online", "birth_at", "death_at", "metrics": [[name, alias, datatype], ...]}.
    devices      jsonb       NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL DEFAULT now(),
    lease_epoch  bigint      NOT NULL,
    PRIMARY KEY (group_id, edge_node_id)
);
