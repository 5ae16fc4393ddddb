"""Routing received messages (mqtt_topic.handler / target_table / conflict_columns /
notify_channel): real mosquitto, an independent publisher (mosquitto_pub), and the database
checked afterwards.

Every routed message is stored once in mqtt_message_history and routed, in the same
transaction, to each matching subscription: target table, then handler, then NOTIFY. A message
that cannot be routed goes to mqtt_dead_letter with no history row, and the rest of its batch
commits. Routing runs as the subscription's owner_role, never as the worker's superuser, and
never as any superuser at all: a subscription that would route as a superuser is refused when it
is written (42501), and one whose owner_role has become a superuser since is not run (its
messages are dead-lettered). So the tests configure routing as a non-superuser role of their own
(`router`: it owns the test's schema `ns` and what is in it, and has a subscribe rule for '#'),
and check the results as the superuser test connection.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from contextlib import contextmanager, nullcontext
from decimal import Decimal
from types import SimpleNamespace

import psycopg
import pytest
from psycopg import sql

from conftest import TEST_DB
from harness import (
    HOST,
    history_rows,
    mosquitto_pub,
    serve_broker,
    table_counts,
    unique,
    wait_for,
    wait_status,
)

MSG_TYPE = "public.mqtt_message_history"


# --------------------------------------------------------------------------------------------
# helpers


@contextmanager
def as_role(conn, role: str):
    """SET ROLE `role` on conn (an autocommit superuser connection) for the statements inside,
    RESET ROLE after, even if one of them failed."""
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        yield conn
    finally:
        conn.execute("RESET ROLE")


def subscribe(conn, filt, broker=None, *, role=None, qos=1, handler=None, target=None, conflict=None,
              notify=None):
    """mqtt_subscribe with the routing arguments by name, as `role` (SET ROLE, then RESET ROLE)
    if given, else as conn's own user; returns the mqtt_topic id."""
    with as_role(conn, role) if role else nullcontext():
        return conn.execute(
            "SELECT mqtt_subscribe(%s, %s, %s, handler => %s::regprocedure, target_table => %s::regclass, "
            "conflict_columns => %s::text[], notify_channel => %s)",
            (filt, qos, broker, handler, target, conflict, notify)).fetchone()[0]


def owner_role(conn, topic_id: int) -> str:
    return conn.execute("SELECT owner_role FROM mqtt_topic WHERE id = %s", (topic_id,)).fetchone()[0]


def grant_topic_writes(conn, role: str) -> None:
    """What a role needs to write mqtt_topic rows directly (as an Odoo model would)."""
    conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE ON mqtt_topic TO {}").format(sql.Identifier(role)))
    conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE mqtt_topic_id_seq TO {}").format(sql.Identifier(role)))


def set_superuser(conn, role: str, on: bool) -> None:
    conn.execute(sql.SQL("ALTER ROLE {} " + ("SUPERUSER" if on else "NOSUPERUSER")).format(sql.Identifier(role)))


def dead_letters(conn, broker_id: int) -> list[dict]:
    cur = conn.execute(
        "SELECT id, topic, payload, qos, retain, direction, error FROM mqtt_dead_letter "
        "WHERE broker_id = %s ORDER BY id", (broker_id,))
    cols = [c.name for c in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    for r in rows:
        r["payload"] = bytes(r["payload"])
    return rows


def wait_dead(conn, broker_id: int, n: int, timeout: float = 20) -> list[dict]:
    return wait_for(lambda: (lambda d: d if len(d) >= n else False)(dead_letters(conn, broker_id)),
                    timeout=timeout, message=f"{n} dead letter(s) of broker {broker_id}")


def wait_rows(conn, query: str, params=(), n: int = 1, timeout: float = 20) -> list[tuple]:
    return wait_for(lambda: (lambda r: r if len(r) >= n else False)(conn.execute(query, params).fetchall()),
                    timeout=timeout, message=f"{n} row(s) of: {query}")


def history_for_prefix(conn, prefix: str) -> list[dict]:
    cur = conn.execute(
        "SELECT id, topic, payload, xmin::text AS xmin, \"timestamp\" FROM mqtt_message_history "
        "WHERE direction = 'receive' AND topic LIKE %s ORDER BY id", (prefix + "/%",))
    cols = [c.name for c in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    for r in rows:
        r["payload"] = bytes(r["payload"])
    return rows


def names_subscription(error: str, name: str, topic_id: int) -> bool:
    """The error names the subscription: its filter (what a DBA wrote), or its mqtt_topic id."""
    return name in error or re.search(rf"\bsubscription\b[^0-9]*\b{topic_id}\b", error) is not None


def lines(*payloads: str) -> str:
    return "\n".join(payloads) + "\n"


def unsubscribed(mosq, client_id: str, topic_filter: str) -> bool:
    """mosquitto's unsubscribe log line: '<client id> <filter>'."""
    return any(line.endswith(f" {client_id} {topic_filter}") for line in mosq.log_text().splitlines())


@pytest.fixture
def routers(pg):
    """Make the non-superuser roles that configure routing: routers(c) creates a LOGIN
    NOSUPERUSER role with a subscribe rule for '#' in c's database and returns its name. After
    the test: NOSUPERUSER again (should a test have left it a superuser), its rules, grants and
    objects removed in every database that is still there, and the role dropped. (Request this
    fixture before scratch_db, so that the databases are dropped first.)"""
    made: list[tuple[str, str]] = []

    def make(c: psycopg.Connection, prefix: str = "rrouter") -> str:
        role = unique(prefix)
        with pg.connect() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(role)))
        made.append((role, c.info.dbname))
        c.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, '#', true)",
                  (role,))
        return role

    yield make
    with pg.connect() as admin:
        for role, db in reversed(made):
            admin.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(role)))
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                with pg.connect(db) as c:
                    c.execute("DELETE FROM mqtt_topic WHERE owner_role = %s", (role,))
                    c.execute("DELETE FROM mqtt_access_control WHERE role_name = %s", (role,))
                    c.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture
def router(conn, routers) -> str:
    """The role this test configures routing as (in the test database)."""
    return routers(conn)


@pytest.fixture
def ns(conn, broker, router):
    """A schema of this test's own for tables and handlers, owned by `router` (create what
    routing uses in it under `as_role(conn, router)`). After the test, the broker's
    subscriptions and dead letters are removed first, then the schema."""
    name = unique("rt")
    conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(name), sql.Identifier(router)))
    yield name
    conn.execute("DELETE FROM mqtt_topic WHERE broker_id = %s", (broker.id,))
    conn.execute("DELETE FROM mqtt_dead_letter WHERE broker_id = %s", (broker.id,))
    conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def record_history_tx(conn, ns: str, prefix: str) -> str:
    """An AFTER INSERT trigger on mqtt_message_history recording (id, txid_current()) of the rows
    under `prefix` into {ns}.hist_tx: the top-level transaction of each history row. (xmin would
    not do: routing may run in a subtransaction, whose rows have the subtransaction's xid.)
    Returns the trigger name; dropped with the schema (it depends on the function). Made by the
    superuser: it is the test's instrument on the extension's own table, not routing."""
    conn.execute(f"CREATE TABLE {ns}.hist_tx (hid bigint, tx bigint)")
    conn.execute(f"""CREATE FUNCTION {ns}.hist_tx() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN INSERT INTO {ns}.hist_tx VALUES (NEW.id, txid_current()); RETURN NULL; END $f$""")
    trg = f"{ns}_tx"
    conn.execute(sql.SQL("CREATE TRIGGER {} AFTER INSERT ON mqtt_message_history FOR EACH ROW "
                         "WHEN (NEW.topic LIKE {}) EXECUTE FUNCTION {}.hist_tx()").format(
        sql.Identifier(trg), sql.Literal(prefix + "/%"), sql.Identifier(ns)))
    return trg


def log_handler(conn, ns: str, role: str, name: str = "on_msg", boom: str | None = None) -> str:
    """As `role`: a table {ns}.log and a handler writing (msg.id, msg.topic, payload text) into
    it; with `boom`, it raises after its insert for that payload. Returns the handler's signature."""
    raise_stmt = (f"IF convert_from(m.payload, 'UTF8') = '{boom}' THEN "
                  f"RAISE EXCEPTION 'handler refused %', convert_from(m.payload, 'UTF8'); END IF;") if boom else ""
    with as_role(conn, role):
        conn.execute(f"CREATE TABLE IF NOT EXISTS {ns}.log (hid bigint, topic text, body text, "
                     f"at_user text DEFAULT current_user, tx bigint DEFAULT txid_current())")
        conn.execute(f"""
            CREATE OR REPLACE FUNCTION {ns}.{name}(m {MSG_TYPE}) RETURNS void LANGUAGE plpgsql AS $f$
            BEGIN
                INSERT INTO {ns}.log (hid, topic, body) VALUES (m.id, m.topic, convert_from(m.payload, 'UTF8'));
                {raise_stmt}
            END $f$""")
    return f"{ns}.{name}({MSG_TYPE})"


# --------------------------------------------------------------------------------------------
# handler


