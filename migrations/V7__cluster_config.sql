-- The cluster's configuration (docs/configuration.md, "Cluster settings"): numbered versions of
-- the cluster settings, the highest one active, the same for every node. `settings` is the
-- canonical TOML `leasehold config show` prints (secrets in clear: this table is read by the
-- cluster's own role only). A version is never changed or deleted: rolling back is applying an
-- older one again, as a new version.
CREATE TABLE cluster_config (
    version     bigint PRIMARY KEY CHECK (version > 0),
    settings    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    -- Who applied it: `user@host` of the `config apply`, or `import by <instance>`.
    applied_by  text NOT NULL,
    -- One line per changed setting or route against the version before it.
    changes     text NOT NULL DEFAULT ''
);

-- The version each node runs (NULL: a node that reads no stored version).
ALTER TABLE cluster_nodes ADD COLUMN config_version bigint;
