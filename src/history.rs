//! `mqtt_message_history`'s daily partitions: making them, dropping them, and restoring them.
//!
//! The history is partitioned by day (UTC) so that retention drops whole partitions (see
//! `worker::maintenance`). Each day's partition is made a member of the extension and one of
//! its configuration tables, as if the install script had made it:
//! - `pg_dump` then dumps its rows and not its definition. A partition dumped as an ordinary
//!   table would not restore as the database owner (attaching it needs the history table's
//!   owner, a superuser), nor into a database whose worker has made the same day already.
//! - A restore writes those rows with `COPY mqtt_message_history_YYYYMMDD FROM stdin`; when
//!   the target database lacks that day, [`before_copy`] makes it first.
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
/// extension; false when another session made it meanwhile. Must run as a role that may (the
/// worker; the extension owner for a restore).
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

/// Before `COPY mqtt_message_history_YYYYMMDD FROM ...` (a restore of a dump) into a database
/// that has no partition for that day: make it, so the rows go where they came from. Anything
/// else is left to PostgreSQL (a missing table of another name fails as it always does).
///
/// # Safety
/// `stmt` must be null or a valid utility statement node.
pub unsafe fn before_copy(stmt: *mut pg_sys::Node) {
    // SAFETY: the node tag is checked before the cast; names are NUL-terminated strings.
    let (schema, name) = unsafe {
        if stmt.is_null() || !pgrx::is_a(stmt, pg_sys::NodeTag::T_CopyStmt) {
            return;
        }
        let copy = stmt as *mut pg_sys::CopyStmt;
        if !(*copy).is_from || (*copy).relation.is_null() {
            return;
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
    let Some(day) = partition_day(&name) else {
        return;
    };
    // SAFETY: a plain read of the transaction state.
    if !unsafe { pg_sys::IsTransactionState() } {
        return;
    }
    let Some(installed) = catalog::installed().filter(|i| i.current()) else {
        return;
    };
    if schema.is_some_and(|s| pgrx::spi::quote_identifier(s) != installed.schema) {
        return;
    }
    // The day as bounds, unless the partition exists after all (or the name is no real day).
    let wanted = Spi::get_three_with_args::<bool, String, String>(
        "SELECT pg_catalog.to_regclass($1) IS NULL \
                AND pg_catalog.to_char(x.d, 'YYYYMMDD') OPERATOR(pg_catalog.=) $2, \
                (x.d::timestamp AT TIME ZONE 'UTC')::text, \
                ((x.d OPERATOR(pg_catalog.+) 1)::timestamp AT TIME ZONE 'UTC')::text \
         FROM (SELECT pg_catalog.to_date($2, 'YYYYMMDD') AS d) x",
        &[
            format!(
                "{}.{}",
                installed.schema,
                pgrx::spi::quote_identifier(&name)
            )
            .into(),
            day.into(),
        ],
    );
    let Ok((Some(true), Some(lo), Some(hi))) = wanted else {
        return;
    };
    // The restoring role (the database owner) cannot attach a partition to a table it does not
    // own: the extension's owner makes it, with its fixed name, bounds and grants.
    let made = crate::security::as_extension_owner(|| create_partition(&name, &lo, &hi));
    if let Err(e) = made {
        warning!("mqtt_pg could not make partition {name} for the rows being restored: {e}");
    }
}

/// `YYYYMMDD` of a daily partition's name, if `name` is one.
fn partition_day(name: &str) -> Option<String> {
    let day = name.strip_prefix("mqtt_message_history_")?;
    (day.len() == 8 && day.bytes().all(|b| b.is_ascii_digit())).then(|| day.to_string())
}
