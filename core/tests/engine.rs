//! Integration tests of the MQTT engine against a real mosquitto (one broker per test, on a free
//! loopback port; see `common`). Run with `cargo test -p mqtt_pg_core --test engine`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use mqtt_pg_core::engine::{self, Event};

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Wait until the engine runs exactly `n` broker tasks.
fn wait_tasks(h: &mut Harness, n: usize) {
    let deadline = Instant::now() + WAIT;
    while h.engine().running_tasks() != n {
        assert!(
            Instant::now() < deadline,
            "running_tasks() stayed at {} instead of {n}",
            h.engine().running_tasks()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn is_received_on(e: &Event, topic: &str) -> bool {
    matches!(e, Event::Received(m) if m.topic == topic)
}

/// 1. A new broker is reported as Connecting, then Connected; an unchanged config does not
///    restart it.
#[test]
fn connects() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cfg = config(1, broker.port, "connects");

    let seen = h.connect(cfg.clone());
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::Connecting { broker_id: 1 },
                Event::Connected {
                    broker_id: 1,
                    session_present: false,
                    epoch: 1
                }
            ]
        ),
        "expected exactly Connecting then Connected, saw:\n{}",
        describe(&seen)
    );
    assert_eq!(h.engine().running_tasks(), 1);
    assert!(h.wakes() >= 1, "the wake callback was never called");
    // The broker saw our client id, MQTT 3.1.1 ("p2"), a clean session and the keepalive.
    broker.wait_log(
        &format!("as {} ({}, c1, k30)", cfg.client_id, proto_tag()),
        1,
    );

    // The same config again changes nothing: no restart, no events, still one connection.
    assert_eq!(h.engine().set_brokers(vec![cfg]), Vec::<i32>::new());
    let later = h.collect_for(Duration::from_millis(300));
    assert!(
        later.is_empty(),
        "unexpected events after an unchanged set_brokers:\n{}",
        describe(&later.into_iter().map(|(_, e)| e).collect::<Vec<_>>())
    );
    assert_eq!(h.engine().running_tasks(), 1);
    assert_eq!(broker.log_count("New client connected"), 1);
}

/// 2. QoS 0, 1 and 2 publishes: each outbox id is Delivered exactly once (pkid only for QoS
///    1/2), and an independent subscriber gets the exact bytes at the right QoS.
#[test]
fn publish_qos_0_1_2() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    h.connect(config(1, broker.port, "publish"));
    let sub = Sub::start(&broker, &client_id("publish-sub"), "eng/pub/#", 2, 9);

    let payloads: [(&str, Vec<u8>); 3] = [
        ("text", "hello, € and ü".as_bytes().to_vec()),
        ("binary", all_bytes()),
        ("empty", Vec::new()),
    ];
    let mut msgs = Vec::new();
    let mut expected: BTreeMap<String, (u8, Vec<u8>)> = BTreeMap::new();
    let mut qos_of: BTreeMap<i64, u8> = BTreeMap::new();
    for qos in 0..=2u8 {
        for (k, (kind, payload)) in payloads.iter().enumerate() {
            let id = 100 + 10 * i64::from(qos) + k as i64;
            let topic = format!("eng/pub/q{qos}/{kind}");
            msgs.push(out(id, &topic, payload, qos));
            expected.insert(topic, (qos, payload.clone()));
            qos_of.insert(id, qos);
        }
    }
    assert!(h.publish(1, msgs));

    let mut events = h.wait_until("9 Delivered events", WAIT, |s| delivered(s).len() >= 9);
    let got = sub.finish();
    // Anything late (a duplicate Delivered) would show up now.
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);

    let mut d = delivered(&events);
    d.sort();
    let ids: Vec<i64> = d.iter().map(|x| x.0).collect();
    assert_eq!(
        ids,
        qos_of.keys().copied().collect::<Vec<_>>(),
        "each outbox id must be Delivered exactly once:\n{}",
        describe(&events)
    );
    for (id, pkid) in &d {
        match qos_of[id] {
            0 => assert_eq!(*pkid, None, "QoS 0 outbox {id} has a pkid"),
            _ => assert!(
                matches!(pkid, Some(p) if *p != 0),
                "QoS 1/2 outbox {id} has pkid {pkid:?}"
            ),
        }
    }
    let mut pkids: Vec<u16> = d.iter().filter_map(|x| x.1).collect();
    pkids.sort();
    pkids.dedup();
    assert_eq!(pkids.len(), 6, "QoS 1/2 pkids not distinct: {d:?}");

    assert!(got.iter().all(|m| !m.retain), "{got:?}");
    let got_map: BTreeMap<String, (u8, Vec<u8>)> = got
        .iter()
        .map(|m| (m.topic.clone(), (m.qos, m.payload.clone())))
        .collect();
    assert_eq!(
        got_map.len(),
        9,
        "duplicate topics at the subscriber: {got:?}"
    );
    assert_eq!(got_map, expected);
}

