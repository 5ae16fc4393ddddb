#!/usr/bin/env python3
"""Backlog drain benchmark (issue 3, point 5): a backlog of N committed outgoing messages (default
1,000,000) drains completely, in bounded batches, without a crash or an out-of-memory, while new
publishes keep being accepted.

    .venv/bin/python scripts/drain_1m.py                    # 1,000,000 messages, QoS 1, 100 bytes
    .venv/bin/python scripts/drain_1m.py --count 100000 --qos 0 --payload-bytes 200

What it does, all on throw-away servers of its own (tests/e2e/harness.py, free 127.0.0.1 ports):

1. starts PostgreSQL 15 with mqtt_pg preloaded and a mosquitto without inflight/queue limits,
   creates database `drain` with the extension and a broker row for the mosquitto whose listener
   is stopped (active = false);
2. queues N messages with `SELECT mqtt_publish(...) FROM generate_series(...)` in a few committed
   transactions (`--txn-size`); each payload starts with its sequence number ("123:xxxx...");
3. starts `mosquitto_sub` on the run's topics, writing to a file (an independent count);
4. starts the listener and measures until the backlog is gone: drain time, messages/s, the
   worker's RSS (VmRSS, RssAnon and VmHWM from /proc/<pid>/status, sampled every 0.2 s) and that
   the postmaster and the worker keep their pids. Meanwhile a thread calls mqtt_publish in its own
   committed transaction `--extra-rate` times a second and records each call's latency;
5. checks: outbox empty, exactly N + extra 'send' history rows, no dead letters, the subscriber got
   every sequence number (duplicates counted and printed), no crash; prints a table of figures.
   Exits 1 if anything is missing, 2 on a setup error, 130 on Ctrl-C.

Progress is measured with `SELECT min(id) FROM mqtt_outbox` (an index probe): the backlog's ids
are consecutive and rows leave in commit order, so what remains is `last_id - min(id) + 1`. A
`count(*)` over a million-row table every 0.5 s would take CPU from the 2-core machine being
measured; exact counts are taken once the backlog is gone.
Every process it starts is stopped at the end (try/finally, also on Ctrl-C and SIGTERM).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import harness  # noqa: E402
from harness import Mosquitto, PgCluster, tail, wait_for  # noqa: E402

DB = "drain"
BROKER = "drain"
MIB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# worker memory


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM, RssAnon, RssShmem (bytes) of a process, None once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        return None
    return out


class RssSampler(threading.Thread):
    """Samples the worker's /proc status every `interval` seconds; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak_rss = 0
        self.peak_anon = 0
        self.peak_shmem = 0
        self.hwm = 0
        self.last: dict[str, int] = {}
        self.samples = 0
        self.gone = False

    def run(self) -> None:
        while not self.stop_event.is_set():
            s = proc_status(self.pid)
            if s is None:
                self.gone = True
                return
            self.last = s
            self.samples += 1
            self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self.peak_shmem = max(self.peak_shmem, s.get("RssShmem", 0))
            self.hwm = max(self.hwm, s.get("VmHWM", 0))
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# ----------------------------------------------------------------------------------------------
# concurrent publisher


class ExtraPublisher(threading.Thread):
    """Calls mqtt_publish in its own committed transaction `rate` times a second (one autocommit
    statement = call + commit) and records the latency of each call; sequence numbers from `first`."""

    def __init__(self, pg: PgCluster, topic: str, qos: int, first: int, rate: float, payload_bytes: int):
        super().__init__(name="extra-publisher", daemon=True)
        self.pg = pg
        self.topic = topic
        self.qos = qos
        self.next_seq = first
        self.first = first
        self.rate = rate
        self.payload_bytes = payload_bytes
        self.stop_event = threading.Event()
        self.latencies: list[float] = []
        self.errors: list[str] = []

    @property
    def sent(self) -> int:
        return self.next_seq - self.first

    def run(self) -> None:
        try:
            conn = self.pg.connect(DB)
        except Exception as e:  # noqa: BLE001 - reported at the end
            self.errors.append(f"connect: {e}")
            return
        period = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while not self.stop_event.is_set():
                seq = self.next_seq
                payload = f"{seq}:".ljust(self.payload_bytes, "x")
                t0 = time.monotonic()
                try:
                    conn.execute("SELECT mqtt_publish(%s::text, %s::text, %s::int, false, %s::text)",
                                 (self.topic, payload, self.qos, BROKER))
                except Exception as e:  # noqa: BLE001 - a refused publish is a finding, not a crash
                    self.errors.append(f"seq {seq}: {e}")
                    if len(self.errors) > 20:
                        return
                else:
                    self.latencies.append(time.monotonic() - t0)
                    self.next_seq += 1
                next_at += period
                self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        finally:
            conn.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)


