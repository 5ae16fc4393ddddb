//! A subscriber's code that will not stop.
//!
//! `mqtt_pg.route_timeout` cancels routing that runs too long, but a handler can catch
//! `query_canceled` and carry on, holding the worker (and so the whole database's MQTT) for as
//! long as it likes. So a second, hard limit (twice the timeout) ends the worker the way
//! SIGTERM does during routing: PostgreSQL's own die, which no handler can catch. Nothing of
//! the batch was committed or acknowledged, so the broker sends it again to the next worker;
//! what the dying worker was routing is left in shared memory, so that the next one routes
//! those messages one by one and, when one alone holds it again, sets that one aside instead
//! of running it a third time.

use std::ffi::c_int;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use mqtt_pg_core::engine::InMessage;
use pgrx::pg_sys;

use crate::shmem::SHARED;

// utils/timeout.h, which pgrx does not bind: USER_TIMEOUT asks RegisterTimeout for a free id.
// PostgreSQL 17 added TRANSACTION_TIMEOUT before it.
#[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16"))]
const USER_TIMEOUT: c_int = 12;
#[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15", feature = "pg16")))]
const USER_TIMEOUT: c_int = 13;

unsafe extern "C-unwind" {
    fn RegisterTimeout(id: c_int, handler: Option<unsafe extern "C-unwind" fn()>) -> c_int;
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
}

static TIMER: AtomicI32 = AtomicI32::new(-1);
static FIRED: AtomicBool = AtomicBool::new(false);
/// What is being routed while the timer is armed: one message (its hash), or a batch (its size).
static ARMED_MESSAGE: AtomicU64 = AtomicU64::new(0);
static ARMED_BATCH: AtomicU32 = AtomicU32::new(0);

/// Register the timer and the exit callback. Once, at worker start.
pub fn init() {
    // SAFETY: registering a timeout handler and an exit callback in this process, as
    // PostgreSQL's own subsystems do at start-up.
    unsafe {
        let id = RegisterTimeout(USER_TIMEOUT, Some(on_hard_limit));
        TIMER.store(id, Ordering::Relaxed);
        pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0usize));
    }
}

/// A message's identity across workers: the broker sends the very same one again.
pub fn message_hash(m: &InMessage) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.broker_id.hash(&mut h);
    m.topic.hash(&mut h);
    m.payload.as_ref().hash(&mut h);
    h.finish().max(1)
}

/// Arm the hard limit for routing `one` message or a batch of `batch`.
pub fn arm(delay_ms: i32, one: Option<u64>, batch: usize) {
    let id = TIMER.load(Ordering::Relaxed);
    if id < 0 || delay_ms <= 0 {
        return;
    }
    ARMED_MESSAGE.store(one.unwrap_or(0), Ordering::Relaxed);
    ARMED_BATCH.store(batch.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    // SAFETY: our own registered timer.
    unsafe { enable_timeout_after(id, delay_ms) };
}

pub fn disarm() {
    let id = TIMER.load(Ordering::Relaxed);
    if id >= 0 {
        // SAFETY: our own registered timer.
        unsafe { disable_timeout(id, false) };
    }
    ARMED_MESSAGE.store(0, Ordering::Relaxed);
    ARMED_BATCH.store(0, Ordering::Relaxed);
}

/// The timer's handler, called from the SIGALRM handler: only async-signal-safe work, as
/// PostgreSQL's own die() does.
unsafe extern "C-unwind" fn on_hard_limit() {
    FIRED.store(true, Ordering::Relaxed);
    // SAFETY: what die() does: flags read by CHECK_FOR_INTERRUPTS, and a latch set.
    unsafe {
        pg_sys::ProcDiePending = 1;
        pg_sys::InterruptPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// On the way out after the hard limit: leave what was being routed for the next worker.
unsafe extern "C-unwind" fn on_exit(_code: c_int, _arg: pg_sys::Datum) {
    if !FIRED.load(Ordering::Relaxed) {
        return;
    }
    let one = ARMED_MESSAGE.load(Ordering::Relaxed);
    let batch = ARMED_BATCH.load(Ordering::Relaxed);
    // SAFETY: a plain read of this process's database.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut shared = SHARED.exclusive();
    if let Some(slot) = shared.db_mut(dboid) {
        if one != 0 {
            slot.hung_message = one;
        } else {
            slot.hung_batch = slot.hung_batch.max(batch);
        }
    }
}

/// What the previous worker left: the message to set aside, and how many of the first
/// messages to route one by one. Taken (cleared) by the worker that starts.
pub fn take(dboid: u32) -> (Option<u64>, u32) {
    let mut shared = SHARED.exclusive();
    match shared.db_mut(dboid) {
        Some(slot) => {
            let one = std::mem::take(&mut slot.hung_message);
            let batch = std::mem::take(&mut slot.hung_batch);
            ((one != 0).then_some(one), batch)
        }
        None => (None, 0),
    }
}

/// The dead letter's reason for a message that held the worker.
pub const HELD_THE_WORKER: &str =
    "its routing did not end within twice mqtt_pg.route_timeout, even when cancelled \
     (a handler that catches query_canceled, or loops?): the worker was stopped and restarted, and \
     set the message aside instead of routing it again";