/// 3. Subscriptions with wildcards receive the exact topic, payload, QoS and retain flag,
///    including a retained message published before subscribing.
#[test]
fn subscribe_and_receive() {
    let broker = Broker::start();
    mosquitto_pub(
        &broker,
        &[
            "-r",
            "-q",
            "1",
            "-t",
            "eng/in/dev0/data",
            "-m",
            "retained-hello",
        ],
        None,
    );
    let mut h = Harness::new(1024);
    let cid = client_id("receive");
    h.connect(config(1, broker.port, "receive"));
    let t0 = now_us();
    h.subscribe(&broker, 1, &cid, &[("eng/in/+/data", 1), ("eng/q2/#", 2)]);

    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/in/dev1/other", "-m", "nope"],
        None,
    );
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/in/dev1/data", "-m", "live"],
        None,
    );
    mosquitto_pub(
        &broker,
        &["-q", "0", "-t", "eng/in/dev2/data", "-s"],
        Some(&all_bytes()),
    );
    mosquitto_pub(
        &broker,
        &["-q", "2", "-t", "eng/in/dev3/data", "-m", "downgraded"],
        None,
    );
    mosquitto_pub(&broker, &["-q", "2", "-t", "eng/q2/x/y", "-n"], None);

    let mut events = h.wait_until("5 Received events", WAIT, |s| received(s).len() >= 5);
    let t1 = now_us();
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);

    let got: Vec<(String, Vec<u8>, u8, bool, bool)> = received(&events)
        .iter()
        .map(|m| {
            (
                m.topic.clone(),
                m.payload.to_vec(),
                m.qos,
                m.retain,
                m.pkid.is_some(),
            )
        })
        .collect();
    let want: Vec<(String, Vec<u8>, u8, bool, bool)> = vec![
        (
            "eng/in/dev0/data".into(),
            b"retained-hello".to_vec(),
            1,
            true,
            true,
        ),
        ("eng/in/dev1/data".into(), b"live".to_vec(), 1, false, true),
        ("eng/in/dev2/data".into(), all_bytes(), 0, false, false),
        // Published at QoS 2, delivered at the subscription's QoS 1.
        (
            "eng/in/dev3/data".into(),
            b"downgraded".to_vec(),
            1,
            false,
            true,
        ),
        ("eng/q2/x/y".into(), Vec::new(), 2, false, true),
    ];
    assert_eq!(got, want, "events:\n{}", describe(&events));
    for m in received(&events) {
        assert_eq!(m.broker_id, 1);
        assert!(
            (t0..=t1).contains(&m.received_at_us),
            "received_at_us {} outside [{t0}, {t1}]",
            m.received_at_us
        );
    }
}

/// 4. Removing a filter unsubscribes it at once; unchanged filters are not subscribed again.
#[test]
fn live_unsubscribe() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("unsub");
    h.connect(config(1, broker.port, "unsub"));
    h.subscribe(&broker, 1, &cid, &[("eng/a/#", 1), ("eng/b/#", 1)]);

    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/a/1", "-m", "before"], None);
    let ev = h.wait_for("Received eng/a/1", |e| is_received_on(e, "eng/a/1"));
    assert_no_trouble(&ev);

    h.engine().set_subscriptions(1, subs(&[("eng/b/#", 1)]));
    broker.wait_log(&format!("Sending UNSUBACK to {cid}"), 1);
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/a/2", "-m", "after-unsubscribe"],
        None,
    );
    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/b/1", "-m", "marker"], None);
    let ev = h.wait_for("Received marker on eng/b/1", |e| {
        is_received_on(e, "eng/b/1")
    });
    assert_no_trouble(&ev);
    let topics: Vec<&str> = received(&ev).iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(topics, ["eng/b/1"], "events:\n{}", describe(&ev));
    assert_eq!(&received(&ev)[0].payload[..], b"marker");
    // Only the removed filter changed: no new SUBSCRIBE was sent.
    assert_eq!(
        broker.log_count(&format!("Received SUBSCRIBE from {cid}")),
        1
    );

    // Adding it back (at another QoS) subscribes it again.
    h.subscribe(&broker, 1, &cid, &[("eng/a/#", 0), ("eng/b/#", 1)]);
    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/a/3", "-m", "again"], None);
    let ev = h.wait_for("Received eng/a/3", |e| is_received_on(e, "eng/a/3"));
    assert_no_trouble(&ev);
    let r = received(&ev);
    assert_eq!(r.len(), 1, "events:\n{}", describe(&ev));
    assert_eq!((&r[0].payload[..], r[0].qos), (&b"again"[..], 0));
}

/// 5. 1,000 QoS 1 messages in one call: all Delivered once, received in order.
#[test]
fn order_of_1000_qos1() {
    const N: i64 = 1000;
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    h.connect(config(1, broker.port, "order"));
    let sub = Sub::start(
        &broker,
        &client_id("order-sub"),
        "eng/order/#",
        1,
        N as usize,
    );

    let payload = |i: i64| format!("msg-{i:05}").into_bytes();
    let msgs = (1..=N)
        .map(|i| out(i, "eng/order/seq", &payload(i), 1))
        .collect();
    let t = Instant::now();
    assert!(h.publish(1, msgs));
    let events = h.wait_until("1000 Delivered events", WAIT, |s| {
        delivered(s).len() >= N as usize
    });
    let took = t.elapsed();
    let got = sub.finish();
    eprintln!("1000 QoS 1 publishes Delivered in {took:?}");
    assert_no_trouble(&events);

    let mut d = delivered(&events);
    assert!(d.iter().all(|x| x.1.is_some()), "QoS 1 without pkid: {d:?}");
    d.sort();
    assert_eq!(
        d.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>(),
        "each outbox id must be Delivered exactly once"
    );
    assert!(got
        .iter()
        .all(|m| m.qos == 1 && !m.retain && m.topic == "eng/order/seq"));
    let got_payloads: Vec<Vec<u8>> = got.into_iter().map(|m| m.payload).collect();
    assert_eq!(got_payloads, (1..=N).map(payload).collect::<Vec<_>>());
}

