//! Delivery guarantees of the engine (issue 3): manual acknowledgements on persistent
//! sessions, the rumqttc bugs it guards against (#664 resent PUBREL, #1014 packet-id
//! collision), the byte bound on received messages, and the "suspect" row of a connection a
//! broker closed on an over-size packet. Real mosquitto processes, a scripted broker (the test
//! plays the broker, packet by packet) and a packet-aware proxy; see `common`. Run with
//! `cargo test -p mqtt_pg_core --test delivery`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use mqtt_pg_core::engine::{Event, Protocol};

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn is_received_on(e: &Event, topic: &str) -> bool {
    matches!(e, Event::Received(m) if m.topic == topic)
}

fn payloads(events: &[Event]) -> Vec<String> {
    received(events)
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Manual acknowledgements on a persistent session
// ---------------------------------------------------------------------------------------------

/// Receive N messages at `qos` on a persistent session, acknowledge only the first half, stop
/// the engine and start a new one with the same client id: the broker sends exactly the
/// unacknowledged half again (and none of the acknowledged half), and only acknowledgements
/// the caller gave ever reached the broker.
fn unacked_half_is_redelivered(qos: u8, tag: &str) {
    const N: usize = 20;
    let broker = Broker::start();
    let cid = client_id(tag);
    let mut cfg = config(1, broker.port, tag);
    cfg.clean_session = false;
    let ack_log = match qos {
        1 => format!("Received PUBACK from {cid} "),
        _ => format!("Received PUBREC from {cid} "),
    };
    let comp_log = format!("Received PUBCOMP from {cid} ");
    let payload = |i: usize| format!("{tag}-{i:02}");

    // First engine: everything arrives, half of it is acknowledged.
    let mut h = Harness::new(1024);
    h.auto_ack = false;
    let seen = h.connect(cfg.clone());
    assert!(
        matches!(
            seen.last(),
            Some(Event::Connected {
                session_present: false,
                ..
            })
        ),
        "{seen:?}"
    );
    broker.wait_log(&format!("as {cid} ({}, c0, k30)", proto_tag()), 1);
    h.subscribe(&broker, 1, &cid, &[("eng/acks/#", qos)]);
    let lines: String = (0..N).map(|i| payload(i) + "\n").collect();
    mosquitto_pub(
        &broker,
        &["-l", "-q", &qos.to_string(), "-t", "eng/acks/x"],
        Some(lines.as_bytes()),
    );
    let events = h.wait_until(&format!("{N} Received"), WAIT, |s| received(s).len() >= N);
    assert_no_trouble(&events);
    let r = received(&events);
    assert_eq!(
        payloads(&events),
        (0..N).map(payload).collect::<Vec<_>>(),
        "first run"
    );
    assert!(r
        .iter()
        .all(|m| m.qos == qos && m.ack.is_some() && m.pkid.is_some()));
    // Nothing is acknowledged before the caller says so.
    assert_eq!(broker.log_count(&ack_log), 0, "acknowledged before ack()");
    h.ack(r[..N / 2].iter().copied());
    broker.wait_log(&ack_log, N / 2);
    if qos == 2 {
        // The broker releases each message and we complete it: QoS 2 ends there.
        broker.wait_log(&comp_log, N / 2);
    }
    h.take_engine().shutdown(Duration::from_secs(2));
    broker.wait_log(&format!("Client {cid} disconnected."), 1);
    assert_eq!(
        broker.log_count(&ack_log),
        N / 2,
        "exactly the acknowledged half reached the broker"
    );
    drop(h);

    // Second engine, same client id: the broker resumes the session and sends the
    // unacknowledged half again, before a marker published afterwards.
    let mut h = Harness::new(1024);
    h.auto_ack = false;
    let seen = h.connect(cfg);
    assert!(
        matches!(
            seen.last(),
            Some(Event::Connected {
                session_present: true,
                ..
            })
        ),
        "the broker did not keep the session: {seen:?}"
    );
    mosquitto_pub(
        &broker,
        &["-q", &qos.to_string(), "-t", "eng/acks/x", "-m", "marker"],
        None,
    );
    let mut events = h.wait_for("the marker", |e| {
        is_received_on(e, "eng/acks/x") && {
            matches!(e, Event::Received(m) if &m.payload[..] == b"marker")
        }
    });
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);
    let mut want: Vec<String> = (N / 2..N).map(payload).collect();
    want.push("marker".into());
    assert_eq!(
        payloads(&events),
        want,
        "after the restart: exactly the unacknowledged half, then the marker"
    );
    let r = received(&events);
    assert!(r.iter().all(|m| m.qos == qos && m.ack.is_some()));
    h.ack(r.iter().copied());
    broker.wait_log(&ack_log, N + 1);
    if qos == 2 {
        broker.wait_log(&comp_log, N + 1);
    }
    // Every message acknowledged exactly once over both runs.
    let later = h.collect_for(Duration::from_millis(300));
    assert!(later.is_empty(), "late events: {later:?}");
    assert_eq!(broker.log_count(&ack_log), N + 1);
}

