"""Throw-away PostgreSQL clusters and mosquitto brokers for mqtt_pg's end-to-end tests and demo.

Shared by tests/e2e/conftest.py and scripts/demo.py. Everything binds to 127.0.0.1 on a free
port. PostgreSQL refuses to run as root, so clusters run as the `postgres` OS user (PLATFORM.md).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
import psycopg
from psycopg import sql
from psycopg.rows import dict_row

# The PostgreSQL under test: Debian's 15 by default; ./dev test runs the suite again with
# MQTT_PG_PG_BIN pointing at PostgreSQL 18's bin/ (scripts/setup.sh installs both).
PG_BIN = Path(os.environ.get("MQTT_PG_PG_BIN", "/usr/lib/postgresql/15/bin"))
MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
HOST = "127.0.0.1"
# The MQTT version of the broker rows the tests make: MQTT_PG_PROTOCOL=5 runs a suite on MQTT 5
# (`./dev test` does so for the fault and delivery tests; see PgCluster._default_protocol).
PROTOCOL = os.environ.get("MQTT_PG_PROTOCOL", "3.1.1")
PG_USER = "postgres"


# Safety net: throw-away servers still running when the interpreter exits are stopped (pytest
# fixtures stop them explicitly; this covers an interrupted run). Detached ones (the demo's)
# and clusters in a caller-given directory are not registered.
_live: set = set()


@atexit.register
def _stop_leftovers() -> None:
    for obj in list(_live):
        try:
            obj.destroy()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


# --------------------------------------------------------------------------------------------
# small helpers


def pkglibdir() -> Path:
    """Where PG_BIN's server loads extension libraries from (the installed mqtt_pg.so)."""
    try:
        out = subprocess.run([str(PG_BIN / "pg_config"), "--pkglibdir"], capture_output=True, text=True,
                             check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return PG_BIN.parent / "lib"  # no pg_config: the usual layout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def unique(prefix: str = "e2e") -> str:
    """A short unique name, usable as a broker name or a topic level."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 20,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll `predicate` until it returns a truthy value, and return that value.

    On timeout raise AssertionError naming `message` and the last value (or exception) seen.
    Exceptions raised by the predicate count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - keep polling, report it on timeout
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        time.sleep(interval)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def chown_postgres(path: Path) -> None:
    shutil.chown(path, user=PG_USER, group=PG_USER)


def _runuser(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program as the postgres OS user (the harness runs as root)."""
    return subprocess.run(["runuser", "-u", PG_USER, "--", *args], check=check, capture_output=True,
                          text=True, timeout=timeout)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists"; treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def summarize_ms(values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (
        f"n={len(ms)} median={statistics.median(ms):.1f} ms p90={percentile(ms, 90):.1f} ms "
        f"max={max(ms):.1f} ms"
    )


# --------------------------------------------------------------------------------------------
# PostgreSQL