# ----------------------------------------------------------------------------------------------
# subscriber


def count_lines(path: Path, state: dict) -> int:
    """Lines in a growing file, reading only what was appended since the last call."""
    with open(path, "rb") as f:
        f.seek(state.get("offset", 0))
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            state["lines"] = state.get("lines", 0) + chunk.count(b"\n")
            state["offset"] = state.get("offset", 0) + len(chunk)
    return state.get("lines", 0)


def analyse_received(path: Path, expected_max: int, expected_extra: range) -> dict:
    """Distinct sequence numbers, duplicates and what is missing among 1..expected_max."""
    seen = bytearray(expected_max + 1)
    total = dups = bad = 0
    with open(path, "rb") as f:
        for line in f:
            total += 1
            try:
                seq = int(line.split(b":", 1)[0])
            except ValueError:
                bad += 1
                continue
            if not 1 <= seq <= expected_max:
                bad += 1
                continue
            if seen[seq]:
                dups += 1
            else:
                seen[seq] = 1
    distinct = sum(seen)
    missing = [i for i in range(1, expected_max + 1) if not seen[i]]
    missing_extra = [i for i in expected_extra if not seen[i]]
    return {"total": total, "distinct": distinct, "duplicates": dups, "unexpected": bad,
            "missing": missing, "missing_extra": missing_extra}


# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000, help="backlog size (default 1,000,000)")
    p.add_argument("--qos", type=int, default=1, choices=(0, 1, 2), help="QoS of every message (default 1)")
    p.add_argument("--payload-bytes", type=int, default=100, help="payload size in bytes (default 100)")
    p.add_argument("--txn-size", type=int, default=250_000,
                   help="messages per queuing transaction (default 250,000: 4 transactions for 1M)")
    p.add_argument("--extra-rate", type=float, default=10.0,
                   help="concurrent mqtt_publish calls per second while draining (default 10)")
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds of draining")
    p.add_argument("--stall-timeout", type=float, default=120,
                   help="give up when the backlog has not shrunk for this many seconds (default 120)")
    p.add_argument("--pg-conf", default="", help="extra postgresql.conf lines (\\n-separated)")
    a = p.parse_args()
    if a.count < 1 or a.txn_size < 1 or a.extra_rate <= 0:
        p.error("--count, --txn-size and --extra-rate must be positive")
    need = len(str(a.count * 10)) + 1
    if a.payload_bytes < need:
        p.error(f"--payload-bytes must be at least {need} (sequence number and ':')")
    return a


