//! Resolving the `broker` argument every function takes.

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::spi::{Spi, SpiClient, SpiTupleTable};
use pgrx::{pg_sys, PgBuiltInOids, PgOid};

use crate::catalog::{self, Stamp};
use crate::errors::{self, UNDEFINED_OBJECT};
use crate::{plans, security};

/// Broker ids by the `broker` argument (None: the default).
type BrokerIds = HashMap<Option<String>, i32>;

thread_local! {
    /// Brokers resolved for publishing in the current statement (see `catalog::Stamp`).
    static FOR_PUBLISH: RefCell<Option<(Stamp, BrokerIds)>> =
        const { RefCell::new(None) };
}

/// The id of the broker a message is queued for, resolved once per statement, with its row
/// locked FOR KEY SHARE until the transaction ends: what the outbox's foreign key did for every
/// row, done once. A concurrent DELETE of the broker waits for this transaction, and then its
/// trigger removes the broker's outbox rows, these included (`_mqtt_broker_deleted`); a broker
/// deleted first is not found here.
pub fn id_for_publish(name: Option<&str>) -> i32 {
    let now = catalog::stamp();
    let key = name.map(str::to_owned);
    let hit = FOR_PUBLISH.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(stamp, _)| *stamp == now)
            .and_then(|(_, ids)| ids.get(&key).copied())
    });
    if let Some(id) = hit {
        return id;
    }
    let installed = catalog::installed_or_raise();
    let id = security::as_extension_owner(|| {
        Spi::connect_mut(|client| locked_id(client, &installed, name))
    });
    FOR_PUBLISH.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(stamp, _)| *stamp != now) {
            *c = Some((now, HashMap::new()));
        }
        if let Some((_, ids)) = c.as_mut() {
            ids.insert(key, id);
        }
    });
    id
}