class PgCluster:
    """A throw-away PostgreSQL cluster (PG_BIN's version) owned by the `postgres` OS user.

    `datadir=None` makes a temporary directory under /tmp, removed by `destroy()`.
    `preload=False` leaves shared_preload_libraries empty (for the "not preloaded" test).
    """

    def __init__(
        self,
        datadir: str | Path | None = None,
        port: int | None = None,
        preload: bool = True,
        extra_conf: str = "",
    ):
        self._tmp = datadir is None
        self.datadir = Path(datadir) if datadir else Path(tempfile.mkdtemp(prefix="mqtt_pg_e2e_pg_"))
        self.port = port or free_port()
        self.preload = preload
        self.extra_conf = extra_conf
        self.logfile = self.datadir / "postgresql.log"

    def __repr__(self) -> str:
        return f"PgCluster(port={self.port}, datadir={self.datadir})"

    # -- lifecycle ----------------------------------------------------------------------------
    def init(self) -> "PgCluster":
        self.datadir.mkdir(parents=True, exist_ok=True)
        if any(self.datadir.iterdir()):
            raise RuntimeError(f"{self.datadir} is not empty")
        os.chmod(self.datadir, 0o700)
        chown_postgres(self.datadir)
        _runuser(str(PG_BIN / "initdb"), "-D", str(self.datadir), "-A", "trust", "-U", PG_USER,
                 "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        conf = [
            "",
            "# --- mqtt_pg e2e harness ---",
            f"port = {self.port}",
            f"listen_addresses = '{HOST}'",
            f"unix_socket_directories = '{self.datadir}'",
            "shared_preload_libraries = 'mqtt_pg'" if self.preload else "shared_preload_libraries = ''",
            "fsync = off",
            "max_connections = 50",
            "max_prepared_transactions = 10",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "log_min_messages = info",
            self.extra_conf,
            "",
        ]
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n".join(conf))
        return self

    def start(self, timeout: int = 60) -> "PgCluster":
        r = _runuser(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                     "-w", "-t", str(timeout), "start", check=False, timeout=timeout + 10)
        if self._tmp:
            _live.add(self)
        if r.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                               f"--- {self.logfile} ---\n{tail(self.log_text())}")
        if PROTOCOL != "3.1.1":
            self._default_protocol()
        return self

    def _default_protocol(self) -> None:
        """MQTT_PG_PROTOCOL=5: every broker row the tests make speaks MQTT 5 unless it says
        otherwise. An event trigger in template1 (so in every database created from it, which is
        every test database) sets mqtt_broker.protocol_version's default right after CREATE
        EXTENSION mqtt_pg; the tests' own INSERTs stay as they are. Run as the superuser whatever
        role creates the extension."""
        with self.connect("template1") as c:
            if c.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = 'e2e_mqtt_protocol'").fetchone():
                return
            c.execute(f"""
                CREATE FUNCTION public.e2e_mqtt_protocol() RETURNS event_trigger
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
                DECLARE
                    schema text;
                BEGIN
                    SELECT n.nspname INTO schema FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
                    WHERE e.extname = 'mqtt_pg';
                    IF schema IS NOT NULL AND EXISTS (
                            SELECT FROM pg_event_trigger_ddl_commands()
                            WHERE command_tag = 'CREATE EXTENSION' AND object_identity = 'mqtt_pg') THEN
                        EXECUTE format('ALTER TABLE %I.mqtt_broker ALTER COLUMN protocol_version SET DEFAULT %L',
                                       schema, '{PROTOCOL}');
                    END IF;
                END
                $f$""")
            c.execute("CREATE EVENT TRIGGER e2e_mqtt_protocol ON ddl_command_end WHEN TAG IN ('CREATE EXTENSION') "
                      "EXECUTE FUNCTION public.e2e_mqtt_protocol()")

    def stop(self, mode: str = "fast", timeout: int = 60) -> None:
        if not self.running():
            return
        r = _runuser(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                     "-t", str(timeout), "stop", check=False, timeout=timeout + 10)
        if r.returncode != 0 and self.running():
            # last resort: an immediate stop never waits for backends or workers
            _runuser(str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w",
                     "stop", check=False)

    def restart(self, mode: str = "fast") -> "PgCluster":
        self.stop(mode)
        return self.start()

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def destroy(self) -> None:
        """Stop, and remove the data directory if the harness created it."""
        self.stop()
        _live.discard(self)
        if self._tmp:
            shutil.rmtree(self.datadir, ignore_errors=True)

    # -- clients ------------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={HOST} port={self.port} user={PG_USER} dbname={dbname}"

    def connect(self, dbname: str = "postgres", autocommit: bool = True, **kw) -> psycopg.Connection:
        return psycopg.connect(host=HOST, port=self.port, user=PG_USER, dbname=dbname,
                               autocommit=autocommit, connect_timeout=10, **kw)

    def create_database(self, name: str) -> None:
        with self.connect() as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, dbname: str = "postgres", timeout: float = 60) -> None:
        """Wait until the cluster accepts connections again (after a crash restart)."""
        def ok():
            with self.connect(dbname) as c:
                return c.execute("SELECT 1").fetchone()[0] == 1

        wait_for(ok, timeout=timeout, interval=0.2, message=f"PostgreSQL on {self.port} to accept connections")

    # -- worker helpers (for crash/recovery tests) --------------------------------------------
    def worker_pids(self, dbname: str | None = None) -> list[int]:
        """PIDs of mqtt_pg background processes (backend_type 'mqtt_pg ...'): all of them, or
        with `dbname` only that database's worker (the launcher has no database)."""
        with self.connect() as c:
            rows = c.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type ILIKE 'mqtt%%' "
                "AND (%s::text IS NULL OR datname = %s) ORDER BY pid", (dbname, dbname)
            ).fetchall()
        return [r[0] for r in rows]

    def kill_worker(self, dbname: str | None = None, sig: int = signal.SIGKILL) -> list[int]:
        """Signal mqtt_pg's processes (see worker_pids). SIGKILL makes the postmaster restart
        every backend, as after any crash; SIGTERM stops just that process."""
        pids = self.worker_pids(dbname)
        for pid in pids:
            os.kill(pid, sig)
        return pids


