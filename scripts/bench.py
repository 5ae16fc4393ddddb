#!/usr/bin/env python3
"""mqtt_pg benchmark (issue 9): every figure beside its ceiling, measured in the same run on the
same servers, plus the worker's peak memory. `./dev bench` runs it.

    ./dev bench                           # N = 100,000 messages, about 5 minutes
    ./dev bench --quick                   # N = 5,000 and short durations (CI, well under 2 minutes)
    ./dev bench --only publish,delivery --messages 20000 --json /tmp/bench.json
    ./dev bench --soak 10                 # 10 minutes at 2,000 msg/s each way, instead of the rest

Servers of its own (tests/e2e/harness.py, free 127.0.0.1 ports, all stopped at the end, also on
Ctrl-C): PostgreSQL 15 with mqtt_pg preloaded, `fsync = on` (a new user's default; the test
harness turns it off) and `shared_buffers = 256MB`; mosquitto without in-flight or queue limits
and with `queue_qos0_messages true`. Database `bench` is owned by `bench_owner`, a non-superuser,
as an Odoo database is: everything below runs as that role (so access rules are checked on every
publish, and routing is allowed), except CREATE EXTENSION and CHECKPOINT. Payloads are 100 bytes.
One broker row, `bench` (clean_session false: a persistent session), connected throughout.

Figures (N = --messages); the name in [brackets] is what --only takes:

1. [ingest_q0] and 2. [ingest_q1] Ingest from a broker backlog. Ceiling: `mosquitto_sub -c -i ID
   -q Q` subscribes once (-E) and leaves, N messages are published to it (paho, until the broker
   acknowledged them; a QoS 1 marker closes a QoS 0 backlog), then `mosquitto_sub -c -i ID -q Q
   -C N` is timed draining its backlog. mqtt_pg: a subscription at QoS Q, the listener stopped
   (mqtt_stop_listener, until the broker logs the disconnect), the same N published, then the time
   from mqtt_start_listener until N 'receive' history rows are stored. Target ratio >= 0.9.
2b. [ingest_q1_v5] Live QoS 1 ingest (the listener connected while a paho publisher sends N)
   from a second mosquitto with its default window (max_inflight_messages 20, which holds a
   3.1.1 subscriber to 20 unacknowledged messages): into a broker row on MQTT 3.1.1 (reported)
   and one on MQTT 5 with receive_maximum 10,000 (target >= 0.9). Ceiling: `mosquitto_sub -V 5`
   receiving the same live stream, from the first publish to its last message.
3. [routed] Routed ingest: the same kind of QoS 1 backlog as JSON objects, once into a plain
   subscription (history only: the ceiling) and once into one with target_table = a plain logged
   table (readings); rows and distinct sequence numbers counted. Target >= 0.5.
4. [publish] Bulk mqtt_publish: `SELECT count(mqtt_publish('bench/pub/' || i, <100 bytes>, 1))
   FROM generate_series(1, N) i` (statement + commit, listener connected), in rows/s. Ceiling: the
   same rows by a plain `INSERT ... SELECT` into plain_outbox (the outbox's columns, bigserial PK,
   created_at default now(), no other index or FK). A CHECKPOINT before each. Target >= 0.5.
5. [delivery] Delivery after commit: from that commit until mqtt_outbox is empty (polled every
   10 ms: `SELECT NOT EXISTS (SELECT 1 FROM mqtt_outbox)`) and N 'send' history rows exist, msg/s;
   QoS 1 (target >= 0.7), QoS 0 and QoS 2 (reported). Ceiling: core/examples/publish_ceiling.rs,
   rumqttc alone publishing N messages of 100 bytes from memory with the worker's in-flight window
   (WORKER_INFLIGHT), clean session, timed from CONNACK to the last PUBACK/PUBCOMP (QoS 0: the last
   PUBLISH written). Nobody subscribes to these topics; the broker still acknowledges.
6. [pgbench] Per transaction: pgbench -n -c 4 -j 2 -T 10 (quick: 3), one BEGIN..END per
   transaction: A = two INSERTs (the ceiling), B = an INSERT and an mqtt_publish (QoS 1) while the
   listener delivers. tps B/A, target >= 0.8. Checks: A's rows, and after B as many 'send' history
   rows for bench/tx as pgbench reports transactions.
7. [watch] A bulk UPDATE of N rows of a watched table (mqtt_watch_table, QoS 1) beside the same
   UPDATE of an identical unwatched one (statement + commit each, a CHECKPOINT before each); time
   ratio, target <= 2. Every row's message must be delivered ('send' history rows).
8. [latency] Latency at a fixed 1,000 tx/s for 10 s (quick: 2 s): one autocommit connection calls
   `SELECT mqtt_publish('bench/lat', ..., 1)` on absolute deadlines; a paho subscriber (QoS 1, its
   own thread) records when each arrives. Latency = receipt - the time just before the call. p50,
   p99, max and the achieved tx/s, twice: with the publishing session's synchronous_commit = off
   (target p99 < 5 ms: the wait for its own WAL flush is the disk's, not mqtt_pg's), then with
   every commit flushed (reported; one connection cannot hold 1,000 tx/s when a flush takes over
   1 ms).
9. [status] Polling `SELECT * FROM mqtt_broker_status` with 10 N rows (at most 1,000,000) queued
   for a stopped broker and as many in history: the median of 20 polls, beside the naive
   `count(*)` of both tables that the view avoids (the floor it is measured against, same run).
   Target: a poll under 10 ms however large the tables.
10. --soak MINUTES, instead of the others: 2,000 msg/s each way (a paho publisher, QoS 1, to a
   subscribed topic; 20 mqtt_publish per transaction every 10 ms), the worker's memory printed
   every minute; the peak Anonymous memory (the worker's own heap) of the last minute beside the
   first's (target: within 10 %), private memory and VmRSS beside it, and exact counts.

Worker memory, whole run: Private_Clean + Private_Dirty from /proc/PID/smaps_rollup (pages of the
shared buffers that only the worker has touched count there too; `Anonymous` is shown beside it)
and VmRSS, sampled every 0.2 s by a thread.

Exit status: 0 when every correctness check passed (every message counted exactly: nothing lost or
duplicated, the outbox empty at the end, history counts exact), 1 if one failed, 2 on a setup
error, 130 on Ctrl-C. A missed performance target is printed as "no" and never fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import paho.mqtt.client as mqtt  # noqa: E402
import psycopg  # noqa: E402

import harness  # noqa: E402
from harness import Mosquitto, MqttSub, PgCluster, SeqPublisher, seq_of, seq_payload, tail, unique, wait_for  # noqa: E402

# The worker's in-flight window for QoS 1/2 publishes (src/worker/config.rs sets
# `max_inflight: 100` for every broker). The delivery ceiling (publish_ceiling --inflight) gets
# the same window, so the comparison is of the same protocol exchange; change both together.
WORKER_INFLIGHT = 100

FIGURES = ("ingest_q0", "ingest_q1", "ingest_q1_v5", "routed", "publish", "delivery", "pgbench", "watch", "latency", "status")
DB = "bench"
BROKER = "bench"
OWNER = "bench_owner"
PAYLOAD_BYTES = 100
PAYLOAD = ("bench payload " + "x" * PAYLOAD_BYTES)[:PAYLOAD_BYTES]
PG_CONF = "fsync = on\nshared_buffers = 256MB"
MOSQUITTO_CONF = "queue_qos0_messages true"
# the PostgreSQL under test is harness.PG_BIN's (MQTT_PG_PG_BIN, default Debian's 15)
PGBENCH = str(harness.PG_BIN / "pgbench")
SO_PATH = harness.pkglibdir() / "mqtt_pg.so"
MIB = 1024 * 1024
STALL = 60.0  # seconds without progress before a drain counts as failed


class CheckFailed(Exception):
    """A correctness check failed in a way that ends the current figure."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def first_line(e: BaseException) -> str:
    """An error's message without the DETAIL lines (a pgrx panic's backtrace, for one)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def rate(n: int | float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def fmt_rate(r: float, unit: str = "msg/s") -> str:
    return f"{r:,.0f} {unit}"


def json_payload(i: int) -> str:
    """A 100-byte JSON object with a device, a value and the sequence number i."""
    base = {"device": f"d{i % 100}", "value": round(20 + (i % 1000) / 100, 2), "seq": i}
    text = json.dumps(base | {"pad": ""})
    return json.dumps(base | {"pad": "x" * max(0, PAYLOAD_BYTES - len(text))})


# ----------------------------------------------------------------------------------------------
# processes of our own: each in its own process group, killed by that group on any exit


def run_proc(cmd: list[str], timeout: float, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode,
                                       out.decode(errors="replace") if isinstance(out, bytes) else out,
                                       err.decode(errors="replace") if err else "")


# ----------------------------------------------------------------------------------------------
# worker memory


def read_memory(pid: int) -> dict[str, int] | None:
    """Private (Private_Clean + Private_Dirty), Anonymous (smaps_rollup) and VmRSS, in bytes."""
    out = {"private": 0, "anon": 0, "rss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    out["private"] += int(rest.split()[0]) * 1024
                elif key == "Anonymous":
                    out["anon"] = int(rest.split()[0]) * 1024
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss"] = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return out


class MemorySampler(threading.Thread):
    """Samples the database's worker every `interval` seconds for the whole run; keeps every
    sample (time, private, anon, rss) and notices when the worker's pid changes."""

    def __init__(self, pg: PgCluster, interval: float = 0.2):
        super().__init__(name="memory-sampler", daemon=True)
        self.pg = pg
        self.interval = interval
        self.stop_event = threading.Event()
        self.samples: list[tuple[float, int, int, int]] = []
        self.pids: list[int] = []
        self.lock = threading.Lock()

    def _find_pid(self) -> int | None:
        try:
            pids = self.pg.worker_pids(DB)
        except Exception:  # noqa: BLE001 - the server may be restarting; try again
            return None
        return pids[0] if pids else None

    def run(self) -> None:
        pid = None
        while not self.stop_event.is_set():
            if pid is None:
                pid = self._find_pid()
                if pid is not None and (not self.pids or self.pids[-1] != pid):
                    self.pids.append(pid)
            m = read_memory(pid) if pid is not None else None
            if m is None:
                pid = None
            else:
                with self.lock:
                    self.samples.append((time.monotonic(), m["private"], m["anon"], m["rss"]))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)

    def window(self, t0: float, t1: float) -> list[tuple[float, int, int, int]]:
        with self.lock:
            return [s for s in self.samples if t0 <= s[0] < t1]

    def peaks(self, samples: list | None = None) -> dict[str, int]:
        with self.lock:
            ss = self.samples if samples is None else samples
            return {"private": max((s[1] for s in ss), default=0), "anon": max((s[2] for s in ss), default=0),
                    "rss": max((s[3] for s in ss), default=0), "samples": len(ss)}

    def last(self) -> dict[str, int]:
        with self.lock:
            s = self.samples[-1] if self.samples else (0, 0, 0, 0)
        return {"private": s[1], "anon": s[2], "rss": s[3]}


