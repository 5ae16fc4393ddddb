//! Subtransactions for the worker: one failing statement must not take a whole batch (or the
//! worker) down with it.
//!
//! A message the database will not take (a trigger or constraint a DBA added to the history
//! table, say) would otherwise fail the batch's transaction, end the worker with an ERROR, and
//! come back from the broker after the restart, for ever. Running the statement in a
//! subtransaction lets the worker roll back just that statement and set the culprit aside.
//! This is what PL/Python's `plpy.subtransaction()` does (`plpy_subxactobject.c`).

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Why a subtransaction failed.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: PgSqlErrorCode,
    /// The error would likely not happen again a moment later: a lock or statement timeout, a
    /// cancel, a deadlock or serialization failure, lack of resources (disk full, out of
    /// memory), an operator or system error. The batch is then retried as a whole, never split
    /// into dead letters.
    pub transient: bool,
}

/// SQLSTATE classes of errors that are about the moment, not about the data: 40 (transaction
/// rollback), 53 (insufficient resources), 55 (object not in prerequisite state, e.g.
/// lock_not_available), 57 (operator intervention, e.g. query_canceled), 58 (system error).
const TRANSIENT_CLASSES: [&str; 5] = ["40", "53", "55", "57", "58"];

/// Run `f` in a subtransaction of the current transaction. On a Postgres ERROR (or a Rust
/// panic) only the subtransaction is rolled back and the error is returned; the caller's
/// transaction and SPI connection carry on.
pub fn run<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    // SAFETY: the worker is inside a transaction (every caller runs within
    // `BackgroundWorker::transaction`). The memory context and resource owner are saved and
    // restored around the subtransaction exactly as PL/Python does.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let f = AssertUnwindSafe(f);
        let result = PgTryBuilder::new(move || Ok(f()))
            .catch_others(|e| Err(describe(e)))
            .execute();
        match result {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        result
    }
}

fn describe(e: CaughtError) -> Failure {
    match e {
        CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
            let state = sqlstate(r.sql_error_code());
            Failure {
                message: r.message().to_string(),
                code: r.sql_error_code(),
                transient: TRANSIENT_CLASSES.contains(&&state[..2]),
            }
        }
        CaughtError::RustPanic { ereport: r, .. } => Failure {
            message: r.message().to_string(),
            code: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            transient: false,
        },
    }
}

/// The five-character SQLSTATE of an error code (PostgreSQL packs it six bits a character).
fn sqlstate(code: PgSqlErrorCode) -> String {
    let mut n = code as i32;
    (0..5)
        .map(|_| {
            let c = ((n & 0x3F) as u8 + b'0') as char;
            n >>= 6;
            c
        })
        .collect()
}