def test_handler_called_once_per_message_with_its_history_row(conn, broker, mosq, ns, router, topic):
    """Each message: one history row, one handler call with that row, in the same transaction
    (the handler's row is written by the history row's top-level transaction), as the role that
    subscribed."""
    h = log_handler(conn, ns, router)
    record_history_tx(conn, ns, topic)
    filt = f"{topic}/h/+"
    tid = subscribe(conn, filt, broker.name, role=router, handler=h)
    assert owner_role(conn, tid) == router
    mosq.wait_subscribed(broker.client_id, filt)
    payloads = [f"m{i:03d} ✓" for i in range(20)]
    mosquitto_pub(mosq.port, f"{topic}/h/x", lines=lines(*payloads), qos=1)
    mosquitto_pub(mosq.port, f"{topic}/h/y", "last", qos=1)
    wait_rows(conn, f"SELECT 1 FROM {ns}.log WHERE body = 'last'")
    hist = history_for_prefix(conn, topic)
    assert [r["payload"].decode() for r in hist] == payloads + ["last"]
    log = conn.execute(f"SELECT hid, topic, body, tx FROM {ns}.log ORDER BY hid").fetchall()
    hist_tx = dict(conn.execute(f"SELECT hid, tx FROM {ns}.hist_tx").fetchall())
    assert [(hid, t, b) for hid, t, b, _ in log] == [(r["id"], r["topic"], r["payload"].decode()) for r in hist], \
        "the handler is called once per message, with that message's history row"
    assert [x for *_, x in log] == [hist_tx[r["id"]] for r in hist], \
        "what the handler writes commits in the transaction of the history row"
    assert {u for (u,) in conn.execute(f"SELECT at_user FROM {ns}.log")} == {router}, "run as owner_role"
    assert dead_letters(conn, broker.id) == []


def test_failing_handler_sets_aside_only_its_message_and_requeue_routes_it(pg, conn, broker, mosq, ns, router,
                                                                           topic):
    """A handler raising for one payload: that message (and what the handler wrote for it) is
    rolled back and dead-lettered with an error naming the subscription and the cause; the others
    of the same burst are stored and handled; the worker and its connection carry on. Once the
    handler is fixed, requeueing stores and routes it."""
    h = log_handler(conn, ns, router, boom="boom")
    filt = f"{topic}/h/#"
    tid = subscribe(conn, filt, broker.name, role=router, handler=h)
    mosq.wait_subscribed(broker.client_id, filt)
    workers = pg.worker_pids(TEST_DB)
    connects = mosq.connections_of(broker.client_id)
    t = f"{topic}/h/x"
    mosquitto_pub(mosq.port, t, lines=lines("ok1", "boom", "ok2", "ok3"), qos=1)
    [dead] = wait_dead(conn, broker.id, 1)
    wait_rows(conn, f"SELECT 1 FROM {ns}.log WHERE body = 'ok3'")
    assert [r["payload"] for r in history_rows(conn, t)] == [b"ok1", b"ok2", b"ok3"]
    assert conn.execute(f"SELECT body FROM {ns}.log ORDER BY hid").fetchall() == [("ok1",), ("ok2",), ("ok3",)], \
        "the handler's insert for the failing message is rolled back with it"
    assert (dead["topic"], dead["payload"], dead["qos"], dead["direction"]) == (t, b"boom", 1, "receive")
    assert "handler refused boom" in dead["error"], dead["error"]
    assert names_subscription(dead["error"], filt, tid) or "on_msg" in dead["error"], dead["error"]
    assert pg.worker_pids(TEST_DB) == workers, "the worker must not restart"
    assert mosq.connections_of(broker.client_id) == connects, "the connection must not be dropped"
    assert wait_status(conn, broker.name, "connected")

    # still failing: raises that error, the dead letter stays, nothing stored
    with pytest.raises(psycopg.Error, match="handler refused boom"):
        conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead["id"],))
    assert [d["id"] for d in dead_letters(conn, broker.id)] == [dead["id"]]
    assert len(history_rows(conn, t)) == 3
    # fixed: stored in history and routed (as owner_role, though a superuser requeued it)
    log_handler(conn, ns, router)
    new_id = conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead["id"],)).fetchone()[0]
    row = conn.execute("SELECT topic, payload, direction FROM mqtt_message_history WHERE id = %s",
                       (new_id,)).fetchone()
    assert row == (t, b"boom", "receive"), "the requeue returns the new history row's id"
    assert conn.execute(f"SELECT hid, topic, body, at_user FROM {ns}.log WHERE body = 'boom'").fetchall() == \
        [(new_id, t, "boom", router)]
    assert dead_letters(conn, broker.id) == []


# --------------------------------------------------------------------------------------------
# target table


def test_target_table_rows_types_defaults_levels_topic_received_at(conn, broker, mosq, ns, router, topic):
    with as_role(conn, router):
        conn.execute(f"""CREATE TABLE {ns}.reading (
            id serial PRIMARY KEY, created timestamptz NOT NULL DEFAULT now(), line text, device text,
            n int, price numeric, at timestamptz, ok boolean, extra jsonb, note text DEFAULT 'dflt',
            topic text, received_at timestamptz, tx bigint DEFAULT txid_current())""")
    record_history_tx(conn, ns, topic)
    filt = f"{topic}/plant/{{line}}/temperature"
    subscribe(conn, filt, broker.name, role=router, target=f"{ns}.reading")
    mosq.wait_subscribed(broker.client_id, f"{topic}/plant/+/temperature")
    t1, t2 = f"{topic}/plant/L1/temperature", f"{topic}/plant/L2/temperature"
    before = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    mosquitto_pub(mosq.port, t1, json.dumps({
        "device": "d1", "n": 7, "price": 12.345, "at": "2024-05-01T10:00:00+02:00", "ok": True,
        "extra": {"a": [1, 2], "b": None}, "unknown_key": "ignored"}), qos=1)
    mosquitto_pub(mosq.port, t2, json.dumps([
        {"device": "d2", "n": "2", "ok": "false"},
        {"device": "d3", "line": "spoofed", "topic": "spoofed/topic", "received_at": "2000-01-01T00:00:00Z",
         "note": "given"},
    ]), qos=1)
    rows = wait_rows(conn, f"SELECT device, line, n, price, at, ok, extra, note, topic, received_at, id, created, "
                           f"tx FROM {ns}.reading ORDER BY device", n=3)
    after = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    hist = {r["topic"]: r for r in history_for_prefix(conn, topic)}
    hist_tx = dict(conn.execute(f"SELECT hid, tx FROM {ns}.hist_tx").fetchall())
    assert set(hist) == {t1, t2} and len(history_for_prefix(conn, topic)) == 2, "one history row per message"
    assert len(rows) == 3, "an object gives one row, an array of two objects two"
    d1, d2, d3 = rows
    # d1: every type converted, the unknown key ignored, the missing ones at their DEFAULT
    assert d1[:9] == ("d1", "L1", 7, Decimal("12.345"), dt.datetime(2024, 5, 1, 8, 0, tzinfo=dt.timezone.utc),
                      True, {"a": [1, 2], "b": None}, "dflt", t1)
    assert d2[:9] == ("d2", "L2", 2, None, None, False, None, "dflt", t2)
    assert d3[:9] == ("d3", "L2", None, None, None, None, None, "given", t2), \
        "the {line} level and the real topic override payload keys of the same name"
    for r in rows:
        device, received_at, rid, created, tx = r[0], r[9], r[10], r[11], r[12]
        h = hist[r[8]]
        assert rid is not None and created is not None, f"{device}: missing keys take the column DEFAULT"
        assert before <= received_at <= after, f"{device}: received_at is the receive time, not the payload's"
        assert abs((received_at - h["timestamp"]).total_seconds()) < 1, (received_at, h["timestamp"])
        assert tx == hist_tx[h["id"]], f"{device}: the target row is written with its history row"
    assert len({r[10] for r in rows}) == 3
    assert dead_letters(conn, broker.id) == []


def test_level_filter_is_subscribed_with_plus_and_unsubscribed_by_name(conn, broker, mosq, ns, router, topic):
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.t (site text, line text, v int)")
    filt = f"{topic}/{{site}}/x/{{line}}/#"
    tid = subscribe(conn, filt, broker.name, role=router, target=f"{ns}.t")
    assert conn.execute("SELECT name, subscribe FROM mqtt_topic WHERE id = %s", (tid,)).fetchone() == (filt, True)
    mosq.wait_subscribed(broker.client_id, f"{topic}/+/x/+/#")
    assert not mosq.subscribed(broker.client_id, filt), "the {name} form never reaches the broker"
    mosquitto_pub(mosq.port, f"{topic}/s1/x/l9/deep/er", '{"v": 5, "site": "no"}', qos=1)
    assert wait_rows(conn, f"SELECT site, line, v FROM {ns}.t") == [("s1", "l9", 5)]
    # subscribing again by the same name updates the row, not a second subscription
    assert subscribe(conn, filt, broker.name, role=router, target=f"{ns}.t") == tid
    with as_role(conn, router):
        assert conn.execute("SELECT mqtt_unsubscribe(%s, %s)", (filt, broker.name)).fetchone()[0] is True
    assert conn.execute("SELECT subscribe FROM mqtt_topic WHERE id = %s", (tid,)).fetchone()[0] is False
    wait_for(lambda: unsubscribed(mosq, broker.client_id, f"{topic}/+/x/+/#"),
             message="mosquitto log: the broker filter unsubscribed")


