//! Test harness for the engine integration tests: a real mosquitto per test (on a free
//! loopback port, killed on drop), mosquitto_pub / mosquitto_sub helpers, and an engine wrapper
//! whose waits poll `drain_events` against a deadline and report everything they saw on failure.

#![allow(dead_code)]

pub mod pki;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mqtt_pg_core::engine::{self, Ack, BrokerConfig, Engine, Event, InMessage, OutMessage};

/// Default deadline for anything the tests wait for.
pub const WAIT: Duration = Duration::from_secs(10);

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const POLL: Duration = Duration::from_millis(10);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory under the system temp dir, unique to this process and call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "mqtt_pg_core_engine_test_{}_{tag}_{n}",
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().unwrap().port()
}

/// Poll `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// One mosquitto process on 127.0.0.1:`port`, killed (and its directory removed) on drop.
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    generation: u32,
    /// Configuration lines added to every run's config file.
    extra_conf: String,
    /// Arguments mosquitto_pub and mosquitto_sub need to reach it (`--cafile ...` for TLS).
    client_args: Vec<String>,
}

impl Broker {
    /// Start a broker on a free port (retrying with another port if the one picked was taken
    /// in the meantime).
    pub fn start() -> Broker {
        Self::start_with("")
    }

    /// [`Broker::start`] with extra configuration lines (`"max_packet_size 2000\n"`).
    pub fn start_with(extra_conf: &str) -> Broker {
        Self::start_with_clients(extra_conf, Vec::new())
    }

    /// [`Broker::start_with`] for a broker that mosquitto_pub / mosquitto_sub reach only with
    /// `client_args` (a TLS listener: `--cafile ...`).
    pub fn start_with_clients(extra_conf: &str, client_args: Vec<String>) -> Broker {
        let dir = temp_dir("mosq");
        let mut last_err = String::new();
        for _ in 0..5 {
            let mut b = Broker {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                generation: 0,
                extra_conf: extra_conf.to_string(),
                client_args: client_args.clone(),
            };
            match b.spawn(Duration::from_secs(2)) {
                Ok(()) => return b,
                Err(e) => {
                    last_err = e;
                    b.dir = PathBuf::new(); // keep the directory for the next try
                }
            }
        }
        panic!("could not start mosquitto: {last_err}");
    }

    /// Kill the broker (SIGKILL, like a crash) and wait until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, with a fresh log file (and, persistence being off, no
    /// sessions or retained messages).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running broker");
        let deadline = Instant::now() + WAIT;
        loop {
            match self.spawn(Duration::from_secs(2)) {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on port {} failed, retrying: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("could not restart mosquitto on port {}: {e}", self.port),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker not running").id()
    }

    /// Send a signal to the running broker (`STOP`, `CONT`, ...).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `-h 127.0.0.1 -p PORT` and whatever else mosquitto_pub / mosquitto_sub need for it.
    pub fn client_args(&self) -> Vec<String> {
        let mut args = vec![
            "-h".to_string(),
            "127.0.0.1".to_string(),
            "-p".to_string(),
            self.port.to_string(),
        ];
        args.extend(self.client_args.iter().cloned());
        args
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("mosquitto-{}.log", self.generation))
    }

