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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet,
    QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;

use crate::backoff::Backoff;

/// Largest packet MQTT can carry (the remaining-length field tops out at 256 MiB - 1).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// How long a broker task waits for the request channel before it gives up on a clean
/// DISCONNECT at shutdown.
const DISCONNECT_GRACE: Duration = Duration::from_millis(200);

/// Everything needed to open one broker connection. Two configs that compare equal describe the
/// same connection, so the engine only restarts a task when this changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    pub id: i32,
    pub name: String,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub client_id: String,
    pub keepalive: Duration,
    pub clean_session: bool,
    pub max_packet_size: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Outgoing QoS 1/2 publishes allowed in flight at once (rumqttc's `inflight`).
    pub max_inflight: u16,
}

/// One outbox row handed to the engine for delivery.
#[derive(Debug, Clone)]
pub struct OutMessage {
    pub outbox_id: i64,
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
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
    /// When the engine read it, in microseconds since the Unix epoch.
    pub received_at_us: i64,
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
    },
    /// The connection failed or was lost; `error` is what a DBA needs to see. Everything that
    /// was in flight on this broker is forgotten: resend it from the outbox.
    ConnectionLost {
        broker_id: i32,
        error: String,
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
    /// An outbox row left: QoS 0 once written to the connection, QoS 1 after PUBACK, QoS 2
    /// after PUBCOMP. `pkid` is `None` for QoS 0.
    Delivered {
        broker_id: i32,
        outbox_id: i64,
        pkid: Option<u16>,
    },
    /// A message was rejected before it reached the connection and will never be sendable as
    /// it is (for example larger than the connection's packet limit).
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
            | Event::Delivered { broker_id, .. }
            | Event::Rejected { broker_id, .. } => *broker_id,
            Event::Received(m) => m.broker_id,
        }
    }
}

/// Commands from the worker to one broker task.
enum Command {
    Publish(Vec<OutMessage>),
    Subscriptions(BTreeMap<String, u8>),
    Stop,
}

/// An event with the generation of the task that sent it. After a configuration change a task
/// that is being replaced can still report; its status events must not overwrite the new
/// connection's, while its deliveries and received messages are as real as any.
type Tagged = (u64, Event);

struct BrokerHandle {
    config: BrokerConfig,
    commands: mpsc::UnboundedSender<Command>,
}

