-- Leasehold schema, version 3: a reading's identity includes its topic, and every occurrence of a
-- bad payload is its own dead letter. See docs/guarantees.md ("What a reading is").

-- telemetry: the key becomes (device_id, topic, ts). A key that was unique without the topic is
-- unique with it, so no row is lost or merged by the change.
ALTER TABLE telemetry DROP CONSTRAINT telemetry_pkey;
ALTER TABLE telemetry ADD CONSTRAINT telemetry_pkey PRIMARY KEY (device_id, topic, ts);
-- A payload without a timestamp is no longer identified by its content forever: it is a new
-- reading on every publish (ts = its receive time), and a redelivery is recognised by the MQTT
-- DUP flag, its packet id and its content (content_hash, mqtt_pkid).
DROP INDEX telemetry_content_hash_key;
ALTER TABLE telemetry
    ADD COLUMN mqtt_pkid          integer,
    -- Delivered flagged as a redelivery with no earlier copy found: possibly stored twice.
    ADD COLUMN possible_duplicate boolean NOT NULL DEFAULT false;

-- dead_letters: one row per occurrence (a redelivery of the same delivery is still collapsed).
DROP INDEX dead_letters_content_hash_key;
ALTER TABLE dead_letters
    ADD COLUMN reason             text,
    ADD COLUMN size               integer,
    ADD COLUMN mqtt_pkid          integer,
    ADD COLUMN possible_duplicate boolean NOT NULL DEFAULT false;
UPDATE dead_letters SET size = octet_length(payload), reason = 'unknown';
ALTER TABLE dead_letters ALTER COLUMN size SET NOT NULL, ALTER COLUMN reason SET NOT NULL;
CREATE INDEX dead_letters_content_hash_idx ON dead_letters (content_hash, received_at);
