//! Every `mqtt_pg.*` setting, defined in one place. README.md has the same table for DBAs.

use std::ffi::CStr;

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
    // SAFETY: called once from _PG_init in the postmaster, as MarkGUCPrefixReserved expects.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(PREFIX.as_ptr()) };
}

const PREFIX: &CStr = c"mqtt_pg";

pub fn max_payload_size() -> usize {
    MAX_PAYLOAD_SIZE.get().max(0) as usize
}
