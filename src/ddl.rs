//! Stepping aside for DDL that needs a database to itself, and refusing DDL that would pull the
//! extension's schema from under it.
//!
//! `DROP DATABASE` and `ALTER DATABASE ... RENAME` refuse to run while any other session is
//! connected to the database, and our worker always is. Odoo's database manager drops
//! databases routinely, so a ProcessUtility hook asks the worker to leave first: it sends it
//! SIGTERM and tells the launcher not to start a new one for a while. Postgres itself waits up
//! to five seconds for other sessions to go, which is ample for the worker. If the command then
//! fails (another user is still connected), the launcher starts the worker again after the pause.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem::{self, DbState, SHARED};

/// How long the launcher keeps away from a database we stepped aside for: longer than the five
/// seconds DROP DATABASE waits for other sessions.
const STEP_ASIDE_US: i64 = 10_000_000;

static mut PREV_HOOK: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: called once from _PG_init in the postmaster, before any backend exists; we keep
    // and call the previous hook, as every extension installing this hook must.
    unsafe {
        PREV_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// The value of option `name` in a statement's DefElem list, if present.
///
/// # Safety
/// `options` must be null or a valid List of DefElem nodes.
unsafe fn option(options: *mut pg_sys::List, name: &CStr) -> Option<&'static CStr> {
    if options.is_null() {
        return None;
    }
    unsafe {
        for i in 0..(*options).length as usize {
            let def = (*(*options).elements.add(i)).ptr_value as *mut pg_sys::DefElem;
            if !def.is_null() && !(*def).defname.is_null() && CStr::from_ptr((*def).defname) == name
            {
                // `TEMPLATE DEFAULT` has no value: not a database we serve. Otherwise
                // defGetString is what createdb/alterdb themselves use on these options.
                if (*def).arg.is_null() {
                    return None;
                }
                return Some(CStr::from_ptr(pg_sys::defGetString(def)));
            }
        }
    }
    None
}

/// The database a statement needs exclusive use of, if any: DROP DATABASE, ALTER DATABASE
/// RENAME, ALTER DATABASE SET TABLESPACE, and CREATE DATABASE ... TEMPLATE (Odoo's
/// "Duplicate database").
///
/// # Safety
/// `stmt` must be a valid parse tree node or null.
unsafe fn exclusive_database(stmt: *mut pg_sys::Node) -> Option<&'static CStr> {
    if stmt.is_null() {
        return None;
    }
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreatedbStmt => {
                option((*(stmt as *mut pg_sys::CreatedbStmt)).options, c"template")
            }
            pg_sys::NodeTag::T_AlterDatabaseStmt => {
                let s = stmt as *mut pg_sys::AlterDatabaseStmt;
                option((*s).options, c"tablespace")
                    .and((!(*s).dbname.is_null()).then(|| CStr::from_ptr((*s).dbname)))
            }
            pg_sys::NodeTag::T_DropdbStmt => {
                let s = stmt as *mut pg_sys::DropdbStmt;
                (!(*s).dbname.is_null()).then(|| CStr::from_ptr((*s).dbname))
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let s = stmt as *mut pg_sys::RenameStmt;
                ((*s).renameType == pg_sys::ObjectType::OBJECT_DATABASE && !(*s).subname.is_null())
                    .then(|| CStr::from_ptr((*s).subname))
            }
            _ => None,
        }
    }
}

/// Whether the current user owns the database (superusers own everything).
///
/// # Safety
/// A catalog look-up: call inside a transaction.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
unsafe fn owns_database(oid: pg_sys::Oid) -> bool {
    unsafe { pg_sys::pg_database_ownercheck(oid, pg_sys::GetUserId()) }
}

/// Whether the current user owns the database (superusers own everything).
///
/// # Safety
/// A catalog look-up: call inside a transaction.
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
unsafe fn owns_database(oid: pg_sys::Oid) -> bool {
    unsafe { pg_sys::object_ownercheck(pg_sys::DatabaseRelationId, oid, pg_sys::GetUserId()) }
}

