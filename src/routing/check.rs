//! Checking a subscription's routing when it is written (by `mqtt_subscribe` or directly into
//! `mqtt_topic`), as the role writing it: routing later runs as that role, so it must be able
//! to do what it configures, and a mistake should be an error now, not a dead letter later.

use mqtt_pg_core::template::NamedFilter;
use pgrx::prelude::*;

use crate::errors::{self, INSUFFICIENT_PRIVILEGE, INVALID_PARAMETER};
use crate::{catalog, security};

/// How a handler is given: as text (a direct write) or resolved already (mqtt_subscribe's
/// regprocedure argument).
pub enum HandlerRef<'a> {
    Text(&'a str),
    Oid(pg_sys::Oid),
}

/// Check the routing of subscription `name`; returns the handler's canonical text (schema-
/// qualified regprocedure) to store.
pub fn check(
    name: &str,
    handler: Option<HandlerRef<'_>>,
    target: Option<pg_sys::Oid>,
    conflict: Option<&[Option<String>]>,
    notify: Option<&str>,
    owner_role: Option<&str>,
) -> Option<String> {
    let routes = handler.is_some() || target.is_some() || notify.is_some();
    if name.contains(['{', '}']) {
        if let Err(e) = NamedFilter::parse(name) {
            errors::raise(
                INVALID_PARAMETER,
                format!("invalid MQTT topic filter \"{name}\": {e}"),
                Some("A level written {name} stands for one level (subscribed as +), for example plant/{line}/temperature."),
            );
        }
    }
    let handler = handler.map(check_handler);
    if let Some(t) = target {
        check_target(t, conflict.is_some());
    }
    if let Some(cols) = conflict {
        let Some(t) = target else {
            errors::raise(
                INVALID_PARAMETER,
                "conflict_columns need a target_table",
                Some("conflict_columns make the inserts into target_table upserts."),
            )
        };
        check_conflict(t, cols);
    }
    if let Some(ch) = notify {
        if ch.is_empty() || ch.len() > 63 {
            errors::raise(
                INVALID_PARAMETER,
                format!("invalid notify_channel \"{ch}\": a channel name has 1 to 63 bytes"),
                Some("Use a short name, for example 'mqtt_readings', and LISTEN mqtt_readings;"),
            );
        }
    }
    if routes {
        refuse_superuser(owner_role);
    }
    handler
}

