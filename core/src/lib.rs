//! Postgres-free core of mqtt_pg: the MQTT topic rules, reconnect backoff, generated client ids
//! and the engine that owns the broker connections (rumqttc on tokio). Nothing here links
//! against PostgreSQL, so `cargo test -p mqtt_pg_core` covers it in seconds.

pub mod acl;
pub mod backoff;
pub mod batch;
pub mod client_id;
pub mod engine;
pub mod interval;
pub mod properties;
pub mod rate;
pub mod route;
pub mod secret;
pub mod template;
pub mod tls;
pub mod topic;
pub mod utc;
