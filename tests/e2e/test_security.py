"""Security as an Odoo database needs it: write-only broker secrets (also across pg_dump and a
restore made by the owner), a broker refusing the login, Last Will and birth messages, access
rules that are the permission to publish and subscribe, and a non-superuser owner who tries
every trick to run code with the worker's privileges."""

from __future__ import annotations

import subprocess
import time

import psycopg
import pytest
from psycopg import sql

from harness import HOST, PG_BIN, Mosquitto, mqtt_sub, unique, wait_for, wait_status

SECRET = "Sup3r-s3cret-pw!"


@pytest.fixture
def odoo(pg):
    """A database owned by a non-superuser role, with the extension made by a superuser, as an
    Odoo installation has it. Yields (db, owner role, connect(role=owner) -> connection)."""
    role, db = unique("odoo"), unique("odoodb")
    made_roles = [role]
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{role}"')
    with pg.connect(db) as su:
        su.execute("CREATE EXTENSION mqtt_pg")
    opened = []

    def connect(user=role, dbname=db, autocommit=True):
        c = psycopg.connect(host=HOST, port=pg.port, dbname=dbname, user=user, autocommit=autocommit)
        opened.append(c)
        return c

    def new_role(prefix, *extra):
        r = unique(prefix)
        with pg.connect() as admin:
            admin.execute(f'CREATE ROLE "{r}" LOGIN NOSUPERUSER {" ".join(extra)}')
        made_roles.append(r)
        return r

    connect.new_role = new_role
    yield db, role, connect
    for c in opened:
        c.close()
    with pg.connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for r in reversed(made_roles):
            admin.execute(f'DROP ROLE IF EXISTS "{r}"')


@pytest.fixture
def auth_mosq(mosquitto_factory, tmp_path):
    """A mosquitto that takes user 'odoo' with SECRET only."""
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pwfile), "odoo", SECRET], check=True, capture_output=True)
    # Anonymous test clients still get in (allow_anonymous stays true); a client that gives a
    # user name must give its password.
    m = mosquitto_factory(extra_conf=f"password_file {pwfile}")
    m.open_port = m.port
    return m


def is_superuser(pg, role):
    with pg.connect() as admin:
        return admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


# ---- secrets -----------------------------------------------------------------------------

def test_password_is_write_only_for_the_owner(pg, odoo, auth_mosq, topic):
    db, role, connect = odoo
    c = connect()
    c.execute("INSERT INTO mqtt_broker (name, host, port, username) VALUES ('b', %s, %s, 'odoo')",
              (HOST, auth_mosq.port))
    # Set it the way an Odoo model writes a field.
    c.execute("UPDATE mqtt_broker SET password = %s WHERE name = 'b'", (SECRET,))
    c.execute("SELECT mqtt_start_listener('b')")
    wait_status(c, "b", "connected")
    with mqtt_sub(auth_mosq.open_port, f"{topic}/x", qos=1) as sub:
        c.execute("SELECT mqtt_publish(%s, 'authenticated', 1, false, 'b')", (f"{topic}/x",))
        assert sub.wait_count(1)[0][1] == b"authenticated"
    # Nothing gives it back: the column, the whole row, status, a text cast of the sealed form.
    assert c.execute("SELECT password, has_password FROM mqtt_broker WHERE name = 'b'").fetchone() == (None, True)
    everything = " ".join(str(v) for v in c.execute("SELECT * FROM mqtt_broker").fetchone())
    everything += str(c.execute("SELECT mqtt_status('b')").fetchone()[0])
    everything += str(c.execute("SELECT encode(password_sealed, 'escape') FROM mqtt_broker").fetchone()[0])
    assert SECRET not in everything
    # The owner may not forge or copy the sealed form, nor call the sealing functions.
    for stmt in ("UPDATE mqtt_broker SET password_sealed = NULL",
                 "SELECT _mqtt_seal_password('x', 'h', 1, 'u', false, NULL, NULL)",
                 "SELECT _mqtt_seal_client_key('x', NULL)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute(stmt)
    # Pointing the row at another host clears the password (it would otherwise be sent there).
    notices = []
    c.add_notice_handler(lambda n: notices.append(n.message_primary))
    c.execute("UPDATE mqtt_broker SET host = 'localhost' WHERE name = 'b'")
    assert c.execute("SELECT has_password FROM mqtt_broker WHERE name = 'b'").fetchone()[0] is False
    assert any("cleared" in n for n in notices), notices
    wait_status(c, "b", "disconnected", "connecting")
    # Set again together with the endpoint: works.
    c.execute("UPDATE mqtt_broker SET host = %s, password = %s WHERE name = 'b'", (HOST, SECRET))
    wait_status(c, "b", "connected")
    c.execute("SELECT mqtt_stop_listener('b')")
    assert SECRET not in pg.log_text()


def test_wrong_password_shows_not_authorized_and_backs_off(odoo, auth_mosq):
    _, _, connect = odoo
    c = connect()
    c.execute("INSERT INTO mqtt_broker (name, host, port, username, password, reconnect_min_ms, active) "
              "VALUES ('b', %s, %s, 'odoo', 'wrong', 1000, true)", (HOST, auth_mosq.port))
    s = wait_for(lambda: (lambda s: s if "authoriz" in (s.get("last_error") or "") or
                          "password" in (s.get("last_error") or "") else False)(
                     c.execute("SELECT mqtt_status('b')").fetchone()[0]),
                 message="login refused in status")
    assert "wrong" not in str(s)
    r0 = s["reconnects"]
    t0 = time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 3, timeout=5, message="3 s pass")
    r1 = c.execute("SELECT (mqtt_status('b')->>'reconnects')::int").fetchone()[0]
    assert r1 - r0 <= 4, f"{r1 - r0} login attempts in 3 s with a 1 s minimum backoff"
    c.execute("SELECT mqtt_stop_listener('b')")