def main() -> int:
    args = parse_args()
    run = uuid.uuid4().hex[:8]
    backlog_topic = f"drain/{run}/backlog"
    live_topic = f"drain/{run}/live"
    topic_filter = f"drain/{run}/#"
    n = args.count

    pg: PgCluster | None = None
    mosq: Mosquitto | None = None
    sub: subprocess.Popen | None = None
    sub_out = None
    sampler: RssSampler | None = None
    extra: ExtraPublisher | None = None
    failures: list[str] = []
    figures: list[tuple[str, str]] = []

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)

    try:
        # -- servers -------------------------------------------------------------------------
        so = harness.pkglibdir() / "mqtt_pg.so"
        log(f"mqtt_pg.so built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(so.stat().st_mtime))}"
            if so.exists() else "mqtt_pg.so not found (is the extension installed?)")
        pg = PgCluster(preload=True, extra_conf=args.pg_conf.replace("\\n", "\n")).init()
        pg.start()
        mosq = Mosquitto().start()
        log(f"PostgreSQL on port {pg.port} ({pg.datadir}), mosquitto on port {mosq.port}")
        pg.create_database(DB)
        conn = pg.connect(DB)
        conn.execute("CREATE EXTENSION mqtt_pg")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0]
        conn.execute("INSERT INTO mqtt_broker (name, host, port) VALUES (%s, %s, %s)",
                     (BROKER, harness.HOST, mosq.port))
        status = harness.broker_status(conn, BROKER)
        if status.get("status") != "stopped":
            raise RuntimeError(f"broker should be stopped before queuing, mqtt_status says {status}")
        postmaster = pg.postmaster_pid()
        worker_pids = wait_for(lambda: pg.worker_pids(DB), timeout=30, message=f"the mqtt_pg worker of {DB}")
        worker = worker_pids[0]
        log(f"extension {version}; postmaster pid {postmaster}, worker pid {worker}; listener stopped")

        # -- backlog ---------------------------------------------------------------------------
        log(f"queuing {n:,} messages (QoS {args.qos}, {args.payload_bytes} bytes) "
            f"in transactions of {args.txn_size:,}")
        first_id = last_id = None
        t0 = time.monotonic()
        for lo in range(1, n + 1, args.txn_size):
            hi = min(n, lo + args.txn_size - 1)
            t1 = time.monotonic()
            lo_id, hi_id, rows = conn.execute(
                "SELECT min(x), max(x), count(*) FROM (SELECT mqtt_publish(%s::text, "
                "rpad(g::text || ':', %s::int, 'x'), %s::int, false, %s::text) AS x "
                "FROM generate_series(%s::int, %s::int) AS g) s",
                (backlog_topic, args.payload_bytes, args.qos, BROKER, lo, hi)).fetchone()
            if rows != hi - lo + 1:
                raise RuntimeError(f"queued {rows} rows for {lo}..{hi}")
            first_id = lo_id if first_id is None else first_id
            last_id = hi_id
            log(f"  committed {lo:,}..{hi:,} in {time.monotonic() - t1:.2f} s")
        queue_time = time.monotonic() - t0
        depth = conn.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0]
        if last_id - first_id + 1 != n or depth != n:
            raise RuntimeError(f"outbox holds {depth} rows, ids {first_id}..{last_id}; expected {n}")
        log(f"queued {n:,} in {queue_time:.1f} s ({n / queue_time:,.0f}/s); outbox ids {first_id}..{last_id}")
        outbox_size = conn.execute("SELECT pg_total_relation_size('mqtt_outbox')").fetchone()[0]

        # -- subscriber ------------------------------------------------------------------------
        sub_file = mosq.workdir / "received.txt"
        sub_out = open(sub_file, "wb")
        sub_id = f"drain-sub-{run}"
        sub = subprocess.Popen([harness.MOSQUITTO_SUB, "-h", harness.HOST, "-p", str(mosq.port),
                                "-i", sub_id, "-t", topic_filter, "-q", "1"],
                               stdout=sub_out, stderr=subprocess.PIPE)
        mosq.wait_subscribed(sub_id, topic_filter)
        log(f"mosquitto_sub subscribed to {topic_filter} (QoS 1) -> {sub_file}")

        # -- drain -----------------------------------------------------------------------------
        if pg.worker_pids(DB) != [worker]:
            failures.append(f"worker pid changed before the drain: {pg.worker_pids(DB)} (was {worker})")
            worker = pg.worker_pids(DB)[0]
        base = proc_status(worker) or {}
        sampler = RssSampler(worker)
        sampler.start()
        extra = ExtraPublisher(pg, live_topic, args.qos, n + 1, args.extra_rate, args.payload_bytes)
        extra.start()
        t_start = time.monotonic()
        client_id = conn.execute("SELECT mqtt_start_listener(%s)", (BROKER,)).fetchone()[0]
        log(f"listener started (client id {client_id}); draining, concurrent publishes at "
            f"{args.extra_rate:g}/s")

        remaining = n
        last_progress = t_start
        last_print = t_start
        drained_at = None
        t_connected = None
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            if t_connected is None and harness.broker_status(conn, BROKER).get("status") == "connected":
                t_connected = now - t_start
            low = conn.execute("SELECT min(id) FROM mqtt_outbox").fetchone()[0]
            left = 0 if low is None or low > last_id else last_id - low + 1
            if left < remaining:
                remaining = left
                last_progress = now
            if left == 0:
                exact = conn.execute("SELECT count(*) FROM mqtt_outbox WHERE id <= %s", (last_id,)).fetchone()[0]
                if exact == 0:
                    drained_at = now
                    break
                remaining = exact
            if now - last_print >= 5:
                last_print = now
                done = n - remaining
                lat = max(extra.latencies) * 1000 if extra.latencies else float("nan")
                log(f"  {now - t_start:6.1f} s: {done:>9,} sent, {remaining:>9,} left, "
                    f"{done / (now - t_start):>8,.0f} msg/s | worker RSS "
                    f"{sampler.last.get('VmRSS', 0) / MIB:6.1f} MiB (anon "
                    f"{sampler.last.get('RssAnon', 0) / MIB:5.1f}) | extra publishes {extra.sent}, "
                    f"max latency {lat:.1f} ms")
            if sampler.gone or pg.postmaster_pid() != postmaster:
                failures.append("the worker or the postmaster died during the drain")
                break
            if now - last_progress > args.stall_timeout:
                failures.append(f"no progress for {args.stall_timeout:.0f} s with {remaining:,} left")
                break
            if now - t_start > args.timeout:
                failures.append(f"not drained after {args.timeout:.0f} s ({remaining:,} left)")
                break

        extra.stop()
        drain_time = (drained_at or time.monotonic()) - t_start
        n_extra = extra.sent
        if drained_at:
            log(f"backlog drained in {drain_time:.1f} s ({n / drain_time:,.0f} msg/s); "
                f"{n_extra} concurrent publishes; waiting for the outbox to empty")
            try:
                wait_for(lambda: conn.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == 0,
                         timeout=60, interval=0.2, message="mqtt_outbox to be empty")
            except AssertionError as e:
                failures.append(str(e))
        empty_time = time.monotonic() - t_start
        sampler.stop()

        # -- checks ------------------------------------------------------------------------------
        expected = n + n_extra
        outbox_left = conn.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0]
        sent_rows = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send' "
                                 "AND topic LIKE %s", (f"drain/{run}/%",)).fetchone()[0]
        dead = conn.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0]
        status = harness.broker_status(conn, BROKER)

        # the subscriber: wait until it has every message, or stops receiving for 15 s
        state: dict = {}
        grown_at, seen_lines = time.monotonic(), -1
        while True:
            lines = count_lines(sub_file, state)
            if lines >= expected:
                break
            if lines != seen_lines:
                seen_lines, grown_at = lines, time.monotonic()
            elif time.monotonic() - grown_at > 15:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # late duplicates, if any
        sub.terminate()
        sub.wait(10)
        sub_out.close()
        got = analyse_received(sub_file, expected, range(n + 1, expected + 1))

        pids_after = pg.worker_pids(DB)
        postmaster_after = pg.postmaster_pid()
        crash_lines = [line for line in pg.log_text().splitlines()
                       if any(k in line for k in ("terminated by signal", "PANIC", "out of memory",
                                                  "was terminated", "panicked", "exited with exit code"))]

        if outbox_left:
            failures.append(f"outbox still holds {outbox_left:,} rows")
        if sent_rows != expected:
            failures.append(f"{sent_rows:,} 'send' history rows, expected exactly {expected:,}")
        if dead:
            failures.append(f"{dead:,} dead letters")
        if got["distinct"] < expected:
            failures.append(f"subscriber got {got['distinct']:,} distinct sequence numbers of {expected:,} "
                            f"(missing e.g. {got['missing'][:10]})")
        if got["missing_extra"]:
            failures.append(f"{len(got['missing_extra'])} concurrent publishes not received")
        if got["unexpected"]:
            failures.append(f"{got['unexpected']} unexpected lines in the subscriber's output")
        if extra.errors:
            failures.append(f"{len(extra.errors)} concurrent publishes failed, first: {extra.errors[0]}")
        if not extra.latencies:
            failures.append("no concurrent publish was committed during the drain")
        if postmaster_after != postmaster:
            failures.append(f"postmaster pid {postmaster} -> {postmaster_after} (crash or restart)")
        if pids_after != [worker] or sampler.gone:
            failures.append(f"worker pid {worker} -> {pids_after} (the worker exited or crashed)")
        if crash_lines:
            failures.append(f"server log shows {len(crash_lines)} crash line(s), first: {crash_lines[0]}")

        lat_ms = [x * 1000 for x in extra.latencies] or [float("nan")]
        figures = [
            ("messages (backlog + concurrent)", f"{n:,} + {n_extra:,}"),
            ("QoS / payload bytes", f"{args.qos} / {args.payload_bytes}"),
            ("queue time", f"{queue_time:.1f} s ({n / queue_time:,.0f} msg/s, "
                           f"{-(-n // args.txn_size)} transaction(s))"),
            ("outbox size after queuing", f"{outbox_size / MIB:.0f} MiB"),
            ("listener connected after", f"{t_connected:.2f} s" if t_connected is not None else "?"),
            ("drain time (backlog gone)", f"{drain_time:.1f} s"),
            ("drain rate", f"{n / drain_time:,.0f} msg/s"),
            ("outbox empty after", f"{empty_time:.1f} s"),
            ("worker RSS baseline (VmRSS / RssAnon)",
             f"{base.get('VmRSS', 0) / MIB:.1f} / {base.get('RssAnon', 0) / MIB:.1f} MiB"),
            ("worker peak RSS sampled (VmRSS / RssAnon)",
             f"{sampler.peak_rss / MIB:.1f} / {sampler.peak_anon / MIB:.1f} MiB"),
            ("worker peak RssShmem (shared_buffers pages)", f"{sampler.peak_shmem / MIB:.1f} MiB"),
            ("worker VmHWM (peak RSS since start)", f"{sampler.hwm / MIB:.1f} MiB"),
            ("worker RSS at end (VmRSS / RssAnon)",
             f"{sampler.last.get('VmRSS', 0) / MIB:.1f} / {sampler.last.get('RssAnon', 0) / MIB:.1f} MiB"),
            ("concurrent publish latency (call+commit)",
             f"max {max(lat_ms):.1f} ms, median {statistics.median(lat_ms):.1f} ms, "
             f"p99 {harness.percentile(lat_ms, 99):.1f} ms, n={len(extra.latencies)}, "
             f"errors {len(extra.errors)}"),
            ("outbox left / 'send' history rows", f"{outbox_left:,} / {sent_rows:,} (expected {expected:,})"),
            ("subscriber: received / distinct / duplicates",
             f"{got['total']:,} / {got['distinct']:,} / {got['duplicates']:,}"),
            ("mqtt_status messages_sent / reconnects",
             f"{status.get('messages_sent')} / {status.get('reconnects')}"),
            ("postmaster pid / worker pid", f"{postmaster} -> {postmaster_after} / {worker} -> {pids_after}"),
            ("dead letters", f"{dead}"),
        ]
        conn.close()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    except Exception as e:  # noqa: BLE001 - a setup failure: say what and show the logs
        log(f"ERROR: {type(e).__name__}: {e}")
        failures.append(f"error: {e}")
        return_code = 2
    else:
        return_code = 1 if failures else 0
    finally:
        for t in (extra, sampler):
            if t is not None:
                t.stop_event.set()
        if sub is not None and sub.poll() is None:
            sub.terminate()
            try:
                sub.wait(10)
            except subprocess.TimeoutExpired:
                sub.kill()
        if sub_out is not None and not sub_out.closed:
            sub_out.close()
        if failures and pg is not None:
            print(f"\n--- PostgreSQL log tail ({pg.logfile}) ---\n{tail(pg.log_text(), 60)}")
        if failures and mosq is not None:
            print(f"\n--- mosquitto log tail ---\n{tail(mosq.log_text(), 20)}")
        for server in (mosq, pg):
            if server is not None:
                try:
                    server.destroy()
                except Exception as e:  # noqa: BLE001 - keep stopping the rest
                    print(f"could not stop {server!r}: {e}", file=sys.stderr)

    if figures:
        width = max(len(k) for k, _ in figures)
        print("\n" + "=" * (width + 40))
        for k, v in figures:
            print(f"{k:<{width}}  {v}")
        print("=" * (width + 40))
    if failures:
        print("\nFAILED:")
        for f in failures:
            print(f"  - {f}")
    else:
        print("\nOK: backlog drained completely, every message received, no crash")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
