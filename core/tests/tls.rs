//! TLS, Last Will and birth messages against a real mosquitto: certificates are made with
//! openssl once per run (see `common::pki`), each test starts its own broker on a free
//! loopback port. Run with `cargo test -p mqtt_pg_core --test tls`.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{Pki, CLIENT_KEYS, DNS_ONLY_NAME};
use common::*;
use mqtt_pg_core::engine::{BrokerConfig, Event, OutMessage, Will};
use mqtt_pg_core::tls::{check_pem, check_settings, PemKind, TlsSettings};

/// A TLS broker serving `cert` (a `server*` file of the PKI), mosquitto_pub/sub set up to
/// reach it as client `client`.
fn tls_broker(cert: &str, require_client_cert: bool, client: Option<&str>, extra: &str) -> Broker {
    let pki = Pki::get();
    Broker::start_with_clients(
        &format!("{}{extra}", pki.listener_conf(cert, require_client_cert)),
        pki.client_args(client),
    )
}

/// `config` over TLS: CA file `ca` (None: the system's), client certificate `client` (a
/// `CLIENT_KEYS` name or "stranger"), `tls_server_name`.
fn tls_config(
    id: i32,
    port: u16,
    test: &str,
    ca: Option<&str>,
    client: Option<&str>,
    server_name: Option<&str>,
) -> BrokerConfig {
    let pki = Pki::get();
    let mut c = config(id, port, test);
    c.tls = Some(TlsSettings {
        ca_cert: ca.map(|f| pki.read(f)),
        client_cert: client.map(|k| pki.read(&format!("client-{k}.pem"))),
        client_key: client.map(|k| pki.read(&format!("client-{k}.key"))),
        server_name: server_name.map(str::to_string),
    });
    c
}

/// Start `cfg` and return the error of its first ConnectionLost (panics on Connected).
fn first_error(h: &mut Harness, cfg: BrokerConfig) -> String {
    h.engine().set_brokers(vec![cfg]);
    let ev = h.wait_for("ConnectionLost or Connected", |e| {
        matches!(e, Event::ConnectionLost { .. } | Event::Connected { .. })
    });
    match ev.last() {
        Some(Event::ConnectionLost { error, .. }) => error.clone(),
        _ => panic!("connected where it must not:\n{}", describe(&ev)),
    }
}

fn assert_mentions(error: &str, needles: &[&str]) {
    for n in needles {
        assert!(error.contains(n), "error {error:?} does not mention {n:?}");
    }
}

/// 1. 1,000 QoS 1 messages out and 1,000 in over TLS: every one arrives exactly once.
#[test]
fn tls_delivers_1000_each_way() {
    const N: usize = 1000;
    let broker = tls_broker("server", false, None, "");
    let mut h = Harness::new(4096);
    let cid = client_id("tls-both");
    let ev = h.connect(tls_config(
        1,
        broker.port,
        "tls-both",
        Some("ca.pem"),
        None,
        None,
    ));
    assert_no_trouble(&ev);

    let sub = Sub::start(&broker, &client_id("tls-both-sub"), "tls/out/#", 1, N);
    let payload = |i: usize| format!("out-{i:05}").into_bytes();
    let msgs: Vec<OutMessage> = (1..=N)
        .map(|i| out(i as i64, "tls/out/seq", &payload(i), 1))
        .collect();
    assert!(h.publish(1, msgs));
    let events = h.wait_until("1000 Delivered", WAIT, |s| delivered(s).len() >= N);
    assert_no_trouble(&events);
    let mut ids: Vec<i64> = delivered(&events).iter().map(|d| d.0).collect();
    ids.sort();
    assert_eq!(ids, (1..=N as i64).collect::<Vec<_>>());
    let got = sub.finish();
    assert!(got.iter().all(|m| m.qos == 1 && m.topic == "tls/out/seq"));
    let got: Vec<Vec<u8>> = got.into_iter().map(|m| m.payload).collect();
    assert_eq!(got, (1..=N).map(payload).collect::<Vec<_>>());

    h.subscribe(&broker, 1, &cid, &[("tls/in/#", 1)]);
    let lines: String = (1..=N).map(|i| format!("in-{i:05}\n")).collect();
    let mut publisher = spawn_mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "tls/in/seq", "-l"],
        lines.into_bytes(),
    );
    let events = h.wait_until("1000 Received", WAIT, |s| received(s).len() >= N);
    publisher.wait_success(WAIT);
    let more = h.collect_for(Duration::from_millis(300));
    assert!(more.is_empty(), "extra events: {more:?}");
    assert_no_trouble(&events);
    let got: Vec<String> = received(&events)
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    assert_eq!(
        got,
        (1..=N).map(|i| format!("in-{i:05}")).collect::<Vec<_>>()
    );
}

