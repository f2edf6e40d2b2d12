-- Routes: a message can be written into tables the operator owns (`[[routes]]` in the
-- configuration file). A dead letter names the route whose row it replaces (a mapping that
-- failed, a value the table refused, a conflict on the route's key); NULL for the default route
-- into `telemetry`. A message that could not be decoded for several routes names them all,
-- comma-separated.
ALTER TABLE dead_letters ADD COLUMN route text;
