//! Catalog look-ups the extension needs: its own schema, and the list of databases.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::prelude::*;
use pgrx::spi::quote_identifier;

use crate::errors;

/// What the extension's catalog rows say, kept per backend (shared by reference: the hot
/// paths ask for it on every call).
pub struct Installed {
    pub oid: pg_sys::Oid,
    /// Quoted, for building schema-qualified SQL.
    pub schema: String,
    /// The role that owns the extension (and so its tables).
    pub owner: pg_sys::Oid,
    /// mqtt_outbox_id_seq: messages take their outbox id when queued (see triggers::pending).
    pub outbox_seq: pg_sys::Oid,
    /// `pg_extension.extversion`: the version of the SQL objects, which lags behind this
    /// library's own between installing a new release and `ALTER EXTENSION mqtt_pg UPDATE`.
    pub version: String,
}

/// The version of the SQL objects this library is built for (Cargo.toml's, as in the install
/// script's name `mqtt_pg--VERSION.sql`).
pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

impl Installed {
    /// Do the SQL objects match this library? While they do not, the library must not touch
    /// them: tables, columns and functions may differ from what its code expects.
    pub fn current(&self) -> bool {
        self.version == LIBRARY_VERSION
    }
}

/// One statement of one (sub)transaction, as far as this backend's own changes go: a look-up
/// made under the same stamp may be used again. That is what lets `mqtt_publish` run 100,000
/// times in one statement without 100,000 look-ups. The stamp moves on with every query the
/// client sends (a string of several statements counts as one: a concurrent change of the
/// default broker can be seen one string late), every subtransaction (a lock taken in a rolled-back one is gone), every utility
/// statement (DDL such as DROP EXTENSION, also inside a function; see `ddl`) and every write to
/// mqtt_broker or mqtt_topic (their statement triggers call [`forget`]). A concurrent commit
/// seen one statement late is as good as not yet seen.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    xact: u64,
    subxact: pg_sys::SubTransactionId,
    statement: pg_sys::TimestampTz,
    generation: u64,
}

thread_local! {
    /// Keyed by oid so a DROP/CREATE EXTENSION is noticed.
    static SCHEMA: RefCell<Option<Rc<Installed>>> = const { RefCell::new(None) };
    /// The stamp under which SCHEMA was last confirmed.
    static CONFIRMED: Cell<Option<Stamp>> = const { Cell::new(None) };
    /// Counts transaction ends, so stamps of two transactions never compare equal.
    static XACTS: Cell<u64> = const { Cell::new(0) };
    /// Bumped by [`forget`].
    static GENERATION: Cell<u64> = const { Cell::new(0) };
}

/// Forget every look-up made under the current stamp: the catalog or mqtt_broker may have
/// changed in this transaction.
pub fn forget() {
    GENERATION.set(GENERATION.get().wrapping_add(1));
}

/// Register the transaction-end counter. Called once, from `_PG_init`.
pub fn init() {
    // SAFETY: _PG_init runs once per process; the callback only bumps a counter.
    unsafe { pg_sys::RegisterXactCallback(Some(xact_end), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            | pg_sys::XactEvent::XACT_EVENT_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
            | pg_sys::XactEvent::XACT_EVENT_PREPARE
    ) {
        XACTS.set(XACTS.get().wrapping_add(1));
    }
}

/// The current statement's stamp (see [`Stamp`]).
pub fn stamp() -> Stamp {
    // SAFETY: plain reads of the transaction state.
    unsafe {
        Stamp {
            xact: XACTS.get(),
            subxact: pg_sys::GetCurrentSubTransactionId(),
            statement: pg_sys::GetCurrentStatementStartTimestamp(),
            generation: GENERATION.get(),
        }
    }
}

/// The extension's oid and quoted schema, if it is installed in this database.
pub fn extension() -> Option<(pg_sys::Oid, String)> {
    installed().map(|i| (i.oid, i.schema.clone()))
}

/// The role that owns the extension (and so its tables): the superuser who created it.
pub fn extension_owner() -> pg_sys::Oid {
    installed_or_raise().owner
}

/// The extension's catalog facts, or an error saying it is not installed in this database or
/// that its SQL objects are of another version than this library (see [`require_current`]).
pub fn installed_or_raise() -> Rc<Installed> {
    let installed = installed().unwrap_or_else(|| {
        errors::raise(
            errors::NOT_IN_PREREQUISITE_STATE,
            "extension \"mqtt_pg\" is not installed in this database",
            Some("Run CREATE EXTENSION mqtt_pg;"),
        )
    });
    require_current(&installed);
    installed
}

/// Refuse to run this library's code against SQL objects of another version: after a new
/// release is installed (and the server restarted), the old version's functions call into the
/// new library until `ALTER EXTENSION mqtt_pg UPDATE`. Install and update scripts may call it
/// meanwhile: they are what brings the objects up to date.
pub fn require_current(installed: &Installed) {
    // SAFETY: a plain read of a backend global.
    if installed.current() || unsafe { pg_sys::creating_extension } {
        return;
    }
    errors::raise(
        errors::NOT_IN_PREREQUISITE_STATE,
        format!(
            "extension \"mqtt_pg\" is at version {} in this database, but the installed library is version {LIBRARY_VERSION}",
            installed.version
        ),
        Some("Run ALTER EXTENSION mqtt_pg UPDATE; (the worker sends and receives nothing until then)."),
    )
}

/// The extension's catalog facts, if it is installed here; looked up once per statement.
pub fn installed() -> Option<Rc<Installed>> {
    let now = stamp();
    if CONFIRMED.get() == Some(now) {
        if let Some(hit) = SCHEMA.with(|c| c.borrow().clone()) {
            return Some(hit);
        }
    }
    // SAFETY: get_extension_oid only reads the catalog; missing_ok = true never raises.
    let oid = unsafe { pg_sys::get_extension_oid(c"mqtt_pg".as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        CONFIRMED.set(None);
        return None;
    }
    // A cached look-up of another version is read again: ALTER EXTENSION UPDATE keeps the oid.
    if let Some(hit) = SCHEMA.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|i| i.oid == oid && i.current())
            .cloned()
    }) {
        CONFIRMED.set(Some(now));
        return Some(hit);
    }
    let row = Spi::connect(|client| {
        let rows = client
            .select(
                "SELECT n.nspname::text, e.extowner, \
           pg_catalog.to_regclass(pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.mqtt_outbox_id_seq')::pg_catalog.oid, \
           e.extversion \
         FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
         WHERE e.oid OPERATOR(pg_catalog.=) $1",
                Some(1),
                &[oid.into()],
            )
            .ok()?;
        let row = rows.first();
        Some((
            row.get::<String>(1).ok().flatten()?,
            row.get::<pg_sys::Oid>(2).ok().flatten()?,
            row.get::<pg_sys::Oid>(3).ok().flatten(),
            row.get::<String>(4).ok().flatten().unwrap_or_default(),
        ))
    })?;
    let (name, owner, seq, version) = row;
    let hit = Rc::new(Installed {
        oid,
        schema: quote_identifier(name),
        owner,
        outbox_seq: seq.unwrap_or(pg_sys::InvalidOid),
        version,
    });
    SCHEMA.with(|c| *c.borrow_mut() = Some(hit.clone()));
    CONFIRMED.set(Some(now));
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

/// The schema, or an error saying the extension is not installed in this database (or not
/// at this library's version).
pub fn schema() -> String {
    installed_or_raise().schema.clone()
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