/// 6. Broker restart: ConnectionLost naming host:port, reconnect attempts spaced by a growing
///    backoff, Connected again after the restart and the subscription works on the new session.
#[test]
fn broker_restart() {
    let mut broker = Broker::start();
    let port = broker.port;
    let target = format!("127.0.0.1:{port}");
    let mut h = Harness::new(1024);
    let cid = client_id("restart");
    h.connect(config(1, port, "restart"));
    h.subscribe(&broker, 1, &cid, &[("eng/r/#", 1)]);
    mosquitto_pub(&broker, &["-q", "1", "-t", "eng/r/1", "-m", "before"], None);
    h.wait_for("Received eng/r/1", |e| is_received_on(e, "eng/r/1"));

    broker.stop();
    // The loss itself.
    let deadline = Instant::now() + WAIT;
    let (t_lost, first) = match h.next_timed(deadline) {
        Some((t, e @ Event::ConnectionLost { .. })) => (t, e),
        Some((_, e)) => panic!("unexpected {} before ConnectionLost", describe_one(&e)),
        None => panic!("no ConnectionLost within {WAIT:?} of killing the broker"),
    };
    let Event::ConnectionLost {
        broker_id, error, ..
    } = &first
    else {
        unreachable!()
    };
    assert_eq!(*broker_id, 1);
    assert!(
        error.contains(&target),
        "error {error:?} does not name {target}"
    );

    // Two seconds of retries against a dead port.
    let window = Duration::from_secs(2);
    let timeline = h.collect_for(window.saturating_sub(t_lost.elapsed()));
    let mut lines = vec![format!("  +0ms {}", describe_one(&first))];
    lines.extend(timeline.iter().map(|(t, e)| {
        format!(
            "  +{}ms {}",
            t.duration_since(t_lost).as_millis(),
            describe_one(e)
        )
    }));
    let shown = lines.join("\n");
    eprintln!("reconnect timeline:\n{shown}");

    let mut connecting = 0;
    let mut last_lost = t_lost;
    let mut delays = Vec::new();
    for (i, (t, e)) in timeline.iter().enumerate() {
        match e {
            Event::Connecting { broker_id: 1 } if i % 2 == 0 => {
                connecting += 1;
                delays.push(t.duration_since(last_lost));
            }
            Event::ConnectionLost {
                broker_id: 1,
                error,
                ..
            } if i % 2 == 1 => {
                last_lost = *t;
                assert!(
                    error.contains(&target) && error.contains("refused"),
                    "retry error {error:?} should say the connection to {target} was refused"
                );
            }
            _ => panic!("expected Connecting / ConnectionLost alternating:\n{shown}"),
        }
    }
    // With min 100 ms and max 1 s the delays are >= 50, 100, 200, 400, 500, 500 ms: at most 6
    // attempts fit in 2 s; without any backoff there would be hundreds.
    assert!(
        (3..=6).contains(&connecting),
        "{connecting} Connecting events in {window:?}:\n{shown}"
    );
    for (k, d) in delays.iter().enumerate() {
        let nominal = Duration::from_millis(100u64 << k.min(4)).min(Duration::from_secs(1));
        let floor = (nominal / 2)
            .mul_f64(0.8)
            .saturating_sub(Duration::from_millis(10));
        assert!(
            *d >= floor,
            "retry {k} came {d:?} after the loss, below the backoff floor {floor:?}:\n{shown}"
        );
    }
    assert!(
        delays.len() < 4 || delays[3] > delays[0] * 2,
        "delays do not grow: {delays:?}"
    );

    broker.restart();
    let ev = h.wait_for("Connected after the restart", |e| {
        matches!(e, Event::Connected { .. })
    });
    for e in &ev {
        assert!(
            matches!(
                e,
                Event::Connecting { broker_id: 1 }
                    | Event::ConnectionLost { broker_id: 1, .. }
                    | Event::Connected {
                        broker_id: 1,
                        session_present: false,
                        ..
                    }
            ),
            "unexpected {} while reconnecting",
            describe_one(e)
        );
    }
    // The broker lost the session; the engine subscribed again on its own.
    broker.wait_log(&format!("Sending SUBACK to {cid}"), 1);
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/r/2", "-m", "after-restart"],
        None,
    );
    let ev = h.wait_for("Received eng/r/2", |e| is_received_on(e, "eng/r/2"));
    assert_no_trouble(&ev);
    let r = received(&ev);
    assert_eq!(r.len(), 1, "events:\n{}", describe(&ev));
    assert_eq!(
        (&r[0].payload[..], r[0].qos, r[0].retain),
        (&b"after-restart"[..], 1, false)
    );
}

/// 7. A changed config moves the connection to the new broker; no brokers stops the task.
#[test]
fn change_broker_then_stop() {
    let a = Broker::start();
    let b = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("move");
    let cfg_a = config(1, a.port, "move");
    h.connect(cfg_a.clone());
    a.wait_log(&format!("as {cid} ("), 1);

    let mut cfg_b = cfg_a.clone();
    cfg_b.port = b.port;
    assert_eq!(h.engine().set_brokers(vec![cfg_b]), vec![1]);
    // The replaced task's status events are filtered out: they must never overwrite the new
    // connection's status. Its Stopped does come through (it tells the worker the old task
    // will write nothing more), as do the new task's Connecting/Connected.
    let ev = h.wait_until("Stopped (old task) and Connected (new task)", WAIT, |s| {
        s.iter()
            .any(|e| matches!(e, Event::Stopped { broker_id: 1 }))
            && s.iter()
                .any(|e| matches!(e, Event::Connected { broker_id: 1, .. }))
    });
    eprintln!("events while moving:\n{}", describe(&ev));
    assert_no_trouble(&ev);
    assert!(
        ev.iter().all(|e| matches!(
            e,
            Event::Stopped { broker_id: 1 }
                | Event::Connecting { broker_id: 1 }
                | Event::Connected { broker_id: 1, .. }
        )),
        "events:\n{}",
        describe(&ev)
    );
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count(),
        1,
        "only the new task's Connected"
    );
    // The old connection said goodbye properly; the new one is on B.
    a.wait_log(&format!("Client {cid} disconnected."), 1);
    b.wait_log(&format!("as {cid} ("), 1);
    assert_eq!(a.log_count("New client connected"), 1);
    wait_tasks(&mut h, 1);

    // The new task works (it starts without subscriptions: the caller sets them again).
    h.subscribe(&b, 1, &cid, &[("eng/m/#", 1)]);
    mosquitto_pub(&b, &["-q", "1", "-t", "eng/m/1", "-m", "on-b"], None);
    let ev = h.wait_for("Received eng/m/1", |e| is_received_on(e, "eng/m/1"));
    assert_no_trouble(&ev);

    // No brokers: the task stops, says so, and disconnects cleanly.
    assert_eq!(h.engine().set_brokers(Vec::new()), Vec::<i32>::new());
    let ev = h.wait_for("Stopped", |e| matches!(e, Event::Stopped { broker_id: 1 }));
    assert_no_trouble(&ev);
    wait_tasks(&mut h, 0);
    b.wait_log(&format!("Client {cid} disconnected."), 1);
    assert!(!h.publish(1, vec![out(1, "eng/m/x", b"x", 0)]));
    let later = h.collect_for(Duration::from_millis(200));
    assert!(later.is_empty(), "events after Stopped: {later:?}");
}

