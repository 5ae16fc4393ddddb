//! Messages that `mqtt_publish` and row triggers have queued but not yet written to
//! `mqtt_outbox`.
//!
//! One INSERT per message would make a bulk publish (or a bulk UPDATE of a watched table) many
//! times slower than an INSERT ... SELECT of the same rows: each would be parsed, planned and
//! executed on its own. So a call only checks and keeps the message here, and the rows go into
//! the outbox in one set-based INSERT through a plan prepared once per backend:
//! - at the end of the statement that queued them (an `ExecutorFinish` hook, and after utility
//!   statements such as COPY, see `ddl`), so they are in the outbox, in order, before the next
//!   statement of the transaction runs;
//! - before any other statement starts (an `ExecutorStart` hook): a PL/pgSQL assignment
//!   `x := mqtt_publish(...)` or IF condition is evaluated without an executor of its own, and
//!   the function's next query must see the row all the same;
//! - when the buffer grows large, so memory stays bounded;
//! - at the latest before commit or PREPARE (deferred constraint triggers fire there).
//!
//! Each message remembers the subtransaction that queued it: a ROLLBACK TO SAVEPOINT (or an
//! exception block that catches an error) drops what it queued, and a transaction abort drops
//! everything, so a rolled-back change is never sent.

use std::cell::{Cell, RefCell};

use pgrx::prelude::*;
use pgrx::{PgBuiltInOids, PgOid};

use crate::{catalog, plans, security};

