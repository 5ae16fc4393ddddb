//! One broker connection: rumqttc's event loop, driven by two tokio tasks that share the
//! delivery bookkeeping (see [`run_broker`]).

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;

use super::errors::describe_error;
use super::options::{birth, prepare};
use super::wire::{Client, ConnError, Loop, Wire};
use super::{
    held_bytes, Ack, BrokerConfig, Buffered, Command, Event, InMessage, MessageProperties,
    OutMessage, Protocol, Tagged, Waker, Will, DISCONNECT_GRACE,
};
use crate::backoff::Backoff;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// What a PUBLISH handed to rumqttc stands for. A status message (the birth after CONNACK, the
/// will's payload at a clean stop) takes its place in the packet-id FIFO like any row, so the
/// rows around it keep their packet ids; it just never becomes a `Delivered` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Row(i64),
    Status,
}

/// Delivery bookkeeping of one connection, shared by its two tasks (see [`run_broker`]).
#[derive(Default)]
struct Book {
    /// Filters the worker wants, with their QoS.
    wanted_subs: BTreeMap<String, u8>,
    /// MQTT 5: the broker may send a copy per matching subscription (see `to_subscribe`).
    one_copy_per_filter: bool,
    /// Subscription changes rumqttc's request channel has not taken yet: it is full while a
    /// backlog is being published, and a change must never be dropped for that. They go first
    /// whenever the channel has room.
    unsub_pending: BTreeSet<String>,
    sub_pending: BTreeMap<String, u8>,
    /// Outbox rows accepted from the worker but not yet handed to rumqttc.
    queue: VecDeque<OutMessage>,
    /// Acknowledgements of stored messages (QoS, packet id) not yet handed to rumqttc. They go
    /// before anything else: each frees a slot of the broker's in-flight window.
    acks: VecDeque<(u8, u16)>,
    /// MQTT 5: the broker's Maximum Packet Size from its CONNACK, if it set one.
    broker_max_packet: Option<usize>,
    /// Generation of this task (see `Tagged`), stamped on every [`Ack`] it hands out.
    generation: u64,
    /// Publishes handed to rumqttc, waiting for their `Outgoing::Publish(pkid)`, in order.
    awaiting_pkid: VecDeque<(Sent, u8)>,
    /// QoS 1 publishes waiting for PUBACK, and QoS 2 publishes waiting for PUBREC.
    awaiting_ack: HashMap<u16, (Sent, u8)>,
    /// QoS 2 publishes past PUBREC, waiting for PUBCOMP. Kept apart because rumqttc frees a
    /// packet id at PUBREC, so the next publish may reuse it while the PUBCOMP is still due;
    /// a shared map would credit that PUBCOMP (or the new PUBACK) to the wrong row.
    awaiting_comp: HashMap<u16, VecDeque<Sent>>,
    /// Filters of SUBSCRIBE requests in request order, to name a refused filter in the status.
    sub_fifo: VecDeque<Vec<String>>,
    sub_by_pkid: HashMap<u16, Vec<String>>,
    connected: bool,
    /// Number of the current connection (CONNACKs so far). Publish commands carry the epoch of
    /// the last `Connected` the worker had processed; rows sent for an earlier connection are
    /// dropped here, because the worker resends them from the outbox once it hears of the new
    /// connection, and keeping both would send them twice.
    epoch: u64,
    /// The birth message: the will's topic, QoS and retain flag with the birth payload.
    birth: Option<Will>,
    /// A CONNACK came and the birth message has not been handed to rumqttc yet. It goes before
    /// any row, so that subscribers of a retained status topic read "online" before anything
    /// this connection publishes.
    birth_due: bool,
}

