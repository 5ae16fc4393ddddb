//! Hostile input on the ingest path: a fake broker on a loopback port feeds the engine a few
//! thousand well-formed PUBLISH packets with odd topics and payloads, mixed with packets a
//! broker should never send, and ends its connections with malformed, truncated or garbage
//! packets. Everything random comes from one fixed seed (override it with `HOSTILE_SEED=<n>`),
//! so a failure reproduces. Run with `cargo test -p mqtt_pg_core --test hostile`.
//!
//! What must hold: the engine never panics (no `Failed`); every malformed packet ends its
//! connection with one `ConnectionLost` whose error says what went wrong, after which the engine
//! reconnects; every well-formed PUBLISH with a UTF-8 topic arrives as exactly one `Received`
//! with its exact topic, payload, QoS, retain flag and packet id, in order, while nothing that
//! follows a malformed packet on the same connection is taken for a message; a PUBLISH whose
//! topic is not UTF-8 is never delivered (MQTT 3.1.1 1.5.3: the receiver closes the
//! connection), and says so. The engine acknowledges only what it delivered, with the right
//! packet type.
//!
//! Topics that are valid UTF-8 but not valid MQTT topic names (empty, NUL, wildcards) are
//! delivered as they came: the worker dead-letters the ones text cannot hold and stores the
//! rest (see `src/worker/store.rs`). This test pins that down.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{config, describe, describe_one, Harness};
use mqtt_pg_core::engine::Event;

/// Connections the fake broker plays, one after the other.
const SESSIONS: usize = FATAL + OPENINGS + 14;
/// Mean number of well-formed PUBLISH packets per accepted connection.
const MEAN_PUBLISHES: u64 = 80;
/// Longest topic MQTT can carry.
const MAX_TOPIC: usize = 65_535;
const DEFAULT_SEED: u64 = 0x686f_7374_696c_6521;
/// Deadline for the whole exchange (it takes about a second).
const DEADLINE: Duration = Duration::from_secs(60);
/// How long the fake broker waits for the engine to do its part (send CONNECT, SUBSCRIBE,
/// close a broken connection).
const BROKER_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Randomness: splitmix64, seeded once, so every run sends the same bytes.
// ---------------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Between `lo` and `hi` random bytes.
    fn some_bytes(&mut self, lo: usize, hi: usize) -> Vec<u8> {
        let n = self.range(lo, hi);
        self.bytes(n)
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT 3.1.1 on the wire, written by hand so that it can be written wrong on purpose.
// ---------------------------------------------------------------------------------------------

fn remaining_length(mut len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        v.push(b);
        if len == 0 {
            return v;
        }
    }
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![header];
    v.extend(remaining_length(body.len()));
    v.extend_from_slice(body);
    v
}

/// A PUBLISH with any topic bytes (valid UTF-8 or not).
fn publish_bytes(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    retain: bool,
    dup: bool,
    pkid: u16,
) -> Vec<u8> {
    let header = 0x30 | (u8::from(dup) << 3) | (qos << 1) | u8::from(retain);
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(header, &body)
}

/// A two-byte-body packet: PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70, UNSUBACK 0xB0.
fn ack(header: u8, pkid: u16) -> Vec<u8> {
    packet(header, &pkid.to_be_bytes())
}

fn suback(pkid: u16, codes: &[u8]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.extend_from_slice(codes);
    packet(0x90, &body)
}

/// One packet read from the engine: its type nibble and its packet id (if it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FromClient {
    kind: u8,
    pkid: Option<u16>,
}

/// Read one packet from the engine; None on a clean end of stream before its first byte.
fn read_packet(s: &mut TcpStream) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut b = [0u8; 1];
    if s.read(&mut b)? == 0 {
        return Ok(None);
    }
    let header = b[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Some((header, body)))
}

fn summarize(header: u8, body: &[u8]) -> FromClient {
    let kind = header >> 4;
    let pkid = match kind {
        // PUBACK, PUBREC, PUBREL, PUBCOMP, SUBSCRIBE, UNSUBSCRIBE
        4..=8 | 10 if body.len() >= 2 => Some(u16::from_be_bytes([body[0], body[1]])),
        _ => None,
    };
    FromClient { kind, pkid }
}

