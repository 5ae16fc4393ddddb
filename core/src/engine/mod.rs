//! The MQTT engine: one tokio task per broker connection, driven by rumqttc.
//!
//! The engine never touches PostgreSQL. The extension's worker (its main thread, the only one
//! allowed to call into Postgres) tells the engine which brokers to connect to, which filters to
//! subscribe and which outbox rows to publish; the engine answers with [`Event`]s on a bounded
//! channel that the worker drains in batches, one database transaction per batch.
//!
//! Delivery bookkeeping lives here because only the task that polls rumqttc sees packet ids:
//! rumqttc reports `Outgoing::Publish(pkid)` in request order, so a FIFO of outbox ids maps each
//! request to its packet id, and the broker's PUBACK/PUBCOMP turns that back into an outbox id.
//! When a connection is lost the engine forgets everything in flight (rumqttc's own pending
//! queue included) and says so with [`Event::ConnectionLost`]; the worker then resends whatever
//! is still in the durable outbox. The database, not this process, holds the durable copy.

mod connection;
mod errors;
mod options;
mod probe;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

pub use crate::properties::MessageProperties;
use crate::tls::Redacted;
pub use crate::tls::TlsSettings;
use connection::{run_broker, Emitter};
pub use probe::{probe, probe_config, ProbeOutcome, Prober};

/// Largest packet MQTT can carry (the remaining-length field tops out at 256 MiB - 1).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// Received payload bytes the engine holds for the worker before broker tasks stop reading from
/// their sockets (see [`Engine::start_with_limit`]).
pub const DEFAULT_BUFFER_BYTES: usize = 64 << 20;

/// How long a broker task waits for the request channel before it gives up on a clean
/// DISCONNECT at shutdown.
pub(super) const DISCONNECT_GRACE: Duration = Duration::from_millis(200);

/// Everything needed to open one broker connection. Two configs that compare equal describe the
/// same connection, so the engine only restarts a task when this changes.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub id: i32,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    /// Secret: never printed (see the `Debug` impl).
    pub password: Option<String>,
    pub client_id: String,
    pub keepalive: Duration,
    pub clean_session: bool,
    /// MQTT 3.1.1 or 5 (mqtt_broker.protocol_version).
    pub protocol: Protocol,
    /// MQTT 5 only: how long the broker keeps the session after the connection ends. `None`:
    /// for ever unless `clean_session` (as a 3.1.1 persistent session), 0 with it.
    pub session_expiry: Option<u32>,
    /// MQTT 5 only: how many unacknowledged QoS 1/2 messages the broker may send us at once
    /// (the Receive Maximum we announce). `None`: the protocol's default, 65,535.
    pub receive_maximum: Option<u16>,
    pub max_packet_size: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Outgoing QoS 1/2 publishes allowed in flight at once (rumqttc's `inflight`).
    pub max_inflight: u16,
    /// Some when mqtt_broker.use_tls is true.
    pub tls: Option<TlsSettings>,
    /// Last Will: published by the broker when the connection dies without a DISCONNECT.
    pub will: Option<Will>,
    /// Published to the will topic (same qos/retain) after every CONNACK, so a retained topic
    /// says online/offline. Only with a will; then a clean stop publishes the will's payload
    /// too, as the broker drops the will on DISCONNECT.
    pub birth_payload: Option<Vec<u8>>,
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &Redacted(&self.password))
            .field("client_id", &self.client_id)
            .field("keepalive", &self.keepalive)
            .field("clean_session", &self.clean_session)
            .field("protocol", &self.protocol)
            .field("session_expiry", &self.session_expiry)
            .field("receive_maximum", &self.receive_maximum)
            .field("max_packet_size", &self.max_packet_size)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("max_inflight", &self.max_inflight)
            .field("tls", &self.tls)
            .field("will", &self.will)
            .field("birth_payload", &self.birth_payload)
            .finish()
    }
}

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    V311,
    V5,
}

