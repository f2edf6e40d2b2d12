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
-- recorded (or, for the first 10 s of a term, the previous one); otherwise — no reading recorded
-- yet, a leader of a release that does not record it during an upgrade — what `telemetry` holds — not past the database's clock, as a
-- reading is never received in the future. plpgsql, so that the look-up into `telemetry` is
-- planned only when it runs.
CREATE FUNCTION leasehold_newest_reading() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t timestamptz;
    e bigint;
BEGIN
    SELECT n.at, n.epoch INTO t, e FROM telemetry_newest n;
    -- A new leader records at its first heartbeat: its first seconds are not a reason to read
    -- the table (the previous term's record stands meanwhile).
    IF t IS NULL OR e IS NULL
       OR EXISTS (SELECT 1 FROM instance_lock l
                  WHERE l.epoch > e AND l.acquired_at < clock_timestamp() - interval '10 seconds') THEN
        SELECT max(x.received_at) INTO t FROM telemetry x
        WHERE x.received_at <= clock_timestamp() + interval '1 minute';
    END IF;
    RETURN t;
END $$;
