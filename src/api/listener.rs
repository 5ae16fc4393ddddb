//! `mqtt_start_listener` and `mqtt_stop_listener` (their status: `status`).
//!
//! Starting and stopping only flip `mqtt_broker.active`; the worker owns the connection. That
//! is what makes start idempotent from any number of sessions (the row lock serialises them and
//! there is one worker per database, one connection per broker) and what makes the choice
//! survive a server restart.

use pgrx::prelude::*;

use crate::api::broker;

/// The MQTT client id a broker connection uses: the configured one, else a stable id derived
/// from the cluster, the database and the broker (so two databases never share a session).
pub fn client_id_for(broker_id: i32, configured: Option<String>) -> String {
    configured.filter(|c| !c.is_empty()).unwrap_or_else(|| {
        // SAFETY: both are plain reads of process globals set at startup.
        let (sysid, dboid) = unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId) };
        mqtt_pg_core::client_id::generated_client_id(sysid, dboid.to_u32(), broker_id)
    })
}

/// Mark the broker active (the worker connects within moments of the commit); returns the
/// MQTT client id of the connection.
#[pg_extern(volatile, parallel_unsafe)]
fn mqtt_start_listener(broker: default!(Option<&str>, "NULL")) -> String {
    broker::with_broker(broker, |client, schema, b| {
        let configured: Option<String> = client
            .update(
                &format!(
                    "UPDATE {schema}.mqtt_broker SET active = true, write_date = pg_catalog.now() \
                     WHERE id OPERATOR(pg_catalog.=) $1 RETURNING client_id"
                ),
                None,
                &[b.id.into()],
            )
            .ok()
            .and_then(|t| t.first().get_one::<String>().ok().flatten());
        client_id_for(b.id, configured)
    })
}

/// Mark the broker inactive; true if it was active.
#[pg_extern(volatile, parallel_unsafe)]
fn mqtt_stop_listener(broker: default!(Option<&str>, "NULL")) -> bool {
    broker::with_broker(broker, |client, schema, b| {
        client
            .update(
                &format!(
                    "UPDATE {schema}.mqtt_broker b SET active = false, write_date = pg_catalog.now() \
                     FROM (SELECT id, active FROM {schema}.mqtt_broker \
                           WHERE id OPERATOR(pg_catalog.=) $1 FOR UPDATE) old \
                     WHERE b.id OPERATOR(pg_catalog.=) old.id RETURNING old.active"
                ),
                None,
                &[b.id.into()],
            )
            .ok()
            .and_then(|t| t.first().get_one::<bool>().ok().flatten())
            .unwrap_or(false)
    })
}