def test_upsert_keeps_the_latest_reading_per_device_from_one_backlog_batch(conn, broker, mosq, ns, router, topic):
    """QoS 1 backlog published while the listener is stopped arrives at once: several messages
    for one device in the same batch, the last one wins; one row per device."""
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.latest (device text PRIMARY KEY, value int, note text, "
                     f"topic text, received_at timestamptz)")
    filt = f"{topic}/dev/+"
    subscribe(conn, filt, broker.name, role=router, target=f"{ns}.latest", conflict=["device"])
    mosq.wait_subscribed(broker.client_id, filt)
    conn.execute("SELECT mqtt_stop_listener(%s)", (broker.name,))
    wait_status(conn, broker.name, "stopped")
    backlog = [json.dumps({"device": d, "value": i * 10 + k})
               for i in range(1, 6) for k, d in enumerate(("d1", "d2", "d3"), start=1)]
    mosquitto_pub(mosq.port, f"{topic}/dev/all", lines=lines(*backlog), qos=1)
    conn.execute("SELECT mqtt_start_listener(%s)", (broker.name,))
    wait_for(lambda: len(history_for_prefix(conn, topic)) >= 15, message="the backlog stored")
    hist = history_for_prefix(conn, topic)
    assert [json.loads(r["payload"]) for r in hist] == [json.loads(p) for p in backlog]
    assert dead_letters(conn, broker.id) == [], "several messages for one key in one batch must not fail"
    assert conn.execute(f"SELECT device, value, topic FROM {ns}.latest ORDER BY device").fetchall() == [
        ("d1", 51, f"{topic}/dev/all"), ("d2", 52, f"{topic}/dev/all"), ("d3", 53, f"{topic}/dev/all")]
    by_tx: dict[str, list[str]] = {}
    for r in hist:
        by_tx.setdefault(r["xmin"], []).append(json.loads(r["payload"])["device"])
    assert any(len(devs) != len(set(devs)) for devs in by_tx.values()), \
        f"the backlog did not arrive as one batch, so the case was not exercised: {by_tx}"
    # Later: a message with only some columns updates those, keeping the others.
    mosquitto_pub(mosq.port, f"{topic}/dev/d1", '{"device": "d1", "note": "serviced"}', qos=1)
    assert wait_rows(conn, f"SELECT device, value, note, topic FROM {ns}.latest WHERE note IS NOT NULL") == [
        ("d1", 51, "serviced", f"{topic}/dev/d1")]
    assert conn.execute(f"SELECT count(*) FROM {ns}.latest").fetchone()[0] == 3


# --------------------------------------------------------------------------------------------
# notify, order of the three, several subscriptions


def test_target_then_handler_then_notify_after_commit(conn, connect, broker, mosq, ns, router, topic):
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.t (k text, topic text)")
        conn.execute(f"CREATE TABLE {ns}.seen (hid bigint, target_row_there boolean)")
        conn.execute(f"""CREATE FUNCTION {ns}.h(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS $f$
            INSERT INTO {ns}.seen SELECT m.id, EXISTS (SELECT 1 FROM {ns}.t WHERE topic = m.topic) $f$""")
    chan = unique("chan")
    listener = connect()
    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(chan)))
    filt = f"{topic}/n/+"
    subscribe(conn, filt, broker.name, role=router, target=f"{ns}.t", handler=f"{ns}.h({MSG_TYPE})", notify=chan)
    mosq.wait_subscribed(broker.client_id, filt)
    # a message that cannot be routed notifies nothing; the good ones after it each once
    mosquitto_pub(mosq.port, f"{topic}/n/0", "not json", qos=1)
    mosquitto_pub(mosq.port, f"{topic}/n/1", '{"k": "one"}', qos=1)
    mosquitto_pub(mosq.port, f"{topic}/n/2", '{"k": "two"}', qos=1)
    got = []
    other = connect()
    for n in listener.notifies(timeout=20, stop_after=2):
        assert n.channel == chan
        got.append(json.loads(n.payload))
        # seen after the commit: the history row and what routing wrote are visible elsewhere
        assert other.execute("SELECT topic FROM mqtt_message_history WHERE id = %s",
                             (got[-1]["id"],)).fetchone() == (got[-1]["topic"],)
        assert other.execute(f"SELECT count(*) FROM {ns}.t WHERE topic = %s", (got[-1]["topic"],)).fetchone()[0] == 1
    assert len(got) == 2, f"notifications: {got}"
    hist = history_for_prefix(conn, topic)
    assert got == [{"id": r["id"], "topic": r["topic"]} for r in hist]
    assert [r["topic"] for r in hist] == [f"{topic}/n/1", f"{topic}/n/2"]
    assert set(got[0]) == {"id", "topic"}
    assert conn.execute(f"SELECT hid, target_row_there FROM {ns}.seen ORDER BY hid").fetchall() == \
        [(r["id"], True) for r in hist], "the handler runs after the target insert"
    assert len(dead_letters(conn, broker.id)) == 1


def test_several_matching_subscriptions_store_once_and_route_to_each(conn, broker, mosq, ns, router, topic):
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.t (k text, topic text)")
    h = log_handler(conn, ns, router)
    subscribe(conn, f"{topic}/a/+", broker.name, role=router, target=f"{ns}.t")
    subscribe(conn, f"{topic}/a/#", broker.name, role=router, handler=h)
    mosq.wait_subscribed(broker.client_id, f"{topic}/a/+")
    mosq.wait_subscribed(broker.client_id, f"{topic}/a/#")
    mosquitto_pub(mosq.port, f"{topic}/a/b", '{"k": "both"}', qos=1)
    # only a/# matches: the handler alone, and a payload that is not JSON is fine for it
    mosquitto_pub(mosq.port, f"{topic}/a/b/c", "plain text", qos=1)
    wait_rows(conn, f"SELECT 1 FROM {ns}.log", n=2)
    hist = history_for_prefix(conn, topic)
    assert [(r["topic"], r["payload"]) for r in hist] == [(f"{topic}/a/b", b'{"k": "both"}'),
                                                          (f"{topic}/a/b/c", b"plain text")], "stored once each"
    assert conn.execute(f"SELECT k, topic FROM {ns}.t").fetchall() == [("both", f"{topic}/a/b")]
    assert conn.execute(f"SELECT hid, topic, body FROM {ns}.log ORDER BY hid").fetchall() == \
        [(r["id"], r["topic"], r["payload"].decode()) for r in hist]
    assert dead_letters(conn, broker.id) == []


# --------------------------------------------------------------------------------------------
# set aside