def test_dump_and_restore_as_the_owner(pg, odoo, auth_mosq, scratch_db, topic):
    """Odoo's Backup button runs pg_dump as the owner; a restore into a new database (made by a
    superuser with the extension, as Odoo's duplicate and restore have it) works as the owner,
    the dump holds no secret in clear, and on this server the restored broker logs in."""
    db, role, connect = odoo
    c = connect()
    c.execute("INSERT INTO mqtt_broker (name, host, port, username, password, is_default) "
              "VALUES ('b', %s, %s, 'odoo', %s, true)", (HOST, auth_mosq.port, SECRET))
    c.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES ('public', 'pub/#', true)")
    c.execute("SELECT mqtt_publish('plant/cmd', 'queued', 1)")
    dump = subprocess.run([f"{PG_BIN}/pg_dump", "-h", HOST, "-p", str(pg.port), "-U", role, db],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert SECRET not in dump.stdout
    target = scratch_db("restored")
    with pg.connect() as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(target), sql.Identifier(role)))
    with pg.connect(target) as su:
        su.execute("CREATE EXTENSION mqtt_pg")
    r = subprocess.run([str(PG_BIN / "psql"), "-h", HOST, "-p", str(pg.port), "-U", role, "-d", target,
                        "-v", "ON_ERROR_STOP=1", "-q"], input=dump.stdout, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "ERROR" in l)
    t = connect(dbname=target)
    assert t.execute("SELECT name, has_password, password FROM mqtt_broker").fetchall() == [("b", True, None)]
    assert t.execute("SELECT role_name, topic_filter FROM mqtt_access_control ORDER BY id").fetchall() == \
        [(role, "#"), ("public", "pub/#")]
    assert t.execute("SELECT topic, payload FROM mqtt_outbox").fetchall() == [("plant/cmd", b"queued")]
    with mqtt_sub(auth_mosq.open_port, "plant/cmd", qos=1) as sub:
        t.execute("SELECT mqtt_start_listener('b')")
        wait_status(t, "b", "connected")
        assert sub.wait_count(1)[0][1] == b"queued"
    t.execute("SELECT mqtt_stop_listener('b')")


# ---- Last Will and birth -------------------------------------------------------------------

