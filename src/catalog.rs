//! Catalog look-ups the extension needs: its own schema, and the list of databases.

use std::cell::RefCell;

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::errors;

thread_local! {
    /// (extension oid, quoted schema, owner). Keyed by oid so a DROP/CREATE EXTENSION is noticed.
    static SCHEMA: RefCell<Option<(pg_sys::Oid, String, pg_sys::Oid)>> = const { RefCell::new(None) };
}

/// The quoted schema mqtt_pg is installed in, for building schema-qualified SQL: a caller's
/// search_path must never change what the extension runs. None if it is not installed here.
pub fn extension_schema() -> Option<String> {
    extension().map(|(_, schema)| schema)
}

/// The extension's oid and quoted schema, if it is installed in this database.
pub fn extension() -> Option<(pg_sys::Oid, String)> {
    cached().map(|(oid, schema, _)| (oid, schema))
}

/// The role that owns the extension (and so its tables): the superuser who created it.
pub fn extension_owner() -> pg_sys::Oid {
    cached().map_or_else(
        || {
            errors::raise(
                errors::NOT_IN_PREREQUISITE_STATE,
                "extension \"mqtt_pg\" is not installed in this database",
                Some("Run CREATE EXTENSION mqtt_pg;"),
            )
        },
        |(_, _, owner)| owner,
    )
}

fn cached() -> Option<(pg_sys::Oid, String, pg_sys::Oid)> {
    // SAFETY: get_extension_oid only reads the catalog; missing_ok = true never raises.
    let oid = unsafe { pg_sys::get_extension_oid(c"mqtt_pg".as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return None;
    }
    if let Some(hit) = SCHEMA.with(|c| c.borrow().as_ref().filter(|(o, _, _)| *o == oid).cloned()) {
        return Some(hit);
    }
    let row = Spi::get_two_with_args::<String, pg_sys::Oid>(
        "SELECT n.nspname::text, e.extowner FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
         WHERE e.oid OPERATOR(pg_catalog.=) $1",
        &[oid.into()],
    )
    .ok()?;
    let (Some(name), Some(owner)) = row else {
        return None;
    };
    let hit = (oid, quote_identifier(name), owner);
    SCHEMA.with(|c| *c.borrow_mut() = Some(hit.clone()));
    Some(hit)
}

/// Is `rel` one of mqtt_pg's own tables (or sequences)? Unknown counts as yes: callers refuse.
pub fn is_extension_relation(rel: pg_sys::Oid) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_depend d \
           WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
             AND d.objid OPERATOR(pg_catalog.=) $1 AND d.deptype OPERATOR(pg_catalog.=) 'e' \
             AND d.refobjid OPERATOR(pg_catalog.=) (SELECT e.oid FROM pg_catalog.pg_extension e \
                                                   WHERE e.extname OPERATOR(pg_catalog.=) 'mqtt_pg'))",
        &[rel.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(true)
}

/// The schema, or an error saying the extension is not installed in this database.
pub fn schema() -> String {
    extension_schema().unwrap_or_else(|| {
        errors::raise(
            errors::NOT_IN_PREREQUISITE_STATE,
            "extension \"mqtt_pg\" is not installed in this database",
            Some("Run CREATE EXTENSION mqtt_pg;"),
        )
    })
}

/// Databases a worker may connect to, read straight from the shared catalog `pg_database`: the
/// launcher is connected to no database, so it cannot run SQL (autovacuum's launcher does the
/// same). Must run inside a transaction.
pub fn database_oids() -> Vec<u32> {
    let mut out = Vec::new();
    // SAFETY: a plain catalog heap scan under AccessShareLock inside a transaction, as
    // autovacuum's get_database_list() does; every tuple is a pg_database row.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tup.is_null() {
                break;
            }
            let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tup);
            // datconnlimit -2 marks a database whose DROP was interrupted: unusable.
            if (*form).datallowconn && !(*form).datistemplate && (*form).datconnlimit != -2 {
                out.push((*form).oid.to_u32());
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
    }
    out
}