def test_unroutable_messages_are_set_aside_and_requeued(pg, conn, broker, mosq, ns, router, topic):
    with as_role(conn, router):
        conn.execute(f"""CREATE TABLE {ns}.m (id serial PRIMARY KEY, device text NOT NULL, n int,
                         value int CONSTRAINT value_nonneg CHECK (value >= 0), topic text)""")
    filt, t = f"{topic}/s/+", f"{topic}/s/x"
    tid = subscribe(conn, filt, broker.name, role=router, target=f"{ns}.m")
    mosq.wait_subscribed(broker.client_id, filt)
    workers = pg.worker_pids(TEST_DB)
    connects = mosq.connections_of(broker.client_id)
    good = ['{"device": "a", "n": 1, "value": 1}',
            '{"device": "e", "n": 8, "value": 2}',
            '[{"device": "f", "n": 9}, {"device": "g", "n": 10}]']
    bad = {  # payload -> what the error must say (lower case)
        "not json {": ["json"],
        "42": ["object"],
        '[{"device": "b", "n": 2, "value": 1}, 5]': ["object"],
        '{"device": "c", "n": "abc", "value": 1}': ["abc", "integer"],
        '{"n": 6, "value": 1}': ["null value", "device"],
        '{"device": "d", "n": 7, "value": -1}': ["value_nonneg"],
    }
    burst = [good[0], *bad, good[1], good[2]]
    mosquitto_pub(mosq.port, t, lines=lines(*burst), qos=1)
    dead = wait_dead(conn, broker.id, len(bad))
    wait_for(lambda: len(history_rows(conn, t)) >= 3, message="the good messages stored")
    assert [r["payload"].decode() for r in history_rows(conn, t)] == good, "no history row for a bad one"
    assert conn.execute(f"SELECT device FROM {ns}.m ORDER BY id").fetchall() == [("a",), ("e",), ("f",), ("g",)]
    assert [d["payload"].decode() for d in dead] == list(bad)
    for d in dead:
        err = d["error"]
        assert (d["direction"], d["qos"], d["topic"]) == ("receive", 1, t)
        assert names_subscription(err, filt, tid), f"error does not name the subscription: {err!r}"
        for word in bad[d["payload"].decode()]:
            assert word in err.lower(), f"{d['payload']!r}: {word!r} not in {err!r}"
    assert pg.worker_pids(TEST_DB) == workers, "the worker must not restart"
    assert mosq.connections_of(broker.client_id) == connects, "the connection must not be dropped"
    assert wait_status(conn, broker.name, "connected")
    by_payload = {d["payload"].decode(): d for d in dead}

    # the CHECK dropped (by the table's owner): requeueing that one stores it in history and routes it
    with as_role(conn, router):
        conn.execute(f"ALTER TABLE {ns}.m DROP CONSTRAINT value_nonneg")
    check_dl = by_payload['{"device": "d", "n": 7, "value": -1}']
    new_id = conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (check_dl["id"],)).fetchone()[0]
    assert conn.execute("SELECT topic, payload FROM mqtt_message_history WHERE id = %s", (new_id,)).fetchone() == \
        (t, check_dl["payload"])
    assert conn.execute(f"SELECT n, value FROM {ns}.m WHERE device = 'd'").fetchall() == [(7, -1)]
    # still failing: raises that error, the dead letter stays, nothing stored or routed
    abc = by_payload['{"device": "c", "n": "abc", "value": 1}']
    n_hist = len(history_rows(conn, t))
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (abc["id"],))
    assert e.value.sqlstate == "22P02" and "abc" in str(e.value), (e.value.sqlstate, str(e.value))
    assert abc["id"] in {d["id"] for d in dead_letters(conn, broker.id)}
    assert len(history_rows(conn, t)) == n_hist
    assert conn.execute(f"SELECT count(*) FROM {ns}.m WHERE device = 'c'").fetchone()[0] == 0
    # the plural form: the NOT NULL one now goes through, the rest stay with their error updated
    with as_role(conn, router):
        conn.execute(f"ALTER TABLE {ns}.m ALTER COLUMN device DROP NOT NULL, ALTER COLUMN n TYPE bigint")
    assert conn.execute("SELECT mqtt_requeue_dead_letters(%s)", (broker.name,)).fetchone()[0] == 1
    left = dead_letters(conn, broker.id)
    assert sorted(d["payload"].decode() for d in left) == sorted(
        ["not json {", "42", '[{"device": "b", "n": 2, "value": 1}, 5]', '{"device": "c", "n": "abc", "value": 1}'])
    [abc_now] = [d for d in left if d["payload"] == abc["payload"]]
    assert "bigint" in abc_now["error"], f"the still-failing one's error is updated: {abc_now['error']!r}"
    assert conn.execute(f"SELECT device, n FROM {ns}.m WHERE n = 6").fetchall() == [(None, 6)]
    assert [r["payload"].decode() for r in history_rows(conn, t)] == \
        good + ['{"device": "d", "n": 7, "value": -1}', '{"n": 6, "value": 1}']


# --------------------------------------------------------------------------------------------
# bad configuration


@pytest.fixture
def routing_objects(conn, ns, router):
    """Tables and functions for the configuration checks, made by (and so owned by) `router`,
    which may also write mqtt_topic directly."""
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.t (id serial PRIMARY KEY, k text, v int)")
        conn.execute(f"CREATE TABLE {ns}.t2 (a int, b int, c int, UNIQUE (a, b))")
        conn.execute(f"CREATE FUNCTION {ns}.good(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS 'SELECT'")
        conn.execute(f"CREATE FUNCTION {ns}.f_text(m text) RETURNS void LANGUAGE sql AS 'SELECT'")
        conn.execute(f"CREATE FUNCTION {ns}.f_int(m {MSG_TYPE}) RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.execute(f"CREATE FUNCTION {ns}.f_none() RETURNS void LANGUAGE sql AS 'SELECT'")
        conn.execute(f"CREATE FUNCTION {ns}.f_two(m {MSG_TYPE}, x int) RETURNS void LANGUAGE sql AS 'SELECT'")
    grant_topic_writes(conn, router)
    return ns


def bad_cases(ns_: str, topic: str) -> list[tuple[str, dict]]:
    """(label, arguments) of configurations that must be refused with 22023."""
    return [
        ("handler(text)", dict(handler=f"{ns_}.f_text(text)")),
        ("handler returns int", dict(handler=f"{ns_}.f_int({MSG_TYPE})")),
        ("handler()", dict(handler=f"{ns_}.f_none()")),
        ("handler(row, int)", dict(handler=f"{ns_}.f_two({MSG_TYPE},integer)")),
        ("unknown conflict column", dict(target=f"{ns_}.t", conflict=["nosuch"])),
        ("conflict column without unique index", dict(target=f"{ns_}.t", conflict=["k"])),
        ("part of a unique index", dict(target=f"{ns_}.t2", conflict=["a"])),
        ("conflict without target", dict(conflict=["id"])),
        ("empty notify channel", dict(notify="")),
        ("64-byte notify channel", dict(notify="x" * 64)),
        ("64 bytes in 32 characters", dict(notify="é" * 32)),
        ("empty level name", dict(filt=f"{topic}/{{}}/x")),
        ("level name with a slash", dict(filt=f"{topic}/{{a/b}}/x")),
        ("unclosed level", dict(filt=f"{topic}/{{x")),
        ("unclosed level, more levels", dict(filt=f"{topic}/{{/x")),
        ("level name not the whole level", dict(filt=f"{topic}/{{x}}y")),
        ("text before a level name", dict(filt=f"{topic}/y{{x}}")),
    ]


CASE_LABELS = [c[0] for c in bad_cases("s", "t")]


def insert_topic(conn, broker_id: int, filt: str, *, handler=None, target=None, conflict=None, notify=None,
                 **columns):
    """A direct INSERT INTO mqtt_topic (subscribe, qos 1), with the routing columns and any
    others (e.g. owner_role); returns the new row's id."""
    cols = {"broker_id": broker_id, "name": filt, "subscribe": True, "qos": 1, "handler": handler,
            "target_table": target, "conflict_columns": conflict, "notify_channel": notify, **columns}
    casts = {"target_table": "::regclass", "conflict_columns": "::text[]"}
    return conn.execute(sql.SQL("INSERT INTO mqtt_topic ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.SQL("%s" + casts.get(k, "")) for k in cols)), list(cols.values())).fetchone()[0]


@pytest.mark.parametrize("label", CASE_LABELS)
def test_mqtt_subscribe_refuses_bad_routing(conn, broker, routing_objects, router, topic, label):
    ns_ = routing_objects
    args = dict(bad_cases(ns_, topic))[label]
    filt = args.pop("filt", f"{topic}/bad")
    before = table_counts(conn)
    with pytest.raises(psycopg.Error) as e:
        subscribe(conn, filt, broker.name, role=router, **args)
    assert e.value.sqlstate == "22023", (label, e.value.sqlstate, str(e.value))
    assert e.value.diag.message_hint, "every error has a hint"
    assert table_counts(conn) == before
    assert conn.execute("SELECT count(*) FROM mqtt_topic WHERE broker_id = %s", (broker.id,)).fetchone()[0] == 0


def insert_cases(ns_: str, topic: str) -> list[tuple[str, dict]]:
    return bad_cases(ns_, topic) + [("unknown handler function", dict(handler=f"{ns_}.nosuch({MSG_TYPE})"))]


def expected_insert_sqlstates(label: str) -> tuple[str, ...]:
    return ("22023", "42883") if label == "unknown handler function" else ("22023",)


@pytest.mark.parametrize("label", CASE_LABELS + ["unknown handler function"])
def test_direct_mqtt_topic_insert_refuses_bad_routing(conn, broker, routing_objects, router, topic, label):
    ns_ = routing_objects
    args = dict(insert_cases(ns_, topic))[label]
    filt = args.pop("filt", f"{topic}/bad")
    before = table_counts(conn)
    with pytest.raises(psycopg.Error) as e, as_role(conn, router):
        insert_topic(conn, broker.id, filt, **args)
    assert e.value.sqlstate in expected_insert_sqlstates(label), (label, e.value.sqlstate, str(e.value))
    assert table_counts(conn) == before


@pytest.mark.parametrize("label", [l for l in CASE_LABELS if "level" not in l])
def test_direct_mqtt_topic_update_refuses_bad_routing(conn, broker, routing_objects, router, topic, label):
    ns_ = routing_objects
    args = dict(bad_cases(ns_, topic))[label]
    filt = f"{topic}/ok"
    # a valid subscription with a target, the one the update tries to break
    tid = subscribe(conn, filt, broker.name, role=router, target=f"{ns_}.t2", conflict=["a", "b"])
    before = conn.execute("SELECT handler, target_table::text, conflict_columns, notify_channel, owner_role "
                          "FROM mqtt_topic WHERE id = %s", (tid,)).fetchone()
    sets = {"handler": args.get("handler"), "notify_channel": args.get("notify")}
    if "conflict" in args:
        sets["conflict_columns"] = args["conflict"]
        sets["target_table"] = args.get("target")
    sets = {k: v for k, v in sets.items() if v is not None or k == "target_table"}
    query = sql.SQL("UPDATE mqtt_topic SET {} WHERE id = %s").format(sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.SQL("%s::regclass" if k == "target_table" else "%s"))
        for k in sets))
    with pytest.raises(psycopg.Error) as e, as_role(conn, router):
        conn.execute(query, (*sets.values(), tid))
    assert e.value.sqlstate == "22023", (label, sets, e.value.sqlstate, str(e.value))
    assert conn.execute("SELECT handler, target_table::text, conflict_columns, notify_channel, owner_role "
                        "FROM mqtt_topic WHERE id = %s", (tid,)).fetchone() == before


def test_valid_routing_configurations_are_stored(conn, broker, routing_objects, router, topic):
    ns_ = routing_objects
    # the handler column is text, not regprocedure (pg_upgrade refuses regprocedure columns)
    assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'mqtt_topic'::regclass AND attname = 'handler'").fetchone()[0] == "text"
    t1 = subscribe(conn, f"{topic}/1", broker.name, role=router, handler=f"{ns_}.good({MSG_TYPE})", notify="c" * 63)
    t2 = subscribe(conn, f"{topic}/2", broker.name, role=router, target=f"{ns_}.t", conflict=["id"])
    # a unique index's columns in another order: ON CONFLICT (b, a) works, so should this
    t3 = subscribe(conn, f"{topic}/{{x}}/3", broker.name, role=router, target=f"{ns_}.t2", conflict=["b", "a"])
    # a direct write, in another spelling to_regprocedure takes: stored normalized, the same text
    with as_role(conn, router):
        t4 = conn.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe, handler) VALUES (%s, %s, true, %s) "
                          "RETURNING id", (broker.id, f"{topic}/4", f'"{ns_}".GOOD(public.mqtt_message_history)')
                          ).fetchone()[0]
    rows = dict(conn.execute("SELECT name, handler FROM mqtt_topic WHERE broker_id = %s", (broker.id,)).fetchall())
    stored = rows[f"{topic}/1"]
    assert stored == rows[f"{topic}/4"], rows
    assert conn.execute("SELECT to_regprocedure(%s) = %s::regprocedure",
                        (stored, f"{ns_}.good({MSG_TYPE})")).fetchone()[0] is True
    with conn.transaction():
        conn.execute("SET LOCAL search_path = pg_catalog")
        assert conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (stored,)).fetchone()[0], \
            f"{stored!r} must name the function whatever the search_path"
    assert conn.execute("SELECT notify_channel, owner_role FROM mqtt_topic WHERE id = %s", (t1,)).fetchone() == \
        ("c" * 63, router)
    assert [owner_role(conn, t) for t in (t2, t3, t4)] == [router] * 3
    assert conn.execute("SELECT target_table, conflict_columns FROM mqtt_topic WHERE id = %s", (t2,)).fetchone() == \
        (f"{ns_}.t", ["id"])
    assert conn.execute("SELECT name FROM mqtt_topic WHERE id = %s", (t3,)).fetchone()[0] == f"{topic}/{{x}}/3"