#[test]
fn manual_acks_qos1_unacked_half_redelivered_after_restart() {
    unacked_half_is_redelivered(1, "acks-q1");
}

#[test]
fn manual_acks_qos2_unacked_half_redelivered_after_restart() {
    unacked_half_is_redelivered(2, "acks-q2");
}

/// Acknowledgements for a connection that has since been lost are dropped: the broker sends
/// those messages again on the next connection (with the same packet ids), and only the new
/// acknowledgements count. A stale one must not acknowledge the resent message by accident.
#[test]
fn acks_for_a_lost_connection_are_dropped() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, 0, Box::new(|_| false));
    let cid = client_id("stale-ack");
    let pubacks = format!("Received PUBACK from {cid} ");
    let mut cfg = config(1, proxy.port, "stale-ack");
    cfg.clean_session = false;
    let mut h = Harness::new(1024);
    h.auto_ack = false;
    h.connect(cfg);
    h.subscribe(&broker, 1, &cid, &[("eng/sa/#", 1)]);
    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/sa/x", "-m", "one"], None);
    let ev = h.wait_for("Received one", |e| is_received_on(e, "eng/sa/x"));
    let stale = received(&ev)[0].clone();

    // Cut the connection; the same task reconnects to the resumed session.
    proxy.cut_all();
    let ev = h.wait_until(
        "ConnectionLost, then Connected with the message again",
        WAIT,
        |s| {
            s.iter().any(|e| matches!(e, Event::Connected { .. }))
                && s.iter().any(|e| is_received_on(e, "eng/sa/x"))
        },
    );
    assert!(
        ev.iter().any(|e| matches!(e, Event::ConnectionLost { .. })),
        "{}",
        describe(&ev)
    );
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::Connected {
                session_present: true,
                epoch: 2,
                ..
            }
        )),
        "{}",
        describe(&ev)
    );
    let again = received(&ev)[0].clone();
    assert_eq!(received(&ev).len(), 1, "{}", describe(&ev));
    assert_eq!(&again.payload[..], b"one");
    assert_eq!(
        again.pkid, stale.pkid,
        "mosquitto resends with the same packet id"
    );

    // The stale acknowledgement goes nowhere (a marker's acknowledgement, sent after it on
    // the same path, shows it would have arrived by then)...
    h.ack([&stale]);
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/sa/m", "-m", "marker"],
        None,
    );
    let ev = h.wait_for("the marker", |e| is_received_on(e, "eng/sa/m"));
    h.ack(received(&ev));
    broker.wait_log(&pubacks, 1);
    let logged: Vec<String> = broker
        .log()
        .lines()
        .filter(|l| l.contains(&pubacks))
        .map(String::from)
        .collect();
    assert_eq!(
        logged.len(),
        1,
        "the stale acknowledgement reached the broker: {logged:?}"
    );
    // ...while the fresh one is sent.
    h.ack([&again]);
    broker.wait_log(&pubacks, 2);
    let later = h.collect_for(Duration::from_millis(300));
    assert!(later.is_empty(), "{later:?}");
    assert_eq!(broker.log_count(&pubacks), 2);
}

// ---------------------------------------------------------------------------------------------
// 2. A PUBREL resent on a resumed session (rumqtt #664)
// ---------------------------------------------------------------------------------------------

