//! The cluster's identity and the client id of its shared MQTT session (docs/configuration.md, "The MQTT client id").
//!
//! A cluster is the set of nodes sharing one database. Migration 4 stores a random id in it,
//! once; the default client id is derived from that id and `LEASE_NAME`
//! ([`leasehold_config::derive_client_id`]). A node pointed at another database (a laptop with
//! a copy of production's environment and its own database) derives another client id and is
//! another client to the broker: it cannot take production's session. `MQTT_CLIENT_ID` still
//! overrides the derived id, and that is warned about wherever the id is shown (start-up log,
//! `/health`, `leasehold status`), because an override copied to a laptop brings the incident back.

use leasehold_config::{ClientId, Config};
use leasehold_store::queries::ClusterIdentity;

/// The client id a production node connects with: derived from `identity` (read from the
/// database after migrations) or set by `MQTT_CLIENT_ID`. A node without an identity and
/// without an override does not start: it must never connect with an id it could not derive
/// from its own database.
pub fn resolve(cfg: &Config, identity: Option<&ClusterIdentity>) -> anyhow::Result<ClientId> {
    let id = cfg.client_id(identity.map(|i| i.cluster_id.as_str()))?;
    let cluster_id = identity.map(|i| i.cluster_id.as_str()).unwrap_or("-");
    match id.warning() {
        None => tracing::info!(
            client_id = %id.id,
            client_id_source = id.source.as_str(),
            cluster_id,
            lease_name = %cfg.node.lease_name,
            "MQTT client id of the cluster's shared session, derived from the cluster identity in the database and LEASE_NAME"
        ),
        Some(warning) => tracing::warn!(
            client_id = %id.id,
            client_id_source = id.source.as_str(),
            cluster_id,
            derived_client_id = id.derived.as_deref().unwrap_or("-"),
            "{warning}"
        ),
    }
    Ok(id)
}