# --------------------------------------------------------------------------------------------
# routing never runs as a superuser


ROUTES = {  # what makes a subscription route, by kind
    "handler": lambda ns_: dict(handler=f"{ns_}.good({MSG_TYPE})"),
    "target": lambda ns_: dict(target=f"{ns_}.t"),
    "notify": lambda ns_: dict(notify="su_chan"),
}
TOPIC_ROW = "SELECT broker_id, name, subscribe, handler, target_table::text, conflict_columns, notify_channel, " \
            "owner_role FROM mqtt_topic WHERE id = %s"


def refused_as_superuser(e: pytest.ExceptionInfo, what: str) -> None:
    assert e.value.sqlstate == "42501", (what, e.value.sqlstate, str(e.value))
    hint = e.value.diag.message_hint or ""
    assert "SET ROLE" in hint and "owner_role" in hint, (what, hint)


@pytest.mark.parametrize("route", list(ROUTES))
def test_superuser_cannot_make_a_subscription_that_routes_as_a_superuser(conn, broker, routing_objects, router,
                                                                         topic, route):
    """A subscription that routes (handler, target table or notify channel) and whose owner_role
    would be a superuser is refused with 42501 and a hint, whichever way it is written, and
    nothing changes: not by mqtt_subscribe as the superuser, not by a superuser's direct INSERT
    (owner_role left to default, or claimed as a superuser), not by a superuser's UPDATE adding
    the routing to its own plain subscription, not by re-subscribing a role's subscription."""
    ns_ = routing_objects
    args = ROUTES[route](ns_)
    # a plain subscription stays the superuser's to make
    plain = subscribe(conn, f"{topic}/plain", broker.name)
    assert owner_role(conn, plain) == "postgres"
    # a role's routed subscription of the same filter the superuser will try to take over
    mine = subscribe(conn, f"{topic}/mine", broker.name, role=router, **args)
    rows_before = {t: conn.execute(TOPIC_ROW, (t,)).fetchone() for t in (plain, mine)}
    before = table_counts(conn)

    with pytest.raises(psycopg.Error) as e:
        subscribe(conn, f"{topic}/su", broker.name, **args)
    refused_as_superuser(e, "mqtt_subscribe")
    with pytest.raises(psycopg.Error) as e:
        subscribe(conn, f"{topic}/mine", broker.name, **args)
    refused_as_superuser(e, "mqtt_subscribe of the role's filter")
    for claimed in ({}, {"owner_role": "postgres"}):
        with pytest.raises(psycopg.Error) as e:
            insert_topic(conn, broker.id, f"{topic}/su", **args, **claimed)
        refused_as_superuser(e, f"INSERT {claimed}")
    sets = {"handler": args.get("handler"), "target_table": args.get("target"), "notify_channel": args.get("notify")}
    sets = {k: v for k, v in sets.items() if v is not None}
    query = sql.SQL("UPDATE mqtt_topic SET {} WHERE id = %s").format(sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.SQL("%s::regclass" if k == "target_table" else "%s"))
        for k in sets))
    with pytest.raises(psycopg.Error) as e:
        conn.execute(query, (*sets.values(), plain))
    refused_as_superuser(e, "UPDATE of the superuser's plain subscription")

    assert table_counts(conn) == before
    assert {t: conn.execute(TOPIC_ROW, (t,)).fetchone() for t in (plain, mine)} == rows_before
    assert conn.execute("SELECT count(*) FROM mqtt_topic WHERE name = %s", (f"{topic}/su",)).fetchone()[0] == 0


def test_superuser_bad_routing_gets_its_own_error_before_the_superuser_one(conn, broker, routing_objects, topic):
    """The superuser check comes after all the others: a superuser's bad configuration is still
    refused for what is wrong with it (22023, or 42883 for an unknown function), not 42501."""
    ns_ = routing_objects
    before = table_counts(conn)
    wrong = []
    for label, args in insert_cases(ns_, topic):
        args = dict(args)
        filt = args.pop("filt", f"{topic}/bad")
        if label != "unknown handler function":  # mqtt_subscribe's handler is a regprocedure
            with pytest.raises(psycopg.Error) as e:
                subscribe(conn, filt, broker.name, **args)
            if e.value.sqlstate != "22023":
                wrong.append(("mqtt_subscribe", label, e.value.sqlstate, str(e.value)))
        with pytest.raises(psycopg.Error) as e:
            insert_topic(conn, broker.id, filt, **args)
        if e.value.sqlstate not in expected_insert_sqlstates(label):
            wrong.append(("INSERT", label, e.value.sqlstate, str(e.value)))
    assert wrong == []
    assert table_counts(conn) == before


def test_superuser_may_write_routing_owned_by_a_non_superuser(conn, broker, mosq, ns, router, topic):
    """A superuser writes a routed subscription directly with owner_role set to a non-superuser
    role (INSERT, or UPDATE of its own plain subscription): stored with that owner_role, and the
    handler and the target table run as that role."""
    h = log_handler(conn, ns, router)
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.t (v int, at_user text DEFAULT current_user)")
    f1, f2 = f"{topic}/suh/+", f"{topic}/sut/+"
    t1 = insert_topic(conn, broker.id, f1, handler=h, owner_role=router)
    t2 = subscribe(conn, f2, broker.name)
    assert owner_role(conn, t2) == "postgres"
    conn.execute("UPDATE mqtt_topic SET target_table = %s::regclass, owner_role = %s WHERE id = %s",
                 (f"{ns}.t", router, t2))
    assert (owner_role(conn, t1), owner_role(conn, t2)) == (router, router)
    assert conn.execute("SELECT to_regprocedure(handler) = %s::regprocedure FROM mqtt_topic WHERE id = %s",
                        (h, t1)).fetchone()[0] is True
    mosq.wait_subscribed(broker.client_id, f1)
    mosq.wait_subscribed(broker.client_id, f2)
    mosquitto_pub(mosq.port, f"{topic}/suh/1", "via handler", qos=1)
    mosquitto_pub(mosq.port, f"{topic}/sut/1", '{"v": 4}', qos=1)
    assert wait_rows(conn, f"SELECT topic, body, at_user FROM {ns}.log") == \
        [(f"{topic}/suh/1", "via handler", router)]
    assert wait_rows(conn, f"SELECT v, at_user FROM {ns}.t") == [(4, router)]
    assert dead_letters(conn, broker.id) == []


