-- Leasehold schema, version 10: the newest reading's receive time, kept apart from `telemetry`.
--
-- Data age was `max(received_at)` over `telemetry`: with day partitions, one index descent per
-- partition and a plan of every partition (22 ms at 235 of them), every 2 s on every node. The
-- leader's heartbeat now records here the receive time of the newest reading it stored, and the
-- epoch of the term that recorded it, so reading data age costs one row whatever the table holds.
CREATE TABLE telemetry_newest (
    one   boolean     PRIMARY KEY DEFAULT true CHECK (one),
    at    timestamptz,
    -- The lease epoch of the leader that recorded `at`; NULL: none did yet.
    epoch bigint
);
INSERT INTO telemetry_newest (at) VALUES (NULL);

-- The receive time data age is measured from. What a leader of the lease's current epoch
-- recorded; until one recorded a reading (the first heartbeat of a term, the first readings
-- stored, a leader of a release that does not record it during an upgrade), what `telemetry` holds — not past the database's clock, as a
-- reading is never received in the future. plpgsql, so that the look-up into `telemetry` is
-- planned only when it runs.
CREATE FUNCTION leasehold_newest_reading() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t timestamptz;
    e bigint;
BEGIN
    SELECT n.at, n.epoch INTO t, e FROM telemetry_newest n;
    IF t IS NULL OR e IS NULL OR e < (SELECT max(l.epoch) FROM instance_lock l) THEN
        SELECT max(x.received_at) INTO t FROM telemetry x
        WHERE x.received_at <= clock_timestamp() + interval '1 minute';
    END IF;
    RETURN t;
END $$;
