//! `mqtt_start_listener`, `mqtt_stop_listener` and `mqtt_status`.
//!
//! Starting and stopping only flip `mqtt_broker.active`; the worker owns the connection. That
//! is what makes start idempotent from any number of sessions (the row lock serialises them and
//! there is one worker per database, one connection per broker) and what makes the choice
//! survive a server restart.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::api::broker;
use crate::shmem::{DbState, SHARED};
use crate::{catalog, errors};

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

fn ts(us: i64) -> Value {
    if us <= 0 {
        return Value::Null;
    }
    // Postgres renders timestamps; reuse it rather than formatting by hand.
    let secs = us as f64 / 1_000_000.0;
    Spi::get_one_with_args::<String>(
        "SELECT to_char(to_timestamp($1) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
        &[secs.into()],
    )
    .ok()
    .flatten()
    .map(Value::String)
    .unwrap_or(Value::Null)
}

/// The broker's connection state, last error and counters, as JSON.
#[pg_extern(stable)]
fn mqtt_status(broker: default!(Option<&str>, "NULL")) -> JsonB {
    let schema = catalog::schema();
    let (b, active, configured, depth, dead) = Spi::connect(|client| {
        let b = broker::resolve(client, &schema, broker);
        let row = client
            .select(
                &format!(
                    "SELECT active, client_id, \
                     (SELECT count(*) FROM {schema}.mqtt_outbox o WHERE o.broker_id OPERATOR(pg_catalog.=) b.id), \
                     (SELECT count(*) FROM {schema}.mqtt_dead_letter d WHERE d.broker_id OPERATOR(pg_catalog.=) b.id) \
                     FROM {schema}.mqtt_broker b WHERE id OPERATOR(pg_catalog.=) $1"
                ),
                Some(1),
                &[b.id.into()],
            )
            .unwrap_or_else(|e| errors::raise(errors::UNDEFINED_OBJECT, e.to_string(), None));
        let row = row.first();
        let (active, configured, depth) = row
            .get_three::<bool, String, i64>()
            .unwrap_or((None, None, None));
        let dead = row.get::<i64>(4).ok().flatten().unwrap_or(0);
        (
            b,
            active.unwrap_or(false),
            configured,
            depth.unwrap_or(0),
            dead,
        )
    });

    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let (worker, slot) = {
        let shared = SHARED.share();
        match shared.db(dboid) {
            Some(d) => (Some(d.state), d.broker(b.id).copied()),
            None => (None, None),
        }
    };
    let worker_running = worker == Some(DbState::Running);
    let status = match (active, &slot) {
        (false, _) => "stopped",
        (true, Some(s)) if worker_running => s.state.as_str(),
        (true, _) => "connecting",
    };
    let mut out = json!({
        "status": status,
        "broker": b.name,
        "active": active,
        "client_id": client_id_for(b.id, configured),
        "worker": if worker_running { "running" } else { "not running" },
        "outbox_depth": depth,
        "dead_letters": dead,
        "since": Value::Null,
        "last_error": Value::Null,
        "last_error_at": Value::Null,
        "reconnects": 0,
        "messages_received": 0,
        "messages_sent": 0,
    });
    if let Some(s) = slot {
        out["since"] = ts(s.since_us);
        out["last_error"] = s
            .last_error()
            .map(|e| Value::String(e.into()))
            .unwrap_or(Value::Null);
        out["last_error_at"] = ts(s.last_error_at_us);
        out["reconnects"] = json!(s.reconnects);
        out["messages_received"] = json!(s.received);
        out["messages_sent"] = json!(s.sent);
    }
    JsonB(out)
}
