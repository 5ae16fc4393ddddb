//! What only MQTT 5 has, against mosquitto 2.0.11 (and a scripted broker where a broker's
//! side must be exact): publish properties both ways, reason codes in PUBACK/PUBREC/SUBACK,
//! the session expiry and Receive Maximum we announce, and the broker's Receive Maximum and
//! Maximum Packet Size honoured. Every test here speaks MQTT 5 whatever MQTT_PG_PROTOCOL says;
//! the rest of the suite runs on both versions (see `common::protocol`).

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use mqtt_pg_core::engine::{BrokerConfig, Event, MessageProperties, Protocol};
use mqtt_pg_core::properties::PayloadFormat;

fn config5(id: i32, port: u16, test: &str) -> BrokerConfig {
    let mut c = config(id, port, test);
    c.protocol = Protocol::V5;
    c
}

/// A broker whose anonymous clients may use `eng/ok/#` and only read `eng/ro/#`.
fn acl_broker(tag: &str) -> Broker {
    let dir = temp_dir(tag);
    let acl = dir.join("acl");
    fs::write(&acl, "topic readwrite eng/ok/#\ntopic read eng/ro/#\n").unwrap();
    // mosquitto 2.0.11 with `max_queued_messages 0` (the tests' default: no limit) closes an
    // MQTT 5 connection on its second ACL-denied PUBLISH ("Bad socket read/write ... Unknown
    // error"; reproduced with raw packets, whatever the client). Its default of 1000 does not.
    Broker::start_with(&format!(
        "max_queued_messages 1000\nacl_file {}\n",
        acl.display()
    ))
}

fn props() -> MessageProperties {
    MessageProperties {
        content_type: Some("application/json".into()),
        payload_format: Some(PayloadFormat::Utf8),
        message_expiry: Some(3600),
        response_topic: Some("eng/ok/replies/7".into()),
        correlation_data: Some(vec![0, 0xff, 7]),
        user_properties: vec![
            ("plant".into(), "north".into()),
            ("plant".into(), "south".into()),
        ],
    }
}

/// Properties published by the engine arrive intact at a subscriber (the engine itself, on a
/// second connection), duplicates among user properties and binary correlation data included;
/// a message without properties arrives without.
#[test]
fn properties_cross_the_broker_intact() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let sub_cfg = config5(2, broker.port, "props-sub");
    let cid = sub_cfg.client_id.clone();
    h.engine()
        .set_brokers(vec![sub_cfg, config5(1, broker.port, "props-pub")]);
    h.wait_until("both Connected", WAIT, |s| {
        s.iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count()
            == 2
    });
    h.subscribe(&broker, 2, &cid, &[("eng/ok/props/#", 1)]);
    let mut with = out(1, "eng/ok/props/a", b"{\"t\": 21.5}", 1);
    with.properties = Some(props());
    let without = out(2, "eng/ok/props/b", b"plain", 1);
    assert!(h.publish(1, vec![with, without]));
    let events = h.wait_until("both messages back", WAIT, |s| received(s).len() == 2);
    let got = received(&events);
    let a = got.iter().find(|m| m.topic == "eng/ok/props/a").unwrap();
    let b = got.iter().find(|m| m.topic == "eng/ok/props/b").unwrap();
    let mut want = props();
    // The broker forwards what is left of the expiry: at most what was sent.
    let left = a.properties.as_ref().and_then(|p| p.message_expiry);
    assert!(left.is_some_and(|s| (3590..=3600).contains(&s)), "{left:?}");
    want.message_expiry = left;
    assert_eq!(a.properties.as_ref(), Some(&want));
    assert_eq!(b.properties, None);
}