    /// The current run's log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Lines of the current run's log that contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Wait until the current run's log has at least `count` lines containing `needle`.
    pub fn wait_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.log_count(needle);
            if n >= count {
                return;
            }
            if Instant::now() >= deadline {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "timed out waiting for {count} log lines with {needle:?} (have {n}); log tail:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The current run's log lines with the timestamp prefix ("1795635890: ") removed.
    fn log_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((ts, rest)) if ts.bytes().all(|b| b.is_ascii_digit()) => rest.to_string(),
                _ => l.to_string(),
            })
            .collect()
    }

    /// How many times `client_id` connected during the current run.
    pub fn connects(&self, client_id: &str) -> usize {
        self.log_count(&format!(" as {client_id} ("))
    }

    /// The SUBSCRIBE and UNSUBSCRIBE packets the broker logged from `client_id`, in order, each
    /// with the number of the client's connection (1 for its first in this run) it came on.
    /// mosquitto logs "Received SUBSCRIBE from <cid>" followed by one "\t<filter> (QoS <n>)"
    /// line per filter, and "Received UNSUBSCRIBE from <cid>" followed by "\t<filter>" lines.
    pub fn sub_packets(&self, client_id: &str) -> Vec<(usize, LoggedSub)> {
        let connect = format!(" as {client_id} (");
        let sub = format!("Received SUBSCRIBE from {client_id}");
        let unsub = format!("Received UNSUBSCRIBE from {client_id}");
        let mut conn = 0;
        let mut packets: Vec<(usize, LoggedSub)> = Vec::new();
        // The packet whose filter lines are being read.
        let mut open = false;
        for line in self.log_lines() {
            if let (true, Some(f)) = (open, line.strip_prefix('\t')) {
                match packets.last_mut() {
                    Some((_, LoggedSub::Subscribe(v))) => {
                        let (filter, qos) = f
                            .rsplit_once(" (QoS ")
                            .and_then(|(f, q)| Some((f, q.strip_suffix(')')?.parse().ok()?)))
                            .unwrap_or_else(|| panic!("bad SUBSCRIBE filter line {line:?}"));
                        v.push((filter.to_string(), qos));
                    }
                    Some((_, LoggedSub::Unsubscribe(v))) => v.push(f.to_string()),
                    None => unreachable!(),
                }
                continue;
            }
            // mosquitto also logs "<cid> <qos> <filter>" after each filter line: skip those.
            if open && line.starts_with(&format!("{client_id} ")) {
                continue;
            }
            open = false;
            if line.contains(&connect) {
                conn += 1;
            } else if line == sub {
                packets.push((conn, LoggedSub::Subscribe(Vec::new())));
                open = true;
            } else if line == unsub {
                packets.push((conn, LoggedSub::Unsubscribe(Vec::new())));
                open = true;
            }
        }
        packets
    }

    /// (topic, qos, packet id) of every PUBLISH the broker logged from `client_id`, in order.
    /// mosquitto logs "Received PUBLISH from <cid> (d0, q1, r0, m<pkid>, '<topic>', ... (<n>
    /// bytes))".
    pub fn publishes_from(&self, client_id: &str) -> Vec<(String, u8, u16)> {
        let prefix = format!("Received PUBLISH from {client_id} (");
        let parse = |rest: &str| -> Option<(String, u8, u16)> {
            let mut f = rest.splitn(5, ", ");
            let (_dup, qos, _retain, mid) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let qos = qos.strip_prefix('q')?.parse().ok()?;
            let mid = mid.strip_prefix('m')?.parse().ok()?;
            let topic = f.next()?.strip_prefix('\'')?.rsplit_once("', ... (")?.0;
            Some((topic.to_string(), qos, mid))
        };
        self.log_lines()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| parse(rest).unwrap_or_else(|| panic!("bad PUBLISH log line {rest:?}")))
            .collect()
    }

    /// For each CONNACK the broker sent `client_id` in the current run, the topic of the first
    /// PUBLISH it then received from that client on the same connection (None if none came).
    pub fn first_publish_after_connack(&self, client_id: &str) -> Vec<Option<String>> {
        let connack = format!("Sending CONNACK to {client_id} ");
        let publish = format!("Received PUBLISH from {client_id} (");
        let mut firsts: Vec<Option<String>> = Vec::new();
        for line in self.log_lines() {
            if line.starts_with(&connack) {
                firsts.push(None);
            } else if let Some(rest) = line.strip_prefix(&publish) {
                if let Some(first @ None) = firsts.last_mut() {
                    let topic = rest
                        .split_once(", '")
                        .and_then(|(_, t)| t.rsplit_once("', ... ("))
                        .map(|(t, _)| t.to_string());
                    *first = Some(topic.unwrap_or_else(|| panic!("bad PUBLISH line {line:?}")));
                }
            }
        }
        firsts
    }

    fn spawn(&mut self, timeout: Duration) -> Result<(), String> {
        self.generation += 1;
        let conf = self.dir.join(format!("mosquitto-{}.conf", self.generation));
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence false\n\
                 max_inflight_messages 0\n\
                 max_queued_messages 0\n\
                 user root\n\
                 log_dest file {log}\n\
                 log_type all\n\
                 {extra}",
                port = self.port,
                log = self.log_path().display(),
                extra = self.extra_conf
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {MOSQUITTO}: {e}"))?;
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "mosquitto exited with {status} on port {}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "port {} not accepting within {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if self.dir.as_os_str().is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("broker logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE as the broker logged it (see [`Broker::sub_packets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoggedSub {
    Subscribe(Vec<(String, u8)>),
    Unsubscribe(Vec<String>),
}

/// A fake MQTT broker on a free loopback port: for each connection it reads the CONNECT
/// packet, accepts it with a CONNACK and closes the socket at once. Its thread stops (and is
/// joined) on drop.
pub struct FlakyBroker {
    pub port: u16,
    /// Connections accepted (and answered) so far.
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FlakyBroker {
    pub fn start() -> FlakyBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake broker");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if Self::serve(stream).is_ok() {
                            a.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("fake broker accept: {e}"),
                }
            }
        });
        FlakyBroker {
            port,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Read one CONNECT, answer CONNACK (accepted, no session), close.
    fn serve(mut stream: TcpStream) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        match read_raw(&mut stream)? {
            Some(p) if p.header == 0x10 => {}
            Some(p) => {
                return Err(std::io::Error::other(format!(
                    "not a CONNECT: {:#x}",
                    p.header
                )))
            }
            None => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        let connack: &[u8] = match protocol() {
            engine::Protocol::V311 => &[0x20, 0x02, 0x00, 0x00],
            // MQTT 5 adds the properties' length (none).
            engine::Protocol::V5 => &[0x20, 0x03, 0x00, 0x00, 0x00],
        };
        stream.write_all(connack)?;
        stream.flush()?;
        stream.shutdown(std::net::Shutdown::Both)
    }
}