/// 8. Backpressure: with 16 event slots and nobody draining, the engine stops reading from the
///    socket (the broker keeps the rest queued); draining slowly then yields all 5,000 messages
///    exactly once, in order.
#[test]
fn backpressure_5000() {
    const N: usize = 5000;
    let broker = Broker::start();
    let mut h = Harness::new(16);
    let cid = client_id("backpressure");
    h.connect(config(1, broker.port, "backpressure"));
    h.subscribe(&broker, 1, &cid, &[("eng/bp/#", 1)]);

    let lines: String = (0..N).map(|i| format!("m-{i:05}\n")).collect();
    let mut publisher = spawn_mosquitto_pub(
        &broker,
        &["-l", "-q", "1", "-t", "eng/bp/x"],
        lines.into_bytes(),
    );
    // Nobody drains while the publisher runs; once it is done the broker holds all 5,000.
    publisher.wait_success(Duration::from_secs(20));

    // With manual acknowledgements the broker cannot tell what the engine has read; the
    // kernel can. The bytes the engine took off its socket must settle at what 16 event
    // slots, one rumqttc read (10 packets) and its 8 KiB read buffer hold, far below 5,000.
    broker.wait_log(&format!("Sending PUBLISH to {cid} "), N);
    let packet = 1 + 1 + 2 + "eng/bp/x".len() + 2 + "m-00000".len();
    let taken = settled(
        "the bytes the engine read",
        Duration::from_millis(250),
        || client_bytes_read(broker.port),
    );
    let read = taken / packet;
    eprintln!("engine took about {read} of {N} messages off its socket while nobody drained");
    assert!(
        read <= 16 + 10 + 8192 / packet + 50,
        "the engine read about {read} messages with 16 event slots and nobody draining"
    );
    assert!(h.engine().has_events());

    // Drain slowly: at most 16 events at a time, with a pause after each batch.
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let t = Instant::now();
    while received(&events).len() < N {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} received",
            received(&events).len()
        );
        // Acknowledged as they are drained, as the worker does after each commit.
        let got = h.drain_within(16, usize::MAX);
        assert!(got.len() <= 16);
        events.extend(got);
        std::thread::sleep(Duration::from_micros(500));
    }
    eprintln!("drained {N} messages in {:?}", t.elapsed());
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);
    let r = received(&events);
    assert_eq!(r.len(), N, "duplicates received");
    assert!(r
        .iter()
        .all(|m| m.topic == "eng/bp/x" && m.qos == 1 && !m.retain));
    let got: Vec<String> = r
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let want: Vec<String> = (0..N).map(|i| format!("m-{i:05}")).collect();
    assert!(got == want, "messages out of order or altered");
    assert!(!h.engine().has_events());
    // Each message acknowledged exactly once.
    broker.wait_log(&format!("Received PUBACK from {cid} "), N);
    assert_eq!(broker.log_count(&format!("Received PUBACK from {cid} ")), N);
}

/// 9. Shutdown while connected returns within its timeout and sends DISCONNECT.
#[test]
fn shutdown_within_timeout() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("shutdown");
    h.connect(config(1, broker.port, "shutdown"));
    h.subscribe(&broker, 1, &cid, &[("eng/s/#", 1)]);

    let engine = h.take_engine();
    let timeout = Duration::from_secs(2);
    let t = Instant::now();
    engine.shutdown(timeout);
    let took = t.elapsed();
    eprintln!("shutdown while connected took {took:?}");
    assert!(
        took < timeout,
        "shutdown took {took:?}, timeout {timeout:?}"
    );
    broker.wait_log(&format!("Client {cid} disconnected."), 1);
    assert_eq!(
        broker.log_count(&format!("Client {cid} closed its connection")),
        0
    );
}

/// 9b. Shutdown with a backed-up connection (event channel full, broker still sending) also
///     returns within its timeout.
#[test]
fn shutdown_within_timeout_while_backed_up() {
    let broker = Broker::start();
    let mut h = Harness::new(16);
    let cid = client_id("shutdown-busy");
    h.connect(config(1, broker.port, "shutdown-busy"));
    h.subscribe(&broker, 1, &cid, &[("eng/sb/#", 0)]);
    let lines: String = (0..20_000).map(|i| format!("{i:06}\n")).collect();
    let _publisher = spawn_mosquitto_pub(
        &broker,
        &["-l", "-q", "0", "-t", "eng/sb/x"],
        lines.into_bytes(),
    );
    // Wait until the engine is blocked on its full event channel.
    wait_until("events waiting", WAIT, || {
        broker.log_count(&format!("Sending PUBLISH to {cid}")) > 100
    });
    let engine = h.take_engine();
    // The broker has sent them; the engine may not have read them off the socket yet.
    wait_until("the engine holding undrained events", WAIT, || {
        engine.has_events()
    });
    let timeout = Duration::from_millis(500);
    let t = Instant::now();
    engine.shutdown(timeout);
    let took = t.elapsed();
    eprintln!("shutdown of a backed-up connection took {took:?}");
    assert!(
        took < timeout,
        "shutdown took {took:?}, timeout {timeout:?}"
    );
}

/// 10. A message over the connection's packet limit is Rejected without touching the
///     connection; one exactly at the limit goes through.
#[test]
fn oversized_publish_is_rejected() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let mut cfg = config(1, broker.port, "oversized");
    cfg.max_packet_size = 1024;
    h.connect(cfg);
    let sub = Sub::start(&broker, &client_id("oversized-sub"), "eng/big/#", 1, 2);

    let topic = "eng/big/t";
    // The engine's estimate: payload + topic + 9 bytes of headers (10 on MQTT 5, with the
    // properties' length) must not exceed the limit.
    let fits = 1024 - topic.len() - 9 - usize::from(protocol() == engine::Protocol::V5);
    assert!(h.publish(
        1,
        vec![
            out(1, topic, &vec![1; 2000], 1),
            out(2, topic, &vec![2; fits], 1),
            out(3, topic, &vec![3; fits + 1], 0),
            out(4, topic, b"small", 0),
        ]
    ));
    let events = h.wait_outcomes(4);
    let got = sub.finish();
    let mut rejected = Vec::new();
    for e in &events {
        match e {
            Event::Rejected {
                broker_id: 1,
                outbox_id,
                error,
            } => {
                assert!(
                    error.contains("exceeds") && error.contains("1024"),
                    "{error:?}"
                );
                rejected.push(*outbox_id);
            }
            Event::Delivered { broker_id: 1, .. } => {}
            other => panic!("unexpected {}", describe_one(other)),
        }
    }
    rejected.sort();
    assert_eq!(rejected, [1, 3]);
    let mut d: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(d, [2, 4]);
    assert_eq!(
        got.iter()
            .map(|m| (m.qos, m.payload.clone()))
            .collect::<Vec<_>>(),
        [(1, vec![2; fits]), (0, b"small".to_vec())]
    );
}