impl Protocol {
    /// From mqtt_broker.protocol_version: '3.1.1' or '5'.
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "3.1.1" => Some(Protocol::V311),
            "5" => Some(Protocol::V5),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::V311 => "3.1.1",
            Protocol::V5 => "5",
        }
    }
}

/// The Last Will the broker publishes for us when the connection dies without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// One outbox row handed to the engine for delivery.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub outbox_id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties; ignored on a 3.1.1 connection. `message_expiry` is what is left of
    /// it when the row is handed over (the worker subtracts the time spent in the outbox).
    pub properties: Option<MessageProperties>,
}

/// One message received from a broker.
#[derive(Debug, Clone)]
pub struct InMessage {
    pub broker_id: i32,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT packet id; `None` for QoS 0.
    pub pkid: Option<u16>,
    /// MQTT 5 properties as received; `None` on 3.1.1 or when the message had none.
    pub properties: Option<MessageProperties>,
    /// When the engine read it, in microseconds since the Unix epoch.
    pub received_at_us: i64,
    /// What to hand back to [`Engine::ack`] once the message is stored; `None` for QoS 0.
    pub ack: Option<Ack>,
}

/// The acknowledgement a QoS 1/2 message is owed. The broker gets it only when the worker
/// passes it to [`Engine::ack`] after the transaction that stored the message has committed,
/// and only on the connection that delivered the message: after a reconnect the broker sends
/// the message again instead (at-least-once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub broker_id: i32,
    generation: u64,
    epoch: u64,
    qos: u8,
    pkid: u16,
}

/// What the engine reports back to the worker.
#[derive(Debug, Clone)]
pub enum Event {
    /// A connection attempt is starting (first one, or after a failure).
    Connecting {
        broker_id: i32,
    },
    /// CONNACK accepted.
    Connected {
        broker_id: i32,
        session_present: bool,
        /// Number of this connection; pass it to [`Engine::publish`].
        epoch: u64,
    },
    /// The connection failed or was lost; `error` is what a DBA needs to see. Everything that
    /// was in flight on this broker is forgotten: resend it from the outbox.
    ConnectionLost {
        broker_id: i32,
        error: String,
        /// The oldest outbox row written to this connection and not acknowledged when it
        /// ended. A broker that closes the connection on a message it will never take (one
        /// over its packet limit) leaves that message here every time; the worker dead-letters
        /// a row that is named here again and again.
        suspect: Option<i64>,
    },
    /// A non-fatal problem worth showing in the status (a refused subscription, a message that
    /// could not be sent).
    Warning {
        broker_id: i32,
        error: String,
    },
    /// The broker task ended because it was asked to.
    Stopped {
        broker_id: i32,
    },
    /// The broker task ended with a panic (a bug, in rumqttc or here). Nothing crossed into the
    /// worker; the engine has forgotten the task, so the next [`Engine::set_brokers`] starts a
    /// fresh one. Everything it had in flight is to be resent from the outbox.
    Failed {
        broker_id: i32,
        error: String,
    },
    /// An outbox row left: QoS 0 once written to the connection, QoS 1 after PUBACK, QoS 2
    /// after PUBCOMP. `pkid` is `None` for QoS 0.
    Delivered {
        broker_id: i32,
        outbox_id: i64,
        pkid: Option<u16>,
    },
    /// A message will never be sendable as it is: rejected before it reached the connection
    /// (larger than the connection's packet limit), or refused by an MQTT 5 broker with a
    /// failure reason in its PUBACK/PUBREC (the error then names the reason, for example
    /// "not authorized (reason code 135)"). The worker moves the row to the dead letters.
    Rejected {
        broker_id: i32,
        outbox_id: i64,
        error: String,
    },
    Received(InMessage),
}

impl Event {
    /// The broker the event is about.
    pub fn broker_id(&self) -> i32 {
        match self {
            Event::Connecting { broker_id }
            | Event::Connected { broker_id, .. }
            | Event::ConnectionLost { broker_id, .. }
            | Event::Warning { broker_id, .. }
            | Event::Stopped { broker_id }
            | Event::Failed { broker_id, .. }
            | Event::Delivered { broker_id, .. }
            | Event::Rejected { broker_id, .. } => *broker_id,
            Event::Received(m) => m.broker_id,
        }
    }
}