/// Run `f` with an SPI connection, the extension's quoted schema and the resolved broker: the
/// shape of every function that acts on one broker.
pub fn with_broker<R>(
    name: Option<&str>,
    f: impl FnOnce(&mut SpiClient<'_>, &str, &Broker) -> R,
) -> R {
    let schema = catalog::schema();
    Spi::connect_mut(|client| {
        let b = resolve(client, &schema, name);
        f(client, &schema, &b)
    })
}

/// A broker row as the functions need it.
pub struct Broker {
    pub id: i32,
    pub name: String,
}

/// NULL means the broker with `is_default`, or the only one when exactly one exists.
pub fn resolve(client: &SpiClient<'_>, schema: &str, name: Option<&str>) -> Broker {
    match name {
        Some(name) => {
            let row = client
                .select(
                    &format!(
                        "SELECT id, name FROM {schema}.mqtt_broker WHERE name OPERATOR(pg_catalog.=) $1"
                    ),
                    Some(1),
                    &[name.into()],
                )
                .ok()
                .and_then(|t| t.first().get_two::<i32, String>().ok());
            match row {
                Some((Some(id), Some(name))) => Broker { id, name },
                _ => not_found(name),
            }
        }
        None => {
            let rows = client
                .select(
                    &format!(
                        "SELECT id, name, is_default FROM {schema}.mqtt_broker \
                         ORDER BY is_default DESC, id LIMIT 2"
                    ),
                    None,
                    &[],
                )
                .unwrap_or_else(|e| errors::raise(UNDEFINED_OBJECT, e.to_string(), None));
            pick_default(rows)
        }
    }
}

fn not_found(name: &str) -> ! {
    errors::raise(
        UNDEFINED_OBJECT,
        format!("MQTT broker \"{name}\" does not exist"),
        Some("SELECT name FROM mqtt_broker; lists the configured brokers."),
    )
}

/// The default broker among (id, name, is_default) rows ordered by is_default DESC, id.
fn pick_default(rows: SpiTupleTable<'_>) -> Broker {
    let mut found = Vec::new();
    for row in rows {
        let id: Option<i32> = row.get(1).ok().flatten();
        let name: Option<String> = row.get(2).ok().flatten();
        let is_default: bool = row.get(3).ok().flatten().unwrap_or(false);
        if let (Some(id), Some(name)) = (id, name) {
            found.push((id, name, is_default));
        }
    }
    match found.as_slice() {
        [(id, name, true), ..] | [(id, name, false)] => Broker {
            id: *id,
            name: name.clone(),
        },
        [] => errors::raise(
            UNDEFINED_OBJECT,
            "no MQTT broker is configured",
            Some("Add one: INSERT INTO mqtt_broker (name, host, port) VALUES ('local', '127.0.0.1', 1883);"),
        ),
        _ => errors::raise(
            UNDEFINED_OBJECT,
            "no default MQTT broker: several brokers exist and none has is_default",
            Some("Pass the broker name, or mark one: UPDATE mqtt_broker SET is_default = true WHERE name = '...';"),
        ),
    }
}

/// [`resolve`] for publishing: the broker's row locked FOR KEY SHARE, through kept plans (this
/// runs once per statement of every publishing transaction).
fn locked_id(
    client: &mut SpiClient<'_>,
    installed: &catalog::Installed,
    name: Option<&str>,
) -> i32 {
    // A row lock needs the transaction's id, and pgrx runs statements read-only (where
    // FOR KEY SHARE is refused) until the transaction has one.
    // SAFETY: assigns the id if there is none yet, as any write would.
    unsafe { pg_sys::GetCurrentTransactionId() };
    let schema = &installed.schema;
    match name {
        Some(name) => {
            let sql = || {
                format!(
                    "SELECT id FROM {schema}.mqtt_broker WHERE name OPERATOR(pg_catalog.=) $1 FOR KEY SHARE"
                )
            };
            let types = [PgOid::BuiltIn(PgBuiltInOids::TEXTOID)];
            let id = plans::with_plan(
                client,
                installed.oid,
                "broker_by_name",
                &types,
                sql,
                |client, stmt| {
                    client
                        .update(stmt, Some(1), &[name.into()])
                        .ok()
                        .and_then(|t| t.first().get_one::<i32>().ok().flatten())
                },
            );
            id.unwrap_or_else(|| not_found(name))
        }
        None => {
            let sql = || {
                format!(
                    "SELECT id, name, is_default FROM {schema}.mqtt_broker \
                     ORDER BY is_default DESC, id LIMIT 2 FOR KEY SHARE"
                )
            };
            plans::with_plan(
                client,
                installed.oid,
                "broker_default",
                &[],
                sql,
                |client, stmt| {
                    let rows = client
                        .update(stmt, None, &[])
                        .unwrap_or_else(|e| errors::raise(UNDEFINED_OBJECT, e.to_string(), None));
                    pick_default(rows).id
                },
            )
        }
    }
}

/// Internal: the id of the broker a `broker` argument names, resolved and checked as every
/// function does (for the SQL-language functions in finalize.sql).
#[pgrx::pg_extern(stable, parallel_safe)]
fn _mqtt_broker_id(broker: pgrx::default!(Option<&str>, "NULL")) -> i32 {
    with_broker(broker, |_, _, b| b.id)
}

/// Internal, for the `mqtt_broker_deleted` trigger: delete the queued messages of deleted
/// brokers, as the outbox's foreign key (`ON DELETE CASCADE`) did, with the same care for
/// concurrency. A publisher that held the broker's row (FOR KEY SHARE) may have committed its
/// rows after this transaction's snapshot was taken: under REPEATABLE READ or SERIALIZABLE
/// they are invisible to it, so they are looked for with the latest snapshot, and a row this
/// transaction could not have seen fails it with a serialization error (40001), to be retried,
/// as the foreign key's cascade does (PostgreSQL's `ri_PerformCheck`). Rows left behind would
/// be orphans, or, were a broker with the same id inserted, go to the wrong broker.
/// Only rows of brokers that no longer exist are deleted, so a direct call can do no harm.
#[pgrx::pg_extern(volatile, parallel_unsafe)]
fn _mqtt_broker_cascade(ids: Option<Vec<Option<i32>>>) {
    let ids: Vec<i32> = ids.unwrap_or_default().into_iter().flatten().collect();
    if ids.is_empty() {
        return;
    }
    // This transaction's own messages for these brokers that are still in memory go in first;
    // one that cannot be written from here (it was queued outside the exception block that
    // deletes the broker) would be left without a broker.
    crate::triggers::pending::flush();
    if crate::triggers::pending::holds_broker(&ids) {
        errors::raise(
            errors::OBJECT_IN_USE,
            "cannot delete an MQTT broker inside an exception block of the transaction that queued messages for it",
            Some("Delete the broker outside the block (or in another transaction)."),
        );
    }
    let installed = catalog::installed_or_raise();
    let schema = &installed.schema;
    let sql = format!(
        "DELETE FROM {schema}.mqtt_outbox o WHERE o.broker_id OPERATOR(pg_catalog.=) ANY ($1) \
         AND NOT EXISTS (SELECT FROM {schema}.mqtt_broker b WHERE b.id OPERATOR(pg_catalog.=) o.broker_id)"
    );
    let sql = std::ffi::CString::new(sql).expect("no NUL in the statement");
    // SAFETY: SPI calls between SPI_connect and SPI_finish (Spi::connect_mut), with a plan
    // prepared here for one int4[] argument and that argument's datum.
    Spi::connect_mut(|_client| unsafe {
        let mut argtypes = [pg_sys::INT4ARRAYOID];
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), 1, argtypes.as_mut_ptr());
        if plan.is_null() {
            errors::raise(
                errors::NOT_IN_PREREQUISITE_STATE,
                "mqtt_pg could not prepare the cascade of a deleted broker",
                None,
            );
        }
        let mut values = [pgrx::IntoDatum::into_datum(ids).expect("an array datum")];
        let nulls = [b' ' as std::ffi::c_char];
        let (test, crosscheck) = if pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 {
            // as ri_PerformCheck: our own work visible, then the latest committed state
            // checked against the transaction's snapshot
            pg_sys::CommandCounterIncrement();
            (
                pg_sys::GetLatestSnapshot(),
                pg_sys::GetTransactionSnapshot(),
            )
        } else {
            (std::ptr::null_mut(), std::ptr::null_mut())
        };
        let rc = pg_sys::SPI_execute_snapshot(
            plan,
            values.as_mut_ptr(),
            nulls.as_ptr(),
            test,
            crosscheck,
            false,
            true,
            0,
        );
        if rc != pg_sys::SPI_OK_DELETE as i32 {
            errors::raise(
                errors::NOT_IN_PREREQUISITE_STATE,
                format!("mqtt_pg could not delete the queued messages of a deleted broker (SPI code {rc})"),
                None,
            );
        }
        pg_sys::SPI_freeplan(plan);
    });
}
