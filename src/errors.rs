//! Raising errors with the SQLSTATEs of API.md, a message and a hint a DBA can act on.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub use pgrx::PgSqlErrorCode::{
    ERRCODE_INSUFFICIENT_PRIVILEGE as INSUFFICIENT_PRIVILEGE,
    ERRCODE_INVALID_PARAMETER_VALUE as INVALID_PARAMETER, ERRCODE_OBJECT_IN_USE as OBJECT_IN_USE,
    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE as NOT_IN_PREREQUISITE_STATE,
    ERRCODE_PROGRAM_LIMIT_EXCEEDED as PROGRAM_LIMIT, ERRCODE_UNDEFINED_OBJECT as UNDEFINED_OBJECT,
};

/// Raise an ERROR (never returns). Postgres unwinds the transaction, so nothing the failed call
/// started is kept.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "mqtt_pg");
    if let Some(h) = hint {
        report = report.set_hint(h.to_string());
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Raise 22023 for a bad topic or filter, with the core's explanation and hint.
pub fn bad_topic(what: &str, value: &str, e: &mqtt_pg_core::topic::TopicError) -> ! {
    let shown: String = value.chars().take(80).collect();
    raise(
        INVALID_PARAMETER,
        format!("invalid MQTT {what} \"{shown}\": {e}"),
        Some(e.hint()),
    )
}

/// A QoS argument: 0, 1 or 2, else 22023.
pub fn checked_qos(qos: Option<i32>) -> i32 {
    match qos {
        Some(q @ 0..=2) => q,
        Some(q) => bad_qos(q),
        None => raise(INVALID_PARAMETER, "qos must not be NULL", None),
    }
}

fn bad_qos(qos: i32) -> ! {
    raise(
        INVALID_PARAMETER,
        format!("invalid qos {qos}: must be 0, 1 or 2"),
        Some("Use 0 (at most once), 1 (at least once) or 2 (exactly once)."),
    )
}
