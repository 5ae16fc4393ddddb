//! `mqtt_message_history`'s daily partitions: making them, dropping them, and restoring them.
//!
//! The history is partitioned by day (UTC) so that retention drops whole partitions (see
//! `worker::maintenance`). Each day's partition is made a member of the extension and one of
//! its configuration tables, as if the install script had made it:
//! - `pg_dump` then dumps its rows and not its definition. A partition dumped as an ordinary
//!   table would not restore as the database owner (attaching it needs the history table's
//!   owner, a superuser), nor into a database whose worker has made the same day already.
//! - A restore writes those rows with `COPY mqtt_message_history_YYYYMMDD FROM stdin`;
//!   [`redirect_copy`] sends them through the history table instead, so each row lands in the
//!   partition that covers its day in the restored database (or its default partition).
//!
//! PostgreSQL records membership for objects made while `creating_extension` is set, and
//! `pg_extension_config_dump` only works then; [`as_member`] sets it for the one call that
//! makes a partition, as `CREATE EXTENSION` does for its script.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog;

/// Run `f` as if inside the extension's own install script: what it creates belongs to the
/// extension. The flags go back as they were however `f` ends (an ERROR unwinds through here).
fn as_member<R>(extension: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore(bool, pg_sys::Oid);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: puts back the two backend globals saved below.
            unsafe {
                pg_sys::creating_extension = self.0;
                pg_sys::CurrentExtensionObject = self.1;
            }
        }
    }
    // SAFETY: plain backend globals, read and set on the main thread; restored by `Restore`.
    let _restore = unsafe {
        let saved = Restore(pg_sys::creating_extension, pg_sys::CurrentExtensionObject);
        pg_sys::creating_extension = true;
        pg_sys::CurrentExtensionObject = extension;
        saved
    };
    f()
}

/// Make the daily partition `part` for [`lo`, `hi`) (timestamptz text), a member of the
/// extension; false when it exists already. Only the worker calls it.
pub fn create_partition(part: &str, lo: &str, hi: &str) -> Result<bool, String> {
    let installed = catalog::installed_or_raise();
    let schema = &installed.schema;
    as_member(installed.oid, || {
        Spi::get_one_with_args::<bool>(
            &format!(
                "SELECT {schema}._mqtt_history_partition_create($1, $2::pg_catalog.timestamptz, \
                 $3::pg_catalog.timestamptz)"
            ),
            &[part.into(), lo.into(), hi.into()],
        )
        .map(|made| made.unwrap_or(false))
        .map_err(|e| e.to_string())
    })
}

/// A restore of a dump writes history with `COPY mqtt_message_history_YYYYMMDD FROM stdin` (and
/// `mqtt_message_history_default`): the partitions are configuration tables of the extension.
/// The restored database has partitions of its own days, and its default partition may not take
/// a row a day partition covers there. So such a COPY goes to the history table itself, which
/// sends each row to the partition that covers it now. Only for names of our partitions in the
/// extension's schema that are missing or are partitions of the history table; the caller's
/// privileges are checked on the history table as for any COPY. Returns the statement to run
/// (a copy when the tree was read-only and had to change).
///
/// # Safety
/// `pstmt` must be a valid PlannedStmt of a utility statement.
pub unsafe fn redirect_copy(
    pstmt: *mut pg_sys::PlannedStmt,
    read_only: &mut bool,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: the node tag is checked before the cast; names are NUL-terminated strings.
    let (schema, name) = unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || !pgrx::is_a(stmt, pg_sys::NodeTag::T_CopyStmt) {
            return pstmt;
        }
        let copy = stmt as *mut pg_sys::CopyStmt;
        if !(*copy).is_from || (*copy).relation.is_null() {
            return pstmt;
        }
        let rel = (*copy).relation;
        let name = CStr::from_ptr((*rel).relname)
            .to_string_lossy()
            .into_owned();
        let schema = (!(*rel).schemaname.is_null()).then(|| {
            CStr::from_ptr((*rel).schemaname)
                .to_string_lossy()
                .into_owned()
        });
        (schema, name)
    };
    if !is_partition_name(&name) {
        return pstmt;
    }
    // SAFETY: a plain read of the transaction state.
    if !unsafe { pg_sys::IsTransactionState() } {
        return pstmt;
    }
    let Some(installed) = catalog::installed().filter(|i| i.current()) else {
        return pstmt;
    };
    if schema
        .as_ref()
        .is_some_and(|s| pgrx::spi::quote_identifier(s) != installed.schema)
    {
        return pstmt;
    }
    // Missing, or one of the history table's partitions: then the raw name of the schema.
    let target = Spi::get_one_with_args::<String>(
        "SELECT n.nspname::text FROM pg_catalog.pg_extension e \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
         WHERE e.oid OPERATOR(pg_catalog.=) $1 \
           AND (pg_catalog.to_regclass($2) IS NULL \
                OR EXISTS (SELECT FROM pg_catalog.pg_inherits i \
                           WHERE i.inhrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($2) \
                             AND i.inhparent OPERATOR(pg_catalog.=) pg_catalog.to_regclass($3)))",
        &[
            installed.oid.into(),
            format!(
                "{}.{}",
                installed.schema,
                pgrx::spi::quote_identifier(&name)
            )
            .into(),
            format!("{}.mqtt_message_history", installed.schema).into(),
        ],
    );
    let Ok(Some(nspname)) = target else {
        return pstmt;
    };
    let (Ok(nsp), Ok(parent)) = (
        std::ffi::CString::new(nspname),
        std::ffi::CString::new("mqtt_message_history"),
    ) else {
        return pstmt;
    };
    // SAFETY: a read-only tree is copied before it changes, as ProcessUtility's contract asks;
    // the new names are palloc'd in the statement's memory context, like the parser's.
    unsafe {
        let pstmt = if *read_only {
            *read_only = false;
            pg_sys::copyObjectImpl(pstmt as *const std::ffi::c_void) as *mut pg_sys::PlannedStmt
        } else {
            pstmt
        };
        let copy = (*pstmt).utilityStmt as *mut pg_sys::CopyStmt;
        let rel = (*copy).relation;
        (*rel).schemaname = pg_sys::pstrdup(nsp.as_ptr());
        (*rel).relname = pg_sys::pstrdup(parent.as_ptr());
        pstmt
    }
}

/// Is `name` one our history partitions may have: `mqtt_message_history_default`, or
/// `mqtt_message_history_YYYYMMDD`, possibly with `_2` .. `_9` (see `_mqtt_history_plan`)?
fn is_partition_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("mqtt_message_history_") else {
        return false;
    };
    if rest == "default" {
        return true;
    }
    let (day, suffix) = rest.split_at(rest.len().min(8));
    day.len() == 8
        && day.bytes().all(|b| b.is_ascii_digit())
        && (suffix.is_empty()
            || (suffix.len() == 2
                && suffix.starts_with('_')
                && suffix.as_bytes()[1].is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::is_partition_name;

    #[test]
    fn partition_names() {
        for ok in [
            "mqtt_message_history_default",
            "mqtt_message_history_20261207",
            "mqtt_message_history_20261207_2",
        ] {
            assert!(is_partition_name(ok), "{ok}");
        }
        for no in [
            "mqtt_message_history",
            "mqtt_message_history_",
            "mqtt_message_history_2026120",
            "mqtt_message_history_2026120x",
            "mqtt_message_history_20261207_",
            "mqtt_message_history_20261207_10",
            "mqtt_message_history_text",
            "mqtt_outbox",
        ] {
            assert!(!is_partition_name(no), "{no}");
        }
    }
}
