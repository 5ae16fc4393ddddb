//! The per-database worker: owns the engine (and through it every broker connection) and is the
//! only process that moves messages between the broker and this database's tables.
//!
//! Its main thread is the only thread that touches Postgres (pgrx refuses any other). The loop
//! reads like pg_cron's launcher: signal handlers first, claim the slot, then forever: wait on
//! the latch (or the engine's wake-up socket), handle SIGTERM/SIGHUP and interrupts, reload
//! configuration when told to (or every `mqtt_pg.poll_interval`), store one bounded batch of
//! engine events in one transaction, and hand newly committed outbox rows to the engine. No
//! step blocks for long, so SIGTERM, reloads and DROP DATABASE's barrier are handled promptly.

pub(crate) mod config;
mod hung;
mod maintenance;
mod outbox;
mod store;
pub(crate) mod subxact;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqtt_pg_core::engine::{BrokerConfig, Engine, Event};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;

use crate::shmem::{self, DbState, LinkState, SHARED, WAKE_CONFIG, WAKE_OUTBOX};
use crate::{catalog, gucs};

/// What the worker knows about one active broker.
#[derive(Default)]
struct BrokerRuntime {
    /// None while the row cannot be connected (for example TLS requested).
    config: Option<BrokerConfig>,
    subs: BTreeMap<String, u8>,
    connected: bool,
    /// Epoch of the connection the worker last heard of (see `Engine::publish`).
    epoch: u64,
    ever_connected: bool,
    /// Outbox ids handed to the current connection task and not yet acknowledged, with their
    /// payload sizes.
    in_flight: HashMap<i64, usize>,
    /// Rows handed to connection tasks that a configuration change replaced. They are not
    /// resent until every such task has said `Stopped` (it will write nothing more), and rows
    /// of the new connection are never mixed up with them.
    retired: HashMap<i64, usize>,
    /// Replaced tasks not yet stopped. Each says `Stopped` in the end (a panicked one too: the
    /// engine turns its `Failed` into `Stopped`), so their rows are never resent while one of
    /// them could still write them.
    retiring: u32,
    /// How often each outbox row was the oldest unacknowledged one when a connection ended
    /// (see `Event::ConnectionLost::suspect`).
    strikes: HashMap<i64, u32>,
    /// Every committed row of this broker with an id up to this one has been handed out (it
    /// is in flight or retired, or gone): the next fetch reads above it, not through the rows
    /// in flight again. Lowered to 0 whenever rows in flight go back to the queue, at every
    /// poll tick, and to just below the lowest id of a transaction that commits late (see
    /// `wake::queued_at_commit`).
    floor: i64,
}

/// A row that was the oldest unacknowledged one this many times when the broker closed the
/// connection is taken to be refused for good (MQTT 3.1.1 has no other way to say so; mosquitto
/// closes the connection on a packet over its `max_packet_size`) and is dead-lettered, so the
/// queue behind it moves again. A broker restart names one innocent row at most once or twice.
const STRIKES_TO_DEAD_LETTER: u32 = 3;

/// How long to wait before storing a batch again that the database refused for a passing
/// reason (a lock timeout, a full disk). Meanwhile the engine's buffer fills and the broker
/// connections stop reading: nothing is acknowledged or dropped.
/// The delay doubles while the same batch keeps failing, up to `RETRY_MAX`.
const RETRY_AFTER: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

impl BrokerRuntime {
    fn in_flight_bytes(&self) -> usize {
        self.in_flight.values().sum::<usize>() + self.retired.values().sum::<usize>()
    }

    fn is_taken(&self, id: i64) -> bool {
        self.in_flight.contains_key(&id) || self.retired.contains_key(&id)
    }

    /// The connection's rows in flight go back to the queue (the engine forgot them).
    fn forget_in_flight(&mut self) {
        self.in_flight.clear();
        self.floor = 0;
    }

    /// The current task is being replaced: its rows wait for its `Stopped`.
    fn retire(&mut self) {
        self.retired.extend(self.in_flight.drain());
        self.retiring += 1;
    }