# --------------------------------------------------------------------------------------------
# mosquitto


class Mosquitto:
    """A mosquitto broker in the foreground as a child process, with its own config and log.

    Defaults follow PLATFORM.md: explicit anonymous access, no persistence, no inflight or
    queue limits (load tests would lose messages otherwise), `user root` so it can read
    root-owned files. `detach=True` puts it in its own session so it outlives this process
    (the demo); `workdir` keeps config and log there instead of a temporary directory.
    """

    def __init__(self, port: int | None = None, extra_conf: str = "", workdir: str | Path | None = None,
                 detach: bool = False, persistence: bool = False):
        self._tmp = workdir is None
        # persistence=True: sessions (subscriptions, queued and in-flight QoS 1/2 messages) are
        # saved in the workdir when the broker stops (SIGTERM) and restored when it starts again,
        # so a restart on the same port keeps every persistent client's session.
        self.persistence = persistence
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mqtt_pg_e2e_mosq_"))
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.detach = detach
        self.conffile = self.workdir / "mosquitto.conf"
        self.logfile = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"Mosquitto(port={self.port}, workdir={self.workdir})"

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conffile.write_text("\n".join([
            f"listener {self.port} {HOST}",
            "allow_anonymous true",
            *(["persistence true", f"persistence_location {self.workdir}/", "persistence_file mosquitto.db",
               "autosave_interval 0"] if self.persistence else ["persistence false"]),
            "max_inflight_messages 0",
            "max_queued_messages 0",
            "user root",
            f"log_dest file {self.logfile}",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
            # the defaults plus subscribe/unsubscribe lines, so tests can see when a client's
            # subscription is in place ("<client id> <qos> <filter>")
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            self.extra_conf,
            "",
        ]))

    def start(self, timeout: float = 10) -> "Mosquitto":
        self.write_config()
        self._stderr = open(self.workdir / "mosquitto.stderr", "ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conffile)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=self.detach,
        )
        if not self.detach:
            _live.add(self)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{tail(self.log_text())}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")
            time.sleep(0.02)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        self._stderr.close()
        # wait until the port is really free, so restart() can bind it again
        wait_for(lambda: not port_open(self.port), timeout=timeout, message=f"port {self.port} to close")

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def destroy(self) -> None:
        self.stop()
        _live.discard(self)
        if self._tmp:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def connections_of(self, client_id: str) -> int:
        """How many times a client with this id connected (from the connection log lines)."""
        return sum(1 for line in self.log_text().splitlines()
                   if "New client connected" in line and f" as {client_id} " in line)

    def subscribed(self, client_id: str, topic_filter: str) -> bool:
        return any(line.endswith(f" {client_id} {q} {topic_filter}")
                   for line in self.log_text().splitlines() for q in (0, 1, 2))

    def wait_subscribed(self, client_id: str, topic_filter: str, timeout: float = 10) -> None:
        wait_for(lambda: self.subscribed(client_id, topic_filter), timeout=timeout,
                 message=f"mosquitto log line: {client_id} subscribed to {topic_filter}")

    def disconnections_of(self, client_id: str) -> int:
        return sum(1 for line in self.log_text().splitlines()
                   if f"Client {client_id} " in line
                   and ("disconnected" in line or "closed its connection" in line))

    def takeovers(self) -> list[str]:
        """Log lines of session takeovers: a client connecting with an id already connected
        makes mosquitto close the older connection."""
        return [line for line in self.log_text().splitlines() if "already connected, closing old connection" in line]


