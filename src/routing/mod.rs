//! Routing received messages: a subscription (an `mqtt_topic` row) may name a target table, a
//! handler function and a NOTIFY channel. The worker stores each batch in history and routes
//! it in the same transaction (see `worker::store`), so a message's history row and what its
//! routing wrote commit or roll back together; one that cannot be routed is set aside in
//! `mqtt_dead_letter` instead.
//!
//! Routing runs user code (a handler, a target table's triggers, defaults and type input
//! functions), so it never runs with the worker's privileges: each subscription's routing runs
//! as its `owner_role`, the role that configured it, in a restricted security context.

pub mod check;
pub mod exec;

use std::collections::HashMap;

use mqtt_pg_core::template::NamedFilter;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::security::access::{self, Operation};

/// A subscription that routes its messages somewhere.
pub struct Route {
    pub topic_id: i32,
    /// The filter as written (`plant/{line}/temperature`).
    pub name: String,
    pub filter: NamedFilter,
    /// The role routing runs as, or why there is none.
    pub owner: Result<pg_sys::Oid, String>,
    /// The target table (quoted, qualified), or why it cannot be used.
    pub target: Option<Result<Target, String>>,
    /// The handler's quoted, qualified name, or why it cannot be called.
    pub handler: Option<Result<String, String>>,
    pub notify: Option<String>,
    pub conflict: Vec<String>,
}

pub struct Target {
    pub oid: pg_sys::Oid,
    pub sql: String,
}

impl Route {
    /// How the route is named in errors and dead letters.
    pub fn describe(&self) -> String {
        format!("subscription {} (\"{}\")", self.topic_id, self.name)
    }

    pub fn matches(&self, topic: &str) -> bool {
        mqtt_pg_core::topic::filter_matches(&self.filter.filter, topic)
    }
}

/// Routes per broker id.
pub type Routes = HashMap<i32, Vec<Route>>;

/// Read the active subscriptions that route somewhere (of one broker, or all). The names
/// are resolved here, once per load, so a dropped function or table shows up as an error on
/// the messages it would have taken rather than as a failed query.
pub fn load(client: &SpiClient<'_>, schema: &str, broker: Option<i32>) -> Routes {
    let mut out = Routes::new();
    let rows = client.select(
        &format!(
            "SELECT t.id, t.broker_id, t.name, t.handler, \
               CASE WHEN p.oid IS NULL OR pg_catalog.pg_has_role(r.oid, p.proowner, 'USAGE') \
                      OR (SELECT o.rolsuper FROM pg_catalog.pg_roles o WHERE o.oid OPERATOR(pg_catalog.=) p.proowner) \
                    THEN pg_catalog.quote_ident(pn.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(p.proname) END, \
               t.target_table::pg_catalog.oid, \
               pg_catalog.quote_ident(cn.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname), \
               t.conflict_columns, t.notify_channel, t.owner_role, r.oid \
             FROM {schema}.mqtt_topic t \
             LEFT JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(t.handler) \
             LEFT JOIN pg_catalog.pg_namespace pn ON pn.oid OPERATOR(pg_catalog.=) p.pronamespace \
             LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.target_table::pg_catalog.oid \
             LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid OPERATOR(pg_catalog.=) c.relnamespace \
             LEFT JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) t.owner_role \
             WHERE t.subscribe AND t.active \
               AND (t.handler IS NOT NULL OR t.target_table IS NOT NULL OR t.notify_channel IS NOT NULL) \
               AND ($1::pg_catalog.int4 IS NULL OR t.broker_id OPERATOR(pg_catalog.=) $1) \
             ORDER BY t.id"
        ),
        None,
        &[broker.into()],
    );
    let Ok(rows) = rows else { return out };
    for row in rows {
        let topic_id = row.get::<i32>(1).ok().flatten().unwrap_or(0);
        let broker_id = row.get::<i32>(2).ok().flatten().unwrap_or(0);
        let name = row.get::<String>(3).ok().flatten().unwrap_or_default();
        let Ok(filter) = NamedFilter::parse(&name) else {
            continue; // not subscribed either (see worker::config)
        };
        let handler_text = row.get::<String>(4).ok().flatten();
        let handler_sql = row.get::<String>(5).ok().flatten();
        let target_oid = row.get::<pg_sys::Oid>(6).ok().flatten();
        let target_sql = row.get::<String>(7).ok().flatten();
        let owner_name = row.get::<String>(10).ok().flatten();
        let owner = row.get::<pg_sys::Oid>(11).ok().flatten();
        let route = Route {
            topic_id,
            filter,
            handler: handler_text.map(|h| {
                handler_sql.ok_or_else(|| {
                    format!(
                        "its handler {h} does not exist (any more), or now belongs to a role that \
                         its owner_role does not act as (replaced by the schema's owner?); configure \
                         the subscription again"
                    )
                })
            }),
            target: target_oid.map(|oid| match target_sql {
                Some(sql) => Ok(Target { oid, sql }),
                None => Err(format!(
                    "its target table (oid {}) does not exist (any more)",
                    oid.to_u32()
                )),
            }),
            notify: row.get::<String>(9).ok().flatten(),
            conflict: row
                .get::<Vec<Option<String>>>(8)
                .ok()
                .flatten()
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect(),
            owner: match (owner, owner_name) {
                (Some(oid), _) => Ok(oid),
                (None, Some(n)) => Err(format!("its owner_role \"{n}\" does not exist")),
                (None, None) => Err("it has no owner_role to run as".into()),
            },
            name,
        };
        out.entry(broker_id).or_default().push(route);
    }
    // A route whose role has lost its rule takes no messages, not even ones that arrive through
    // another role's subscription (worker::config stops subscribing it and says why).
    for routes in out.values_mut() {
        routes.retain(|r| match r.owner {
            Ok(role) => access::allowed(role, &r.filter.filter, Operation::Subscribe),
            Err(_) => true, // routing it fails with that error, visibly
        });
    }
    out
}