def test_route_whose_owner_became_a_superuser_is_not_run(pg, conn, broker, mosq, ns, router, topic):
    """The owner_role of a routed subscription is made SUPERUSER after it was written: its
    messages are dead-lettered with an error saying so, nothing is stored or routed, and a
    requeue refuses too. Made NOSUPERUSER again, the requeue routes it and the stream flows."""
    h = log_handler(conn, ns, router)
    filt, t = f"{topic}/up/+", f"{topic}/up/x"
    tid = subscribe(conn, filt, broker.name, role=router, handler=h)
    mosq.wait_subscribed(broker.client_id, filt)
    mosquitto_pub(mosq.port, t, "before", qos=1)
    assert wait_rows(conn, f"SELECT body, at_user FROM {ns}.log") == [("before", router)]
    workers = pg.worker_pids(TEST_DB)
    set_superuser(conn, router, True)
    try:
        mosquitto_pub(mosq.port, t, "while", qos=1)
        [dead] = wait_dead(conn, broker.id, 1)
        assert (dead["topic"], dead["payload"], dead["direction"]) == (t, b"while", "receive")
        assert "superuser" in dead["error"].lower(), dead["error"]
        assert names_subscription(dead["error"], filt, tid), dead["error"]
        assert [r["payload"] for r in history_rows(conn, t)] == [b"before"], "no history row for it"
        assert conn.execute(f"SELECT body FROM {ns}.log").fetchall() == [("before",)], "the handler did not run"
        with pytest.raises(psycopg.Error, match="(?i)superuser"):
            conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead["id"],))
        assert [d["id"] for d in dead_letters(conn, broker.id)] == [dead["id"]]
        assert [r["payload"] for r in history_rows(conn, t)] == [b"before"]
        assert conn.execute(f"SELECT body FROM {ns}.log").fetchall() == [("before",)]
        assert pg.worker_pids(TEST_DB) == workers, "the worker must not restart"
    finally:
        set_superuser(conn, router, False)
    assert not is_superuser(pg, router)
    new_id = conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead["id"],)).fetchone()[0]
    assert conn.execute(f"SELECT hid, body, at_user FROM {ns}.log WHERE body = 'while'").fetchall() == \
        [(new_id, "while", router)]
    assert dead_letters(conn, broker.id) == []
    mosquitto_pub(mosq.port, t, "after", qos=1)
    assert wait_rows(conn, f"SELECT body, at_user FROM {ns}.log WHERE body = 'after'") == [("after", router)]
    assert wait_status(conn, broker.name, "connected")


# --------------------------------------------------------------------------------------------
# security: routing runs as owner_role


@pytest.fixture
def owned(pg, mosq, topic):
    """A database owned by a non-superuser (the extension made by a superuser, as Odoo has it),
    broker 'b' on the shared mosquitto started by the owner, and a role `dev` with a subscribe
    rule for `<topic>/#` and CREATE on schema public."""
    owner, db = unique("rown"), unique("routedb")
    roles = [owner]
    opened: list[psycopg.Connection] = []
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{owner}"')

    def connect(user: str = "postgres") -> psycopg.Connection:
        c = psycopg.connect(host=HOST, port=pg.port, dbname=db, user=user, autocommit=True)
        opened.append(c)
        return c

    def new_role(prefix: str) -> str:
        r = unique(prefix)
        with pg.connect() as admin:
            admin.execute(f'CREATE ROLE "{r}" LOGIN NOSUPERUSER')
        roles.append(r)
        return r

    try:
        su = connect()
        su.execute("CREATE EXTENSION mqtt_pg")
        o = connect(owner)
        o.execute("INSERT INTO mqtt_broker (name, host, port, is_default, active) VALUES ('b', %s, %s, true, true)",
                  (HOST, mosq.port))
        wait_status(o, "b", "connected")
        dev = new_role("rdev")
        o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, %s, true)",
                  (dev, f"{topic}/#"))
        o.execute(f'GRANT CREATE ON SCHEMA public TO "{dev}"')
        yield SimpleNamespace(
            db=db, owner=owner, dev=dev, su=su, o=o, d=connect(dev), connect=connect, new_role=new_role,
            client_id=o.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0],
            broker_id=o.execute("SELECT id FROM mqtt_broker WHERE name = 'b'").fetchone()[0])
    finally:
        for c in opened:
            c.close()
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for r in reversed(roles):
                admin.execute(f'DROP ROLE IF EXISTS "{r}"')


def is_superuser(pg, role: str) -> bool:
    with pg.connect() as admin:
        return admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def escalate_sql(role: str) -> str:
    # The role is spelled out: if this ran as the worker's superuser, current_user would be that
    # superuser and the statement a no-op.
    return f"EXECUTE format('ALTER ROLE %I SUPERUSER', '{role}');"


@pytest.mark.parametrize("via", ["handler", "target trigger"])
def test_routing_code_cannot_make_its_role_superuser(pg, owned, mosq, topic, via):
    d, dev = owned.d, owned.dev
    filt = f"{topic}/esc/#"
    if via == "handler":
        d.execute("CREATE TABLE public.dev_seen (hid bigint)")
        d.execute(f"""CREATE FUNCTION public.dev_esc(m {MSG_TYPE}) RETURNS void LANGUAGE plpgsql AS $f$
                      BEGIN INSERT INTO public.dev_seen VALUES (m.id); {escalate_sql(dev)} END $f$""")
        tid = subscribe(d, filt, handler=f"public.dev_esc({MSG_TYPE})")
        payload, written = "x", "SELECT count(*) FROM public.dev_seen"
    else:
        d.execute("CREATE TABLE public.dev_t (v int)")
        d.execute(f"""CREATE FUNCTION public.dev_trg() RETURNS trigger LANGUAGE plpgsql AS $f$
                      BEGIN {escalate_sql(dev)} RETURN NEW; END $f$""")
        d.execute("CREATE TRIGGER esc BEFORE INSERT ON public.dev_t FOR EACH ROW EXECUTE FUNCTION public.dev_trg()")
        tid = subscribe(d, filt, target="public.dev_t")
        payload, written = '{"v": 1}', "SELECT count(*) FROM public.dev_t"
    assert owned.su.execute("SELECT owner_role FROM mqtt_topic WHERE id = %s", (tid,)).fetchone()[0] == dev
    mosq.wait_subscribed(owned.client_id, filt)
    mosquitto_pub(mosq.port, f"{topic}/esc/1", payload, qos=1)
    [dead] = wait_dead(owned.su, owned.broker_id, 1)
    assert not is_superuser(pg, dev), f"routing ran the {via} with superuser privileges"
    err = dead["error"].lower()
    assert "must be superuser" in err or "permission denied" in err, dead["error"]
    assert names_subscription(dead["error"], filt, tid), dead["error"]
    assert (dead["direction"], dead["payload"]) == ("receive", payload.encode())
    assert owned.su.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                            (f"{topic}/esc/1",)).fetchone()[0] == 0
    assert owned.su.execute(written).fetchone()[0] == 0
    wait_status(owned.o, "b", "connected")


def test_subscribing_needs_insert_update_and_execute(owned, topic):
    o, d, dev = owned.o, owned.d, owned.dev
    o.execute("CREATE TABLE public.own_t (id int PRIMARY KEY, v int)")
    o.execute(f'GRANT SELECT ON public.own_t TO "{dev}"')
    # dev's own function with EXECUTE taken away from everyone, dev included
    d.execute(f"CREATE FUNCTION public.own_fn(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS 'SELECT'")
    d.execute(sql.SQL("REVOKE EXECUTE ON FUNCTION public.own_fn({}) FROM PUBLIC, {}").format(
        sql.SQL(MSG_TYPE), sql.Identifier(dev)))
    # the owner's function, which dev may execute but which is not dev's: refused, since its
    # owner could replace it with other code that would run as dev
    o.execute(f"CREATE FUNCTION public.owners_fn(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS 'SELECT'")
    count = "SELECT count(*) FROM mqtt_topic"
    before = owned.su.execute(count).fetchone()[0]
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for handler"):
        subscribe(d, f"{topic}/p/1", handler=f"public.owners_fn({MSG_TYPE})")
    assert owned.su.execute(count).fetchone()[0] == before
    for args, grant, by in ((dict(target="public.own_t"), "GRANT INSERT ON public.own_t TO {}", o),
                            (dict(target="public.own_t", conflict=["id"]), "GRANT UPDATE ON public.own_t TO {}", o),
                            (dict(handler=f"public.own_fn({MSG_TYPE})"),
                             f"GRANT EXECUTE ON FUNCTION public.own_fn({MSG_TYPE}) TO {{}}", d)):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            subscribe(d, f"{topic}/p/1", **args)
        assert owned.su.execute(count).fetchone()[0] == before, args
        by.execute(sql.SQL(grant).format(sql.Identifier(dev)))
        # with the privilege (and the access rule it had all along) it works
        subscribe(d, f"{topic}/p/1", **args)
        assert owned.su.execute("SELECT owner_role FROM mqtt_topic WHERE name = %s",
                                (f"{topic}/p/1",)).fetchone()[0] == dev
        d.execute("SELECT mqtt_unsubscribe(%s)", (f"{topic}/p/1",))
        owned.su.execute("DELETE FROM mqtt_topic WHERE name = %s", (f"{topic}/p/1",))


