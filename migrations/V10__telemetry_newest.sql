-- Leasehold schema, version 10: the newest reading's receive time, kept apart from `telemetry`.
--
-- Data age was `max(received_at)` over `telemetry`: with day partitions, one index descent per
-- partition and a plan of every partition (22 ms at 235 of them), every 2 s on every node. The
-- leader's heartbeat now records here the receive time of the newest reading it stored, so
-- reading data age costs one row whatever the table holds. Seeded with what `telemetry` holds.
CREATE TABLE telemetry_newest (
    one boolean     PRIMARY KEY DEFAULT true CHECK (one),
    at  timestamptz
);
INSERT INTO telemetry_newest (at) SELECT max(received_at) FROM telemetry;

-- The receive time data age is measured from. Until a leader recorded one, what `telemetry`
-- holds: its first readings are stored up to a heartbeat before they are recorded. plpgsql, so
-- that the look-up into `telemetry` is planned only when it runs.
CREATE FUNCTION leasehold_newest_reading() RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
    t timestamptz;
BEGIN
    SELECT n.at INTO t FROM telemetry_newest n;
    IF t IS NULL THEN
        SELECT max(x.received_at) INTO t FROM telemetry x;
    END IF;
    RETURN t;
END $$;