/// 2. A broker certificate from another CA: named as not signed by ca_cert, or not trusted by
///    the system when ca_cert is NULL.
#[test]
fn unknown_ca_is_named() {
    let broker = tls_broker("server-other-ca", false, None, "");
    let mut h = Harness::new(1024);
    let cfg = tls_config(1, broker.port, "unknown-ca", Some("ca.pem"), None, None);
    let error = first_error(&mut h, cfg);
    eprintln!("unknown CA: {error}");
    assert_mentions(
        &error,
        &[
            "not signed by mqtt_broker.ca_cert",
            &format!(":{}", broker.port),
        ],
    );

    let cfg = tls_config(2, broker.port, "unknown-ca-sys", None, None, None);
    let error = first_error(&mut h, cfg);
    eprintln!("unknown CA, system roots: {error}");
    assert_mentions(&error, &["not trusted by the system's CA certificates"]);
}

/// 3. A certificate valid only for another name: the error names the host expected and the
///    name the certificate has, and points at tls_server_name; the override connects.
#[test]
fn host_name_mismatch_and_tls_server_name() {
    let pki = Pki::get();
    // mosquitto_pub cannot name the server it expects: it skips the host name check only.
    let mut clients = pki.client_args(None);
    clients.push("--insecure".into());
    let broker = Broker::start_with_clients(&pki.listener_conf("server-dns-only", false), clients);
    let mut h = Harness::new(1024);
    let cfg = tls_config(1, broker.port, "name", Some("ca.pem"), None, None);
    let error = first_error(&mut h, cfg);
    eprintln!("name mismatch: {error}");
    assert_mentions(
        &error,
        &[
            "not valid for \"127.0.0.1\"",
            DNS_ONLY_NAME,
            "tls_server_name",
        ],
    );

    let cfg = tls_config(
        2,
        broker.port,
        "name-wrong",
        Some("ca.pem"),
        None,
        Some("localhost"),
    );
    let error = first_error(&mut h, cfg);
    eprintln!("wrong tls_server_name: {error}");
    assert_mentions(
        &error,
        &["not valid for \"localhost\"", "mqtt_broker.tls_server_name"],
    );

    // Connecting to 127.0.0.1, checking the certificate for the DNS name.
    let cid = client_id("name-ok");
    let cfg = tls_config(
        3,
        broker.port,
        "name-ok",
        Some("ca.pem"),
        None,
        Some(DNS_ONLY_NAME),
    );
    let ev = h.connect(cfg);
    assert!(matches!(
        ev.last(),
        Some(Event::Connected { broker_id: 3, .. })
    ));
    h.subscribe(&broker, 3, &cid, &[("tls/name", 1)]);
    mosquitto_pub(&broker, &["-q", "1", "-t", "tls/name", "-m", "hi"], None);
    let ev = h.wait_for("Received", |e| matches!(e, Event::Received(_)));
    assert_eq!(&received(&ev)[0].payload[..], b"hi");
}