impl Book {
    /// Hand pending subscription changes, then queued rows, to rumqttc while its request
    /// channel has room. Never awaits the channel: the task that drains it (by polling) might
    /// be the caller.
    fn flush_queue(&mut self, client: &Client, c: &BrokerConfig, out: &mut Vec<Event>) {
        if !self.connected {
            return;
        }
        if !self.flush_birth(client)
            || !self.flush_acks(client)
            || !self.flush_subscriptions(client)
        {
            return;
        }
        let limit = self.packet_limit(c);
        while let Some(m) = self.queue.pop_front() {
            let size = m.payload.len() + packet_overhead(c, &m.topic, m.properties.as_ref());
            let problem = if size > limit {
                Some(format!(
                    "message of {size} bytes exceeds the connection's packet limit of {limit} \
                     bytes{}",
                    if limit < c.max_packet_size {
                        " (the broker's Maximum Packet Size)"
                    } else {
                        ""
                    }
                ))
            } else if c.protocol == Protocol::V311
                && m.properties.as_ref().is_some_and(|p| !p.is_empty())
            {
                // Queued while the broker was on MQTT 5 (or requeued onto a 3.1.1 one): 3.1.1
                // cannot carry them, and sending the message without them would drop a
                // response topic or an expiry without a word.
                Some(
                    "the message has MQTT 5 properties, but the broker's protocol_version is now \
                     3.1.1, which cannot carry them"
                        .to_string(),
                )
            } else {
                // Rows inserted into mqtt_outbox by hand skip mqtt_publish's checks.
                crate::topic::validate_topic(&m.topic)
                    .err()
                    .map(|e| format!("invalid topic: {e}"))
            };
            if let Some(error) = problem {
                out.push(Event::Rejected {
                    broker_id: c.id,
                    outbox_id: m.outbox_id,
                    error,
                });
                continue;
            }
            let qos = m.qos.min(2);
            match client.try_publish(&m.topic, qos, m.retain, &m.payload, m.properties.as_ref()) {
                Ok(()) => self.awaiting_pkid.push_back((Sent::Row(m.outbox_id), qos)),
                Err(_) => {
                    // The topic is valid, so the channel is full: keep the row; the poll task
                    // flushes again after each event.
                    self.queue.push_front(m);
                    return;
                }
            }
        }
    }

    /// Hand the birth message to rumqttc if it is due; false while its channel is full.
    fn flush_birth(&mut self, client: &Client) -> bool {
        let Some(birth) = self.birth.clone().filter(|_| self.birth_due) else {
            return true;
        };
        self.birth_due = !self.publish_status(client, &birth);
        !self.birth_due
    }

    /// Publish a status message (not an outbox row); false while the channel is full.
    fn publish_status(&mut self, client: &Client, m: &Will) -> bool {
        let qos = m.qos.min(2);
        let sent = client.try_publish(&m.topic, qos, m.retain, &m.payload, None);
        if sent.is_ok() {
            self.awaiting_pkid.push_back((Sent::Status, qos));
        }
        sent.is_ok()
    }

    /// Hand pending acknowledgements to rumqttc; false while its channel is full.
    fn flush_acks(&mut self, client: &Client) -> bool {
        while let Some(&(qos, pkid)) = self.acks.front() {
            if client.try_ack(qos, pkid).is_err() {
                return false;
            }
            self.acks.pop_front();
        }
        true
    }

    /// Oldest outbox row written to the connection and still waiting for its PUBACK/PUBREC.
    fn oldest_unacknowledged(&self) -> Option<i64> {
        self.awaiting_ack
            .values()
            .filter_map(|(sent, _)| match sent {
                Sent::Row(id) => Some(*id),
                Sent::Status => None,
            })
            .min()
    }