# --------------------------------------------------------------------------------------------
# MQTT clients


class MqttSub:
    """An independent paho-mqtt (v2 callback API) subscriber collecting what it receives.

    `messages` holds (topic, payload bytes, qos, retain) tuples; `times` the monotonic receive
    time of each. Connecting and subscribing wait for CONNACK and SUBACK, so the subscription is
    in place when the constructor-style helpers return.
    """

    def __init__(self, port: int, host: str = HOST, client_id: str | None = None,
                 protocol: int = mqtt.MQTTv311, clean_session: bool | None = None):
        self.port = port
        self.host = host
        self.messages: list[tuple[str, bytes, int, bool]] = []
        self.times: list[float] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._connected = threading.Event()
        self._subacks: dict[int, Any] = {}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or unique("sub"), protocol=protocol,
                                  clean_session=clean_session)
        self.client.max_inflight_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho callbacks (run on paho's network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        with self._cond:
            self._subacks[mid] = reason_code_list
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        now = time.monotonic()
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self.times.append(now)
            self._cond.notify_all()

    # API
    def connect(self, timeout: float = 10) -> "MqttSub":
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(f"paho subscriber could not connect to {self.host}:{self.port}")
        return self

    def subscribe(self, topic_filter: str, qos: int = 2, timeout: float = 10) -> "MqttSub":
        rc, mid = self.client.subscribe(topic_filter, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({topic_filter}) failed: {rc}"
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._subacks, timeout)
            assert ok, f"no SUBACK for {topic_filter} within {timeout}s"
            codes = self._subacks[mid]
        assert all(not c.is_failure for c in codes), f"SUBACK refused {topic_filter}: {codes}"
        return self

    def wait_count(self, n: int, timeout: float = 20) -> list[tuple[str, bytes, int, bool]]:
        """Wait until at least n messages arrived; return a copy of all received so far."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages) >= n, timeout)
            got = list(self.messages)
        if not ok:
            raise AssertionError(f"expected {n} messages within {timeout}s, got {len(got)}: {got[:10]!r}")
        return got

    def payloads(self) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.messages]

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> "MqttSub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mqtt_sub(port: int, topic_filter: str, qos: int = 2) -> MqttSub:
    """Connected and subscribed paho subscriber (close it, or use it as a context manager)."""
    sub = MqttSub(port).connect()
    try:
        return sub.subscribe(topic_filter, qos)
    except BaseException:
        sub.close()
        raise


def mosquitto_pub(port: int, topic: str, payload: bytes | str | None = None, *, qos: int = 0,
                  retain: bool = False, file: str | Path | None = None, lines: bytes | str | None = None,
                  null: bool = False, timeout: float = 60) -> None:
    """Run the mosquitto_pub CLI: `-m payload` for str, `-s` (whole stdin) for bytes, `-f file`,
    `-n` (null = empty payload), or `-l` with `lines` on stdin (one message per line)."""
    cmd = [MOSQUITTO_PUB, "-h", HOST, "-p", str(port), "-t", topic, "-q", str(qos)]
    if retain:
        cmd.append("-r")
    stdin = None
    if null:
        cmd.append("-n")
    elif file is not None:
        cmd += ["-f", str(file)]
    elif lines is not None:
        cmd.append("-l")
        stdin = lines.encode() if isinstance(lines, str) else lines
    elif isinstance(payload, str):
        cmd += ["-m", payload]
    else:
        # exact bytes (NUL, invalid UTF-8) cannot go through argv: send them from stdin (-s)
        assert payload is not None, "give a payload, file=, lines= or null=True"
        cmd.append("-s")
        stdin = bytes(payload)
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")


def mosquitto_sub_start(port: int, topic_filter: str, count: int = 1, qos: int = 1,
                        timeout: int = 20, client_id: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mosquitto_sub -C count -v` in the background; returns (process, client id).

    Read its stdout ("topic payload" lines) after it exits. mosquitto_sub gives no signal once
    it has subscribed: wait with Mosquitto.wait_subscribed(client_id, topic_filter)."""
    client_id = client_id or unique("cli")
    cmd = [MOSQUITTO_SUB, "-h", HOST, "-p", str(port), "-i", client_id, "-t", topic_filter,
           "-q", str(qos), "-C", str(count), "-W", str(timeout), "-v"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE), client_id


# --------------------------------------------------------------------------------------------
# mqtt_pg SQL helpers


def broker_status(conn: psycopg.Connection, broker: str) -> dict:
    return conn.execute("SELECT mqtt_status(%s)", (broker,)).fetchone()[0]


def wait_status(conn: psycopg.Connection, broker: str, *statuses: str, timeout: float = 20) -> dict:
    """Wait until mqtt_status(broker)->>'status' is one of `statuses`; return the status object."""
    def check():
        s = broker_status(conn, broker)
        return s if s.get("status") in statuses else False

    return wait_for(check, timeout=timeout, message=f"mqtt_status({broker!r}) in {statuses}")


def history_rows(conn: psycopg.Connection, topic: str, direction: str | None = None) -> list[dict]:
    """mqtt_message_history rows for one exact topic, oldest first, as dicts, with the view's
    payload_text and the row's xmin (the inserting transaction)."""
    query = ("SELECT h.id, h.broker_id, h.topic, h.payload, v.payload_text, h.qos, h.retain, "
             "h.direction, h.message_id, h.\"timestamp\", h.xmin::text AS xmin "
             "FROM mqtt_message_history h JOIN mqtt_message_history_text v ON v.id = h.id "
             "WHERE h.topic = %s")
    params: list[Any] = [topic]
    if direction:
        query += " AND h.direction = %s"
        params.append(direction)
    query += " ORDER BY h.id"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(query, params).fetchall()
    for r in rows:
        r["payload"] = bytes(r["payload"]) if r["payload"] is not None else None
    return rows


def wait_history(conn: psycopg.Connection, topic: str, n: int = 1, direction: str | None = None,
                 timeout: float = 20) -> list[dict]:
    """Wait until at least n history rows exist for `topic`; return them."""
    def check():
        rows = history_rows(conn, topic, direction)
        return rows if len(rows) >= n else False

    return wait_for(check, timeout=timeout,
                    message=f"{n} mqtt_message_history row(s) for topic {topic!r} direction {direction}")


def wait_ingesting(conn: psycopg.Connection, port: int, probe_topic: str, timeout: float = 20,
                   qos: int = 1) -> None:
    """Publish probes on `probe_topic` (which must match a subscription of the listener) until
    one lands in mqtt_message_history: proof that the subscription is live. Probe payloads are
    unique, so rows from earlier probes do not count."""
    deadline = time.monotonic() + timeout
    while True:
        payload = unique("probe")
        mosquitto_pub(port, probe_topic, payload, qos=qos)
        try:
            wait_for(lambda: conn.execute(
                "SELECT 1 FROM mqtt_message_history WHERE topic = %s AND payload = convert_to(%s, 'UTF8') "
                "AND direction = 'receive'", (probe_topic, payload)).fetchone(),
                timeout=min(0.5, max(0.05, deadline - time.monotonic())), interval=0.05)
            return
        except AssertionError:
            if time.monotonic() >= deadline:
                raise AssertionError(f"no probe on {probe_topic!r} was ingested within {timeout}s") from None


def subscribe_ingesting(conn: psycopg.Connection, port: int, prefix: str, broker: str = "b",
                        qos: int = 1) -> None:
    """Subscribe `broker` to `{prefix}/#` and wait until a probe published on `{prefix}/probe`
    is stored: the subscription is live."""
    conn.execute("SELECT mqtt_subscribe(%s, %s, %s)", (f"{prefix}/#", qos, broker))
    wait_ingesting(conn, port, f"{prefix}/probe")


def serve_broker(conn: psycopg.Connection, port: int, broker: str = "b", timeout: float = 20) -> None:
    """In a database without mqtt_pg: CREATE EXTENSION, an active broker row for the mosquitto
    on `port`, and wait until the worker is connected to it."""
    conn.execute("CREATE EXTENSION mqtt_pg")
    conn.execute("INSERT INTO mqtt_broker (name, host, port, active) VALUES (%s, %s, %s, true)",
                 (broker, HOST, port))
    wait_status(conn, broker, "connected", timeout=timeout)


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Row counts of the extension's tables: nothing may change when a call fails."""
    return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("mqtt_broker", "mqtt_topic", "mqtt_outbox")}


