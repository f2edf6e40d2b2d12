-- The routes a leader has suspended (their tables cannot be written now), as its heartbeat
-- reports them: {"route": "why"}. Alerts and `leasehold status` read the lease holder's, so a
-- suspended route shows while it is suspended, whether or not messages arrive for it.
ALTER TABLE cluster_nodes ADD COLUMN suspended_routes jsonb;
