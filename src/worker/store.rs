//! Writing one batch of engine events: received messages into history, delivered outbox rows
//! moved to history, rejected ones to dead letters. One transaction, a handful of statements,
//! however many messages: arrays in, `unnest` out (never one INSERT per message).
//!
//! A statement the database refuses (a trigger or constraint someone added to a table) never
//! takes the batch down: it is retried message by message in subtransactions, and whatever
//! still fails is set aside in `mqtt_dead_letter` with the error. The broker is acknowledged
//! only for messages stored in one of the two tables.

use std::collections::HashMap;

use mqtt_pg_core::batch::chunks_by_size;
use mqtt_pg_core::engine::{Ack, InMessage};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{PgBuiltInOids, PgOid, PgSqlErrorCode};

use std::cell::Cell;

use super::{hung, subxact};
use crate::routing::{exec, Route, Routes};
use crate::{gucs, plans};

/// Payload bytes of received messages stored by one INSERT (and drained from the engine for
/// one batch): PostgreSQL caps an array at 1 GB, and a batch must stay far below that.
pub const MAX_BATCH_BYTES: usize = 128 << 20;

// utils/timeout.h, which pgrx does not bind. STATEMENT_TIMEOUT is the fourth TimeoutId in
// every supported version (15 to 18).
const STATEMENT_TIMEOUT: std::ffi::c_int = 3;
unsafe extern "C-unwind" {
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
    fn disable_timeout(id: std::ffi::c_int, keep_indicator: bool);
    /// tcop/tcopprot.h: the SIGTERM handler of every backend (sets ProcDiePending).
    fn die(signal: std::ffi::c_int);
}

/// Make SIGTERM PostgreSQL's `die` (while a subscriber's code runs); returns what
/// `sigterm_restore` puts back.
#[cfg(not(feature = "pg18"))]
unsafe fn sigterm_die() -> pg_sys::pqsigfunc {
    unsafe { pg_sys::pqsignal(libc::SIGTERM, Some(die)) }
}

#[cfg(not(feature = "pg18"))]
unsafe fn sigterm_restore(previous: pg_sys::pqsigfunc) {
    unsafe { pg_sys::pqsignal(libc::SIGTERM, previous) };
}

/// PostgreSQL 18's pqsignal (`pqsignal_be`) no longer returns the previous handler: the one to
/// put back is the worker's own, which pgrx attached at start (worker/mod.rs).
#[cfg(feature = "pg18")]
struct WorkerSigterm;

#[cfg(feature = "pg18")]
unsafe fn sigterm_die() -> WorkerSigterm {
    unsafe { pg_sys::pqsignal_be(libc::SIGTERM, Some(die)) };
    WorkerSigterm
}

#[cfg(feature = "pg18")]
unsafe fn sigterm_restore(_: WorkerSigterm) {
    use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
}

thread_local! {
    /// The last chunk's routing ran into mqtt_pg.route_timeout.
    static TIMED_OUT: Cell<bool> = const { Cell::new(false) };
}

#[derive(Default)]
pub struct Batch {
    pub received: Vec<InMessage>,
    pub delivered: Vec<(i32, i64, Option<u16>)>,
    pub rejected: Vec<(i64, String)>,
}

/// Messages and payload bytes one batch stored (received) and recorded as delivered (sent)
/// for one broker.
#[derive(Default, Clone, Copy)]
pub struct Traffic {
    pub received: u64,
    pub received_bytes: u64,
    pub sent: u64,
    pub sent_bytes: u64,
}

/// What a stored batch changed: per broker traffic, and the acknowledgements the broker may
/// have once the transaction has committed. (Dead letters are counted from their table by
/// mqtt_broker_status.) With mqtt_pg.log_messages, one line per message, logged once the
/// batch has committed.
#[derive(Default)]
pub struct Outcome {
    pub counts: HashMap<i32, Traffic>,
    pub log: Vec<String>,
    pub acks: Vec<Ack>,
    /// The message that held the previous worker was met (and set aside).
    pub held_met: bool,
    /// How many of the messages to route one by one this batch took.
    pub alone_used: u32,
}

impl Outcome {
    /// A received message is in history: count it, and have it acknowledged after commit.
    fn stored(&mut self, m: &InMessage) {
        let t = self.counts.entry(m.broker_id).or_default();
        t.received += 1;
        t.received_bytes += m.payload.len() as u64;
        if crate::gucs::LOG_MESSAGES.get() {
            self.log.push(message_line(
                m.broker_id,
                "received",
                &m.topic,
                m.payload.len(),
                m.qos,
            ));
        }
        self.acks.extend(m.ack);
    }
}