# --------------------------------------------------------------------------------------------
# fault injection (tests/e2e/test_faults.py): numbered payloads, clients that survive broker
# restarts, a TCP stand-in for a broken broker, process memory


SEQ_RE = re.compile(rb"n=(\d+)")


def seq_payload(n: int, pad: int = 0) -> str:
    """A payload carrying sequence number n ('n=000042'), optionally padded with 'x' to `pad` bytes."""
    p = f"n={n:06d}"
    return p + " " + "x" * (pad - len(p) - 1) if pad > len(p) + 1 else p


def seq_of(payload: bytes | str) -> int:
    """The sequence number in a payload made by seq_payload (or 'n=123' from SQL)."""
    if isinstance(payload, str):
        payload = payload.encode()
    m = SEQ_RE.search(payload)
    if not m:
        raise ValueError(f"no sequence number in {payload[:40]!r}")
    return int(m.group(1))


class SeqReport:
    """What arrived of the numbered messages `expected`, in arrival order: missing and unexpected
    numbers, duplicates (number -> extra copies), and whether first arrivals were in order."""

    def __init__(self, seqs: list[int], expected: range | list[int]):
        self.expected = list(expected)
        exp = set(self.expected)
        self.received = len(seqs)
        seen: set[int] = set()
        first: list[int] = []
        self.duplicates: dict[int, int] = {}
        for n in seqs:
            if n in seen:
                self.duplicates[n] = self.duplicates.get(n, 0) + 1
            else:
                seen.add(n)
                first.append(n)
        self.first_seen = first
        self.distinct = len(seen)
        self.missing = sorted(exp - seen)
        self.unexpected = sorted(seen - exp)
        self.out_of_order = [(a, b) for a, b in zip(first, first[1:]) if b < a]

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    @property
    def dup_count(self) -> int:
        return sum(self.duplicates.values())

    def __str__(self) -> str:
        def few(xs):
            return f"{xs[:10]}{'...' if len(xs) > 10 else ''}"
        return (f"expected {len(self.expected)}, received {self.received} ({self.distinct} distinct), "
                f"missing {len(self.missing)} {few(self.missing)}, unexpected {len(self.unexpected)}, "
                f"duplicates {self.dup_count} of {len(self.duplicates)} ids {few(sorted(self.duplicates))}, "
                f"out of order {len(self.out_of_order)} {few(self.out_of_order)}")