/// Commands from the worker to one broker task.
pub(super) enum Command {
    /// Rows for the connection with this epoch.
    Publish(u64, Vec<OutMessage>),
    /// Acknowledgements of stored messages.
    Ack(Vec<Ack>),
    Subscriptions(BTreeMap<String, u8>),
    Stop,
    /// Tests only: make the task panic, to exercise the supervision.
    Panic,
}

/// An event with the generation of the task that sent it. After a configuration change a task
/// that is being replaced can still report; its status events must not overwrite the new
/// connection's, while its deliveries and received messages are as real as any.
pub(super) type Tagged = (u64, Event);

struct BrokerHandle {
    config: BrokerConfig,
    commands: mpsc::UnboundedSender<Command>,
}

/// Wakes the worker when events are waiting. Calls are coalesced: between two drains the
/// callback runs at most once, however many events arrive.
#[derive(Clone)]
pub(super) struct Waker {
    pending: Arc<AtomicBool>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

/// Received payload bytes emitted and not yet drained by the worker, shared by every broker
/// task of an engine. Over the limit, tasks stop polling their sockets until the worker catches
/// up: TCP then holds the broker back, and for QoS 1/2 the broker's in-flight window (it gets
/// no acknowledgements) does too, so memory stays flat however long the database stalls.
pub(super) struct Buffered {
    bytes: AtomicUsize,
    limit: usize,
    room: tokio::sync::Notify,
}

impl Buffered {
    pub(super) fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::AcqRel);
    }

    fn remove(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, Ordering::AcqRel);
        if before >= self.limit && before - n < self.limit {
            self.room.notify_waiters();
        }
    }

    /// Wait until there is room for more received messages.
    pub(super) async fn wait_for_room(&self) {
        while self.bytes.load(Ordering::Acquire) >= self.limit {
            // The timeout covers a notification that fires between the check and the wait.
            let _ = tokio::time::timeout(Duration::from_millis(20), self.room.notified()).await;
        }
    }
}

/// Bytes a received message holds while it waits for the worker.
pub(super) fn held_bytes(m: &InMessage) -> usize {
    m.payload.len() + m.topic.len() + 64
}

impl Waker {
    pub(super) fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            (self.wake)();
        }
    }
}

/// Owns the tokio runtime and one task per broker.
pub struct Engine {
    runtime: tokio::runtime::Runtime,
    brokers: HashMap<i32, BrokerHandle>,
    events_tx: mpsc::Sender<Tagged>,
    events_rx: mpsc::Receiver<Tagged>,
    /// Generation of the task currently serving each broker; see [`Tagged`].
    generations: HashMap<i32, u64>,
    next_generation: u64,
    waker: Waker,
    buffered: Arc<Buffered>,
    /// Broker tasks still running (stopped ones included until they have said `Stopped`).
    tasks: Arc<AtomicUsize>,
}

/// Counts a running broker task; dropping it (normal end, or a panic) counts it out.
struct TaskGuard(Arc<AtomicUsize>);