// ---------------------------------------------------------------------------------------------
// The script: what each connection sends, and what the engine must make of it.
// ---------------------------------------------------------------------------------------------

/// A message as the engine must deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    topic: String,
    payload: Vec<u8>,
    qos: u8,
    retain: bool,
    pkid: Option<u16>,
}

/// How a connection starts.
enum Opening {
    /// CONNACK accepted, then SUBACK for the engine's SUBSCRIBE (0x80 = refused, which the
    /// engine reports as a warning).
    Accept { suback_code: u8 },
    /// Something other than an acceptable CONNACK, then the end of the stream. The engine must
    /// report the failed attempt and try again.
    Hostile(Vec<u8>),
}

struct Session {
    opening: Opening,
    /// Bytes after the SUBACK: packets, then the ending.
    stream: Vec<u8>,
    /// Well-formed PUBLISH packets with UTF-8 topics, in order.
    expected: Vec<Expected>,
    /// Warnings the engine owes (a refused subscription, a SUBACK refusing something).
    warnings: usize,
    /// What ends the connection, for messages.
    ending: String,
    /// The connection ends with nothing wrong, just the end of the stream.
    clean: bool,
    /// Text the error of the `ConnectionLost` must contain (in lower case), where rumqttc's
    /// wording is worth pinning down.
    error_has: Option<&'static str>,
    /// The connection ends with a second CONNACK. rumqttc rejects it, but queues its event
    /// first, and the engine replays queued events when a connection ends (`take_buffered`):
    /// a spurious `Connected` (with a new epoch) comes just before the `ConnectionLost`.
    /// Tolerated here as a known engine issue; drop this once the engine skips it.
    replays_connack: bool,
    /// Packet ids (with the PUBLISH QoS) the engine may acknowledge on this connection.
    acks_allowed: BTreeMap<u16, u8>,
    /// Packet ids of the PUBRELs sent, which the engine must answer with PUBCOMP.
    released: Vec<u16>,
}

/// Topic levels that make trouble: empty, '$', wildcards, NUL, a BOM (MQTT: must not be
/// stripped), control characters, a noncharacter, the highest code point, multi-byte text.
const LEVELS: &[&str] = &[
    "",
    "a",
    "b",
    "plant",
    "line1",
    "$SYS",
    "$",
    "$share",
    "+",
    "#",
    "a+b",
    "x#",
    "\u{0}",
    "x\u{0}y",
    " ",
    "\u{e9}t\u{e9}",
    "\u{1F600}",
    "\u{FEFF}",
    "\u{1}\u{1f}",
    "\u{7f}\u{9f}",
    "\u{FFFF}",
    "\u{10FFFF}",
    "\u{4E2D}\u{6587}",
];

/// A random topic that is valid UTF-8 (and often not a valid MQTT topic name).
fn random_topic(rng: &mut Rng) -> String {
    if rng.chance(1) {
        return long_topic(rng);
    }
    let levels = rng.range(0, 6);
    if levels == 0 {
        return String::new();
    }
    (0..levels)
        .map(|_| *rng.pick(LEVELS))
        .collect::<Vec<_>>()
        .join("/")
}

/// A topic of exactly 65,535 bytes, of one- to four-byte characters.
fn long_topic(rng: &mut Rng) -> String {
    let fill = *rng.pick(&["a", "\u{e9}", "\u{20AC}", "\u{1F600}", "/", "+"]);
    let mut t = String::from("long/");
    while t.len() + fill.len() <= MAX_TOPIC {
        t.push_str(fill);
    }
    while t.len() < MAX_TOPIC {
        t.push('z');
    }
    t
}

fn random_payload(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(100) {
        0..=9 => 0,
        10..=89 => rng.range(1, 300),
        90..=98 => rng.range(300, 5_000),
        _ => rng.range(5_000, 100_000),
    };
    rng.bytes(n)
}

