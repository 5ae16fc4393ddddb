//! `probe` (behind `mqtt_test_connection`) against real mosquitto brokers (plain, password,
//! TLS, mutual TLS), a scripted broker that shows what the probe sends, a refused port and a
//! silent server. Run with `cargo test -p mqtt_pg_core --test probe`.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pki::{Pki, DNS_ONLY_NAME};
use common::*;
use mqtt_pg_core::client_id::PROBE_PREFIX;
use mqtt_pg_core::engine::{
    probe_config, BrokerConfig, Event, ProbeOutcome, Prober, TlsSettings, Will,
};

const TIMEOUT: Duration = Duration::from_secs(5);
const PASSWORD: &str = "pr0be-Secret!";

/// Run a probe to its end the way the backend does: a slice at a time on this thread.
fn probe(cfg: &BrokerConfig, timeout: Duration) -> ProbeOutcome {
    let mut p = Prober::new(cfg, timeout).expect("runtime");
    loop {
        if let Some(o) = p.run_for(Duration::from_millis(20)) {
            return o;
        }
    }
}

fn assert_ok(o: &ProbeOutcome) {
    assert!(o.ok, "probe failed: {o:?}");
    assert_eq!(o.connack.as_deref(), Some("Success"), "{o:?}");
    assert_eq!(o.session_present, Some(false), "{o:?}");
    assert_eq!(o.error, None);
    assert!(
        o.round_trip > Duration::ZERO && o.round_trip < TIMEOUT,
        "{o:?}"
    );
}

fn assert_failed(o: &ProbeOutcome, needles: &[&str]) {
    assert!(!o.ok, "probe succeeded where it must not: {o:?}");
    let error = o.error.as_deref().unwrap_or_default();
    for n in needles {
        assert!(error.contains(n), "error {error:?} does not mention {n:?}");
    }
}

fn tls_broker(cert: &str, require_client_cert: bool) -> Broker {
    Broker::start_with(&Pki::get().listener_conf(cert, require_client_cert))
}

/// `config` over TLS with CA file `ca`, client certificate `client` (a `CLIENT_KEYS` name or
/// "stranger") and `tls_server_name`.
fn tls_config(
    port: u16,
    ca: &str,
    client: Option<&str>,
    server_name: Option<&str>,
) -> BrokerConfig {
    let pki = Pki::get();
    let mut c = config(1, port, "probe-tls");
    c.tls = Some(TlsSettings {
        ca_cert: Some(pki.read(ca)),
        client_cert: client.map(|k| pki.read(&format!("client-{k}.pem"))),
        client_key: client.map(|k| pki.read(&format!("client-{k}.key"))),
        server_name: server_name.map(str::to_string),
    });
    c
}