/// 4. An expired broker certificate says so, with the date.
#[test]
fn expired_certificate_is_named() {
    let broker = tls_broker("server-expired", false, None, "");
    let mut h = Harness::new(1024);
    let error = first_error(
        &mut h,
        tls_config(1, broker.port, "expired", Some("ca.pem"), None, None),
    );
    eprintln!("expired: {error}");
    assert_mentions(&error, &["has expired", "2020-01-02"]);
}

/// 5. A broker that requires a client certificate, with none given and with one from a CA it
///    does not trust, over TLS 1.3 (the alert comes after the handshake) and TLS 1.2.
#[test]
fn client_certificate_required_or_rejected() {
    for extra in ["", "tls_version tlsv1.2\n"] {
        let broker = tls_broker("server", true, None, extra);
        let mut h = Harness::new(1024);
        let cfg = tls_config(1, broker.port, "cc-none", Some("ca.pem"), None, None);
        let error = first_error(&mut h, cfg);
        eprintln!("no client certificate ({extra:?}): {error}");
        assert_mentions(
            &error,
            &[
                "requires a client certificate",
                "set mqtt_broker.client_cert and mqtt_broker.client_key",
            ],
        );

        let cfg = tls_config(
            2,
            broker.port,
            "cc-stranger",
            Some("ca.pem"),
            Some("stranger"),
            None,
        );
        let error = first_error(&mut h, cfg);
        eprintln!("untrusted client certificate ({extra:?}): {error}");
        assert_mentions(
            &error,
            &[
                "rejected our client certificate",
                "not signed by a CA the broker trusts",
            ],
        );
    }
}

/// 6. Mutual TLS with every key form (RSA PKCS#1 and PKCS#8, ECDSA SEC1 and PKCS#8, P-384,
///    Ed25519): each connection presents its own certificate (the broker takes the
///    certificate's CN as user name and logs it) and delivers both ways.
#[test]
fn mutual_tls_with_every_key_form() {
    let broker = tls_broker(
        "server",
        true,
        Some("ed25519"),
        "use_identity_as_username true\n",
    );
    let mut h = Harness::new(1024);
    let configs: Vec<BrokerConfig> = CLIENT_KEYS
        .iter()
        .enumerate()
        .map(|(i, (name, ..))| {
            tls_config(
                i as i32 + 1,
                broker.port,
                &format!("mtls-{name}"),
                Some("ca.pem"),
                Some(name),
                None,
            )
        })
        .collect();
    let n = configs.len();
    assert_eq!(h.engine().set_brokers(configs).len(), n);
    let ev = h.wait_until("every broker Connected", WAIT, |s| {
        s.iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count()
            == n
    });
    assert_no_trouble(&ev);
    for (i, (name, ..)) in CLIENT_KEYS.iter().enumerate() {
        let cid = client_id(&format!("mtls-{name}"));
        assert_eq!(
            broker.log_count(&format!(
                " as {cid} ({}, c1, k30, u'client-{name}')",
                proto_tag()
            )),
            1,
            "{name}: no connection with its certificate's identity; log:\n{}",
            broker.log()
        );
        h.subscribe(
            &broker,
            i as i32 + 1,
            &cid,
            &[(&format!("mtls/{name}/in"), 1)],
        );
    }
    for (name, ..) in CLIENT_KEYS {
        mosquitto_pub(
            &broker,
            &["-q", "1", "-t", &format!("mtls/{name}/in"), "-m", name],
            None,
        );
    }
    let sub = Sub::start(&broker, &client_id("mtls-sub"), "mtls/+/out", 1, n);
    for (i, (name, ..)) in CLIENT_KEYS.iter().enumerate() {
        let id = i as i32 + 1;
        assert!(h.publish(
            id,
            vec![out(
                id as i64,
                &format!("mtls/{name}/out"),
                name.as_bytes(),
                1
            )]
        ));
    }
    let ev = h.wait_until("every message in and out", WAIT, |s| {
        received(s).len() == n && delivered(s).len() == n
    });
    assert_no_trouble(&ev);
    for m in received(&ev) {
        let name = CLIENT_KEYS[m.broker_id as usize - 1].0;
        assert_eq!(
            (m.topic.as_str(), &m.payload[..]),
            (format!("mtls/{name}/in").as_str(), name.as_bytes())
        );
    }
    let mut got: Vec<String> = sub.finish().into_iter().map(|m| m.topic).collect();
    got.sort();
    let mut want: Vec<String> = CLIENT_KEYS
        .iter()
        .map(|(n, ..)| format!("mtls/{n}/out"))
        .collect();
    want.sort();
    assert_eq!(got, want);
}