/// A broker that resumes the session and at once sends PUBREL for a packet id this client
/// never saw gets PUBCOMP for it, and the connection stays up and usable; after a reconnect
/// the same id is answered again.
#[test]
fn pubrel_for_an_unknown_id_on_a_resumed_session_is_answered() {
    let fake = ScriptedBroker::start();
    let mut h = Harness::new(1024);
    let mut cfg = config(1, fake.port, "pubrel");
    cfg.clean_session = false;
    let cid = cfg.client_id.clone();
    assert_eq!(h.engine().set_brokers(vec![cfg]), vec![1]);

    let (mut conn, connect) = fake.accept_connect();
    assert_eq!(
        connect,
        Packet::Connect {
            client_id: cid.clone(),
            clean_session: false,
            will: false,
            login: false,
        }
    );
    conn.connack(true);
    conn.ack(0x62, 4242);
    assert_eq!(conn.expect("PUBCOMP"), Packet::PubComp(4242));
    h.wait_for("Connected", |e| {
        matches!(
            e,
            Event::Connected {
                session_present: true,
                epoch: 1,
                ..
            }
        )
    });
    // Another id nobody ever used, on the same connection.
    conn.ack(0x62, 7);
    assert_eq!(conn.expect("PUBCOMP"), Packet::PubComp(7));

    // The connection stays up: nothing is reported, nothing else is sent, nobody reconnects.
    let quiet = h.collect_for(Duration::from_secs(2));
    assert!(
        quiet.is_empty(),
        "events on a healthy connection: {quiet:?}"
    );
    assert_eq!(conn.read(Duration::from_millis(10)), None);
    assert!(
        fake.accept(Duration::ZERO).is_none(),
        "the client reconnected"
    );

    // And it works: a publish goes out and its PUBACK delivers the row.
    assert!(h.publish(1, vec![out(1, "eng/pubrel/x", b"after", 1)]));
    let p = conn.expect("PUBLISH");
    let Packet::Publish {
        qos: 1,
        pkid: Some(pkid),
        ref topic,
        ref payload,
        ..
    } = p
    else {
        panic!("expected a QoS 1 PUBLISH, got {p:?}")
    };
    assert_eq!(
        (topic.as_str(), &payload[..]),
        ("eng/pubrel/x", &b"after"[..])
    );
    conn.ack(0x40, pkid);
    let ev = h.wait_for("Delivered", |e| matches!(e, Event::Delivered { .. }));
    assert_no_trouble(&ev);
    assert_eq!(delivered(&ev), [(1, Some(pkid))]);

    // After a reconnect the same id is answered again (it was completed on the first
    // connection, and a resumed session may send its PUBREL once more).
    conn.close();
    h.wait_for("ConnectionLost", |e| {
        matches!(e, Event::ConnectionLost { .. })
    });
    let (mut conn, _) = fake.accept_connect();
    conn.connack(true);
    conn.ack(0x62, 4242);
    assert_eq!(conn.expect("PUBCOMP"), Packet::PubComp(4242));
    let ev = h.wait_for("Connected again", |e| matches!(e, Event::Connected { .. }));
    assert!(
        ev.iter()
            .all(|e| matches!(e, Event::Connecting { .. } | Event::Connected { .. })),
        "{}",
        describe(&ev)
    );
    let quiet = h.collect_for(Duration::from_millis(500));
    assert!(
        quiet.is_empty(),
        "events on a healthy connection: {quiet:?}"
    );
}

/// The same against mosquitto: a QoS 2 message is received and acknowledged (PUBREC), and the
/// connection is cut when the broker's PUBREL comes (a proxy drops it and closes both sides),
/// so the PUBCOMP is never sent. On reconnect mosquitto resumes the session and sends the
/// PUBREL again: it is answered, the connection stays up, and later messages arrive.
#[test]
fn pubrel_resent_by_mosquitto_after_a_cut_is_answered() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, 1, Box::new(|p| matches!(p, Packet::PubRel(_))));
    let cid = client_id("pubrel-real");
    let mut cfg = config(1, proxy.port, "pubrel-real");
    cfg.clean_session = false;
    let mut h = Harness::new(1024);
    h.connect(cfg);
    h.subscribe(&broker, 1, &cid, &[("eng/p2/#", 2)]);

    mosquitto_pub(&broker, &["-q", "2", "-t", "eng/p2/a", "-m", "first"], None);
    // The harness acknowledges it (PUBREC); the broker's PUBREL cuts the connection.
    let mut events = h.wait_for("ConnectionLost", |e| {
        matches!(e, Event::ConnectionLost { .. })
    });
    broker.wait_log(&format!("Received PUBREC from {cid} "), 1);
    assert_eq!(
        proxy.cut_count.load(std::sync::atomic::Ordering::Acquire),
        1
    );
    assert_eq!(
        broker.log_count(&format!("Received PUBCOMP from {cid} ")),
        0
    );

    events.extend(h.wait_for("Connected again", |e| matches!(e, Event::Connected { .. })));
    assert!(
        matches!(
            events.last(),
            Some(Event::Connected {
                session_present: true,
                ..
            })
        ),
        "{}",
        describe(&events)
    );
    // mosquitto sends the PUBREL again and we complete the message.
    broker.wait_log(&format!("Sending PUBREL to {cid} "), 2);
    broker.wait_log(&format!("Received PUBCOMP from {cid} "), 1);

    // No loop of lost connections, and later messages (QoS 2 and 1) come through.
    mosquitto_pub(
        &broker,
        &["-q", "2", "-t", "eng/p2/b", "-m", "second"],
        None,
    );
    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/p2/c", "-m", "third"], None);
    let after = h.wait_until("second and third", WAIT, |s| {
        s.iter().any(|e| is_received_on(e, "eng/p2/b"))
            && s.iter().any(|e| is_received_on(e, "eng/p2/c"))
    });
    broker.wait_log(&format!("Received PUBCOMP from {cid} "), 2);
    let mut after = after;
    after.extend(
        h.collect_for(Duration::from_millis(500))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&after);
    events.extend(after);
    // "first" arrived once: after PUBREC the broker only releases it.
    assert_eq!(
        payloads(&events),
        ["first", "second", "third"],
        "{}",
        describe(&events)
    );
    assert_eq!(broker.connects(&cid), 2);
}

