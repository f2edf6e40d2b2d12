-- Leasehold schema, version 9: `telemetry` in time partitions (docs/partitions.md).
--
-- The move of an existing `telemetry` is done online by the leader, step by step, each step a
-- short transaction under the lease's fence (crates/store/src/partitions.rs). This table records
-- a move under way: the table that was `telemetry`, and the instant from which readings belong to
-- the new partitions. The row goes once that table is attached as the partition before it.
CREATE TABLE telemetry_partitioning (
    legacy  text        PRIMARY KEY,
    cutover timestamptz NOT NULL
);

-- The batch statement's three rare look-ups into `telemetry` (a redelivery's floor, its first
-- copy, the row holding a skipped row's key), as functions: PostgreSQL prepares every partition
-- of every table a statement names when the statement starts, even for a look-up that does not
-- run; a function's query is prepared only when it is called, with its values, for the one
-- partition they select. STABLE: each sees the statement's snapshot, as the look-ups did. A key
-- holds at most one row (ROWS 1), and each call is one index look-up (COST 10): the planner's
-- estimates stay those of the joins they replace.
CREATE FUNCTION leasehold_telemetry_floor(at timestamptz, span bigint) RETURNS timestamptz
LANGUAGE plpgsql STABLE COST 10 AS $$
BEGIN
    RETURN (SELECT x.received_at FROM telemetry x WHERE x.received_at < at
            ORDER BY x.received_at DESC OFFSET span LIMIT 1);
END $$;

CREATE FUNCTION leasehold_telemetry_copy(dev text, tp text, after timestamptz, before timestamptz,
                                         hash text, pkid integer) RETURNS boolean
LANGUAGE plpgsql STABLE COST 10 AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM telemetry x
                   WHERE x.device_id = dev AND x.topic = tp AND x.ts > after AND x.ts < before
                     AND x.content_hash = hash AND x.mqtt_pkid = pkid);
END $$;

CREATE FUNCTION leasehold_telemetry_row(dev text, tp text, at timestamptz)
RETURNS TABLE (device_id text, topic text, ts timestamptz, payload jsonb, lease_epoch bigint)
LANGUAGE plpgsql STABLE COST 10 ROWS 1 AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY SELECT x.device_id, x.topic, x.ts, x.payload, x.lease_epoch FROM telemetry x
                 WHERE x.device_id = dev AND x.topic = tp AND x.ts = at;
END $$;