/// One mqtt_pg.log_messages line: never the payload, only its size. The topic is quoted and
/// escaped (a control character in it cannot start a forged log line).
fn message_line(broker_id: i32, direction: &str, topic: &str, size: usize, qos: u8) -> String {
    format!("mqtt_pg broker {broker_id} {direction} topic {topic:?} ({size} bytes, QoS {qos})")
}

/// What a worker stopped by the hard routing limit left for this one (see `hung`).
#[derive(Default)]
pub struct Held {
    pub message: Option<u64>,
    pub alone: u32,
}

/// Store a batch, all or nothing as far as passing trouble goes: if the database fails for a
/// reason of the moment (a lock timeout, a cancel, a full disk; see `subxact::Failure`),
/// everything is rolled back and the error returned, so the caller can retry the same batch
/// later, with nothing acknowledged and nothing set aside meanwhile.
///
/// Received messages are routed (see `routing`) in the same transaction. Whatever goes wrong
/// in routing counts as the message's own, even an error that looks passing (a serialization
/// failure, a lock timeout): it runs code and tables of a subscriber's, who must not be able to
/// hold up the stream of every broker by raising one.
pub fn store(schema: &str, batch: &Batch, routes: &Routes, held: &Held) -> Result<Outcome, String> {
    subxact::run(|| store_all(schema, batch, routes, held)).map_err(|f| f.message)
}

/// Re-raise a transient failure, with its SQLSTATE (to roll back the whole batch); hand back a
/// permanent one.
fn permanent(failure: subxact::Failure) -> String {
    if failure.transient {
        ereport!(PgLogLevel::ERROR, failure.code, failure.message.clone());
    }
    failure.message
}

fn store_all(schema: &str, batch: &Batch, routes: &Routes, held: &Held) -> Outcome {
    let mut outcome = Outcome::default();
    Spi::connect_mut(|client| {
        let mut refused: Vec<(&InMessage, String)> = Vec::new();
        // A broker must never send a topic name that is empty, holds a wildcard or a NUL
        // (which text cannot hold either): such a message is kept aside, visible, rather than
        // stored as if it had come from a real topic.
        let mut received = Vec::with_capacity(batch.received.len());
        for m in &batch.received {
            match mqtt_pg_core::topic::validate_topic(&m.topic) {
                Ok(()) => received.push(m),
                Err(e) => refused.push((m, format!("the broker sent an invalid topic name: {e}"))),
            }
        }
        // The subscriptions each message goes to; a payload that cannot become rows of a
        // target table is set aside before any SQL runs.
        let mut routed: Vec<(&InMessage, Vec<&Route>)> = Vec::with_capacity(received.len());
        let mut alone: Vec<(&InMessage, Vec<&Route>)> = Vec::new();
        for m in received {
            // Hashed only while a predecessor's culprit is awaited: not on every ingest.
            if !outcome.held_met && held.message.is_some_and(|h| h == hung::message_hash(m)) {
                outcome.held_met = true;
                refused.push((m, hung::HELD_THE_WORKER.to_string()));
                continue;
            }
            let mine: Vec<&Route> = routes
                .get(&m.broker_id)
                .into_iter()
                .flatten()
                .filter(|r| r.matches(&m.topic))
                .collect();
            match exec::shape_check(&mine, &view(m, 0)) {
                // The first messages after a worker held by routing go one by one, so that the
                // one that held it is found (see `hung`).
                Ok(()) if outcome.alone_used < held.alone => {
                    outcome.alone_used += 1;
                    alone.push((m, mine));
                }
                Ok(()) => routed.push((m, mine)),
                Err(e) => refused.push((m, e)),
            }
        }
        for one in &alone {
            for m in store_chunk(client, schema, std::slice::from_ref(one), &mut refused) {
                outcome.stored(m);
            }
        }
        for chunk in chunks_by_size(&routed, MAX_BATCH_BYTES, |(m, _)| m.payload.len()) {
            for m in store_chunk(client, schema, chunk, &mut refused) {
                outcome.stored(m);
            }
        }
        for (m, error) in refused {
            let stored = subxact::run(|| dead_letter_received(client, schema, m, &error));
            match stored {
                Ok(()) => {
                    warning!(
                        "mqtt_pg set a message received on topic \"{}\" aside in mqtt_dead_letter: {error}",
                        m.topic.replace('\0', "\u{FFFD}")
                    );
                    outcome.acks.extend(m.ack);
                }
                // Not acknowledged: the broker sends it again (after a reconnect).
                Err(e) => {
                    let e = permanent(e);
                    warning!("mqtt_pg could not store a received message, nor set it aside: {e}")
                }
            }
        }
        if !batch.delivered.is_empty() {
            move_delivered(client, schema, &batch.delivered, &mut outcome);
        }
        if !batch.rejected.is_empty() {
            super::outbox::dead_letter(client, schema, &batch.rejected);
        }
    });
    outcome
}

