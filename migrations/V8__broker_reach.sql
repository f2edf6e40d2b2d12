-- When each node last reached the broker (a standby probes it; a leader connected reaches it):
-- a leader hands over for broker reasons only to a standby that reached it recently, so that a
-- broker no node can reach does not move the lease back and forth (docs/guarantees.md, G4).
ALTER TABLE cluster_nodes ADD COLUMN broker_reached_at timestamptz;