class CutProxy:
    """A TCP proxy to a broker that can cut every connection at once, the way a network
    failure would: no DISCONNECT reaches the broker, and for `hold` seconds no new connection
    gets through (as long as the network stays down)."""

    def __init__(self, target_port):
        import socket
        import threading
        self.target = target_port
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((HOST, 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.conns = []
        self.stop = False
        self.down_until = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading
        while not self.stop:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            if time.monotonic() < self.down_until:
                a.close()
                continue
            b = socket.create_connection((HOST, self.target))
            self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        # One side closed: close the other too, as the network would once the peer is gone.
        CutProxy._close(src, dst)

    @staticmethod
    def _close(*socks):
        import socket
        # shutdown first: it wakes a thread blocked in recv on the same socket, and sends the
        # FIN at once. A bare close() while another thread is in recv() defers both.
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in socks:
            s.close()

    def cut(self, hold: float = 0.0):
        self.down_until = time.monotonic() + hold
        conns, self.conns = self.conns, []
        self._close(*conns)

    def close(self):
        self.stop = True
        self.srv.close()
        self.cut()


def test_last_will_on_sigkill_and_cut_and_birth_on_every_connect(mosq, topic):
    """On a cluster of its own: SIGKILL of a worker makes PostgreSQL restart every backend."""
    from conftest import TEST_DB, extension_cluster
    status = f"{topic}/status"
    proxy = CutProxy(mosq.port)
    try:
        with extension_cluster() as cluster:
            with cluster.connect(TEST_DB) as c:
                c.execute("INSERT INTO mqtt_broker (name, host, port, will_topic, will_payload, will_qos, will_retain, "
                          "birth_payload, keepalive) VALUES ('b', %s, %s, %s, 'offline', 1, true, 'online', 5)",
                          (HOST, proxy.port, status))
                client_id = c.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0]
                with mqtt_sub(mosq.port, status, qos=1) as sub:
                    c.execute("SELECT mqtt_start_listener('b')")
                    assert sub.wait_count(1)[0][1] == b"online"
                    # A cut connection: the broker publishes the will, the reconnect the birth again.
                    proxy.cut(hold=3)
                    assert [m[1] for m in sub.wait_count(3, timeout=30)[1:]] == [b"offline", b"online"]
                    # Straight to the broker now: a clean reconnect, in which the worker says
                    # offline itself (the broker drops the will on a DISCONNECT), then online.
                    c.execute("UPDATE mqtt_broker SET port = %s", (mosq.port,))
                    assert [m[1] for m in sub.wait_count(5, timeout=30)[3:]] == [b"offline", b"online"]
                    # SIGKILL of the worker: the kernel closes its socket, the broker publishes
                    # the will, and the restarted worker the birth.
                    cluster.kill_worker(TEST_DB)
                    assert [m[1] for m in sub.wait_count(7, timeout=60)[5:]] == [b"offline", b"online"]
            cluster.wait_ready(TEST_DB)
            with cluster.connect(TEST_DB) as c:
                # The retained value says online now; a clean stop sends no will.
                with mqtt_sub(mosq.port, status, qos=1) as late:
                    assert late.wait_count(1)[0][1] == b"online"
                # A clean stop: the worker says offline itself before it disconnects.
                gone = mosq.disconnections_of(client_id)
                c.execute("SELECT mqtt_stop_listener('b')")
                wait_for(lambda: mosq.disconnections_of(client_id) > gone, message="a clean disconnect")
                with mqtt_sub(mosq.port, status, qos=1) as after:
                    assert after.wait_count(1)[0][1] == b"offline"
    finally:
        proxy.close()


def test_will_columns_are_checked(conn):
    name = unique("will")
    for cols, vals in ((("will_topic",), ("a/+/b",)), (("will_topic",), ("#",)),
                       (("will_payload",), ("offline",)), (("birth_payload",), ("online",)),
                       (("will_topic", "will_qos"), ("a/b", 3)), (("will_topic", "will_qos"), ("a/b", -1)),
                       (("port",), (0,)), (("port",), (65536,)), (("port",), (-1,)),
                       (("tls_server_name",), ("",))):
        with pytest.raises((psycopg.errors.InvalidParameterValue, psycopg.errors.CheckViolation)):
            conn.execute(sql.SQL("INSERT INTO mqtt_broker (name, host, {}) VALUES (%s, 'h', {})").format(
                sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(vals))),
                (name, *vals))
    assert conn.execute("SELECT count(*) FROM mqtt_broker WHERE name = %s", (name,)).fetchone()[0] == 0