// ---------------------------------------------------------------------------------------------
// 3. Packet-id collision, then a lost session (rumqtt #1014)
// ---------------------------------------------------------------------------------------------

/// With 4 publishes in flight, a broker acknowledges ids 2-4 but not 1; rumqttc gives the
/// next row id 1 again, finds it taken and holds that row back (a collision), sending nothing
/// more. The broker then drops the connection and loses the session. After the reconnect every
/// row the worker resends (with the new epoch) goes out and is Delivered: no stall.
#[test]
fn packet_id_collision_then_session_loss_does_not_stall() {
    const ROWS: i64 = 8;
    let fake = ScriptedBroker::start();
    let mut h = Harness::new(1024);
    let mut cfg = config(1, fake.port, "collision");
    cfg.max_inflight = 4;
    assert_eq!(h.engine().set_brokers(vec![cfg]), vec![1]);
    let (mut c1, _) = fake.accept_connect();
    c1.connack(false);
    h.wait_for("Connected", |e| {
        matches!(e, Event::Connected { epoch: 1, .. })
    });

    let row = |i: i64| out(i, "eng/coll/x", format!("row-{i}").as_bytes(), 1);
    let row_of = |payload: &[u8]| -> i64 {
        std::str::from_utf8(payload)
            .unwrap()
            .strip_prefix("row-")
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(h.publish(1, (1..=ROWS).map(row).collect()));
    let mut first = Vec::new();
    for _ in 0..4 {
        match c1.expect("PUBLISH") {
            Packet::Publish {
                qos: 1,
                pkid: Some(p),
                payload,
                ..
            } => first.push((p, row_of(&payload))),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(
        first.iter().map(|x| x.1).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "{first:?}"
    );
    let withheld = first[0].0;
    for (p, _) in &first[1..] {
        c1.ack(0x40, *p);
    }
    let mut events = h.wait_until("rows 2-4 Delivered", WAIT, |s| delivered(s).len() >= 3);
    // rumqttc now wants to send row 5 with id `withheld`, still in flight: it holds it back.
    // (Without the collision it would be on the wire at once.)
    assert_eq!(
        c1.read(Duration::from_millis(500)),
        None,
        "expected a packet-id collision to hold row 5 back (id {withheld} is still in flight)"
    );
    c1.close();
    events.extend(h.wait_for("ConnectionLost", |e| {
        matches!(e, Event::ConnectionLost { .. })
    }));
    let lost = events.last().unwrap();
    assert!(
        matches!(
            lost,
            Event::ConnectionLost {
                suspect: Some(1),
                ..
            }
        ),
        "the oldest unacknowledged row is 1: {lost:?}"
    );

    // The session is lost; the worker resends what was not Delivered, with the new epoch.
    let (mut c2, _) = fake.accept_connect();
    c2.connack(false);
    events.extend(h.wait_for("Connected again", |e| {
        matches!(e, Event::Connected { epoch: 2, .. })
    }));
    let done: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    let resend: Vec<i64> = (1..=ROWS).filter(|i| !done.contains(i)).collect();
    assert_eq!(resend, [1, 5, 6, 7, 8]);
    assert!(h.publish(1, resend.iter().map(|i| row(*i)).collect()));
    let mut second = Vec::new();
    while second.len() < resend.len() {
        match c2.read(WAIT) {
            Some(Packet::Publish {
                qos: 1,
                pkid: Some(p),
                payload,
                ..
            }) => {
                second.push(row_of(&payload));
                c2.ack(0x40, p);
            }
            Some(other) => panic!("expected PUBLISH, got {other:?}"),
            None => panic!(
                "stalled after the reconnect: only rows {second:?} of {resend:?} were sent; \
                 events:\n{}",
                describe(&events)
            ),
        }
    }
    assert_eq!(second, resend, "resent rows go out in order");
    let mut tail = h.wait_until("the resent rows Delivered", WAIT, |s| {
        delivered(s).len() >= resend.len()
    });
    tail.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&tail);
    events.extend(tail);
    let mut ids: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    ids.sort();
    assert_eq!(
        ids,
        (1..=ROWS).collect::<Vec<_>>(),
        "every row Delivered exactly once:\n{}",
        describe(&events)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The byte bound on received messages held for the worker
// ---------------------------------------------------------------------------------------------

/// 20 MiB of 10 KiB messages arrive while nobody drains an engine limited to 1 MiB: it stops
/// reading at the limit (the first drain holds about 1 MiB, and about that much was taken off
/// the socket), and once drained (and, for QoS 1, acknowledged) every message arrives once,
/// in order.
fn buffer_bound(qos: u8, tag: &str) {
    const LIMIT: usize = 1 << 20;
    const MSG: usize = 10 * 1024;
    const N: usize = 2000;
    let broker = Broker::start();
    let cid = client_id(tag);
    let mut h = Harness::with_limit(8192, LIMIT);
    h.connect(config(1, broker.port, tag));
    h.subscribe(&broker, 1, &cid, &[("eng/buf/#", qos)]);

    let line = |i: usize| format!("{i:05}-{}\n", "x".repeat(MSG - 6));
    let lines: String = (0..N).map(line).collect();
    let mut publisher = spawn_mosquitto_pub(
        &broker,
        &["-l", "-q", &qos.to_string(), "-t", "eng/buf/x"],
        lines.into_bytes(),
    );
    publisher.wait_success(Duration::from_secs(30));
    broker.wait_log(&format!("Sending PUBLISH to {cid} "), N);
    // The engine stops reading once it holds the limit.
    let taken = settled(
        "the bytes the engine read",
        Duration::from_millis(250),
        || client_bytes_read(broker.port),
    );
    // What the engine held when the drain began: the messages it had read before then (a
    // drain frees room, so more arrive while it runs).
    let t0 = now_us();
    let first = h.drain_within(usize::MAX, usize::MAX);
    let held: Vec<_> = received(&first)
        .into_iter()
        .filter(|m| m.received_at_us < t0)
        .collect();
    let held_bytes: usize = held.iter().map(|m| m.payload.len()).sum();
    eprintln!(
        "{tag}: {} MiB published; the engine took {taken} bytes off its socket and held \
         {held_bytes} bytes ({} messages) when the first drain began (limit {LIMIT}; {} \
         messages in that drain)",
        (N * MSG) >> 20,
        held.len(),
        received(&first).len()
    );
    // Held: up to the limit, plus the message that crossed it.
    assert!(
        held_bytes <= LIMIT + MSG,
        "{held_bytes} bytes held with a limit of {LIMIT}"
    );
    assert!(
        held_bytes + MSG >= LIMIT,
        "the engine never filled its buffer"
    );
    // Read off the socket: that, plus one read of rumqttc (10 packets) and its read buffer.
    assert!(
        taken <= LIMIT + 16 * (MSG + 32) + 64 * 1024,
        "the engine read {taken} bytes off its socket with a limit of {LIMIT}"
    );

    let mut events = first;
    let deadline = Instant::now() + Duration::from_secs(30);
    while received(&events).len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} received",
            received(&events).len()
        );
        let got = h.drain_within(256, usize::MAX);
        if got.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        events.extend(got);
    }
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);
    let r = received(&events);
    assert_eq!(r.len(), N, "duplicates");
    for (i, m) in r.iter().enumerate() {
        assert_eq!(
            (m.qos, m.payload.len(), &m.payload[..6]),
            (qos, MSG, format!("{i:05}-").as_bytes()),
            "message {i} out of order or altered"
        );
    }
    if qos > 0 {
        broker.wait_log(&format!("Received PUBACK from {cid} "), N);
        assert_eq!(broker.log_count(&format!("Received PUBACK from {cid} ")), N);
    }
}

