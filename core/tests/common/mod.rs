//! Test harness for the engine integration tests: a real mosquitto per test (on a free
//! loopback port, killed on drop), mosquitto_pub / mosquitto_sub helpers, and an engine wrapper
//! whose waits poll `drain_events` against a deadline and report everything they saw on failure.

#![allow(dead_code)]

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

use mqtt_pg_core::engine::{self, BrokerConfig, Engine, Event, OutMessage};

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
}

impl Broker {
    /// Start a broker on a free port (retrying with another port if the one picked was taken
    /// in the meantime).
    pub fn start() -> Broker {
        let dir = temp_dir("mosq");
        let mut last_err = String::new();
        for _ in 0..5 {
            let mut b = Broker {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                generation: 0,
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
                 log_type all\n",
                port = self.port,
                log = self.log_path().display()
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
        use std::io::Read as _;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut b = [0u8; 1];
        stream.read_exact(&mut b)?;
        if b[0] != 0x10 {
            return Err(std::io::Error::other(format!("not a CONNECT: {:#x}", b[0])));
        }
        // Remaining length: a variable byte integer.
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
        stream.write_all(&[0x20, 0x02, 0x00, 0x00])?;
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

/// Run mosquitto_pub against the broker with `args`, feeding `stdin` if given; panics unless it
/// succeeds.
pub fn mosquitto_pub(broker: &Broker, args: &[&str], stdin: Option<&[u8]>) {
    let mut child = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
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
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
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
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
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
        max_packet_size: engine::MQTT_MAX_PACKET,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        max_inflight: 100,
    }
}

pub fn out(outbox_id: i64, topic: &str, payload: &[u8], qos: u8) -> OutMessage {
    OutMessage {
        outbox_id,
        topic: topic.into(),
        payload: payload.to_vec(),
        qos,
        retain: false,
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
}

impl Harness {
    pub fn new(event_capacity: usize) -> Harness {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let s = signal.clone();
        let wake = Arc::new(move || {
            let mut n = s.0.lock().unwrap();
            *n += 1;
            s.1.notify_all();
        });
        let engine = Engine::start(2, event_capacity, wake).expect("start engine");
        Harness {
            engine: Some(engine),
            signal,
            backlog: VecDeque::new(),
            batch: 256,
            epochs: std::collections::HashMap::new(),
        }
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