/// 11. After a connection dies in the middle of a write, the next connection must attribute
///     its deliveries to the right outbox rows. Reproduced deterministically: the broker is
///     frozen (SIGSTOP) while large messages are written, so rumqttc's flush times out; rows
///     handed to the engine while it is disconnected then go out on the next connection.
#[test]
fn deliveries_after_a_write_timeout_are_attributed_correctly() {
    let mut broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("stale");
    let mut cfg = config(1, broker.port, "stale");
    // Long enough to restart the broker between two attempts.
    cfg.reconnect_min = Duration::from_secs(1);
    cfg.reconnect_max = Duration::from_secs(2);
    h.connect(cfg);
    h.subscribe(&broker, 1, &cid, &[("eng/stale/#", 1)]);

    broker.signal("STOP");
    let big = vec![0x5a; 1 << 20];
    let msgs = (1..=48).map(|i| out(i, "eng/stale/big", &big, 0)).collect();
    assert!(h.publish(1, msgs));
    let ev = h.wait_until(
        "ConnectionLost (the write to the frozen broker times out)",
        Duration::from_secs(20),
        |s| matches!(s.last(), Some(Event::ConnectionLost { .. })),
    );
    eprintln!(
        "lost after {} Delivered: {}",
        delivered(&ev).len(),
        describe_one(ev.last().unwrap())
    );
    broker.stop(); // SIGKILL works on a stopped process
    let ev = h.wait_for(
        "a refused retry",
        |e| matches!(e, Event::ConnectionLost { error, .. } if error.contains("refused")),
    );
    assert!(ev.iter().all(|e| !matches!(e, Event::Connected { .. })));

    // The engine now waits 1-2 s before the next attempt. Rows handed over meanwhile, for
    // the connection that is gone, are dropped (the worker resends them after Connected):
    // only the rows published on the new connection go out, credited to the right ids.
    let stale_epoch = h.epoch(1);
    assert!(h.publish(1, vec![out(999, "eng/stale/x0", b"x0", 1)]));
    broker.restart();
    h.wait_for("Connected again", |e| matches!(e, Event::Connected { .. }));
    assert_eq!(h.epoch(1), stale_epoch + 1);
    assert!(h.publish(
        1,
        vec![
            out(1001, "eng/stale/x1", b"x1", 1),
            out(1002, "eng/stale/x2", b"x2", 1),
        ]
    ));
    let ev = h.wait_until(
        "Received x1 and x2 back (they reached the broker)",
        WAIT,
        |s| {
            s.iter().any(|e| is_received_on(e, "eng/stale/x1"))
                && s.iter().any(|e| is_received_on(e, "eng/stale/x2"))
        },
    );
    let mut all = ev;
    all.extend(
        h.collect_for(Duration::from_millis(500))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert!(
        !all.iter().any(|e| is_received_on(e, "eng/stale/x0")),
        "a row handed over for the dead connection was sent on the new one"
    );
    let after_connect = all;
    let mut d: Vec<i64> = delivered(&after_connect).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(
        d,
        [1001, 1002],
        "both rows reached the broker and were acknowledged, but the Delivered events after \
         the reconnect were {:?}; events:\n{}",
        delivered(&after_connect),
        describe(&after_connect)
    );
}

/// 12. QoS 1 and QoS 2 publishes mixed, with packet ids wrapping many times (rumqttc frees a
///     QoS 2 packet id at PUBREC, so a later publish reuses it while the PUBCOMP is still
///     due): every outbox id is Delivered exactly once, with the packet id the broker saw on
///     that row's PUBLISH, and an independent subscriber gets all of them.
#[test]
fn mixed_qos_1_and_2_with_wrapping_packet_ids() {
    const N: i64 = 3000;
    let broker = Broker::start();
    let mut h = Harness::new(8192);
    let cid = client_id("mixed");
    let cfg = config(1, broker.port, "mixed");
    assert_eq!(cfg.max_inflight, 100);
    h.connect(cfg);
    let sub = Sub::start(&broker, &client_id("mixed-sub"), "eng/mix/#", 2, N as usize);

    let qos = |i: i64| if i % 7 == 0 { 2 } else { 1 };
    let topic = |i: i64| format!("eng/mix/{i:04}");
    let payload = |i: i64| format!("mix-{i:04}").into_bytes();
    let msgs = (1..=N)
        .map(|i| out(i, &topic(i), &payload(i), qos(i)))
        .collect();
    let t = Instant::now();
    assert!(h.publish(1, msgs));
    let mut events = h.wait_until("3000 Delivered events", Duration::from_secs(20), |s| {
        delivered(s).len() >= N as usize
    });
    let took = t.elapsed();
    let got = sub.finish();
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    eprintln!("{N} mixed QoS 1/2 publishes Delivered in {took:?}");
    assert_no_trouble(&events);

    // The packet id each row went out with, from the broker's log (topics are unique).
    let sent = broker.publishes_from(&cid);
    assert_eq!(sent.len(), N as usize, "PUBLISH count in the broker log");
    let mut pkid_of: BTreeMap<String, (u8, u16)> = BTreeMap::new();
    for (t, q, m) in &sent {
        assert!(
            pkid_of.insert(t.clone(), (*q, *m)).is_none(),
            "{t} published twice"
        );
    }
    let distinct: std::collections::BTreeSet<u16> = sent.iter().map(|x| x.2).collect();
    assert!(
        distinct.len() <= 100 && distinct.iter().all(|p| (1..=100).contains(p)),
        "packet ids outside 1..=100 with max_inflight 100: {distinct:?}"
    );

    let d = delivered(&events);
    let mut ids: Vec<i64> = d.iter().map(|x| x.0).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(d.len(), N as usize, "duplicate Delivered events");
    assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    let mut qos2_checked = 0;
    for (id, pkid) in &d {
        let (q, m) = pkid_of[&topic(*id)];
        assert_eq!(q, qos(*id), "outbox {id} went out at QoS {q}");
        assert_eq!(
            *pkid,
            Some(m),
            "outbox {id} (QoS {q}) was published as m{m} but Delivered with pkid {pkid:?}"
        );
        qos2_checked += usize::from(q == 2);
    }
    assert_eq!(qos2_checked, (N / 7) as usize);

    let mut want: Vec<(String, u8, Vec<u8>)> =
        (1..=N).map(|i| (topic(i), qos(i), payload(i))).collect();
    let mut have: Vec<(String, u8, Vec<u8>)> = got
        .into_iter()
        .map(|m| {
            assert!(!m.retain);
            (m.topic, m.qos, m.payload)
        })
        .collect();
    want.sort();
    have.sort();
    assert!(
        have == want,
        "the subscriber did not get exactly the 3000 messages"
    );
}

/// 13. Subscription changes made while rumqttc's request channel is full (a publish backlog
///     to a frozen broker) are not lost: once the broker runs again the new filter is
///     subscribed and the removed one unsubscribed (or, should the frozen broker have cost
///     the connection, the new session subscribes only what is wanted).
#[test]
fn subscription_changes_during_a_publish_backlog() {
    const N: i64 = 5000;
    let broker = Broker::start();
    let mut h = Harness::new(8192);
    let cid = client_id("subbacklog");
    h.connect(config(1, broker.port, "subbacklog"));
    h.subscribe(
        &broker,
        1,
        &cid,
        &[("eng/sc/old/#", 1), ("eng/sc/keep/#", 1)],
    );

    broker.signal("STOP");
    let msgs = (1..=N)
        .map(|i| out(i, "eng/sc/bulk", format!("b{i}").as_bytes(), 1))
        .collect();
    assert!(h.publish(1, msgs));
    h.engine()
        .set_subscriptions(1, subs(&[("eng/sc/keep/#", 1), ("eng/sc/new/#", 1)]));
    // Nothing observable tells when the engine has taken the two commands (it cannot reach
    // the broker); give it a moment so the change meets the full channel.
    std::thread::sleep(Duration::from_millis(300));
    broker.signal("CONT");

    // What the broker has subscribed for us on our latest connection, replaying its log.
    let net = |packets: &[(usize, LoggedSub)]| {
        let last = packets.iter().map(|p| p.0).max().unwrap_or(0);
        let mut filters = BTreeMap::new();
        for (_, p) in packets.iter().filter(|p| p.0 == last) {
            match p {
                LoggedSub::Subscribe(v) => filters.extend(v.iter().cloned()),
                LoggedSub::Unsubscribe(v) => v.iter().for_each(|f| {
                    filters.remove(f);
                }),
            }
        }
        filters
    };
    let wanted = subs(&[("eng/sc/keep/#", 1), ("eng/sc/new/#", 1)]);
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let packets = loop {
        let p = broker.sub_packets(&cid);
        if net(&p) == wanted {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the broker never had exactly {wanted:?} subscribed for us: {p:?}"
        );
        // Keep the events flowing (the engine must not block on them).
        events.extend(
            h.collect_for(Duration::from_millis(20))
                .into_iter()
                .map(|(_, e)| e),
        );
    };
    let reconnected = broker.connects(&cid) > 1;
    eprintln!("subscription packets (reconnected: {reconnected}): {packets:?}");
    if !reconnected {
        // On the same connection: exactly one UNSUBSCRIBE of the removed filter and one
        // SUBSCRIBE of the new one (the unchanged filter is not subscribed again).
        assert_eq!(
            packets,
            [
                (
                    1,
                    LoggedSub::Subscribe(vec![
                        ("eng/sc/keep/#".into(), 1),
                        ("eng/sc/old/#".into(), 1)
                    ])
                ),
                (1, LoggedSub::Unsubscribe(vec!["eng/sc/old/#".into()])),
                (1, LoggedSub::Subscribe(vec![("eng/sc/new/#".into(), 1)])),
            ]
        );
    }

    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/sc/old/x", "-m", "removed"],
        None,
    );
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/sc/new/x", "-m", "added"],
        None,
    );
    events.extend(
        h.wait_until("Received on eng/sc/new/x", Duration::from_secs(20), |s| {
            s.iter().any(|e| is_received_on(e, "eng/sc/new/x"))
        }),
    );
    let r = received(&events);
    assert_eq!(
        r.iter()
            .map(|m| (m.topic.as_str(), &m.payload[..]))
            .collect::<Vec<_>>(),
        [("eng/sc/new/x", &b"added"[..])]
    );

    if !reconnected {
        // The backlog itself went out completely, once per row.
        let have = delivered(&events).len();
        if have < N as usize {
            events.extend(h.wait_until("the rest of 5000 Delivered", WAIT, |s| {
                have + delivered(s).len() >= N as usize
            }));
        }
        events.extend(
            h.collect_for(Duration::from_millis(200))
                .into_iter()
                .map(|(_, e)| e),
        );
        assert_no_trouble(&events);
        let mut ids: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
        ids.sort();
        assert_eq!(ids, (1..=N).collect::<Vec<_>>());
    }
}

