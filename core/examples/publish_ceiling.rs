//! The delivery ceiling of `scripts/bench.py`: how fast rumqttc alone publishes messages that
//! are already in memory, with the same in-flight window as the mqtt_pg worker.
//!
//! ```text
//! cargo run --release -p mqtt_pg_core --example publish_ceiling -- \
//!     --host 127.0.0.1 --port 1883 --count 100000 --qos 1 --size 100 --inflight 100
//! ```
//!
//! It connects with a clean session, waits for the CONNACK, then one task hands `count`
//! publishes of `size` bytes (topics `<topic>/<i>`) to rumqttc as fast as its request channel
//! takes them, while the main task polls the event loop (it never awaits a publish itself: that
//! deadlocks once the channel is full). The clock runs from the CONNACK until the `count`-th
//! PUBACK (QoS 1), PUBCOMP (QoS 2) or outgoing PUBLISH (QoS 0, which has no acknowledgement).
//! Prints `{"seconds": s, "count": n}` on stdout; errors go to stderr with exit code 1 (bad
//! arguments: 2). The runtime, request channel capacity and TCP_NODELAY are the worker
//! engine's (core/src/engine/).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};

/// rumqttc's request channel capacity in the worker's engine (core/src/engine/connection.rs).
const REQUEST_CHANNEL: usize = 1024;
/// The worker engine's tokio worker threads (src/worker/mod.rs).
const RUNTIME_THREADS: usize = 2;

struct Args {
    host: String,
    port: u16,
    count: u64,
    qos: QoS,
    size: usize,
    inflight: u16,
    topic: String,
    timeout: Duration,
}

const USAGE: &str = "usage: publish_ceiling [--host H] [--port P] [--count N] [--qos 0|1|2] \
                     [--size BYTES] [--inflight N] [--topic PREFIX] [--timeout SECONDS]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 1883,
        count: 100_000,
        qos: QoS::AtLeastOnce,
        size: 100,
        inflight: 100,
        topic: "bench/ceiling".into(),
        timeout: Duration::from_secs(600),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--host" => a.host = value,
            "--port" => a.port = value.parse().map_err(|e| bad(&e))?,
            "--count" => a.count = value.parse().map_err(|e| bad(&e))?,
            "--qos" => {
                a.qos = match value.as_str() {
                    "0" => QoS::AtMostOnce,
                    "1" => QoS::AtLeastOnce,
                    "2" => QoS::ExactlyOnce,
                    _ => return Err(bad(&"must be 0, 1 or 2")),
                }
            }
            "--size" => a.size = value.parse().map_err(|e| bad(&e))?,
            "--inflight" => a.inflight = value.parse().map_err(|e| bad(&e))?,
            "--topic" => a.topic = value,
            "--timeout" => a.timeout = Duration::from_secs_f64(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}")),
        }
    }
    if a.count == 0 || a.inflight == 0 {
        return Err("--count and --inflight must be positive".into());
    }
    if a.size > 8 * 1024 {
        // rumqttc's default packet limit is 10 KiB; the benchmark sends 100 bytes.
        return Err("--size must be at most 8192".into());
    }
    Ok(a)
}

async fn run(a: Args) -> Result<(f64, u64), String> {
    let client_id = format!("mqtt_pg-bench-ceiling-{}", std::process::id());
    let mut options = MqttOptions::new(client_id, a.host.clone(), a.port);
    options.set_clean_session(true);
    options.set_keep_alive(Duration::from_secs(60));
    options.set_inflight(a.inflight);
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);

    let deadline = Instant::now() + a.timeout;
    let left = || deadline.saturating_duration_since(Instant::now());

    // Connect first: the clock starts at the CONNACK, as mqtt_pg's is started with the
    // listener already connected.
    loop {
        match tokio::time::timeout(left(), eventloop.poll()).await {
            Err(_) => return Err("timed out waiting for CONNACK".into()),
            Ok(Err(e)) => return Err(format!("connection failed: {e}")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
        }
    }
    let started = Instant::now();

    let payload = vec![b'x'; a.size];
    let (topic, qos, count) = (a.topic.clone(), a.qos, a.count);
    let publisher = client.clone();
    let feeder = tokio::spawn(async move {
        for i in 0..count {
            publisher
                .publish(format!("{topic}/{i}"), qos, false, payload.clone())
                .await
                .map_err(|e| format!("publish {i}: {e}"))?;
        }
        Ok::<(), String>(())
    });

    let mut done = 0u64;
    while done < a.count {
        let event = match tokio::time::timeout(left(), eventloop.poll()).await {
            Err(_) => {
                return Err(format!(
                    "timed out after {:?} with {done} of {} done",
                    a.timeout, a.count
                ))
            }
            Ok(Err(e)) => return Err(format!("connection lost after {done}: {e}")),
            Ok(Ok(event)) => event,
        };
        let counts = matches!(
            (a.qos, &event),
            (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
                | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_)))
        );
        if counts {
            done += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    match feeder.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(format!("publishing task failed: {e}")),
    }
    // Not timed: a clean DISCONNECT, polled until written, so QoS 0 messages are flushed too.
    if client.try_disconnect().is_ok() {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            match tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
    Ok((seconds, done))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start tokio: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok((seconds, count)) => {
            println!("{{\"seconds\": {seconds:.6}, \"count\": {count}}}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("publish_ceiling: {e}");
            ExitCode::from(1)
        }
    }
}