/// Wakes the worker when events are waiting. Calls are coalesced: between two drains the
/// callback runs at most once, however many events arrive.
#[derive(Clone)]
struct Waker {
    pending: Arc<AtomicBool>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl Waker {
    fn wake(&self) {
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
                },
            );
            self.runtime.spawn(async move {
                task.await;
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

    /// Queue outbox rows for delivery. Returns false if no task runs for this broker (the rows
    /// stay unsent).
    pub fn publish(&self, broker_id: i32, messages: Vec<OutMessage>) -> bool {
        match self.brokers.get(&broker_id) {
            Some(h) => h.commands.send(Command::Publish(messages)).is_ok(),
            None => false,
        }
    }

    /// Move up to `max` waiting events into `out`. Never blocks.
    pub fn drain_events(&mut self, out: &mut Vec<Event>, max: usize) {
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
                            | Event::Stopped { .. }
                    );
                    if current || !status_only {
                        out.push(ev);
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

fn qos_from(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Delivery bookkeeping of one connection, shared by its two tasks (see [`run_broker`]).
struct Book {
    /// Filters the worker wants, with their QoS.
    wanted_subs: BTreeMap<String, u8>,
    /// Outbox rows accepted from the worker but not yet handed to rumqttc.
    queue: VecDeque<OutMessage>,
    /// Outbox ids handed to rumqttc, waiting for their `Outgoing::Publish(pkid)`, in order.
    awaiting_pkid: VecDeque<(i64, u8)>,
    /// Packet id -> outbox id for QoS 1/2 publishes waiting for PUBACK/PUBCOMP.
    awaiting_ack: HashMap<u16, i64>,
    /// Filters of SUBSCRIBE requests in request order, to name a refused filter in the status.
    sub_fifo: VecDeque<Vec<String>>,
    sub_by_pkid: HashMap<u16, Vec<String>>,
    connected: bool,
}

impl Book {
    /// Hand queued rows to rumqttc while its request channel has room. Never awaits the
    /// channel: the task that drains it by polling might be the caller.
    fn flush_queue(&mut self, client: &AsyncClient, c: &BrokerConfig, out: &mut Vec<Event>) {
        if !self.connected {
            return;
        }
        while let Some(m) = self.queue.pop_front() {
            let overhead = m.topic.len() + 2 + 2 + 5;
            if m.payload.len() + overhead > c.max_packet_size {
                out.push(Event::Rejected {
                    broker_id: c.id,
                    outbox_id: m.outbox_id,
                    error: format!(
                        "message of {} bytes exceeds the connection's packet limit of {} bytes",
                        m.payload.len() + overhead,
                        c.max_packet_size
                    ),
                });
                continue;
            }
            let qos = m.qos.min(2);
            match client.try_publish(m.topic.clone(), qos_from(qos), m.retain, m.payload.clone()) {
                Ok(()) => self.awaiting_pkid.push_back((m.outbox_id, qos)),
                Err(rumqttc::ClientError::TryRequest(_)) => {
                    // Channel full: keep the row; the poll task flushes again after each event.
                    self.queue.push_front(m);
                    return;
                }
                Err(e) => {
                    self.queue.push_front(m);
                    out.push(Event::Warning {
                        broker_id: c.id,
                        error: format!("could not queue a publish: {e}"),
                    });
                    return;
                }
            }
        }
    }

    fn apply_subscriptions(&mut self, client: &AsyncClient, subs: BTreeMap<String, u8>) {
        let old = std::mem::replace(&mut self.wanted_subs, subs);
        if !self.connected {
            return; // everything is subscribed at the next CONNACK
        }
        for f in old.keys().filter(|f| !self.wanted_subs.contains_key(*f)) {
            let _ = client.try_unsubscribe(f.clone());
        }
        let changed: BTreeMap<String, u8> = self
            .wanted_subs
            .iter()
            .filter(|(f, q)| old.get(*f) != Some(q))
            .map(|(f, q)| (f.clone(), *q))
            .collect();
        self.subscribe(client, &changed);
    }

    fn subscribe(&mut self, client: &AsyncClient, subs: &BTreeMap<String, u8>) {
        if subs.is_empty() {
            return;
        }
        let filters: Vec<rumqttc::SubscribeFilter> = subs
            .iter()
            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos_from(*q)))
            .collect();
        if client.try_subscribe_many(filters).is_ok() {
            self.sub_fifo.push_back(subs.keys().cloned().collect());
        }
    }

    /// Bookkeeping for one rumqttc event; what the worker must hear goes into `out`.
    fn on_event(&mut self, client: &AsyncClient, id: i32, ev: MqttEvent, out: &mut Vec<Event>) {
        match ev {
            MqttEvent::Incoming(Packet::ConnAck(ack)) => {
                self.connected = true;
                out.push(Event::Connected {
                    broker_id: id,
                    session_present: ack.session_present,
                });
                // Subscribing again on a resumed session is harmless; skipping it after a lost
                // session is the classic "silent after a broker restart" bug.
                let all = self.wanted_subs.clone();
                self.subscribe(client, &all);
            }
            MqttEvent::Incoming(Packet::Publish(p)) => {
                let qos = p.qos as u8;
                out.push(Event::Received(InMessage {
                    broker_id: id,
                    topic: p.topic,
                    payload: p.payload,
                    qos,
                    retain: p.retain,
                    pkid: (qos > 0).then_some(p.pkid),
                    received_at_us: now_us(),
                }));
            }
            MqttEvent::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some((outbox_id, qos)) = self.awaiting_pkid.pop_front() {
                    if qos == 0 {
                        out.push(Event::Delivered {
                            broker_id: id,
                            outbox_id,
                            pkid: None,
                        });
                    } else {
                        self.awaiting_ack.insert(pkid, outbox_id);
                    }
                }
            }
            MqttEvent::Incoming(Packet::PubAck(ack)) => self.acked(id, ack.pkid, out),
            MqttEvent::Incoming(Packet::PubComp(comp)) => self.acked(id, comp.pkid, out),
            MqttEvent::Outgoing(Outgoing::Subscribe(pkid)) => {
                if let Some(filters) = self.sub_fifo.pop_front() {
                    self.sub_by_pkid.insert(pkid, filters);
                }
            }
            MqttEvent::Incoming(Packet::SubAck(ack)) => {
                let filters = self.sub_by_pkid.remove(&ack.pkid).unwrap_or_default();
                for (i, code) in ack.return_codes.iter().enumerate() {
                    if matches!(code, SubscribeReasonCode::Failure) {
                        let filter = filters.get(i).map(String::as_str).unwrap_or("?");
                        out.push(Event::Warning {
                            broker_id: id,
                            error: format!("broker refused the subscription to '{filter}'"),
                        });
                    }
                }
            }
            _ => {}
        }
    }

    fn acked(&mut self, id: i32, pkid: u16, out: &mut Vec<Event>) {
        if let Some(outbox_id) = self.awaiting_ack.remove(&pkid) {
            out.push(Event::Delivered {
                broker_id: id,
                outbox_id,
                pkid: Some(pkid),
            });
        }
    }

    /// Forget everything in flight. rumqttc would otherwise resend its own copies on a resumed
    /// session while the worker resends the same rows from the outbox. `clean()` also moves
    /// requests still in the channel into `pending`, so clearing it leaves nothing behind that
    /// the FIFO of packet ids does not know about.
    fn connection_lost(&mut self, eventloop: &mut EventLoop) {
        eventloop.clean();
        eventloop.pending.clear();
        self.queue.clear();
        self.awaiting_pkid.clear();
        self.awaiting_ack.clear();
        self.sub_fifo.clear();
        self.sub_by_pkid.clear();
        self.connected = false;
        // A packet-id collision pending on the dead connection would otherwise keep rumqttc
        // from taking any request on the next one.
        eventloop.state.collision = None;
    }
}

/// How a broker task reaches the worker.
#[derive(Clone)]
struct Emitter {
    generation: u64,
    events: mpsc::Sender<Tagged>,
    waker: Waker,
}

impl Emitter {
    /// Send events to the worker. A full channel parks the caller here, which stops reads from
    /// the socket: that is the backpressure that keeps memory flat when the database falls
    /// behind. False once the engine is gone.
    async fn emit_all(&self, batch: &mut Vec<Event>) -> bool {
        for ev in batch.drain(..) {
            if self.events.send((self.generation, ev)).await.is_err() {
                return false;
            }
            self.waker.wake();
        }
        true
    }
}

/// Run one broker connection as two tasks sharing a [`Book`]: this one polls rumqttc and never
/// stops polling until told to stop (cancelling `EventLoop::poll` midway is not documented as
/// safe, so nothing else is ever raced against it but the stop signal); the other takes the
/// worker's commands and hands requests to rumqttc's channel without awaiting it.
async fn run_broker(
    config: BrokerConfig,
    mut commands: mpsc::UnboundedReceiver<Command>,
    emitter: Emitter,
) {
    let id = config.id;
    let (client, mut eventloop) = AsyncClient::new(options(&config), 1024);
    // Small writes (a PUBACK, one publish after a commit) must leave at once, not wait for
    // Nagle's algorithm: commit-to-delivery latency is a promise of mqtt_publish.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let book = Arc::new(Mutex::new(Book {
        wanted_subs: BTreeMap::new(),
        queue: VecDeque::new(),
        awaiting_pkid: VecDeque::new(),
        awaiting_ack: HashMap::new(),
        sub_fifo: VecDeque::new(),
        sub_by_pkid: HashMap::new(),
        connected: false,
    }));
    let stop = Arc::new(tokio::sync::Notify::new());

    // Command task.
    let cmd_book = book.clone();
    let cmd_client = client.clone();
    let cmd_stop = stop.clone();
    let cmd_emitter = emitter.clone();
    let cmd_config = config.clone();
    tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            match commands.recv().await {
                Some(Command::Publish(msgs)) => {
                    let mut b = lock(&cmd_book);
                    b.queue.extend(msgs);
                    b.flush_queue(&cmd_client, &cmd_config, &mut out);
                }
                Some(Command::Subscriptions(subs)) => {
                    lock(&cmd_book).apply_subscriptions(&cmd_client, subs);
                }
                Some(Command::Stop) | None => {
                    cmd_stop.notify_one();
                    return;
                }
            }
            cmd_emitter.emit_all(&mut out).await;
        }
    });

    // Poll task (this one).
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut out = vec![Event::Connecting { broker_id: id }];
    emitter.emit_all(&mut out).await;
    loop {
        let polled = tokio::select! {
            _ = stop.notified() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(ev) => {
                if matches!(ev, MqttEvent::Incoming(Packet::ConnAck(_))) {
                    backoff.reset();
                }
                {
                    let mut b = lock(&book);
                    b.on_event(&client, id, ev, &mut out);
                    b.flush_queue(&client, &config, &mut out);
                }
                if !emitter.emit_all(&mut out).await {
                    return;
                }
            }
            Err(e) => {
                {
                    let mut b = lock(&book);
                    // rumqttc keeps events it read but had not yet returned in
                    // `state.events`, and would hand them out after the reconnect, where their
                    // packet ids mean nothing. They belong to the old connection: account for
                    // them now (a PUBACK that arrived is a real delivery, a PUBLISH a real
                    // message), then forget the rest of that connection.
                    let stale: Vec<MqttEvent> = eventloop.state.events.drain(..).collect();
                    for ev in stale {
                        b.on_event(&client, id, ev, &mut out);
                    }
                    b.connection_lost(&mut eventloop);
                }
                out.push(Event::ConnectionLost {
                    broker_id: id,
                    error: describe_error(&e, &config),
                });
                emitter.emit_all(&mut out).await;
                // rumqttc reconnects on the very next poll: wait out a growing, jittered delay
                // first so a dead broker never sees a hot loop.
                tokio::select! {
                    _ = stop.notified() => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                out.push(Event::Connecting { broker_id: id });
                emitter.emit_all(&mut out).await;
            }
        }
    }
    // Stopping: say goodbye politely if connected, but never wait long for it.
    if lock(&book).connected && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    out.push(Event::Stopped { broker_id: id });
    emitter.emit_all(&mut out).await;
}

