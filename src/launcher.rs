//! The launcher: one static background worker that starts a worker per database.
//!
//! A background worker connects to exactly one database, and mqtt_pg serves every database it
//! is installed in, so a launcher (connected to none, like autovacuum's) watches `pg_database`
//! and the slots in shared memory. At start it probes every database once; afterwards a
//! database gets a worker when a backend there asks for one (CREATE EXTENSION, any mqtt_pg
//! configuration change, any publish: see `wake::wake_now`). A worker that dies is started
//! again after a pause; one that finds no extension gives its slot back and is left alone
//! until asked.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::catalog;
use crate::shmem::{self, DbState, MAX_DATABASES, SHARED};

/// Pause before starting a worker again after it stopped unexpectedly.
const RESTART_DELAY_US: i64 = 5_000_000;
/// The launcher looks at its workers at least this often even when nobody wakes it.
const NAPTIME: Duration = Duration::from_secs(10);
/// Workers starting at once, at most: after a restart every database is probed, and a cluster
/// with many databases must not exhaust max_worker_processes doing it.
const MAX_STARTING: usize = 4;

/// Register the launcher; called from `_PG_init` while shared_preload_libraries is loading.
pub fn register() {
    BackgroundWorkerBuilder::new("mqtt_pg launcher")
        .set_type("mqtt_pg launcher")
        .set_library("mqtt_pg")
        .set_function("mqtt_pg_launcher_main")
        .enable_shmem_access(None)
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Is the worker behind this slot still alive?
fn alive(handle: Option<&DynamicBackgroundWorker>, pid: i32) -> bool {
    match handle {
        Some(h) => match h.pid() {
            Ok(_) => true,
            Err(BackgroundWorkerStatus::NotYetStarted) => true,
            Err(_) => false,
        },
        // SAFETY: kill with signal 0 only checks that the process exists.
        None => pid > 0 && unsafe { libc::kill(pid, 0) } == 0,
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn mqtt_pg_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    SHARED.exclusive().launcher_latch = shmem::my_latch();
    log!("mqtt_pg launcher started");

    let mut handles: HashMap<u32, DynamicBackgroundWorker> = HashMap::new();
    // After a (re)start nobody remembers which databases use mqtt_pg: probe each once, a few at
    // a time. A probe that finds no extension gives its slot back, so the 32 slots are only
    // ever held by databases that use mqtt_pg, however many databases the cluster has.
    // Databases that appear (created, or accepting connections again) are probed the same way.
    let mut to_probe: VecDeque<u32> = VecDeque::new();
    let mut known: Vec<u32> = Vec::new();
    let mut warned_full = false;
    loop {
        let databases = BackgroundWorker::transaction(catalog::database_oids);
        to_probe.extend(databases.iter().filter(|oid| !known.contains(oid)));
        known = databases.clone();
        to_probe.retain(|oid| databases.contains(oid));
        let now = shmem::now_us();
        let mut to_start = Vec::new();
        let mut next_wake = NAPTIME;
        {
            let mut shared = SHARED.exclusive();
            let mut starting = shared
                .dbs
                .iter()
                .filter(|d| d.state == DbState::Starting)
                .count();
            for slot in shared.dbs.iter_mut() {
                if slot.state == DbState::Free {
                    continue;
                }
                let has_worker = matches!(slot.state, DbState::Starting | DbState::Running);
                let is_alive = has_worker && alive(handles.get(&slot.dboid), slot.pid);
                if !databases.contains(&slot.dboid) {
                    // Dropped, or no longer accepting connections: its worker must go too, and
                    // the slot is only given back once it has (never two workers for one
                    // database).
                    if is_alive {
                        if slot.pid > 0 {
                            // SAFETY: signalling our own worker; SIGTERM ends its loop.
                            unsafe { libc::kill(slot.pid, libc::SIGTERM) };
                        }
                        next_wake = next_wake.min(Duration::from_millis(500));
                    } else {
                        handles.remove(&slot.dboid);
                        slot.clear();
                    }
                    continue;
                }
                if has_worker && !is_alive {
                    // It stopped without giving its slot back: an error, a crash or
                    // pg_terminate_backend. Start it again after a pause.
                    handles.remove(&slot.dboid);
                    slot.state = DbState::Wanted;
                    slot.pid = 0;
                    slot.latch = 0;
                    slot.not_before_us = now + RESTART_DELAY_US;
                }
                if slot.state == DbState::Wanted
                    && handles.get(&slot.dboid).is_some_and(|h| alive(Some(h), 0))
                {
                    // The previous worker (told to step aside) has not exited yet: never two.
                    next_wake = next_wake.min(Duration::from_millis(500));
                } else if slot.state == DbState::Wanted {
                    if slot.not_before_us > now {
                        let wait = Duration::from_micros((slot.not_before_us - now) as u64);
                        next_wake = next_wake.min(wait);
                    } else if starting < MAX_STARTING {
                        slot.state = DbState::Starting;
                        slot.pid = 0;
                        slot.latch = 0;
                        starting += 1;
                        to_start.push(slot.dboid);
                    }
                    // else: woken again when a starting worker claims its slot or exits.
                }
            }
            while starting < MAX_STARTING {
                let Some(oid) = to_probe.pop_front() else {
                    break;
                };
                if shared.db(oid).is_some() {
                    continue; // already served, or asked for
                }
                match shared.db_claim(oid) {
                    Some(slot) => {
                        slot.state = DbState::Starting;
                        starting += 1;
                        to_start.push(oid);
                    }
                    None => {
                        to_probe.push_front(oid);
                        if !warned_full {
                            warning!(
                                "mqtt_pg serves at most {MAX_DATABASES} databases at once; database {oid} waits for a free slot"
                            );
                            warned_full = true;
                        }
                        break;
                    }
                }
            }
        }

        for oid in to_start {
            match start_worker(oid) {
                Ok(handle) => {
                    handles.insert(oid, handle);
                }
                Err(()) => {
                    warning!(
                        "mqtt_pg could not start a worker for database {oid}: no background worker slot is free; raise max_worker_processes"
                    );
                    if let Some(slot) = SHARED.exclusive().db_mut(oid) {
                        slot.state = DbState::Wanted;
                        slot.not_before_us = shmem::now_us() + RESTART_DELAY_US;
                    }
                    next_wake = next_wake.min(Duration::from_micros(RESTART_DELAY_US as u64));
                }
            }
        }

        if !BackgroundWorker::wait_latch(Some(next_wake)) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file is what a SIGHUP asks every process to do.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    SHARED.exclusive().launcher_latch = 0;
    log!("mqtt_pg launcher stopped");
    // Exit code 1 asks the postmaster to start us again after restart_time; code 0 would end
    // the launcher for good, so a pg_terminate_backend() on it would silently leave crashed
    // workers dead and new databases unserved until the next server restart. During a server
    // shutdown nothing is restarted either way.
    // SAFETY: proc_exit runs the normal exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(1) };
}

fn start_worker(dboid: u32) -> Result<DynamicBackgroundWorker, ()> {
    // SAFETY: MyProcPid is set in every process.
    let my_pid = unsafe { pg_sys::MyProcPid };
    BackgroundWorkerBuilder::new(&format!("mqtt_pg worker for database {dboid}"))
        .set_type("mqtt_pg worker")
        .set_library("mqtt_pg")
        .set_function("mqtt_pg_worker_main")
        .enable_spi_access()
        .set_start_time(pgrx::bgworkers::BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(dboid)))
        // Tells the postmaster to set our latch when the worker starts or stops.
        .set_notify_pid(my_pid)
        .load_dynamic()
        .map_err(|_| ())
}