#[test]
fn buffer_bound_qos0() {
    buffer_bound(0, "buf-q0");
}

#[test]
fn buffer_bound_qos1() {
    buffer_bound(1, "buf-q1");
}

// ---------------------------------------------------------------------------------------------
// 5. A broker that closes the connection on an over-size packet: the suspect row
// ---------------------------------------------------------------------------------------------

/// mosquitto with `max_packet_size 2000` disconnects a client that sends a larger packet.
/// With nothing unacknowledged before it, the big row is the suspect of that ConnectionLost,
/// each time it is resent; once the worker sets it aside, the row behind it goes through.
#[test]
fn broker_closing_on_an_oversize_packet_names_the_suspect() {
    let broker = Broker::start_with("max_packet_size 2000\n");
    let mut h = Harness::new(1024);
    let cid = client_id("suspect");
    if protocol() == Protocol::V5 {
        return broker_maximum_packet_size_is_honoured(&broker, &mut h, "suspect");
    }
    h.connect(config(1, broker.port, "suspect"));
    let sub = Sub::start(&broker, &client_id("suspect-sub"), "eng/sus/#", 1, 2);

    assert!(h.publish(1, vec![out(1, "eng/sus/a", b"small-1", 1)]));
    let mut events = h.wait_for("Delivered 1", |e| {
        matches!(e, Event::Delivered { outbox_id: 1, .. })
    });
    let big = out(2, "eng/sus/b", &[7u8; 5000], 1);
    let small3 = out(3, "eng/sus/c", b"small-3", 1);
    for epoch in 1..=2 {
        // Sent (again, after the reconnect, as the worker does): named again.
        if epoch > 1 {
            events.extend(h.wait_for("Connected", |e| {
                matches!(e, Event::Connected { epoch: 2, .. })
            }));
        }
        assert!(h.publish(1, vec![big.clone(), small3.clone()]));
        let ev = h.wait_for("ConnectionLost", |e| {
            matches!(e, Event::ConnectionLost { .. })
        });
        assert!(
            matches!(
                ev.last(),
                Some(Event::ConnectionLost {
                    suspect: Some(2),
                    ..
                })
            ),
            "connection {epoch}: expected the big row 2 as suspect; events:\n{}",
            describe(&ev)
        );
        assert!(delivered(&ev).is_empty(), "{}", describe(&ev));
        events.extend(ev);
    }
    // Set aside, row 2 no longer blocks row 3.
    events.extend(h.wait_for("Connected", |e| {
        matches!(e, Event::Connected { epoch: 3, .. })
    }));
    assert!(h.publish(1, vec![small3]));
    let ev = h.wait_for("Delivered 3", |e| {
        matches!(e, Event::Delivered { outbox_id: 3, .. })
    });
    assert_no_trouble(&ev);
    let got = sub.finish();
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), &m.payload[..]))
            .collect::<Vec<_>>(),
        [
            ("eng/sus/a", &b"small-1"[..]),
            ("eng/sus/c", &b"small-3"[..])
        ]
    );
    assert_eq!(broker.connects(&cid), 3);
}