/// 14. Rows handed over with the epoch of another connection are dropped (the worker resends
///     them after the Connected it has not seen yet); rows with the current epoch go out.
#[test]
fn publish_with_a_wrong_epoch_is_dropped() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("epoch");
    let seen = h.connect(config(1, broker.port, "epoch"));
    assert!(
        matches!(seen.last(), Some(Event::Connected { epoch: 1, .. })),
        "{seen:?}"
    );
    assert_eq!(h.epoch(1), 1);
    let sub = Sub::start(&broker, &client_id("epoch-sub"), "eng/epoch/#", 1, 1);

    // Epoch 0 (no connection seen yet) and 2 (a connection that does not exist yet).
    assert!(h.engine().publish(
        1,
        0,
        vec![
            out(1, "eng/epoch/wrong0", b"w0", 1),
            out(2, "eng/epoch/wrong0", b"w0", 0),
        ]
    ));
    assert!(h
        .engine()
        .publish(1, 2, vec![out(3, "eng/epoch/wrong2", b"w2", 1)]));
    // Commands are handled in order: had the rows above been sent, they would come first.
    assert!(h.publish(1, vec![out(4, "eng/epoch/marker", b"marker", 1)]));

    let mut events = h.wait_for("Delivered of the marker", |e| {
        matches!(e, Event::Delivered { outbox_id: 4, .. })
    });
    let got = sub.finish();
    events.extend(
        h.collect_for(Duration::from_millis(300))
            .into_iter()
            .map(|(_, e)| e),
    );
    assert_no_trouble(&events);
    assert_eq!(
        delivered(&events).iter().map(|x| x.0).collect::<Vec<_>>(),
        [4],
        "{}",
        describe(&events)
    );
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), &m.payload[..]))
            .collect::<Vec<_>>(),
        [("eng/epoch/marker", &b"marker"[..])]
    );
    assert_eq!(
        broker
            .publishes_from(&cid)
            .into_iter()
            .map(|x| x.0)
            .collect::<Vec<_>>(),
        ["eng/epoch/marker"]
    );
}

