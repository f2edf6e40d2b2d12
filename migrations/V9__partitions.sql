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