    /// Send pending unsubscribes and subscribes; false while the channel is full.
    fn flush_subscriptions(&mut self, client: &Client) -> bool {
        while let Some(f) = self.unsub_pending.first().cloned() {
            if client.try_unsubscribe(&f).is_err() {
                return false;
            }
            self.unsub_pending.remove(&f);
        }
        if self.sub_pending.is_empty() {
            return true;
        }
        // The worker validated every filter; rumqttc's own check is the last word on what it
        // will send, and a filter it refuses must not block the others for ever.
        self.sub_pending.retain(|f, _| rumqttc::valid_filter(f));
        if self.sub_pending.is_empty() || client.try_subscribe_many(&self.sub_pending).is_ok() {
            let sent = std::mem::take(&mut self.sub_pending);
            if !sent.is_empty() {
                self.sub_fifo.push_back(sent.into_keys().collect());
            }
            true
        } else {
            false
        }
    }

    fn apply_subscriptions(&mut self, client: &Client, subs: BTreeMap<String, u8>) {
        let old = self.to_subscribe();
        self.wanted_subs = subs;
        if !self.connected {
            return; // everything is subscribed at the next CONNACK
        }
        let new = self.to_subscribe();
        for f in old.keys().filter(|f| !new.contains_key(*f)) {
            self.sub_pending.remove(f);
            self.unsub_pending.insert(f.clone());
        }
        for (f, q) in &new {
            if old.get(f) != Some(q) {
                self.unsub_pending.remove(f);
                self.sub_pending.insert(f.clone(), *q);
            }
        }
        self.flush_subscriptions(client);
    }

    /// The filters to subscribe at the broker for the wanted ones. On MQTT 3.1.1 all of them:
    /// the broker sends one copy of a message however many of a client's filters match it.
    /// An MQTT 5 broker may send one copy per matching subscription instead (mosquitto does,
    /// MQTT 5.0, 3.3.4), which would store a message twice under overlapping filters
    /// (`plant/#` and `plant/line1/#`). So on MQTT 5 only the filters that no other wanted
    /// filter covers are subscribed, each at the highest QoS of those it covers: the same
    /// messages arrive, once each, and the worker routes each to every subscription whose
    /// filter matches, as it always does.
    fn to_subscribe(&self) -> BTreeMap<String, u8> {
        if !self.one_copy_per_filter {
            return self.wanted_subs.clone();
        }
        let covers = crate::topic::filter_covers;
        let wanted = &self.wanted_subs;
        let covered_by_another = |f: &String| {
            wanted
                .keys()
                .any(|g| g != f && covers(g, f) && (!covers(f, g) || g < f))
        };
        wanted
            .keys()
            .filter(|f| !covered_by_another(f))
            .map(|k| {
                let qos = wanted
                    .iter()
                    .filter(|(f, _)| *f == k || covers(k, f))
                    .map(|(_, q)| *q)
                    .max()
                    .unwrap_or(0);
                (k.clone(), qos)
            })
            .collect()
    }

