"""mqtt_test_connection: one short connection with a broker row's settings or with settings given
as arguments, against real mosquitto listeners (plain, password, TLS, mutual TLS, a certificate
for another name), a refused port and a silent server. The running listener must not notice,
bad arguments raise their SQLSTATE with a hint, secrets appear nowhere, and roles without the
privileges the function asks for are refused."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psycopg
import pytest
from psycopg import sql

from certs import make_certs, tls_listener_conf
from harness import (
    HOST,
    Mosquitto,
    TcpSink,
    free_port,
    mosquitto_pub,
    mqtt_sub,
    table_counts,
    unique,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)
from test_security import odoo  # noqa: F401 - a fixture: a database owned by a non-superuser

PASSWORD = "Te5t-conn3ction-pw!"
KEYS = {"ok", "error", "connack", "session_present", "tls", "round_trip_ms", "host", "port", "client_id"}


@pytest.fixture(scope="module")
def certs():
    return make_certs()


@pytest.fixture(scope="module")
def brokers(certs, tmp_path_factory):
    """One mosquitto: the plain listener (anonymous, or user 'odoo' with PASSWORD), a TLS
    listener, one that demands a client certificate, and one whose certificate names only
    broker.test."""
    pwfile = tmp_path_factory.mktemp("tc") / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "odoo", PASSWORD], check=True,
                   capture_output=True)
    ports = {"tls": free_port(), "mtls": free_port(), "named": free_port()}
    conf = "\n".join([
        f"password_file {pwfile}",
        tls_listener_conf(ports["tls"], certs),
        tls_listener_conf(ports["mtls"], certs, require_certificate=True),
        tls_listener_conf(ports["named"], certs, server="named"),
    ])
    m = Mosquitto(extra_conf=conf).start()
    m.tls_ports = ports
    yield m
    m.destroy()


# Parameters of the two forms and their types: every argument is cast, so that a NULL picks
# the same overload as a value would.
BROKER_FORM = [("broker", "text"), ("timeout", "interval")]
HOST_FORM = [("host", "text"), ("port", "integer"), ("username", "text"), ("password", "text"),
             ("use_tls", "boolean"), ("ca_cert", "text"), ("client_cert", "text"),
             ("client_key", "text"), ("timeout", "interval")]


def call(c, *args, **named) -> dict:
    """SELECT mqtt_test_connection(...) with positional and named arguments; the host form
    when there are two positional arguments or more, or a host form argument by name."""
    form = HOST_FORM if len(args) >= 2 or set(named) - {"timeout"} else BROKER_FORM
    types = dict(form)
    parts = [sql.SQL("{}::" + t).format(sql.Placeholder()) for (_, t), _ in zip(form, args)]
    parts += [sql.SQL(f"{k} => {{}}::{types[k]}").format(sql.Placeholder()) for k in named]
    q = sql.SQL("SELECT mqtt_test_connection({})").format(sql.SQL(", ").join(parts))
    return c.execute(q, [*args, *named.values()]).fetchone()[0]


def assert_ok(r: dict, tls: bool) -> None:
    assert KEYS <= set(r), r
    assert r["ok"] is True and r["error"] is None, r
    assert r["connack"] == "Success" and r["session_present"] is False, r
    assert r["tls"] is tls, r
    assert isinstance(r["round_trip_ms"], (int, float)) and 0 < r["round_trip_ms"] < 5000, r
    assert r["client_id"].startswith("mqttpgtest") and len(r["client_id"]) == 23, r


def assert_failed(r: dict, *needles: str) -> None:
    assert KEYS <= set(r), r
    assert r["ok"] is False, r
    for n in needles:
        assert n in (r["error"] or ""), r


def last_error(c, name) -> str:
    return wait_for(lambda: c.execute("SELECT mqtt_status(%s)->>'last_error'", (name,)).fetchone()[0],
                    message=f"a last_error for {name}")


# ---- what it connects to -------------------------------------------------------------------

def test_a_broker_row_plain(conn, brokers, make_broker):
    b = make_broker(port=brokers.port, start=False)
    r = call(conn, b.name)
    assert_ok(r, tls=False)
    assert (r["broker"], r["host"], r["port"]) == (b.name, HOST, brokers.port)
    # Its own client id, never the listener's.
    status_id = conn.execute("SELECT mqtt_status(%s)->>'client_id'", (b.name,)).fetchone()[0]
    assert r["client_id"] != status_id
    # A stopped broker stays stopped.
    assert conn.execute("SELECT mqtt_status(%s)->>'status'", (b.name,)).fetchone()[0] == "stopped"
    # The probe said goodbye with a DISCONNECT (mosquitto: "disconnected", not "closed").
    wait_for(lambda: f"Client {r['client_id']} disconnected." in brokers.log_text(),
             message="the probe's clean disconnect in the broker log")


def test_host_form_plain_and_named_arguments(conn, brokers):
    assert_ok(call(conn, HOST, brokers.port), tls=False)
    r = call(conn, host=HOST, port=brokers.port, timeout="2 seconds")
    assert_ok(r, tls=False)
    assert "broker" not in r and (r["host"], r["port"]) == (HOST, brokers.port)


def test_password(pg, conn, brokers, make_broker):
    good = make_broker(port=brokers.port, start=False, username="odoo", password=PASSWORD)
    assert_ok(call(conn, good.name), tls=False)
    assert_ok(call(conn, HOST, brokers.port, "odoo", PASSWORD), tls=False)

    bad = make_broker(port=brokers.port, start=False, username="odoo", password="wrong-pw-123")
    r = call(conn, bad.name)
    assert_failed(r, "refused the connection")
    assert r["connack"] in ("NotAuthorized", "BadUserNamePassword"), r
    # The same words as the worker's status for the same broker.
    conn.execute("SELECT mqtt_start_listener(%s)", (bad.name,))
    assert last_error(conn, bad.name) == r["error"]
    conn.execute("SELECT mqtt_stop_listener(%s)", (bad.name,))
    r2 = call(conn, HOST, brokers.port, "odoo", "wrong-pw-123")
    assert_failed(r2, "refused the connection")
    everything = str(r) + str(r2) + pg.log_text()
    assert PASSWORD not in everything and "wrong-pw-123" not in everything


def test_tls(conn, brokers, certs, make_broker):
    ca = certs.text("ca.pem")
    port = brokers.tls_ports["tls"]
    b = make_broker(port=port, start=False, use_tls=True, ca_cert=ca)
    assert_ok(call(conn, b.name), tls=True)
    assert_ok(call(conn, HOST, port, use_tls=True, ca_cert=ca), tls=True)
    # Another CA: named, as the status names it.
    r = call(conn, HOST, port, use_tls=True, ca_cert=certs.text("otherca.pem"))
    assert_failed(r, "not signed by", "ca_cert")
    assert r["tls"] is True and r["connack"] is None
    # Plain MQTT to a TLS port, and TLS to a plain one.
    assert_failed(call(conn, HOST, port), "TLS port")
    assert_failed(call(conn, HOST, brokers.port, use_tls=True, ca_cert=ca), "plain MQTT port")


def test_tls_server_name(conn, brokers, certs, make_broker):
    ca = certs.text("ca.pem")
    port = brokers.tls_ports["named"]
    # The certificate names only broker.test; reached by IP it does not match...
    b = make_broker(port=port, start=False, use_tls=True, ca_cert=ca)
    assert_failed(call(conn, b.name), "not valid for", "tls_server_name")
    assert_failed(call(conn, HOST, port, use_tls=True, ca_cert=ca), "not valid for")
    # ...until the row's tls_server_name says which name to check.
    conn.execute("UPDATE mqtt_broker SET tls_server_name = 'broker.test' WHERE id = %s", (b.id,))
    assert_ok(call(conn, b.name), tls=True)


def test_mutual_tls(pg, conn, brokers, certs, make_broker):
    ca, cert, key = certs.text("ca.pem"), certs.text("client.pem"), certs.text("client.key")
    port = brokers.tls_ports["mtls"]
    b = make_broker(port=port, start=False, use_tls=True, ca_cert=ca, client_cert=cert, client_key=key)
    r1 = call(conn, b.name)
    assert_ok(r1, tls=True)
    r2 = call(conn, HOST, port, use_tls=True, ca_cert=ca, client_cert=cert, client_key=key)
    assert_ok(r2, tls=True)
    r3 = call(conn, HOST, port, use_tls=True, ca_cert=ca)
    assert_failed(r3, "client certificate")
    seen = str(r1) + str(r2) + str(r3) + pg.log_text()
    for line in key.splitlines()[1:-1]:
        assert line not in seen


def test_refused_port(conn):
    port = free_port()
    r = call(conn, HOST, port)
    assert_failed(r, "refused", f"{HOST}:{port}")
    assert r["connack"] is None and r["round_trip_ms"] < 1000, r


def test_silent_server_hits_the_timeout(conn):
    with TcpSink(mode="hold") as sink:
        t0 = time.monotonic()
        r = call(conn, HOST, sink.port, timeout="500 milliseconds")
        took = time.monotonic() - t0
    assert_failed(r, "no answer from", f"{HOST}:{sink.port}")
    assert 500 <= r["round_trip_ms"] < 2000 and took < 3, (r, took)


def test_a_row_whose_password_cannot_be_opened(conn, brokers, make_broker):
    """What the worker would show (a sealed password from another server): ok false, nothing
    attempted."""
    b = make_broker(port=brokers.port, start=False, username="odoo", password=PASSWORD)
    conn.execute("UPDATE mqtt_broker SET password_sealed = '\\x01'::bytea || decode(repeat('00', 40), 'hex') "
                 "WHERE id = %s", (b.id,))
    r = call(conn, b.name)
    assert r["ok"] is False and r["broker"] == b.name, r
    assert "mqtt_broker.password of broker" in r["error"] and "set it again" in r["error"], r
    assert r["round_trip_ms"] is None, r


# ---- the running connection ----------------------------------------------------------------

def test_the_running_listener_does_not_notice(conn, fresh_mosq, make_broker, topic):
    b = make_broker(port=fresh_mosq.port)
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/in/#", b.name))
    wait_ingesting(conn, fresh_mosq.port, f"{topic}/in/probe")
    before = conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0]
    probes = [call(conn, b.name) for _ in range(5)]
    for r in probes:
        assert_ok(r, tls=False)
        assert r["client_id"] != b.client_id
    assert len({r["client_id"] for r in probes}) == 5
    # Messages still flow both ways on the same connection; by the time they have, a
    # disturbance the probes caused (a takeover, a reconnect) would show.
    mosquitto_pub(fresh_mosq.port, f"{topic}/in/x", "after the probes", qos=1)
    assert wait_history(conn, f"{topic}/in/x", 1)[0]["payload"] == b"after the probes"
    with mqtt_sub(fresh_mosq.port, f"{topic}/out", qos=1) as sub:
        conn.execute("SELECT mqtt_publish(%s, 'still here', 1, false, %s)", (f"{topic}/out", b.name))
        assert sub.wait_count(1)[0][1] == b"still here"
    after = conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0]
    assert after["status"] == "connected", after
    assert (after["reconnects"], after["since"], after["last_error"]) == \
        (before["reconnects"], before["since"], before["last_error"]), (before, after)
    assert fresh_mosq.takeovers() == []
    assert fresh_mosq.connections_of(b.client_id) == 1


def test_cancel_and_statement_timeout_interrupt_the_wait(conn, connect):
    with TcpSink(mode="hold") as sink:
        conn.execute("SET statement_timeout = '300ms'")
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            call(conn, HOST, sink.port, timeout="60 seconds")
        assert time.monotonic() - t0 < 2
        conn.execute("RESET statement_timeout")
        # pg_cancel_backend from another session.
        other = connect()
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        def cancel_soon():
            # once the call is waiting for the broker
            wait_for(lambda: other.execute("SELECT state = 'active' AND query LIKE '%%mqtt_test_connection%%' "
                                           "FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0],
                     interval=0.01, message="the test connection under way")
            other.execute("SELECT pg_cancel_backend(%s)", (pid,))
        threading.Thread(target=cancel_soon, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            call(conn, HOST, sink.port, timeout="60 seconds")
        assert time.monotonic() - t0 < 2
    # The backend is fine afterwards.
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_a_name_lookup_thread_never_takes_postgres_signals(conn, brokers, certs):
    """A host name is looked up on a thread tokio starts inside the backend: it must run with
    every signal blocked, so Postgres' handlers (cancel, timeouts, latches) stay on the main
    thread. /etc/hosts has localhost as 127.0.0.1 only here."""
    assert_ok(call(conn, "localhost", brokers.port), tls=False)
    assert_ok(call(conn, "localhost", brokers.tls_ports["tls"], use_tls=True, ca_cert=certs.text("ca.pem")),
              tls=True)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with TcpSink(mode="hold") as sink:
        done = {}
        waiting = threading.Thread(target=lambda: done.update(r=call(conn, "localhost", sink.port,
                                                                     timeout="3 seconds")))
        waiting.start()
        try:
            tids = wait_for(lambda: [t for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid],
                            timeout=3, message="tokio's lookup thread in the backend")
            for tid in tids:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    blocked = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2,
                            signal.SIGHUP, signal.SIGQUIT, signal.SIGURG):
                    assert blocked & (1 << (sig - 1)), f"thread {tid} takes {sig.name} (SigBlk {blocked:x})"
        finally:
            waiting.join(10)
    assert_failed(done["r"], "no answer from", f"localhost:{sink.port}")


# ---- bad arguments -------------------------------------------------------------------------

@pytest.mark.parametrize("args,named,needle", [
    ((None, 1883), {}, "host must not be NULL"),
    (("", 1883), {}, "host must not be empty"),
    ((HOST, None), {}, "port must not be NULL"),
    ((HOST, 0), {}, "port 0 is out of range"),
    ((HOST, 70000), {}, "port 70000 is out of range"),
    ((HOST, 1883), {"timeout": "0 seconds"}, "timeout is out of range"),
    ((HOST, 1883), {"timeout": "-1 seconds"}, "timeout is out of range"),
    ((HOST, 1883), {"timeout": "5 minutes 1 second"}, "timeout is out of range"),
    ((HOST, 1883), {"timeout": "1 month"}, "timeout is out of range"),
    ((HOST, 1883), {"timeout": None}, "timeout must not be NULL"),
    ((HOST, 1883), {"use_tls": None}, "use_tls must not be NULL"),
    ((HOST, 1883), {"password": "x"}, "password needs a username"),
    ((HOST, 1883), {"ca_cert": "@ca"}, "use_tls is false"),
    ((HOST, 1883), {"use_tls": True, "ca_cert": "not a certificate"}, "ca_cert: no PEM block"),
    ((HOST, 1883), {"use_tls": True, "client_cert": "@cert"}, "client_cert is set but client_key is not"),
    ((HOST, 1883), {"use_tls": True, "client_cert": "@key", "client_key": "@key"}, "client_cert: holds"),
    ((HOST, 1883), {"use_tls": True, "client_cert": "@cert", "client_key": "@cert"}, "client_key: holds a certificate"),
    ((HOST, 1883), {"use_tls": True, "client_cert": "@cert", "client_key": "@otherkey"}, "does not belong"),
])
def test_bad_arguments_raise_22023_with_a_hint(pg, conn, certs, args, named, needle):
    files = {"@ca": "ca.pem", "@cert": "client.pem", "@key": "client.key", "@otherkey": "client_rsa.key"}
    named = {k: certs.text(files[v]) if v in files else v for k, v in named.items()}
    before = table_counts(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        call(conn, *args, **named)
    assert needle in e.value.diag.message_primary, e.value.diag.message_primary
    assert "mqtt_broker." not in e.value.diag.message_primary
    assert e.value.diag.message_hint, "no hint"
    assert table_counts(conn) == before
    for key in ("client.key", "client_rsa.key"):
        for line in certs.text(key).splitlines()[1:-1]:
            assert line not in str(e.value) and line not in pg.log_text()


def test_bad_arguments_of_the_broker_form(conn, brokers, make_broker):
    with pytest.raises(psycopg.errors.UndefinedObject) as e:
        call(conn, unique("nosuch"))
    assert e.value.diag.message_hint
    with pytest.raises(psycopg.errors.UndefinedObject):
        call(conn, "x' OR true --")
    b = make_broker(port=brokers.port, start=False)
    for timeout in ("0", "-5 seconds", "301 seconds", None):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            call(conn, b.name, timeout=timeout)
        assert e.value.diag.message_hint
    # The most allowed.
    assert_ok(call(conn, b.name, timeout="5 minutes"), tls=False)


# ---- privileges ----------------------------------------------------------------------------

def refused(c, *args) -> None:
    """The call is refused with 42501 and a hint naming the privileges it takes."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        call(c, *args)
    assert e.value.diag.message_hint and "mqtt_broker" in e.value.diag.message_hint