/// The message as routing sees it, once stored under history id `id`.
fn view(m: &InMessage, id: i64) -> exec::Msg<'_> {
    exec::Msg {
        id,
        broker_id: m.broker_id,
        topic: &m.topic,
        payload: &m.payload,
        qos: m.qos as i16,
        retain: m.retain,
        message_id: m.pkid.map(i32::from),
        at_us: m.received_at_us,
        properties: m.properties.as_ref().and_then(|p| p.to_jsonb_text()),
    }
}

/// Store (and route) a chunk in a subtransaction. Should the database refuse it, the chunk is
/// split in halves until the messages it refuses stand alone, and those are set aside: a bad
/// message among a thousand costs some twenty statements, not a thousand.
fn store_chunk<'a>(
    client: &mut SpiClient<'_>,
    schema: &str,
    chunk: &[(&'a InMessage, Vec<&Route>)],
    refused: &mut Vec<(&'a InMessage, String)>,
) -> Vec<&'a InMessage> {
    TIMED_OUT.set(false);
    let stored = subxact::run(|| insert_and_route(client, schema, chunk));
    match stored {
        Ok(()) => chunk.iter().map(|(m, _)| *m).collect(),
        Err(e) => {
            let e = permanent(e);
            if let [(m, _)] = chunk {
                refused.push((m, e));
                return Vec::new();
            }
            if TIMED_OUT.get() {
                // Halving would wait out the limit at every level: take them one by one.
                let mut stored = Vec::new();
                for one in chunk {
                    stored.extend(store_chunk(
                        client,
                        schema,
                        std::slice::from_ref(one),
                        refused,
                    ));
                }
                return stored;
            }
            if chunk.len() > 1 && chunk.iter().all(|(_, r)| r.is_empty()) {
                warning!(
                    "mqtt_pg could not store a batch of {} received messages ({e}); \
                     finding the ones refused",
                    chunk.len()
                );
            }
            let (a, b) = chunk.split_at(chunk.len() / 2);
            let mut stored = store_chunk(client, schema, a, refused);
            stored.extend(store_chunk(client, schema, b, refused));
            stored
        }
    }
}

fn insert_and_route(client: &mut SpiClient<'_>, schema: &str, chunk: &[(&InMessage, Vec<&Route>)]) {
    let routed = chunk.iter().any(|(_, r)| !r.is_empty());
    let ids = insert_received(client, schema, chunk, routed);
    if !routed {
        return;
    }
    let msgs: Vec<(exec::Msg<'_>, Vec<&Route>)> = chunk
        .iter()
        .zip(ids)
        .map(|((m, r), id)| (view(m, id), r.clone()))
        .collect();
    // A single message is routed step by step, so that its error names the step.
    let describe = chunk.len() == 1;
    let limit = gucs::ROUTE_TIMEOUT_MS.get();
    // While a subscriber's code runs, SIGTERM is PostgreSQL's own `die`: a handler that loops
    // (even one catching query_canceled) cannot keep the worker from stopping; the batch is
    // not committed, so nothing is acknowledged and the broker sends it again.
    // SAFETY: the statement timeout machinery every backend has (the worker's own
    // statement_timeout is 0, so nothing else uses the timer); both are undone below on every
    // path, since subxact::run returns on error too.
    let sigterm = unsafe {
        if limit > 0 {
            enable_timeout_after(STATEMENT_TIMEOUT, limit);
        }
        sigterm_die()
    };
    if limit > 0 {
        let one = (chunk.len() == 1).then(|| hung::message_hash(chunk[0].0));
        hung::arm(limit.saturating_mul(2), one, chunk.len());
    }
    let routed = subxact::run(|| exec::route(client, schema, &msgs, describe));
    hung::disarm();
    // SAFETY: as above. A handler's session-level advisory locks are not settings and would
    // outlive its routing in the worker: released (the worker takes none of its own).
    unsafe {
        disable_timeout(STATEMENT_TIMEOUT, false);
        sigterm_restore(sigterm);
        pg_sys::LockReleaseAll(pg_sys::USER_LOCKMETHOD as _, true);
    }
    if let Err(f) = routed {
        // The timer is ours alone (the worker's statement_timeout is 0), and PostgreSQL
        // clears its indicator when it raises, so the error itself says it fired.
        let timed_out = limit > 0
            && f.code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
            && f.message.contains("statement timeout");
        if timed_out {
            TIMED_OUT.set(true);
            ereport!(
                PgLogLevel::ERROR,
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "routing took longer than mqtt_pg.route_timeout ({limit} ms): {}",
                    f.message
                )
            );
        }
        // Never "transient" (see `store`): the message is set aside, the batch goes on.
        let code = if f.transient {
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR
        } else {
            f.code
        };
        ereport!(PgLogLevel::ERROR, code, f.message);
    }
}

/// Insert received messages into history; with `returning`, their new ids, in order.
fn insert_received(
    client: &mut SpiClient<'_>,
    schema: &str,
    received: &[(&InMessage, Vec<&Route>)],
    returning: bool,
) -> Vec<i64> {
    let broker: Vec<i32> = received.iter().map(|(m, _)| m.broker_id).collect();
    let topic: Vec<&str> = received.iter().map(|(m, _)| m.topic.as_str()).collect();
    let payload: Vec<&[u8]> = received.iter().map(|(m, _)| m.payload.as_ref()).collect();
    let qos: Vec<i16> = received.iter().map(|(m, _)| m.qos as i16).collect();
    let retain: Vec<bool> = received.iter().map(|(m, _)| m.retain).collect();
    let pkid: Vec<Option<i32>> = received
        .iter()
        .map(|(m, _)| m.pkid.map(i32::from))
        .collect();
    let at: Vec<i64> = received.iter().map(|(m, _)| m.received_at_us).collect();
    let properties: Vec<Option<String>> = received
        .iter()
        .map(|(m, _)| m.properties.as_ref().and_then(|p| p.to_jsonb_text()))
        .collect();
    // RETURNING gives the rows in the order inserted, which is unnest's.
    let result = client.update(
        &format!(
            "INSERT INTO {schema}.mqtt_message_history \
             (broker_id, topic, payload, qos, retain, direction, message_id, \"timestamp\", properties) \
             SELECT b, t, p, q, r, 'receive', m, \
                    'epoch'::pg_catalog.timestamptz OPERATOR(pg_catalog.+) \
                    (u::pg_catalog.float8 OPERATOR(pg_catalog.*) '1 microsecond'::pg_catalog.interval), \
                    j::pg_catalog.jsonb \
             FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int4[]), pg_catalog.unnest($2::pg_catalog.text[]), \
                   pg_catalog.unnest($3::pg_catalog.bytea[]), pg_catalog.unnest($4::pg_catalog.int2[]), \
                   pg_catalog.unnest($5::pg_catalog.bool[]), pg_catalog.unnest($6::pg_catalog.int4[]), \
                   pg_catalog.unnest($7::pg_catalog.int8[]), pg_catalog.unnest($8::pg_catalog.text[])) \
                   AS x(b, t, p, q, r, m, u, j){}",
            if returning { " RETURNING id" } else { "" }
        ),
        None,
        &[
            broker.into(),
            topic.into(),
            payload.into(),
            qos.into(),
            retain.into(),
            pkid.into(),
            at.into(),
            properties.into(),
        ],
    );
    match result {
        Ok(rows) if returning => rows
            .filter_map(|r| r.get::<i64>(1).ok().flatten())
            .collect(),
        Ok(_) => Vec::new(),
        Err(e) => error!("mqtt_pg could not store received messages: {e}"),
    }
}

fn dead_letter_received(client: &mut SpiClient<'_>, schema: &str, m: &InMessage, error: &str) {
    let result = client.update(
        &format!(
            "INSERT INTO {schema}.mqtt_dead_letter \
             (broker_id, topic, payload, qos, retain, direction, error, properties) \
             VALUES ($1, $2, $3, $4, $5, 'receive', $6, $7::pg_catalog.jsonb)"
        ),
        None,
        &[
            m.broker_id.into(),
            m.topic.replace('\0', "\u{FFFD}").into(),
            m.payload.as_ref().into(),
            (m.qos as i16).into(),
            m.retain.into(),
            error.into(),
            m.properties.as_ref().and_then(|p| p.to_jsonb_text()).into(),
        ],
    );
    if let Err(e) = result {
        error!("mqtt_pg could not write mqtt_dead_letter: {e}");
    }
}

/// Move delivered rows from the outbox to history. Should history refuse them, the rows still
/// leave the outbox (they were delivered: sending them again would duplicate them), and a
/// WARNING says which.
fn move_delivered(
    client: &mut SpiClient<'_>,
    schema: &str,
    delivered: &[(i32, i64, Option<u16>)],
    outcome: &mut Outcome,
) {
    let log = crate::gucs::LOG_MESSAGES.get();
    let moved = subxact::run(|| move_to_history(client, schema, delivered, log));
    let rows = match moved {
        Ok(rows) => rows,
        Err(e) => {
            let e = permanent(e);
            let ids: Vec<i64> = delivered.iter().map(|d| d.1).collect();
            warning!(
                "mqtt_pg could not record {} delivered messages in mqtt_message_history ({e}); \
                 they were delivered and leave mqtt_outbox without a history row",
                ids.len()
            );
            let result = client.update(
                &format!(
                    "DELETE FROM {schema}.mqtt_outbox \
                     WHERE id OPERATOR(pg_catalog.=) ANY ($1) \
                     RETURNING broker_id, pg_catalog.octet_length(payload)::pg_catalog.int8, \
                       CASE WHEN $2 THEN topic END, qos"
                ),
                None,
                &[ids.into(), log.into()],
            );
            match result {
                Ok(rows) => rows.map(|r| Sent::from_row(&r)).collect(),
                Err(e) => {
                    error!("mqtt_pg could not remove delivered messages from mqtt_outbox: {e}")
                }
            }
        }
    };
    for r in rows {
        let t = outcome.counts.entry(r.broker_id).or_default();
        t.sent += 1;
        t.sent_bytes += r.bytes;
        if let Some(topic) = r.topic {
            outcome.log.push(message_line(
                r.broker_id,
                "delivered",
                &topic,
                r.bytes as usize,
                r.qos,
            ));
        }
    }
}

/// One delivered row as it left the outbox; the topic only when it is to be logged.
struct Sent {
    broker_id: i32,
    bytes: u64,
    topic: Option<String>,
    qos: u8,
}

impl Sent {
    fn from_row(r: &pgrx::spi::SpiHeapTupleData<'_>) -> Sent {
        Sent {
            broker_id: r.get::<i32>(1).ok().flatten().unwrap_or(0),
            bytes: r.get::<i64>(2).ok().flatten().unwrap_or(0).max(0) as u64,
            topic: r.get::<String>(3).ok().flatten(),
            qos: r.get::<i16>(4).ok().flatten().unwrap_or(0).clamp(0, 2) as u8,
        }
    }
}

fn move_to_history(
    client: &mut SpiClient<'_>,
    schema: &str,
    delivered: &[(i32, i64, Option<u16>)],
    log: bool,
) -> Vec<Sent> {
    let ids: Vec<i64> = delivered.iter().map(|d| d.1).collect();
    let pkids: Vec<Option<i32>> = delivered.iter().map(|d| d.2.map(i32::from)).collect();
    let Some(extension) = crate::catalog::extension().map(|(oid, _)| oid) else {
        return Vec::new();
    };
    let types = [
        PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID),
        PgOid::BuiltIn(PgBuiltInOids::INT4ARRAYOID),
        PgOid::BuiltIn(PgBuiltInOids::BOOLOID),
    ];
    let sql = || {
        format!(
            "WITH d AS (DELETE FROM {schema}.mqtt_outbox o \
               USING ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2)) AS u(id, pkid) \
               WHERE o.id OPERATOR(pg_catalog.=) u.id \
               RETURNING o.id, o.broker_id, o.topic, o.payload, o.qos, o.retain, o.properties, u.pkid) \
             INSERT INTO {schema}.mqtt_message_history \
               (broker_id, topic, payload, qos, retain, direction, message_id, properties) \
             SELECT broker_id, topic, payload, qos, retain, 'send', pkid, properties FROM d ORDER BY id \
             RETURNING broker_id, pg_catalog.octet_length(payload)::pg_catalog.int8, \
               CASE WHEN $3 THEN topic END, qos"
        )
    };
    plans::with_plan(
        client,
        extension,
        "move_to_history_v3",
        &types,
        sql,
        |client, stmt| match client.update(stmt, None, &[ids.into(), pkids.into(), log.into()]) {
            Ok(rows) => rows.map(|r| Sent::from_row(&r)).collect(),
            Err(e) => error!("mqtt_pg could not record delivered messages: {e}"),
        },
    )
}