impl TaskGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        TaskGuard(count.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    /// Start the runtime. `event_capacity` bounds the events waiting for the worker: when the
    /// worker falls behind (a slow disk, a lock on the history table), broker tasks stop reading
    /// from their sockets instead of buffering without limit. `wake` is called (from engine
    /// threads) when events are waiting; it must be cheap and must not call into Postgres.
    pub fn start(
        worker_threads: usize,
        event_capacity: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Engine> {
        Self::start_with_limit(worker_threads, event_capacity, DEFAULT_BUFFER_BYTES, wake)
    }

    /// [`Engine::start`] with a bound on the received payload bytes waiting for the worker
    /// (see [`Buffered`]); one message always passes, however large.
    pub fn start_with_limit(
        worker_threads: usize,
        event_capacity: usize,
        buffer_bytes: usize,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Engine> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .thread_name("mqtt_pg-engine")
            .enable_all()
            .build()?;
        let (events_tx, events_rx) = mpsc::channel(event_capacity.max(16));
        Ok(Engine {
            runtime,
            brokers: HashMap::new(),
            events_tx,
            events_rx,
            generations: HashMap::new(),
            next_generation: 0,
            waker: Waker {
                pending: Arc::new(AtomicBool::new(false)),
                wake,
            },
            buffered: Arc::new(Buffered {
                bytes: AtomicUsize::new(0),
                limit: buffer_bytes.max(1),
                room: tokio::sync::Notify::new(),
            }),
            tasks: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Make the running connections match `wanted`: start new ones, restart changed ones, stop
    /// the rest. Returns the ids of brokers whose connection was (re)started, whose in-flight
    /// messages the caller must treat as unsent.
    pub fn set_brokers(&mut self, wanted: Vec<BrokerConfig>) -> Vec<i32> {
        let wanted: HashMap<i32, BrokerConfig> = wanted.into_iter().map(|c| (c.id, c)).collect();
        let gone: Vec<i32> = self
            .brokers
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.stop_broker(id);
        }
        let mut restarted = Vec::new();
        for (id, config) in wanted {
            if self.brokers.get(&id).is_some_and(|h| h.config == config) {
                continue;
            }
            self.stop_broker(id);
            let (tx, rx) = mpsc::unbounded_channel();
            let guard = TaskGuard::new(&self.tasks);
            self.next_generation += 1;
            self.generations.insert(id, self.next_generation);
            let task = run_broker(
                config.clone(),
                rx,
                Emitter {
                    generation: self.next_generation,
                    events: self.events_tx.clone(),
                    waker: self.waker.clone(),
                    buffered: self.buffered.clone(),
                    paused_at: Arc::default(),
                },
            );
            // Supervise the task: a panic must not leave the broker silently unserved.
            let task = self.runtime.spawn(task);
            let report = self.events_tx.clone();
            let waker = self.waker.clone();
            let generation = self.next_generation;
            self.runtime.spawn(async move {
                if let Err(e) = task.await {
                    if e.is_panic() {
                        let error = panic_message(e.into_panic());
                        let failed = Event::Failed {
                            broker_id: id,
                            error,
                        };
                        let _ = report.send((generation, failed)).await;
                        waker.wake();
                    }
                }
                drop(guard);
            });
            self.brokers.insert(
                id,
                BrokerHandle {
                    config,
                    commands: tx,
                },
            );
            restarted.push(id);
        }
        restarted
    }

    fn stop_broker(&mut self, id: i32) {
        if let Some(handle) = self.brokers.remove(&id) {
            // The task may already be gone; nothing to do then.
            let _ = handle.commands.send(Command::Stop);
        }
    }

    /// Tests only: make the broker's task panic (see [`Event::Failed`]).
    #[doc(hidden)]
    pub fn inject_panic(&self, broker_id: i32) {
        if let Some(h) = self.brokers.get(&broker_id) {
            let _ = h.commands.send(Command::Panic);
        }
    }

    /// Whether a task currently serves this broker.
    pub fn has_broker(&self, id: i32) -> bool {
        self.brokers.contains_key(&id)
    }

    /// Broker tasks still running, including those told to stop that have not finished.
    pub fn running_tasks(&self) -> usize {
        self.tasks.load(Ordering::Acquire)
    }

    /// Whether events are waiting to be drained.
    pub fn has_events(&self) -> bool {
        !self.events_rx.is_empty()
    }

    /// Replace the broker's subscriptions (filter -> QoS). The task subscribes and unsubscribes
    /// the difference now, and everything again whenever the broker did not keep the session.
    pub fn set_subscriptions(&self, broker_id: i32, filters: BTreeMap<String, u8>) {
        if let Some(h) = self.brokers.get(&broker_id) {
            let _ = h.commands.send(Command::Subscriptions(filters));
        }
    }

    /// Queue outbox rows for delivery on the connection `epoch` (from its [`Event::Connected`]).
    /// If that connection has gone meanwhile, the rows are dropped: the caller learns of it from
    /// [`Event::ConnectionLost`] and resends them after the next `Connected`. Returns false if
    /// no task runs for this broker (the rows stay unsent).
    pub fn publish(&self, broker_id: i32, epoch: u64, messages: Vec<OutMessage>) -> bool {
        match self.brokers.get(&broker_id) {
            Some(h) => h.commands.send(Command::Publish(epoch, messages)).is_ok(),
            None => false,
        }
    }

    /// Acknowledge stored messages to their brokers. Acknowledgements for a connection that has
    /// since been replaced or lost are dropped: the broker sends those messages again.
    pub fn ack(&self, acks: Vec<Ack>) {
        let mut by_broker: HashMap<i32, Vec<Ack>> = HashMap::new();
        for a in acks {
            if self.generations.get(&a.broker_id) == Some(&a.generation) {
                by_broker.entry(a.broker_id).or_default().push(a);
            }
        }
        for (id, acks) in by_broker {
            if let Some(h) = self.brokers.get(&id) {
                let _ = h.commands.send(Command::Ack(acks));
            }
        }
    }

    /// Move up to `max` waiting events, and received payloads of about `max_bytes` in all, into
    /// `out`. Never blocks.
    pub fn drain_events(&mut self, out: &mut Vec<Event>, max: usize) {
        self.drain_events_within(out, max, usize::MAX)
    }

    /// [`Engine::drain_events`] with a budget for received payload bytes: the batch stops once
    /// it is reached (one message always fits), so a batch of large messages stays a size the
    /// database can store in one statement.
    pub fn drain_events_within(&mut self, out: &mut Vec<Event>, max: usize, max_bytes: usize) {
        let mut bytes = 0usize;
        // Clear the flag before draining so that an event sent during the drain wakes us again.
        self.waker.pending.store(false, Ordering::Release);
        while out.len() < max {
            match self.events_rx.try_recv() {
                Ok((generation, ev)) => {
                    let current = self.generations.get(&ev.broker_id()) == Some(&generation);
                    let status_only = matches!(
                        ev,
                        Event::Connecting { .. }
                            | Event::Connected { .. }
                            | Event::ConnectionLost { .. }
                            | Event::Warning { .. }
                    );
                    if let Event::Received(m) = &ev {
                        bytes = bytes.saturating_add(m.payload.len());
                        self.buffered.remove(held_bytes(m));
                    }
                    let ev = match ev {
                        // The failed task is the current one: forget it, so that the next
                        // set_brokers starts a new one. A replaced task that failed has simply
                        // stopped.
                        Event::Failed { broker_id, .. } if current => {
                            self.brokers.remove(&broker_id);
                            self.generations.remove(&broker_id);
                            ev
                        }
                        Event::Failed { broker_id, .. } => Event::Stopped { broker_id },
                        ev => ev,
                    };
                    if current || !status_only {
                        out.push(ev);
                    }
                    if bytes >= max_bytes {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if !self.events_rx.is_empty() {
            // More than one batch is waiting: make sure the worker comes straight back.
            self.waker.wake();
        }
    }

    /// Stop every connection (sending DISCONNECT where possible) and the runtime, waiting at
    /// most `timeout`.
    pub fn shutdown(mut self, timeout: Duration) {
        let ids: Vec<i32> = self.brokers.keys().copied().collect();
        for id in ids {
            self.stop_broker(id);
        }
        // Give tasks a moment to send DISCONNECT; then drop whatever is left.
        let deadline = std::time::Instant::now() + timeout.min(DISCONNECT_GRACE * 5);
        self.runtime.block_on(async {
            while std::time::Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_millis(20), self.events_rx.recv()).await {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
        });
        self.runtime.shutdown_timeout(timeout);
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the connection task failed ({what}); it is being restarted")
}
