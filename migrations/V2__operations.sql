-- Leasehold schema, version 2: what alert evaluation needs to judge the cluster from any node.

-- Each node reports its broker connectivity and the last time it saw the broker lose its session
-- or another process take its client id, so that every node (not only the leader) can evaluate
-- "leader not connected", "broker lost the session" and "client-id fight".
ALTER TABLE cluster_nodes
    ADD COLUMN mqtt_connected        boolean     NOT NULL DEFAULT false,
    ADD COLUMN mqtt_changed_at       timestamptz,
    ADD COLUMN session_lost_at       timestamptz,
    ADD COLUMN client_id_conflict_at timestamptz;

-- Every change of holder, kept so that flapping can be judged after the fact.
CREATE TABLE lease_history (
    service_name text        NOT NULL,
    epoch        bigint      NOT NULL,
    holder_id    text        NOT NULL,
    instance_id  text        NOT NULL,
    acquired_at  timestamptz NOT NULL,
    PRIMARY KEY (service_name, epoch)
);
CREATE INDEX lease_history_acquired_at_idx ON lease_history (acquired_at);

CREATE FUNCTION leasehold_lease_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO lease_history (service_name, epoch, holder_id, instance_id, acquired_at)
    VALUES (NEW.service_name, NEW.epoch, NEW.holder_id, NEW.instance_id, NEW.acquired_at)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

-- Renewals (same epoch) do not fire it: only a new holder costs the extra insert.
CREATE TRIGGER lease_history_insert AFTER INSERT ON instance_lock
    FOR EACH ROW EXECUTE FUNCTION leasehold_lease_history();
CREATE TRIGGER lease_history_update AFTER UPDATE ON instance_lock
    FOR EACH ROW WHEN (OLD.epoch IS DISTINCT FROM NEW.epoch)
    EXECUTE FUNCTION leasehold_lease_history();

CREATE INDEX alerts_opened_at_idx ON alerts (opened_at);