/// Routing runs as the subscription's owner_role, and never as a superuser: the objects it
/// touches (a function in public, a target table's triggers) may be changed by roles that are
/// not, which would then run their code with a superuser's rights.
fn refuse_superuser(owner_role: Option<&str>) {
    let Some(role) = owner_role else { return };
    let superuser = Spi::get_one_with_args::<bool>(
        "SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) $1",
        &[role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if superuser {
        errors::raise(
            INSUFFICIENT_PRIVILEGE,
            format!("routing for this subscription would run as a superuser (role \"{role}\")"),
            Some("Routing runs as the role that configures it and never as a superuser: subscribe as the role that should own it (SET ROLE odoo; SELECT mqtt_subscribe(...)), or, as a superuser, write the mqtt_topic row with owner_role set to a role that is not one."),
        );
    }
}

fn check_handler(h: HandlerRef<'_>) -> String {
    let schema = catalog::schema();
    let oid = match h {
        HandlerRef::Oid(o) => o,
        HandlerRef::Text(text) => {
            // Written directly, names are looked up in the extension's schema (public in an
            // Odoo database) unless qualified: the writer's own search_path is not visible
            // from inside the trigger.
            let path = std::ffi::CString::new(format!("{schema}, pg_catalog, pg_temp"))
                .unwrap_or_else(|_| c"pg_catalog, pg_temp".into());
            let resolved = security::as_role(security::current_role(), &path, || {
                Spi::get_one_with_args::<pg_sys::Oid>(
                    "SELECT pg_catalog.to_regprocedure($1)::pg_catalog.oid",
                    &[text.into()],
                )
            });
            match resolved {
                Ok(Some(o)) => o,
                _ => errors::raise(
                    pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                    format!("handler function {text} does not exist"),
                    Some("Give it with its argument type, for example 'public.on_reading(mqtt_message_history)'."),
                ),
            }
        }
    };
    let row = Spi::get_three_with_args::<bool, String, bool>(
        &format!(
            "SELECT p.prokind OPERATOR(pg_catalog.=) 'f' AND p.pronargs OPERATOR(pg_catalog.=) 1 \
               AND p.proargtypes[0] OPERATOR(pg_catalog.=) '{schema}.mqtt_message_history'::pg_catalog.regtype \
               AND p.prorettype OPERATOR(pg_catalog.=) 'pg_catalog.void'::pg_catalog.regtype \
               AND NOT p.proretset, \
               p.oid::pg_catalog.regprocedure::pg_catalog.text, \
               pg_catalog.has_function_privilege(p.oid, 'EXECUTE') \
               AND (pg_catalog.pg_has_role(p.proowner, 'USAGE') \
                    OR (SELECT o.rolsuper FROM pg_catalog.pg_roles o WHERE o.oid OPERATOR(pg_catalog.=) p.proowner)) \
             FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) $1"
        ),
        &[oid.into()],
    );
    let Ok((Some(shape), Some(shown), Some(may))) = row else {
        errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
            format!("handler function (oid {}) does not exist", oid.to_u32()),
            Some("Create the function first: CREATE FUNCTION on_reading(msg mqtt_message_history) RETURNS void ..."),
        )
    };
    if !shape {
        errors::raise(
            INVALID_PARAMETER,
            format!("handler {shown} must take one mqtt_message_history and return void"),
            Some("CREATE FUNCTION on_reading(msg mqtt_message_history) RETURNS void LANGUAGE plpgsql AS $$ ... $$;"),
        );
    }
    if !may {
        errors::raise(
            INSUFFICIENT_PRIVILEGE,
            format!("permission denied for handler function {shown}"),
            Some("The handler runs as the role that subscribes, which needs EXECUTE on it, and it must belong to that role (or a role it is a member of, or a superuser): a function of anyone else's could be replaced under it."),
        );
    }
    // Stored schema-qualified, as the worker (whose search_path is pg_catalog) reads it.
    security::as_role(security::current_role(), c"pg_catalog, pg_temp", || {
        Spi::get_one_with_args::<String>(
            "SELECT $1::pg_catalog.oid::pg_catalog.regprocedure::pg_catalog.text",
            &[oid.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(shown)
}

fn check_target(t: pg_sys::Oid, upsert: bool) {
    let row = Spi::get_three_with_args::<String, String, bool>(
        "SELECT c.relkind::pg_catalog.text, c.oid::pg_catalog.regclass::pg_catalog.text, \
           pg_catalog.has_table_privilege(c.oid, 'INSERT') \
           AND (NOT $2 OR pg_catalog.has_table_privilege(c.oid, 'UPDATE')) \
         FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[t.into(), upsert.into()],
    );
    let Ok((Some(kind), Some(shown), Some(may))) = row else {
        errors::raise(
            pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("target table (oid {}) does not exist", t.to_u32()),
            Some("Create the table first, then subscribe with target_table => 'its_name'."),
        )
    };
    let ours = catalog::is_extension_relation(t);
    if ours {
        // Devices would write brokers, access rules or the outbox by publishing.
        errors::raise(
            INVALID_PARAMETER,
            format!("target_table {shown} belongs to mqtt_pg and cannot take routed messages"),
            Some("Route into a table of your own; received messages are in mqtt_message_history anyway."),
        );
    }
    if !matches!(kind.as_str(), "r" | "p" | "f") {
        errors::raise(
            INVALID_PARAMETER,
            format!("target_table {shown} is not a table"),
            Some("Name a table (plain, partitioned or foreign); for a view, use a handler that inserts into it."),
        );
    }
    if !may {
        errors::raise(
            INSUFFICIENT_PRIVILEGE,
            format!(
                "permission denied to {} table {shown}",
                if upsert {
                    "INSERT into and UPDATE"
                } else {
                    "INSERT into"
                }
            ),
            Some("Routing runs as the role that subscribes, which needs those privileges on the target table."),
        );
    }
}

fn check_conflict(t: pg_sys::Oid, cols: &[Option<String>]) {
    if cols.is_empty() || cols.iter().any(Option::is_none) {
        errors::raise(
            INVALID_PARAMETER,
            "conflict_columns must name at least one column, and no NULL",
            Some("Pass NULL for plain inserts, or the columns of a unique index, for example '{device}'."),
        );
    }
    let cols: Vec<String> = cols.iter().flatten().cloned().collect();
    for c in &cols {
        let exists = Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) $1 \
               AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name AND a.attnum OPERATOR(pg_catalog.>) 0 \
               AND NOT a.attisdropped)",
            &[t.into(), c.as_str().into()],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !exists {
            errors::raise(
                INVALID_PARAMETER,
                format!("conflict column \"{c}\" is not a column of the target table"),
                Some("Column names are exact and case-sensitive; name the columns of a unique index or constraint."),
            );
        }
    }
    // ON CONFLICT (cols) needs a unique index on exactly those columns (no expressions, no
    // WHERE), which is what a primary key or UNIQUE constraint gives.
    let matched = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_index i \
           WHERE i.indrelid OPERATOR(pg_catalog.=) $1 AND i.indisunique AND i.indpred IS NULL \
             AND i.indexprs IS NULL \
             AND (SELECT pg_catalog.array_agg(a.attname::pg_catalog.text ORDER BY a.attname) \
                  FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) i.indrelid \
                    AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey[0:i.indnkeyatts OPERATOR(pg_catalog.-) 1])) \
                 OPERATOR(pg_catalog.=) (SELECT pg_catalog.array_agg(DISTINCT c ORDER BY c) FROM pg_catalog.unnest($2::pg_catalog.text[]) c))",
        &[t.into(), cols.clone().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !matched {
        errors::raise(
            INVALID_PARAMETER,
            format!(
                "no unique index or constraint of the target table is on exactly ({})",
                cols.join(", ")
            ),
            Some("Upserts need one: ALTER TABLE ... ADD UNIQUE (device);"),
        );
    }
}

/// Internal, called by the trigger on `mqtt_topic` as the writer: check the routing columns;
/// returns the handler to store (canonical text).
#[pg_extern(volatile)]
fn _mqtt_check_route(
    name: Option<&str>,
    handler: Option<&str>,
    target_table: Option<pg_sys::Oid>,
    conflict_columns: Option<Vec<Option<String>>>,
    notify_channel: Option<&str>,
    owner_role: Option<&str>,
) -> Option<String> {
    check(
        name.unwrap_or_default(),
        handler.map(HandlerRef::Text),
        target_table,
        conflict_columns.as_deref(),
        notify_channel,
        owner_role,
    )
}