# ----------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.n: int = args.messages
        self.pg: PgCluster | None = None
        self.mosq: Mosquitto | None = None
        self.su: psycopg.Connection | None = None  # superuser, in DB
        self.db: psycopg.Connection | None = None  # the database owner, in DB
        self.broker_id = 0
        self.sampler: MemorySampler | None = None
        self.ceiling_bin: Path | None = None
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.so_mtime = SO_PATH.stat().st_mtime if SO_PATH.exists() else None

    # -- bookkeeping ---------------------------------------------------------------------------
    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            log(f"  CHECK FAILED: {what}")
        return ok

    def row(self, name: str, figure: str, value: float | None, unit: str, shown: str,
            ceiling: float | None, ceiling_shown: str, ratio: float | None, ratio_shown: str,
            target: str, met: bool | None, **extra: Any) -> None:
        self.rows.append({"name": name, "figure": figure, "value": value, "unit": unit, "mqtt_pg": shown,
                          "ceiling": ceiling, "ceiling_what": ceiling_shown, "ratio": ratio,
                          "ratio_shown": ratio_shown, "target": target, "met": met, **extra})

    def ratio_row(self, name: str, figure: str, value: float, ceiling: float, unit: str, what: str,
                  target: float | None, **extra: Any) -> None:
        """A row whose figure is a rate beside a ceiling rate; ratio = value / ceiling."""
        r = value / ceiling if ceiling > 0 else None
        self.row(name, figure, value, unit, fmt_rate(value, unit), ceiling, f"{fmt_rate(ceiling, unit)} ({what})",
                 r, f"{r:.2f}" if r is not None else "?", f">= {target}" if target is not None else "-",
                 (r is not None and r >= target) if target is not None else None, **extra)

    # -- setup ---------------------------------------------------------------------------------
    def build_ceiling(self) -> None:
        cmd = ["cargo", "build", "--release", "-p", "mqtt_pg_core", "--example", "publish_ceiling",
               "--message-format=json-render-diagnostics"]
        log("building the delivery ceiling: " + " ".join(cmd[:7]))
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            raise RuntimeError(f"cargo build of publish_ceiling failed:\n{tail(r.stderr, 30)}")
        for line in r.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "publish_ceiling" \
                    and msg.get("executable"):
                self.ceiling_bin = Path(msg["executable"])
        if not self.ceiling_bin or not self.ceiling_bin.exists():
            raise RuntimeError("cargo built publish_ceiling but named no executable")
        log(f"  {self.ceiling_bin} ({time.monotonic() - t0:.1f} s)")

    def setup(self) -> None:
        if self.so_mtime:
            log(f"mqtt_pg.so installed {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.so_mtime))}; "
                f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        else:
            raise RuntimeError(f"{SO_PATH} not found: install the extension first (./dev setup)")
        if not self.args.soak and self.wants("delivery"):
            self.build_ceiling()
        self.pg = PgCluster(preload=True, extra_conf=PG_CONF).init()
        self.pg.start()
        self.mosq = Mosquitto(extra_conf=MOSQUITTO_CONF).start()
        log(f"PostgreSQL on port {self.pg.port} ({self.pg.datadir}), mosquitto on port {self.mosq.port}")
        with self.pg.connect() as admin:
            admin.execute(f"CREATE ROLE {OWNER} LOGIN NOSUPERUSER")
            admin.execute(f"CREATE DATABASE {DB} OWNER {OWNER}")
        self.su = self.pg.connect(DB)
        self.su.execute("CREATE EXTENSION mqtt_pg")
        self.db = psycopg.connect(host=harness.HOST, port=self.pg.port, dbname=DB, user=OWNER, autocommit=True)
        self.broker_id = self.db.execute(
            "INSERT INTO mqtt_broker (name, host, port, clean_session, is_default, active) "
            "VALUES (%s, %s, %s, false, true, true) RETURNING id", (BROKER, harness.HOST, self.mosq.port)).fetchone()[0]
        harness.wait_status(self.db, BROKER, "connected", timeout=30)
        self.sampler = MemorySampler(self.pg)
        self.sampler.start()
        wait_for(lambda: self.sampler.samples, timeout=30, message="a memory sample of the worker")
        log(f"broker {BROKER!r} connected (client id {self.client_id()}); worker pid {self.sampler.pids}")

    def wants(self, name: str) -> bool:
        return self.args.only is None or name in self.args.only

    # -- small SQL helpers ---------------------------------------------------------------------
    def q(self, stmt: str, params: tuple = ()) -> Any:
        return self.db.execute(stmt, params).fetchone()[0]

    def checkpoint(self) -> None:
        self.su.execute("CHECKPOINT")

    def max_history_id(self) -> int:
        return self.q("SELECT coalesce(max(id), 0) FROM mqtt_message_history")

    def client_id(self, broker: str = BROKER) -> str:
        return harness.broker_status(self.db, broker)["client_id"]

    def stop_listener(self, broker: str = BROKER, mosq: Mosquitto | None = None) -> None:
        mosq = mosq or self.mosq
        cid = self.client_id(broker)
        gone = mosq.disconnections_of(cid)
        self.db.execute("SELECT mqtt_stop_listener(%s)", (broker,))
        harness.wait_status(self.db, broker, "stopped")
        wait_for(lambda: mosq.disconnections_of(cid) > gone, timeout=20,
                 message="the listener to leave the broker")

    def outbox_empty(self) -> bool:
        return self.q("SELECT NOT EXISTS (SELECT 1 FROM mqtt_outbox)")

    def sent_rows(self, h0: int, topic_prefix: str | None = None, topic: str | None = None) -> tuple[int, int]:
        """'send' history rows after id h0 on a topic (or under a prefix): (count, distinct topics
        and payloads taken together)."""
        cond, p = ("topic = %s", topic) if topic is not None else ("starts_with(topic, %s)", topic_prefix)
        return self.db.execute(
            f"SELECT count(*), count(DISTINCT (topic, payload)) FROM mqtt_message_history "
            f"WHERE id > %s AND direction = 'send' AND {cond}", (h0, p)).fetchone()

    def wait_delivered(self, h0: int, n: int, since: float, label: str, unique: bool = True, **where: str) -> float:
        """Seconds from `since` until the outbox is empty and n 'send' rows exist (polled every
        10 ms, a count only once the outbox is empty); checks the count is exact, and with
        `unique` (every message has its own topic or payload) that no message was sent twice."""
        last_left, last_change = None, time.monotonic()
        while True:
            if self.outbox_empty():
                k, distinct = self.sent_rows(h0, **where)
                if k >= n:
                    done = time.monotonic()
                    self.check(k == n and (distinct == n or not unique), f"{label}: {k:,} 'send' history rows "
                               f"({distinct:,} distinct), expected exactly {n:,}")
                    return done - since
            now = time.monotonic()
            if now - last_change > 5:
                left = self.q("SELECT count(*) FROM mqtt_outbox")
                if left != last_left:
                    last_left, last_change = left, now
                elif now - last_change > STALL:
                    raise CheckFailed(f"{label}: delivery stalled with {left:,} rows in the outbox")
            time.sleep(0.01)

    # -- backlogs at the broker ----------------------------------------------------------------
    def publish_backlog(self, topic: str, n: int, qos: int, payload: Callable[[int], str],
                        mosq: Mosquitto | None = None) -> float:
        """n messages (payload(i), i = 0..n-1) published with paho and acknowledged by the broker;
        a QoS 0 backlog is closed by a QoS 1 marker, whose PUBACK comes after the broker has
        handled everything before it on the connection. Seconds taken."""
        t0 = time.monotonic()
        with SeqPublisher((mosq or self.mosq).port) as pub:
            pub.connect()
            window = 20_000  # paho's packet ids are 16 bits
            for i in range(n):
                if qos and pub.sent - pub.acked() >= window:
                    wait_for(lambda: pub.sent - pub.acked() < window // 2, timeout=120, interval=0.005,
                             message="the broker to acknowledge publishes")
                pub.publish(topic, payload(i), qos)
            if qos == 0:
                pub.publish("bench/marker", "end of backlog", 1)
            pub.wait_all_acked(timeout=max(60, n / 1000))
        return time.monotonic() - t0

    def count_received(self, h0: int, topic: str) -> tuple[int, int]:
        return self.db.execute(
            "SELECT count(*), count(DISTINCT payload) FROM mqtt_message_history "
            "WHERE id > %s AND direction = 'receive' AND topic = %s", (h0, topic)).fetchone()

    def drain_into_pg(self, topic: str, n: int, label: str, broker: str = BROKER) -> dict:
        """Start the listener and time until n 'receive' history rows on `topic` are stored."""
        h0 = self.max_history_id()
        t0 = time.monotonic()
        self.db.execute("SELECT mqtt_start_listener(%s)", (broker,))
        last, last_change, t_first = 0, t0, None
        while True:
            top = self.max_history_id() - h0  # an index probe; an exact count once it says all may be there
            now = time.monotonic()
            if top > 0 and t_first is None:
                t_first = now
            if top >= n:
                k, _ = self.count_received(h0, topic)
                if k >= n:
                    break
            if top != last:
                last, last_change = top, now
            elif now - last_change > STALL:
                raise CheckFailed(f"{label}: ingest stalled at {top:,} of {n:,}")
            time.sleep(0.01)
        seconds = time.monotonic() - t0
        time.sleep(0.3)  # late duplicates, if any, would show in the count below
        k, distinct = self.count_received(h0, topic)
        self.check(k == n and distinct == n, f"{label}: {k:,} history rows ({distinct:,} distinct payloads), "
                   f"expected exactly {n:,}")
        batches = self.q("SELECT count(DISTINCT xmin::text) FROM mqtt_message_history WHERE id > %s AND topic = %s",
                         (h0, topic))
        first = (n / (t0 + seconds - t_first)) if t_first and t0 + seconds > t_first else None
        return {"seconds": seconds, "rate": rate(n, seconds), "h0": h0, "batches": batches, "rate_from_first": first}

    def subscribe_live(self, filt: str, qos: int, probe_topic: str) -> None:
        """Subscribe (history only) and wait until a probe on probe_topic is stored."""
        self.db.execute("SELECT mqtt_subscribe(%s, %s::int, %s)", (filt, qos, BROKER))
        harness.wait_ingesting(self.db, self.mosq.port, probe_topic, timeout=30, qos=qos)

    # -- 1, 2: ingest --------------------------------------------------------------------------
    def fig_ingest(self, qos: int) -> None:
        n = self.n
        log(f"[ingest_q{qos}] ingest of a QoS {qos} backlog of {n:,} messages")
        # ceiling: mosquitto_sub draining its own persistent-session backlog
        ceil_topic = f"bench/ceil/in/q{qos}"
        cid = unique("ceil")
        base = [harness.MOSQUITTO_SUB, "-h", harness.HOST, "-p", str(self.mosq.port), "-c", "-i", cid,
                "-q", str(qos), "-t", ceil_topic]
        r = run_proc(base + ["-E"], timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"mosquitto_sub -E failed ({r.returncode}): {r.stderr}")
        t_pub = self.publish_backlog(ceil_topic, n, qos, lambda i: seq_payload(i, PAYLOAD_BYTES))
        log(f"  ceiling: {n:,} waiting for mosquitto_sub -c -i {cid} (published in {t_pub:.1f} s)")
        out_file = self.mosq.workdir / f"{cid}.txt"
        with open(out_file, "wb") as out:
            t0 = time.monotonic()
            r = run_proc(base + ["-C", str(n)], timeout=max(120, n / 500), stdout=out)
            t_ceil = time.monotonic() - t0
        seqs = [seq_of(line) for line in out_file.read_bytes().splitlines() if line]
        self.check(r.returncode == 0, f"ingest_q{qos} ceiling: mosquitto_sub exited {r.returncode}: {r.stderr}")
        self.check(len(seqs) == n and set(seqs) == set(range(n)),
                   f"ingest_q{qos} ceiling: mosquitto_sub got {len(seqs):,} messages, {len(set(seqs)):,} distinct "
                   f"of {n:,}")
        ceil = rate(n, t_ceil)
        log(f"  ceiling: drained in {t_ceil:.2f} s ({fmt_rate(ceil)})")

        prefix = f"bench/in/q{qos}"
        self.subscribe_live(f"{prefix}/#", qos, f"{prefix}/probe")
        self.stop_listener()
        t_pub = self.publish_backlog(f"{prefix}/data", n, qos, lambda i: seq_payload(i, PAYLOAD_BYTES))
        log(f"  mqtt_pg: {n:,} waiting in the worker's session (published in {t_pub:.1f} s); starting the listener")
        res = self.drain_into_pg(f"{prefix}/data", n, f"ingest_q{qos}")
        log(f"  mqtt_pg: stored in {res['seconds']:.2f} s ({fmt_rate(res['rate'])}), {res['batches']} transactions")
        self.ratio_row(f"ingest_q{qos}", f"ingest, QoS {qos} backlog of {n:,}", res["rate"], ceil, "msg/s",
                       "mosquitto_sub -c, same backlog", 0.9,
                       seconds=res["seconds"], ceiling_seconds=t_ceil, batches=res["batches"])

    # -- 2b: QoS 1 ingest and the Receive Maximum ----------------------------------------------
    def fig_flow(self) -> None:
        """Live QoS 1 ingest (the listener connected while a publisher sends N messages) from a
        broker with mosquitto's default window (max_inflight_messages 20): on MQTT 3.1.1 the
        broker sends at most 20 unacknowledged messages, and the worker acknowledges only after
        its commit, so a transaction stores at most 20; on MQTT 5 the worker announces its own
        Receive Maximum. (A backlog drained at reconnect is not held to the window by mosquitto
        2.0.11, which is why this figure is live.) Ceiling: mosquitto_sub -V 5 receiving the
        same live stream, timed from the first publish to its last message."""
        n = self.n
        recv_max = 10_000
        log(f"[ingest_q1_v5] live QoS 1 ingest of {n:,} from a broker with max_inflight_messages 20: "
            f"MQTT 3.1.1, then MQTT 5 with receive_maximum {recv_max:,}")
        mosq = Mosquitto(extra_conf=f"{MOSQUITTO_CONF}\nmax_inflight_messages 20\n"
                         "max_queued_messages 100000000").start()
        payload = lambda i: seq_payload(i, PAYLOAD_BYTES)  # noqa: E731
        try:
            ceil_topic = "bench/flow/ceil"
            out_file = mosq.workdir / "ceil5.txt"
            with open(out_file, "wb") as out:
                sub = subprocess.Popen([harness.MOSQUITTO_SUB, "-h", harness.HOST, "-p", str(mosq.port), "-V", "5",
                                        "-q", "1", "-t", ceil_topic, "-C", str(n)], stdout=out)
                wait_for(lambda: mosq.log_text().count(f" 1 {ceil_topic}") >= 1, timeout=20,
                         message="mosquitto_sub subscribed")
                t0 = time.monotonic()
                self.publish_backlog(ceil_topic, n, 1, payload, mosq=mosq)
                sub.wait(timeout=max(120, n / 500))
                t_ceil = time.monotonic() - t0
            seqs = [seq_of(line) for line in out_file.read_bytes().splitlines() if line]
            self.check(sub.returncode == 0 and len(seqs) == n and set(seqs) == set(range(n)),
                       f"ingest_q1_v5 ceiling: mosquitto_sub -V 5 got {len(seqs):,} of {n:,} ({sub.returncode})")
            ceil = rate(n, t_ceil)
            log(f"  ceiling: mosquitto_sub -V 5 received the live stream in {t_ceil:.2f} s ({fmt_rate(ceil)})")
            for version, rm in (("3.1.1", None), ("5", recv_max)):
                name = f"flow{version.replace('.', '')}"
                self.db.execute(
                    "INSERT INTO mqtt_broker (name, host, port, protocol_version, receive_maximum, active) "
                    "VALUES (%s, %s, %s, %s, %s, true)", (name, harness.HOST, mosq.port, version, rm))
                harness.wait_status(self.db, name, "connected", timeout=30)
                prefix = f"bench/flow/{name}"
                self.db.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{prefix}/#", name))
                harness.wait_ingesting(self.db, mosq.port, f"{prefix}/probe", timeout=30, qos=1)
                topic = f"{prefix}/data"
                h0 = self.max_history_id()
                t0 = time.monotonic()
                pub = threading.Thread(target=self.publish_backlog, args=(topic, n, 1, payload),
                                       kwargs={"mosq": mosq}, daemon=True)
                pub.start()
                wait_for(lambda: self.max_history_id() - h0 >= n and self.count_received(h0, topic)[0] >= n,
                         timeout=max(120, n / 200), interval=0.01, message=f"MQTT {version}: {n:,} stored")
                seconds = time.monotonic() - t0
                pub.join(60)
                time.sleep(0.3)  # late duplicates, if any, would show in the count below
                k, distinct = self.count_received(h0, topic)
                self.check(k == n and distinct == n, f"ingest_q1 MQTT {version}: {k:,} rows ({distinct:,} distinct), "
                           f"expected exactly {n:,}")
                batches = self.q("SELECT count(DISTINCT xmin::text) FROM mqtt_message_history WHERE id > %s "
                                 "AND topic = %s", (h0, topic))
                log(f"  MQTT {version}: stored in {seconds:.2f} s ({fmt_rate(rate(n, seconds))}), {batches} transactions")
                window = "the broker's window of 20" if rm is None else f"receive_maximum {rm:,}"
                self.ratio_row("ingest_q1_v5" if rm else "ingest_q1_311", f"live ingest, QoS 1, {n:,}, "
                               f"MQTT {version}, {window}", rate(n, seconds), ceil, "msg/s",
                               "mosquitto_sub -V 5, same stream", 0.9 if rm else None,
                               seconds=seconds, ceiling_seconds=t_ceil, batches=batches)
                self.db.execute("SELECT mqtt_stop_listener(%s)", (name,))
        finally:
            mosq.stop()

    # -- 3: routed ingest ----------------------------------------------------------------------
    def routed_probe(self, prefix: str) -> None:
        """JSON probes on prefix/probe until one lands in readings: the routed subscription is live."""
        deadline = time.monotonic() + 30
        while True:
            dev = unique("probe")
            harness.mosquitto_pub(self.mosq.port, f"{prefix}/probe", json.dumps({"device": dev, "value": 0}), qos=1)
            try:
                wait_for(lambda: self.db.execute("SELECT 1 FROM readings WHERE device = %s", (dev,)).fetchone(),
                         timeout=0.5, interval=0.05)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no probe on {prefix}/probe reached readings within 30 s") from None
        self.db.execute("DELETE FROM readings")

    def fig_routed(self) -> None:
        n = self.n
        log(f"[routed] QoS 1 ingest of {n:,} JSON messages: history only, then routed into a table")
        self.db.execute("CREATE TABLE readings (device text, value numeric, seq integer, topic text, "
                        "received_at timestamptz)")
        self.subscribe_live("bench/plain/#", 1, "bench/plain/probe")
        self.db.execute("SELECT mqtt_subscribe('bench/routed/#', 1, %s, target_table => 'readings')", (BROKER,))
        self.routed_probe("bench/routed")
        res = {}
        for kind in ("plain", "routed"):
            self.stop_listener()
            t_pub = self.publish_backlog(f"bench/{kind}/data", n, 1, json_payload)
            log(f"  {kind}: {n:,} waiting (published in {t_pub:.1f} s); starting the listener")
            res[kind] = self.drain_into_pg(f"bench/{kind}/data", n, f"routed ({kind})")
            log(f"  {kind}: stored in {res[kind]['seconds']:.2f} s ({fmt_rate(res[kind]['rate'])}), "
                f"{res[kind]['batches']} transactions")
        k, distinct, odd = self.db.execute(
            "SELECT count(*), count(DISTINCT seq), count(*) FILTER (WHERE device IS NULL OR value IS NULL "
            "OR topic <> 'bench/routed/data' OR received_at IS NULL) FROM readings").fetchone()
        self.check(k == n and distinct == n and odd == 0,
                   f"routed: {k:,} rows in readings ({distinct:,} distinct seq, {odd} incomplete), expected {n:,}")
        self.ratio_row("routed", f"routed ingest into a table, QoS 1, {n:,}", res["routed"]["rate"],
                       res["plain"]["rate"], "msg/s", "history only, same run", 0.5,
                       seconds=res["routed"]["seconds"], ceiling_seconds=res["plain"]["seconds"])

    # -- 4, 5: bulk publish and delivery -------------------------------------------------------
    def bulk_publish(self, qos: int) -> dict:
        """One SELECT of n mqtt_publish calls (statement + commit), then the delivery."""
        n = self.n
        self.checkpoint()
        h0 = self.max_history_id()
        t0 = time.monotonic()
        got = self.q("SELECT count(mqtt_publish('bench/pub/' || i, %s::text, %s::int)) FROM generate_series(1, %s) i",
                     (PAYLOAD, qos, n))
        t_commit = time.monotonic()
        self.check(got == n, f"bulk mqtt_publish returned {got}, expected {n}")
        left = self.q("SELECT count(*) FROM mqtt_outbox")
        drain = self.wait_delivered(h0, n, t_commit, f"delivery QoS {qos}", topic_prefix="bench/pub/")
        out = {"statement": t_commit - t0, "drain": drain, "left_at_commit": left}
        log(f"  mqtt_publish x {n:,} at QoS {qos}: {out['statement']:.2f} s ({fmt_rate(rate(n, out['statement']), 'rows/s')}); "
            f"delivered {drain:.2f} s after the commit ({fmt_rate(rate(n, drain))}; "
            f"{left:,} still queued just after it)")
        return out

    def fig_publish(self, res: dict) -> None:
        n = self.n
        self.db.execute("CREATE TABLE plain_outbox (id bigserial PRIMARY KEY, broker_id integer NOT NULL, "
                        "topic text NOT NULL, payload bytea NOT NULL, qos smallint NOT NULL, "
                        "retain boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL DEFAULT now())")
        self.checkpoint()
        t0 = time.monotonic()
        cur = self.db.execute("INSERT INTO plain_outbox (broker_id, topic, payload, qos) SELECT %s, 'bench/pub/' || i, "
                              "convert_to(%s::text, 'UTF8'), 1 FROM generate_series(1, %s) i", (self.broker_id, PAYLOAD, n))
        t_plain = time.monotonic() - t0
        self.check(cur.rowcount == n, f"plain INSERT ... SELECT wrote {cur.rowcount} rows, expected {n}")
        log(f"  ceiling: plain INSERT ... SELECT of {n:,} rows {t_plain:.2f} s ({fmt_rate(rate(n, t_plain), 'rows/s')})")
        self.ratio_row("publish", f"bulk mqtt_publish x {n:,} (QoS 1, + commit)", rate(n, res["statement"]),
                       rate(n, t_plain), "rows/s", "plain INSERT ... SELECT", 0.5,
                       seconds=res["statement"], ceiling_seconds=t_plain)

    def ceiling_publish(self, qos: int) -> float:
        cmd = [str(self.ceiling_bin), "--host", harness.HOST, "--port", str(self.mosq.port), "--count", str(self.n),
               "--qos", str(qos), "--size", str(PAYLOAD_BYTES), "--inflight", str(WORKER_INFLIGHT),
               "--topic", f"bench/ceil/q{qos}", "--timeout", "600"]
        r = run_proc(cmd, timeout=660)
        if r.returncode != 0:
            raise CheckFailed(f"publish_ceiling --qos {qos} failed ({r.returncode}): {r.stderr.strip()}")
        out = json.loads(r.stdout)
        self.check(out["count"] == self.n, f"publish_ceiling counted {out['count']}, expected {self.n}")
        log(f"  ceiling: rumqttc alone, QoS {qos}, inflight {WORKER_INFLIGHT}: {out['seconds']:.2f} s "
            f"({fmt_rate(rate(self.n, out['seconds']))})")
        return out["seconds"]

    def fig_publish_delivery(self) -> None:
        n = self.n
        log(f"[publish/delivery] {n:,} mqtt_publish calls in one statement, and their delivery")
        for qos in (1, 0, 2):
            if qos != 1 and not self.wants("delivery"):
                break
            res = self.bulk_publish(qos)
            if qos == 1 and self.wants("publish"):
                self.fig_publish(res)
            if self.wants("delivery"):
                ceil = self.ceiling_publish(qos)
                self.ratio_row(f"delivery_q{qos}", f"delivery after commit, QoS {qos}, {n:,}", rate(n, res["drain"]),
                               rate(n, ceil), "msg/s", f"rumqttc alone, inflight {WORKER_INFLIGHT}",
                               0.7 if qos == 1 else None, seconds=res["drain"], ceiling_seconds=ceil,
                               statement_seconds=res["statement"])

    # -- 6: pgbench ----------------------------------------------------------------------------
    def pgbench(self, script: str, name: str, path: Path) -> dict:
        path.write_text(script)
        path.chmod(0o644)
        cmd = ["runuser", "-u", harness.PG_USER, "--", PGBENCH, "-h", harness.HOST, "-p", str(self.pg.port),
               "-U", OWNER, "-n", "-c", "4", "-j", "2", "-T", str(self.args.pgbench_seconds), "-f", str(path), DB]
        r = run_proc(cmd, timeout=self.args.pgbench_seconds + 120)
        if r.returncode != 0:
            raise CheckFailed(f"pgbench {name} failed ({r.returncode}): {r.stderr.strip()[-500:]}")

        def grab(pattern: str) -> float:
            m = re.search(pattern, r.stdout)
            if not m:
                raise CheckFailed(f"pgbench {name}: no {pattern!r} in its output:\n{r.stdout}")
            return float(m.group(1))

        out = {"tps": grab(r"tps = ([\d.]+) \(without initial connection time\)"),
               "transactions": int(grab(r"number of transactions actually processed: (\d+)")),
               "latency_ms": grab(r"latency average = ([\d.]+) ms")}
        m = re.search(r"number of failed transactions: (\d+)", r.stdout)
        out["failed"] = int(m.group(1)) if m else 0
        self.check(out["failed"] == 0, f"pgbench {name}: {out['failed']} failed transactions")
        log(f"  {name}: {out['tps']:,.0f} tps, {out['transactions']:,} transactions, latency {out['latency_ms']:.2f} ms")
        return out

    def fig_pgbench(self) -> None:
        secs = self.args.pgbench_seconds
        log(f"[pgbench] -c 4 -j 2 -T {secs}: INSERT + INSERT, then INSERT + mqtt_publish (QoS 1) while delivering")
        self.db.execute("CREATE TABLE t1 (id bigserial PRIMARY KEY, v integer)")
        self.db.execute("CREATE TABLE t2 (id bigserial PRIMARY KEY, v integer)")
        head = "\\set r random(1, 1000000)\nBEGIN;\nINSERT INTO t1 (v) VALUES (:r);\n"
        a_script = head + "INSERT INTO t2 (v) VALUES (:r);\nEND;\n"
        b_script = head + f"SELECT mqtt_publish('bench/tx', '{PAYLOAD}', 1);\nEND;\n"
        with tempfile.TemporaryDirectory(prefix="mqtt_pg_bench_") as d:
            workdir = Path(d)
            workdir.chmod(0o755)
            self.checkpoint()
            a = self.pgbench(a_script, "A (INSERT + INSERT)", workdir / "a.sql")
            k1, k2 = self.db.execute("SELECT (SELECT count(*) FROM t1), (SELECT count(*) FROM t2)").fetchone()
            self.check(k1 == k2 == a["transactions"],
                       f"pgbench A: t1 {k1:,} / t2 {k2:,} rows, pgbench reports {a['transactions']:,} transactions")
            self.checkpoint()
            h0 = self.max_history_id()
            b = self.pgbench(b_script, "B (INSERT + mqtt_publish)", workdir / "b.sql")
        t_end = time.monotonic()
        left = self.q("SELECT count(*) FROM mqtt_outbox")
        drain = self.wait_delivered(h0, b["transactions"], t_end, "pgbench B", unique=False, topic="bench/tx")
        log(f"  B: {left:,} still in the outbox when pgbench ended, delivered {drain:.2f} s later")
        self.ratio_row("pgbench", f"pgbench INSERT + mqtt_publish, -c 4 -T {secs}", b["tps"], a["tps"], "tps",
                       "INSERT + INSERT", 0.8, transactions=b["transactions"], ceiling_transactions=a["transactions"],
                       outbox_left_at_end=left)

    # -- 7: watched bulk UPDATE ----------------------------------------------------------------
    def fig_watch(self) -> None:
        n = self.n
        log(f"[watch] UPDATE of {n:,} rows, unwatched and watched (mqtt_watch_table, QoS 1)")
        for t in ("bench_plain", "bench_watched"):
            self.db.execute(f"CREATE TABLE {t} (id serial PRIMARY KEY, a int, b int, c text, d numeric)")
            self.db.execute(f"INSERT INTO {t} (a, b, c, d) SELECT g, g %% 100, 'item ' || g, g * 1.25 "
                            "FROM generate_series(1, %s) g", (n,))
            self.db.execute(f"VACUUM ANALYZE {t}")
        self.db.execute("SELECT mqtt_watch_table('bench_watched', 'bench/rows/{id}', 1)")
        upd = "UPDATE {} SET a = a + 1, d = d + 0.01"
        self.checkpoint()
        t0 = time.monotonic()
        self.db.execute(upd.format("bench_plain"))
        t_plain = time.monotonic() - t0
        self.checkpoint()
        h0 = self.max_history_id()
        t0 = time.monotonic()
        self.db.execute(upd.format("bench_watched"))
        t_commit = time.monotonic()
        t_watched = t_commit - t0
        drain = self.wait_delivered(h0, n, t_commit, "watch", topic_prefix="bench/rows/")
        log(f"  unwatched {t_plain:.2f} s, watched {t_watched:.2f} s; its {n:,} messages delivered "
            f"{drain:.2f} s after the commit ({fmt_rate(rate(n, drain))})")
        r = t_watched / t_plain if t_plain > 0 else float("inf")
        self.row("watch", f"watched bulk UPDATE of {n:,} rows (+ commit)", t_watched, "s", f"{t_watched:.2f} s",
                 t_plain, f"{t_plain:.2f} s (same UPDATE, unwatched)", r, f"{r:.1f}x the time", "<= 2x", r <= 2,
                 drain_seconds=drain)

    # -- 8: latency ----------------------------------------------------------------------------
    def fig_latency(self, sync: bool) -> None:
        """sync=False: the publishing session runs with synchronous_commit = off, so the time its
        own commit waits for the disk (a WAL flush, 1 to 3 ms on this kind of machine and more
        under load) is not counted: what is left is mqtt_pg's path, commit to broker to
        subscriber. sync=True: the same with every commit flushed, reported beside it."""
        tx_rate, secs = 1000, self.args.latency_seconds
        count = int(tx_rate * secs)
        mode = "on" if sync else "off"
        log(f"[latency] mqtt_publish at a fixed {tx_rate:,} tx/s for {secs:g} s, call to receipt (QoS 1), "
            f"publisher synchronous_commit = {mode}")
        sub = MqttSub(self.mosq.port).connect()
        try:
            sub.subscribe("bench/lat", qos=1)
            conn = psycopg.connect(host=harness.HOST, port=self.pg.port, dbname=DB, user=OWNER, autocommit=True)
            conn.execute(f"SET synchronous_commit = {mode}")
            call: list[float] = []
            stmt = "SELECT mqtt_publish('bench/lat', %s, 1)"
            h0 = self.max_history_id()
            for i in range(20):  # warm up: the statement prepared, the subscription's path taken
                conn.execute(stmt, (f"warmup {i}".ljust(PAYLOAD_BYTES, "x"),))
            sub.wait_count(20, timeout=10)
            self.wait_delivered(h0, 20, time.monotonic(), "latency (warm-up)", topic="bench/lat")
            h0 = self.max_history_id()
            period = 1.0 / tx_rate
            start = time.monotonic() + 0.05
            for i in range(count):
                deadline = start + i * period
                while (d := deadline - time.monotonic()) > 0:
                    time.sleep(d)
                t_ns = time.monotonic_ns()  # the payload carries it: "<seq> <send time ns> xxx..."
                conn.execute(stmt, (f"{i:08d} {t_ns} ".ljust(PAYLOAD_BYTES, "x"),))
                call.append(time.monotonic() - t_ns / 1e9)
            elapsed = time.monotonic() - start
            conn.close()
            try:
                sub.wait_count(20 + count, timeout=60)
            except AssertionError:
                pass
            time.sleep(0.3)  # duplicates, if any
        finally:
            sub.close()
        # (seq, receipt - send time) of each message but the warm-up's; times are time.monotonic()
        got = [(int(m[1].split()[0]), t - int(m[1].split()[1]) / 1e9)
               for m, t in zip(list(sub.messages), list(sub.times)) if not m[1].startswith(b"warmup")]
        seqs = [s for s, _ in got]
        self.check(len(seqs) == count and set(seqs) == set(range(count)),
                   f"latency: the subscriber got {len(seqs):,} messages ({len(set(seqs)):,} distinct) of {count:,}")
        first: dict[int, float] = {}
        for s, lat in got:
            first.setdefault(s, lat)
        lat_ms = sorted(lat * 1000 for lat in first.values())
        self.wait_delivered(h0, count, time.monotonic(), "latency", topic="bench/lat")
        achieved = count / elapsed
        if not lat_ms:
            raise CheckFailed("latency: nothing received")
        p50, p99, mx = statistics.median(lat_ms), harness.percentile(lat_ms, 99), lat_ms[-1]
        call_ms = sorted(c * 1000 for c in call)
        log(f"  p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {mx:.2f} ms at {achieved:,.0f} tx/s; the call itself "
            f"(+ commit): p50 {statistics.median(call_ms):.2f} ms, p99 {harness.percentile(call_ms, 99):.2f} ms")
        name, label = ("latency_sync", "publisher's commits flushed") if sync else \
            ("latency", "publisher synchronous_commit = off")
        self.row(name, f"call to receipt at {tx_rate:,} tx/s, {secs:g} s ({label})", p99, "ms",
                 f"p50 {p50:.2f} / p99 {p99:.2f} / max {mx:.1f} ms at {achieved:,.0f} tx/s", None, "-", None, "-",
                 "-" if sync else "p99 < 5 ms", None if sync else p99 < 5, p50_ms=p50, max_ms=mx,
                 achieved_tps=achieved,
                 call_p50_ms=statistics.median(call_ms), call_p99_ms=harness.percentile(call_ms, 99))

    # -- 9: soak -------------------------------------------------------------------------------
    def fig_status(self) -> None:
        rows = min(self.n * 10, 1_000_000)
        name = "bench_status"
        bid = self.q("INSERT INTO mqtt_broker (name, host, port) VALUES (%s, %s, %s) RETURNING id",
                     (name, harness.HOST, self.mosq.port))
        try:
            self.q("SELECT count(mqtt_publish('bench/status', %s::text, 1, false, %s)) FROM generate_series(1, %s)",
                   (PAYLOAD, name, rows))
            self.db.execute("INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction) "
                            "SELECT %s, 'bench/status', convert_to(%s::text, 'UTF8'), 0, 'receive' "
                            "FROM generate_series(1, %s)", (bid, PAYLOAD, rows))
            polls = []
            for _ in range(20):
                t0 = time.monotonic()
                got = self.db.execute("SELECT * FROM mqtt_broker_status WHERE broker_id = %s", (bid,)).fetchall()
                polls.append(time.monotonic() - t0)
            depth = got[0][16] if got else None
            self.check(depth is not None and depth >= min(rows, 10_001),
                       f"mqtt_broker_status showed outbox_depth {depth} for {rows} queued rows")
            naive = []
            for _ in range(3):
                t0 = time.monotonic()
                self.db.execute("SELECT (SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s), "
                                "(SELECT count(*) FROM mqtt_message_history WHERE broker_id = %s)", (bid, bid)).fetchone()
                naive.append(time.monotonic() - t0)
            poll_ms, naive_ms = statistics.median(polls) * 1000, statistics.median(naive) * 1000
            log(f"  mqtt_broker_status with {rows:,} queued and {rows:,} in history: median {poll_ms:.2f} ms "
                f"(max {max(polls) * 1000:.2f} ms); count(*) of both: {naive_ms:.1f} ms")
            self.row("status", f"mqtt_broker_status poll, {rows:,} rows queued + {rows:,} in history",
                     poll_ms, "ms", f"{poll_ms:.2f} ms", naive_ms, f"{naive_ms:.1f} ms (count(*) of both)",
                     poll_ms / naive_ms if naive_ms > 0 else None,
                     f"{poll_ms / naive_ms:.3f}" if naive_ms > 0 else "?", "< 10 ms", poll_ms < 10)
        finally:
            self.db.execute("DELETE FROM mqtt_broker WHERE id = %s", (bid,))
            self.db.execute("DELETE FROM mqtt_message_history WHERE broker_id = %s", (bid,))

    def fig_soak(self) -> None:
        minutes = self.args.soak
        per_s, tick = 2000, 0.01
        per_tick = int(per_s * tick)
        log(f"[soak] {minutes:g} minute(s) at {per_s:,} msg/s each way (ingest QoS 1; "
            f"{per_tick} mqtt_publish per transaction every {tick * 1000:.0f} ms)")
        self.subscribe_live("bench/soak/in/#", 1, "bench/soak/in/probe")
        h0 = self.max_history_id()
        stop = threading.Event()
        errors: list[str] = []
        counts = {"in": 0, "out": 0}
        pub = SeqPublisher(self.mosq.port).connect()

        def paced(step: Callable[[int], None]) -> None:
            next_at, k = time.monotonic(), 0
            try:
                while not stop.is_set():
                    step(k)
                    k += 1
                    next_at += tick
                    stop.wait(max(0.0, next_at - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - reported as a failure at the end
                errors.append(f"{type(e).__name__}: {e}")

        def ingest_step(k: int) -> None:
            if pub.sent - pub.acked() > 20_000:
                raise RuntimeError("the broker stopped acknowledging the ingest publisher")
            for j in range(per_tick):
                pub.publish("bench/soak/in/data", seq_payload(counts["in"], PAYLOAD_BYTES), 1)
                counts["in"] += 1

        conn = psycopg.connect(host=harness.HOST, port=self.pg.port, dbname=DB, user=OWNER, autocommit=True)

        def publish_step(k: int) -> None:
            first = counts["out"]
            with conn.transaction():
                with conn.cursor() as cur:
                    cur.executemany("SELECT mqtt_publish('bench/soak/out', %s, 1)",
                                    [(seq_payload(first + j, PAYLOAD_BYTES),) for j in range(per_tick)])
            counts["out"] = first + per_tick

        threads = [threading.Thread(target=paced, args=(ingest_step,), name="soak-ingest", daemon=True),
                   threading.Thread(target=paced, args=(publish_step,), name="soak-publish", daemon=True)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        total = minutes * 60
        minute = 0
        s0 = harness.broker_status(self.db, BROKER)
        try:
            while True:
                now = time.monotonic() - t0
                if now >= total or errors:
                    break
                stop.wait(min(60 * (minute + 1), total) - now)
                if stop.is_set():
                    break
                minute += 1
                el = time.monotonic() - t0
                st = harness.broker_status(self.db, BROKER)
                w = self.sampler.window(t0 + el - 60, t0 + el)
                pk, last = self.sampler.peaks(w), self.sampler.last()
                log(f"  {el / 60:5.1f} min: worker private {last['private'] / MIB:6.1f} MiB (peak this minute "
                    f"{pk['private'] / MIB:6.1f}), RSS {last['rss'] / MIB:6.1f} MiB, anon {last['anon'] / MIB:6.1f} MiB | "
                    f"published in {counts['in']:,}, out {counts['out']:,} | worker received "
                    f"{st.get('messages_received', 0) - s0.get('messages_received', 0):,}, sent "
                    f"{st.get('messages_sent', 0) - s0.get('messages_sent', 0):,}")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            conn.close()
        elapsed = time.monotonic() - t0
        try:
            pub.wait_all_acked(timeout=60)
        finally:
            pub.close()
        for e in errors:
            self.check(False, f"soak: {e}")
        n_in, n_out = counts["in"], counts["out"]
        log(f"  stopped after {elapsed:.0f} s: {n_in:,} published in ({n_in / elapsed:,.0f}/s), "
            f"{n_out:,} out ({n_out / elapsed:,.0f}/s); waiting for the last to be stored and delivered")
        t_end = time.monotonic()
        wait_for(lambda: self.q("SELECT count(*) FROM mqtt_message_history WHERE id > %s AND direction = 'receive' "
                                "AND topic = 'bench/soak/in/data'", (h0,)) >= n_in, timeout=120, interval=0.2,
                 message=f"{n_in:,} soak messages stored")
        self.wait_delivered(h0, n_out, t_end, "soak (publish)", topic="bench/soak/out")
        k, distinct = self.count_received(h0, "bench/soak/in/data")
        self.check(k == n_in and distinct == n_in,
                   f"soak (ingest): {k:,} history rows ({distinct:,} distinct), expected exactly {n_in:,}")
        span = min(60.0, elapsed / 2)
        first = self.sampler.peaks(self.sampler.window(t0, t0 + span))
        last = self.sampler.peaks(self.sampler.window(t0 + elapsed - span, t0 + elapsed))
        for key, label in (("private", "private memory"), ("anon", "Anonymous memory"), ("rss", "VmRSS")):
            r = last[key] / first[key] if first[key] else float("inf")
            # The target is on Anonymous memory, the process's own heap: Private_* also counts
            # pages of the shared buffers that only the worker has touched so far, which grow
            # as it touches more of them and are not its memory to leak.
            flat = key == "anon"
            self.row(f"soak_{key}", f"soak: worker {label}, peak of the last minute vs the first",
                     last[key] / MIB, "MiB", f"{last[key] / MIB:.1f} MiB", first[key] / MIB,
                     f"{first[key] / MIB:.1f} MiB (first minute)", r, f"{r:.3f}", "<= 1.10" if flat else "-",
                     r <= 1.10 if flat else None)
        for key, n, label in (("in", n_in, "ingest"), ("out", n_out, "mqtt_publish")):
            got = n / elapsed
            self.row(f"soak_rate_{key}", f"soak: {label} rate kept, {n:,} messages", got, "msg/s",
                     fmt_rate(got), per_s, f"{per_s:,} msg/s (asked)", got / per_s, f"{got / per_s:.3f}",
                     ">= 0.99", got / per_s >= 0.99)

    # -- run -----------------------------------------------------------------------------------
    def run_figures(self) -> None:
        plan: list[tuple[str, Callable[[], None]]]
        if self.args.soak:
            plan = [("soak", self.fig_soak)]
        else:
            plan = [("ingest_q0", lambda: self.fig_ingest(0)), ("ingest_q1", lambda: self.fig_ingest(1)),
                    ("ingest_q1_v5", self.fig_flow),
                    ("routed", self.fig_routed), ("publish", self.fig_publish_delivery),
                    ("pgbench", self.fig_pgbench), ("watch", self.fig_watch), ("latency", lambda: self.fig_latency(False)),
                    ("latency", lambda: self.fig_latency(True)), ("status", self.fig_status)]
            plan = [(k, f) for k, f in plan
                    if self.wants(k) or (k == "publish" and self.wants("delivery"))]
        for name, fn in plan:
            t0 = time.monotonic()
            try:
                fn()
            except (CheckFailed, AssertionError, psycopg.Error, RuntimeError, subprocess.TimeoutExpired) as e:
                self.check(False, f"{name}: {type(e).__name__}: {first_line(e)}")
                if not self.pg.running():
                    raise RuntimeError("PostgreSQL is no longer running") from e
                self.recover()
            finally:
                self.timings[name] = time.monotonic() - t0
                log(f"  ({name}: {self.timings[name]:.1f} s)")

    def recover(self) -> None:
        """After a failed figure: a fresh connection, the listener running again."""
        try:
            self.db.close()
        except Exception:  # noqa: BLE001
            pass
        self.db = psycopg.connect(host=harness.HOST, port=self.pg.port, dbname=DB, user=OWNER, autocommit=True)
        self.db.execute("SELECT mqtt_start_listener(%s)", (BROKER,))

    def final_checks(self) -> None:
        log(f"figures done; load average {os.getloadavg()[0]:.2f} (1 min) / {os.getloadavg()[1]:.2f} (5 min)")
        try:
            wait_for(self.outbox_empty, timeout=60, interval=0.1, message="mqtt_outbox to be empty at the end")
        except AssertionError:
            pass
        left = self.q("SELECT count(*) FROM mqtt_outbox")
        self.check(left == 0, f"the outbox holds {left:,} rows at the end")
        dead, err = self.db.execute("SELECT count(*), min(error) FROM mqtt_dead_letter").fetchone()
        self.check(dead == 0, f"{dead} dead letters, e.g. {err}")
        crashes = [ln for ln in self.pg.log_text().splitlines()
                   if any(k in ln for k in ("terminated by signal", "PANIC", "panicked"))]
        if crashes:
            self.check(False, f"the server log shows {len(crashes)} crash line(s), first: {crashes[0]}")

    def environment_notes(self) -> None:
        """What may have disturbed the run; never a failure by itself."""
        if self.sampler and len(self.sampler.pids) > 1:
            self.notes.append(f"the worker's pid changed during the run: {self.sampler.pids}")
        mtime = SO_PATH.stat().st_mtime if SO_PATH.exists() else None
        reloaded = self.pg is not None and any(k in self.pg.log_text() for k in (
            "could not load library", 'could not access file "$libdir/mqtt_pg"'))
        if mtime != self.so_mtime or reloaded:
            self.notes.append("mqtt_pg.so was reinstalled during the run"
                              + (" and the server could not load it" if reloaded else "")
                              + ": run the benchmark again for figures of one build")

    def teardown(self) -> None:
        self.environment_notes()
        if self.sampler:
            self.sampler.stop()
        for c in (self.db, self.su):
            try:
                if c is not None:
                    c.close()
            except Exception:  # noqa: BLE001
                pass
        if self.failures and self.pg is not None:
            print(f"\n--- PostgreSQL log tail ({self.pg.logfile}) ---\n{tail(self.pg.log_text(), 40)}")
        for server in (self.mosq, self.pg):
            if server is not None:
                try:
                    server.destroy()
                except Exception as e:  # noqa: BLE001 - keep stopping the rest
                    print(f"could not stop {server!r}: {e}", file=sys.stderr)

    # -- report --------------------------------------------------------------------------------
    def memory_line(self) -> str:
        if not self.sampler or not self.sampler.samples:
            return "worker memory: no samples"
        p = self.sampler.peaks()
        return (f"worker memory (whole run, every {self.sampler.interval:g} s, {p['samples']:,} samples, pid "
                f"{', '.join(map(str, self.sampler.pids))}): peak private (Private_Clean + Private_Dirty) "
                f"{p['private'] / MIB:.1f} MiB, peak VmRSS {p['rss'] / MIB:.1f} MiB (peak Anonymous "
                f"{p['anon'] / MIB:.1f} MiB)")

    def print_table(self) -> None:
        if not self.rows:
            return
        heads = ("figure", "mqtt_pg", "ceiling (what)", "ratio", "target", "met")
        cells = [(r["figure"], r["mqtt_pg"], r["ceiling_what"], r["ratio_shown"], r["target"],
                  "-" if r["met"] is None else ("yes" if r["met"] else "no")) for r in self.rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        print("\n| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |")
        print("| " + " | ".join("-" * w for w in widths) + " |")
        for c in cells:
            print("| " + " | ".join(x.ljust(w) for x, w in zip(c, widths)) + " |")

    def write_json(self, path: str, code: int, seconds: float) -> None:
        mem = self.sampler.peaks() if self.sampler and self.sampler.samples else {}
        doc = {"exit_code": code, "seconds": round(seconds, 1), "messages": self.n,
               "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(self.args).items() if k != "json"},
               "worker_inflight": WORKER_INFLIGHT,
               "so_mtime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.so_mtime)) if self.so_mtime else None,
               "figures": self.rows,
               "worker_memory_bytes": {"peak_private": mem.get("private"), "peak_rss": mem.get("rss"),
                                       "peak_anonymous": mem.get("anon"), "samples": mem.get("samples"),
                                       "pids": self.sampler.pids if self.sampler else []},
               "figure_seconds": {k: round(v, 1) for k, v in self.timings.items()},
               "failures": self.failures, "notes": self.notes}
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        log(f"figures written to {path}")


# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5,000 messages, pgbench -T 3, 2 s of latency (CI)")
    p.add_argument("--messages", type=int, help="N: messages per figure (default 100,000; --quick 5,000)")
    p.add_argument("--only", help=f"comma-separated figures to run: {', '.join(FIGURES)}")
    p.add_argument("--soak", type=float, metavar="MINUTES", help="run the soak instead of the other figures")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    a = p.parse_args()
    a.messages = a.messages or (5_000 if a.quick else 100_000)
    if a.messages < 1:
        p.error("--messages must be positive")
    if a.only is not None:
        a.only = {x.strip() for x in a.only.split(",") if x.strip()}
        unknown = a.only - set(FIGURES)
        if unknown or not a.only:
            p.error(f"--only takes {', '.join(FIGURES)}; not {', '.join(sorted(unknown)) or 'nothing'}")
    if a.soak is not None:
        if a.soak <= 0:
            p.error("--soak needs a positive number of minutes")
        if a.only is not None:
            p.error("--soak runs instead of the other figures: leave out --only")
    a.pgbench_seconds = 3 if a.quick else 10
    a.latency_seconds = 2.0 if a.quick else 10.0
    return a


def main() -> int:
    args = parse_args()

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    bench = Bench(args)
    t_start = time.monotonic()
    code = 0
    try:
        try:
            bench.setup()
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a setup error: say what
            log(f"SETUP ERROR: {type(e).__name__}: {e}")  # all of it: pg_ctl's output and the log
            bench.failures.append(f"setup: {e}")
            code = 2
        if code == 0:
            bench.run_figures()
            bench.final_checks()
            code = 1 if bench.failures else 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        code = 130
    except Exception as e:  # noqa: BLE001 - the servers went away under us
        log(f"ERROR: {type(e).__name__}: {first_line(e)}")
        bench.failures.append(f"error: {first_line(e)}")
        code = 1
    finally:
        bench.teardown()
    seconds = time.monotonic() - t_start

    bench.print_table()
    print("\n" + bench.memory_line())
    for note in bench.notes:
        print(f"note: {note}")
    if args.json:
        bench.write_json(args.json, code, seconds)
    if bench.failures:
        print("\nFAILED:")
        for f in bench.failures:
            print(f"  - {f}")
    elif code == 0:
        print(f"\nOK: every correctness check passed ({seconds:.0f} s; a 'no' under met is a missed "
              f"performance target, not a failure)")
    return code


if __name__ == "__main__":
    sys.exit(main())