    /// Bookkeeping for one rumqttc event; what the worker must hear goes into `out`.
    fn on_event(&mut self, client: &Client, id: i32, ev: Wire, out: &mut Vec<Event>) {
        match ev {
            Wire::ConnAck {
                session_present,
                max_packet_size,
                ..
            } => {
                self.connected = true;
                self.epoch += 1;
                self.broker_max_packet = max_packet_size.map(|n| n as usize);
                out.push(Event::Connected {
                    broker_id: id,
                    session_present,
                    epoch: self.epoch,
                });
                self.birth_due = self.birth.is_some();
                self.flush_birth(client);
                // Subscribing again on a resumed session is harmless; skipping it after a lost
                // session is the classic "silent after a broker restart" bug.
                self.unsub_pending.clear();
                self.sub_pending = self.to_subscribe();
                self.flush_subscriptions(client);
            }
            Wire::Publish {
                topic,
                payload,
                qos,
                retain,
                pkid,
                properties,
            } => {
                out.push(Event::Received(InMessage {
                    broker_id: id,
                    topic,
                    payload,
                    qos,
                    retain,
                    pkid: (qos > 0).then_some(pkid),
                    properties,
                    received_at_us: now_us(),
                    ack: (qos > 0).then_some(Ack {
                        broker_id: id,
                        generation: self.generation,
                        epoch: self.epoch,
                        qos,
                        pkid,
                    }),
                }));
            }
            Wire::SentPublish(pkid) => match self.awaiting_pkid.pop_front() {
                Some((Sent::Row(outbox_id), 0)) => out.push(Event::Delivered {
                    broker_id: id,
                    outbox_id,
                    pkid: None,
                }),
                Some((_, 0)) | None => {}
                Some((sent, qos)) => {
                    self.awaiting_ack.insert(pkid, (sent, qos));
                }
            },
            Wire::PubAck { pkid, refused } => {
                if let Some((sent, 1)) = self.awaiting_ack.get(&pkid).copied() {
                    self.awaiting_ack.remove(&pkid);
                    settled(out, id, sent, pkid, refused);
                }
            }
            Wire::PubRec { pkid, refused } => {
                if let Some((sent, 2)) = self.awaiting_ack.get(&pkid).copied() {
                    self.awaiting_ack.remove(&pkid);
                    if refused.is_some() {
                        // MQTT 5: a PUBREC with a failure reason ends the flow; no PUBCOMP
                        // follows.
                        settled(out, id, sent, pkid, refused);
                    } else {
                        self.awaiting_comp.entry(pkid).or_default().push_back(sent);
                    }
                }
            }
            Wire::PubComp { pkid } => {
                let waiting = self.awaiting_comp.get_mut(&pkid);
                if let Some(sent) = waiting.and_then(|q| q.pop_front()) {
                    settled(out, id, sent, pkid, None);
                }
                if self.awaiting_comp.get(&pkid).is_some_and(|q| q.is_empty()) {
                    self.awaiting_comp.remove(&pkid);
                }
            }
            Wire::SentSubscribe(pkid) => {
                if let Some(filters) = self.sub_fifo.pop_front() {
                    self.sub_by_pkid.insert(pkid, filters);
                }
            }
            Wire::SubAck { pkid, refused } => {
                let filters = self.sub_by_pkid.remove(&pkid).unwrap_or_default();
                for (i, reason) in refused.into_iter().enumerate() {
                    if let Some(reason) = reason {
                        let filter = filters.get(i).map(String::as_str).unwrap_or("?");
                        out.push(Event::Warning {
                            broker_id: id,
                            error: format!(
                                "broker refused the subscription to '{filter}': {reason}"
                            ),
                        });
                    }
                }
            }
            Wire::SentDisconnect | Wire::UnsubAck | Wire::Other => {}
        }
    }

    /// The largest packet this connection may send: ours, or the broker's if smaller.
    fn packet_limit(&self, c: &BrokerConfig) -> usize {
        self.broker_max_packet
            .map_or(c.max_packet_size, |b| b.min(c.max_packet_size))
    }

    /// Account for events rumqttc read but had not handed out yet (they wait in
    /// `state.events`): they belong to the connection that is ending. A PUBACK there is a
    /// real delivery and a PUBLISH a real message (already acknowledged to the broker), so
    /// they must reach the worker rather than be dropped or replayed on the next connection.
    fn take_buffered(&mut self, client: &Client, id: i32, el: &mut Loop, out: &mut Vec<Event>) {
        for ev in el.take_buffered() {
            self.on_event(client, id, ev, out);
        }
    }

    /// Forget everything in flight. rumqttc would otherwise resend its own copies on a resumed
    /// session while the worker resends the same rows from the outbox. `clean()` also moves
    /// requests still in the channel into `pending`, so clearing it leaves nothing behind that
    /// the FIFO of packet ids does not know about.
    fn connection_lost(&mut self, eventloop: &mut Loop) {
        eventloop.connection_lost();
        self.queue.clear();
        self.acks.clear();
        self.awaiting_pkid.clear();
        self.awaiting_ack.clear();
        self.awaiting_comp.clear();
        self.sub_fifo.clear();
        self.sub_by_pkid.clear();
        self.unsub_pending.clear();
        self.sub_pending.clear();
        self.connected = false;
        self.birth_due = false;
        self.broker_max_packet = None;
    }
}