# ---- access rules --------------------------------------------------------------------------

def test_access_rules_are_the_permission(pg, odoo, mosq, topic):
    db, owner, connect = odoo
    o = connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default, active) VALUES ('b', %s, %s, true, true)",
              (HOST, mosq.port))
    wait_status(o, "b", "connected")
    # The owner's own rule is there and visible.
    assert o.execute("SELECT role_name, topic_filter, allow_publish, allow_subscribe FROM mqtt_access_control").fetchall() \
        == [(owner, "#", True, True)]
    device = connect.new_role("pump")
    group = connect.new_role("plant")
    member = connect.new_role("member", "IN ROLE", f'"{group}"')
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (%s, %s, true)",
              (device, f"{topic}/{device}/#"))
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, %s, true)",
              (group, f"{topic}/plant/#"))
    d = connect(device)
    # No table privilege at all, and still it publishes where its rule allows.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("SELECT count(*) FROM mqtt_outbox")
    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        d.execute("SELECT mqtt_publish(%s, 'mine', 1)", (f"{topic}/{device}/state",))
        assert sub.wait_count(1)[0][1] == b"mine"
    depth = o.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0]
    for t in (f"{topic}/other/state", f"{topic}/{device}x/state", f"{topic}/plant/x"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            d.execute("SELECT mqtt_publish(%s, 'not mine', 1)", (t,))
        assert e.value.diag.message_hint and "mqtt_access_control" in e.value.diag.message_hint
    # A bulk publish that hits one denied row queues none of them.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("SELECT count(mqtt_publish(CASE WHEN i = 50 THEN %s ELSE %s END, 'x')) FROM generate_series(1, 100) i",
                  (f"{topic}/other", f"{topic}/{device}/bulk"))
    assert o.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == depth
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("SELECT mqtt_subscribe(%s)", (f"{topic}/{device}/#",))
    # Membership counts: the group's subscribe rule applies to its member, for covered filters only.
    m = connect(member)
    assert m.execute("SELECT mqtt_subscribe(%s)", (f"{topic}/plant/+/temp",)).fetchone()[0] > 0
    for f in (f"{topic}/#", f"{topic}/+/x", "#"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            m.execute("SELECT mqtt_subscribe(%s)", (f,))
    assert m.execute("SELECT mqtt_unsubscribe(%s)", (f"{topic}/plant/+/temp",)).fetchone()[0] is True
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        m.execute("SELECT mqtt_publish(%s, 'x')", (f"{topic}/plant/a",))
    # Direct inserts of subscriptions are checked too, for a role the owner granted INSERT.
    o.execute(f'GRANT SELECT, INSERT, UPDATE ON mqtt_topic TO "{device}"')
    o.execute(f'GRANT SELECT ON mqtt_broker TO "{device}"')
    o.execute(f'GRANT USAGE ON SEQUENCE mqtt_topic_id_seq TO "{device}"')
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe) SELECT id, '#', true FROM mqtt_broker")
    d.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe) SELECT id, %s, false FROM mqtt_broker",
              (f"{topic}/sneaky",))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("UPDATE mqtt_topic SET subscribe = true WHERE name = %s", (f"{topic}/sneaky",))
    # The owner narrows its own rule: it is checked like anyone else.
    o.execute("UPDATE mqtt_access_control SET topic_filter = 'odoo/#' WHERE role_name = %s", (owner,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        o.execute("SELECT mqtt_publish('elsewhere', 'x')")
    o.execute("SELECT mqtt_publish('odoo/ok', 'x')")
    o.execute("SELECT mqtt_stop_listener('b')")


def test_rules_seen_within_the_transaction(odoo):
    db, owner, connect = odoo
    o = connect()
    o.execute("INSERT INTO mqtt_broker (name, host, is_default) VALUES ('b', 'localhost', true)")
    o.execute("DELETE FROM mqtt_access_control")
    with connect(autocommit=False) as tx:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            tx.execute("SELECT mqtt_publish('a/b', 'x')")
        tx.rollback()
        tx.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (current_user, 'a/#', true)")
        assert tx.execute("SELECT mqtt_publish('a/b', 'x')").fetchone()[0] > 0
        tx.execute("DELETE FROM mqtt_access_control")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            tx.execute("SELECT mqtt_publish('a/b', 'x')")
        tx.rollback()


def test_check_permission(pg, odoo):
    db, owner, connect = odoo
    o = connect()
    other = connect.new_role("other")
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish, allow_subscribe) "
              "VALUES (%s, 'a/#', true, false), ('public', 'pub/+', false, true)", (other,))
    q = "SELECT mqtt_check_permission(%s, %s, %s)"
    assert o.execute(q, (other, "a/b", "publish")).fetchone()[0] is True
    assert o.execute(q, (other, "b", "publish")).fetchone()[0] is False
    assert o.execute(q, (other, "a/+", "subscribe")).fetchone()[0] is False
    assert o.execute(q, (other, "pub/x", "subscribe")).fetchone()[0] is True
    assert o.execute(q, (owner, "anything/at/all", "publish")).fetchone()[0] is True
    assert o.execute(q, ("postgres", "$SYS/x", "publish")).fetchone()[0] is True, "superusers are not checked"
    for args, err in (((other, "a/b", "read"), psycopg.errors.InvalidParameterValue),
                      ((other, "a/+", "publish"), psycopg.errors.InvalidParameterValue),
                      ((other, "a/#/b", "subscribe"), psycopg.errors.InvalidParameterValue),
                      ((other, "a/b", None), psycopg.errors.InvalidParameterValue),
                      (("no_such_role_x", "a/b", "publish"), psycopg.errors.UndefinedObject)):
        with pytest.raises(err):
            o.execute(q, args)
    # A role may ask about itself, not about others.
    x = connect(other)
    assert x.execute(q, (other, "a/b", "publish")).fetchone()[0] is True
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        x.execute(q, (owner, "a/b", "publish"))