class PersistentSub(MqttSub):
    """A paho subscriber with a persistent session (clean_session=False, fixed client id) that
    reconnects by itself when the broker goes away and comes back; it subscribes again only if
    the broker did not keep its session. `dup_flags[i]` is the DUP flag of `messages[i]`
    (set when the broker re-delivers a message it had in flight to this client)."""

    def __init__(self, port: int, client_id: str | None = None, host: str = HOST):
        super().__init__(port, host=host, client_id=client_id or unique("psub"), clean_session=False)
        self.dup_flags: list[bool] = []
        self.connects = 0
        self.sessions_lost = 0
        self._filters: dict[str, int] = {}
        self._trigger: tuple[int, Callable[[], Any]] | None = None
        self.client.reconnect_delay_set(1, 2)

    def at_count(self, n: int, fn: Callable[[], Any]) -> None:
        """Run fn() once, on paho's network thread, as soon as n messages have arrived (at once
        if they already have): injects a fault at a precise point of a stream."""
        with self._cond:
            if len(self.messages) < n:
                self._trigger = (n, fn)
                return
        fn()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        with self._cond:
            self.connects += 1
            resubscribe = self.connects > 1 and not flags.session_present and self._filters
            if resubscribe:
                self.sessions_lost += 1
        if resubscribe:
            client.subscribe([(f, q) for f, q in self._filters.items()])
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        now = time.monotonic()
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))
            self.times.append(now)
            self.dup_flags.append(bool(msg.dup))
            self._cond.notify_all()
            fire = self._trigger if self._trigger and len(self.messages) >= self._trigger[0] else None
            if fire:
                self._trigger = None
        if fire:
            fire[1]()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 10) -> "PersistentSub":
        self._filters[topic_filter] = qos
        super().subscribe(topic_filter, qos, timeout)
        return self

    def seqs(self, topic: str | None = None) -> list[int]:
        with self._lock:
            return [seq_of(m[1]) for m in self.messages if topic is None or m[0] == topic]

    def wait_seqs(self, expected: range | list[int], topic: str | None = None, timeout: float = 60) -> SeqReport:
        """Wait until every number in `expected` arrived (on `topic`); return the report (also
        when the wait times out, so the caller's assertion shows what is missing)."""
        exp = set(expected)
        try:
            wait_for(lambda: exp <= set(self.seqs(topic)), timeout=timeout, interval=0.1,
                     message=f"{len(exp)} numbered messages")
        except AssertionError:
            pass
        return SeqReport(self.seqs(topic), expected)


