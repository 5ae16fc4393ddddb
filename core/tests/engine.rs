//! Integration tests of the MQTT engine against a real mosquitto (one broker per test, on a free
//! loopback port; see `common`). Run with `cargo test -p mqtt_pg_core --test engine`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use mqtt_pg_core::engine::Event;

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
                    session_present: false
                }
            ]
        ),
        "expected exactly Connecting then Connected, saw:\n{}",
        describe(&seen)
    );
    assert_eq!(h.engine().running_tasks(), 1);
    assert!(h.wakes() >= 1, "the wake callback was never called");
    // The broker saw our client id, MQTT 3.1.1 ("p2"), a clean session and the keepalive.
    broker.wait_log(&format!("as {} (p2, c1, k30)", cfg.client_id), 1);

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
    assert!(h.engine().publish(1, msgs));

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
    assert!(h.engine().publish(1, msgs));
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
    let Event::ConnectionLost { broker_id, error } = &first else {
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
                        session_present: false
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
    // The replaced task's status events (its Stopped) are filtered out: they must never
    // overwrite the new connection's status. Only the new task's Connecting/Connected show.
    let ev = h.wait_until("Connected (new task)", WAIT, |s| {
        s.iter()
            .any(|e| matches!(e, Event::Connected { broker_id: 1, .. }))
    });
    eprintln!("events while moving:\n{}", describe(&ev));
    assert_no_trouble(&ev);
    assert!(
        ev.iter().all(|e| matches!(
            e,
            Event::Connecting { broker_id: 1 } | Event::Connected { broker_id: 1, .. }
        )),
        "events:\n{}",
        describe(&ev)
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
    assert!(!h.engine().publish(1, vec![out(1, "eng/m/x", b"x", 0)]));
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
    let child = publisher.0.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "mosquitto_pub -l did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "mosquitto_pub -l failed: {status}");

    // Messages the engine has read are the ones it acknowledged: that count must settle far
    // below 5,000 while nobody drains.
    let pubacks = format!("Received PUBACK from {cid} ");
    let mut read = broker.log_count(&pubacks);
    let deadline = Instant::now() + WAIT;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let n = broker.log_count(&pubacks);
        if n == read {
            break;
        }
        read = n;
        assert!(Instant::now() < deadline, "PUBACK count never settled");
    }
    eprintln!("engine read {read} of {N} messages while nobody drained");
    assert!(
        (16..=64).contains(&read),
        "the engine read {read} messages with 16 event slots and nobody draining"
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
        let mut got = Vec::new();
        h.engine().drain_events(&mut got, 16);
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
    assert_eq!(broker.log_count(&pubacks), N);
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
    assert!(engine.has_events());
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
    // The engine's estimate: payload + topic + 9 bytes of headers must not exceed the limit.
    let fits = 1024 - topic.len() - 9;
    assert!(h.engine().publish(
        1,
        vec![
            out(1, topic, &vec![1; 2000], 1),
            out(2, topic, &vec![2; fits], 1),
            out(3, topic, &vec![3; fits + 1], 0),
            out(4, topic, b"small", 0),
        ]
    ));
    let mut events = h.wait_until("2 Rejected and 2 Delivered", WAIT, |s| {
        delivered(s).len()
            + s.iter()
                .filter(|e| matches!(e, Event::Rejected { .. }))
                .count()
            >= 4
    });
    let got = sub.finish();
    events.extend(
        h.collect_for(Duration::from_millis(200))
            .into_iter()
            .map(|(_, e)| e),
    );
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
    assert!(h.engine().publish(1, msgs));
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

    // The engine now waits 1-2 s before the next attempt. Rows handed over meanwhile go out
    // on the next connection.
    assert!(h.engine().publish(
        1,
        vec![
            out(1001, "eng/stale/x1", b"x1", 1),
            out(1002, "eng/stale/x2", b"x2", 1),
        ]
    ));
    broker.restart();
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
    let after_connect: Vec<Event> = all
        .iter()
        .skip_while(|e| !matches!(e, Event::Connected { .. }))
        .cloned()
        .collect();
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