# ---- no way up through the worker ------------------------------------------------------------

ESCALATE = """
CREATE FUNCTION {schema}.{name}({args}) RETURNS {ret} LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE 'ALTER ROLE {role} SUPERUSER';
    RETURN {body};
END $f$;
"""


def test_owner_tricks_never_run_with_the_worker_privileges(pg, odoo, mosq, topic):
    """The owner plants functions, an operator and settings that would make it a superuser if
    the worker (or mqtt_publish's privileged insert) ever ran them; all of mqtt_pg keeps working
    and the owner stays unprivileged."""
    db, owner, connect = odoo
    o = connect()
    o.execute("CREATE SCHEMA trap")
    for name, args, ret, body in (("now", "", "timestamptz", "pg_catalog.now()"),
                                  ("nextval", "regclass", "bigint", "pg_catalog.nextval($1)"),
                                  ("pg_has_role", "oid, oid, text", "boolean", "true"),
                                  ("textlen", "text", "integer", "0"),
                                  ("mqtt_payload_text", "bytea", "text", "'x'")):
        for schema in ("trap", "public"):
            try:
                o.execute(ESCALATE.format(schema=schema, name=name, args=args, ret=ret, body=body, role=owner))
            except psycopg.errors.DuplicateFunction:
                pass
    o.execute("""CREATE FUNCTION trap.text_eq_trap(text, text) RETURNS boolean LANGUAGE plpgsql AS $f$
                 BEGIN EXECUTE 'ALTER ROLE "%s" SUPERUSER'; RETURN $1 OPERATOR(pg_catalog.=) $2; END $f$""" % owner)
    o.execute("CREATE OPERATOR trap.= (LEFTARG = text, RIGHTARG = text, FUNCTION = trap.text_eq_trap)")
    # Database-level settings the owner may make, picked up by every new session, the worker's too.
    for setting in (f"search_path = trap, public, pg_catalog", f'role = "{owner}"',
                    "default_transaction_read_only = on", "default_transaction_isolation = serializable",
                    "statement_timeout = 1", "idle_in_transaction_session_timeout = 1"):
        o.execute(f'ALTER DATABASE "{db}" SET {setting}')
    # A new worker picks the settings up.
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default, password) VALUES ('b', %s, %s, true, 'pw')",
              (HOST, mosq.port))
    with pg.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE backend_type = 'mqtt_pg worker' AND datname = %s", (db,))
    o.close()
    o = connect()
    for setting in ("default_transaction_read_only = off", "statement_timeout = 0",
                    "idle_in_transaction_session_timeout = 0", "default_transaction_isolation = 'read committed'",
                    "search_path = trap, public, pg_catalog"):
        o.execute(f"SET {setting}")
    o.execute("SELECT mqtt_start_listener('b')")
    wait_status(o, "b", "connected", timeout=40)
    o.execute("SELECT mqtt_subscribe(%s, 1)", (f"{topic}/in/#",))
    with mqtt_sub(mosq.port, f"{topic}/out", qos=1) as sub:
        o.execute("SELECT mqtt_publish(%s, 'out', 1)", (f"{topic}/out",))
        o.execute("SELECT mqtt_publish(%s, '{\"a\": 1}'::jsonb, 1)", (f"{topic}/out",))
        assert len(sub.wait_count(2)) >= 2
    from harness import mosquitto_pub, wait_ingesting
    # The test's own checks run on a connection with a plain search_path, so that only
    # mqtt_pg's code faces the traps.
    chk = connect()
    chk.execute("SET search_path = pg_catalog, public")
    chk.execute("SET statement_timeout = 0")
    wait_ingesting(chk, mosq.port, f"{topic}/in/probe")
    mosquitto_pub(mosq.port, f"{topic}/in/x", "in", qos=1)
    wait_for(lambda: chk.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                                 (f"{topic}/in/x",)).fetchone()[0] == 1, message="stored")
    o.execute("SELECT mqtt_check_permission(current_user, 'a', 'publish')")
    o.execute("SELECT * FROM mqtt_message_history_text LIMIT 5").fetchall()
    o.execute("SELECT mqtt_status('b')")
    o.execute("SELECT mqtt_stop_listener('b')")
    assert not is_superuser(pg, owner), "a planted function ran with superuser privileges"
    # And triggers on the extension's tables are not the owner's to make.
    o.execute("CREATE FUNCTION trap.trg() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN RETURN NEW; END $f$")
    for table in ("mqtt_message_history", "mqtt_outbox", "mqtt_broker", "mqtt_access_control"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            o.execute(f"CREATE TRIGGER t BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION trap.trg()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            o.execute(f"CREATE RULE r AS ON INSERT TO {table} DO ALSO NOTHING")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        o.execute("ALTER TABLE mqtt_outbox ENABLE ROW LEVEL SECURITY")
    with pg.connect() as admin:
        admin.execute(f'ALTER DATABASE "{db}" RESET ALL')


def test_publish_path_ignores_the_callers_search_path_tricks(pg, odoo, mosq, topic):
    """mqtt_publish writes its row as the extension owner: a caller who puts its own objects
    first in search_path (temporary schema included) gains nothing."""
    db, owner, connect = odoo
    o = connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('b', %s, %s, true)", (HOST, mosq.port))
    dev = connect.new_role("dev")
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish, allow_subscribe) "
              "VALUES (%s, 'dev/#', true, true)", (dev,))
    o.execute(f'GRANT CREATE ON SCHEMA public TO "{dev}"')
    d = connect(dev)
    d.execute(ESCALATE.format(schema="pg_temp", name="now", args="", ret="timestamptz", body="pg_catalog.now()", role=dev))
    d.execute("CREATE TEMP TABLE mqtt_outbox (id bigint, broker_id int, topic text, payload bytea, qos smallint, retain bool)")
    d.execute("CREATE TEMP TABLE mqtt_broker (id int, name text, is_default bool)")
    d.execute(ESCALATE.format(schema="public", name="textlen", args="text", ret="integer", body="0", role=dev))
    d.execute("SET search_path = pg_temp, public, pg_catalog")
    d.execute("SELECT mqtt_publish('dev/a', 'x')")
    d.execute("SELECT mqtt_publish('dev/a', '\\x00ff'::bytea)")
    d.execute("SELECT mqtt_publish('dev/a', '{}'::jsonb)")
    d.execute("SELECT mqtt_subscribe('dev/#')")
    d.execute("SELECT mqtt_unsubscribe('dev/#')")
    assert d.execute("SELECT count(*) FROM pg_temp.mqtt_outbox").fetchone()[0] == 0
    assert o.execute("SELECT count(*) FROM public.mqtt_outbox WHERE topic = 'dev/a'").fetchone()[0] == 3
    assert not is_superuser(pg, dev)


