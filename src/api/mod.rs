//! The public SQL functions. Each validates its arguments before touching anything, so a call
//! that fails has queued, stored and sent nothing.

pub mod broker;
pub mod listener;
pub mod publish;
pub mod reply;
pub mod status;
pub mod subscribe;
pub mod test_connection;

use pgrx::prelude::*;

/// A received or sent payload as text when it is valid UTF-8 (and free of NUL, which text
/// cannot hold), else NULL. Backs the `payload_text` column of `mqtt_message_history_text`.
#[pg_extern(immutable, parallel_safe, strict)]
fn mqtt_payload_text(payload: &[u8]) -> Option<&str> {
    if payload.contains(&0) {
        return None;
    }
    std::str::from_utf8(payload).ok()
}

/// Internal: wake this database's worker at commit (called by the configuration triggers).
#[pg_extern(volatile, parallel_unsafe)]
fn _mqtt_pg_wake(reason: i32) {
    // Brokers or topics were written in this transaction: look them up again.
    crate::catalog::forget();
    let flags = (reason as u32) & (crate::shmem::WAKE_OUTBOX | crate::shmem::WAKE_CONFIG);
    crate::wake::wake_at_commit(if flags == 0 {
        crate::shmem::WAKE_CONFIG
    } else {
        flags
    });
}
