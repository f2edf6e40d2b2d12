-- Leasehold schema, version 1. Applied by `leasehold migrate` and at node start, under an advisory lock.

-- The lease (docs/guarantees.md, G1; docs/ARCHITECTURE.md). Rows are never deleted: the epoch must survive every holder.
CREATE TABLE instance_lock (
    service_name text PRIMARY KEY,
    holder_id    text        NOT NULL,
    instance_id  text        NOT NULL,
    epoch        bigint      NOT NULL,
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    renewed_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);

-- Readings. (device_id, ts) is the idempotency key; readings without a timestamp use content_hash.
CREATE TABLE telemetry (
    device_id    text        NOT NULL,
    ts           timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    topic        text        NOT NULL,
    received_at  timestamptz NOT NULL,
    written_by   text        NOT NULL,
    lease_epoch  bigint      NOT NULL,
    content_hash text,
    PRIMARY KEY (device_id, ts)
);
CREATE UNIQUE INDEX telemetry_content_hash_key ON telemetry (device_id, content_hash)
    WHERE content_hash IS NOT NULL;
-- Staleness and coverage look at the newest rows.
CREATE INDEX telemetry_received_at_idx ON telemetry (received_at);

-- Topics to subscribe to (not an allow-list). Changes are announced to running nodes.
CREATE TABLE devices (
    device_id  text PRIMARY KEY,
    topic      text        NOT NULL,
    enabled    boolean     NOT NULL DEFAULT true,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION leasehold_devices_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('leasehold_devices', TG_OP);
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION leasehold_devices_changed();

-- Messages that could not become readings. content_hash (topic + bytes) keeps redeliveries out.
CREATE TABLE dead_letters (
    id           bigserial PRIMARY KEY,
    topic        text        NOT NULL,
    payload      bytea       NOT NULL,
    error        text        NOT NULL,
    received_at  timestamptz NOT NULL,
    written_by   text        NOT NULL,
    lease_epoch  bigint      NOT NULL,
    content_hash text        NOT NULL
);
CREATE UNIQUE INDEX dead_letters_content_hash_key ON dead_letters (content_hash);
CREATE INDEX dead_letters_received_at_idx ON dead_letters (received_at);

-- Every node heartbeats here, leader or not.
CREATE TABLE cluster_nodes (
    holder_id   text PRIMARY KEY,
    instance_id text        NOT NULL,
    role        text        NOT NULL,
    mode        text        NOT NULL,
    version     text        NOT NULL,
    http_url    text,
    started_at  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);

-- At most one open alert per kind, cluster-wide.
CREATE TABLE alerts (
    id          bigserial PRIMARY KEY,
    kind        text        NOT NULL,
    level       text        NOT NULL,
    message     text        NOT NULL,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    opened_by   text,
    resolved_by text,
    details     jsonb
);
CREATE UNIQUE INDEX alerts_one_open_per_kind ON alerts (kind) WHERE resolved_at IS NULL;