/// Ask the worker of `dbname` (if any) to leave the database, but only when the command can
/// succeed as far as we can tell: run by the database's owner (or a superuser) and outside a
/// transaction block. Anyone else would otherwise knock MQTT offline with a command that then
/// fails on its own checks.
fn step_aside(dbname: &CStr) {
    // SAFETY: catalog look-ups and plain reads of this backend's state; missing_ok = true
    // never raises.
    let (oid, allowed) = unsafe {
        let oid = pg_sys::get_database_oid(dbname.as_ptr(), true);
        let allowed =
            oid != pg_sys::InvalidOid && !pg_sys::IsTransactionBlock() && owns_database(oid);
        (oid, allowed)
    };
    if !allowed {
        return;
    }
    let pid = {
        let mut shared = SHARED.exclusive();
        let Some(slot) = shared.db_mut(oid.to_u32()) else {
            return;
        };
        let pid = if slot.state == DbState::Running {
            slot.pid
        } else {
            0
        };
        // Wanted, not Starting: a worker the launcher is starting right now finds the slot no
        // longer Starting and leaves without connecting.
        slot.state = DbState::Wanted;
        slot.pid = 0;
        slot.latch = 0;
        slot.not_before_us = shmem::now_us() + STEP_ASIDE_US;
        pid
    };
    if pid > 0 {
        // SAFETY: signalling our own worker process; SIGTERM makes it leave its loop and exit.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Refuse `ALTER SCHEMA ... RENAME` of the schema mqtt_pg lives in, and (below superuser) its
/// `DROP SCHEMA`. The extension's SQL bodies, its backends and its worker name their objects by
/// schema name; in PostgreSQL 15 the database owner owns `public`, and a schema renamed, or
/// dropped (taking the extension with it), could be replaced by one of its own with tables,
/// views and functions of the same names, for a backend or the worker that still has the name
/// to run as a superuser.
///
/// # Safety
/// `stmt` must be a valid parse tree node or null; call inside a transaction.
unsafe fn guard_extension_schema(stmt: *mut pg_sys::Node) {
    unsafe {
        if stmt.is_null() || !pg_sys::IsTransactionState() {
            return;
        }
        let (names, verb): (Vec<*mut std::ffi::c_char>, &str) = match (*stmt).type_ {
            pg_sys::NodeTag::T_RenameStmt => {
                let s = stmt as *mut pg_sys::RenameStmt;
                if (*s).renameType != pg_sys::ObjectType::OBJECT_SCHEMA || (*s).subname.is_null() {
                    return;
                }
                (vec![(*s).subname], "rename")
            }
            pg_sys::NodeTag::T_DropStmt => {
                let s = stmt as *mut pg_sys::DropStmt;
                if (*s).removeType != pg_sys::ObjectType::OBJECT_SCHEMA
                    || (*s).objects.is_null()
                    || pg_sys::superuser()
                {
                    return;
                }
                let list = (*s).objects;
                let names = (0..(*list).length as usize)
                    .map(|i| (*(*list).elements.add(i)).ptr_value as *mut pg_sys::Node)
                    .filter(|n| !n.is_null() && (**n).type_ == pg_sys::NodeTag::T_String)
                    .map(|n| (*(n as *mut pg_sys::String)).sval)
                    .collect();
                (names, "drop")
            }
            _ => return,
        };
        let ours = Spi::get_one::<pg_sys::Oid>(
            "SELECT extnamespace FROM pg_catalog.pg_extension \
             WHERE extname OPERATOR(pg_catalog.=) 'mqtt_pg'",
        )
        .ok()
        .flatten();
        let Some(ours) = ours else { return };
        for name in names.into_iter().filter(|n| !n.is_null()) {
            if pg_sys::get_namespace_oid(name, true) == ours {
                crate::errors::raise(
                    crate::errors::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "cannot {verb} schema \"{}\": extension mqtt_pg is installed in it",
                        CStr::from_ptr(name).to_string_lossy()
                    ),
                    Some("mqtt_pg refers to its tables and functions by schema name. A superuser can DROP EXTENSION mqtt_pg first (and create it again in another schema)."),
                );
            }
        }
    }
}

/// Is `stmt` a COMMIT PREPARED?
/// SAFETY: `stmt` is a parse node or null.
unsafe fn commits_prepared(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the node tag is checked before the cast.
    unsafe {
        !stmt.is_null()
            && pgrx::is_a(stmt, pg_sys::NodeTag::T_TransactionStmt)
            && (*(stmt as *mut pg_sys::TransactionStmt)).kind
                == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // Read before the statement runs: a procedure that commits frees its own parse tree.
    // SAFETY: Postgres hands us a valid PlannedStmt; we only read its utility statement.
    let commit_prepared = unsafe { commits_prepared((*pstmt).utilityStmt) };
    // SAFETY: as above.
    unsafe {
        guard_extension_schema((*pstmt).utilityStmt);
        let mut read_only_tree = read_only_tree;
        let pstmt = crate::history::redirect_copy(pstmt, &mut read_only_tree);
        if let Some(db) = exclusive_database((*pstmt).utilityStmt) {
            step_aside(db);
        }
        match PREV_HOOK {
            Some(prev) => prev(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
    }
    // DDL may have changed what the extension looked up for this statement.
    crate::catalog::forget();
    // COMMIT PREPARED makes another transaction's messages visible, and no commit callback of
    // that transaction runs: wake the worker (at this statement's commit) to look at the whole
    // outbox, as it does for rows whose ids it is not told.
    if commit_prepared && crate::catalog::installed().is_some() {
        crate::wake::wake_at_commit(crate::shmem::WAKE_OUTBOX);
    }
    // COPY into a watched table fires its row triggers without an ExecutorFinish: queue their
    // messages now, as at the end of any other statement.
    crate::triggers::pending::flush();
}