#[test]
fn probe_config_keeps_the_worker_session_apart() {
    let mut c = config(7, 1883, "probe-config");
    c.clean_session = false;
    c.username = Some("u".into());
    c.password = Some("p".into());
    c.will = Some(Will {
        topic: "status".into(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
    });
    c.birth_payload = Some(b"online".to_vec());
    let p = probe_config(&c);
    assert_ne!(p.client_id, c.client_id);
    assert!(p.client_id.starts_with(PROBE_PREFIX), "{}", p.client_id);
    assert!(p.clean_session);
    assert_eq!(p.will, None);
    assert_eq!(p.birth_payload, None);
    // Everything else is the worker's.
    let same = BrokerConfig {
        client_id: c.client_id.clone(),
        clean_session: false,
        session_expiry: c.session_expiry,
        will: c.will.clone(),
        birth_payload: c.birth_payload.clone(),
        ..p.clone()
    };
    assert_eq!(same, c);
    assert_ne!(
        probe_config(&c).client_id,
        p.client_id,
        "a fresh id per probe"
    );
}

/// What goes on the wire: its own client id, a clean session, no will, the credentials, and a
/// DISCONNECT after the CONNACK.
#[test]
fn probe_sends_clean_connect_and_disconnect() {
    let fake = ScriptedBroker::start();
    let mut cfg = config(1, fake.port, "probe-wire");
    cfg.clean_session = false;
    cfg.username = Some("user".into());
    cfg.password = Some(PASSWORD.into());
    cfg.will = Some(Will {
        topic: "odoo/status".into(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: true,
    });
    let worker_id = cfg.client_id.clone();
    let prober = std::thread::spawn(move || probe(&cfg, TIMEOUT));
    let (mut conn, connect) = fake.accept_connect();
    let Packet::Connect {
        client_id,
        clean_session,
        will,
        login,
    } = connect
    else {
        unreachable!()
    };
    assert_ne!(client_id, worker_id);
    assert!(client_id.starts_with(PROBE_PREFIX), "{client_id}");
    assert!(clean_session && !will && login);
    conn.connack(false);
    assert_eq!(conn.expect("DISCONNECT"), Packet::Disconnect);
    let o = prober.join().expect("probe thread");
    assert_ok(&o);
    assert_eq!(o.client_id, client_id);
    assert!(!o.tls);
}

#[test]
fn probe_succeeds_and_says_goodbye() {
    let broker = Broker::start();
    let cfg = config(1, broker.port, "probe-ok");
    let o = probe(&cfg, TIMEOUT);
    assert_ok(&o);
    assert!(!o.tls);
    assert_eq!(broker.connects(&o.client_id), 1);
    // mosquitto logs a DISCONNECT as "disconnected", a dropped socket as "closed its connection".
    broker.wait_log(&format!("Client {} disconnected.", o.client_id), 1);
    assert_eq!(broker.connects(&cfg.client_id), 0);
}

/// The worker's connection, with a persistent session, a will and a subscription, sees nothing
/// of probes made with its own configuration: no takeover, no lost connection, no will, and
/// messages keep flowing both ways.
#[test]
fn probe_leaves_the_running_connection_alone() {
    let broker = Broker::start();
    let mut h = Harness::new(1024);
    let mut cfg = config(1, broker.port, "probe-beside");
    cfg.clean_session = false;
    cfg.will = Some(Will {
        topic: "probe/status".into(),
        payload: b"offline".to_vec(),
        qos: 1,
        retain: false,
    });
    let ev = h.connect(cfg.clone());
    assert_no_trouble(&ev);
    h.subscribe(&broker, 1, &cfg.client_id, &[("probe/in/#", 1)]);
    let watch_id = client_id("probe-will-watch");
    let will_watch = Sub::start(&broker, &watch_id, "probe/status", 1, 1);

    for _ in 0..5 {
        assert_ok(&probe(&cfg, TIMEOUT));
    }
    // A probe dropped half-way (a cancelled call) ends without a DISCONNECT: the one that
    // would leave the worker's will behind if it carried it.
    let mut dropped = Prober::new(&cfg, TIMEOUT).expect("runtime");
    let _ = dropped.run_for(Duration::from_millis(2));
    drop(dropped);

    let quiet = h.collect_for(Duration::from_millis(300));
    assert!(
        quiet.is_empty(),
        "the worker's connection noticed: {quiet:?}"
    );
    assert!(
        !broker
            .log()
            .contains("already connected, closing old connection"),
        "a session takeover"
    );
    assert_eq!(broker.connects(&cfg.client_id), 1);

    // Still subscribed and publishing on the same connection.
    mosquitto_pub(
        &broker,
        &["-q", "1", "-t", "probe/in/x", "-m", "after"],
        None,
    );
    let events = h.wait_until("the message after the probes", WAIT, |s| {
        !received(s).is_empty()
    });
    assert_no_trouble(&events);
    assert!(h.publish(1, vec![out(1, "probe/out", b"still here", 1)]));
    h.wait_for("Delivered", |e| matches!(e, Event::Delivered { .. }));
    // Nothing reached the will topic.
    assert_eq!(
        broker.log_count(&format!("Sending PUBLISH to {watch_id}")),
        0,
        "{}",
        broker.log()
    );
    drop(will_watch);
}

#[test]
fn wrong_password_is_refused_without_the_password_in_the_error() {
    let dir = temp_dir("probe-pw");
    let pwfile = dir.join("passwd");
    let st = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&pwfile)
        .args(["odoo", PASSWORD])
        .status()
        .expect("run mosquitto_passwd");
    assert!(st.success());
    let broker = Broker::start_with(&format!("password_file {}\n", pwfile.display()));
    let mut cfg = config(1, broker.port, "probe-pw");
    cfg.username = Some("odoo".into());
    cfg.password = Some(PASSWORD.into());
    assert_ok(&probe(&cfg, TIMEOUT));

    cfg.password = Some("wrong-Secret".into());
    let o = probe(&cfg, TIMEOUT);
    eprintln!("wrong password: {o:?}");
    assert_failed(
        &o,
        &["refused the connection", &format!(":{}", broker.port)],
    );
    assert!(
        matches!(
            o.connack.as_deref(),
            Some("NotAuthorized" | "BadUserNamePassword")
        ),
        "{o:?}"
    );
    let shown = format!("{o:?}");
    assert!(!shown.contains("wrong-Secret") && !shown.contains(PASSWORD));
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_with_the_right_ca() {
    let broker = tls_broker("server", false);
    let o = probe(&tls_config(broker.port, "ca.pem", None, None), TIMEOUT);
    assert_ok(&o);
    assert!(o.tls);
}

#[test]
fn tls_with_a_wrong_ca() {
    let broker = tls_broker("server-other-ca", false);
    let o = probe(&tls_config(broker.port, "ca.pem", None, None), TIMEOUT);
    assert_failed(&o, &["not signed by mqtt_broker.ca_cert"]);
    assert!(o.tls && o.connack.is_none());
}

#[test]
fn tls_with_a_wrong_server_name_and_the_right_one() {
    let broker = tls_broker("server-dns-only", false);
    let o = probe(&tls_config(broker.port, "ca.pem", None, None), TIMEOUT);
    assert_failed(&o, &["not valid for \"127.0.0.1\"", "tls_server_name"]);
    let o = probe(
        &tls_config(broker.port, "ca.pem", None, Some("wrong.mqtt-pg.test")),
        TIMEOUT,
    );
    assert_failed(&o, &["wrong.mqtt-pg.test", DNS_ONLY_NAME]);
    let o = probe(
        &tls_config(broker.port, "ca.pem", None, Some(DNS_ONLY_NAME)),
        TIMEOUT,
    );
    assert_ok(&o);
}

#[test]
fn mutual_tls() {
    let broker = tls_broker("server", true);
    let o = probe(
        &tls_config(broker.port, "ca.pem", Some("ecdsa-pkcs8"), None),
        TIMEOUT,
    );
    assert_ok(&o);
    let o = probe(&tls_config(broker.port, "ca.pem", None, None), TIMEOUT);
    assert_failed(&o, &["client certificate", "mqtt_broker.client_cert"]);
    let o = probe(
        &tls_config(broker.port, "ca.pem", Some("stranger"), None),
        TIMEOUT,
    );
    assert_failed(&o, &["rejected our client certificate"]);
    let key = Pki::get().read("client-stranger.key");
    let body = key.lines().nth(1).unwrap_or_default();
    assert!(!format!("{o:?}").contains(body));
}

#[test]
fn tls_to_a_plain_port() {
    let broker = Broker::start();
    let o = probe(&tls_config(broker.port, "ca.pem", None, None), TIMEOUT);
    assert_failed(&o, &["plain MQTT port"]);
}

#[test]
fn refused_port() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = probe(&config(1, port, "probe-refused"), TIMEOUT);
    assert_failed(&o, &["refused", &format!("127.0.0.1:{port}")]);
    assert_eq!(o.connack, None);
    assert!(o.round_trip < Duration::from_secs(1), "{o:?}");
}

/// A server that accepts TCP and never answers: the probe gives up at its timeout, in the
/// worker's words, and hands control back between slices all the while.
#[test]
fn silent_server_hits_the_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let timeout = Duration::from_millis(400);
    let mut p = Prober::new(&config(1, port, "probe-silent"), timeout).expect("runtime");
    let t0 = Instant::now();
    let mut slices = 0;
    let o = loop {
        slices += 1;
        if let Some(o) = p.run_for(Duration::from_millis(20)) {
            break o;
        }
    };
    let took = t0.elapsed();
    assert_failed(&o, &["no answer from", &format!("127.0.0.1:{port}")]);
    assert!(
        o.round_trip >= timeout && took < timeout * 3,
        "{o:?} in {took:?}"
    );
    assert!(
        slices >= 10,
        "only {slices} slices: control did not come back"
    );
    assert_eq!(
        p.run_for(Duration::from_millis(1)),
        None,
        "one outcome only"
    );
    // The connection was made (and closed with the probe).
    let (mut s, _) = silent.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert_eq!(buf.first(), Some(&0x10), "a CONNECT was sent");
}

/// Dropping a probe half-way (a cancelled SQL call) returns at once and closes its connection.
#[test]
fn dropping_a_probe_closes_its_connection() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let mut p = Prober::new(&config(1, port, "probe-drop"), TIMEOUT).expect("runtime");
    for _ in 0..5 {
        assert_eq!(p.run_for(Duration::from_millis(20)), None);
    }
    let t0 = Instant::now();
    drop(p);
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    let (mut s, _) = silent.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    // EOF well before the read timeout: the socket is gone.
    let t0 = Instant::now();
    s.read_to_end(&mut buf).expect("EOF, not a timeout");
    assert!(t0.elapsed() < Duration::from_secs(2));
}