/// Rows [small, big, small] in one go against mosquitto's `max_packet_size 2000`, with the
/// worker's rule: resend what is not Delivered after each Connected, and dead-letter a row
/// once it has been the suspect 3 times. The big row, and only it, ends up set aside; the
/// small ones are Delivered. (The suspect is not always the big row: when mosquitto reads
/// the first small row and the big one in one pass, it drops the PUBACK it had queued for
/// the small one when it closes the connection, so the small row is the oldest
/// unacknowledged one that time; it is resent, at least once, and acknowledged next time.)
#[test]
fn oversize_row_in_a_batch_is_dead_lettered_by_strikes() {
    const STRIKES: u32 = 3;
    let broker = Broker::start_with("max_packet_size 2000\n");
    let mut h = Harness::new(1024);
    if protocol() == Protocol::V5 {
        return broker_maximum_packet_size_is_honoured(&broker, &mut h, "strikes");
    }
    h.connect(config(1, broker.port, "strikes"));
    let rows = vec![
        out(1, "eng/str/a", b"small-1", 1),
        out(2, "eng/str/b", &[7u8; 5000], 1),
        out(3, "eng/str/c", b"small-3", 1),
    ];
    let mut strikes: BTreeMap<i64, u32> = BTreeMap::new();
    let mut dead: Vec<i64> = Vec::new();
    let mut done: Vec<i64> = Vec::new();
    let mut suspects = Vec::new();
    assert!(h.publish(1, rows.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.len() + dead.len() < rows.len() {
        let (_, e) = h.next_timed(deadline).unwrap_or_else(|| {
            panic!("stalled: delivered {done:?}, dead {dead:?}, suspects {suspects:?}")
        });
        match e {
            Event::Delivered { outbox_id, .. } => {
                assert!(
                    !done.contains(&outbox_id),
                    "row {outbox_id} Delivered twice"
                );
                done.push(outbox_id);
            }
            Event::ConnectionLost { suspect, .. } => {
                suspects.push(suspect);
                let id = suspect.expect("a connection with rows in flight ended without a suspect");
                let n = strikes.entry(id).or_default();
                *n += 1;
                if *n >= STRIKES {
                    dead.push(id);
                }
            }
            Event::Connected { .. } => {
                let resend: Vec<_> = rows
                    .iter()
                    .filter(|r| !done.contains(&r.outbox_id) && !dead.contains(&r.outbox_id))
                    .cloned()
                    .collect();
                assert!(h.publish(1, resend));
            }
            Event::Connecting { .. } => {}
            other => panic!("unexpected {}", describe_one(&other)),
        }
    }
    eprintln!("suspects named: {suspects:?}");
    assert_eq!(dead, [2], "suspects named: {suspects:?}");
    done.sort();
    assert_eq!(done, [1, 3]);
    assert_eq!(strikes[&2], STRIKES);
    assert!(
        suspects.len() <= STRIKES as usize + 2,
        "too many losses: {suspects:?}"
    );
}

/// MQTT 5: mosquitto announces `max_packet_size` in its CONNACK (Maximum Packet Size), so the
/// engine rejects the big row before it reaches the connection, with the reason, and the rows
/// around it are delivered on the one connection: no strikes, no reconnects.
fn broker_maximum_packet_size_is_honoured(broker: &Broker, h: &mut Harness, tag: &str) {
    let cid = client_id(tag);
    h.connect(config(1, broker.port, tag));
    let filter = format!("eng/{tag}/#");
    let sub = Sub::start(broker, &client_id(&format!("{tag}-sub")), &filter, 1, 2);
    let rows = vec![
        out(1, &format!("eng/{tag}/a"), b"small-1", 1),
        out(2, &format!("eng/{tag}/b"), &[7u8; 5000], 1),
        out(3, &format!("eng/{tag}/c"), b"small-3", 1),
    ];
    assert!(h.publish(1, rows));
    let events = h.wait_outcomes(3);
    let mut d: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(d, [1, 3], "{}", describe(&events));
    let rejected: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Rejected { outbox_id: 2, .. }))
        .collect();
    assert!(
        matches!(rejected[..], [Event::Rejected { error, .. }]
            if error.contains("2000") && error.contains("Maximum Packet Size")),
        "{}",
        describe(&events)
    );
    assert_eq!(sub.finish().len(), 2);
    assert_eq!(broker.connects(&cid), 1);
}

