#!/usr/bin/env python3
"""mqtt_pg demo: a throw-away PostgreSQL 15 cluster and a mosquitto broker, left running.

    scripts/demo.py up          start both (once), configure broker 'local', show a message
                                going out and one coming in, print how to connect
    scripts/demo.py psql [ARGS] psql into the demo database
    scripts/demo.py down        stop both (idempotent)
    scripts/demo.py status      exit 0 when the demo is up, 1 otherwise

Called by ./dev up / ./dev psql / ./dev down. State (ports, pids) is kept in .local/state.json,
the cluster in .local/pg (owned by the postgres OS user), mosquitto's config and log in .local/.
`down` and `psql` need only the standard library; `up` needs the venv (psycopg, paho-mqtt).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".local"
PGDATA = LOCAL / "pg"
STATE = LOCAL / "state.json"
# The same PostgreSQL as tests/e2e/harness.py (which starts the demo's cluster): MQTT_PG_PG_BIN,
# default Debian's 15.
PG_BIN = Path(os.environ.get("MQTT_PG_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_CTL = str(PG_BIN / "pg_ctl")
# A database of its own, as an Odoo database would be (mqtt_pg runs one worker per database).
DEMO_DB = "mqtt_demo"
BROKER = "local"


# --- state, shared by all commands (standard library only) ---------------------------------------


def load_state() -> dict | None:
    try:
        return json.loads(STATE.read_text())
    except (OSError, ValueError):
        return None


def postmaster_running() -> bool:
    try:
        pid = int((PGDATA / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def mosquitto_running(state: dict | None) -> bool:
    """True if the pid in the state file is still our mosquitto (not a recycled pid)."""
    if not state or not state.get("mosquitto_pid"):
        return False
    try:
        cmdline = Path(f"/proc/{state['mosquitto_pid']}/cmdline").read_bytes()
    except OSError:
        return False
    return b"mosquitto" in cmdline and str(state["mosquitto_conf"]).encode() in cmdline


def connection_help(state: dict) -> str:
    port, mport = state["pg_port"], state["mosquitto_port"]
    return f"""
PostgreSQL 15 on 127.0.0.1:{port} (data {PGDATA}, log {PGDATA}/postgresql.log)
mosquitto    on 127.0.0.1:{mport} (config {state['mosquitto_conf']}, log {LOCAL}/mosquitto.log)

Connect:     ./dev psql
   or:       psql -h 127.0.0.1 -p {port} -U postgres -d {DEMO_DB}
Try:         SELECT mqtt_status('{BROKER}');
             SELECT mqtt_publish('demo/out', 'hi', 1);
             SELECT topic, payload_text, "timestamp" FROM mqtt_message_history_text ORDER BY id DESC LIMIT 5;
MQTT side:   mosquitto_sub -h 127.0.0.1 -p {mport} -t 'demo/#' -v
             mosquitto_pub -h 127.0.0.1 -p {mport} -t demo/in/sensor2 -m 19.0
