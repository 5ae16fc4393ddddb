//! Subtransactions for the worker: one failing statement must not take a whole batch (or the
//! worker) down with it.
//!
//! A message the database will not take (a trigger or constraint a DBA added to the history
//! table, say) would otherwise fail the batch's transaction, end the worker with an ERROR, and
//! come back from the broker after the restart, for ever. Running the statement in a
//! subtransaction lets the worker roll back just that statement and set the culprit aside.
//! This is what PL/Python's `plpy.subtransaction()` does (`plpy_subxactobject.c`).

use std::panic::AssertUnwindSafe;

use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

/// Run `f` in a subtransaction of the current transaction. On a Postgres ERROR (or a Rust
/// panic) only the subtransaction is rolled back and the error's message is returned; the
/// caller's transaction and SPI connection carry on.
pub fn run<R>(f: impl FnOnce() -> R) -> Result<R, String> {
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

fn describe(e: CaughtError) -> String {
    match e {
        CaughtError::PostgresError(r)
        | CaughtError::ErrorReport(r)
        | CaughtError::RustPanic { ereport: r, .. } => r.message().to_string(),
    }
}