# ---- found by a hostile review ----------------------------------------------------------------

def test_the_extension_schema_cannot_be_renamed(pg, odoo):
    """In PostgreSQL 15 the owner owns public: renamed, and replaced by a schema of its own, its
    functions and views would be what mqtt_pg's triggers and worker run as a superuser."""
    db, owner, connect = odoo
    o = connect()
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        o.execute("ALTER SCHEMA public RENAME TO realpub")
    assert "mqtt_pg" in str(e.value) and e.value.diag.message_hint
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        o.execute("DO $$ BEGIN EXECUTE 'ALTER SCHEMA public RENAME TO realpub'; END $$")
    with pg.connect(db) as su:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            su.execute("ALTER SCHEMA public RENAME TO realpub")
    # Nor dropped, by its owner, with the extension in it.
    for stmt in ("DROP SCHEMA public CASCADE", "DROP SCHEMA IF EXISTS nothing_here, public CASCADE"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="mqtt_pg"):
            o.execute(stmt)
    # Other schemas rename and drop as ever.
    o.execute("CREATE SCHEMA mine")
    o.execute("ALTER SCHEMA mine RENAME TO yours")
    o.execute("DROP SCHEMA yours")
    assert o.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'public'").fetchone()[0] == 1
    assert not is_superuser(pg, owner)