/// Bytes a PUBLISH adds to its payload: fixed header (at most 5), topic and its length, packet
/// id, and on MQTT 5 the properties (at least their one-byte length).
fn packet_overhead(c: &BrokerConfig, topic: &str, properties: Option<&MessageProperties>) -> usize {
    let base = topic.len() + 2 + 2 + 5;
    match c.protocol {
        Protocol::V311 => base,
        Protocol::V5 => base + properties.map_or(1, MessageProperties::encoded_len),
    }
}

/// Report the end of a row's flow: delivered, or refused with an MQTT 5 reason (the row then
/// goes to the dead letters). A status message is nobody's row.
fn settled(out: &mut Vec<Event>, broker_id: i32, sent: Sent, pkid: u16, refused: Option<String>) {
    let Sent::Row(outbox_id) = sent else {
        return;
    };
    out.push(match refused {
        None => Event::Delivered {
            broker_id,
            outbox_id,
            pkid: Some(pkid),
        },
        Some(reason) => Event::Rejected {
            broker_id,
            outbox_id,
            error: format!("the broker refused the message: {reason}"),
        },
    });
}

/// Why a connection attempt or connection ended.
enum Failure {
    /// Nothing was attempted: the settings cannot work (see [`prepare`]).
    Setup(String),
    Mqtt(ConnError),
}

/// A connection counts as healthy, and its backoff starts from the minimum again, once it has
/// stayed up this long: a broker that accepts and then drops us at once must not see a
/// reconnect every `reconnect_min`.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// How a broker task reaches the worker.
#[derive(Clone)]
pub(super) struct Emitter {
    pub(super) generation: u64,
    pub(super) events: mpsc::Sender<Tagged>,
    pub(super) waker: Waker,
    pub(super) buffered: Arc<Buffered>,
    /// When reads were last held back because the worker was not draining: a send waited for
    /// room in the channel, or the received bytes stayed over their limit for a while.
    pub(super) paused_at: Arc<Mutex<Option<Instant>>>,
}

impl Emitter {
    fn note_pause(&self) {
        *self.paused_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Whether reads were held back recently enough that the broker may have given up on a
    /// silent client.
    fn paused_within(&self, window: Duration) -> bool {
        self.paused_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < window)
    }

