//! Every `mqtt_pg.*` setting, defined in one place. README.md has the same table for DBAs.

use std::ffi::{c_char, CStr};

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Largest payload `mqtt_publish` accepts, and the packet limit of every broker connection.
pub static MAX_PAYLOAD_SIZE: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_PAYLOAD);
/// MQTT's own ceiling (256 MiB - 1 for the whole packet) less room for the fixed header, the
/// topic length and the packet id.
pub const DEFAULT_MAX_PAYLOAD: i32 = 268_435_455 - 16;

/// Messages per ingest transaction.
pub static INGEST_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Outbox rows fetched per broker per wake.
pub static PUBLISH_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1_000);
/// Outbox rows a broker may have handed to its connection and not yet acknowledged.
pub static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// How often the worker re-reads configuration and the outbox without being woken.
pub static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);

/// Longest the routing of one batch (target tables, handlers, notifications) may take.
pub static ROUTE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// Log each broker connection, disconnection and refused connect.
pub static LOG_CONNECTIONS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Log one line per message received or delivered (topic, size, qos; never the payload).
pub static LOG_MESSAGES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `mqtt_pg.history_retention` and `mqtt_pg.dead_letter_retention`: PostgreSQL keeps the
/// strings; the check hook has parsed them with the same parser the worker uses.
static mut HISTORY_RETENTION: *mut c_char = std::ptr::null_mut();
static mut DEAD_LETTER_RETENTION: *mut c_char = std::ptr::null_mut();

pub fn init() {
    GucRegistry::define_int_guc(
        c"mqtt_pg.max_payload_size",
        c"Largest MQTT payload, in bytes, that mqtt_publish accepts and a broker connection carries.",
        c"Larger publishes fail with SQLSTATE 54000. The default is MQTT's own limit.",
        &MAX_PAYLOAD_SIZE,
        0,
        DEFAULT_MAX_PAYLOAD,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"mqtt_pg.ingest_batch_size",
        c"Most received messages the worker stores in one transaction.",
        c"Larger batches mean fewer commits and higher throughput; smaller ones shorter transactions.",
        &INGEST_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"mqtt_pg.publish_batch_size",
        c"Most outbox rows the worker reads per broker each time it wakes.",
        c"",
        &PUBLISH_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"mqtt_pg.max_in_flight",
        c"Most outgoing messages per broker handed to the connection and not yet acknowledged.",
        c"Bounds the worker's memory however large the outbox grows.",
        &MAX_IN_FLIGHT,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"mqtt_pg.poll_interval",
        c"How often the worker checks configuration and the outbox without being woken.",
        c"Commits and configuration changes wake the worker at once; this is the safety net (for example for PREPARE TRANSACTION).",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"mqtt_pg.route_timeout",
        c"Longest the routing of one batch of received messages (target tables, handlers, notifications) may take.",
        c"A batch that takes longer is routed message by message, and a message whose routing alone takes longer is set aside in mqtt_dead_letter. 0 turns the limit off.",
        &ROUTE_TIMEOUT_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"mqtt_pg.log_connections",
        c"Log each broker connection, disconnection and failed connect at LOG level.",
        c"The same events are in mqtt_broker_status; the log keeps their history.",
        &LOG_CONNECTIONS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"mqtt_pg.log_messages",
        c"Log one line per message received or delivered: broker, direction, topic, size and QoS.",
        c"Never the payload. Meant for debugging: at high rates it fills the log.",
        &LOG_MESSAGES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    define_retention(
        c"mqtt_pg.history_retention",
        c"How long mqtt_message_history keeps messages, as an interval such as '30 days'; empty keeps everything.",
        c"The worker drops whole daily partitions once all of their rows are older; rows are never deleted one by one.",
        &raw mut HISTORY_RETENTION,
    );
    define_retention(
        c"mqtt_pg.dead_letter_retention",
        c"How long mqtt_dead_letter keeps messages, as an interval such as '90 days'; empty keeps everything.",
        c"The worker deletes older dead letters in small batches.",
        &raw mut DEAD_LETTER_RETENTION,
    );
    // SAFETY: called once from _PG_init in the postmaster, as MarkGUCPrefixReserved expects.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(PREFIX.as_ptr()) };
}

const PREFIX: &CStr = c"mqtt_pg";

/// Set a PostgreSQL setting for the rest of the current transaction, as `SET LOCAL` does.
pub fn set_local(name: &CStr, value: &CStr) {
    // SAFETY: set_config_option with GUC_ACTION_LOCAL inside a transaction; the transaction's
    // end puts the setting back.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0,
            false,
        );
    }
}

/// Run `f` with `settings` in force, as a function's `SET` clauses run its body: they, and
/// anything `f` sets, go back as they were afterwards (or at transaction abort if `f` raises).
pub fn with_settings<R>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level, as fmgr_security_definer opens one for its SET clauses; closed
    // below, or by transaction abort.
    let nest = unsafe {
        let nest = pg_sys::NewGUCNestLevel();
        for (name, value) in settings {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        nest
    };
    let out = f();
    // SAFETY: closes the level opened above. false: as at an abort, every setting changed
    // inside goes back, a plain SET (or set_config(..., false)) included.
    unsafe { pg_sys::AtEOXact_GUC(false, nest) };
    out
}

/// Define a retention setting whose value must parse (see `mqtt_pg_core::interval`).
fn define_retention(name: &CStr, short: &CStr, long: &CStr, value: *mut *mut c_char) {
    // SAFETY: called from _PG_init; `value` is a static that PostgreSQL owns from now on, as
    // every string GUC's storage.
    unsafe {
        pg_sys::DefineCustomStringVariable(
            name.as_ptr(),
            short.as_ptr(),
            long.as_ptr(),
            value,
            c"".as_ptr(),
            pg_sys::GucContext::PGC_SIGHUP,
            0,
            Some(check_retention),
            None,
            None,
        );
    }
}

/// Refuse a retention that does not parse, with a DETAIL saying why. A GUC check hook must not
/// raise an ERROR (it also runs in the postmaster): it answers false and leaves the detail.
#[pg_guard]
unsafe extern "C-unwind" fn check_retention(
    newval: *mut *mut c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the candidate value, a NUL-terminated string or NULL.
    let text = unsafe { newval.as_ref() }
        .filter(|p| !p.is_null())
        .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    match mqtt_pg_core::interval::parse_retention(&text) {
        Ok(_) => true,
        Err(why) => {
            let detail = std::ffi::CString::new(why).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string takes a palloc'd string, as GUC_check_errdetail
            // leaves one.
            unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
            false
        }
    }
}

fn retention(value: *mut c_char) -> Option<std::time::Duration> {
    if value.is_null() {
        return None;
    }
    // SAFETY: a string GUC's storage is NULL or a NUL-terminated string PostgreSQL keeps.
    let text = unsafe { CStr::from_ptr(value) }.to_string_lossy();
    // The check hook let only parsable values in.
    mqtt_pg_core::interval::parse_retention(&text)
        .ok()
        .flatten()
}

/// `mqtt_pg.history_retention`: None keeps everything.
pub fn history_retention() -> Option<std::time::Duration> {
    // SAFETY: read on the main thread, which is the only one PostgreSQL assigns it on.
    retention(unsafe { HISTORY_RETENTION })
}

/// `mqtt_pg.dead_letter_retention`: None keeps everything.
pub fn dead_letter_retention() -> Option<std::time::Duration> {
    // SAFETY: as in history_retention.
    retention(unsafe { DEAD_LETTER_RETENTION })
}

pub fn max_payload_size() -> usize {
    MAX_PAYLOAD_SIZE.get().max(0) as usize
}