/// 7. TLS spoken to a plain MQTT port, and plain MQTT to a TLS port.
#[test]
fn tls_and_plain_ports_mixed_up() {
    let plain = Broker::start();
    let mut h = Harness::new(1024);
    let error = first_error(
        &mut h,
        tls_config(1, plain.port, "tls-to-plain", Some("ca.pem"), None, None),
    );
    eprintln!("TLS to a plain port: {error}");
    assert_mentions(&error, &["during the TLS handshake", "plain MQTT port"]);

    let tls = tls_broker("server", false, None, "");
    let error = first_error(&mut h, config(2, tls.port, "plain-to-tls"));
    eprintln!("plain to a TLS port: {error}");
    assert_mentions(
        &error,
        &["without answering CONNECT", "TLS port", "use_tls"],
    );
}

/// 8. A broker refusing the login names the reason; the password appears nowhere.
#[test]
fn refused_login_over_tls() {
    let pki = Pki::get();
    let dir = temp_dir("passwd");
    let file = dir.join("passwd");
    let st = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&file)
        .args(["alice", "right-password"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(st.success());
    let broker = Broker::start_with_clients(
        &format!(
            "{}allow_anonymous false\npassword_file {}\n",
            pki.listener_conf("server", false),
            file.display()
        ),
        pki.client_args(None),
    );
    let mut h = Harness::new(1024);
    let mut cfg = tls_config(1, broker.port, "login", Some("ca.pem"), None, None);
    cfg.username = Some("alice".into());
    cfg.password = Some("Wrong-Secret-9f2".into());
    let error = first_error(&mut h, cfg.clone());
    eprintln!("refused login: {error}");
    assert!(
        error.contains("not authorized") || error.contains("bad user name or password"),
        "{error:?}"
    );
    assert!(!error.contains("Wrong-Secret-9f2"));
    assert!(!format!("{cfg:?}").contains("Wrong-Secret-9f2"));

    cfg.password = Some("right-password".into());
    let ev = h.connect(cfg);
    assert!(matches!(ev.last(), Some(Event::Connected { .. })));
    let _ = std::fs::remove_dir_all(dir);
}

/// Connecting events of broker 1 during `window` after it was started with `cfg`, and the
/// whole timeline for messages. Each failure must carry `error_part`.
fn attempts_within(
    h: &mut Harness,
    cfg: BrokerConfig,
    window: Duration,
    error_part: &str,
) -> (usize, String) {
    h.engine().set_brokers(vec![cfg]);
    let t0 = Instant::now();
    let timeline = h.collect_for(window);
    let shown = show_timeline(t0, &timeline);
    let mut connecting = 0;
    for (_, e) in &timeline {
        match e {
            Event::Connecting { broker_id: 1 } => connecting += 1,
            // The task of the previous configuration.
            Event::Stopped { broker_id: 1 } => {}
            Event::ConnectionLost {
                broker_id: 1,
                error,
                ..
            } => {
                assert!(
                    error.contains(error_part),
                    "{error:?} lacks {error_part:?}:\n{shown}"
                )
            }
            other => panic!("unexpected {}:\n{shown}", describe_one(other)),
        }
    }
    (connecting, shown)
}

/// 9. A broker certificate that fails verification is retried with the backoff, not in a hot
///    loop; so are settings that cannot even be turned into a TLS configuration.
#[test]
fn tls_failures_back_off() {
    let broker = tls_broker("server-other-ca", false, None, "");
    // Counts the TCP connections: mosquitto's log of failed handshakes is not one line each.
    let relay = Proxy::relay(broker.port);
    let mut h = Harness::new(1024);
    // With min 100 ms and max 1 s the delays are >= 50, 100, 200, 400, 500 ms: at most 6
    // attempts fit in 2 s; without a backoff there would be hundreds.
    let window = Duration::from_secs(2);
    let cfg = tls_config(1, relay.port, "backoff", Some("ca.pem"), None, None);
    let (n, shown) = attempts_within(&mut h, cfg, window, "not signed by mqtt_broker.ca_cert");
    eprintln!("wrong certificate:\n{shown}");
    assert!((3..=6).contains(&n), "{n} attempts in {window:?}:\n{shown}");
    wait_until("a TCP connection per attempt", WAIT, || {
        relay.accepted() >= n
    });
    // The next attempt may have started since the window closed.
    let tcp = relay.accepted();
    assert!(tcp <= n + 1, "{tcp} TCP connections for {n} attempts");

    // Not a broker: a listener that shows whether anything connected at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = tls_config(
        1,
        port,
        "backoff-bad",
        Some("ca.pem"),
        Some("ed25519"),
        None,
    );
    cfg.tls.as_mut().unwrap().client_key = None;
    let (n, shown) = attempts_within(&mut h, cfg, window, "mqtt_broker.client_key is not");
    eprintln!("unusable settings:\n{shown}");
    assert!((3..=6).contains(&n), "{n} attempts in {window:?}:\n{shown}");
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "connected without usable TLS settings: {accepted:?}"
    );
}