/// 15. Outbox rows with topics that cannot be published to ("a/+/b", "a/#", "") are Rejected
///     and do not stall the rows behind them, which are Delivered and received in order.
#[test]
fn invalid_topics_are_rejected() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("badtopic");
    h.connect(config(1, broker.port, "badtopic"));
    let sub = Sub::start(&broker, &client_id("badtopic-sub"), "eng/bt/#", 2, 4);

    assert!(h.publish(
        1,
        vec![
            out(1, "eng/bt/1", b"one", 1),
            out(2, "a/+/b", b"plus", 1),
            out(3, "eng/bt/3", b"three", 1),
            out(4, "a/#", b"hash", 2),
            out(5, "eng/bt/5", b"five", 1),
            out(6, "", b"empty", 0),
            out(7, "eng/bt/7", b"seven", 1),
        ]
    ));
    let events = h.wait_outcomes(7);
    let got = sub.finish();

    let mut rejected = Vec::new();
    for e in &events {
        match e {
            Event::Rejected {
                broker_id: 1,
                outbox_id,
                error,
            } => {
                let why = if *outbox_id == 6 {
                    "topic must not be empty"
                } else {
                    "topic must not contain the wildcard characters '+' or '#'"
                };
                assert!(
                    error.contains("invalid topic") && error.contains(why),
                    "outbox {outbox_id}: {error:?}"
                );
                rejected.push(*outbox_id);
            }
            Event::Delivered { broker_id: 1, .. } => {}
            other => panic!("unexpected {}", describe_one(other)),
        }
    }
    assert_eq!(rejected, [2, 4, 6]);
    let mut d: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(d, [1, 3, 5, 7]);
    assert_eq!(
        got.iter()
            .map(|m| (m.topic.as_str(), m.qos, &m.payload[..]))
            .collect::<Vec<_>>(),
        [
            ("eng/bt/1", 1, &b"one"[..]),
            ("eng/bt/3", 1, &b"three"[..]),
            ("eng/bt/5", 1, &b"five"[..]),
            ("eng/bt/7", 1, &b"seven"[..]),
        ]
    );
    // Nothing invalid reached the broker, and the connection never dropped.
    assert_eq!(broker.publishes_from(&cid).len(), 4);
    assert_eq!(broker.connects(&cid), 1);
}

/// 16. A broker that accepts the connection and drops it at once must not reset the backoff:
///     it only resets after a connection stayed up for a while, so the attempts still spread
///     out exponentially.
#[test]
fn backoff_grows_when_the_broker_drops_us_after_connack() {
    let fake = FlakyBroker::start();
    let target = format!("127.0.0.1:{}", fake.port);
    let mut h = Harness::new(1024);
    let mut cfg = config(1, fake.port, "flaky");
    cfg.reconnect_min = Duration::from_millis(100);
    cfg.reconnect_max = Duration::from_millis(1600);
    assert_eq!(h.engine().set_brokers(vec![cfg]), vec![1]);
    let t0 = Instant::now();
    let window = Duration::from_secs(4);
    let timeline = h.collect_for(window);
    let shown = show_timeline(t0, &timeline);
    eprintln!("timeline against a broker that drops us after CONNACK:\n{shown}");

    let mut connecting = Vec::new();
    let mut connected = 0;
    for (t, e) in &timeline {
        match e {
            Event::Connecting { broker_id: 1 } => connecting.push(*t),
            Event::Connected { broker_id: 1, .. } => connected += 1,
            Event::ConnectionLost {
                broker_id: 1,
                error,
                ..
            } => assert!(error.contains(&target), "{error:?} does not name {target}"),
            other => panic!("unexpected {}:\n{shown}", describe_one(other)),
        }
    }
    // Delays >= 50, 100, 200, 400, 800, 800, ... ms: at most 8 CONNACKs fit in 4 s (a backoff
    // reset by each CONNACK would allow 40 or more).
    assert!(
        (3..=8).contains(&connected),
        "{connected} Connected in {window:?}:\n{shown}"
    );
    assert!(fake.accepted.load(std::sync::atomic::Ordering::Acquire) >= connected);
    let gaps: Vec<Duration> = connecting.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 4, "{gaps:?}:\n{shown}");
    for (k, g) in gaps.iter().enumerate() {
        let nominal = Duration::from_millis(100u64 << k.min(4)).min(Duration::from_millis(1600));
        // Event times are drain times: allow a little for the drains.
        let floor = (nominal / 2).saturating_sub(Duration::from_millis(15));
        let ceiling = nominal + Duration::from_millis(500);
        assert!(
            *g >= floor && *g <= ceiling,
            "attempt {} came {g:?} after the previous one, outside [{floor:?}, {ceiling:?}] \
             (nominal {nominal:?}):\n{shown}",
            k + 1
        );
    }
    assert!(gaps[3] > gaps[0] * 2, "gaps do not grow: {gaps:?}");
}