def test_privileges(odoo, brokers):  # noqa: F811 - odoo is the fixture imported above
    db, owner, connect = odoo
    c = connect()
    c.execute("INSERT INTO mqtt_broker (name, host, port, username, password) VALUES ('b', %s, %s, 'odoo', %s)",
              (HOST, brokers.port, PASSWORD))
    # The owner (not a superuser) may do both; NULL is the only broker.
    assert_ok(call(c, "b"), tls=False)
    assert_ok(call(c, None), tls=False)
    assert_ok(call(c, HOST, brokers.port), tls=False)

    # A role with no privilege on mqtt_broker: refused, and it learns nothing, not even which
    # brokers exist, or whether a port is open.
    hostile = connect(user=connect.new_role("hostile"))
    for args in (("b",), (unique("nosuch"),), (None,), (HOST, brokers.port), (HOST, free_port()),
                 (HOST, brokers.port, "odoo", PASSWORD)):
        refused(hostile, *args)
    # Tricks: its own functions named like those the checks call, ahead on its search_path.
    schema = unique("trap")
    c.execute(f'CREATE SCHEMA "{schema}"')
    c.execute(f'GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{hostile.info.user}"')
    hostile.execute(f'CREATE FUNCTION "{schema}".has_table_privilege(oid, text, text) RETURNS boolean '
                    'LANGUAGE sql AS $$ SELECT true $$')
    hostile.execute(f'CREATE FUNCTION "{schema}".has_column_privilege(oid, text, text, text) RETURNS boolean '
                    'LANGUAGE sql AS $$ SELECT true $$')
    hostile.execute(f'SET search_path = "{schema}", public')
    refused(hostile, "b")
    refused(hostile, HOST, brokers.port)

    # Reading brokers is not enough for either form.
    reader = connect(user=connect.new_role("reader"))
    c.execute(f'GRANT SELECT ON mqtt_broker TO "{reader.info.user}"')
    refused(reader, "b")
    refused(reader, HOST, brokers.port)

    # Who may start the listener may test its connection; the host form still needs INSERT.
    operator = connect(user=connect.new_role("operator"))
    c.execute(f'GRANT SELECT, UPDATE (active) ON mqtt_broker TO "{operator.info.user}"')
    r = call(operator, "b")
    assert_ok(r, tls=False)
    assert PASSWORD not in str(r)
    refused(operator, HOST, brokers.port)

    # Who may insert broker rows (and so point the worker anywhere) may use the host form.
    admin = connect(user=connect.new_role("brokeradmin"))
    c.execute(f'GRANT INSERT ON mqtt_broker TO "{admin.info.user}"')
    assert_ok(call(admin, HOST, brokers.port), tls=False)
    refused(admin, "b")

    # None of it touched the row or its listener.
    assert c.execute("SELECT active, has_password FROM mqtt_broker WHERE name = 'b'").fetchone() == (False, True)
    wait_status(c, "b", "stopped")