def test_owner_role_is_always_the_writer_below_superuser(owned, topic):
    o, d, dev, owner = owned.o, owned.d, owned.dev, owned.owner
    o.execute(f'GRANT SELECT, INSERT, UPDATE ON mqtt_topic TO "{dev}"')
    o.execute(f'GRANT USAGE ON SEQUENCE mqtt_topic_id_seq TO "{dev}"')
    o.execute(f'GRANT SELECT ON mqtt_broker TO "{dev}"')
    for claimed in (owner, "postgres"):
        name = f"{topic}/own/{claimed}"
        d.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe, owner_role) "
                  "SELECT id, %s, true, %s FROM mqtt_broker", (name, claimed))
        assert o.execute("SELECT owner_role FROM mqtt_topic WHERE name = %s", (name,)).fetchone()[0] == dev
        try:
            d.execute("UPDATE mqtt_topic SET owner_role = %s WHERE name = %s", (claimed, name))
        except psycopg.errors.InsufficientPrivilege:
            pass  # refusing is as good as forcing it back
        assert o.execute("SELECT owner_role FROM mqtt_topic WHERE name = %s", (name,)).fetchone()[0] == dev
    # direct writes are checked like mqtt_subscribe: no EXECUTE on the handler -> 42501
    o.execute(f"CREATE FUNCTION public.own_fn(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS 'SELECT'")
    o.execute(f"REVOKE EXECUTE ON FUNCTION public.own_fn({MSG_TYPE}) FROM PUBLIC")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe, handler) SELECT id, %s, true, %s FROM mqtt_broker",
                  (f"{topic}/own/h", f"public.own_fn({MSG_TYPE})"))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        d.execute("UPDATE mqtt_topic SET handler = %s WHERE name = %s", (f"public.own_fn({MSG_TYPE})", f"{topic}/own/{owner}"))
    assert o.execute("SELECT count(*) FROM mqtt_topic WHERE handler IS NOT NULL").fetchone()[0] == 0


def test_owner_changing_a_superusers_handler_takes_the_subscription_over(pg, owned, mosq, topic):
    """A superuser's subscription (its own plain one, then given the superuser's handler to run
    as `dev`): the database owner changing another column keeps its owner_role; changing the
    handler makes it the owner's, and the new handler runs as the owner, unable to escalate."""
    su, o, owner, dev = owned.su, owned.o, owned.owner, owned.dev
    o.execute("CREATE TABLE public.rec (fn text, who text, escalated boolean)")
    o.execute("GRANT INSERT ON public.rec TO PUBLIC")
    su.execute(f"""CREATE FUNCTION public.su_fn(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS $f$
                   INSERT INTO public.rec VALUES ('su_fn', current_user, false) $f$""")
    o.execute(f"""CREATE FUNCTION public.owner_fn(m {MSG_TYPE}) RETURNS void LANGUAGE plpgsql AS $f$
                  DECLARE ok boolean := true;
                  BEGIN
                      BEGIN {escalate_sql(owner)} EXCEPTION WHEN insufficient_privilege THEN ok := false; END;
                      INSERT INTO public.rec VALUES ('owner_fn', current_user, ok);
                  END $f$""")
    filt = f"{topic}/su/+"
    tid = subscribe(su, filt)
    assert owner_role(su, tid) == "postgres"
    # routing as a superuser is refused; as a role the superuser names, it is the superuser's to set
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        su.execute("UPDATE mqtt_topic SET handler = %s WHERE id = %s", (f"public.su_fn({MSG_TYPE})", tid))
    su.execute("UPDATE mqtt_topic SET handler = %s, owner_role = %s WHERE id = %s",
               (f"public.su_fn({MSG_TYPE})", dev, tid))
    assert owner_role(su, tid) == dev
    mosq.wait_subscribed(owned.client_id, filt)
    mosquitto_pub(mosq.port, f"{topic}/su/1", "a", qos=1)
    assert wait_rows(su, "SELECT fn, who FROM public.rec") == [("su_fn", dev)]
    # changing another column keeps the owner; changing the handler makes it the writer's
    o.execute("UPDATE mqtt_topic SET description = 'touched' WHERE id = %s", (tid,))
    assert owner_role(su, tid) == dev
    o.execute("UPDATE mqtt_topic SET handler = %s WHERE id = %s", (f"public.owner_fn({MSG_TYPE})", tid))
    assert owner_role(su, tid) == owner

    def owner_fn_ran():
        mosquitto_pub(mosq.port, f"{topic}/su/2", "b", qos=1)
        return wait_for(lambda: su.execute("SELECT fn, who, escalated FROM public.rec WHERE fn = 'owner_fn'").fetchall(),
                        timeout=2, message="owner_fn called")
    rows = wait_for(owner_fn_ran, timeout=20, interval=0, message="the new handler in use")
    assert all(r == ("owner_fn", owner, False) for r in rows), rows
    assert not is_superuser(pg, owner), "the owner's handler ran with superuser privileges"
    assert su.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0


def test_owner_moving_another_roles_subscription_to_another_broker_takes_it_over(owned, mosq, topic):
    """Which broker a subscription routes from is routing configuration too: the database owner
    changing broker_id of dev's subscription becomes its owner_role, and its handler then runs
    as the owner, on the new broker."""
    su, o, d, owner, dev = owned.su, owned.o, owned.d, owned.owner, owned.dev
    o.execute("CREATE TABLE public.who_rec (broker_id int, who text)")
    o.execute("GRANT INSERT ON public.who_rec TO PUBLIC")
    d.execute(f"""CREATE FUNCTION public.dev_who(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS $f$
                  INSERT INTO public.who_rec VALUES (m.broker_id, current_user) $f$""")
    filt = f"{topic}/mv/+"
    tid = subscribe(d, filt, handler=f"public.dev_who({MSG_TYPE})")
    assert owner_role(su, tid) == dev
    mosq.wait_subscribed(owned.client_id, filt)
    mosquitto_pub(mosq.port, f"{topic}/mv/1", "x", qos=1)
    assert wait_rows(su, "SELECT broker_id, who FROM public.who_rec") == [(owned.broker_id, dev)]
    b2 = o.execute("INSERT INTO mqtt_broker (name, host, port, active) VALUES ('b2', %s, %s, true) RETURNING id",
                   (HOST, mosq.port)).fetchone()[0]
    wait_status(o, "b2", "connected")
    # The owner would become owner_role, and dev_who is not the owner's: refused, nothing moves.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for handler"):
        o.execute("UPDATE mqtt_topic SET broker_id = %s WHERE id = %s", (b2, tid))
    assert su.execute("SELECT broker_id, owner_role FROM mqtt_topic WHERE id = %s", (tid,)).fetchone() == \
        (owned.broker_id, dev)
    # Once the owner acts as dev (a member of it), the function is one it may route to.
    su.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(dev), sql.Identifier(owner)))
    o.execute("UPDATE mqtt_topic SET broker_id = %s WHERE id = %s", (b2, tid))
    assert su.execute("SELECT broker_id, owner_role FROM mqtt_topic WHERE id = %s", (tid,)).fetchone() == (b2, owner)
    mosq.wait_subscribed(o.execute("SELECT mqtt_status('b2')->>'client_id'").fetchone()[0], filt)
    mosquitto_pub(mosq.port, f"{topic}/mv/2", "y", qos=1)
    rows = wait_rows(su, "SELECT broker_id, who FROM public.who_rec WHERE broker_id = %s", (b2,))
    assert rows == [(b2, owner)], "on the new broker the handler runs as the role that moved it"
    assert sorted(su.execute("SELECT broker_id, who FROM public.who_rec").fetchall()) == \
        sorted([(owned.broker_id, dev), (b2, owner)])
    assert su.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0


def test_routing_runs_as_owner_role_with_its_search_path(owned, mosq, topic):
    d, dev = owned.d, owned.dev
    d.execute("CREATE TABLE public.dev_rec (src text, who text, path text, hid bigint)")
    d.execute("CREATE TABLE public.dev_target (v int)")
    d.execute(f"""CREATE FUNCTION public.dev_rec_fn(m {MSG_TYPE}) RETURNS void LANGUAGE sql AS $f$
                  INSERT INTO dev_rec VALUES ('handler', current_user, current_setting('search_path'), m.id) $f$""")
    d.execute("""CREATE FUNCTION public.dev_rec_trg() RETURNS trigger LANGUAGE plpgsql AS $f$
                 BEGIN INSERT INTO public.dev_rec VALUES ('trigger', current_user, NULL, NULL); RETURN NEW; END $f$""")
    d.execute("CREATE TRIGGER rec AFTER INSERT ON public.dev_target FOR EACH ROW EXECUTE FUNCTION public.dev_rec_trg()")
    filt = f"{topic}/as/+"
    subscribe(d, filt, target="public.dev_target", handler=f"public.dev_rec_fn({MSG_TYPE})")
    mosq.wait_subscribed(owned.client_id, filt)
    mosquitto_pub(mosq.port, f"{topic}/as/1", '{"v": 3}', qos=1)
    rows = wait_rows(owned.su, "SELECT src, who, path, hid FROM public.dev_rec ORDER BY src", n=2)
    hid = owned.su.execute("SELECT id FROM mqtt_message_history WHERE topic = %s", (f"{topic}/as/1",)).fetchone()[0]
    assert rows == [("handler", dev, '"$user", public, pg_temp', hid), ("trigger", dev, None, None)]
    assert owned.su.execute("SELECT v FROM public.dev_target").fetchall() == [(3,)]


