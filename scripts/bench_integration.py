#!/usr/bin/env python3
"""Integration benchmark (issue 8): publishing row changes and routing received messages, each
figure beside its ceiling measured in the same run on the same servers.

    .venv/bin/python scripts/bench_integration.py                 # 100,000 rows and messages
    .venv/bin/python scripts/bench_integration.py --rows 20000 --repeat 3

What it does, on throw-away servers of its own (tests/e2e/harness.py: PostgreSQL 15 with mqtt_pg
preloaded and a mosquitto, both on free 127.0.0.1 ports; stopped at the end, also on Ctrl-C):

(a) Row changes. Two identical tables (id serial PRIMARY KEY, a int, b int, c text, d numeric)
    of --rows rows each; `mqtt_watch_table` (QoS 1) on one of them. Timed: one
    `UPDATE ... SET a = a + 1, d = d + 0.01` of every row (statement + commit, autocommit) on the
    unwatched table (the ceiling) and on the watched one, and for the watched one the time from
    its commit until every row has left mqtt_outbox. A reference for the drain: the same number
    of messages of the same shape queued by one `SELECT mqtt_publish(...)` over the table, and its
    drain time. Nobody subscribes to these topics (the broker still acknowledges every QoS 1
    message); afterwards the 'send' history rows are counted.
(b) Ingest. --messages QoS 1 JSON objects like {"device": "d7", "value": 21.5} wait at the
    broker in the worker's persistent session (listener stopped, a paho publisher sends them,
    the broker acknowledges each), then the listener is started and the time until all are
    stored is measured (the existing ingest tests' "persistent-session backlog"; mosquitto_pub
    -l is not used: at QoS 1 it exits before sending all it read). Once into (i) a subscription
    without routing (history only: the ceiling) and once into (ii) a subscription with
    target_table = a plain logged table (device text, value numeric, topic text, received_at
    timestamptz). (b) runs as the database's owner, a non-superuser (routing refuses to run as a
    superuser), as an Odoo database has it; (a) as the superuser. messages/s for each, counted from mqtt_start_listener (connect included) and
    from the first stored batch.

Exits 0 when every check passes, 1 when a check failed, 2 on a setup error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import psycopg  # noqa: E402

import harness  # noqa: E402
from harness import Mosquitto, PgCluster, SeqPublisher, mosquitto_pub, tail, wait_for  # noqa: E402

DB = "bench"
BROKER = "bench"
OWNER = "bench_owner"  # the database owner, a non-superuser: routing never runs as a superuser
INSTALLED_SQL = Path("/usr/share/postgresql/15/extension/mqtt_pg--0.1.0.sql")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_s(s: float) -> str:
    return f"{s:.2f} s"


def fmt_rate(n: int, s: float, unit: str) -> str:
    return f"{n / s:,.0f} {unit}/s" if s > 0 else "inf"


# ----------------------------------------------------------------------------------------------
# (a) row changes


def timed(conn, stmt: str, params=()) -> float:
    """Run one autocommit statement (statement + commit); seconds."""
    t0 = time.monotonic()
    conn.execute(stmt, params)
    return time.monotonic() - t0


def wait_outbox_empty(conn, timeout: float) -> float:
    """Seconds until mqtt_outbox is empty (polled every 0.05 s with an index probe)."""
    t0 = time.monotonic()
    wait_for(lambda: conn.execute("SELECT NOT EXISTS (SELECT 1 FROM mqtt_outbox)").fetchone()[0],
             timeout=timeout, interval=0.05, message="mqtt_outbox to be empty")
    return time.monotonic() - t0


def bench_rows(conn, rows: int, repeat: int, failures: list[str]) -> dict:
    for t in ("bench_plain", "bench_watched"):
        conn.execute(f"CREATE TABLE {t} (id serial PRIMARY KEY, a int, b int, c text, d numeric)")
        conn.execute(f"INSERT INTO {t} (a, b, c, d) SELECT g, g %% 100, 'item ' || g, g * 1.25 "
                     "FROM generate_series(1, %s) g", (rows,))
    name = conn.execute("SELECT mqtt_watch_table('bench_watched', 'bench/rows/{id}', 1)").fetchone()[0]
    log(f"two tables of {rows:,} rows; mqtt_watch_table -> trigger {name!r}")
    upd = "UPDATE {} SET a = a + 1, d = d + 0.01"
    pub = ("SELECT count(mqtt_publish('bench/pub/' || t.id, jsonb_build_object('op', 'update', 'schema', "
           "'public', 'table', 'bench_plain', 'new', to_jsonb(t), 'old', to_jsonb(t)), 1)) FROM bench_plain t")
    res: dict[str, list[float]] = {k: [] for k in ("plain", "watched", "watched_drain", "publish", "publish_drain")}
    sent0 = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send'").fetchone()[0]
    drain_timeout = max(120.0, rows / 200)
    for i in range(repeat):
        conn.execute("VACUUM ANALYZE bench_plain")
        conn.execute("VACUUM ANALYZE bench_watched")
        conn.execute("CHECKPOINT")
        res["plain"].append(timed(conn, upd.format("bench_plain")))
        log(f"  run {i + 1}: unwatched UPDATE {fmt_s(res['plain'][-1])}")
        res["publish"].append(timed(conn, pub))
        res["publish_drain"].append(wait_outbox_empty(conn, drain_timeout))
        log(f"  run {i + 1}: mqtt_publish x {rows:,} {fmt_s(res['publish'][-1])}, "
            f"drained {fmt_s(res['publish_drain'][-1])} after commit")
        res["watched"].append(timed(conn, upd.format("bench_watched")))
        queued = conn.execute("SELECT count(*) FROM mqtt_outbox WHERE starts_with(topic, 'bench/rows/')").fetchone()[0]
        res["watched_drain"].append(wait_outbox_empty(conn, drain_timeout))
        log(f"  run {i + 1}: watched UPDATE {fmt_s(res['watched'][-1])} "
            f"({queued:,} still in the outbox when it returned), drained {fmt_s(res['watched_drain'][-1])} after commit")
    sent = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send'").fetchone()[0] - sent0
    rows_sent = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send' "
                             "AND starts_with(topic, 'bench/rows/')").fetchone()[0]
    if rows_sent != rows * repeat:
        failures.append(f"(a) {rows_sent:,} 'send' history rows for the watched table, expected {rows * repeat:,}")
    if sent != 2 * rows * repeat:
        failures.append(f"(a) {sent:,} 'send' history rows in all, expected {2 * rows * repeat:,}")
    return {k: statistics.median(v) for k, v in res.items()} | {"sent": rows_sent}


# ----------------------------------------------------------------------------------------------
# (b) ingest


def payload(i: int) -> str:
    return json.dumps({"device": f"d{i % 100}", "value": round(20 + (i % 1000) / 100, 2)})


def client_id(conn) -> str:
    return harness.broker_status(conn, BROKER)["client_id"]


def stop_listener(conn, mosq: Mosquitto) -> None:
    cid = client_id(conn)
    gone = mosq.disconnections_of(cid)
    conn.execute("SELECT mqtt_stop_listener(%s)", (BROKER,))
    harness.wait_status(conn, BROKER, "stopped")
    wait_for(lambda: mosq.disconnections_of(cid) > gone, timeout=20, message="the listener to leave the broker")


def publish_backlog(port: int, prefix: str, n: int) -> float:
    """n QoS 1 JSON messages on prefix/d<k>, each acknowledged by the broker; seconds taken."""
    t0 = time.monotonic()
    with SeqPublisher(port) as pub:
        pub.connect()
        window = 20_000
        for i in range(n):
            if len(pub.infos) - pub.acked() >= window:
                wait_for(lambda: len(pub.infos) - pub.acked() < window // 2, timeout=120, interval=0.005,
                         message="the broker to acknowledge publishes")
            pub.publish(f"{prefix}/d{i % 100}", payload(i), 1)
        pub.wait_all_acked(timeout=300)
    return time.monotonic() - t0


def ingest(conn, mosq: Mosquitto, prefix: str, n: int, failures: list[str], target: str | None) -> dict:
    stop_listener(conn, mosq)
    t_pub = publish_backlog(mosq.port, prefix, n)
    log(f"  {n:,} messages waiting at the broker for {prefix}/# (published and acked in {fmt_s(t_pub)})")
    h0 = conn.execute("SELECT coalesce(max(id), 0) FROM mqtt_message_history").fetchone()[0]

    def stored() -> int:
        # max(id) is an index probe; an exact count only once it says all may be there
        top = conn.execute("SELECT coalesce(max(id), 0) FROM mqtt_message_history").fetchone()[0]
        if top - h0 < n:
            return top - h0
        return conn.execute("SELECT count(*) FROM mqtt_message_history WHERE id > %s AND direction = 'receive' "
                            "AND starts_with(topic, %s)", (h0, prefix + "/")).fetchone()[0]

    t0 = time.monotonic()
    conn.execute("SELECT mqtt_start_listener(%s)", (BROKER,))
    t_first = first_count = None
    last, last_change = 0, t0
    while True:
        k = stored()
        now = time.monotonic()
        if k > 0 and t_first is None:
            t_first, first_count = now, k
        if k >= n:
            break
        if k != last:
            last, last_change = k, now
        elif now - last_change > 60:
            failures.append(f"({prefix}) ingest stalled at {k:,} of {n:,}")
            break
        time.sleep(0.02)
    t_done = time.monotonic()
    total = t_done - t0
    from_first = (t_done - t_first) if t_first else float("nan")
    got = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE id > %s AND direction = 'receive' "
                       "AND starts_with(topic, %s)", (h0, prefix + "/")).fetchone()[0]
    batches = conn.execute("SELECT count(DISTINCT xmin::text) FROM mqtt_message_history WHERE id > %s "
                           "AND starts_with(topic, %s)", (h0, prefix + "/")).fetchone()[0]
    if got != n:
        failures.append(f"({prefix}) {got:,} history rows, expected {n:,}")
    out = {"n": n, "total": total, "from_first": from_first, "first_count": first_count or 0,
           "batches": batches, "publish": t_pub}
    if target:
        rows = conn.execute(f"SELECT count(*) FROM {target} WHERE starts_with(topic, %s)", (prefix + "/",)).fetchone()[0]
        sample = conn.execute(f"SELECT device, value, topic, received_at IS NOT NULL FROM {target} "
                              "WHERE starts_with(topic, %s) LIMIT 1", (prefix + "/",)).fetchone()
        out["target_rows"] = rows
        if rows != n:
            failures.append(f"({prefix}) {rows:,} rows in {target}, expected {n:,}")
        if not sample or not sample[0].startswith("d") or sample[3] is not True:
            failures.append(f"({prefix}) a routed row looks wrong: {sample}")
    log(f"  stored {got:,} in {fmt_s(total)} after mqtt_start_listener ({fmt_rate(n, total, 'msg')}); "
        f"{batches} transactions")
    return out


def routed_probe(conn, port: int, prefix: str, target: str) -> None:
    """A JSON probe on prefix/probe until one lands in the target table: the routed
    subscription is live (a non-JSON probe would be dead-lettered by the routing)."""
    deadline = time.monotonic() + 30
    while True:
        dev = f"probe-{uuid.uuid4().hex[:8]}"
        mosquitto_pub(port, f"{prefix}/probe", json.dumps({"device": dev, "value": 0}), qos=1)
        try:
            wait_for(lambda: conn.execute(f"SELECT 1 FROM {target} WHERE device = %s", (dev,)).fetchone(),
                     timeout=0.5, interval=0.05)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no probe on {prefix}/probe reached {target} within 30 s") from None
    conn.execute(f"DELETE FROM {target}")


# ----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows updated in (a), and messages in (b) "
                   "unless --messages is given (default 100,000)")
    p.add_argument("--messages", type=int, default=None, help="messages ingested in (b) (default: --rows)")
    p.add_argument("--repeat", type=int, default=1, help="(a) runs; medians are printed (default 1)")
    p.add_argument("--pg-conf", default="", help="extra postgresql.conf lines (\\n-separated)")
    a = p.parse_args()
    if a.rows < 1 or a.repeat < 1 or (a.messages is not None and a.messages < 1):
        p.error("--rows, --messages and --repeat must be positive")
    a.messages = a.messages or a.rows
    return a


def main() -> int:
    args = parse_args()
    pg: PgCluster | None = None
    mosq: Mosquitto | None = None
    failures: list[str] = []
    table: list[tuple[str, str, str, str]] = []

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    sql_text = INSTALLED_SQL.read_text() if INSTALLED_SQL.exists() else ""
    has_watch, has_routing = "mqtt_watch_table" in sql_text, "notify_channel" in sql_text
    try:
        so = Path("/usr/lib/postgresql/15/lib/mqtt_pg.so")
        if so.exists():
            log(f"mqtt_pg.so built {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(so.stat().st_mtime))}; "
                f"installed SQL has mqtt_watch_table: {has_watch}, routing (notify_channel): {has_routing}")
        pg = PgCluster(preload=True, extra_conf=args.pg_conf.replace("\\n", "\n")).init()
        pg.start()
        mosq = Mosquitto().start()
        log(f"PostgreSQL on port {pg.port}, mosquitto on port {mosq.port}")
        with pg.connect() as admin:
            admin.execute(f"CREATE ROLE {OWNER} LOGIN NOSUPERUSER")
            admin.execute(f"CREATE DATABASE {DB} OWNER {OWNER}")
        conn = pg.connect(DB)
        conn.execute("CREATE EXTENSION mqtt_pg")
        # (b) is configured the way an Odoo database has it: by its owner, not a superuser
        oconn = psycopg.connect(host=harness.HOST, port=pg.port, dbname=DB, user=OWNER, autocommit=True)
        conn.execute("INSERT INTO mqtt_broker (name, host, port, is_default, active) VALUES (%s, %s, %s, true, true)",
                     (BROKER, harness.HOST, mosq.port))
        harness.wait_status(conn, BROKER, "connected", timeout=30)

        # -- (a) ------------------------------------------------------------------------------
        if has_watch:
            log(f"(a) bulk UPDATE of {args.rows:,} rows, watched vs unwatched ({args.repeat} run(s))")
            a = bench_rows(conn, args.rows, args.repeat, failures)
            n = args.rows
            table += [
                (f"(a) UPDATE {n:,} rows + commit, watched (mqtt_watch_table, QoS 1)",
                 f"{fmt_s(a['watched'])} ({fmt_rate(n, a['watched'], 'rows')})",
                 f"unwatched: {fmt_s(a['plain'])} ({fmt_rate(n, a['plain'], 'rows')})",
                 f"{a['watched'] / a['plain']:.1f}x the time"),
                ("(a) watched: commit -> outbox empty",
                 f"{fmt_s(a['watched_drain'])} ({fmt_rate(n, a['watched_drain'], 'msg')})",
                 f"same number of mqtt_publish msgs: {fmt_s(a['publish_drain'])}",
                 f"{a['watched_drain'] / a['publish_drain']:.2f}x the time"),
                ("(a) watched: UPDATE start -> outbox empty",
                 f"{fmt_s(a['watched'] + a['watched_drain'])}",
                 f"SELECT mqtt_publish x {n:,} + drain: {fmt_s(a['publish'] + a['publish_drain'])} "
                 f"(statement {fmt_s(a['publish'])})",
                 f"{(a['watched'] + a['watched_drain']) / (a['publish'] + a['publish_drain']):.2f}x the time"),
            ]
        else:
            log("(a) skipped: the installed extension has no mqtt_watch_table")
            table.append(("(a) row changes", "n/a (mqtt_watch_table not installed)", "", ""))

        # -- (b) ------------------------------------------------------------------------------
        m = args.messages
        oconn.execute("CREATE TABLE readings (device text, value numeric, topic text, received_at timestamptz)")
        oconn.execute("SELECT mqtt_subscribe('bench/plain/#', 1, %s)", (BROKER,))
        harness.wait_ingesting(oconn, mosq.port, "bench/plain/probe")
        if has_routing:
            oconn.execute("SELECT mqtt_subscribe('bench/routed/#', 1, %s, target_table => 'readings')", (BROKER,))
            routed_probe(oconn, mosq.port, "bench/routed", "readings")
        log(f"(b) ingest of {m:,} QoS 1 JSON messages from a persistent-session backlog")
        log(" (i) history only")
        plain = ingest(oconn, mosq, "bench/plain", m, failures, None)
        routed = None
        if has_routing:
            log(" (ii) routed to target_table readings")
            routed = ingest(oconn, mosq, "bench/routed", m, failures, "readings")
        dead = conn.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0]
        if dead:
            err = conn.execute("SELECT error FROM mqtt_dead_letter ORDER BY id LIMIT 1").fetchone()[0]
            failures.append(f"{dead} dead letters, first: {err}")

        def rate(r):
            return m / r["total"]

        def rate_first(r):
            return (m - r["first_count"]) / r["from_first"] if r["from_first"] > 0 else float("nan")

        if routed:
            table += [
                (f"(b) ingest {m:,} msgs, routed to target_table (start -> all stored)",
                 f"{rate(routed):,.0f} msg/s ({fmt_s(routed['total'])})",
                 f"history only: {rate(plain):,.0f} msg/s ({fmt_s(plain['total'])})",
                 f"{rate(routed) / rate(plain):.2f} of the rate"),
                ("(b) same, from the first stored batch",
                 f"{rate_first(routed):,.0f} msg/s",
                 f"history only: {rate_first(plain):,.0f} msg/s",
                 f"{rate_first(routed) / rate_first(plain):.2f} of the rate"),
                ("(b) transactions (batches) used",
                 f"{routed['batches']:,}", f"history only: {plain['batches']:,}", ""),
            ]
        else:
            table += [
                (f"(b) ingest {m:,} msgs, history only (start -> all stored)",
                 f"{rate(plain):,.0f} msg/s ({fmt_s(plain['total'])})", "", ""),
                ("(b) routed to target_table", "n/a (routing not installed)", "", ""),
            ]
        oconn.close()
        conn.close()
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return_code = 130
    except Exception as e:  # noqa: BLE001 - a setup failure: say what and show the logs
        log(f"ERROR: {type(e).__name__}: {e}")
        failures.append(f"error: {e}")
        return_code = 2
    else:
        return_code = 1 if failures else 0
    finally:
        if failures and pg is not None:
            print(f"\n--- PostgreSQL log tail ({pg.logfile}) ---\n{tail(pg.log_text(), 40)}")
        for server in (mosq, pg):
            if server is not None:
                try:
                    server.destroy()
                except Exception as e:  # noqa: BLE001 - keep stopping the rest
                    print(f"could not stop {server!r}: {e}", file=sys.stderr)

    if table:
        heads = ("measurement", "figure", "ceiling (same run)", "ratio")
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(heads)]
        line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
        print("\n" + line)
        print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |")
        print(line)
        for r in table:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        print(line)
    if failures:
        print("\nFAILED:")
        for f in failures:
            print(f"  - {f}")
    elif return_code == 0:
        print("\nOK: every check passed")
    return return_code


if __name__ == "__main__":
    sys.exit(main())