    /// Every replaced task has stopped: their rows may go again.
    fn release_retired(&mut self) {
        self.retired.clear();
        self.retiring = 0;
        self.floor = 0;
    }
}

struct Worker {
    dboid: u32,
    /// The extension this worker serves (its oid) and the schema it lives in. A DROP and
    /// CREATE EXTENSION gives a new oid: new tables, new ids, so the worker starts afresh.
    extension: pg_sys::Oid,
    schema: String,
    engine: Engine,
    brokers: HashMap<i32, BrokerRuntime>,
    /// A connection task failed: re-apply the configuration at the next turn, which starts a
    /// new one.
    restart_failed: bool,
    /// A batch the database refused for a passing reason, and when to try it again.
    retry: Option<(store::Batch, Instant)>,
    /// Failed attempts at that batch so far.
    retries: u32,
    /// Subscriptions that route their messages, per broker.
    routes: crate::routing::Routes,
    /// Left by a predecessor that routing held past its hard limit.
    held: store::Held,
    /// History partitions and retention (see `maintenance`).
    maintenance: maintenance::Schedule,
    /// The extension's version in this database when it is not this library's (a new release
    /// installed, `ALTER EXTENSION mqtt_pg UPDATE` not yet run): the worker then keeps no
    /// connection and touches no table until it is.
    stale_version: Option<String>,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mqtt_pg_worker_main(arg: pg_sys::Datum) {
    // The launcher passes the database oid as the worker's argument.
    let dboid = arg.value() as u32;
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    // The worker runs as a superuser in a database whose owner may create objects and may
    // ALTER DATABASE ... SET any user setting. Pin every setting that could make it run their
    // code or bend what it does: the search path (no function or operator of theirs can stand
    // in for a built-in one), the role (SET role = ... would run the worker as someone else),
    // read-only and isolation defaults, and the timeouts. A statement_timeout set for the
    // database (for its interactive users) would cancel a large batch on every attempt; the
    // worker's statements are bounded in size instead. A lock_timeout stays: a lock wait that
    // ends is retried (see `Worker::store`).
    // SAFETY: setting GUCs of this process, before any transaction uses them.
    unsafe {
        for (name, value) in [
            (c"search_path", c"pg_catalog, pg_temp"),
            (c"role", c"none"),
            (c"statement_timeout", c"0"),
            (c"idle_in_transaction_session_timeout", c"0"),
            (c"default_transaction_read_only", c"off"),
            (c"default_transaction_isolation", c"read committed"),
            (c"default_tablespace", c""),
        ] {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
        // The broker is told a message is safe once its transaction has committed, so that
        // commit must be durable: with synchronous_commit = off (a common Odoo tuning) a crash
        // could lose messages the broker has already forgotten. Stronger settings (remote_*,
        // local) are kept.
        if pg_sys::synchronous_commit == pg_sys::SyncCommitLevel::SYNCHRONOUS_COMMIT_OFF as i32 {
            pg_sys::SetConfigOption(
                c"synchronous_commit".as_ptr(),
                c"on".as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }

    if !claim_slot(dboid) {
        return; // another worker serves this database
    }
    let Some((extension, schema)) = BackgroundWorker::transaction(catalog::extension) else {
        release_slot(dboid);
        return;
    };

    let (wake_rx, wake_tx) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => error!("mqtt_pg worker could not create its wake-up socket: {e}"),
    };
    let _ = wake_rx.set_nonblocking(true);
    let _ = wake_tx.set_nonblocking(true);
    let engine = match start_engine(wake_tx) {
        Ok(e) => e,
        Err(e) => error!("mqtt_pg worker could not start its MQTT engine: {e}"),
    };
    log!("mqtt_pg worker started for database {dboid}");

    let mut worker = Worker {
        dboid,
        extension,
        schema,
        engine,
        brokers: HashMap::new(),
        restart_failed: false,
        retry: None,
        retries: 0,
        routes: Default::default(),
        held: {
            let (message, alone) = hung::take(dboid);
            if message.is_some() || alone > 0 {
                warning!(
                    "mqtt_pg worker for database {dboid}: the previous worker was stopped because \
                     routing did not end; the messages it was routing go one by one now"
                );
            }
            store::Held { message, alone }
        },
        maintenance: Default::default(),
        stale_version: None,
    };
    hung::init();
    let why = worker.run(&wake_rx);
    worker.shutdown(&wake_rx);
    forget_status(dboid);
    match why {
        Exit::Stop => {}
        Exit::ExtensionChanged => release_slot(dboid),
        Exit::SlotLost => warning!("mqtt_pg worker for database {dboid}: another worker took over"),
    }
    log!("mqtt_pg worker for database {dboid} stopped");
}

/// Clear the broker statuses this worker published: a stopped worker's "connected" must not
/// outlive it (its successor, or a re-created extension's brokers, start from "connecting").
fn forget_status(dboid: u32) {
    // SAFETY: MyProcPid is set in every process.
    let me = unsafe { pg_sys::MyProcPid };
    let mut shared = SHARED.exclusive();
    if let Some(slot) = shared.db_mut(dboid) {
        if slot.pid == me {
            slot.clear_brokers();
        }
    }
}

/// Why the worker's loop ended.
enum Exit {
    /// SIGTERM: the launcher starts a new worker after a pause (unless the server is stopping).
    Stop,
    /// The extension was dropped (or dropped and created again).
    ExtensionChanged,
    /// The slot is no longer ours (the launcher gave it away): leave it alone.
    SlotLost,
}

/// Give up this database's slot after finding no extension (or seeing it dropped). A backend
/// that asked for a worker meanwhile (CREATE EXTENSION) left a wake flag: then the slot goes
/// back to Wanted, so the launcher starts a fresh worker at once.
fn release_slot(dboid: u32) {
    // SAFETY: MyProcPid is set in every process.
    let me = unsafe { pg_sys::MyProcPid };
    let launcher = {
        let mut shared = SHARED.exclusive();
        let launcher = shared.launcher_latch;
        match shared.db_mut(dboid) {
            Some(slot) if slot.pid != me => {} // not ours (any more): leave it alone
            Some(slot) if slot.wake_flags & WAKE_CONFIG != 0 => {
                // One wake-up buys one fresh worker: a worker that finds no extension must not
                // hand the same flag on to the next for ever.
                slot.wake_flags = 0;
                slot.state = DbState::Wanted;
                slot.pid = 0;
                slot.latch = 0;
                slot.not_before_us = 0;
            }
            Some(slot) => slot.clear(),
            None => {}
        }
        launcher
    };
    // SAFETY: the launcher's latch is a PGPROC latch (see shmem::set_latch).
    unsafe { shmem::set_latch(launcher) };
}

/// Take this database's slot, which the launcher marked Starting for us. False when it is not
/// (another worker holds it, or DROP DATABASE asked us to stay away meanwhile).
fn claim_slot(dboid: u32) -> bool {
    let mut shared = SHARED.exclusive();
    let launcher = shared.launcher_latch;
    let Some(slot) = shared.db_mut(dboid) else {
        return false;
    };
    // SAFETY: MyProcPid is set in every process.
    let my_pid = unsafe { pg_sys::MyProcPid };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let holder_dead = slot.pid <= 0 || unsafe { libc::kill(slot.pid, 0) } != 0;
    let ours = match slot.state {
        DbState::Starting => true,
        DbState::Running => slot.pid == my_pid || holder_dead,
        DbState::Free | DbState::Wanted => false,
    };
    if !ours {
        return false;
    }
    slot.state = DbState::Running;
    slot.pid = my_pid;
    slot.latch = shmem::my_latch();
    drop(shared);
    // The launcher starts a few workers at a time: tell it this one is up.
    // SAFETY: the launcher's latch is a PGPROC latch (see shmem::set_latch).
    unsafe { shmem::set_latch(launcher) };
    true
}

/// Start tokio with every signal blocked, so its threads inherit a full mask and Postgres'
/// handlers only ever run on this (the main) thread (see `signals`).
fn start_engine(wake_tx: UnixStream) -> std::io::Result<Engine> {
    let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        // A full socket buffer already means "wake up"; nothing else can go wrong worth acting on.
        let _ = (&wake_tx).write(&[1u8]);
    });
    crate::signals::with_signals_blocked(|| Engine::start(2, 65_536, wake))
}

/// Wait for the latch, the engine's socket, or the timeout.
fn wait(fd: i32, timeout: Duration) {
    let events = pg_sys::WL_LATCH_SET
        | pg_sys::WL_SOCKET_READABLE
        | pg_sys::WL_TIMEOUT
        | pg_sys::WL_EXIT_ON_PM_DEATH;
    // SAFETY: MyLatch is this process's latch; fd is our own socket, open for the whole loop.
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd,
            timeout.as_millis().min(i64::MAX as u128) as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

fn drain(socket: &UnixStream) {
    let mut buf = [0u8; 256];
    let mut s = socket;
    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
}

impl Worker {
    fn run(&mut self, wake_rx: &UnixStream) -> Exit {
        let mut last_poll: Option<Instant> = None;
        loop {
            let interval = Duration::from_millis(gucs::POLL_INTERVAL_MS.get().max(10) as u64);
            let mut timeout = last_poll
                .map(|t| interval.saturating_sub(t.elapsed()))
                .unwrap_or_default();
            match &self.retry {
                Some((_, at)) => {
                    timeout = timeout.min(at.saturating_duration_since(Instant::now()))
                }
                // Events left from a turn that could not take them (a retried batch) are not
                // announced again by the engine: go straight for them.
                None if self.engine.has_events() => timeout = Duration::ZERO,
                None => {}
            }
            wait(wake_rx.as_raw_fd(), timeout);
            if BackgroundWorker::sigterm_received() {
                return Exit::Stop;
            }
            if BackgroundWorker::sighup_received() {
                // SAFETY: reloading the configuration file is what SIGHUP asks for.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                // The retention settings may have changed.
                self.maintenance.soon();
            }
            pgrx::check_for_interrupts!();
            drain(wake_rx);

            let Some(flags) = self.take_wake_flags() else {
                return Exit::SlotLost;
            };
            let tick = last_poll.is_none_or(|t| t.elapsed() >= interval);
            if tick {
                last_poll = Some(Instant::now());
                // Rows can reach the outbox without a wake-up (written directly, a prepared
                // transaction committed elsewhere): look at all of it now and then.
                for rt in self.brokers.values_mut() {
                    rt.floor = 0;
                }
            }
            let restart = std::mem::take(&mut self.restart_failed);
            if (tick || restart || flags & WAKE_CONFIG != 0) && !self.reload_config() {
                // Hand back the wake-up we took: it may be the CREATE EXTENSION that replaced
                // ours (DROP and CREATE in one transaction), which wants a fresh worker.
                if let Some(slot) = SHARED.exclusive().db_mut(self.dboid) {
                    slot.wake_flags |= flags;
                }
                return Exit::ExtensionChanged;
            }
            // Newly committed messages go out first, before acknowledged ones are recorded:
            // recording ends in a commit that waits for the disk, and a message committed a
            // moment ago should not wait behind it. (Rows delivered and not yet recorded are
            // still in flight as far as the fetch goes, so none is sent twice.)
            // While a batch waits for a retry nothing new goes out: its delivered and rejected
            // rows are still in the outbox, and tasks it would have heard stop from may still
            // be writing.
            let woken = flags & WAKE_OUTBOX != 0;
            if self.retry.is_none() && woken {
                self.send_outbox();
            }
            let progressed = self.process_events();
            if self.retry.is_none() && (tick || progressed) {
                self.send_outbox();
            }
            if self.stale_version.is_none() && self.retry.is_none() && self.maintenance.due() {
                maintenance::run(&self.schema, self.dboid);
                self.maintenance.ran();
            }
            // A background worker reports its table statistics only when asked to: without
            // this, pg_stat_user_tables would not show what it stored until it exits.
            // SAFETY: between transactions; rate-limited by PostgreSQL itself.
            unsafe { pg_sys::pgstat_report_stat(false) };
        }
    }

    /// Stop every connection and store what the engine still holds (for at most a second), so
    /// that a clean stop (SIGTERM, server shutdown) keeps what was already received.
    fn shutdown(mut self, wake_rx: &UnixStream) {
        let deadline = Instant::now() + Duration::from_secs(1);
        // A batch the database keeps refusing is dropped: none of it was acknowledged, so the
        // brokers send those messages again, and the delivered rows are still in the outbox.
        self.retry = None;
        // Store what has arrived while the connections are still up, so their acknowledgements
        // reach the broker (ahead of the DISCONNECT) and it does not send those messages again.
        while self.engine.has_events() && self.retry.is_none() && Instant::now() < deadline {
            self.process_events();
        }
        self.engine.set_brokers(Vec::new());
        while self.engine.running_tasks() > 0 && Instant::now() < deadline {
            // The engine writes to the socket whenever it has events; the timeout only bounds
            // the wait for a task that has nothing more to say.
            wait(wake_rx.as_raw_fd(), Duration::from_millis(50));
            drain(wake_rx);
            if self.retry.is_none() {
                self.process_events();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.engine.has_events() && self.retry.is_none() && Instant::now() < deadline {
            self.process_events();
        }
        self.engine.shutdown(Duration::from_millis(200));
    }

    /// Take the wake reasons backends left; None when the slot is no longer ours.
    /// Take the wake reasons backends left; None when the slot is no longer ours. Outbox rows
    /// committed below what was handed out already are looked for again.
    fn take_wake_flags(&mut self) -> Option<u32> {
        // SAFETY: MyProcPid is set in every process.
        let me = unsafe { pg_sys::MyProcPid };
        let (flags, low) = {
            let mut shared = SHARED.exclusive();
            match shared.db_mut(self.dboid) {
                Some(slot) if slot.pid == me && slot.state == DbState::Running => (
                    std::mem::take(&mut slot.wake_flags),
                    std::mem::replace(&mut slot.outbox_low, i64::MAX),
                ),
                _ => return None,
            }
        };
        if flags & WAKE_OUTBOX != 0 {
            for rt in self.brokers.values_mut() {
                rt.floor = rt.floor.min(low.saturating_sub(1)).max(0);
            }
        }
        Some(flags)
    }

    /// Update this database's status slot for one broker.
    fn with_status(&self, broker_id: i32, f: impl FnOnce(&mut shmem::BrokerSlot)) {
        let mut shared = SHARED.exclusive();
        if let Some(b) = shared
            .db_mut(self.dboid)
            .and_then(|slot| slot.broker_mut(broker_id))
        {
            f(b);
        }
    }

    /// With mqtt_pg.log_connections, one LOG line for a connection event of a broker.
    fn log_connection(&self, broker_id: i32, what: &str) {
        if !gucs::LOG_CONNECTIONS.get() {
            return;
        }
        let name = self
            .brokers
            .get(&broker_id)
            .and_then(|b| b.config.as_ref())
            .map(|c| c.name.as_str())
            .unwrap_or("?");
        log!(
            "mqtt_pg broker \"{name}\" (id {broker_id}) in database {}: {what}",
            self.dboid
        );
    }

    /// The broker's connection is gone, for `error`.
    fn mark_disconnected(&self, broker_id: i32, error: &str, now: i64) {
        self.with_status(broker_id, |s| {
            s.state = LinkState::Disconnected;
            s.since_us = now;
            s.set_error(error, now);
        });
    }

    /// Store one bounded batch of engine events in one transaction. Returns true when anything
    /// changed that may let more outbox rows go (a delivery, a new connection).
    fn process_events(&mut self) -> bool {
        if let Some((batch, at)) = self.retry.take() {
            if Instant::now() < at {
                self.retry = Some((batch, at));
                return false;
            }
            return self.store(batch);
        }
        let max = gucs::INGEST_BATCH_SIZE.get().max(1) as usize;
        let mut events = Vec::new();
        self.engine
            .drain_events_within(&mut events, max, store::MAX_BATCH_BYTES);
        if events.is_empty() {
            return false;
        }
        let mut batch = store::Batch::default();
        let mut progressed = false;
        let now = shmem::now_us();
        for ev in events {
            match ev {
                Event::Received(m) => batch.received.push(m),
                Event::Delivered {
                    broker_id,
                    outbox_id,
                    pkid,
                } => {
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        b.in_flight.remove(&outbox_id);
                        b.retired.remove(&outbox_id);
                        b.strikes.remove(&outbox_id);
                    }
                    batch.delivered.push((broker_id, outbox_id, pkid));
                    progressed = true;
                }
                Event::Rejected {
                    broker_id,
                    outbox_id,
                    error,
                } => {
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        b.in_flight.remove(&outbox_id);
                        b.retired.remove(&outbox_id);
                    }
                    batch.rejected.push((outbox_id, error));
                    progressed = true;
                }
                Event::Connecting { broker_id } => self.with_status(broker_id, |s| {
                    if s.state != LinkState::Connecting {
                        s.state = LinkState::Connecting;
                        s.since_us = now;
                    }
                }),
                Event::Connected {
                    broker_id, epoch, ..
                } => {
                    let mut reconnect = false;
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        reconnect = b.ever_connected;
                        b.ever_connected = true;
                        b.connected = true;
                        b.epoch = epoch;
                        b.forget_in_flight();
                    }
                    self.with_status(broker_id, |s| {
                        s.state = LinkState::Connected;
                        s.since_us = now;
                        if reconnect {
                            s.reconnects += 1;
                        }
                    });
                    self.log_connection(broker_id, "connected");
                    progressed = true;
                }
                Event::ConnectionLost {
                    broker_id,
                    error,
                    suspect,
                } => {
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        b.connected = false;
                        // The engine forgot them: they are resent from the outbox.
                        b.forget_in_flight();
                        if let Some(id) = suspect {
                            let strikes = b.strikes.entry(id).or_default();
                            *strikes += 1;
                            if *strikes >= STRIKES_TO_DEAD_LETTER {
                                b.strikes.remove(&id);
                                batch.rejected.push((
                                    id,
                                    format!(
                                        "the broker closed the connection {STRIKES_TO_DEAD_LETTER} times \
                                         while this message was the oldest unacknowledged one: a \
                                         message larger than the broker accepts does that (mosquitto: \
                                         max_packet_size), and so do a flapping link or two clients \
                                         sharing one client id. Last error: {error}"
                                    ),
                                ));
                                progressed = true;
                            }
                        }
                    }
                    self.log_connection(broker_id, &format!("disconnected: {error}"));
                    self.mark_disconnected(broker_id, &error, now);
                }
                Event::Failed { broker_id, error } => {
                    warning!("mqtt_pg broker {broker_id}: {error}");
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        b.connected = false;
                        b.forget_in_flight();
                        b.subs.clear(); // the new task knows none yet
                    }
                    self.mark_disconnected(broker_id, &error, now);
                    self.restart_failed = true;
                }
                Event::Warning { broker_id, error } => {
                    self.with_status(broker_id, |s| s.set_error(&error, now))
                }
                Event::Stopped { broker_id } => {
                    // A replaced task has written its last: what it did not deliver goes to
                    // the new connection.
                    if let Some(b) = self.brokers.get_mut(&broker_id) {
                        if b.retiring > 0 {
                            b.retiring -= 1;
                            if b.retiring == 0 {
                                b.release_retired();
                                progressed = true;
                            }
                        }
                    }
                }
            }
        }
        self.store(batch) && progressed
    }

    /// Store a batch in one transaction and, once it has committed, acknowledge its messages.
    /// False when the database refused it for a passing reason: it is tried again later.
    fn store(&mut self, batch: store::Batch) -> bool {
        let stored = BackgroundWorker::transaction(|| {
            store::store(&self.schema, &batch, &self.routes, &self.held)
        });
        let outcome = match stored {
            Ok(outcome) => outcome,
            Err(e) => {
                warning!(
                    "mqtt_pg could not store {} received and {} delivered messages ({e}); \
                     trying again in a moment, nothing is acknowledged meanwhile",
                    batch.received.len(),
                    batch.delivered.len(),
                );
                // Its delivered rows are still in the outbox; nothing is sent meanwhile (see
                // `run`), so none of them goes out again.
                self.retries += 1;
                let delay = RETRY_AFTER * 2u32.pow(self.retries.min(5) - 1);
                self.retry = Some((batch, Instant::now() + delay.min(RETRY_MAX)));
                return false;
            }
        };
        self.retries = 0;
        if outcome.held_met {
            self.held.message = None;
        }
        self.held.alone = self.held.alone.saturating_sub(outcome.alone_used);
        // Committed: now, and only now, the broker may forget these messages.
        self.engine.ack(outcome.acks);
        let now = shmem::now_us();
        for (broker_id, t) in outcome.counts {
            self.with_status(broker_id, |s| {
                s.count(true, t.received, t.received_bytes, now);
                s.count(false, t.sent, t.sent_bytes, now);
            });
        }
        for line in outcome.log {
            log!("{line}");
        }
        true
    }

    /// Re-read brokers and subscriptions and make the engine match. False when the extension
    /// is gone from this database, or is not the one this worker started with.
    fn reload_config(&mut self) -> bool {
        let extension = self.extension;
        let Some(loaded) = BackgroundWorker::transaction(|| {
            let installed = catalog::installed()?;
            if installed.oid != extension {
                return None;
            }
            if !installed.current() {
                return Some(Err(installed.version.clone()));
            }
            let schema = &installed.schema;
            let routes = Spi::connect(|client| crate::routing::load(client, schema, None));
            outbox::set_aside_orphans(schema);
            Some(Ok((config::load(schema), routes)))
        }) else {
            return false;
        };
        let (loaded, routes) = match loaded {
            Ok(loaded) => {
                if let Some(old) = self.stale_version.take() {
                    log!(
                        "mqtt_pg worker for database {}: the extension was updated from version {old} \
                         to {}; resuming",
                        self.dboid,
                        catalog::LIBRARY_VERSION
                    );
                    self.maintenance.soon();
                }
                loaded
            }
            Err(version) => {
                self.idle_for_update(version);
                return true;
            }
        };
        self.routes = routes;
        let now = shmem::now_us();
        // Brokers no longer active: forget them and their status.
        let gone: Vec<i32> = self
            .brokers
            .keys()
            .filter(|id| !loaded.iter().any(|l| l.id == **id))
            .copied()
            .collect();
        for id in gone {
            self.brokers.remove(&id);
            let mut shared = SHARED.exclusive();
            if let Some(slot) = shared.db_mut(self.dboid) {
                for b in slot.brokers.iter_mut().filter(|b| b.broker_id == id) {
                    b.broker_id = 0;
                }
            }
        }
        let mut configs = Vec::new();
        for l in &loaded {
            let rt = self.brokers.entry(l.id).or_default();
            rt.config = l.config.clone();
            if rt.config.is_none() {
                // No connection for it any more (set_brokers below stops it): nothing is in
                // flight and nothing may be handed out until it can connect again.
                rt.connected = false;
                rt.forget_in_flight();
            }
            if let Some(c) = &l.config {
                configs.push(c.clone());
            }
            let problem = l.problem.clone();
            self.with_status(l.id, |s| {
                if let Some(p) = &problem {
                    if s.last_error() != Some(p.as_str()) {
                        s.set_error(p, now);
                    }
                    if l.config.is_none() {
                        s.state = LinkState::Disconnected;
                    }
                }
            });
        }
        let had_task: Vec<i32> = configs
            .iter()
            .map(|c| c.id)
            .filter(|id| self.engine.has_broker(*id))
            .collect();
        for id in self.engine.set_brokers(configs) {
            if let Some(rt) = self.brokers.get_mut(&id) {
                rt.connected = false;
                if had_task.contains(&id) {
                    rt.retire();
                } else {
                    rt.forget_in_flight();
                }
                rt.subs.clear(); // a new task knows no subscriptions yet
            }
            self.with_status(id, |s| {
                s.state = LinkState::Connecting;
                s.since_us = now;
            });
        }
        for l in loaded {
            if let Some(rt) = self.brokers.get_mut(&l.id) {
                if rt.config.is_some() && rt.subs != l.subs {
                    rt.subs = l.subs.clone();
                    self.engine.set_subscriptions(l.id, l.subs);
                }
            }
        }
        true
    }

    /// The SQL objects are of another version than this library: close every connection and
    /// wait (polling) for `ALTER EXTENSION mqtt_pg UPDATE`. Nothing queued is lost: the outbox
    /// keeps its rows and the brokers keep the persistent sessions' messages meanwhile.
    fn idle_for_update(&mut self, version: String) {
        if self.stale_version.as_deref() != Some(version.as_str()) {
            warning!(
                "mqtt_pg worker for database {}: the extension is at version {version} in this \
                 database but the library is version {}; sending and receiving wait for \
                 ALTER EXTENSION mqtt_pg UPDATE",
                self.dboid,
                catalog::LIBRARY_VERSION
            );
        }
        self.stale_version = Some(version);
        if !self.brokers.is_empty() {
            let now = shmem::now_us();
            self.engine.set_brokers(Vec::new());
            let ids: Vec<i32> = self.brokers.drain().map(|(id, _)| id).collect();
            for id in ids {
                self.mark_disconnected(id, "waiting for ALTER EXTENSION mqtt_pg UPDATE", now);
            }
        }
    }

    /// Hand newly committed outbox rows of every connected broker to the engine.
    fn send_outbox(&mut self) {
        let batch = gucs::PUBLISH_BATCH_SIZE.get().max(1) as usize;
        let max_in_flight = gucs::MAX_IN_FLIGHT.get().max(1) as usize;
        let brokers = &mut self.brokers;
        let engine = &self.engine;
        BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
            for (id, rt) in brokers.iter_mut().filter(|(_, rt)| rt.connected) {
                let taken = rt.in_flight.len() + rt.retired.len();
                let mut room = max_in_flight.saturating_sub(taken).min(batch);
                // While a row is suspected of making the broker close the connection (see
                // STRIKES_TO_DEAD_LETTER), the oldest row goes alone until it is acknowledged:
                // with others written behind it, a broker that resets the connection can take
                // the acknowledgement of an innocent row ahead of the culprit with it, and the
                // blame would fall on that row.
                let probation = !rt.strikes.is_empty();
                if probation {
                    room = if taken == 0 { 1 } else { 0 };
                }
                let byte_room = outbox::MAX_IN_FLIGHT_BYTES.saturating_sub(rt.in_flight_bytes());
                if room == 0 || byte_room == 0 {
                    continue;
                }
                let floor = rt.floor;
                let above = rt
                    .in_flight
                    .keys()
                    .chain(rt.retired.keys())
                    .filter(|row| **row > floor)
                    .count();
                let (msgs, consumed) =
                    outbox::fetch(*id, floor, above, |row| rt.is_taken(row), room, byte_room);
                if probation
                    && msgs
                        .first()
                        .is_none_or(|m| !rt.strikes.contains_key(&m.outbox_id))
                {
                    // The suspects are gone (delivered, dead-lettered or deleted): no probation.
                    rt.strikes.clear();
                }
                if msgs.is_empty() {
                    // Everything read up to `consumed` is in flight or retired already.
                    rt.floor = rt.floor.max(consumed);
                    continue;
                }
                let sizes: Vec<(i64, usize)> = msgs
                    .iter()
                    .map(|m| (m.outbox_id, m.payload.len()))
                    .collect();
                if engine.publish(*id, rt.epoch, msgs) {
                    rt.in_flight.extend(sizes);
                    rt.floor = rt.floor.max(consumed);
                }
            }
        }));
    }
}
