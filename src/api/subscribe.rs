//! `mqtt_subscribe` and `mqtt_unsubscribe`: rows of `mqtt_topic` with `subscribe = true`.
//! The statement trigger on `mqtt_topic` wakes the worker at commit, which subscribes or
//! unsubscribes the difference on the live connection.

use pgrx::prelude::*;

use crate::api::broker;
use crate::errors::{self, INVALID_PARAMETER};
use crate::security;
use crate::security::access::{self, Operation};

fn checked_filter(filter: Option<&str>) -> &str {
    let filter = filter
        .unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "topic filter must not be NULL", None));
    if let Err(e) = mqtt_pg_core::topic::validate_filter(filter) {
        errors::bad_topic("topic filter", filter, &e);
    }
    filter
}

/// Internal: the SQL wrapper `mqtt_subscribe` passes the regprocedure/regclass as oids.
#[pg_extern(volatile, parallel_unsafe)]
fn _mqtt_subscribe(
    filter: Option<&str>,
    qos: Option<i32>,
    broker: Option<&str>,
    handler: Option<pg_sys::Oid>,
    target_table: Option<pg_sys::Oid>,
) -> i32 {
    let filter = checked_filter(filter);
    let qos = errors::checked_qos(qos);
    if handler.is_some() || target_table.is_some() {
        errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "routing received messages to a handler or target table is not available yet",
            Some("Subscribe without handler and target_table; messages are stored in mqtt_message_history."),
        );
    }
    access::require(filter, Operation::Subscribe);
    security::as_extension_owner(|| {
        broker::with_broker(broker, |client, schema, b| {
            client
            .update(
                &format!(
                    "INSERT INTO {schema}.mqtt_topic (broker_id, name, qos, subscribe, active) \
                     VALUES ($1, $2, $3, true, true) \
                     ON CONFLICT (broker_id, name) DO UPDATE \
                     SET qos = EXCLUDED.qos, subscribe = true, active = true, write_date = pg_catalog.now() \
                     RETURNING id"
                ),
                None,
                &[b.id.into(), filter.into(), (qos as i16).into()],
            )
            .ok()
            .and_then(|t| t.first().get_one::<i32>().ok().flatten())
            .unwrap_or_else(|| {
                errors::raise(
                    errors::NOT_IN_PREREQUISITE_STATE,
                    "could not store the subscription",
                    None,
                )
            })
        })
    })
}

/// Stop subscribing to `topic_filter`; true if it was subscribed. The `mqtt_topic` row stays
/// (with `subscribe = false`) so its description and publish defaults are kept.
#[pg_extern(volatile, parallel_unsafe)]
fn mqtt_unsubscribe(topic_filter: Option<&str>, broker: default!(Option<&str>, "NULL")) -> bool {
    let filter = checked_filter(topic_filter);
    access::require(filter, Operation::Subscribe);
    security::as_extension_owner(|| {
        broker::with_broker(broker, |client, schema, b| {
            client
            .update(
                &format!(
                    "UPDATE {schema}.mqtt_topic SET subscribe = false, write_date = pg_catalog.now() \
                     WHERE broker_id OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2 \
                     AND subscribe RETURNING id"
                ),
                None,
                &[b.id.into(), filter.into()],
            )
            .map(|t| !t.is_empty())
            .unwrap_or(false)
        })
    })
}