impl Drop for FlakyBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("fake broker thread panicked");
            }
        }
    }
}

/// A child process killed on drop.
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl ChildGuard {
    /// Wait for the process to exit; panics unless it succeeds within `timeout`.
    pub fn wait_success(&mut self, timeout: Duration) {
        let child = self.0.as_mut().expect("process already reaped");
        let mut status = None;
        wait_until("a background process to exit", timeout, || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let status = status.unwrap();
        assert!(status.success(), "background process failed: {status}");
    }
}

/// Run mosquitto_pub against the broker with `args`, feeding `stdin` if given; panics unless it
/// succeeds.
pub fn mosquitto_pub(broker: &Broker, args: &[&str], stdin: Option<&[u8]>) {
    let mut child = Command::new("mosquitto_pub")
        .args(broker.client_args())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mosquitto_pub");
    if let Some(data) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(data).expect("write mosquitto_pub stdin");
    }
    let mut guard = ChildGuard(Some(child));
    let out = guard.0.take().unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_pub {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Start mosquitto_pub in the background (for large `-l` runs); the caller waits on it.
pub fn spawn_mosquitto_pub(broker: &Broker, args: &[&str], stdin: Vec<u8>) -> ChildGuard {
    let mut child = Command::new("mosquitto_pub")
        .args(broker.client_args())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto_pub");
    let mut pipe = child.stdin.take().unwrap();
    // A thread, so a large input never blocks the test on a full pipe.
    std::thread::spawn(move || {
        let _ = pipe.write_all(&stdin);
    });
    ChildGuard(Some(child))
}

/// One line of `mosquitto_sub -F '%q %r %t %x'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubMsg {
    pub qos: u8,
    pub retain: bool,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// An independent subscriber: mosquitto_sub printing qos, retain, topic and hex payload.
pub struct Sub {
    child: ChildGuard,
    out: PathBuf,
    count: usize,
}

impl Sub {
    /// Subscribe to `filter` at `qos` and exit after `count` messages (or 20 s). Returns once
    /// the broker has acknowledged the subscription (seen in its log).
    pub fn start(broker: &Broker, id: &str, filter: &str, qos: u8, count: usize) -> Sub {
        let out = broker.dir().join(format!("sub-{id}.out"));
        let file = fs::File::create(&out).unwrap();
        let suback = format!("Sending SUBACK to {id}");
        let before = broker.log_count(&suback);
        let child = Command::new("mosquitto_sub")
            .args(broker.client_args())
            .args(["-i", id, "-t", filter, "-q", &qos.to_string()])
            .args(["-C", &count.to_string(), "-W", "20"])
            .args(["-F", "%q %r %t %x"])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let sub = Sub {
            child: ChildGuard(Some(child)),
            out,
            count,
        };
        broker.wait_log(&suback, before + 1);
        sub
    }

    /// Wait for mosquitto_sub to exit (it does after `count` messages, at the latest after
    /// its 20 s timeout) and return what it printed.
    pub fn finish(mut self) -> Vec<SubMsg> {
        let mut child = self.child.0.take().unwrap();
        let status = child.wait().unwrap();
        let text = fs::read_to_string(&self.out).unwrap();
        let msgs: Vec<SubMsg> = text.lines().map(parse_sub_line).collect();
        assert!(
            status.success() && msgs.len() == self.count,
            "mosquitto_sub exited with {status} after {} of {} messages",
            msgs.len(),
            self.count
        );
        msgs
    }
}

fn parse_sub_line(line: &str) -> SubMsg {
    let mut parts = line.splitn(4, ' ');
    let mut next = || {
        parts
            .next()
            .unwrap_or_else(|| panic!("bad mosquitto_sub line {line:?}"))
    };
    let qos = next().parse().unwrap();
    let retain = next() == "1";
    let topic = next().to_string();
    let payload = unhex(next());
    SubMsg {
        qos,
        retain,
        topic,
        payload,
    }
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Every byte value once: the binary payload of the tests.
pub fn all_bytes() -> Vec<u8> {
    (0..=255u8).collect()
}

/// A client id unique to this test and process.
pub fn client_id(test: &str) -> String {
    format!("eng-test-{test}-{}", std::process::id())
}

/// The protocol the engine tests speak: MQTT_PG_PROTOCOL=5 runs them all on MQTT 5.
pub fn protocol() -> engine::Protocol {
    match std::env::var("MQTT_PG_PROTOCOL").as_deref() {
        Ok("5") => engine::Protocol::V5,
        _ => engine::Protocol::V311,
    }
}

/// How mosquitto's log names the protocol of a connection: "p2" (3.1.1) or "p5".
pub fn proto_tag() -> &'static str {
    match protocol() {
        engine::Protocol::V311 => "p2",
        engine::Protocol::V5 => "p5",
    }
}

/// The configuration the tests use: id `id`, the broker's port, a unique client id.
pub fn config(id: i32, port: u16, test: &str) -> BrokerConfig {
    BrokerConfig {
        id,
        name: format!("broker-{id}"),
        host: "127.0.0.1".into(),
        port,
        username: None,
        password: None,
        client_id: client_id(test),
        keepalive: Duration::from_secs(30),
        clean_session: true,
        protocol: protocol(),
        session_expiry: None,
        receive_maximum: None,
        max_packet_size: engine::MQTT_MAX_PACKET,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        max_inflight: 100,
        tls: None,
        will: None,
        birth_payload: None,
    }
}

pub fn out(outbox_id: i64, topic: &str, payload: &[u8], qos: u8) -> OutMessage {
    OutMessage {
        outbox_id,
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain: false,
        properties: None,
    }
}

pub fn subs(filters: &[(&str, u8)]) -> BTreeMap<String, u8> {
    filters.iter().map(|(f, q)| (f.to_string(), *q)).collect()
}

/// One line per event, payloads shortened, for failure messages.
pub fn describe(events: &[Event]) -> String {
    let mut s = String::new();
    let skip = events.len().saturating_sub(60);
    if skip > 0 {
        let _ = writeln!(s, "  ... {skip} earlier events ...");
    }
    for e in &events[skip..] {
        let _ = writeln!(s, "  {}", describe_one(e));
    }
    s
}

/// A timeline of events (as `Harness::collect_for` gives it), one line each with its time
/// since `t0`: what a failing timing test prints.
pub fn show_timeline(t0: Instant, timeline: &[(Instant, Event)]) -> String {
    timeline
        .iter()
        .map(|(t, e)| {
            format!(
                "  +{}ms {}",
                t.duration_since(t0).as_millis(),
                describe_one(e)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn describe_one(e: &Event) -> String {
    match e {
        Event::Received(m) => {
            let head: Vec<u8> = m.payload.iter().take(24).copied().collect();
            format!(
                "Received {{ broker_id: {}, topic: {:?}, payload: {} bytes {:?}, qos: {}, retain: {}, pkid: {:?} }}",
                m.broker_id,
                m.topic,
                m.payload.len(),
                String::from_utf8_lossy(&head),
                m.qos,
                m.retain,
                m.pkid
            )
        }
        other => format!("{other:?}"),
    }
}

/// The engine plus what the tests need around it: a wake callback that counts and notifies a
/// condvar, and a backlog of drained events not yet looked at.
pub struct Harness {
    engine: Option<Engine>,
    signal: Arc<(Mutex<u64>, Condvar)>,
    backlog: VecDeque<(Instant, Event)>,
    /// Events taken per `drain_events` call.
    pub batch: usize,
    /// Epoch of the latest `Connected` seen per broker, as the worker tracks it.
    epochs: std::collections::HashMap<i32, u64>,
    /// Acknowledge every QoS 1/2 message as soon as it is drained, as the worker does after
    /// its commit (on by default; tests about acknowledgements turn it off and call
    /// [`Harness::ack`] themselves).
    pub auto_ack: bool,
}

impl Harness {
    pub fn new(event_capacity: usize) -> Harness {
        Self::with_limit(event_capacity, engine::DEFAULT_BUFFER_BYTES)
    }

    /// An engine started with [`Engine::start_with_limit`].
    pub fn with_limit(event_capacity: usize, buffer_bytes: usize) -> Harness {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let s = signal.clone();
        let wake = Arc::new(move || {
            let mut n = s.0.lock().unwrap();
            *n += 1;
            s.1.notify_all();
        });
        let engine =
            Engine::start_with_limit(2, event_capacity, buffer_bytes, wake).expect("start engine");
        Harness {
            engine: Some(engine),
            signal,
            backlog: VecDeque::new(),
            batch: 256,
            epochs: std::collections::HashMap::new(),
            auto_ack: true,
        }
    }

    /// Acknowledge these messages (QoS 0 ones have nothing to acknowledge).
    pub fn ack<'a>(&mut self, msgs: impl IntoIterator<Item = &'a InMessage>) {
        let acks: Vec<Ack> = msgs.into_iter().filter_map(|m| m.ack).collect();
        if !acks.is_empty() {
            self.engine().ack(acks);
        }
    }

    /// Drain directly (not through the backlog), acknowledging what comes out if `auto_ack`.
    pub fn drain_within(&mut self, max: usize, max_bytes: usize) -> Vec<Event> {
        let mut got = Vec::new();
        self.engine().drain_events_within(&mut got, max, max_bytes);
        if self.auto_ack {
            self.ack(received(&got));
        }
        got
    }

    pub fn engine(&mut self) -> &mut Engine {
        self.engine.as_mut().expect("engine already shut down")
    }

    /// Take the engine out (to call `shutdown`).
    pub fn take_engine(&mut self) -> Engine {
        self.engine.take().expect("engine already shut down")
    }

    /// Wait until `n` rows have an outcome (Delivered or Rejected), then keep listening briefly
    /// so that an extra, wrong outcome would be seen too; returns every event.
    pub fn wait_outcomes(&mut self, n: usize) -> Vec<Event> {
        let mut events = self.wait_until(&format!("{n} Delivered or Rejected"), WAIT, |s| {
            delivered(s).len()
                + s.iter()
                    .filter(|e| matches!(e, Event::Rejected { .. }))
                    .count()
                >= n
        });
        events.extend(
            self.collect_for(Duration::from_millis(300))
                .into_iter()
                .map(|(_, e)| e),
        );
        events
    }

    /// Publish on the broker's connection as last seen (what the worker does).
    pub fn publish(&mut self, broker_id: i32, msgs: Vec<OutMessage>) -> bool {
        let epoch = self.epochs.get(&broker_id).copied().unwrap_or(0);
        self.engine().publish(broker_id, epoch, msgs)
    }

    /// The epoch of the latest `Connected` seen for a broker.
    pub fn epoch(&self, broker_id: i32) -> u64 {
        self.epochs.get(&broker_id).copied().unwrap_or(0)
    }

    /// How often the engine called `wake`.
    pub fn wakes(&self) -> u64 {
        *self.signal.0.lock().unwrap()
    }

    /// Drain into the backlog, waiting (for a wake, or at most 100 ms at a time as a safety net)
    /// until something arrives or `until` passes. False if nothing arrived.
    fn fill(&mut self, until: Instant) -> bool {
        loop {
            let seen = self.wakes();
            let mut got = Vec::new();
            let batch = self.batch;
            self.engine().drain_events(&mut got, batch);
            if !got.is_empty() {
                if self.auto_ack {
                    self.ack(received(&got));
                }
                for e in &got {
                    if let Event::Connected {
                        broker_id, epoch, ..
                    } = e
                    {
                        self.epochs.insert(*broker_id, *epoch);
                    }
                }
                let now = Instant::now();
                self.backlog.extend(got.into_iter().map(|e| (now, e)));
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            let wait = (until - now).min(Duration::from_millis(100));
            let guard = self.signal.0.lock().unwrap();
            let _ = self
                .signal
                .1
                .wait_timeout_while(guard, wait, |n| *n == seen)
                .unwrap();
        }
    }

    /// The next event with the time it was drained, or None once `until` passes.
    pub fn next_timed(&mut self, until: Instant) -> Option<(Instant, Event)> {
        if self.backlog.is_empty() && !self.fill(until) {
            return None;
        }
        self.backlog.pop_front()
    }

    /// Consume events until `done` holds for everything seen so far (checked after each
    /// event); returns them all. Panics after `timeout` with a list of what was seen.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        let until = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            match self.next_timed(until) {
                Some((_, e)) => {
                    seen.push(e);
                    if done(&seen) {
                        return seen;
                    }
                }
                None => panic!(
                    "timed out after {timeout:?} waiting for {what}; saw {} events:\n{}",
                    seen.len(),
                    describe(&seen)
                ),
            }
        }
    }

    /// Consume events up to and including the first one matching `pred`.
    pub fn wait_for(&mut self, what: &str, mut pred: impl FnMut(&Event) -> bool) -> Vec<Event> {
        self.wait_until(what, WAIT, |seen| pred(seen.last().unwrap()))
    }

    /// Everything that arrives during `dur`, with drain times.
    pub fn collect_for(&mut self, dur: Duration) -> Vec<(Instant, Event)> {
        let until = Instant::now() + dur;
        let mut v = Vec::new();
        while let Some(te) = self.next_timed(until) {
            v.push(te);
            if Instant::now() >= until {
                break;
            }
        }
        v
    }

    /// Connect broker `cfg` (must be the only one) and wait for Connected.
    pub fn connect(&mut self, cfg: BrokerConfig) -> Vec<Event> {
        let id = cfg.id;
        let restarted = self.engine().set_brokers(vec![cfg]);
        assert_eq!(restarted, vec![id]);
        self.wait_for("Connected", |e| matches!(e, Event::Connected { .. }))
    }

    /// Set the broker's subscriptions and wait until the broker has acknowledged a new
    /// SUBSCRIBE from `client_id` (seen in its log).
    pub fn subscribe(&mut self, broker: &Broker, id: i32, client_id: &str, filters: &[(&str, u8)]) {
        let needle = format!("Sending SUBACK to {client_id}");
        let before = broker.log_count(&needle);
        self.engine().set_subscriptions(id, subs(filters));
        broker.wait_log(&needle, before + 1);
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(e) = self.engine.take() {
            e.shutdown(Duration::from_secs(2));
        }
    }
}

/// The `Received` messages among `events`.
pub fn received(events: &[Event]) -> Vec<&engine::InMessage> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Received(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// (outbox id, pkid) of the `Delivered` events among `events`.
pub fn delivered(events: &[Event]) -> Vec<(i64, Option<u16>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Delivered {
                outbox_id, pkid, ..
            } => Some((*outbox_id, *pkid)),
            _ => None,
        })
        .collect()
}

/// Panics if any event is a connection loss, warning or rejection.
pub fn assert_no_trouble(events: &[Event]) {
    for e in events {
        assert!(
            !matches!(
                e,
                Event::ConnectionLost { .. } | Event::Warning { .. } | Event::Rejected { .. }
            ),
            "unexpected {}; all events:\n{}",
            describe_one(e),
            describe(events)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Just enough MQTT 3.1.1 for scripted brokers and a packet-aware proxy.
// ---------------------------------------------------------------------------------------------

/// One MQTT 3.1.1 packet as the scripted broker and the proxy see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect {
        client_id: String,
        clean_session: bool,
        /// The will flag: the broker is to publish a Last Will for this client.
        will: bool,
        /// The user name flag: credentials follow.
        login: bool,
    },
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish {
        dup: bool,
        qos: u8,
        retain: bool,
        topic: String,
        pkid: Option<u16>,
        payload: Vec<u8>,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe(u16),
    PingReq,
    PingResp,
    Disconnect,
    Other(u8),
}

/// A packet on the wire: its first byte and its body (after the remaining length).
#[derive(Debug, Clone)]
pub struct RawPacket {
    pub header: u8,
    pub body: Vec<u8>,
}

impl RawPacket {
    pub fn new(header: u8, body: Vec<u8>) -> RawPacket {
        RawPacket { header, body }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![self.header];
        let mut len = self.body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            v.push(b);
            if len == 0 {
                break;
            }
        }
        v.extend_from_slice(&self.body);
        v
    }

    /// Parse as the protocol the tests speak ([`protocol`]): MQTT 5 adds a properties block
    /// to CONNECT, CONNACK, PUBLISH and SUBSCRIBE, which is skipped here.
    pub fn parse(&self) -> Packet {
        self.parse_as(protocol() == engine::Protocol::V5)
    }

    /// Parse as MQTT 5 (`v5`) or 3.1.1. A CONNECT says its own version.
    pub fn parse_as(&self, v5: bool) -> Packet {
        let b = &self.body;
        let v5 = if self.header >> 4 == 1 {
            let name_len = usize::from(u16::from_be_bytes([b[0], b[1]]));
            b[2 + name_len] == 5
        } else {
            v5
        };
        // A variable byte integer (a properties length) at `i`: its value and width.
        let varint_at = |i: usize| -> (usize, usize) {
            let (mut n, mut w) = (0usize, 0usize);
            loop {
                let byte = b[i + w];
                n |= usize::from(byte & 0x7f) << (7 * w);
                w += 1;
                if byte & 0x80 == 0 {
                    return (n, w);
                }
            }
        };
        let skip_props = |i: usize| -> usize {
            if v5 {
                let (n, w) = varint_at(i);
                i + w + n
            } else {
                i
            }
        };
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let str_at = |i: usize| -> (String, usize) {
            let n = usize::from(u16_at(i));
            (
                String::from_utf8_lossy(&b[i + 2..i + 2 + n]).into_owned(),
                i + 2 + n,
            )
        };
        match self.header >> 4 {
            1 => {
                // "MQTT", level, flags, keepalive, client id
                let (_proto, i) = str_at(0);
                let flags = b[i + 1];
                let (client_id, _) = str_at(skip_props(i + 4));
                Packet::Connect {
                    client_id,
                    clean_session: flags & 0x02 != 0,
                    will: flags & 0x04 != 0,
                    login: flags & 0x80 != 0,
                }
            }
            2 => Packet::ConnAck {
                session_present: b[0] & 1 == 1,
                code: b[1],
            },
            3 => {
                let qos = (self.header >> 1) & 3;
                let (topic, mut i) = str_at(0);
                let pkid = (qos > 0).then(|| {
                    let p = u16_at(i);
                    i += 2;
                    p
                });
                i = skip_props(i);
                Packet::Publish {
                    dup: self.header & 0x08 != 0,
                    qos,
                    retain: self.header & 1 == 1,
                    topic,
                    pkid,
                    payload: b[i..].to_vec(),
                }
            }
            4 => Packet::PubAck(u16_at(0)),
            5 => Packet::PubRec(u16_at(0)),
            6 => Packet::PubRel(u16_at(0)),
            7 => Packet::PubComp(u16_at(0)),
            8 => {
                let pkid = u16_at(0);
                let mut i = skip_props(2);
                let mut filters = Vec::new();
                while i < b.len() {
                    let (f, j) = str_at(i);
                    filters.push((f, b[j]));
                    i = j + 1;
                }
                Packet::Subscribe { pkid, filters }
            }
            10 => Packet::Unsubscribe(u16_at(0)),
            12 => Packet::PingReq,
            13 => Packet::PingResp,
            14 => Packet::Disconnect,
            t => Packet::Other(t),
        }
    }
}

/// Read one packet. `Ok(None)` if the first byte does not come within the stream's read
/// timeout; the rest of a packet that has started is always read in full.
pub fn read_raw(stream: &mut TcpStream) -> std::io::Result<Option<RawPacket>> {
    use std::io::Read as _;
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(0) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ))
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    let header = b[0];
    let timeout = stream.read_timeout()?;
    stream.set_read_timeout(Some(WAIT))?;
    let result = (|| {
        let (mut len, mut shift) = (0usize, 0);
        loop {
            stream.read_exact(&mut b)?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        Ok(RawPacket { header, body })
    })();
    stream.set_read_timeout(timeout)?;
    result.map(Some)
}

/// One accepted connection of a [`ScriptedBroker`]; the test plays the broker's part.
pub struct ScriptedConn {
    stream: TcpStream,
    /// Every packet read from the client, in order.
    pub seen: Vec<Packet>,
    /// The same packets as they came on the wire.
    pub raw_seen: Vec<RawPacket>,
    /// The client's CONNECT said MQTT 5.
    pub v5: bool,
    /// Answer the client's PUBRELs with PUBCOMP by itself, as any broker does (the engine
    /// releases every QoS 2 packet id it may use when it resumes a session), and keep them
    /// out of what [`ScriptedConn::read`] returns. On by default.
    pub answer_pubrel: bool,
    /// Packet ids of the PUBRELs answered that way.
    pub released: Vec<u16>,
}

impl ScriptedConn {
    /// The next packet from the client, or None if nothing comes within `timeout`. Panics if
    /// the client closed the connection.
    pub fn read(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A zero read timeout means "block for ever" to the socket.
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match read_raw(&mut self.stream) {
                Ok(Some(raw)) => {
                    if raw.header >> 4 == 1 {
                        let name_len = usize::from(u16::from_be_bytes([raw.body[0], raw.body[1]]));
                        self.v5 = raw.body[2 + name_len] == 5;
                    }
                    let p = raw.parse_as(self.v5);
                    self.seen.push(p.clone());
                    self.raw_seen.push(raw);
                    match p {
                        Packet::PubRel(id) if self.answer_pubrel => {
                            self.released.push(id);
                            self.ack(0x70, id);
                        }
                        p => return Some(p),
                    }
                }
                Ok(None) => return None,
                Err(e) => panic!(
                    "scripted broker: reading from the client failed ({e}); packets so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// The next packet, which must come within [`WAIT`].
    pub fn expect(&mut self, what: &str) -> Packet {
        self.read(WAIT).unwrap_or_else(|| {
            panic!(
                "scripted broker: no {what} from the client within {WAIT:?}; packets so far: {:?}",
                self.seen
            )
        })
    }

    pub fn send(&mut self, raw: RawPacket) {
        self.stream
            .write_all(&raw.encode())
            .expect("scripted broker write");
        self.stream.flush().unwrap();
    }

    pub fn connack(&mut self, session_present: bool) {
        let mut body = vec![u8::from(session_present), 0];
        if self.v5 {
            body.push(0); // no properties
        }
        self.send(RawPacket::new(0x20, body));
    }

    /// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) for `pkid`.
    pub fn ack(&mut self, header: u8, pkid: u16) {
        self.send(RawPacket::new(header, pkid.to_be_bytes().to_vec()));
    }

    /// Close the connection (both directions).
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A listening socket the test plays an MQTT broker on, one [`ScriptedConn`] at a time.
pub struct ScriptedBroker {
    pub port: u16,
    listener: TcpListener,
}

impl ScriptedBroker {
    pub fn start() -> ScriptedBroker {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind scripted broker");
        listener.set_nonblocking(true).unwrap();
        ScriptedBroker {
            port: listener.local_addr().unwrap().port(),
            listener,
        }
    }

    /// The next connection, if one comes within `timeout`.
    pub fn accept(&self, timeout: Duration) -> Option<ScriptedConn> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_nodelay(true).unwrap();
                    return Some(ScriptedConn {
                        stream,
                        seen: Vec::new(),
                        raw_seen: Vec::new(),
                        v5: false,
                        answer_pubrel: true,
                        released: Vec::new(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("scripted broker accept: {e}"),
            }
        }
    }

    /// Accept the next connection and read its CONNECT (returned with the connection).
    pub fn accept_connect(&self) -> (ScriptedConn, Packet) {
        let mut c = self
            .accept(WAIT)
            .unwrap_or_else(|| panic!("no connection to the scripted broker within {WAIT:?}"));
        let p = c.expect("CONNECT");
        assert!(
            matches!(p, Packet::Connect { .. }),
            "expected CONNECT, got {p:?}"
        );
        (c, p)
    }
}

/// What the proxy does with a packet from the broker to the client.
pub type ProxyRule = dyn Fn(&Packet) -> bool + Send + Sync;

/// A TCP proxy between the engine and a broker that reads the broker's packets and, when
/// `cut` says so, drops that packet and closes both sides instead (at most `cuts` times).
/// Everything else is passed through unchanged. [`Proxy::relay`] passes bytes without reading
/// them (for TLS, which the packet reader cannot see into). Its threads stop (and are joined)
/// on drop.
pub struct Proxy {
    pub port: u16,
    /// Connections cut so far.
    pub cut_count: Arc<AtomicUsize>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    accept_thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(upstream: u16, cuts: usize, cut: Box<ProxyRule>) -> Proxy {
        Proxy::with_rule(upstream, cuts, Some(Arc::from(cut)))
    }

    /// A byte-for-byte relay that only counts the connections made through it.
    pub fn relay(upstream: u16) -> Proxy {
        Proxy::with_rule(upstream, 0, None)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Acquire)
    }

    fn with_rule(upstream: u16, cuts: usize, cut: Option<Arc<ProxyRule>>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
        let cut_count = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (st, so, th, cc, acc) = (
            stop.clone(),
            sockets.clone(),
            threads.clone(),
            cut_count.clone(),
            accepted.clone(),
        );
        let accept_thread = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                };
                acc.fetch_add(1, Ordering::AcqRel);
                client.set_nonblocking(false).unwrap();
                client.set_nodelay(true).unwrap();
                let server = match TcpStream::connect(("127.0.0.1", upstream)) {
                    Ok(s) => s,
                    Err(_) => continue, // broker down: the client sees the connection close
                };
                server.set_nodelay(true).unwrap();
                {
                    let mut v = so.lock().unwrap();
                    v.push(client.try_clone().unwrap());
                    v.push(server.try_clone().unwrap());
                }
                // Client to broker: bytes as they come.
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Both);
                    let _ = c_in.shutdown(std::net::Shutdown::Both);
                });
                // Broker to client: packet by packet, through the rule (bytes as they come
                // for a plain relay).
                let (mut s_in, mut c_out) = (server, client);
                let (rule, cc) = (cut.clone(), cc.clone());
                let down = std::thread::spawn(move || {
                    let Some(rule) = rule else {
                        let _ = std::io::copy(&mut s_in, &mut c_out);
                        let _ = s_in.shutdown(std::net::Shutdown::Both);
                        let _ = c_out.shutdown(std::net::Shutdown::Both);
                        return;
                    };
                    loop {
                        let raw = match read_raw(&mut s_in) {
                            Ok(Some(r)) => r,
                            Ok(None) => continue,
                            Err(_) => break,
                        };
                        let p = raw.parse();
                        if rule(&p)
                            && cc
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                    (n < cuts).then_some(n + 1)
                                })
                                .is_ok()
                        {
                            break;
                        }
                        if c_out.write_all(&raw.encode()).is_err() {
                            break;
                        }
                    }
                    let _ = s_in.shutdown(std::net::Shutdown::Both);
                    let _ = c_out.shutdown(std::net::Shutdown::Both);
                });
                let mut t = th.lock().unwrap();
                t.push(up);
                t.push(down);
            }
        });
        Proxy {
            port,
            cut_count,
            accepted,
            stop,
            sockets,
            threads,
            accept_thread: Some(accept_thread),
        }
    }
}

