//! One broker connection: rumqttc's event loop, driven by two tokio tasks that share the
//! delivery bookkeeping (see [`run_broker`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rumqttc::{
    AsyncClient, ConnectReturnCode, Event as MqttEvent, EventLoop, MqttOptions, Outgoing, Packet,
    QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;

use super::{BrokerConfig, Command, Event, InMessage, OutMessage, Tagged, Waker, DISCONNECT_GRACE};
use crate::backoff::Backoff;

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
pub(super) struct Emitter {
    pub(super) generation: u64,
    pub(super) events: mpsc::Sender<Tagged>,
    pub(super) waker: Waker,
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
pub(super) async fn run_broker(
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
