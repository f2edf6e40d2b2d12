-- The subscription ledger: what the cluster's persistent MQTT session is subscribed to, as far as
-- Leasehold knows (MQTT 3.1.1 has no way to ask a broker for a session's subscriptions). The
-- leader reads it on every (re)connect to reconcile the session with the wanted topics: filters
-- wanted but not subscribed are subscribed, filters subscribed but no longer wanted (a device
-- disabled or deleted while no leader was connected, or under an earlier leader) unsubscribed.
--
--   state 'subscribed'  the broker granted QoS >= 1 (SUBACK) and the filter was not unsubscribed.
--   state 'pending'     a SUBSCRIBE or UNSUBSCRIBE for it may have reached the broker: written
--                       before the packet is sent, so a crash at any point leaves the filter
--                       "maybe subscribed" (subscribed again if wanted, unsubscribed if not),
--                       never forgotten while the session still has it.
-- A row is deleted after its UNSUBACK, and all of a client id's rows when the broker resumes a
-- connection without a session (session_present = false: it has no subscriptions either).
-- refused_at / refusal: the broker's last refusal (SUBACK 0x80, or a grant below QoS 1); the
-- mqtt_subscription_refused alert reads them. Writes are fenced like every leader write.
CREATE TABLE mqtt_subscriptions (
    client_id    text        NOT NULL,
    topic_filter text        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('pending', 'subscribed')),
    granted_qos  smallint,
    refused_at   timestamptz,
    refusal      text,
    attempts     integer     NOT NULL DEFAULT 0,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    lease_epoch  bigint      NOT NULL,
    PRIMARY KEY (client_id, topic_filter)
);
CREATE INDEX mqtt_subscriptions_refused_idx ON mqtt_subscriptions (refused_at)
    WHERE refused_at IS NOT NULL;