# --------------------------------------------------------------------------------------------
# batching


def test_5000_messages_routed_exactly_once_set_based(pg, mosq, routers, scratch_db, topic, capsys):
    """A QoS 1 burst into a target table: every message exactly once in history and target, no
    dead letter, and no insert that failed and was done again (n_tup_ins counts rolled-back
    inserts too). A statement trigger counts the INSERT statements: one per batch."""
    n = 5000
    db = scratch_db("route5k")
    with pg.connect(db) as c:
        serve_broker(c, mosq.port)
        client_id = c.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0]
        role = routers(c)
        c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(role)))
        with as_role(c, role):
            c.execute("CREATE TABLE public.bulk (n int, topic text)")
            c.execute("CREATE TABLE public.stmts (txid bigint)")
            c.execute("""CREATE FUNCTION public.count_stmt() RETURNS trigger LANGUAGE plpgsql AS $f$
                         BEGIN INSERT INTO public.stmts VALUES (txid_current()); RETURN NULL; END $f$""")
            c.execute("CREATE TRIGGER count_stmt AFTER INSERT ON public.bulk FOR EACH STATEMENT "
                      "EXECUTE FUNCTION public.count_stmt()")
        filt = f"{topic}/bulk"
        subscribe(c, filt, role=role, target="public.bulk")
        mosq.wait_subscribed(client_id, filt)
        mosquitto_pub(mosq.port, filt, lines=lines(*(f'{{"n": {i}}}' for i in range(n))), qos=1, timeout=120)
        wait_for(lambda: c.execute("SELECT count(*) FROM public.bulk").fetchone()[0] >= n, timeout=90,
                 interval=0.2, message=f"{n} rows in the target")
        # a message published afterwards is stored after any redelivered duplicate would be
        mosquitto_pub(mosq.port, filt, '{"n": -1}', qos=1)
        wait_for(lambda: c.execute("SELECT 1 FROM public.bulk WHERE n = -1").fetchone(), message="the marker")
        assert c.execute("SELECT count(*), count(DISTINCT n), min(n), max(n) FROM public.bulk WHERE n >= 0").fetchone() \
            == (n, n, 0, n - 1)
        assert c.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s", (filt,)).fetchone()[0] == n + 1
        assert c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0
        batches = c.execute("SELECT count(DISTINCT xmin::text) FROM public.bulk").fetchone()[0]
        statements = c.execute("SELECT count(*) FROM public.stmts").fetchone()[0]
        with capsys.disabled():
            print(f"\n[route 5k] {n + 1} messages routed in {batches} transactions by {statements} INSERT statements")
        assert batches < n, "routed in batches, not a transaction per message"
        assert statements == batches, "one INSERT into the target per batch"

        # pg_stat_user_tables: the worker's counts reach the statistics when it reports them, at
        # the latest when it exits; stop the listener cleanly first (everything is acknowledged),
        # then end the worker if its counts have not shown up by themselves.
        def ins():
            return c.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'public.bulk'::regclass"
                             ).fetchone()[0]
        try:
            wait_for(lambda: ins() >= n + 1, timeout=3, interval=0.2, message="n_tup_ins reported")
        except AssertionError:
            c.execute("SELECT mqtt_stop_listener('b')")
            wait_status(c, "b", "stopped")
            for pid in pg.worker_pids(db):
                c.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_for(lambda: ins() >= n + 1, timeout=20, interval=0.2, message="n_tup_ins after the worker exited")
        assert ins() == n + 1, "rows inserted once each: no failed batch redone message by message"
        c.execute("UPDATE mqtt_broker SET active = false")


# --------------------------------------------------------------------------------------------
# handlers that would hold the stream up


def set_worker_setting(pg, name: str, value: str | None) -> None:
    """ALTER SYSTEM a sighup setting and wait until a new session sees it (the worker, woken by
    the same SIGHUP, reloads before it stores anything more)."""
    with pg.connect(TEST_DB) as c:
        if value is None:
            c.execute(f"ALTER SYSTEM RESET {name}")
        else:
            c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(name), sql.Literal(value)))
        c.execute("SELECT pg_reload_conf()")

    def seen():
        with pg.connect(TEST_DB) as c:
            shown, boot = c.execute("SELECT current_setting(%s), boot_val FROM pg_settings WHERE name = %s",
                                    (name, name)).fetchone()
            reset = c.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]
        return reset == boot if value is None else shown == value
    wait_for(seen, timeout=10, message=f"{name} reloaded")


def test_slow_handler_is_set_aside_by_route_timeout(pg, conn, broker, mosq, ns, router, topic):
    """A handler that would take 60 s for one message: with mqtt_pg.route_timeout = 500ms, that
    message is dead-lettered naming the limit, and the messages around it are handled well before
    the handler would have returned."""
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.log (body text)")
        conn.execute(f"""CREATE FUNCTION {ns}.slow(m {MSG_TYPE}) RETURNS void LANGUAGE plpgsql AS $f$
            BEGIN
                IF convert_from(m.payload, 'UTF8') = 'slow' THEN PERFORM pg_sleep(60); END IF;
                INSERT INTO {ns}.log VALUES (convert_from(m.payload, 'UTF8'));
            END $f$""")
    set_worker_setting(pg, "mqtt_pg.route_timeout", "500ms")
    try:
        filt = f"{topic}/slow/#"
        subscribe(conn, filt, broker.name, role=router, handler=f"{ns}.slow({MSG_TYPE})")
        mosq.wait_subscribed(broker.client_id, filt)
        mosquitto_pub(mosq.port, f"{topic}/slow/x", lines=lines("ok1", "slow", "ok2"), qos=1)
        [dead] = wait_dead(conn, broker.id, 1, timeout=30)
        assert dead["payload"] == b"slow"
        assert "mqtt_pg.route_timeout" in dead["error"], dead["error"]
        wait_rows(conn, f"SELECT body FROM {ns}.log", n=2, timeout=30)
        assert sorted(b for (b,) in conn.execute(f"SELECT body FROM {ns}.log")) == ["ok1", "ok2"]
        assert [r["payload"] for r in history_rows(conn, f"{topic}/slow/x")] == [b"ok1", b"ok2"]
        assert wait_status(conn, broker.name, "connected")
    finally:
        set_worker_setting(pg, "mqtt_pg.route_timeout", None)


# The SQLSTATE classes that would otherwise mean "retry the batch later" or "something is wrong
# with the server": raised by a handler, each is that message's own fault.
TRANSIENT_SQLSTATES = ["40001", "40P01", "53200", "55P03", "57P01", "58030"]


@pytest.mark.parametrize("sqlstate", TRANSIENT_SQLSTATES)
def test_handler_raising_a_transient_sqlstate_cannot_stall_the_stream(pg, conn, broker, mosq, ns, router, topic,
                                                                      sqlstate):
    """A serialization failure (40001), a deadlock, out of memory, a lock not available, an
    admin shutdown, an I/O error: any error inside routing is the message's own. A handler that
    raises one for ever must not hold the stream: the message is dead-lettered at once (no batch
    retries), the rest is stored and handled, and the worker carries on."""
    with as_role(conn, router):
        conn.execute(f"CREATE TABLE {ns}.log (body text)")
        conn.execute(f"""CREATE FUNCTION {ns}.flaky(m {MSG_TYPE}) RETURNS void LANGUAGE plpgsql AS $f$
            BEGIN
                IF convert_from(m.payload, 'UTF8') = 'again' THEN
                    RAISE EXCEPTION 'try me again' USING ERRCODE = '{sqlstate}';
                END IF;
                INSERT INTO {ns}.log VALUES (convert_from(m.payload, 'UTF8'));
            END $f$""")
    filt, t = f"{topic}/flaky/#", f"{topic}/flaky/x"
    subscribe(conn, filt, broker.name, role=router, handler=f"{ns}.flaky({MSG_TYPE})")
    mosq.wait_subscribed(broker.client_id, filt)
    workers = pg.worker_pids(TEST_DB)
    mosquitto_pub(mosq.port, t, lines=lines("ok1", "again", "ok2"), qos=1)
    [dead] = wait_dead(conn, broker.id, 1, timeout=10)
    assert dead["payload"] == b"again" and "try me again" in dead["error"], dead
    assert sorted(b for (b,) in conn.execute(f"SELECT body FROM {ns}.log")) == ["ok1", "ok2"]
    assert [r["payload"] for r in history_rows(conn, t)] == [b"ok1", b"ok2"]
    # and the stream flows on at once
    mosquitto_pub(mosq.port, t, "ok3", qos=1)
    wait_rows(conn, f"SELECT 1 FROM {ns}.log WHERE body = 'ok3'", timeout=10)
    assert pg.worker_pids(TEST_DB) == workers, "the worker must not restart"
    assert len(dead_letters(conn, broker.id)) == 1
