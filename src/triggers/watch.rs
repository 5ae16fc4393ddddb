//! `mqtt_watch_table` checks its arguments here (in Rust, where the template parser is) before
//! the SQL function in finalize.sql creates the trigger, so bad input changes nothing and gets
//! the same error the trigger would give at its first row.

use pgrx::prelude::*;
use pgrx::PgRelation;

use super::{bad, columns, parse_qos, template_fills};
use crate::api::broker;
use crate::{catalog, errors, security};

/// Internal: raise the error `mqtt_watch_table(tbl, ...)` deserves, if any.
#[pg_extern(volatile)]
#[allow(clippy::too_many_arguments)]
fn _mqtt_check_watch(
    tbl: Option<pg_sys::Oid>,
    topic_template: Option<&str>,
    qos: Option<i32>,
    retain: Option<bool>,
    broker: Option<&str>,
    columns_arg: Option<Vec<Option<String>>>,
    events: Option<Vec<Option<String>>>,
) {
    let Some(tbl) = tbl else {
        bad("tbl must not be NULL".into(), None)
    };
    let Some(template) = topic_template else {
        bad("topic_template must not be NULL".into(), None)
    };
    let qos = errors::checked_qos(qos);
    parse_qos(&qos.to_string());
    if retain.is_none() {
        bad("retain must not be NULL".into(), None);
    }
    // SAFETY: AccessShareLock on a relation the caller named; kept to the end of the
    // transaction, as any statement's lock.
    let rel = unsafe { PgRelation::with_lock(tbl, pg_sys::AccessShareLock as _) };
    let table = format!("{}.{}", rel.namespace(), rel.name());
    // SAFETY: rd_rel is set for an open relation.
    let kind = unsafe { (*rel.rd_rel).relkind } as u8;
    if !matches!(kind, b'r' | b'p' | b'f') {
        bad(
            format!("{table} is not a table: mqtt_watch_table watches tables (partitioned and foreign ones too)"),
            Some("For a view, watch the table it reads from."),
        );
    }
    let ours = crate::catalog::is_extension_relation(tbl);
    if ours {
        // A watched outbox or history would publish its own messages again, for ever.
        bad(
            format!("{table} belongs to mqtt_pg and cannot be watched"),
            Some("Watch your own tables; mqtt_message_history already holds every message."),
        );
    }
    let cols = columns(&rel);
    template_fills(template, &cols, &table);
    if let Some(list) = &columns_arg {
        if list.is_empty() {
            bad(
                "columns must not be an empty array".into(),
                Some("Pass NULL to publish every column, or name at least one."),
            );
        }
        for c in list {
            let Some(c) = c else {
                bad("columns must not hold NULL".into(), None)
            };
            if !cols.iter().any(|(n, _, dropped)| n == c && !dropped) {
                bad(
                    format!("\"{c}\" is not a column of table {table}"),
                    Some("Column names are exact and case-sensitive."),
                );
            }
        }
    }
    let events = events.unwrap_or_default();
    if events.is_empty() {
        bad(
            "events must name at least one of insert, update, delete".into(),
            Some("For example events => '{insert,update}'."),
        );
    }
    for e in &events {
        match e.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("insert" | "update" | "delete") => {}
            other => bad(
                format!(
                    "invalid event {}: events are insert, update and delete",
                    other.map_or("NULL".into(), |o| format!("\"{o}\""))
                ),
                Some("For example events => '{insert,update}'."),
            ),
        }
    }
    let schema = catalog::schema();
    security::as_extension_owner(|| {
        Spi::connect(|client| broker::resolve(client, &schema, broker))
    });
}
