//! Statements the hot paths run over and over, prepared once per backend.
//!
//! Parsing and planning a statement costs more than running it on a few rows: the worker's
//! delivery statements and the outbox INSERT of `mqtt_publish` would spend most of their time
//! there. A plan is kept per statement and per extension (by oid: a DROP and CREATE EXTENSION
//! gets new tables, so new plans); PostgreSQL re-plans a kept plan by itself when a table it
//! uses changes. Statements are schema-qualified, so a caller's search_path cannot change them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::mem::ManuallyDrop;

use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;

type Entry = (pg_sys::Oid, ManuallyDrop<Box<OwnedPreparedStatement>>);

thread_local! {
    /// Boxed, so a plan stays where it is while the map grows. Never dropped at process exit:
    /// freeing plans then would be pointless and unsafe.
    static PLANS: RefCell<HashMap<&'static str, Entry>> = RefCell::new(HashMap::new());
}

/// Run `f` with the plan of statement `key`, preparing it (from `sql`, with argument types
/// `types`) the first time in this backend, or when the extension is a new one.
pub fn with_plan<'c, R>(
    client: &mut SpiClient<'c>,
    extension: pg_sys::Oid,
    key: &'static str,
    types: &[PgOid],
    sql: impl FnOnce() -> String,
    f: impl FnOnce(&mut SpiClient<'c>, &OwnedPreparedStatement) -> R,
) -> R {
    let fresh = PLANS.with(|p| {
        p.borrow()
            .get(key)
            .is_some_and(|(oid, _)| *oid == extension)
    });
    if !fresh {
        let prepared = client
            .prepare_mut(sql().as_str(), types)
            .unwrap_or_else(|e| error!("mqtt_pg could not prepare a statement ({key}): {e}"))
            .keep();
        let old = PLANS.with(|p| {
            p.borrow_mut()
                .insert(key, (extension, ManuallyDrop::new(Box::new(prepared))))
        });
        if let Some((_, mut old)) = old {
            // SAFETY: dropped once, here; nothing else holds it any more.
            unsafe { ManuallyDrop::drop(&mut old) };
        }
    }
    // Not borrowed while `f` runs: `f` may run statements that use other plans.
    let plan: *const OwnedPreparedStatement = PLANS.with(|p| {
        let p = p.borrow();
        let (_, plan) = p.get(key).expect("prepared above");
        &***plan as *const OwnedPreparedStatement
    });
    // SAFETY: the box is freed only when a later call replaces this key's plan for another
    // extension, which cannot happen while this statement of the same extension runs.
    f(client, unsafe { &*plan })
}