fn lock(book: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
    // A panic while holding the lock would already have ended this connection's tasks; the
    // data is plain bookkeeping, so keep going with it rather than poisoning the engine.
    book.lock().unwrap_or_else(|p| p.into_inner())
}

fn options(c: &BrokerConfig) -> MqttOptions {
    let mut o = MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
    o.set_keep_alive(c.keepalive.max(Duration::from_secs(5)));
    o.set_clean_session(c.clean_session);
    o.set_max_packet_size(c.max_packet_size, c.max_packet_size);
    o.set_inflight(c.max_inflight.max(1));
    if let Some(user) = &c.username {
        o.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
    }
    o
}

/// Turn a rumqttc error into a sentence a DBA can act on.
fn describe_error(e: &rumqttc::ConnectionError, c: &BrokerConfig) -> String {
    use rumqttc::ConnectionError as E;
    let target = format!("{}:{}", c.host, c.port);
    match e {
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("connection to {target} refused: is the broker running and listening there?")
        }
        E::Io(io) => format!("network error talking to {target}: {io}"),
        E::NetworkTimeout => format!("no answer from {target} within the connection timeout"),
        E::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success?",
            };
            format!("broker at {target} refused the connection: {why}")
        }
        other => format!("connection to {target} lost: {other}"),
    }
}