/// Internal, behind `mqtt_requeue_dead_letter`: route a received message just put back into
/// history as its subscriptions route new ones. An error undoes the requeue.
#[pg_extern(volatile)]
fn _mqtt_route_requeued(history_id: i64) {
    let schema = crate::catalog::schema();
    Spi::connect_mut(|client| {
        let row = client
            .select(
                &format!(
                    "SELECT broker_id, topic, payload, qos, retain, message_id, \
                       (extract(epoch FROM \"timestamp\") OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8, \
                       properties::pg_catalog.text \
                     FROM {schema}.mqtt_message_history WHERE id OPERATOR(pg_catalog.=) $1"
                ),
                Some(1),
                &[history_id.into()],
            )
            .ok()
            .map(|t| {
                let r = t.first();
                (
                    r.get::<i32>(1).ok().flatten().unwrap_or(0),
                    r.get::<String>(2).ok().flatten().unwrap_or_default(),
                    r.get::<Vec<u8>>(3).ok().flatten().unwrap_or_default(),
                    r.get::<i16>(4).ok().flatten().unwrap_or(0),
                    r.get::<bool>(5).ok().flatten().unwrap_or(false),
                    r.get::<i32>(6).ok().flatten(),
                    r.get::<i64>(7).ok().flatten().unwrap_or(0),
                    r.get::<String>(8).ok().flatten(),
                )
            });
        let Some((broker_id, topic, payload, qos, retain, message_id, at_us, properties)) = row
        else {
            return;
        };
        let routes = load(client, &schema, Some(broker_id));
        let msg = exec::Msg {
            id: history_id,
            broker_id,
            topic: &topic,
            payload: &payload,
            qos,
            retain,
            message_id,
            at_us,
            properties,
        };
        let mine: Vec<&Route> = routes
            .get(&broker_id)
            .into_iter()
            .flatten()
            .filter(|r| r.matches(&topic))
            .collect();
        if let Err(e) = exec::shape_check(&mine, &msg) {
            crate::errors::raise(
                pgrx::PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
                e,
                None,
            );
        }
        exec::route(client, &schema, &[(msg, mine)], true);
    });
}
