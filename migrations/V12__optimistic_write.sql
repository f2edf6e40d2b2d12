-- Leasehold schema, version 12: the check that ends the writer's optimistic batch statement.
--
-- A batch without a redelivery is written first by a statement without `ON CONFLICT` (on a
-- partitioned `telemetry`, PostgreSQL's speculative insertion cost about a quarter of the
-- statement). A key already stored fails it (`unique_violation`); a row that the table did not
-- take — a trigger returned NULL, a rule replaced the insert — fails it here, so nothing of it is
-- committed, and the writer runs its full statement instead, which tells those rows apart.
CREATE FUNCTION leasehold_all_stored(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT ok THEN
        RAISE EXCEPTION 'a row of the batch was not stored (a trigger or rule skipped it)'
            USING ERRCODE = 'LH001';
    END IF;
    RETURN true;
END
$$;