/// 17. Stopping a connection that has read more than the worker has drained keeps every
///     message it had handed out or read: the Received events after the stop are an unbroken
///     prefix of what was published, at least the 64 the event slots held, even when a publish
///     backlog keeps the stop from sending DISCONNECT. Acknowledgements given after the stop
///     go nowhere (the broker never hears of them). (How much rumqttc holds read but not
///     handed out at the stop varies, so a few rounds are run.)
#[test]
fn stop_keeps_buffered_received_messages() {
    const N: usize = 2000;
    const ROUNDS: usize = 4;
    let broker = Broker::start();
    let mut h = Harness::new(64);
    let cid = client_id("stopbuf");
    let pubacks = format!("Received PUBACK from {cid} ");
    let sent = format!("Sending PUBLISH to {cid} ");
    let bye = [
        format!("Client {cid} disconnected"),
        format!("Client {cid} closed its connection"),
    ];
    for round in 0..ROUNDS {
        h.connect(config(1, broker.port, "stopbuf"));
        h.subscribe(&broker, 1, &cid, &[("eng/sbuf/#", 1)]);
        let acked_before = broker.log_count(&pubacks);
        let sent_before = broker.log_count(&sent);
        let bye_before = broker.log_count(&bye[0]) + broker.log_count(&bye[1]);

        let lines: String = (0..N).map(|i| format!("s{round}-{i:05}\n")).collect();
        let mut publisher = spawn_mosquitto_pub(
            &broker,
            &["-l", "-q", "1", "-t", "eng/sbuf/x"],
            lines.into_bytes(),
        );
        publisher.wait_success(Duration::from_secs(20));
        // The broker has written everything, and the engine has stopped reading with more
        // than its 64 event slots taken off the socket.
        broker.wait_log(&sent, sent_before + N);
        let packet = 1 + 1 + 2 + "eng/sbuf/x".len() + 2 + "s0-00000".len();
        // Wait for the condition rather than a quiet spell: on a loaded machine the engine's
        // reads may pause longer than any settle window.
        wait_until("the engine to take more than 64 messages", WAIT, || {
            client_bytes_read(broker.port) / packet > 64
        });
        let taken = client_bytes_read(broker.port) / packet;
        assert!(h.engine().has_events());
        // A publish backlog fills rumqttc's request channel while the engine is blocked on
        // its event channel, so the DISCONNECT at stop cannot be queued (and no last polls
        // drain what rumqttc has read): only the stop path itself can hand those over.
        let backlog = (1..=2000)
            .map(|i| out(i, "eng/sbuf-out/x", b"o", 1))
            .collect();
        assert!(h.publish(1, backlog));

        assert_eq!(h.engine().set_brokers(Vec::new()), Vec::<i32>::new());
        let events = h.wait_for("Stopped", |e| matches!(e, Event::Stopped { broker_id: 1 }));
        // The harness acknowledged every message as it drained them, after the stop.
        wait_until("the broker to log our disconnect", WAIT, || {
            broker.log_count(&bye[0]) + broker.log_count(&bye[1]) > bye_before
        });
        wait_tasks(&mut h, 0);
        let acked = broker.log_count(&pubacks) - acked_before;
        assert_no_trouble(&events);
        let r = received(&events);
        eprintln!(
            "round {round}: engine took about {taken} messages off its socket, {} Received \
             after the stop",
            r.len()
        );
        assert_eq!(
            acked, 0,
            "round {round}: acknowledgements after the stop reached the broker"
        );
        assert!(
            r.len() >= 64,
            "round {round}: only {} messages Received after the stop; 64 were waiting",
            r.len()
        );
        // No duplicates, nothing skipped: a prefix of what was published, in order.
        let got: Vec<String> = r
            .iter()
            .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
            .collect();
        let want: Vec<String> = (0..got.len()).map(|i| format!("s{round}-{i:05}")).collect();
        assert!(
            got == want,
            "round {round}: messages out of order, duplicated or skipped"
        );
    }
}

/// 19. A batch of received messages is bounded in bytes as well as in count: large messages
///     come out a few at a time, so the database can store each batch in one statement.
#[test]
fn drain_is_bounded_in_bytes() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cid = client_id("bytes");
    h.connect(config(1, broker.port, "bytes"));
    h.subscribe(&broker, 1, &cid, &[("eng/bytes/#", 1)]);
    let line = format!("{}\n", "x".repeat(1000));
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "eng/bytes/a", "-l"],
        Some(line.repeat(10).as_bytes()),
    );
    // Wait until all ten have been read by the engine: the broker has written them and
    // nothing is left in the sockets.
    broker.wait_log(&format!("Sending PUBLISH to {cid} "), 10);
    let packet = 1 + 1 + 2 + "eng/bytes/a".len() + 2 + 1000;
    wait_until("the engine to read all ten off its socket", WAIT, || {
        client_bytes_read(broker.port) >= 10 * packet
    });
    let deadline = Instant::now() + WAIT;
    let mut batches = Vec::new();
    let mut total = 0;
    while total < 10 {
        assert!(Instant::now() < deadline, "only {total} of 10 received");
        let got = h.drain_within(100, 2500);
        let n = received(&got).len();
        if n > 0 {
            batches.push(n);
            total += n;
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // 1000-byte payloads with a 2500-byte budget: the third message crosses it and ends the
    // batch, so no batch holds more than 3.
    assert!(batches.iter().all(|n| *n <= 3), "batches: {batches:?}");
    assert_eq!(batches[0], 3, "batches: {batches:?}");
    assert_eq!(total, 10);
    broker.wait_log(&format!("Received PUBACK from {cid} "), 10);
}