/// 10. The Last Will reaches an independent subscriber when the connection is cut, the birth
///     message says "online" again (retained) after the reconnect, and a clean stop (which
///     makes the broker drop the will) publishes "offline" itself.
#[test]
fn last_will_on_abrupt_loss_and_birth_on_reconnect() {
    let broker = Broker::start();
    let proxy = Proxy::start(broker.port, 0, Box::new(|_| false));
    let mut h = Harness::new(1024);
    let cid = client_id("will");
    let topic = format!("status/{cid}");
    let mut cfg = config(1, proxy.port, "will");
    // Long enough that the retained "offline" can be read before the reconnect.
    cfg.reconnect_min = Duration::from_secs(3);
    cfg.reconnect_max = Duration::from_secs(6);
    cfg.will = Some(Will {
        topic: topic.clone(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
    });
    cfg.birth_payload = Some(b"online".to_vec());
    let watcher_id = client_id("will-watch");
    let watcher = Sub::start(&broker, &watcher_id, &topic, 1, 4);
    h.connect(cfg);
    wait_until("the birth message", WAIT, || {
        broker
            .publishes_from(&cid)
            .iter()
            .any(|(t, ..)| *t == topic)
    });

    proxy.cut_all();
    let ev = h.wait_for("ConnectionLost", |e| {
        matches!(e, Event::ConnectionLost { .. })
    });
    // The broker published the will once it saw the socket close.
    broker.wait_log(&format!("Sending PUBLISH to {watcher_id}"), 2);
    assert!(
        delivered(&ev).is_empty(),
        "the birth became a delivery:\n{}",
        describe(&ev)
    );
    let retained = Sub::start(&broker, &client_id("will-late-1"), &topic, 1, 1).finish();
    assert_eq!(
        (retained[0].payload.as_slice(), retained[0].retain),
        (&b"offline"[..], true),
        "the will is not what a new subscriber reads"
    );

    let ev = h.wait_until("Connected again", Duration::from_secs(15), |s| {
        matches!(s.last(), Some(Event::Connected { .. }))
    });
    assert!(
        delivered(&ev).is_empty(),
        "the birth became a delivery:\n{}",
        describe(&ev)
    );
    broker.wait_log(&format!("Sending PUBLISH to {watcher_id}"), 3);
    let retained = Sub::start(&broker, &client_id("will-late-2"), &topic, 1, 1).finish();
    assert_eq!(
        (retained[0].payload.as_slice(), retained[0].retain),
        (&b"online"[..], true)
    );
    assert_eq!(
        broker.first_publish_after_connack(&cid),
        [Some(topic.clone()), Some(topic.clone())]
    );

    h.engine().set_brokers(vec![]);
    let ev = h.wait_for("Stopped", |e| matches!(e, Event::Stopped { .. }));
    assert!(
        delivered(&ev).is_empty(),
        "the goodbye became a delivery:\n{}",
        describe(&ev)
    );
    broker.wait_log(&format!("Received DISCONNECT from {cid}"), 1);
    let seen = watcher.finish();
    let payloads: Vec<&[u8]> = seen.iter().map(|m| m.payload.as_slice()).collect();
    assert_eq!(
        payloads,
        [&b"online"[..], b"offline", b"online", b"offline"]
    );
    assert!(seen.iter().all(|m| m.qos == 1));
    let retained = Sub::start(&broker, &client_id("will-late-3"), &topic, 1, 1).finish();
    assert_eq!(
        (retained[0].payload.as_slice(), retained[0].retain),
        (&b"offline"[..], true)
    );
}

/// 10b. A will that cannot be sent (a wildcard topic, larger than the packet limit) is
///      reported as the connection's error, with the backoff, before anything is sent.
#[test]
fn unusable_will_is_reported() {
    // Not a broker: a listener that shows whether anything connected at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut h = Harness::new(1024);
    let mut cfg = config(1, listener.local_addr().unwrap().port(), "bad-will");
    cfg.will = Some(Will {
        topic: "status/+".into(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
    });
    let error = first_error(&mut h, cfg.clone());
    assert_mentions(&error, &["invalid will topic"]);
    cfg.will.as_mut().unwrap().topic = "status/x".into();
    cfg.birth_payload = Some(vec![b'x'; 5000]);
    cfg.max_packet_size = 2000;
    let error = first_error(&mut h, cfg);
    assert_mentions(&error, &["birth message", "2000"]);
    h.collect_for(Duration::from_millis(300));
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a connection was attempted: {accepted:?}"
    );
}

/// Rows in flight while the connection is cut twice, with a birth message of `birth_qos`:
/// every row is reported Delivered exactly once, with the packet id the broker logged for
/// that very row, the birth never is, and it is the first PUBLISH of each connection.
fn birth_keeps_delivery_ids(birth_qos: u8) {
    const N: i64 = 300;
    let broker = Broker::start();
    let acks = Arc::new(AtomicUsize::new(0));
    let counter = acks.clone();
    let proxy = Proxy::start(
        broker.port,
        2,
        Box::new(move |p| {
            matches!(p, Packet::PubAck(_) | Packet::PubComp(_))
                && matches!(counter.fetch_add(1, Ordering::AcqRel) + 1, 60 | 180)
        }),
    );
    let test = format!("birth-fifo-{birth_qos}");
    let cid = client_id(&test);
    let status = format!("status/{cid}");
    let mut cfg = config(1, proxy.port, &test);
    cfg.will = Some(Will {
        topic: status.clone(),
        payload: b"offline".to_vec(),
        qos: birth_qos,
        retain: true,
    });
    cfg.birth_payload = Some(b"online".to_vec());
    let mut h = Harness::new(4096);
    h.connect(cfg);

    let rows: BTreeMap<i64, OutMessage> = (1..=N)
        .map(|i| {
            (
                i,
                out(i, &format!("fifo/{i}"), b"row", [1, 2, 0][i as usize % 3]),
            )
        })
        .collect();
    let mut pending = rows.clone();
    let mut outcomes: BTreeMap<i64, Option<u16>> = BTreeMap::new();
    assert!(h.publish(1, rows.values().cloned().collect()));
    let (mut lost, mut connected) = (0, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !pending.is_empty() {
        let Some((_, e)) = h.next_timed(deadline) else {
            panic!(
                "{} rows never delivered; events:\n{}",
                pending.len(),
                describe(&seen)
            );
        };
        match &e {
            Event::Delivered {
                outbox_id, pkid, ..
            } => {
                let row = pending.remove(outbox_id);
                assert!(
                    row.is_some(),
                    "Delivered {outbox_id} twice or unknown:\n{}",
                    describe(&seen)
                );
                assert_eq!(
                    row.unwrap().qos == 0,
                    pkid.is_none(),
                    "row {outbox_id}: pkid {pkid:?}"
                );
                outcomes.insert(*outbox_id, *pkid);
            }
            Event::Connected { .. } => {
                connected += 1;
                // What the worker does: resend whatever has no outcome yet.
                assert!(h.publish(1, pending.values().cloned().collect()));
            }
            Event::ConnectionLost { .. } => lost += 1,
            Event::Connecting { .. } => {}
            other => panic!("unexpected {}", describe_one(other)),
        }
        seen.push(e);
    }
    let more = h.collect_for(Duration::from_millis(300));
    assert!(
        more.iter()
            .all(|(_, e)| !matches!(e, Event::Delivered { .. })),
        "{more:?}"
    );
    assert_eq!(
        (lost, connected, proxy.cut_count.load(Ordering::Acquire)),
        (2, 3, 2)
    );

    // Each Delivered packet id is one the broker logged for that row's own topic.
    let logged: std::collections::HashSet<(String, u16)> = broker
        .publishes_from(&cid)
        .into_iter()
        .map(|(t, _, pkid)| (t, pkid))
        .collect();
    for (id, pkid) in &outcomes {
        if let Some(p) = pkid {
            assert!(
                logged.contains(&(format!("fifo/{id}"), *p)),
                "row {id} reported with packet id {p}, which the broker never saw for it"
            );
        }
    }
    let firsts = broker.first_publish_after_connack(&cid);
    assert_eq!(
        firsts,
        vec![Some(status); 3],
        "the birth is not each connection's first PUBLISH"
    );
}

/// 11. See `birth_keeps_delivery_ids`.
#[test]
fn birth_qos0_keeps_delivery_ids_across_reconnects() {
    birth_keeps_delivery_ids(0);
}

#[test]
fn birth_qos1_keeps_delivery_ids_across_reconnects() {
    birth_keeps_delivery_ids(1);
}

#[test]
fn birth_qos2_keeps_delivery_ids_across_reconnects() {
    birth_keeps_delivery_ids(2);
}

/// 12. Neither Debug output nor any check message shows a password or a key.
#[test]
fn secrets_never_printed() {
    let pki = Pki::get();
    let key = pki.read("client-ecdsa-sec1.key");
    let mut cfg = tls_config(1, 1883, "debug", Some("ca.pem"), Some("ecdsa-sec1"), None);
    cfg.password = Some("hunter2-xyz".into());
    let shown = format!("{cfg:?} {:?}", cfg.tls);
    assert!(!shown.contains("hunter2-xyz"));
    assert!(shown.contains("password: Some(<redacted>)"));
    assert!(shown.contains("client_key: Some(<redacted>)"));
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line), "key material in Debug output");
    }
    cfg.password = None;
    cfg.tls.as_mut().unwrap().client_key = None;
    let shown = format!("{cfg:?}");
    assert!(shown.contains("password: None") && shown.contains("client_key: None"));
}

