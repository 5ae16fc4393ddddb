//! `mqtt_wait_for_reply(correlation_data bytea, timeout interval)`: MQTT 5 request/response.
//! The request was published (with a response topic and this correlation data) in an earlier
//! transaction; the reply arrives whenever the responder sends it and the worker commits it to
//! `mqtt_message_history`. This waits for that row and returns it (NULL after `timeout`).
//!
//! Fresh snapshots. Odoo runs its transactions at REPEATABLE READ: every query of the waiting
//! transaction sees the database as it was at its first query, so a reply committed after that
//! would never show up, however long a plain SELECT loop waited. Each look-up therefore runs
//! with the latest snapshot (`GetLatestSnapshot`), through `SPI_execute_snapshot`, which is how
//! PostgreSQL's own foreign keys look past a REPEATABLE READ snapshot (`ri_PerformCheck`). It
//! is one read-only query on one table; the rest of the transaction keeps its snapshot. (Under
//! SERIALIZABLE the serializable-snapshot machinery may count the newer row as a conflict and
//! fail the transaction with 40001, to be retried, as it does for foreign key checks.)
//!
//! Rights. The function is SECURITY INVOKER and the look-up is an ordinary query run as the
//! caller: without SELECT on `mqtt_message_history` it fails with 42501 at the first look-up,
//! before any wait, and row-level security on the table, if a DBA turns it on, filters what it
//! finds. Nothing is read as the extension's owner.
//!
//! Waiting. Between look-ups the backend sleeps on its latch for a few milliseconds, so query
//! cancel, statement_timeout and termination end the wait at once (CHECK_FOR_INTERRUPTS before
//! every look-up) and a waiting session costs one index probe per partition per interval. The
//! look-up is the partial expression index `mqtt_message_history_correlation` (schema.sql), in
//! every day partition of the history unless `since` says from when replies count (then the
//! partitions before it are pruned).

use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::IntoDatum;

use crate::catalog;
use crate::errors::{self, INVALID_PARAMETER};

/// Pause between look-ups: short, as a reply usually comes within milliseconds, and longer
/// once the wait has lasted a while, so that long waits in many sessions stay cheap.
const FIRST_POLL_MS: i64 = 10;
const LATER_POLL_MS: i64 = 100;
const FIRST_POLLS_FOR_US: i64 = 1_000_000;