    /// Send events to the worker. A full channel parks the caller here, which stops reads from
    /// the socket: that is the backpressure that keeps memory flat when the database falls
    /// behind. False once the engine is gone.
    async fn emit_all(&self, batch: &mut Vec<Event>) -> bool {
        for ev in batch.drain(..) {
            if let Event::Received(m) = &ev {
                self.buffered.add(held_bytes(m));
            }
            let ev = match self.events.try_send((self.generation, ev)) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(ev)) => Some(ev),
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            };
            if let Some(ev) = ev {
                self.note_pause();
                if self.events.send(ev).await.is_err() {
                    return false;
                }
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
    let (client, mut eventloop) = Loop::new(&config, 1024);
    // The broker may resend a PUBREL from before this process existed, and may hold QoS 2
    // packet ids of an earlier process "awaiting PUBREL": see `Loop::prime`.
    eventloop.prime(config.max_inflight);
    let book = Arc::new(Mutex::new(Book {
        generation: emitter.generation,
        birth: birth(&config),
        one_copy_per_filter: config.protocol == Protocol::V5,
        ..Book::default()
    }));
    let stop = Arc::new(tokio::sync::Notify::new());

    // Command task. A panic in it is caught and handed to the poll task, which re-raises it so
    // the engine's supervisor sees the whole connection fail (and restarts it) rather than a
    // connection that silently stops taking commands.
    let failure: Arc<Mutex<Option<Box<dyn Any + Send>>>> = Arc::default();
    let cmd_failure = failure.clone();
    let cmd_book = book.clone();
    let cmd_client = client.clone();
    let cmd_stop = stop.clone();
    let cmd_emitter = emitter.clone();
    let cmd_config = config.clone();
    tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            let Some(command) = commands.recv().await else {
                cmd_stop.notify_one();
                return;
            };
            let handled = std::panic::catch_unwind(AssertUnwindSafe(|| {
                handle_command(command, &cmd_book, &cmd_client, &cmd_config, &mut out)
            }));
            match handled {
                Ok(true) => {}
                Ok(false) => {
                    cmd_stop.notify_one();
                    return;
                }
                Err(panic) => {
                    *cmd_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(panic);
                    cmd_stop.notify_one();
                    return;
                }
            }
            cmd_emitter.emit_all(&mut out).await;
        }
    });

    // Poll task (this one).
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut connected_at: Option<Instant> = None;
    let mut out = vec![Event::Connecting { broker_id: id }];
    emitter.emit_all(&mut out).await;
    let mut prepared = false;
    loop {
        // While the worker holds too many received messages, read nothing more; but poll now and
        // then all the same, which gives rumqttc a chance to send its PINGREQ during a long
        // database stall (each such poll reads at most one more batch of packets).
        tokio::select! {
            _ = stop.notified() => break,
            room = tokio::time::timeout(config.keepalive / 2, emitter.buffered.wait_for_room()) => {
                if room.is_err() {
                    emitter.note_pause();
                }
            }
        }
        let polled = match prepare(&config, &mut eventloop, &mut prepared) {
            Err(error) => Err(Failure::Setup(error)),
            Ok(()) => tokio::select! {
                _ = stop.notified() => break,
                polled = eventloop.poll() => polled.map_err(Failure::Mqtt),
            },
        };
        match polled {
            Ok(ev) => {
                if matches!(ev, Wire::ConnAck { .. }) {
                    connected_at = Some(Instant::now());
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
            Err(failure) => {
                let (suspect, error) = {
                    let mut b = lock(&book);
                    let error = match failure {
                        Failure::Setup(error) => error,
                        Failure::Mqtt(e) => describe_error(&e, &config, b.connected),
                    };
                    b.take_buffered(&client, id, &mut eventloop, &mut out);
                    // A connection lost while reads were paused says nothing about the rows
                    // in flight: the broker may have given up on a silent client.
                    let paused = emitter.paused_within(config.keepalive * 2);
                    let suspect = b.oldest_unacknowledged().filter(|_| !paused);
                    b.connection_lost(&mut eventloop);
                    (suspect, error)
                };
                if connected_at
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_AFTER)
                {
                    backoff.reset();
                }
                out.push(Event::ConnectionLost {
                    broker_id: id,
                    error,
                    suspect,
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
    if let Some(panic) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        std::panic::resume_unwind(panic);
    }
    // Stopping: say goodbye politely if connected, but never wait long for it. Whatever
    // arrives meanwhile, or was read and not yet handed out, still counts.
    lock(&book).take_buffered(&client, id, &mut eventloop, &mut out);
    // Rows not yet handed to rumqttc do not go out now: the worker gives them to the next
    // connection once it hears this one has stopped. Requests rumqttc already holds go out
    // before the DISCONNECT, and their acknowledgements (arriving in the grace period) are
    // still credited; rumqttc's state is left intact for that.
    lock(&book).queue.clear();
    let connected = lock(&book).connected;
    if connected {
        leave_shared_groups(&client, &mut eventloop, &book, id, &mut out, &emitter).await;
    }
    if let Some(will) = config
        .will
        .as_ref()
        .filter(|_| connected && config.birth_payload.is_some())
    {
        // The broker drops the will on a DISCONNECT, so a retained status topic would say
        // "online" for ever after a clean stop: say "offline" ourselves, just before it.
        lock(&book).publish_status(&client, will);
    }
    if connected && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Wire::SentDisconnect) | Err(_) => break,
                    Ok(ev) => lock(&book).on_event(&client, id, ev, &mut out),
                }
            }
        })
        .await;
    }
    lock(&book).take_buffered(&client, id, &mut eventloop, &mut out);
    out.push(Event::Stopped { broker_id: id });
    emitter.emit_all(&mut out).await;
}