/// With the connection's packet limit set to the broker's, the big row is Rejected before it
/// reaches the connection (the worker dead-letters it at once), a row exactly at the limit
/// goes through, and the connection never drops.
#[test]
fn packet_limit_matching_the_broker_rejects_only_the_big_row() {
    let broker = Broker::start_with("max_packet_size 2000\n");
    let mut h = Harness::new(1024);
    let cid = client_id("limit");
    let mut cfg = config(1, broker.port, "limit");
    cfg.max_packet_size = 2000;
    h.connect(cfg);
    let sub = Sub::start(&broker, &client_id("limit-sub"), "eng/lim/#", 1, 3);
    let topic = "eng/lim/t";
    // Our count of a PUBLISH's overhead (see `packet_overhead`): fixed header, topic, packet id,
    // and on MQTT 5 the properties' length byte.
    let fits = 2000 - topic.len() - 9 - usize::from(protocol() == Protocol::V5);
    assert!(h.publish(
        1,
        vec![
            out(1, topic, b"small-1", 1),
            out(2, topic, &[7u8; 5000], 1),
            out(3, topic, &vec![3u8; fits], 1),
            out(4, topic, b"small-4", 0),
        ]
    ));
    let events = h.wait_outcomes(4);
    let got = sub.finish();
    let mut rejected = Vec::new();
    for e in &events {
        match e {
            Event::Rejected {
                outbox_id, error, ..
            } => {
                assert!(error.contains("2000"), "{error:?}");
                rejected.push(*outbox_id);
            }
            Event::Delivered { .. } => {}
            other => panic!("unexpected {}", describe_one(other)),
        }
    }
    assert_eq!(rejected, [2]);
    let mut d: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(d, [1, 3, 4]);
    assert_eq!(
        got.iter().map(|m| m.payload.len()).collect::<Vec<_>>(),
        [7, fits, 7]
    );
    assert_eq!(broker.connects(&cid), 1);
}

