//! `mqtt_subscribe` and `mqtt_unsubscribe`: rows of `mqtt_topic` with `subscribe = true`.
//! The statement trigger on `mqtt_topic` wakes the worker at commit, which subscribes or
//! unsubscribes the difference on the live connection.

use pgrx::prelude::*;

use crate::api::broker;
use crate::errors::{self, INVALID_PARAMETER};
use crate::security::access::{self, Operation};
use crate::{routing, security};
use mqtt_pg_core::template::{NamedFilter, TemplateError};

/// The filter as written (it may name levels: `plant/{line}/temperature`) and as the broker
/// and the access rules see it (`plant/+/temperature`).
fn checked_filter(filter: Option<&str>) -> (&str, String) {
    let filter = filter
        .unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "topic filter must not be NULL", None));
    if let Err(e) = mqtt_pg_core::topic::validate_common(filter) {
        errors::bad_topic("topic filter", filter, &e);
    }
    match NamedFilter::parse(filter) {
        Ok(named) => (filter, named.filter),
        Err(TemplateError::Topic(e)) => errors::bad_topic("topic filter", filter, &e),
        Err(e) => errors::raise(
            INVALID_PARAMETER,
            format!("invalid MQTT topic filter \"{filter}\": {e}"),
            Some("A level written {name} stands for one level (subscribed as +), for example plant/{line}/temperature."),
        ),
    }
}

/// Internal: the SQL wrapper `mqtt_subscribe` passes the regprocedure/regclass as oids.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::too_many_arguments)]
fn _mqtt_subscribe(
    filter: Option<&str>,
    qos: Option<i32>,
    broker: Option<&str>,
    handler: Option<pg_sys::Oid>,
    target_table: Option<pg_sys::Oid>,
    conflict_columns: Option<Vec<Option<String>>>,
    notify_channel: Option<&str>,
) -> i32 {
    let (filter, subscribed) = checked_filter(filter);
    let qos = errors::checked_qos(qos);
    access::require(&subscribed, Operation::Subscribe);
    // As the caller: routing will run as the caller, who must be able to do what it asks for.
    let handler = routing::check::check(
        filter,
        handler.map(routing::check::HandlerRef::Oid),
        target_table,
        conflict_columns.as_deref(),
        notify_channel,
        Some(&Caller::now().name),
    );
    let conflict: Option<Vec<String>> = conflict_columns.map(|c| c.into_iter().flatten().collect());
    let caller = Caller::now();
    security::as_extension_owner(|| {
        broker::with_broker(broker, |client, schema, b| {
            // The row of another role (its owner_role) is left alone unless the caller
            // administers mqtt_topic: a device with a rule must not lower or take over the
            // owner's subscription.
            let id = client
                .update(
                    &format!(
                        "INSERT INTO {schema}.mqtt_topic (broker_id, name, qos, subscribe, active, owner_role, \
                           handler, target_table, conflict_columns, notify_channel) \
                         VALUES ($1, $2, $3, true, true, $4, $6, $7::pg_catalog.oid::pg_catalog.regclass, $8, $9) \
                         ON CONFLICT (broker_id, name) DO UPDATE \
                         SET qos = EXCLUDED.qos, subscribe = true, active = true, \
                             owner_role = EXCLUDED.owner_role, handler = EXCLUDED.handler, \
                             target_table = EXCLUDED.target_table, \
                             conflict_columns = EXCLUDED.conflict_columns, \
                             notify_channel = EXCLUDED.notify_channel, write_date = pg_catalog.now() \
                         WHERE $5 OR {schema}.mqtt_topic.owner_role OPERATOR(pg_catalog.=) $4 \
                         RETURNING id"
                    ),
                    None,
                    &[
                        b.id.into(),
                        filter.into(),
                        (qos as i16).into(),
                        caller.name.as_str().into(),
                        caller.admin.into(),
                        handler.as_deref().into(),
                        target_table.into(),
                        conflict.clone().into(),
                        notify_channel.into(),
                    ],
                )
                .ok()
                .and_then(|t| t.first().get_one::<i32>().ok().flatten());
            id.unwrap_or_else(|| not_yours(client, schema, b, filter))
        })
    })
}

/// The role calling, and whether it administers `mqtt_topic` (may UPDATE it directly, as the
/// database owner does): read before acting as the extension owner.
struct Caller {
    name: String,
    admin: bool,
}

impl Caller {
    fn now() -> Caller {
        let table = format!("{}.mqtt_topic", crate::catalog::schema());
        let (name, admin) = Spi::get_two_with_args::<String, bool>(
            "SELECT current_user::text, pg_catalog.has_table_privilege($1, 'UPDATE')",
            &[table.as_str().into()],
        )
        .unwrap_or((None, None));
        Caller {
            name: name.unwrap_or_default(),
            admin: admin.unwrap_or(false),
        }
    }
}

/// Raise 42501 for a subscription row that belongs to another role.
fn not_yours(
    client: &pgrx::spi::SpiClient<'_>,
    schema: &str,
    b: &broker::Broker,
    filter: &str,
) -> ! {
    let owner = client
        .select(
            &format!(
                "SELECT owner_role FROM {schema}.mqtt_topic \
                 WHERE broker_id OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2"
            ),
            Some(1),
            &[b.id.into(), filter.into()],
        )
        .ok()
        .and_then(|t| t.first().get_one::<String>().ok().flatten());
    errors::raise(
        errors::INSUFFICIENT_PRIVILEGE,
        format!(
            "the subscription to \"{filter}\" on broker \"{}\" belongs to {}",
            b.name,
            owner.map_or("the database owner".to_string(), |o| format!(
                "role \"{o}\""
            ))
        ),
        Some("Only its role, or a role that may UPDATE mqtt_topic, can change or remove it."),
    )
}

/// Stop subscribing to `topic_filter`; true if it was subscribed. The `mqtt_topic` row stays
/// (with `subscribe = false`) so its description and publish defaults are kept.
#[pg_extern(volatile, parallel_unsafe)]
fn mqtt_unsubscribe(topic_filter: Option<&str>, broker: default!(Option<&str>, "NULL")) -> bool {
    let (filter, subscribed) = checked_filter(topic_filter);
    access::require(&subscribed, Operation::Subscribe);
    let caller = Caller::now();
    security::as_extension_owner(|| {
        broker::with_broker(broker, |client, schema, b| {
            let row = client
                .update(
                    &format!(
                        "SELECT id, ($3 OR owner_role OPERATOR(pg_catalog.=) $4) FROM {schema}.mqtt_topic \
                         WHERE broker_id OPERATOR(pg_catalog.=) $1 AND name OPERATOR(pg_catalog.=) $2 \
                         AND subscribe FOR UPDATE"
                    ),
                    None,
                    &[
                        b.id.into(),
                        filter.into(),
                        caller.admin.into(),
                        caller.name.as_str().into(),
                    ],
                )
                .ok()
                .and_then(|t| t.first().get_two::<i32, bool>().ok());
            match row {
                Some((Some(id), Some(true))) => {
                    let _ = client.update(
                        &format!(
                            "UPDATE {schema}.mqtt_topic SET subscribe = false, write_date = pg_catalog.now() \
                             WHERE id OPERATOR(pg_catalog.=) $1"
                        ),
                        None,
                        &[id.into()],
                    );
                    true
                }
                Some((Some(_), _)) => not_yours(client, schema, b, filter),
                _ => false,
            }
        })
    })
}