Stop:        ./dev down
"""


# --- down ------------------------------------------------------------------------------------------


def down() -> int:
    state = load_state()
    did = False
    if postmaster_running():
        print("stopping PostgreSQL (pg_ctl stop -m fast)")
        subprocess.run(["runuser", "-u", "postgres", "--", PG_CTL, "-D", str(PGDATA), "-m", "fast",
                        "-w", "-t", "60", "stop"], check=False)
        did = True
    if mosquitto_running(state):
        pid = state["mosquitto_pid"]
        print(f"stopping mosquitto (pid {pid})")
        os.kill(pid, 15)
        for _ in range(200):
            if not mosquitto_running(state):
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
        did = True
    STATE.unlink(missing_ok=True)
    print("demo stopped" if did else "demo is not running")
    return 0


# --- psql ------------------------------------------------------------------------------------------


def psql(args: list[str]) -> int:
    state = load_state()
    if not state or not postmaster_running():
        print("the demo is not running: start it with ./dev up", file=sys.stderr)
        return 1
    cmd = ["psql", "-h", "127.0.0.1", "-p", str(state["pg_port"]), "-U", "postgres", "-d", DEMO_DB, *args]
    os.execvp(cmd[0], cmd)
    return 127  # not reached


# --- up --------------------------------------------------------------------------------------------


def up() -> int:
    state = load_state()
    if postmaster_running() and mosquitto_running(state):
        print("the demo is already up (to restart it on a new build: ./dev down && ./dev up)")
        print(connection_help(state))
        return 0
    if postmaster_running() or mosquitto_running(state):
        print("the demo is half up: stopping it first")
        down()

    pkglibdir = subprocess.run([str(PG_BIN / "pg_config"), "--pkglibdir"],
                               capture_output=True, text=True, check=True).stdout.strip()
    if not Path(pkglibdir, "mqtt_pg.so").exists():
        print(f"mqtt_pg is not installed ({pkglibdir}/mqtt_pg.so is missing): run ./dev setup", file=sys.stderr)
        return 1

    sys.path.insert(0, str(ROOT / "tests" / "e2e"))
    import harness as h  # needs the venv (psycopg, paho-mqtt)

    LOCAL.mkdir(exist_ok=True)
    shutil.rmtree(PGDATA, ignore_errors=True)  # throw-away: a fresh cluster on every `up`
    if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(LOCAL)]).returncode != 0:
        print(f"the postgres OS user cannot reach {LOCAL} (a parent directory is not searchable); "
              "clone the repository somewhere world-searchable", file=sys.stderr)
        return 1

    pg = h.PgCluster(datadir=PGDATA, preload=True).init()
    mosq = h.Mosquitto(workdir=LOCAL, detach=True)

    ok = False

    @atexit.register
    def cleanup_on_failure():
        if not ok:
            print("demo failed: stopping what it started", file=sys.stderr)
            for server in (pg, mosq):
                text = server.log_text()
                if text:
                    print(f"--- last lines of {server.logfile} ---\n{h.tail(text, 30)}", file=sys.stderr)
            pg.stop()
            mosq.stop()
            STATE.unlink(missing_ok=True)

    print(f"starting mosquitto on 127.0.0.1:{mosq.port}")
    mosq.start()
    print(f"starting PostgreSQL 15 on 127.0.0.1:{pg.port} (shared_preload_libraries = 'mqtt_pg')")
    pg.start()
    state = {
        "pg_port": pg.port,
        "pg_data": str(PGDATA),
        "pg_pid": pg.postmaster_pid(),
        "mosquitto_port": mosq.port,
        "mosquitto_pid": mosq.pid,
        "mosquitto_conf": str(mosq.conffile),
        "database": DEMO_DB,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    STATE.write_text(json.dumps(state, indent=2) + "\n")

    def show(sql: str, params=()):
        print(f"  {DEMO_DB}=# {sql}")
        cur = conn.execute(sql, params)
        row = cur.fetchone() if cur.description else None
        print(f"    -> {', '.join(map(str, row)) if row is not None else cur.statusmessage}")
        return row

    print(f"CREATE DATABASE {DEMO_DB}")
    pg.create_database(DEMO_DB)
    with pg.connect(DEMO_DB) as conn:
        print("\nconfiguring mqtt_pg:")
        show("CREATE EXTENSION mqtt_pg")
        show(f"INSERT INTO mqtt_broker (name, host, port, is_default) "
             f"VALUES ('{BROKER}', '127.0.0.1', {mosq.port}, true) RETURNING id")
        client_id = show(f"SELECT mqtt_start_listener('{BROKER}')")[0]
        h.wait_status(conn, BROKER, "connected", timeout=30)
        show(f"SELECT mqtt_status('{BROKER}')->>'status'")
        show("SELECT mqtt_subscribe('demo/in/#', 1)")
        mosq.wait_subscribed(client_id, "demo/in/#", timeout=20)

        print("\nout: PostgreSQL -> MQTT (published only when the transaction commits)")
        sub, sub_id = h.mosquitto_sub_start(mosq.port, "demo/out", count=1, timeout=20)
        print(f"  $ mosquitto_sub -h 127.0.0.1 -p {mosq.port} -t demo/out -C 1 -v")
        mosq.wait_subscribed(sub_id, "demo/out")
        show("SELECT mqtt_publish('demo/out', 'hello from postgres', 1)")
        out, err = sub.communicate(timeout=30)
        if sub.returncode != 0:
            raise RuntimeError(f"mosquitto_sub got nothing: {err.decode(errors='replace')}")
        print(f"    mosquitto_sub received: {out.decode(errors='replace').strip()}")

        print("\nin: MQTT -> PostgreSQL (batched into mqtt_message_history)")
        print(f"  $ mosquitto_pub -h 127.0.0.1 -p {mosq.port} -t demo/in/sensor1 -m 21.5 -q 1")
        h.mosquitto_pub(mosq.port, "demo/in/sensor1", "21.5", qos=1)
        [row] = h.wait_history(conn, "demo/in/sensor1", 1, timeout=30)
        print("  SELECT id, topic, payload_text, qos, direction, \"timestamp\" FROM mqtt_message_history_text"
              " WHERE topic = 'demo/in/sensor1'")
        print(f"    -> {row['id']}, {row['topic']}, {row['payload_text']}, {row['qos']}, {row['direction']}, "
              f"{row['timestamp']}")

    ok = True
    print("\nthe demo is up and keeps running.")
    print(connection_help(state))
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if os.geteuid() != 0 and command in ("up", "down"):
        print("run as root (the cluster runs as the postgres OS user via runuser)", file=sys.stderr)
        return 1
    if command == "up":
        return up()
    if command == "down":
        return down()
    if command == "psql":
        return psql(rest)
    if command == "status":  # exit status only: 0 when the demo is up
        return 0 if postmaster_running() and mosquitto_running(load_state()) else 1
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