/// A publish the broker's ACL denies gets PUBACK (QoS 1) or PUBREC (QoS 2) with reason 0x87 on
/// MQTT 5: the row is Rejected with the reason's name, not Delivered. Many refusals in a row
/// do not use up the in-flight window (the patched rumqttc frees each slot: rumqtt #1060), so
/// allowed rows behind them still go out; on one connection, with no reconnects.
#[test]
fn refused_publishes_are_rejected_with_the_reason() {
    let broker = acl_broker("acl-pub");
    let mut h = Harness::new(4096);
    let mut cfg = config5(1, broker.port, "refused");
    cfg.max_inflight = 4;
    let cid = cfg.client_id.clone();
    h.connect(cfg);
    let sub = Sub::start(&broker, &client_id("refused-sub"), "eng/ok/#", 1, 2);
    let mut rows: Vec<_> = (1..=12)
        .map(|i| out(i, "eng/ro/denied", b"no", if i % 2 == 0 { 2 } else { 1 }))
        .collect();
    rows.push(out(100, "eng/ok/a", b"yes-1", 1));
    rows.push(out(101, "eng/ok/b", b"yes-2", 2));
    assert!(h.publish(1, rows));
    let events = h.wait_outcomes(14);
    let mut rejected = Vec::new();
    for e in &events {
        match e {
            Event::Rejected {
                outbox_id, error, ..
            } => {
                assert_eq!(
                    error, "the broker refused the message: not authorized (reason code 135)",
                    "row {outbox_id}"
                );
                rejected.push(*outbox_id);
            }
            Event::Delivered { .. } => {}
            other => panic!("unexpected {}", describe_one(other)),
        }
    }
    rejected.sort();
    assert_eq!(rejected, (1..=12).collect::<Vec<_>>());
    let mut d: Vec<i64> = delivered(&events).iter().map(|x| x.0).collect();
    d.sort();
    assert_eq!(d, [100, 101]);
    assert_eq!(sub.finish().len(), 2);
    assert_eq!(broker.connects(&cid), 1);
}

/// A subscription the broker refuses is reported with its reason and the broker's reason
/// string; the one granted in the same SUBACK is not. (mosquitto 2.0.11 grants every
/// subscription and applies its ACL per message, so a scripted broker plays this part.)
#[test]
fn refused_subscription_names_the_reason() {
    let fake = ScriptedBroker::start();
    let mut h = Harness::new(1024);
    h.engine()
        .set_brokers(vec![config5(1, fake.port, "subrefused")]);
    let (mut c, _) = fake.accept_connect();
    c.connack(false);
    h.wait_for("Connected", |e| matches!(e, Event::Connected { .. }));
    h.engine()
        .set_subscriptions(1, subs(&[("eng/secret/#", 1), ("eng/ok/#", 1)]));
    let (pkid, filters) = match c.expect("SUBSCRIBE") {
        Packet::Subscribe { pkid, filters } => (pkid, filters),
        other => panic!("expected SUBSCRIBE, got {other:?}"),
    };
    assert_eq!(
        filters,
        [("eng/ok/#".to_string(), 1), ("eng/secret/#".to_string(), 1)]
    );
    // SUBACK: packet id, properties (reason string "acl"), then QoS 1 granted and 0x87.
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend_from_slice(&[6, 0x1F, 0, 3, b'a', b'c', b'l', 0x01, 0x87]);
    c.send(RawPacket::new(0x90, body));
    let events = h.wait_for("Warning", |e| matches!(e, Event::Warning { .. }));
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(
        warnings,
        ["broker refused the subscription to 'eng/secret/#': not authorized (reason code 135): \"acl\""]
    );
    assert!(h.collect_for(Duration::from_millis(200)).is_empty());
}

/// The Receive Maximum we announce holds the broker to that many unacknowledged QoS 1
/// messages; each acknowledgement lets exactly one more through.
#[test]
fn receive_maximum_we_announce_is_honoured() {
    let broker = Broker::start();
    let mut h = Harness::new(4096);
    h.auto_ack = false;
    let mut cfg = config5(1, broker.port, "recvmax");
    cfg.receive_maximum = Some(5);
    let cid = cfg.client_id.clone();
    h.connect(cfg);
    h.subscribe(&broker, 1, &cid, &[("eng/ok/rm/#", 1)]);
    let input: Vec<u8> = (0..40)
        .flat_map(|i| format!("m{i}\n").into_bytes())
        .collect();
    mosquitto_pub(
        &broker,
        &["-t", "eng/ok/rm/x", "-q", "1", "-l"],
        Some(&input),
    );
    let first = h.wait_until("5 messages", WAIT, |s| received(s).len() >= 5);
    // Nothing acknowledged: nothing more may come.
    let more = h.collect_for(Duration::from_millis(500));
    assert_eq!(received(&first).len(), 5);
    let more: Vec<Event> = more.into_iter().map(|(_, e)| e).collect();
    assert!(received(&more).is_empty(), "{}", describe(&more));
    // Acknowledgements open the window again. (mosquitto 2.0.11 then sends more than one
    // message per acknowledgement, as it does to paho: its bookkeeping, not ours.)
    let held: Vec<_> = received(&first).into_iter().cloned().collect();
    h.ack(&held[..2]);
    h.wait_until("more after the acknowledgements", WAIT, |s| {
        !received(s).is_empty()
    });
}