impl Proxy {
    /// Close every connection passing through now (both sides); new ones are still accepted.
    pub fn cut_all(&self) {
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        for s in self.sockets.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

/// Bytes the one client connected to the local TCP port `port` (the engine, in the tests
/// that use this) has read off its socket so far: what its socket received minus what still
/// waits there unread (`ss -tni`: `bytes_received` less Recv-Q). rumqttc reads in chunks, so
/// this includes up to one read buffer (8 KiB) of packets it has not parsed yet.
pub fn client_bytes_read(port: u16) -> usize {
    let out = Command::new("ss")
        .args(["-tnHi", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss failed: {:?}", out);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let tokens: Vec<&str> = text.split_whitespace().collect();
    // Each socket: "Recv-Q Send-Q local peer" followed by its "key:value" info tokens.
    let recv_q: Vec<usize> = tokens
        .windows(4)
        .filter(|w| {
            w[0].parse::<usize>().is_ok()
                && w[1].parse::<usize>().is_ok()
                && w[3].ends_with(&format!(":{port}"))
        })
        .map(|w| w[0].parse().unwrap())
        .collect();
    let received: Vec<usize> = tokens
        .iter()
        .filter_map(|t| t.strip_prefix("bytes_received:"))
        .map(|v| v.parse().unwrap())
        .collect();
    assert!(
        recv_q.len() == 1 && received.len() == 1,
        "expected exactly one client connected to port {port}; ss says:\n{text}"
    );
    received[0] - recv_q[0]
}

/// Wait until `f()` returns the same value on consecutive checks `quiet` apart, and return it:
/// for quantities that settle (a blocked reader's socket queue).
pub fn settled<T: PartialEq + Copy + std::fmt::Debug>(
    what: &str,
    quiet: Duration,
    mut f: impl FnMut() -> T,
) -> T {
    let deadline = Instant::now() + WAIT;
    let mut last = f();
    loop {
        std::thread::sleep(quiet);
        let now = f();
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not settle within {WAIT:?} (last {now:?})"
        );
        last = now;
    }
}