/// 13. The validators on real openssl output: every supported key form passes; wrong kinds,
///     encrypted and mismatched keys fail naming the column, never quoting the key.
#[test]
fn check_pem_on_openssl_output() {
    let pki = Pki::get();
    const KEY: &str = "mqtt_broker.client_key";
    const CERT: &str = "mqtt_broker.client_cert";
    const CA: &str = "mqtt_broker.ca_cert";
    check_pem(CA, &pki.read("ca.pem"), PemKind::CaCert).unwrap();
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    if !bundle.is_empty() {
        check_pem(CA, &bundle, PemKind::CaCert).expect("Debian's CA bundle");
    }
    for (name, ..) in CLIENT_KEYS {
        let s = TlsSettings {
            ca_cert: Some(pki.read("ca.pem")),
            client_cert: Some(pki.read(&format!("client-{name}.pem"))),
            client_key: Some(pki.read(&format!("client-{name}.key"))),
            server_name: Some(DNS_ONLY_NAME.into()),
        };
        check_pem(CERT, s.client_cert.as_ref().unwrap(), PemKind::ClientCert).unwrap();
        check_pem(KEY, s.client_key.as_ref().unwrap(), PemKind::ClientKey).unwrap();
        check_settings(&s).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    let key = pki.read("client-rsa-pkcs8.key");
    let cert = pki.read("client-rsa-pkcs8.pem");
    let secret_lines: Vec<&str> = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let no_key_in = |e: &str| {
        for l in &secret_lines {
            assert!(!e.contains(l), "key material in {e:?}");
        }
    };
    let err = |column: &str, text: &str, kind: PemKind| {
        let e = check_pem(column, text, kind).unwrap_err();
        eprintln!("{kind:?}: {e}");
        assert!(e.starts_with(&format!("{column}: ")), "{e:?}");
        no_key_in(&e);
        e
    };
    assert_mentions(
        &err(KEY, &cert, PemKind::ClientKey),
        &["a certificate, not a private key"],
    );
    assert_mentions(
        &err(CERT, &key, PemKind::ClientCert),
        &["private key", "mqtt_broker.client_key only"],
    );
    assert_mentions(&err(CA, &key, PemKind::CaCert), &["private key"]);
    assert_mentions(
        &err(CERT, &format!("{cert}{key}"), PemKind::ClientCert),
        &["private key"],
    );
    assert_mentions(
        &err(KEY, &format!("{key}{cert}"), PemKind::ClientKey),
        &["besides the private key"],
    );
    assert_mentions(
        &err(KEY, &format!("{key}{key}"), PemKind::ClientKey),
        &["more than one private key"],
    );
    for enc in ["encrypted-pkcs8.key", "encrypted-pkcs1.key"] {
        assert_mentions(
            &err(KEY, &pki.read(enc), PemKind::ClientKey),
            &["encrypted", "not supported"],
        );
    }
    let cut = &key[..key.len() / 2];
    assert_mentions(&err(KEY, cut, PemKind::ClientKey), &["truncated PEM"]);
    let cut = &cert[..cert.len() / 2];
    assert_mentions(&err(CERT, cut, PemKind::ClientCert), &["truncated PEM"]);
    // Lines lost from the middle: still framed, but no longer a certificate.
    let lines: Vec<&str> = cert.lines().collect();
    let damaged = [&lines[..3], &lines[lines.len() - 3..]].concat().join("\n");
    assert_mentions(
        &err(CERT, &damaged, PemKind::ClientCert),
        &["not a valid X.509"],
    );
    let lines: Vec<&str> = key.lines().collect();
    let damaged = [&lines[..4], &lines[lines.len() - 3..]].concat().join("\n");
    assert_mentions(&err(KEY, &damaged, PemKind::ClientKey), &["cannot be used"]);

    // A key that is not the certificate's.
    let s = TlsSettings {
        ca_cert: None,
        client_cert: Some(cert.clone()),
        client_key: Some(pki.read("client-ecdsa-pkcs8.key")),
        server_name: None,
    };
    let e = check_settings(&s).unwrap_err();
    eprintln!("mismatch: {e}");
    assert_mentions(
        &e,
        &["mqtt_broker.client_key does not belong to the certificate"],
    );
    let s = TlsSettings {
        client_key: None,
        ..s
    };
    assert_mentions(&check_settings(&s).unwrap_err(), &["set both, or neither"]);
}