/// Byte sequences that are not UTF-8: a stray continuation byte, an overlong NUL, a UTF-16
/// surrogate, 0xFF, a character cut short, a code point above U+10FFFF.
const NOT_UTF8: [&[u8]; 6] = [
    b"\x80",
    b"\xC0\x80",
    b"\xED\xA0\x80",
    b"\xFF",
    b"\xE2\x82",
    b"\xF4\x90\x80\x80",
];

/// A topic with one of [`NOT_UTF8`] in it, between random ASCII.
fn invalid_utf8_topic(rng: &mut Rng, bad: &[u8]) -> Vec<u8> {
    let mut t = b"plant/".to_vec();
    t.extend(rng.some_bytes(0, 8).iter().map(|b| b & 0x3f | 0x40));
    t.extend_from_slice(bad);
    if rng.chance(50) {
        t.extend_from_slice(b"/temperature");
    }
    t
}

/// Packets that must end the connection (each is sent once per run): the packet, what it is,
/// and what the error must mention.
const FATAL: usize = 28;

fn fatal_packet(kind: usize, rng: &mut Rng, pkid: u16) -> (Vec<u8>, String, Option<&'static str>) {
    let payload = rng.some_bytes(0, 40);
    let fixed = |p: Vec<u8>, what: &str, has: &'static str| (p, what.to_string(), Some(has));
    match kind {
        0..=5 => {
            let qos = (kind % 3) as u8;
            let topic = invalid_utf8_topic(rng, NOT_UTF8[kind]);
            let p = publish_bytes(&topic, &payload, qos, false, false, pkid);
            (
                p,
                format!("PUBLISH QoS {qos} with topic {topic:?}"),
                Some("utf-8"),
            )
        }
        6 => fixed(vec![0x00, 0x00], "packet type 0", "invalid packet type"),
        7 => fixed(vec![0xF0, 0x00], "packet type 15", "invalid packet type"),
        8 => fixed(
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            "a remaining length of five bytes",
            "malformed remaining length",
        ),
        9 => {
            let mut p = publish_bytes(b"a/b", &payload, 1, false, false, pkid);
            p[0] |= 0x06;
            fixed(p, "PUBLISH QoS 3", "invalid qos")
        }
        10 => fixed(
            publish_bytes(b"a/b", &payload, 1 + (pkid % 2) as u8, false, false, 0),
            "PUBLISH with packet id 0",
            "packet id zero",
        ),
        11 => fixed(
            packet(0x30, &[0x00, 0x10, b'a']),
            "PUBLISH whose topic runs past the packet",
            "boundary",
        ),
        12 => fixed(
            packet(0x32, &[0x00, 0x01, b'a']),
            "QoS 1 PUBLISH without a packet id",
            "malformed packet",
        ),
        13 => fixed(vec![0x40, 0x00], "empty PUBACK", "payload required"),
        14 => fixed(
            ack(0x40, 30_000 + pkid),
            "unsolicited PUBACK",
            "unsolicited",
        ),
        15 => fixed(
            ack(0x50, 30_000 + pkid),
            "unsolicited PUBREC",
            "unsolicited",
        ),
        16 => fixed(
            ack(0x70, 30_000 + pkid),
            "unsolicited PUBCOMP",
            "unsolicited",
        ),
        17 => fixed(
            suback(1, &[0x03]),
            "SUBACK with return code 3",
            "subscribe reason code",
        ),
        18 => fixed(
            suback(7, &[]),
            "SUBACK without return codes",
            "malformed packet",
        ),
        19 => fixed(
            vec![0x20, 0x02, 0x00, 0x00],
            "second CONNACK",
            "wrong packet",
        ),
        20 => fixed(vec![0xC0, 0x00], "PINGREQ from the broker", "wrong packet"),
        21 => fixed(
            vec![0xE0, 0x00],
            "DISCONNECT from the broker",
            "wrong packet",
        ),
        22 => {
            let mut body = 9u16.to_be_bytes().to_vec();
            body.extend([0x00, 0x03, b'a', b'/', b'#', 0x01]);
            fixed(
                packet(0x82, &body),
                "SUBSCRIBE from the broker",
                "wrong packet",
            )
        }
        23 => {
            // CONNECT: "MQTT", level 4, clean session, keepalive 30, client id "evil".
            let body = [
                0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 4, b'e', b'v', b'i', b'l',
            ];
            fixed(
                packet(0x10, &body),
                "CONNECT from the broker",
                "wrong packet",
            )
        }
        _ => {
            // Garbage: a packet type that does not exist, then random bytes (the "packet" may
            // or may not be complete: either way it must end the connection).
            let mut p = vec![[0x00u8, 0x0F, 0xF0, 0xFF][kind - 24]];
            p.extend(rng.some_bytes(1, 64));
            let what = format!("garbage {:02x?}", &p[..p.len().min(8)]);
            (p, what, None)
        }
    }
}