/// How long a stopping connection waits for the broker to confirm that it left its shared
/// subscriptions (see [`leave_shared_groups`]).
const LEAVE_GRACE: Duration = Duration::from_secs(2);

/// Before a clean stop, unsubscribe the shared subscriptions (`$share/GROUP/filter`) and read
/// until the broker confirms, handing every message that arrives meanwhile to the worker.
///
/// A broker hands each message of a group to one member. Once it has sent the UNSUBACK it gives
/// us no more, and everything it gave us before is ahead of the UNSUBACK on the connection, so
/// reading up to it leaves nothing of ours unread in the socket: with a clean session that
/// would be lost at the DISCONNECT, and with a persistent one the broker would keep queueing
/// our share for a member that is gone instead of giving it to the others. The next start
/// subscribes again (every CONNACK does). Plain subscriptions are kept: a persistent session
/// is there to keep their messages while we are away.
async fn leave_shared_groups(
    client: &Client,
    eventloop: &mut Loop,
    book: &Mutex<Book>,
    id: i32,
    out: &mut Vec<Event>,
    emitter: &Emitter,
) {
    let shared: Vec<String> = lock(book)
        .to_subscribe()
        .keys()
        .filter(|f| f.starts_with("$share/"))
        .cloned()
        .collect();
    let mut waiting = shared
        .iter()
        .filter(|f| client.try_unsubscribe(f).is_ok())
        .count();
    if waiting == 0 {
        return;
    }
    let _ = tokio::time::timeout(LEAVE_GRACE, async {
        while waiting > 0 {
            match eventloop.poll().await {
                Ok(Wire::UnsubAck) => waiting -= 1,
                Ok(ev) => lock(book).on_event(client, id, ev, out),
                Err(_) => break,
            }
            if !emitter.emit_all(out).await {
                break;
            }
        }
    })
    .await;
}

/// Apply one command of the worker; false for Stop.
fn handle_command(
    command: Command,
    book: &Mutex<Book>,
    client: &Client,
    config: &BrokerConfig,
    out: &mut Vec<Event>,
) -> bool {
    match command {
        Command::Publish(epoch, msgs) => {
            let mut b = lock(book);
            // Rows meant for a connection that has since gone are dropped: the worker resends
            // them once it hears of the current one.
            if b.connected && b.epoch == epoch {
                b.queue.extend(msgs);
                b.flush_queue(client, config, out);
            }
        }
        Command::Ack(acks) => {
            let mut b = lock(book);
            // Acknowledgements are owed on the connection that delivered the messages; a later
            // one gets those messages again instead.
            let epoch = b.epoch;
            if b.connected {
                b.acks.extend(
                    acks.iter()
                        .filter(|a| a.epoch == epoch)
                        .map(|a| (a.qos, a.pkid)),
                );
                b.flush_queue(client, config, out);
            }
        }
        Command::Subscriptions(subs) => lock(book).apply_subscriptions(client, subs),
        Command::Panic => panic!("injected by a test"),
        Command::Stop => return false,
    }
    true
}

fn lock(book: &Mutex<Book>) -> std::sync::MutexGuard<'_, Book> {
    // A panic while holding the lock would already have ended this connection's tasks; the
    // data is plain bookkeeping, so keep going with it rather than poisoning the engine.
    book.lock().unwrap_or_else(|p| p.into_inner())
}