// commands/sequence.h, which pgrx does not bind.
unsafe extern "C-unwind" {
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// One message queued by `mqtt_publish` or a row trigger.
struct Pending {
    subxact: pg_sys::SubTransactionId,
    /// The outbox id, taken when the message is queued: the outbox is sent in id order, so
    /// the messages keep the order of the changes and `mqtt_publish` calls, whenever the rows
    /// are written (a row queued in an enclosing subtransaction waits for it).
    id: i64,
    broker_id: i32,
    topic: String,
    payload: Vec<u8>,
    qos: i16,
    retain: bool,
    /// MQTT 5 properties as normalized JSON text; None when there are none.
    properties: Option<String>,
}

impl Pending {
    /// Bytes it holds, for the flush threshold.
    fn size(&self) -> usize {
        self.payload.len() + self.topic.len() + self.properties.as_ref().map_or(0, String::len)
    }
}

/// Write the buffer out once it holds this many messages or payload bytes.
const FLUSH_ROWS: usize = 10_000;
const FLUSH_BYTES: usize = 16 << 20;

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
    static BYTES: Cell<usize> = const { Cell::new(0) };
    /// Set while the buffer is being written, so the INSERT's own ExecutorFinish does not
    /// try again.
    static FLUSHING: Cell<bool> = const { Cell::new(false) };
    /// The snapshots of the statements whose executors are running (started, not ended), so
    /// that a statement's snapshot is never moved while another statement uses it. An executor
    /// an error abandons leaves its entry until the transaction ends: that only ever keeps a
    /// snapshot from moving.
    static RUNNING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

static mut PREV_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;
static mut PREV_EXECUTOR_END: pg_sys::ExecutorEnd_hook_type = None;

/// Install the hook and the transaction callbacks. Called once, from `_PG_init`.
pub fn init() {
    // SAFETY: _PG_init runs once per process before any query; chaining the previous hook is
    // what every extension with an executor hook does.
    unsafe {
        PREV_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(executor_finish);
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
        PREV_EXECUTOR_END = pg_sys::ExecutorEnd_hook;
        pg_sys::ExecutorEnd_hook = Some(executor_end);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

/// Queue one message for `mqtt_outbox` (its checks done by the caller) and have the worker
/// woken when the transaction commits; returns its outbox id. `outbox_seq` is
/// `mqtt_outbox_id_seq` (see `catalog::Installed`).
pub fn queue(
    outbox_seq: pg_sys::Oid,
    broker_id: i32,
    topic: String,
    payload: Vec<u8>,
    qos: i16,
    retain: bool,
    properties: Option<String>,
) -> i64 {
    // SAFETY: nextval of the extension's own sequence; no permission check, as the row is
    // written as the extension's owner. The subtransaction id is a plain read.
    let (id, subxact) = unsafe {
        (
            nextval_internal(outbox_seq, false),
            pg_sys::GetCurrentSubTransactionId(),
        )
    };
    push(Pending {
        subxact,
        id,
        broker_id,
        topic,
        payload,
        qos,
        retain,
        properties,
    });
    crate::wake::queued_at_commit(id);
    id
}

/// Keep one message; writes the buffer out when it is full.
fn push(p: Pending) {
    let full = PENDING.with(|q| {
        let mut q = q.borrow_mut();
        BYTES.set(BYTES.get() + p.size());
        q.push(p);
        q.len() >= FLUSH_ROWS || BYTES.get() >= FLUSH_BYTES
    });
    if full {
        write(true);
    }
}

/// The messages this subtransaction may write now. A message queued by an enclosing
/// subtransaction must not be written from inside this one: should this one roll back (an
/// exception block in another trigger, say), it would take the row with it while the change
/// that queued it commits. So while such a message waits, everything waits (keeping the
/// order), unless the buffer is full: then this level writes its own.
fn take(full: bool) -> Vec<Pending> {
    // SAFETY: a plain read of the transaction state.
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PENDING.with(|q| {
        let mut q = q.borrow_mut();
        let out = if q.iter().all(|p| p.subxact >= current) {
            std::mem::take(&mut *q)
        } else if full {
            let (mine, theirs) = std::mem::take(&mut *q)
                .into_iter()
                .partition(|p| p.subxact >= current);
            *q = theirs;
            mine
        } else {
            Vec::new()
        };
        BYTES.set(q.iter().map(Pending::size).sum());
        out
    })
}

/// Does the buffer still hold a message for one of these brokers?
pub fn holds_broker(ids: &[i32]) -> bool {
    PENDING.with(|q| q.borrow().iter().any(|p| ids.contains(&p.broker_id)))
}

fn is_empty() -> bool {
    PENDING.with(|q| q.try_borrow().map_or(true, |q| q.is_empty()))
}

/// Write every queued message into `mqtt_outbox`, in the order queued, with one INSERT. The
/// messages were checked against the access rules when queued; the row is written as the
/// extension's owner, as `mqtt_publish` writes its own.
pub fn flush() {
    write(false);
}

/// Write what may be written now (see [`take`]); true when rows were written.
fn write(full: bool) -> bool {
    // SAFETY: a plain read of the transaction state.
    if FLUSHING.get() || is_empty() || !unsafe { pg_sys::IsTransactionState() } {
        return false;
    }
    let rows = take(full);
    if rows.is_empty() {
        return false;
    }
    FLUSHING.set(true);
    let _reset = scopeguard(|| FLUSHING.set(false));
    let installed = catalog::installed_or_raise();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let broker: Vec<i32> = rows.iter().map(|r| r.broker_id).collect();
    let topic: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
    let payload: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
    let qos: Vec<i16> = rows.iter().map(|r| r.qos).collect();
    let retain: Vec<bool> = rows.iter().map(|r| r.retain).collect();
    // Properties are rare: a statement without them keeps the six-array INSERT, so the
    // common bulk publish does not pay for a seventh array of NULLs and its cast. With them,
    // created_at is the moment the rows are written (at the end of the statement that queued
    // them), not the transaction's start (now()): a message_expiry counts from there, so the
    // work a transaction did before it published does not use it up.
    let properties: Option<Vec<Option<&str>>> = rows
        .iter()
        .any(|r| r.properties.is_some())
        .then(|| rows.iter().map(|r| r.properties.as_deref()).collect());
    // At commit, after COPY, or in a portal's clean-up there is no active snapshot, which SPI
    // needs; the transaction's own serves (a transaction abort pops it if the INSERT fails).
    // SAFETY: snapshot stack calls inside a transaction, balanced below.
    let pushed = unsafe {
        let push = !pg_sys::ActiveSnapshotSet();
        if push {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
        push
    };
    security::as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let arg = PgOid::BuiltIn;
            let mut types = vec![
                arg(PgBuiltInOids::INT8ARRAYOID),
                arg(PgBuiltInOids::INT4ARRAYOID),
                arg(PgBuiltInOids::TEXTARRAYOID),
                arg(PgBuiltInOids::BYTEAARRAYOID),
                arg(PgBuiltInOids::INT2ARRAYOID),
                arg(PgBuiltInOids::BOOLARRAYOID),
            ];
            let mut args = vec![
                ids.into(),
                broker.into(),
                topic.into(),
                payload.into(),
                qos.into(),
                retain.into(),
            ];
            let with_properties = properties.is_some();
            if let Some(properties) = properties {
                types.push(arg(PgBuiltInOids::TEXTARRAYOID));
                args.push(properties.into());
            }
            let schema = &installed.schema;
            let sql = || {
                if with_properties {
                    format!(
                        "INSERT INTO {schema}.mqtt_outbox (id, broker_id, topic, payload, qos, retain, properties, created_at) \
                         SELECT i, b, t, p, q, r, j::pg_catalog.jsonb, pg_catalog.clock_timestamp() \
                         FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), \
                           pg_catalog.unnest($3), pg_catalog.unnest($4), \
                           pg_catalog.unnest($5), pg_catalog.unnest($6), \
                           pg_catalog.unnest($7)) AS x(i, b, t, p, q, r, j)"
                    )
                } else {
                    format!(
                        "INSERT INTO {schema}.mqtt_outbox (id, broker_id, topic, payload, qos, retain) \
                         SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), \
                           pg_catalog.unnest($3), pg_catalog.unnest($4), \
                           pg_catalog.unnest($5), pg_catalog.unnest($6))"
                    )
                }
            };
            let key = if with_properties {
                "outbox_insert_properties"
            } else {
                "outbox_insert"
            };
            plans::with_plan(client, installed.oid, key, &types, sql, |client, stmt| {
                if let Err(e) = client.update(stmt, None, &args) {
                    error!("mqtt_pg could not queue messages in mqtt_outbox: {e}");
                }
            })
        })
    });
    if pushed {
        // SAFETY: pops the snapshot pushed above.
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    true
}

/// Runs `f` when dropped, also when an ERROR unwinds through.
fn scopeguard(f: impl FnMut()) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    Guard(f)
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // Messages queued by an expression that ran without an executor of its own (a PL/pgSQL
    // assignment `x := mqtt_publish(...)`, an IF condition) go in first, and this statement
    // must see them, as it would have seen a row mqtt_publish inserted at once. Its snapshot
    // was taken before they were written, so it moves on to the command that wrote them, as
    // SPI moves a statement's snapshot on to the commands before it. Only a snapshot no running
    // statement uses may move: a read-only query (inside a STABLE function) runs on the
    // snapshot of the statement that called it, which must not start seeing its own writes
    // half-way; then the rows wait for a later statement, or the end of this one.
    // SAFETY: a read of the query's snapshot pointer.
    let snapshot = unsafe { (*query).snapshot };
    let own = !snapshot.is_null() && RUNNING.with(|r| !r.borrow().contains(&(snapshot as usize)));
    if own && write(false) {
        // SAFETY: no running statement uses the snapshot (checked above) and this one has not
        // started; CommandCounterIncrement makes the rows just written visible to a snapshot
        // with the new command id.
        unsafe {
            pg_sys::CommandCounterIncrement();
            (*(*query).snapshot).curcid = pg_sys::GetCurrentCommandId(false);
        }
    }
    // SAFETY: the previous hook (or the standard function) with what it was given.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => prev(query, eflags),
            None => pg_sys::standard_ExecutorStart(query, eflags),
        }
    }
    RUNNING.with(|r| r.borrow_mut().push(snapshot as usize));
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_end(query: *mut pg_sys::QueryDesc) {
    // SAFETY: a read of the query's snapshot pointer, before the executor frees anything.
    let snapshot = unsafe { (*query).snapshot } as usize;
    RUNNING.with(|r| {
        let mut r = r.borrow_mut();
        if let Some(i) = r.iter().rposition(|s| *s == snapshot) {
            r.remove(i);
        }
    });
    // SAFETY: the previous hook (or the standard function) with the query it was given.
    unsafe {
        match PREV_EXECUTOR_END {
            Some(prev) => prev(query),
            None => pg_sys::standard_ExecutorEnd(query),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_finish(query: *mut pg_sys::QueryDesc) {
    // SAFETY: the previous hook (or the standard function) with the query it was given.
    unsafe {
        match PREV_EXECUTOR_FINISH {
            Some(prev) => prev(query),
            None => pg_sys::standard_ExecutorFinish(query),
        }
    }
    // The statement's AFTER triggers have fired by now (standard_ExecutorFinish runs them).
    flush();
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        // Still inside the transaction: an ERROR here aborts it, as it should.
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT | pg_sys::XactEvent::XACT_EVENT_PRE_PREPARE => {
            flush()
        }
        pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => RUNNING.with(|r| {
            if let Ok(mut r) = r.try_borrow_mut() {
                r.clear();
            }
        }),
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            RUNNING.with(|r| {
                if let Ok(mut r) = r.try_borrow_mut() {
                    r.clear();
                }
            });
            // try_borrow_mut: a panic here would stop the server.
            PENDING.with(|q| {
                if let Ok(mut q) = q.try_borrow_mut() {
                    q.clear();
                }
            });
            BYTES.set(0);
            FLUSHING.set(false);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // Subtransaction ids grow within a transaction: what the aborted one and its children
        // queued has an id at least its own; what its parents queued before it, a smaller one.
        PENDING.with(|q| {
            if let Ok(mut q) = q.try_borrow_mut() {
                q.retain(|p| p.subxact < my_subid);
                BYTES.set(q.iter().map(Pending::size).sum());
            }
        });
        FLUSHING.set(false);
    }
}