/// Ways to answer a CONNECT other than accepting it (each used once per run), what the error
/// must mention.
const OPENINGS: usize = 6;

fn hostile_opening(kind: usize) -> (Vec<u8>, &'static str, Option<&'static str>) {
    match kind {
        0 => (
            vec![0x20, 0x02, 0x00, 0x05],
            "CONNACK refusing: not authorized",
            Some("not authorized"),
        ),
        1 => (
            vec![0x20, 0x02, 0x00, 0x06],
            "CONNACK with return code 6",
            Some("connect return code"),
        ),
        2 => (
            publish_bytes(b"early", b"x", 0, false, false, 0),
            "PUBLISH instead of CONNACK",
            Some("connack"),
        ),
        3 => (
            vec![0x00, 0x00],
            "garbage instead of CONNACK",
            Some("invalid packet type"),
        ),
        4 => (vec![0x20, 0x02, 0x00], "CONNACK cut short", None),
        _ => (Vec::new(), "no answer at all", None),
    }
}

/// Packets a broker should not send but that do no harm: unsolicited PINGRESP, UNSUBACK and
/// SUBACK, and PUBREL for packet ids never used (answered with PUBCOMP, as MQTT 4.3.3 asks).
/// Returns the bytes and the warnings the engine owes for them.
fn noise(rng: &mut Rng, s: &mut Session, pubrel_id: &mut u16) -> (Vec<u8>, usize) {
    match rng.below(5) {
        0 => (vec![0xD0, 0x00], 0),
        1 => (ack(0xB0, rng.range(1, 65_535) as u16), 0),
        2 => (suback(rng.range(1, 65_535) as u16, &[0x00, 0x01, 0x02]), 0),
        3 => (suback(rng.range(1, 65_535) as u16, &[0x80]), 1),
        _ => {
            *pubrel_id += 1;
            s.released.push(*pubrel_id);
            (ack(0x62, *pubrel_id), 0)
        }
    }
}

/// How a connection ends.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// One of the [`FATAL`] packets (then a message that must not arrive).
    Fatal(usize),
    /// One of the [`OPENINGS`]: no CONNACK worth the name, no messages.
    Opening(usize),
    /// A well-formed PUBLISH cut short, then the end of the stream.
    Truncated,
    /// A PUBLISH header announcing the largest packet MQTT allows (256 MiB), then the end of
    /// the stream: rumqttc reserves room for it, and must still fail cleanly.
    Huge,
    /// Just the end of the stream.
    Clean,
}

