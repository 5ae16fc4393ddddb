//! Security: who may publish and subscribe (`mqtt_access_control`), broker secrets that can be
//! written but never read back, and the one place where the extension acts with its own
//! privileges on behalf of a caller.
//!
//! The rules, not table privileges, are the permission to publish and subscribe: a role with a
//! matching rule needs no privilege on `mqtt_outbox` or `mqtt_topic`. So the public functions
//! check the rule as the caller and then write the row as the extension's owner, the way
//! PostgreSQL's own foreign-key triggers act as the table owner. That switch happens only here,
//! around statements whose text is fixed and schema-qualified, and never around anything a user
//! defined.

pub mod access;
pub mod broker_row;
pub mod secrets;

use pgrx::pg_sys;

use crate::catalog;

/// The role running the current statement (the caller, not a SECURITY DEFINER owner).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: a plain read of the backend's current user id.
    unsafe { pg_sys::GetUserId() }
}

/// Is `role` a superuser?
pub fn is_superuser(role: pg_sys::Oid) -> bool {
    // SAFETY: a syscache look-up; a role that does not exist is simply not a superuser.
    unsafe { pg_sys::superuser_arg(role) }
}

/// Run `f` as the owner of the extension's tables, in a restricted security context (no SET
/// ROLE, no temporary objects inside) and with search_path pinned to pg_catalog, as a SECURITY
/// DEFINER function with `SET search_path` runs: the caller's search_path could otherwise put
/// a function of theirs named like a built-in in front of it. An ERROR inside unwinds the
/// (sub)transaction, which restores the caller's identity and settings on its own.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    as_role(catalog::extension_owner(), c"pg_catalog, pg_temp", f)
}

/// Run `f` as `role` with `search_path`, in a restricted security context, as
/// [`as_extension_owner`] does. Settings `f` changes (SET or SET LOCAL in a handler) end with it.
pub fn as_role<R>(role: pg_sys::Oid, search_path: &std::ffi::CStr, f: impl FnOnce() -> R) -> R {
    // Settings `f` changes go back with the search_path: with `true` a session-level SET in a
    // handler would outlive `f` and stay in force for whatever the caller (the worker) runs
    // next (see gucs::with_settings).
    crate::gucs::with_settings(&[(c"search_path", search_path)], || {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0i32;
        // SAFETY: save and set this backend's user id and security context, as ri_triggers.c
        // does around its queries; the saved pair is put back below, and transaction abort
        // puts it back if `f` raises.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            pg_sys::SetUserIdAndSecContext(
                role,
                saved_context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        let out = f();
        // SAFETY: restores what was saved above.
        unsafe { pg_sys::SetUserIdAndSecContext(saved_user, saved_context) };
        out
    })
}