class SeqPublisher:
    """An independent paho publisher with a persistent session (clean_session=False, fixed client
    id) that survives broker restarts: paho keeps every QoS 1/2 message until the broker
    acknowledges it and resends the unacknowledged ones after reconnecting. `sent` counts the
    publishes (only a count: a soak sends millions); wait_all_acked() waits until the broker
    acknowledged all of them."""

    def __init__(self, port: int, client_id: str | None = None, host: str = HOST, max_inflight: int = 0):
        self.port = port
        self.host = host
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or unique("pub"),
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self._connected = threading.Event()
        self.connects = 0
        self.sent = 0
        self._acked = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.on_publish = self._on_publish

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self._acked += 1  # paho's network thread is the only writer

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            self.connects += 1
            self._connected.set()

    def connect(self, timeout: float = 10) -> "SeqPublisher":
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise AssertionError(f"paho publisher could not connect to {self.host}:{self.port}")
        return self

    def publish(self, topic: str, payload: str | bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos)
        assert info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN), f"publish failed: {info.rc}"
        self.sent += 1

    def publish_seq(self, topic: str, numbers: range, qos: int = 1, pad: int = 0, window: int = 20_000) -> None:
        """Publish seq_payload(i, pad) for every i, keeping at most `window` unacknowledged (paho's
        packet ids are 16 bits: never have 65,535 outstanding)."""
        for i in numbers:
            if self.sent - self._acked >= window:
                wait_for(lambda: self.sent - self._acked < window // 2, timeout=120, interval=0.005,
                         message="the broker to acknowledge publishes")
            self.publish(topic, seq_payload(i, pad), qos)

    def acked(self) -> int:
        """How many publishes the broker acknowledged (on_publish calls; not is_published(),
        which raises for a message published while disconnected, one paho still sends later)."""
        return self._acked

    def wait_all_acked(self, timeout: float = 60) -> None:
        wait_for(lambda: self.acked() >= self.sent, timeout=timeout, interval=0.05,
                 message=f"the broker to acknowledge all {self.sent} publishes (acked: {self.acked()})")

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def __enter__(self) -> "SeqPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TcpSink:
    """A TCP server thread on 127.0.0.1 standing in for a broker that fails. mode 'close':
    accept each connection and close it at once (every connection attempt fails fast);
    'hold': accept, never read or answer (a hung broker). `accepts` holds the monotonic time of
    every accepted connection."""

    def __init__(self, port: int | None = None, mode: str = "hold"):
        assert mode in ("hold", "close")
        self.port = port or free_port()
        self.mode = mode
        self.accepts: list[float] = []
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"TcpSink(port={self.port}, mode={self.mode})"

    def start(self) -> "TcpSink":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, self.port))
        s.listen(128)
        s.settimeout(0.1)
        self._sock = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name=repr(self), daemon=True)
        self._thread.start()
        _live.add(self)
        return self

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepts.append(time.monotonic())
            if self.mode == "close":
                c.close()
            else:
                self._held.append(c)

    def attempts_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in list(self.accepts) if t0 <= t < t1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)
            self._thread = None
        if self._sock:
            self._sock.close()
            self._sock = None
        for c in self._held:
            try:
                c.close()
            except OSError:
                pass
        self._held.clear()
        _live.discard(self)

    def destroy(self) -> None:
        self.stop()

    def log_text(self) -> str:
        return ""

    def __enter__(self) -> "TcpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def vm_rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")