// ---------------------------------------------------------------------------------------------
// 6. A connection task that panics is reported and can be restarted
// ---------------------------------------------------------------------------------------------

/// A panic in a broker's task (a bug in rumqttc or the engine) must neither reach the caller
/// nor leave the broker silently unserved: the engine reports `Failed`, forgets the task, and
/// the next `set_brokers` (what the worker does on `Failed`) starts a working connection.
#[test]
fn panicking_connection_task_is_reported_and_restarted() {
    let broker = Broker::start();
    let cfg = config(1, broker.port, "panic");
    let mut h = Harness::new(1024);
    h.connect(cfg.clone());
    h.engine().inject_panic(1);
    let events = h.wait_for("Failed", |e| matches!(e, Event::Failed { .. }));
    let Some(Event::Failed { broker_id, error }) = events.last() else {
        unreachable!()
    };
    assert_eq!(*broker_id, 1);
    assert!(error.contains("injected by a test"), "{error:?}");
    assert!(!h.engine().has_broker(1), "the failed task is forgotten");

    let restarted = h.engine().set_brokers(vec![cfg]);
    assert_eq!(restarted, vec![1]);
    h.wait_for("Connected again", |e| matches!(e, Event::Connected { .. }));
    assert!(h.publish(1, vec![out(7, "eng/panic/after", b"still here", 1)]));
    let events = h.wait_outcomes(1);
    assert_eq!(delivered(&events), vec![(7, Some(1))]);
}

// ---------------------------------------------------------------------------------------------
// 7. A member of a shared subscription that stops cleanly hands its share over
// ---------------------------------------------------------------------------------------------

/// Two connections in one `$share` group while a stream of QoS 1 messages flows; one is
/// stopped mid-stream (as `mqtt_stop_listener` does). It leaves the group before it says
/// goodbye and hands the worker everything the broker gave it, so between the two every
/// message arrives: none lost in the stopped connection's socket (clean session) and none
/// queued for a member that is gone.
#[test]
fn shared_subscription_member_stopping_cleanly_loses_nothing() {
    const N: usize = 20_000;
    let broker = Broker::start();
    let mut h = Harness::new(65_536);
    let a = config(1, broker.port, "share-a");
    let b = config(2, broker.port, "share-b");
    let (cid_a, cid_b) = (a.client_id.clone(), b.client_id.clone());
    h.engine().set_brokers(vec![a, b.clone()]);
    h.wait_until("both Connected", WAIT, |s| {
        s.iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count()
            == 2
    });
    h.subscribe(&broker, 1, &cid_a, &[("$share/g/eng/sh/#", 1)]);
    h.subscribe(&broker, 2, &cid_b, &[("$share/g/eng/sh/#", 1)]);
    let input: Vec<u8> = (0..N).flat_map(|i| format!("{i}\n").into_bytes()).collect();
    let mut publisher = spawn_mosquitto_pub(&broker, &["-t", "eng/sh/x", "-q", "1", "-l"], input);
    let mut got: Vec<(i32, usize)> = Vec::new();
    let take = |events: &[Event], got: &mut Vec<(i32, usize)>| {
        for m in received(events) {
            let n: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            got.push((m.broker_id, n));
        }
    };
    let first = h.wait_until("a share on each", Duration::from_secs(30), |s| {
        let r = received(s);
        r.iter().filter(|m| m.broker_id == 1).count() >= 1000
            && r.iter().filter(|m| m.broker_id == 2).count() >= 1000
    });
    take(&first, &mut got);
    // Stop A mid-stream; B keeps running.
    h.engine().set_brokers(vec![b]);
    let rest = h.wait_until("every message", Duration::from_secs(60), |s| {
        got.len() + received(s).len() >= N
    });
    take(&rest, &mut got);
    publisher.wait_success(Duration::from_secs(30));
    let late = h.collect_for(Duration::from_millis(300));
    take(
        &late.into_iter().map(|(_, e)| e).collect::<Vec<_>>(),
        &mut got,
    );
    let mut seen = vec![0u32; N];
    for (_, n) in &got {
        seen[*n] += 1;
    }
    let lost: Vec<usize> = (0..N).filter(|n| seen[*n] == 0).collect();
    let twice: Vec<usize> = (0..N).filter(|n| seen[*n] > 1).collect();
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        twice.is_empty(),
        "{} twice, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    let on_a = got.iter().filter(|(b, _)| *b == 1).count();
    assert!((1000..N).contains(&on_a), "A's share: {on_a}");
}