/// Every fatal packet and hostile opening once, some cut-short packets and clean closes, in an
/// order of the seed's choosing; the first connection is accepted (and subscribes).
fn plan(rng: &mut Rng) -> Vec<Plan> {
    let mut plan: Vec<Plan> = (0..FATAL).map(Plan::Fatal).collect();
    plan.extend((0..OPENINGS).map(Plan::Opening));
    plan.extend([Plan::Truncated; 6]);
    plan.push(Plan::Huge);
    plan.extend([Plan::Clean; 7]);
    for i in (1..plan.len()).rev() {
        plan.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let first = plan
        .iter()
        .position(|p| !matches!(p, Plan::Opening(_)))
        .expect("an accepted connection");
    plan.swap(0, first);
    plan
}

fn make_session(rng: &mut Rng, index: usize, plan: Plan) -> Session {
    let mut s = Session {
        opening: Opening::Accept { suback_code: 0x02 },
        stream: Vec::new(),
        expected: Vec::new(),
        warnings: 0,
        ending: String::new(),
        clean: false,
        error_has: None,
        replays_connack: false,
        acks_allowed: BTreeMap::new(),
        released: Vec::new(),
    };
    if let Plan::Opening(kind) = plan {
        let (bytes, what, has) = hostile_opening(kind);
        s.opening = Opening::Hostile(bytes);
        s.ending = what.into();
        s.error_has = has;
        return s;
    }
    if rng.chance(8) {
        s.opening = Opening::Accept { suback_code: 0x80 };
        s.warnings += 1;
    }
    let count = rng.below(2 * MEAN_PUBLISHES + 1) as usize;
    // Packet ids of this connection's QoS 1/2 publishes are 1, 2, 3...; the PUBRELs of the
    // noise use ids from 40,000 up, so that no id is released twice.
    let mut pkid: u16 = 0;
    let mut pubrel_id: u16 = 40_000;
    for _ in 0..count {
        if rng.chance(5) {
            let (bytes, warnings) = noise(rng, &mut s, &mut pubrel_id);
            s.stream.extend(bytes);
            s.warnings += warnings;
        }
        let qos = rng.range(0, 2) as u8;
        let id = (qos > 0).then(|| {
            pkid += 1;
            s.acks_allowed.insert(pkid, qos);
            pkid
        });
        let m = Expected {
            topic: random_topic(rng),
            payload: random_payload(rng),
            qos,
            retain: rng.chance(20),
            pkid: id,
        };
        // DUP on QoS 0 breaks MQTT-3.3.1-2; nobody should care.
        let dup = rng.chance(10);
        s.stream.extend(publish_bytes(
            m.topic.as_bytes(),
            &m.payload,
            m.qos,
            m.retain,
            dup,
            id.unwrap_or(0),
        ));
        s.expected.push(m);
    }
    match plan {
        Plan::Opening(_) => unreachable!(),
        Plan::Clean => {
            s.ending = "a clean close".into();
            s.clean = true;
        }
        Plan::Truncated => {
            let payload = rng.some_bytes(0, 200);
            let whole = publish_bytes(b"cut/short", &payload, 1, false, false, pkid + 1);
            let cut = rng.range(1, whole.len() - 1);
            s.stream.extend_from_slice(&whole[..cut]);
            s.ending = format!("a PUBLISH cut after {cut} of {} bytes", whole.len());
        }
        Plan::Huge => {
            s.stream
                .extend([0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01, b'a']);
            s.ending = "a PUBLISH announcing 256 MiB, then the end of the stream".into();
        }
        Plan::Fatal(kind) => {
            let (bytes, what, error_has) = fatal_packet(kind, rng, pkid + 1);
            s.stream.extend(bytes);
            // A well-formed message after the bad packet: it must never arrive, as the
            // connection is gone by then.
            s.stream.extend(publish_bytes(
                format!("canary/{index}").as_bytes(),
                b"must not arrive",
                0,
                false,
                false,
                0,
            ));
            s.replays_connack = kind == 19;
            s.ending = what;
            s.error_has = error_has;
        }
    }
    s
}

fn script(seed: u64) -> Vec<Session> {
    let mut rng = Rng(seed);
    let plan = plan(&mut rng);
    assert_eq!(plan.len(), SESSIONS);
    plan.into_iter()
        .enumerate()
        .map(|(i, p)| make_session(&mut rng, i, p))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fake broker.
// ---------------------------------------------------------------------------------------------

/// What the fake broker saw from the engine on one connection.
#[derive(Debug, Default)]
struct Seen {
    /// Packets after the SUBSCRIBE, until the engine closed the connection.
    packets: Vec<FromClient>,
}

/// Reads the engine's packets until it closes the connection (the connection's other half is
/// written meanwhile, so nothing ever waits on a full socket).
fn spawn_reader(mut stream: TcpStream, seen: Arc<Mutex<Seen>>) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        stream
            .set_read_timeout(Some(BROKER_WAIT))
            .map_err(|e| e.to_string())?;
        loop {
            match read_packet(&mut stream) {
                Ok(Some((h, body))) => seen.lock().unwrap().packets.push(summarize(h, &body)),
                Ok(None) => return Ok(()),
                // A reset after our FIN is also the engine closing.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => {
                    return Err(format!(
                        "the engine did not close a connection it should have given up ({e})"
                    ))
                }
            }
        }
    })
}

