-- Leasehold schema, version 4: the cluster's identity (docs/configuration.md, "The MQTT client id").
--
-- A cluster is the set of nodes that share one database (and one LEASE_NAME). Its identity is a
-- random id created here, once, when the database is migrated for the first time: every node of
-- the cluster reads the same row, a node pointed at another database reads another one. The
-- default MQTT client id of the cluster's shared persistent session is derived from it (plus
-- LEASE_NAME), so a laptop started with a copy of production's environment but its own database
-- is a different client to the broker and can never take production's session.
--
-- Never change or delete the row of a running cluster: its nodes would come back under another
-- client id, a new and empty broker session, and whatever the broker queued for the old one would
-- not reach this database. A copy of the database (a restored dump, a cloned volume) carries the
-- identity with it; give a copy that must run as a cluster of its own a new one before any node
-- starts on it (docs/runbook.md, "The cluster's identity").
CREATE TABLE cluster_identity (
    -- One row at most.
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    cluster_id uuid        NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cluster_identity DEFAULT VALUES;

-- Each node reports the MQTT client id it uses for the shared session and whether it was derived
-- from the identity or set with MQTT_CLIENT_ID, so `leasehold status` can show (and warn about) it.
ALTER TABLE cluster_nodes
    ADD COLUMN mqtt_client_id        text,
    ADD COLUMN mqtt_client_id_source text;