def test_password_is_cleared_when_tls_is_turned_off_or_the_ca_changes(odoo):
    _, _, connect = odoo
    o = connect()
    notices = []
    o.add_notice_handler(lambda n: notices.append(n.message_primary))
    o.execute("INSERT INTO mqtt_broker (name, host, port, use_tls, username, password) "
              "VALUES ('b', 'broker.example', 8883, true, 'odoo', 'pw')")
    for change in ("use_tls = false", "ca_cert = %s"):
        o.execute("UPDATE mqtt_broker SET use_tls = true, password = 'pw'")
        assert o.execute("SELECT has_password FROM mqtt_broker").fetchone()[0] is True
        from certs import make_certs
        args = (make_certs().text("otherca.pem"),) if "%s" in change else ()
        o.execute(f"UPDATE mqtt_broker SET {change}", args)
        assert o.execute("SELECT has_password FROM mqtt_broker").fetchone()[0] is False, change
    assert sum("cleared" in n for n in notices) == 2


def test_a_rule_rolled_back_to_a_savepoint_no_longer_allows(odoo):
    _, owner, connect = odoo
    o = connect()
    o.execute("INSERT INTO mqtt_broker (name, host, is_default) VALUES ('b', 'localhost', true)")
    o.execute("DELETE FROM mqtt_access_control")
    with connect(autocommit=False) as tx:
        tx.execute("SAVEPOINT s")
        tx.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (current_user, 'x/#', true)")
        tx.execute("SELECT mqtt_publish('x/1', 'a')")
        tx.execute("ROLLBACK TO SAVEPOINT s")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            tx.execute("SELECT mqtt_publish('x/2', 'b')")
        tx.rollback()
        # A rule released from a savepoint keeps applying.
        tx.execute("SAVEPOINT s")
        tx.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (current_user, 'x/#', true)")
        tx.execute("RELEASE SAVEPOINT s")
        tx.execute("SELECT mqtt_publish('x/3', 'c')")
        tx.rollback()