/// Write `bytes` in chunks of random size, so that packets straddle reads in every way.
fn write_chunked(stream: &mut TcpStream, bytes: &[u8], rng: &mut Rng) -> std::io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        let n = match rng.below(4) {
            0 => rng.range(1, 16),
            1 => rng.range(16, 512),
            _ => rng.range(512, 32_768),
        }
        .min(bytes.len() - at);
        stream.write_all(&bytes[at..at + n])?;
        at += n;
    }
    stream.flush()
}

/// Play one session on the next connection.
fn serve(listener: &TcpListener, s: &Session, rng: &mut Rng, index: usize) -> Result<Seen, String> {
    let ctx = |what: &str, e: &dyn std::fmt::Display| format!("session {index}: {what}: {e}");
    let deadline = Instant::now() + BROKER_WAIT;
    let mut stream = loop {
        match listener.accept() {
            Ok((st, _)) => break st,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(format!("session {index}: the engine did not reconnect"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(ctx("accept", &e)),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(|e| ctx("socket", &e))?;
    stream.set_nodelay(true).map_err(|e| ctx("socket", &e))?;
    stream
        .set_read_timeout(Some(BROKER_WAIT))
        .map_err(|e| ctx("socket", &e))?;
    match read_packet(&mut stream) {
        Ok(Some((0x10, _))) => {}
        other => return Err(ctx("expected CONNECT", &format!("{other:?}"))),
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    match &s.opening {
        Opening::Hostile(bytes) => {
            stream.write_all(bytes).map_err(|e| ctx("write", &e))?;
            let _ = stream.shutdown(Shutdown::Write);
            let reader = spawn_reader(stream, seen.clone());
            reader
                .join()
                .expect("reader thread")
                .map_err(|e| ctx("reading", &e))?;
        }
        Opening::Accept { suback_code } => {
            stream
                .write_all(&[0x20, 0x02, 0x00, 0x00])
                .map_err(|e| ctx("write CONNACK", &e))?;
            // The engine subscribes to its filter on every new session.
            let sub = loop {
                match read_packet(&mut stream) {
                    Ok(Some((h, body))) if h >> 4 == 8 => break summarize(h, &body),
                    Ok(Some(_)) => continue,
                    other => return Err(ctx("expected SUBSCRIBE", &format!("{other:?}"))),
                }
            };
            let reader = spawn_reader(stream.try_clone().unwrap(), seen.clone());
            let mut bytes = suback(sub.pkid.unwrap_or(0), &[*suback_code]);
            bytes.extend_from_slice(&s.stream);
            let written = write_chunked(&mut stream, &bytes, rng);
            let _ = stream.shutdown(Shutdown::Write);
            reader
                .join()
                .expect("reader thread")
                .map_err(|e| ctx("reading", &e))?;
            // The engine may drop the connection before reading everything after a bad
            // packet; a failed write is only a problem if nothing was bad.
            if let Err(e) = written {
                if s.clean {
                    return Err(ctx("write", &e));
                }
            }
        }
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    Ok(seen)
}

/// Abbreviated, for messages: long topics and payloads are cut.
fn short(e: &Expected) -> String {
    let topic: String = e.topic.chars().take(40).collect();
    format!(
        "{{ topic: {topic:?}{} ({} bytes), payload: {} bytes, qos: {}, retain: {}, pkid: {:?} }}",
        if topic.len() < e.topic.len() {
            "..."
        } else {
            ""
        },
        e.topic.len(),
        e.payload.len(),
        e.qos,
        e.retain,
        e.pkid
    )
}

// ---------------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------------

#[test]
fn hostile_broker_input() {
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let sessions = Arc::new(script(seed));
    let total: usize = sessions.iter().map(|s| s.expected.len()).sum();
    eprintln!(
        "hostile: seed {seed}, {SESSIONS} connections, {total} well-formed messages, {} bytes",
        sessions.iter().map(|s| s.stream.len()).sum::<usize>()
    );

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake broker");
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = sessions.clone();
    let broker = std::thread::spawn(move || -> Result<Vec<Seen>, String> {
        let mut rng = Rng(seed ^ 0x5eed);
        let mut seen = Vec::new();
        for (i, s) in script.iter().enumerate() {
            seen.push(serve(&listener, s, &mut rng, i)?);
        }
        Ok(seen)
    });

    let started = Instant::now();
    let mut h = Harness::new(4096);
    let mut cfg = config(1, port, "hostile");
    // The script is written in MQTT 3.1.1's bytes, so this test speaks 3.1.1 whatever
    // MQTT_PG_PROTOCOL says; `hostile_v5_broker_input` below covers MQTT 5's decoder.
    cfg.protocol = mqtt_pg_core::engine::Protocol::V311;
    // Reconnect at once: the point is what the engine makes of the bytes, not its backoff.
    cfg.reconnect_min = Duration::from_millis(1);
    cfg.reconnect_max = Duration::from_millis(5);
    h.engine().set_brokers(vec![cfg]);
    h.engine()
        .set_subscriptions(1, [("#".to_string(), 2u8)].into_iter().collect());

    let mut lost = 0;
    let events = h.wait_until(&format!("{SESSIONS} lost connections"), DEADLINE, |seen| {
        let last = seen.last().unwrap();
        assert!(
            !matches!(last, Event::Failed { .. }),
            "the connection task panicked: {}",
            describe_one(last)
        );
        if matches!(last, Event::ConnectionLost { .. }) {
            lost += 1;
        }
        lost == SESSIONS
    });
    let elapsed = started.elapsed();
    let observed = broker
        .join()
        .expect("fake broker thread panicked")
        .unwrap_or_else(|e| panic!("fake broker: {e}; events:\n{}", describe(&events)));
    assert_eq!(h.engine().running_tasks(), 1, "the broker task is gone");

    // One segment of events per connection, each ending with its ConnectionLost.
    let mut segments: Vec<&[Event]> = Vec::new();
    let mut start = 0;
    for (i, e) in events.iter().enumerate() {
        if matches!(e, Event::ConnectionLost { .. }) {
            segments.push(&events[start..=i]);
            start = i + 1;
        }
    }
    assert_eq!(segments.len(), SESSIONS);

    let addr = format!("127.0.0.1:{port}");
    let verbose = std::env::var_os("HOSTILE_VERBOSE").is_some();
    let mut delivered = 0;
    let (mut acks, mut pubcomps) = (0, 0);
    for (i, ((s, seg), seen)) in sessions.iter().zip(&segments).zip(&observed).enumerate() {
        let ctx = |what: &str| {
            format!(
                "connection {i} (ending with {}): {what}; its events:\n{}",
                s.ending,
                describe(seg)
            )
        };
        for e in seg.iter() {
            assert!(
                matches!(
                    e,
                    Event::Connecting { .. }
                        | Event::Connected { .. }
                        | Event::Received(_)
                        | Event::Warning { .. }
                        | Event::ConnectionLost { .. }
                ),
                "{}",
                ctx(&format!("unexpected {}", describe_one(e)))
            );
        }
        let connected = seg
            .iter()
            .filter(|e| matches!(e, Event::Connected { .. }))
            .count();
        let warnings: Vec<&Event> = seg
            .iter()
            .filter(|e| matches!(e, Event::Warning { .. }))
            .collect();
        let Some(Event::ConnectionLost { error, suspect, .. }) = seg.last() else {
            unreachable!()
        };
        // The report is one readable line that names the broker.
        assert!(
            error.contains(&addr) && !error.contains('\n') && !error.contains("panick"),
            "{}",
            ctx(&format!("unreadable error {error:?}"))
        );
        assert_eq!(
            *suspect,
            None,
            "{}",
            ctx("a suspect, with nothing published")
        );
        if verbose {
            eprintln!(
                "hostile: connection {i}: {} messages, then {}: {error}",
                s.expected.len(),
                s.ending
            );
        }

        let got: Vec<Expected> = seg
            .iter()
            .filter_map(|e| match e {
                Event::Received(m) => Some(Expected {
                    topic: m.topic.clone(),
                    payload: m.payload.to_vec(),
                    qos: m.qos,
                    retain: m.retain,
                    pkid: m.pkid,
                }),
                _ => None,
            })
            .collect();
        if let Some(needle) = s.error_has {
            assert!(
                error.to_lowercase().contains(needle),
                "{}",
                ctx(&format!("the error {error:?} does not say {needle:?}"))
            );
        }
        if let Opening::Hostile(_) = &s.opening {
            assert_eq!(connected, 0, "{}", ctx("Connected"));
            assert!(got.is_empty(), "{}", ctx("Received"));
            continue;
        }
        let want = if s.replays_connack { 2 } else { 1 };
        assert_eq!(connected, want, "{}", ctx("expected one Connected"));
        assert_eq!(
            warnings.len(),
            s.warnings,
            "{}",
            ctx(&format!("expected {} warnings", s.warnings))
        );
        for w in warnings {
            let Event::Warning { error, .. } = w else {
                unreachable!()
            };
            assert!(
                error.contains("refused the subscription") && !error.contains('\n'),
                "{}",
                ctx(&format!("unexpected warning {error:?}"))
            );
        }
        if got != s.expected {
            let n = got.len().min(s.expected.len());
            let first = (0..n).find(|&k| got[k] != s.expected[k]).unwrap_or(n);
            panic!(
                "{}",
                ctx(&format!(
                    "received {} messages instead of the {} sent; first difference at #{first}: \
                     got {}, sent {}",
                    got.len(),
                    s.expected.len(),
                    got.get(first).map_or("nothing".into(), short),
                    s.expected.get(first).map_or("nothing".into(), short),
                ))
            );
        }
        delivered += got.len();

        // Acknowledgements: PUBACK for QoS 1, PUBREC for QoS 2, only for messages of this
        // connection, each at most once; PUBCOMP only for the PUBRELs sent.
        let mut acked = BTreeSet::new();
        for p in &seen.packets {
            match (p.kind, p.pkid) {
                (4 | 5, Some(id)) => {
                    let want = if p.kind == 4 { 1 } else { 2 };
                    assert_eq!(
                        s.acks_allowed.get(&id),
                        Some(&want),
                        "{}",
                        ctx(&format!("the engine sent {p:?} for no such message"))
                    );
                    assert!(acked.insert(id), "{}", ctx(&format!("{p:?} twice")));
                    acks += 1;
                }
                (7, Some(id)) => {
                    assert!(
                        s.released.contains(&id),
                        "{}",
                        ctx(&format!("PUBCOMP {id} for no PUBREL"))
                    );
                    pubcomps += 1;
                }
                // PINGREQ, DISCONNECT, a birth message: nothing to check here.
                _ => {}
            }
        }
    }
    assert_eq!(delivered, total);
    // The acknowledgement checks above saw something to check.
    assert!(acks > 0 && pubcomps > 0, "{acks} acks, {pubcomps} PUBCOMPs");

    let engine = h.take_engine();
    engine.shutdown(Duration::from_secs(2));
    eprintln!(
        "hostile: {delivered} messages over {SESSIONS} connections in {elapsed:?}, {acks} \
         acknowledged, {pubcomps} PUBRELs answered"
    );
}
