//! Shared memory: which database has a worker, how to wake it, and each broker's live status.
//!
//! One fixed-size struct behind one LWLock. Writers are the launcher and the workers' main
//! threads; backends read it for `mqtt_status()` and take the lock briefly at commit to wake a
//! worker. Nothing here is durable: after a restart the launcher and workers rebuild it.

use mqtt_pg_core::rate::RateWindow;
use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;

/// Databases with a running mqtt_pg worker, at most.
pub const MAX_DATABASES: usize = 32;
/// Brokers per database whose status is tracked in shared memory, at most.
pub const MAX_BROKERS: usize = 16;
const ERROR_LEN: usize = 240;

/// Lifecycle of a database slot.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum DbState {
    Free = 0,
    /// A backend of this database asked for a worker; the launcher starts one.
    Wanted,
    /// The launcher registered a worker that has not claimed the slot yet.
    Starting,
    Running,
}

/// What a broker connection is doing, as `mqtt_status()` reports it.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum LinkState {
    Unknown = 0,
    Connecting,
    Connected,
    Disconnected,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Unknown | LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Disconnected => "disconnected",
        }
    }
}

/// Wake reasons a backend leaves for its database's worker.
pub const WAKE_OUTBOX: u32 = 1;
pub const WAKE_CONFIG: u32 = 2;

#[derive(Copy, Clone)]
pub struct BrokerSlot {
    pub broker_id: i32,
    pub state: LinkState,
    /// When `state` last changed, microseconds since the Unix epoch.
    pub since_us: i64,
    pub last_error: [u8; ERROR_LEN],
    pub last_error_len: u16,
    pub last_error_at_us: i64,
    pub reconnects: u64,
    /// Messages and payload bytes stored (received) and delivered (sent) since the worker
    /// started, and when the last of each was.
    pub received: u64,
    pub sent: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    pub last_received_us: i64,
    pub last_sent_us: i64,
    pub received_rate: RateWindow,
    pub sent_rate: RateWindow,
}

impl BrokerSlot {
    const EMPTY: BrokerSlot = BrokerSlot {
        broker_id: 0,
        state: LinkState::Unknown,
        since_us: 0,
        last_error: [0; ERROR_LEN],
        last_error_len: 0,
        last_error_at_us: 0,
        reconnects: 0,
        received: 0,
        sent: 0,
        received_bytes: 0,
        sent_bytes: 0,
        last_received_us: 0,
        last_sent_us: 0,
        received_rate: RateWindow::EMPTY,
        sent_rate: RateWindow::EMPTY,
    };

    /// Count messages stored (`received`) or delivered, `bytes` of payload in all, at `now_us`.
    pub fn count(&mut self, received: bool, n: u64, bytes: u64, now_us: i64) {
        if n == 0 {
            return;
        }
        let second = now_us.div_euclid(1_000_000);
        if received {
            self.received += n;
            self.received_bytes += bytes;
            self.last_received_us = now_us;
            self.received_rate.add(second, n);
        } else {
            self.sent += n;
            self.sent_bytes += bytes;
            self.last_sent_us = now_us;
            self.sent_rate.add(second, n);
        }
    }

    pub fn set_error(&mut self, msg: &str, at_us: i64) {
        let n = floor_char_boundary(msg, ERROR_LEN);
        self.last_error[..n].copy_from_slice(&msg.as_bytes()[..n]);
        self.last_error_len = n as u16;
        self.last_error_at_us = at_us;
    }

    pub fn last_error(&self) -> Option<&str> {
        (self.last_error_len > 0)
            .then(|| std::str::from_utf8(&self.last_error[..self.last_error_len as usize]).ok())
            .flatten()
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    n
}

#[derive(Copy, Clone)]
pub struct DbSlot {
    pub dboid: u32,
    pub state: DbState,
    pub pid: i32,
    /// Address of the worker's process latch (`&MyProc->procLatch`), 0 when none.
    pub latch: usize,
    /// WAKE_* bits left by backends since the worker last looked.
    pub wake_flags: u32,
    /// With WAKE_OUTBOX: the lowest outbox id committed since (0: unknown; i64::MAX: none).
    pub outbox_low: i64,
    /// Earliest time (µs since epoch) the launcher may start a worker again after a failure.
    pub not_before_us: i64,
    /// Left by a worker that routing held past its hard limit (see `worker::hung`), for the
    /// next one: the message to set aside (when it was routing one alone), or how many of the
    /// first messages to route one by one (when it was routing a batch).
    pub hung_message: u64,
    pub hung_batch: u32,
    pub brokers: [BrokerSlot; MAX_BROKERS],
}

impl DbSlot {
    /// Leave wake reasons (and, with WAKE_OUTBOX, the lowest outbox id committed).
    pub fn wake(&mut self, flags: u32, low: i64) {
        self.wake_flags |= flags;
        if flags & WAKE_OUTBOX != 0 {
            self.outbox_low = self.outbox_low.min(low);
        }
    }