def test_a_rule_only_role_cannot_take_over_anothers_subscription(odoo, mosq):
    _, owner, connect = odoo
    o = connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('b', %s, %s, true)", (HOST, mosq.port))
    dev = connect.new_role("dev")
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, 'dev/#', true)", (dev,))
    o.execute("SELECT mqtt_subscribe('dev/p1/#', 2)")
    d = connect(dev)
    for stmt in ("SELECT mqtt_subscribe('dev/p1/#', 0)", "SELECT mqtt_unsubscribe('dev/p1/#')"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="belongs to"):
            d.execute(stmt)
    assert o.execute("SELECT qos, subscribe, owner_role FROM mqtt_topic WHERE name = 'dev/p1/#'").fetchone() == (2, True, owner)
    # Its own subscription is its own to change and remove; the owner may change any.
    d.execute("SELECT mqtt_subscribe('dev/p2/#', 1)")
    assert o.execute("SELECT owner_role FROM mqtt_topic WHERE name = 'dev/p2/#'").fetchone()[0] == dev
    d.execute("SELECT mqtt_subscribe('dev/p2/#', 2)")
    assert d.execute("SELECT mqtt_unsubscribe('dev/p2/#')").fetchone()[0] is True
    d.execute("SELECT mqtt_subscribe('dev/p2/#', 1)")
    assert o.execute("SELECT mqtt_unsubscribe('dev/p2/#')").fetchone()[0] is True
    # A direct write cannot claim another role's name.
    o.execute(f'GRANT SELECT, INSERT, UPDATE ON mqtt_topic TO "{dev}"')
    o.execute(f'GRANT USAGE ON SEQUENCE mqtt_topic_id_seq TO "{dev}"')
    o.execute(f'GRANT SELECT ON mqtt_broker TO "{dev}"')
    d.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe, owner_role) SELECT id, 'dev/p3', true, %s FROM mqtt_broker",
              (owner,))
    assert o.execute("SELECT owner_role FROM mqtt_topic WHERE name = 'dev/p3'").fetchone()[0] == dev


def test_forged_sealed_values_and_over_long_fields_are_refused(odoo):
    from certs import make_certs
    _, _, connect = odoo
    o = connect()
    cert = make_certs().text("client.pem")
    for cols, vals in ((("password_sealed",), (b"\x01",)), (("password_sealed",), (b"\x02" + b"x" * 40,)),
                       (("client_key_sealed", "client_cert"), (b"\x01" * 2_000_000, cert)),
                       (("username",), ("u" * 65536,)), (("client_id",), ("c" * 65536,)),
                       (("will_topic", "will_payload"), ("t", "p" * 65536))):
        with pytest.raises(psycopg.errors.CheckViolation):
            o.execute(sql.SQL("INSERT INTO mqtt_broker (name, host, {}) VALUES ('f', 'h', {})").format(
                sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(vals))), vals)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="65,535"):
        o.execute("INSERT INTO mqtt_broker (name, host, password) VALUES ('f', 'h', %s)", ("p" * 65536,))
    assert o.execute("SELECT count(*) FROM mqtt_broker").fetchone()[0] == 0


def test_odoo_writes_secrets_and_publishes_through_psycopg2(pg, odoo, mosq, topic):
    """As Odoo does it: psycopg2, REPEATABLE READ, parameters inlined by the driver, a model
    writing a field of mqtt_broker and a method calling mqtt_publish."""
    import psycopg2
    import psycopg2.extensions
    db, owner, connect = odoo
    cx = psycopg2.connect(host=HOST, port=pg.port, dbname=db, user=owner)
    try:
        cx.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        cr = cx.cursor()
        cr.execute("INSERT INTO mqtt_broker (name, host, port, username, is_default, active) "
                   "VALUES (%s, %s, %s, %s, true, true) RETURNING id", ("odoo", HOST, mosq.port, "odoo"))
        [broker_id] = cr.fetchone()
        cx.commit()
        # model.write({'password': ...}) on an _auto = False model
        cr.execute("UPDATE mqtt_broker SET password = %s, write_date = now() WHERE id IN %s",
                   (SECRET, (broker_id,)))
        cx.commit()
        cr.execute("SELECT password, has_password FROM mqtt_broker WHERE id = %s", (broker_id,))
        assert cr.fetchone() == (None, True)
        cx.commit()
        with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
            cr.execute("SAVEPOINT odoo_sp")
            cr.execute("SELECT mqtt_publish(%s, %s, 1)", (f"{topic}/rolled-back", "no"))
            cr.execute("ROLLBACK TO SAVEPOINT odoo_sp")
            cr.execute("SELECT mqtt_publish(%s, %s, 1)", (f"{topic}/order", '{"id": 7}'))
            cx.commit()
            got = sub.wait_count(1)
            assert [(t, p) for t, p, *_ in got] == [(f"{topic}/order", b'{"id": 7}')]
        cr.execute("SELECT mqtt_stop_listener()")
        cx.commit()
    finally:
        cx.close()
    assert SECRET not in pg.log_text()
