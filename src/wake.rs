//! Waking the worker at commit.
//!
//! A backend that queued a message or changed configuration must not wake the worker before
//! its transaction commits (the worker could not see the rows yet) and must not wake it at all
//! if the transaction rolls back. So the first call in a transaction registers one commit
//! callback; later calls only add reason bits. The callback does no more than take the shared
//! lock briefly and set a latch: an ERROR inside a commit callback would take the whole server
//! down (pg_net's `wake_at_commit` follows the same rule).

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use pgrx::{pg_sys, register_xact_callback, PgXactCallbackEvent};

use crate::shmem::{self, DbState, SHARED, WAKE_OUTBOX};

/// Reason bits queued in this backend's current transaction. Backend-local: a backend runs one
/// transaction at a time, and only its main thread touches this.
static PENDING: AtomicU32 = AtomicU32::new(0);
/// The lowest outbox id this transaction queued through [`queued_at_commit`]; 0 when rows
/// also came another way (their ids are unknown here); `i64::MAX` when none.
static LOW: AtomicI64 = AtomicI64::new(i64::MAX);

/// Wake this database's worker when (and only if) the current transaction commits. With
/// WAKE_OUTBOX, the worker looks at the whole outbox again (see [`queued_at_commit`]).
pub fn wake_at_commit(reason: u32) {
    if reason & WAKE_OUTBOX != 0 {
        LOW.store(0, Ordering::Relaxed);
    }
    arm(reason);
}

/// A message with outbox id `id` was queued in this transaction: wake the worker at commit
/// and tell it the lowest such id. The worker reads the outbox above the ids it has handed out
/// already; an id below them means a transaction that took its ids earlier committed later,
/// and the worker must look lower again.
pub fn queued_at_commit(id: i64) {
    LOW.fetch_min(id, Ordering::Relaxed);
    arm(WAKE_OUTBOX);
}

fn arm(reason: u32) {
    if PENDING.fetch_or(reason, Ordering::Relaxed) != 0 {
        return; // callbacks already registered for this transaction
    }
    register_xact_callback(PgXactCallbackEvent::Commit, || {
        let flags = PENDING.swap(0, Ordering::Relaxed);
        let low = LOW.swap(i64::MAX, Ordering::Relaxed);
        if flags != 0 {
            wake_now(flags, low);
        }
    });
    register_xact_callback(PgXactCallbackEvent::Abort, || {
        PENDING.store(0, Ordering::Relaxed);
        LOW.store(i64::MAX, Ordering::Relaxed);
    });
}

/// Leave `flags` for this database's worker and set its latch; if it has no worker, ask the
/// launcher for one. `low`: with WAKE_OUTBOX, the lowest outbox id committed (see
/// [`queued_at_commit`]; 0: unknown, the worker looks at the whole outbox).
pub fn wake_now(flags: u32, low: i64) {
    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let latch = {
        let mut shared = SHARED.exclusive();
        let launcher = shared.launcher_latch;
        match shared.db_claim(dboid) {
            Some(slot) => match slot.state {
                DbState::Running | DbState::Starting => {
                    slot.wake(flags, low);
                    slot.latch
                }
                DbState::Free | DbState::Wanted => {
                    slot.state = DbState::Wanted;
                    slot.wake(flags, low);
                    launcher
                }
            },
            // Every slot is taken: the launcher logs that; waking it is all we can do here.
            None => launcher,
        }
    };
    // SAFETY: latches stored in shared memory are PGPROC latches (see shmem::set_latch).
    unsafe { shmem::set_latch(latch) };
}