    const EMPTY: DbSlot = DbSlot {
        dboid: 0,
        state: DbState::Free,
        pid: 0,
        latch: 0,
        wake_flags: 0,
        outbox_low: i64::MAX,
        not_before_us: 0,
        hung_message: 0,
        hung_batch: 0,
        brokers: [BrokerSlot::EMPTY; MAX_BROKERS],
    };

    pub fn broker(&self, id: i32) -> Option<&BrokerSlot> {
        self.brokers.iter().find(|b| b.broker_id == id)
    }

    /// The broker's slot, claimed if it has none; None when all are taken.
    pub fn broker_mut(&mut self, id: i32) -> Option<&mut BrokerSlot> {
        let idx = self
            .brokers
            .iter()
            .position(|b| b.broker_id == id)
            .or_else(|| self.brokers.iter().position(|b| b.broker_id == 0))?;
        let slot = &mut self.brokers[idx];
        if slot.broker_id != id {
            *slot = BrokerSlot::EMPTY;
            slot.broker_id = id;
        }
        Some(slot)
    }

    pub fn clear(&mut self) {
        *self = DbSlot::EMPTY;
    }

    pub fn clear_brokers(&mut self) {
        self.brokers = [BrokerSlot::EMPTY; MAX_BROKERS];
    }
}

#[derive(Copy, Clone)]
pub struct Shared {
    /// Address of the launcher's process latch, 0 when it is not running.
    pub launcher_latch: usize,
    pub dbs: [DbSlot; MAX_DATABASES],
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            launcher_latch: 0,
            dbs: [DbSlot::EMPTY; MAX_DATABASES],
        }
    }
}

impl Shared {
    pub fn db(&self, dboid: u32) -> Option<&DbSlot> {
        self.dbs
            .iter()
            .find(|d| d.dboid == dboid && d.state != DbState::Free)
    }

    pub fn db_mut(&mut self, dboid: u32) -> Option<&mut DbSlot> {
        self.dbs
            .iter_mut()
            .find(|d| d.dboid == dboid && d.state != DbState::Free)
    }

    /// The database's slot, claimed if it has none; None when all are taken.
    pub fn db_claim(&mut self, dboid: u32) -> Option<&mut DbSlot> {
        let idx = self
            .dbs
            .iter()
            .position(|d| d.dboid == dboid && d.state != DbState::Free)
            .or_else(|| self.dbs.iter().position(|d| d.state == DbState::Free))?;
        let slot = &mut self.dbs[idx];
        if slot.state == DbState::Free {
            slot.clear();
            slot.dboid = dboid;
        }
        Some(slot)
    }
}

// SAFETY: Shared is plain old data (integers and byte arrays, no pointers into process memory
// except latch addresses, which point into shared memory themselves).
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the name is unique to this extension.
pub static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"mqtt_pg_shared") };

pub fn init() {
    pgrx::pg_shmem_init!(SHARED);
}

/// Set a process latch given its address in shared memory.
///
/// # Safety
/// `latch` must be 0 or the address of a PGPROC's `procLatch`. A latch of a process that has
/// since exited belongs to a PGPROC that may be reused: setting it then only causes a spurious
/// wake-up, which every latch user tolerates.
pub unsafe fn set_latch(latch: usize) {
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// The address of this process's latch, as stored in shared memory.
pub fn my_latch() -> usize {
    // SAFETY: MyProc is set for every process that has shared memory access.
    unsafe { &raw mut (*pg_sys::MyProc).procLatch as usize }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