/// `mqtt_wait_for_reply(correlation_data bytea, timeout interval DEFAULT '10 seconds')
/// RETURNS mqtt_message_history`: see the module documentation. A C-language function (declared
/// in finalize.sql) because what it returns is the composite datum the fresh-snapshot query
/// produced, copied out of SPI as it is.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn mqtt_wait_for_reply(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: the function manager's call info for (bytea, interval, timestamptz), as
    // declared; `since` is read as the raw microseconds of a timestamptz.
    let (correlation, timeout, since) = unsafe {
        (
            pgrx::pg_getarg::<Vec<u8>>(fcinfo, 0),
            pgrx::pg_getarg::<Interval>(fcinfo, 1),
            pgrx::pg_getarg::<pg_sys::TimestampTz>(fcinfo, 2),
        )
    };
    let correlation = checked_correlation(correlation);
    let timeout_us = checked_timeout(timeout);
    let installed = catalog::installed_or_raise();
    // With `since`, replies stored before it do not count (a request's correlation data
    // reused, or a reply seeded in advance), and the day partitions before it are pruned at
    // each look-up instead of probed.
    let sql = format!(
        "SELECT h FROM {schema}.mqtt_message_history h \
         WHERE h.direction OPERATOR(pg_catalog.=) 'receive' \
           AND h.properties OPERATOR(pg_catalog.?) 'correlation_data' \
           AND (h.properties OPERATOR(pg_catalog.->>) 'correlation_data') OPERATOR(pg_catalog.=) $1 \
           {since} \
         ORDER BY h.\"timestamp\" DESC, h.id DESC LIMIT 1",
        schema = installed.schema,
        since = if since.is_some() {
            "AND h.\"timestamp\" OPERATOR(pg_catalog.>=) $2"
        } else {
            ""
        }
    );
    // History keeps correlation data as lower-case hex (MessageProperties::to_json).
    let hex = mqtt_pg_core::properties::to_hex(&correlation);
    // SAFETY: a plain read of the clock.
    let started = unsafe { pg_sys::GetCurrentTimestamp() };
    let deadline = started.saturating_add(timeout_us);
    let found = Spi::connect_mut(|_client| {
        let sql = std::ffi::CString::new(sql).expect("no NUL in the statement");
        // SAFETY: SPI calls between SPI_connect and SPI_finish (Spi::connect_mut); the plan is
        // prepared here for one text argument and freed with the connection; every tuple
        // table is freed before the next look-up.
        unsafe {
            let mut argtypes = [pg_sys::TEXTOID, pg_sys::TIMESTAMPTZOID];
            let nargs = if since.is_some() { 2 } else { 1 };
            let plan = pg_sys::SPI_prepare(sql.as_ptr(), nargs, argtypes.as_mut_ptr());
            if plan.is_null() {
                errors::raise(
                    errors::NOT_IN_PREREQUISITE_STATE,
                    "mqtt_pg could not prepare the look-up of replies",
                    None,
                );
            }
            let mut values = [
                hex.into_datum().expect("a text datum"),
                pg_sys::Datum::from(since.unwrap_or(0)),
            ];
            let nulls = [b' ' as std::ffi::c_char, b' ' as std::ffi::c_char];
            loop {
                pgrx::check_for_interrupts!();
                // Read-only with this snapshot exactly: rows committed up to now, whatever
                // the transaction's own snapshot is (see the module documentation).
                let rc = pg_sys::SPI_execute_snapshot(
                    plan,
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    pg_sys::GetLatestSnapshot(),
                    std::ptr::null_mut(),
                    true,
                    false,
                    1,
                );
                if rc != pg_sys::SPI_OK_SELECT as i32 {
                    errors::raise(
                        errors::NOT_IN_PREREQUISITE_STATE,
                        format!("mqtt_pg could not look replies up (SPI code {rc})"),
                        None,
                    );
                }
                let table = pg_sys::SPI_tuptable;
                if pg_sys::SPI_processed > 0 && !table.is_null() {
                    let mut isnull = false;
                    let row =
                        pg_sys::SPI_getbinval(*(*table).vals, (*table).tupdesc, 1, &mut isnull);
                    // Copied into the caller's memory, where it outlives SPI_finish.
                    let row = (!isnull).then(|| pg_sys::SPI_datumTransfer(row, false, -1));
                    pg_sys::SPI_freetuptable(table);
                    if row.is_some() {
                        break row;
                    }
                } else if !table.is_null() {
                    pg_sys::SPI_freetuptable(table);
                }
                let now = pg_sys::GetCurrentTimestamp();
                if now >= deadline {
                    break None;
                }
                let poll = if now - started < FIRST_POLLS_FOR_US {
                    FIRST_POLL_MS
                } else {
                    LATER_POLL_MS
                };
                let wait_ms = poll.min((deadline - now + 999) / 1_000).max(1);
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH)
                        as i32,
                    wait_ms as _,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
        }
    });
    match found {
        Some(row) => row,
        // SAFETY: the call info this function was given.
        None => unsafe { pgrx::pg_return_null(fcinfo) },
    }
}

/// The correlation data to wait for: not NULL, not empty (MQTT's own limit as the upper bound:
/// longer data is never sent, so it would be a wait for nothing).
fn checked_correlation(c: Option<Vec<u8>>) -> Vec<u8> {
    const HINT: &str = "Pass the correlation data the request was published with, for example decode('0a1b2c', 'hex').";
    match c {
        None => errors::raise(
            INVALID_PARAMETER,
            "correlation_data must not be NULL",
            Some(HINT),
        ),
        Some(c) if c.is_empty() => errors::raise(
            INVALID_PARAMETER,
            "correlation_data must not be empty",
            Some(HINT),
        ),
        Some(c) if c.len() > mqtt_pg_core::properties::MAX_FIELD => errors::raise(
            INVALID_PARAMETER,
            format!(
                "correlation_data is longer than MQTT allows ({} bytes)",
                mqtt_pg_core::properties::MAX_FIELD
            ),
            Some(HINT),
        ),
        Some(c) => c,
    }
}

/// The timeout in microseconds: not NULL, not negative (zero looks once). Months count as
/// 30 days, as interval arithmetic does.
fn checked_timeout(t: Option<Interval>) -> i64 {
    const HINT: &str = "Pass how long to wait, such as '10 seconds'; '0' looks once.";
    let Some(t) = t else {
        errors::raise(INVALID_PARAMETER, "timeout must not be NULL", Some(HINT))
    };
    let us = t.as_micros();
    if us < 0 {
        errors::raise(
            INVALID_PARAMETER,
            "timeout must not be negative",
            Some(HINT),
        );
    }
    us.min(i64::MAX as i128) as i64
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_mqtt_wait_for_reply() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}