/// What we announce in CONNECT: session expiry (for ever for a persistent session without a
/// setting, as 3.1.1 keeps it; none for a clean one; the setting when given) and Receive
/// Maximum; and the broker's Receive Maximum from its CONNACK caps our QoS 1 window.
#[test]
fn connect_properties_and_the_brokers_receive_maximum() {
    // clean session, session_expiry, receive_maximum, the session expiry we must announce
    type Case = (bool, Option<u32>, Option<u16>, Option<u32>);
    let cases: [Case; 4] = [
        (false, None, None, Some(u32::MAX)),
        (true, None, Some(1000), None),
        (false, Some(300), Some(7), Some(300)),
        (false, Some(0), None, None),
    ];
    for (clean, expiry, recv_max, want_expiry) in cases {
        let fake = ScriptedBroker::start();
        let mut h = Harness::new(1024);
        let mut cfg = config5(1, fake.port, "connprops");
        cfg.clean_session = clean;
        cfg.session_expiry = expiry;
        cfg.receive_maximum = recv_max;
        cfg.max_inflight = 10;
        h.engine().set_brokers(vec![cfg]);
        let (mut c, _) = fake.accept_connect();
        let props = connect_properties(&c.raw_seen[0]);
        assert_eq!(
            props.session_expiry, want_expiry,
            "clean {clean}, expiry {expiry:?}"
        );
        assert_eq!(props.receive_maximum, recv_max);
        // CONNACK with Receive Maximum 3 (property 0x21).
        c.send(RawPacket::new(0x20, vec![0, 0, 3, 0x21, 0, 3]));
        h.wait_for("Connected", |e| matches!(e, Event::Connected { .. }));
        assert!(h.publish(1, (1..=6).map(|i| out(i, "eng/ok/w", b"x", 1)).collect()));
        let mut pkids = Vec::new();
        for _ in 0..3 {
            match c.expect("PUBLISH") {
                Packet::Publish { pkid: Some(p), .. } => pkids.push(p),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        assert_eq!(
            c.read(Duration::from_millis(300)),
            None,
            "a 4th PUBLISH over the broker's Receive Maximum"
        );
        c.ack(0x40, pkids[0]);
        assert!(matches!(c.expect("PUBLISH"), Packet::Publish { .. }));
        assert_eq!(c.read(Duration::from_millis(200)), None);
    }
}

/// The CONNECT properties the tests look at.
#[derive(Debug, Default)]
struct ConnectProps {
    session_expiry: Option<u32>,
    receive_maximum: Option<u16>,
}

fn connect_properties(raw: &RawPacket) -> ConnectProps {
    let b = &raw.body;
    let name_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
    // name, level, flags, keepalive
    let mut i = 2 + name_len + 1 + 1 + 2;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let byte = b[i];
        i += 1;
        len |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let end = i + len;
    let mut p = ConnectProps::default();
    while i < end {
        let id = b[i];
        i += 1;
        match id {
            0x11 => {
                p.session_expiry = Some(u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
                i += 4;
            }
            0x21 => {
                p.receive_maximum = Some(u16::from_be_bytes([b[i], b[i + 1]]));
                i += 2;
            }
            0x27 => i += 4, // maximum packet size
            0x22 => i += 2, // topic alias maximum
            0x19 | 0x17 => i += 1,
            other => panic!("unexpected CONNECT property {other:#x}"),
        }
    }
    p
}

/// Session expiry 0 ends the session at the disconnect even without a clean start; without a
/// setting a persistent session survives, as on 3.1.1.
#[test]
fn session_expiry_decides_whether_the_session_survives() {
    let broker = Broker::start();
    for (expiry, survives) in [(None, true), (Some(0), false), (Some(600), true)] {
        let mut cfg = config5(1, broker.port, "expiry");
        cfg.client_id = format!("{}-{}", cfg.client_id, expiry.map_or(-1, i64::from));
        cfg.clean_session = false;
        cfg.session_expiry = expiry;
        for round in 0..2 {
            let mut h = Harness::new(1024);
            let events = h.connect(cfg.clone());
            let present = events.iter().find_map(|e| match e {
                Event::Connected {
                    session_present, ..
                } => Some(*session_present),
                _ => None,
            });
            assert_eq!(
                present,
                Some(round == 1 && survives),
                "expiry {expiry:?}, round {round}"
            );
            h.take_engine().shutdown(Duration::from_secs(2));
        }
    }
}

/// Overlapping filters on MQTT 5: mosquitto sends an MQTT 5 client one copy of a message per
/// matching subscription, so the engine subscribes only the covering filter (at the higher
/// QoS): one copy arrives. Dropping the covering filter subscribes the covered one.
#[test]
fn overlapping_filters_bring_one_copy() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let cfg = config5(1, broker.port, "overlap");
    let cid = cfg.client_id.clone();
    h.connect(cfg);
    h.subscribe(
        &broker,
        1,
        &cid,
        &[("eng/ok/ov/#", 0), ("eng/ok/ov/a/#", 1)],
    );
    let subscribed: Vec<(String, u8)> = broker
        .sub_packets(&cid)
        .into_iter()
        .flat_map(|(_, p)| match p {
            LoggedSub::Subscribe(v) => v,
            LoggedSub::Unsubscribe(_) => Vec::new(),
        })
        .collect();
    assert_eq!(subscribed, [("eng/ok/ov/#".to_string(), 1)]);
    mosquitto_pub(
        &broker,
        &["-t", "eng/ok/ov/a/x", "-q", "1", "-m", "once"],
        None,
    );
    mosquitto_pub(
        &broker,
        &["-t", "eng/ok/ov/b", "-q", "1", "-m", "other"],
        None,
    );
    let events = h.wait_until("two messages", WAIT, |s| received(s).len() >= 2);
    let late: Vec<Event> = h
        .collect_for(Duration::from_millis(300))
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let got: Vec<(String, u8)> = received(&events)
        .into_iter()
        .chain(received(&late))
        .map(|m| (m.topic.clone(), m.qos))
        .collect();
    assert_eq!(
        got,
        [
            ("eng/ok/ov/a/x".to_string(), 1),
            ("eng/ok/ov/b".to_string(), 1)
        ]
    );
    // Without the covering filter, the covered one is subscribed in its place.
    h.subscribe(&broker, 1, &cid, &[("eng/ok/ov/a/#", 1)]);
    mosquitto_pub(
        &broker,
        &["-t", "eng/ok/ov/a/y", "-q", "1", "-m", "after"],
        None,
    );
    let events = h.wait_until("the message on the covered filter", WAIT, |s| {
        received(s).iter().any(|m| m.topic == "eng/ok/ov/a/y")
    });
    assert_eq!(received(&events).len(), 1);
}

/// A broker that breaks the protocol in its CONNACK (Receive Maximum 0, Maximum Packet Size
/// 0) or sends a topic alias we never allowed: the connection fails with the reason and is
/// tried again, rather than stalling for ever, failing every write, or growing an alias table.
/// No row is rejected for it.
#[test]
fn protocol_errors_of_the_broker_end_the_connection() {
    let connacks: [(&str, Vec<u8>); 2] = [
        ("Receive Maximum 0", vec![0, 0, 3, 0x21, 0, 0]),
        ("Maximum Packet Size 0", vec![0, 0, 5, 0x27, 0, 0, 0, 0]),
    ];
    for (what, body) in connacks {
        let fake = ScriptedBroker::start();
        let mut h = Harness::new(1024);
        h.engine()
            .set_brokers(vec![config5(1, fake.port, "protoerr")]);
        let (mut c, _) = fake.accept_connect();
        c.send(RawPacket::new(0x20, body));
        let events = h.wait_for("ConnectionLost", |e| {
            matches!(e, Event::ConnectionLost { .. })
        });
        assert!(
            matches!(events.last(), Some(Event::ConnectionLost { error, .. })
                if error.contains("protocol error (reason code 130)")),
            "{what}: {}",
            describe(&events)
        );
        assert!(
            !events.iter().any(|e| matches!(e, Event::Connected { .. })),
            "{what}"
        );
        // And it is tried again.
        let (_c2, _) = fake.accept_connect();
    }
    // A topic alias in a PUBLISH, which we never allowed (no Topic Alias Maximum announced).
    let fake = ScriptedBroker::start();
    let mut h = Harness::new(1024);
    h.engine().set_brokers(vec![config5(1, fake.port, "alias")]);
    let (mut c, _) = fake.accept_connect();
    c.connack(false);
    h.wait_for("Connected", |e| matches!(e, Event::Connected { .. }));
    // PUBLISH QoS 0, topic "a/b", properties: Topic Alias (0x23) = 1, payload "x".
    let mut body = vec![0, 3, b'a', b'/', b'b', 3, 0x23, 0, 1];
    body.push(b'x');
    c.send(RawPacket::new(0x30, body));
    let events = h.wait_for("ConnectionLost", |e| {
        matches!(e, Event::ConnectionLost { .. })
    });
    assert!(
        matches!(events.last(), Some(Event::ConnectionLost { error, .. }) if error.contains("topic alias")),
        "{}",
        describe(&events)
    );
}
