"""MQTT 5, the SQL and worker side: the broker's protocol_version, session_expiry and
receive_maximum columns; properties on mqtt_publish, in the outbox, history and dead letters;
message expiry counted while a row waits in the outbox; mqtt_wait_for_reply.

Tests that need the engine to speak MQTT 5 on the wire skip (saying so) while the installed
library connects a protocol_version '5' broker as 3.1.1."""

from __future__ import annotations

import json
import re
import threading
import time

import paho.mqtt.client as mqtt
import psycopg
import psycopg2
import psycopg2.extensions
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness import HOST, PG_USER, mqtt_sub, unique, wait_for, wait_history, wait_status

PROPS = {
    "content_type": "application/json",
    "payload_format": "utf8",
    "message_expiry": 60,
    "response_topic": "replies/42",
    "correlation_data": "00ff10",
    "user_properties": [["a", "1"], ["a", "2"], ["b", ""]],
}


def outbox(conn, topic):
    return conn.execute("SELECT id, properties FROM mqtt_outbox WHERE topic = %s ORDER BY id",
                        (topic,)).fetchall()


def queued(conn, topic) -> int:
    return conn.execute("SELECT count(*) FROM mqtt_outbox WHERE topic = %s", (topic,)).fetchone()[0]


# --------------------------------------------------------------------------------------------
# schema


def test_broker_mqtt5_columns(conn, make_broker):
    b = make_broker(start=False)
    row = conn.execute("SELECT protocol_version, session_expiry, receive_maximum FROM mqtt_broker "
                       "WHERE id = %s", (b.id,)).fetchone()
    assert row == ("3.1.1", None, None)
    for col, value in [("protocol_version", "5"), ("protocol_version", "3.1.1"),
                       ("session_expiry", 0), ("session_expiry", 2147483647),
                       ("receive_maximum", 1), ("receive_maximum", 65535)]:
        conn.execute(f"UPDATE mqtt_broker SET {col} = %s WHERE id = %s", (value, b.id))
    for col, value, error in [("protocol_version", "4", psycopg.errors.CheckViolation),
                              ("protocol_version", "5.0", psycopg.errors.CheckViolation),
                              ("protocol_version", "", psycopg.errors.CheckViolation),
                              ("protocol_version", None, psycopg.errors.NotNullViolation),
                              ("session_expiry", -1, psycopg.errors.CheckViolation),
                              ("receive_maximum", 0, psycopg.errors.CheckViolation),
                              ("receive_maximum", 65536, psycopg.errors.CheckViolation)]:
        with pytest.raises(error):
            conn.execute(f"UPDATE mqtt_broker SET {col} = %s WHERE id = %s", (value, b.id))
    # every new column says what it is
    for table, col in [("mqtt_broker", "protocol_version"), ("mqtt_broker", "session_expiry"),
                       ("mqtt_broker", "receive_maximum"), ("mqtt_outbox", "properties"),
                       ("mqtt_message_history", "properties"), ("mqtt_dead_letter", "properties")]:
        comment = conn.execute("SELECT col_description(%s::regclass, attnum) FROM pg_attribute "
                               "WHERE attrelid = %s::regclass AND attname = %s",
                               (table, table, col)).fetchone()[0]
        assert comment, f"{table}.{col} has no comment"


def test_properties_columns_hold_objects_only(conn, make_broker, topic):
    b = make_broker(start=False)
    for table, extra in [("mqtt_outbox", {}), ("mqtt_message_history", {"direction": "receive"}),
                         ("mqtt_dead_letter", {"direction": "send", "error": "x"})]:
        cols = {"broker_id": b.id, "topic": topic, "payload": b"x", "qos": 0, **extra}
        names = ", ".join(cols) + ", properties"
        marks = ", ".join(["%s"] * len(cols)) + ", %s::jsonb"
        for bad in ("[]", '"x"', "1", "null"):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(f"INSERT INTO {table} ({names}) VALUES ({marks})", [*cols.values(), bad])
    # the text view of history carries the column
    cols = [r[0] for r in conn.execute("SELECT attname FROM pg_attribute WHERE attrelid = "
                                       "'mqtt_message_history_text'::regclass AND attnum > 0")]
    assert "properties" in cols and "payload_text" in cols


# --------------------------------------------------------------------------------------------
# mqtt_publish(..., properties)


def test_publish_properties_on_every_overload(conn, make_broker, topic):
    b = make_broker(start=False, protocol_version="5")
    expected = json.loads(json.dumps(PROPS))
    calls = [
        ("SELECT mqtt_publish(%s, %s::text, 1, false, %s, %s::jsonb)", "text"),
        ("SELECT mqtt_publish(%s, %s::bytea, 1, false, %s, %s::jsonb)", b"bytes"),
        ("SELECT mqtt_publish(%s, %s::jsonb, 1, false, %s, %s::jsonb)", '{"k": 1}'),
        ("SELECT mqtt_publish(topic => %s, payload => %s::text, broker => %s, properties => %s::jsonb)", "named"),
        ("SELECT mqtt_publish(%s, %s::jsonb, broker => %s, properties => %s::jsonb)", "[1]"),
    ]
    for sql_text, payload in calls:
        conn.execute(sql_text, (topic, payload, b.name, json.dumps(PROPS)))
    rows = outbox(conn, topic)
    assert len(rows) == len(calls)
    assert all(props == expected for _, props in rows)
    # normalized: keys in a fixed order, hex in lower case, nulls and empty objects gone
    conn.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, %s)",
                 (f"{topic}/n", b.name, json.dumps({"correlation_data": "ABCD", "content_type": None})))
    conn.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, '{}')", (f"{topic}/n", b.name))
    conn.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, NULL)", (f"{topic}/n", b.name))
    assert [p for _, p in outbox(conn, f"{topic}/n")] == [{"correlation_data": "abcd"}, None, None]


def test_existing_calls_keep_working(conn, make_broker, topic):
    """Every call written before properties existed: positional (Odoo's `mqtt_publish(%s, %s, 1)`),
    named, each payload type, on a 3.1.1 broker; empty properties are fine there too."""
    b = make_broker(start=False, is_default=True)
    try:
        conn.execute("SELECT mqtt_publish(%s, %s, 1)", (topic, "odoo"))
        conn.execute("SELECT mqtt_publish(%s, 'x')", (topic,))
        conn.execute("SELECT mqtt_publish(%s, 'x', 0, false)", (topic,))
        conn.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s)", (topic, b.name))
        conn.execute("SELECT mqtt_publish(%s, '\\x00ff'::bytea, 1)", (topic,))
        conn.execute("SELECT mqtt_publish(%s, '{\"a\": 1}'::jsonb, 1, true, %s)", (topic, b.name))
        conn.execute("SELECT mqtt_publish(topic => %s, payload => 'n', qos => 2, broker => %s)", (topic, b.name))
        conn.execute("SELECT mqtt_publish(%s, 'x', properties => '{}')", (topic,))
        conn.execute("SELECT mqtt_publish(%s, 'x', properties => NULL)", (topic,))
        rows = outbox(conn, topic)
        assert len(rows) == 9 and all(p is None for _, p in rows)
    finally:
        conn.execute("DELETE FROM mqtt_outbox WHERE broker_id = %s", (b.id,))
        conn.execute("UPDATE mqtt_broker SET is_default = false WHERE id = %s", (b.id,))


BAD_PROPERTIES = [
    ("[]", "must be a JSON object"),
    ('"text"', "must be a JSON object"),
    ('{"corelation_data": "00"}', 'unknown property "corelation_data"'),
    ('{"payload_format": "text"}', "payload_format"),
    ('{"message_expiry": 0}', "message_expiry"),
    ('{"message_expiry": -1}', "message_expiry"),
    ('{"message_expiry": 4294967296}', "message_expiry"),
    ('{"message_expiry": 1.5}', "message_expiry"),
    ('{"message_expiry": "60"}', "message_expiry"),
    # numbers jsonb holds but f64 cannot: an error like any other, not a crash (XX000)
    ('{"message_expiry": 1e400}', "properties are not JSON"),
    ('{"response_topic": "a/+"}', "response_topic"),
    ('{"response_topic": ""}', "response_topic"),
    ('{"correlation_data": "abc"}', "correlation_data"),
    ('{"correlation_data": "zz"}', "correlation_data"),
    ('{"user_properties": {"a": "b"}}', "user_properties"),
    ('{"user_properties": [["a"]]}', "pair"),
    ('{"user_properties": [["a", 1]]}', "pair"),
    # deeper than serde_json's recursion limit: also an error, not a crash
    ('{"user_properties": ' + "[" * 300 + "]" * 300 + "}", "properties"),
    (json.dumps({"content_type": "x" * 65536}), "longer than MQTT allows"),
    (json.dumps({"user_properties": [["k" * 65536, "v"]]}), "longer than MQTT allows"),
]


@pytest.mark.parametrize("props,words", BAD_PROPERTIES, ids=[str(i) for i in range(len(BAD_PROPERTIES))])
def test_bad_properties_are_refused_and_queue_nothing(conn, make_broker, topic, props, words):
    b = make_broker(start=False, protocol_version="5")
    for payload_sql in ("'x'::text", "'x'::bytea", "'1'::jsonb"):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            conn.execute(f"SELECT mqtt_publish(%s, {payload_sql}, 1, false, %s, %s::jsonb)",
                         (topic, b.name, props))
        assert words in e.value.diag.message_primary, e.value.diag.message_primary
        assert e.value.diag.message_primary.startswith("invalid MQTT properties: ")
    assert queued(conn, topic) == 0


def test_utf8_payload_format_needs_utf8(conn, make_broker, topic):
    b = make_broker(start=False, protocol_version="5")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="not valid UTF-8"):
        conn.execute("SELECT mqtt_publish(%s, '\\xff00'::bytea, 1, false, %s, '{\"payload_format\": \"utf8\"}')",
                     (topic, b.name))
    assert queued(conn, topic) == 0
    # the same bytes as "bytes", and valid UTF-8 as "utf8", are fine
    conn.execute("SELECT mqtt_publish(%s, '\\xff00'::bytea, 1, false, %s, '{\"payload_format\": \"bytes\"}')",
                 (topic, b.name))
    conn.execute("SELECT mqtt_publish(%s, convert_to('é', 'UTF8'), 1, false, %s, '{\"payload_format\": \"utf8\"}')",
                 (topic, b.name))
    assert queued(conn, topic) == 2


def test_properties_need_mqtt5(conn, make_broker, topic):
    b = make_broker(start=False)
    with conn.transaction():
        conn.execute("SELECT mqtt_publish(%s, 'ok', 1, false, %s)", (topic, b.name))
        with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
            with conn.transaction():
                conn.execute("SELECT mqtt_publish(%s, 'x', 1, false, %s, '{\"content_type\": \"text/plain\"}')",
                             (topic, b.name))
        assert "MQTT 5" in e.value.diag.message_primary and "3.1.1" in e.value.diag.message_primary
        assert "protocol_version" in e.value.diag.message_hint and "'5'" in e.value.diag.message_hint
    # the failed call left nothing; the earlier call of the transaction stays
    assert [p for _, p in outbox(conn, topic)] == [None]
    # switched to 5 in the same transaction: the next statement sees it
    with conn.transaction():
        conn.execute("UPDATE mqtt_broker SET protocol_version = '5' WHERE id = %s", (b.id,))
        conn.execute("SELECT mqtt_publish(%s, 'x', 1, false, %s, '{\"content_type\": \"text/plain\"}')",
                     (topic, b.name))
    assert [p for _, p in outbox(conn, topic)] == [None, {"content_type": "text/plain"}]


def test_properties_count_toward_max_payload_size(conn, make_broker, topic):
    b = make_broker(start=False, protocol_version="5")
    with conn.transaction():
        conn.execute("SET LOCAL mqtt_pg.max_payload_size = 100")
        conn.execute("SELECT mqtt_publish(%s, repeat('p', 90), 0, false, %s)", (topic, b.name))
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="bytes of properties"):
            with conn.transaction():
                conn.execute("SELECT mqtt_publish(%s, repeat('p', 90), 0, false, %s, %s)",
                             (topic, b.name, json.dumps({"user_properties": [["name", "value"]]})))
    assert queued(conn, topic) == 1


def test_bulk_publish_with_properties(conn, make_broker, topic):
    """One statement of many calls (the bulk path): the broker's protocol is looked up once per
    statement, and every row keeps its own properties."""
    b = make_broker(start=False, protocol_version="5")
    n = conn.execute("SELECT count(mqtt_publish(%s, 'x', 1, false, %s, "
                     "jsonb_build_object('correlation_data', lpad(to_hex(i), 4, '0')))) "
                     "FROM generate_series(1, 2000) i", (topic, b.name)).fetchone()[0]
    assert n == 2000
    got = conn.execute("SELECT count(*), count(DISTINCT properties->>'correlation_data') FROM mqtt_outbox "
                       "WHERE topic = %s", (topic,)).fetchone()
    assert got == (2000, 2000)


# --------------------------------------------------------------------------------------------
# the worker: expiry in the outbox, properties kept in history and dead letters


def insert_outbox(conn, broker_id, topic, payload, properties, age_s):
    return conn.execute(
        "INSERT INTO mqtt_outbox (broker_id, topic, payload, qos, properties, created_at) "
        "VALUES (%s, %s, convert_to(%s, 'UTF8'), 1, %s::jsonb, now() - make_interval(secs => %s)) RETURNING id",
        (broker_id, topic, payload, properties, age_s)).fetchone()[0]


def test_message_expiry_counts_from_the_call(conn, make_broker, mosq, topic):
    """A transaction that worked for 3 s before its mqtt_publish does not use up a
    message_expiry of 2 s: a row with properties gets its created_at when it is queued, not
    at the transaction's start (now())."""
    b = make_broker(protocol_version="5")
    t = f"{topic}/expiry-call"
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            conn.execute("SELECT pg_sleep(3)")  # the work the transaction did before publishing
            conn.execute("SELECT mqtt_publish(%s, 'late', 1, false, %s, '{\"message_expiry\": 2}')", (t, b.name))
        assert [m[1] for m in sub.wait_count(1)] == [b"late"]
    assert conn.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s", (t,)).fetchone()[0] == 0


def test_properties_on_a_broker_now_on_3_1_1_are_dead_lettered(conn, broker, mosq, topic):
    """A row queued with properties while its broker was on MQTT 5 (or requeued onto a 3.1.1
    broker) cannot go out as it is: it goes to the dead letters with the reason, rather than
    out without its response topic or expiry; a row without properties goes out."""
    t = f"{topic}/downgraded"
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            insert_outbox(conn, broker.id, t, "with", json.dumps({"response_topic": "r/1"}), 0)
            insert_outbox(conn, broker.id, t, "without", None, 0)
            conn.execute("SELECT _mqtt_pg_wake(1)")
        assert [m[1] for m in sub.wait_count(1)] == [b"without"]
    [(error, props)] = wait_for(lambda: conn.execute(
        "SELECT error, properties FROM mqtt_dead_letter WHERE topic = %s", (t,)).fetchall(), message="dead letter")
    assert "protocol_version is now 3.1.1" in error and props == {"response_topic": "r/1"}


def test_expired_rows_are_dead_lettered_others_sent_with_their_properties(conn, make_broker, mosq, topic):
    """Rows written into the outbox directly (as an old publish that waited): the worker sends
    what is left of message_expiry, dead-letters the expired and the unreadable, and history
    and dead letters keep the row's properties."""
    broker = make_broker(protocol_version="5")
    t = f"{topic}/expiry"
    fresh = {"message_expiry": 3600, "user_properties": [["k", "v"]]}
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            expired = insert_outbox(conn, broker.id, t, "expired", json.dumps({"message_expiry": 60}), 75)
            bad = insert_outbox(conn, broker.id, t, "bad", json.dumps({"message_expiry": "soon"}), 0)
            insert_outbox(conn, broker.id, t, "fresh", json.dumps(fresh), 75)
            conn.execute("SELECT _mqtt_pg_wake(1)")
        assert sub.wait_count(1)[0][1] == b"fresh"
    [sent] = wait_history(conn, t, 1, direction="send")
    assert conn.execute("SELECT properties FROM mqtt_message_history WHERE id = %s",
                        (sent["id"],)).fetchone()[0] == fresh
    wait_for(lambda: conn.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s", (t,)).fetchone()[0] == 2,
             message="the expired and the unreadable row dead-lettered")
    dead = {r[0]: r[1:] for r in conn.execute(
        "SELECT convert_from(payload, 'UTF8'), error, properties, direction FROM mqtt_dead_letter "
        "WHERE topic = %s", (t,))}
    error, props, direction = dead["expired"]
    assert re.fullmatch(r"message expired in the outbox: message_expiry 60 s, waited 7[5-7] s", error), error
    assert props == {"message_expiry": 60} and direction == "send"
    error, props, _ = dead["bad"]
    assert error.startswith("invalid properties in mqtt_outbox: message_expiry"), error
    assert props == {"message_expiry": "soon"}
    assert conn.execute("SELECT count(*) FROM mqtt_outbox WHERE id IN (%s, %s)", (expired, bad)).fetchone()[0] == 0
    # requeued, the expiry starts again, and the properties go along into the outbox and history
    dead_id = conn.execute("SELECT id FROM mqtt_dead_letter WHERE topic = %s AND error LIKE 'message expired%%'",
                           (t,)).fetchone()[0]
    conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead_id,))
    rows = wait_history(conn, t, 2, direction="send")
    assert conn.execute("SELECT properties FROM mqtt_message_history WHERE id = %s",
                        (rows[-1]["id"],)).fetchone()[0] == {"message_expiry": 60}


def test_expired_row_waits_while_dead_letters_are_refused(pg, conn, broker, mosq, topic):
    """A trigger on mqtt_dead_letter that refuses the expired row: the worker carries on (no
    crash, nothing sent), and once the trigger is gone the row is dead-lettered after all."""
    t = f"{topic}/refused"
    fn = unique("refuse")
    conn.execute(f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 f"IF NEW.topic = '{t}' THEN RAISE EXCEPTION 'no dead letters for {t}'; END IF; RETURN NEW; END $$")
    conn.execute(f"CREATE TRIGGER {fn} BEFORE INSERT ON mqtt_dead_letter FOR EACH ROW EXECUTE FUNCTION {fn}()")
    workers = pg.worker_pids("mqtt_e2e")
    try:
        with mqtt_sub(mosq.port, t, qos=1) as sub:
            with conn.transaction():
                row = insert_outbox(conn, broker.id, t, "expired", json.dumps({"message_expiry": 1}), 30)
                conn.execute("SELECT _mqtt_pg_wake(1)")
            wait_for(lambda: "could not move 1 expired or unreadable messages" in pg.log_text()
                     and f"no dead letters for {t}" in pg.log_text(), message="the worker's warning")
            assert pg.worker_pids("mqtt_e2e") == workers
            assert queued(conn, t) == 1
            conn.execute(f"DROP TRIGGER {fn} ON mqtt_dead_letter")
            conn.execute("SELECT _mqtt_pg_wake(1)")
            wait_for(lambda: queued(conn, t) == 0, message="the expired row dead-lettered once allowed")
            assert sub.messages == []
        assert conn.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s", (t,)).fetchone()[0] == 1
        assert row
    finally:
        conn.execute(f"DROP TRIGGER IF EXISTS {fn} ON mqtt_dead_letter")
        conn.execute(f"DROP FUNCTION {fn}()")


def test_requeued_received_dead_letter_keeps_properties(conn, make_broker, topic):
    b = make_broker(start=False)
    dead_id = conn.execute(
        "INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error, properties) "
        "VALUES (%s, %s, 'r', 1, 'receive', 'test', '{\"correlation_data\": \"beef\"}') RETURNING id",
        (b.id, topic)).fetchone()[0]
    new_id = conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead_id,)).fetchone()[0]
    assert conn.execute("SELECT properties FROM mqtt_message_history WHERE id = %s",
                        (new_id,)).fetchone()[0] == {"correlation_data": "beef"}


def test_handler_sees_properties_of_a_requeued_received_message(conn, make_broker, topic, plain_role):
    """Handlers take the history row, properties included: a received dead letter requeued is
    routed as a new arrival is (the same statement builds the row), so this runs without the
    engine's MQTT 5 path. Routing runs as the subscription's role, never a superuser."""
    b = make_broker(start=False)
    ns = unique("mq5")
    conn.execute(f'CREATE SCHEMA {ns} AUTHORIZATION "{plain_role}"')
    conn.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, '#', true)",
                 (plain_role,))
    try:
        conn.execute(f'SET ROLE "{plain_role}"')
        try:
            conn.execute(f"CREATE TABLE {ns}.seen (correlation text, users jsonb)")
            conn.execute(f"CREATE FUNCTION {ns}.h(msg mqtt_message_history) RETURNS void LANGUAGE sql AS $$ "
                         f"INSERT INTO {ns}.seen VALUES (msg.properties->>'correlation_data', "
                         f"msg.properties->'user_properties') $$")
            conn.execute("SELECT mqtt_subscribe(%s, 1, %s, %s::regprocedure)",
                         (f"{topic}/in/#", b.name, f"{ns}.h(mqtt_message_history)"))
        finally:
            conn.execute("RESET ROLE")
        dead_id = conn.execute(
            "INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error, properties) "
            "VALUES (%s, %s, 'r', 1, 'receive', 'test', %s) RETURNING id",
            (b.id, f"{topic}/in/x", json.dumps({"correlation_data": "c0ffee", "user_properties": [["device", "d1"]]}))
        ).fetchone()[0]
        conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead_id,))
        assert conn.execute(f"SELECT * FROM {ns}.seen").fetchall() == [("c0ffee", [["device", "d1"]])]
    finally:
        conn.execute("DELETE FROM mqtt_topic WHERE broker_id = %s", (b.id,))
        conn.execute(f"DROP SCHEMA {ns} CASCADE")


def test_unusable_mqtt5_settings_show_in_status(conn, make_broker):
    """The table's CHECKs keep the columns in range; should a DBA drop one, the worker refuses
    the row with a status error naming the column instead of guessing."""
    b = make_broker(start=False)
    conn.execute("ALTER TABLE mqtt_broker DROP CONSTRAINT mqtt_broker_protocol_version_check")
    try:
        conn.execute("UPDATE mqtt_broker SET protocol_version = '4' WHERE id = %s", (b.id,))
        conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
        status = wait_for(lambda: (s := conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0])
                          .get("last_error") and s, message="the broker's status error")
        assert 'invalid protocol_version "4"' in status["last_error"], status
        assert status["status"] != "connected"
    finally:
        conn.execute("SELECT mqtt_stop_listener(%s)", (b.name,))
        conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (b.id,))
        conn.execute("ALTER TABLE mqtt_broker ADD CONSTRAINT mqtt_broker_protocol_version_check "
                     "CHECK (protocol_version IN ('3.1.1', '5'))")


# --------------------------------------------------------------------------------------------
# mqtt_wait_for_reply


def insert_reply(conn, broker_id, topic, correlation: bytes, direction="receive", age_s=0):
    return conn.execute(
        "INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction, properties, \"timestamp\") "
        "VALUES (%s, %s, 'reply', 1, %s, jsonb_build_object('correlation_data', encode(%s::bytea, 'hex')), "
        "now() - make_interval(secs => %s)) RETURNING id",
        (broker_id, topic, direction, correlation, age_s)).fetchone()[0]


def odoo_cursor(pg, dbname="mqtt_e2e", user=None):
    """A psycopg2 connection as Odoo opens it: REPEATABLE READ, not autocommit."""
    c = psycopg2.connect(host=HOST, port=pg.port, dbname=dbname, user=user or PG_USER)
    c.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
    return c


def wait_until_waiting(conn, pid):
    """The backend `pid` is inside mqtt_wait_for_reply, sleeping between look-ups."""
    wait_for(lambda: conn.execute("SELECT wait_event_type = 'Extension' FROM pg_stat_activity WHERE pid = %s",
                                  (pid,)).fetchone()[0], message=f"backend {pid} waiting in mqtt_wait_for_reply")


class Call(threading.Thread):
    """Run one query on a psycopg2 cursor in a thread; keeps the rows or the error."""

    def __init__(self, cur, query, args):
        super().__init__(daemon=True)
        self.cur, self.query, self.args = cur, query, args
        self.rows = self.error = None
        self.elapsed = None

    def run(self):
        started = time.monotonic()
        try:
            self.cur.execute(self.query, self.args)
            self.rows = self.cur.fetchall()
        except Exception as e:  # noqa: BLE001 - handed to the test
            self.error = e
        self.elapsed = time.monotonic() - started


WAIT = "SELECT r.id, r.topic, r.direction, r.properties FROM mqtt_wait_for_reply(%s, %s) AS r"


def test_wait_for_reply_sees_a_reply_committed_after_the_snapshot(pg, conn, make_broker, topic):
    """Odoo's way: psycopg2, REPEATABLE READ, the wait in a later transaction than the publish,
    its snapshot taken before the reply is committed."""
    b = make_broker(start=False)
    corr = unique("corr").encode()
    odoo = odoo_cursor(pg)
    try:
        cur = odoo.cursor()
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM mqtt_message_history")  # the snapshot is taken here
        call = Call(cur, WAIT, (corr, "30 seconds"))
        call.start()
        wait_until_waiting(conn, pid)
        reply_id = insert_reply(conn, b.id, f"{topic}/reply", corr)
        call.join(30)
        assert call.error is None, call.error
        [(rid, rtopic, direction, props)] = call.rows
        assert (rid, rtopic, direction) == (reply_id, f"{topic}/reply", "receive")
        assert props == {"correlation_data": corr.hex()}
        assert call.elapsed < 10
        # the transaction's own snapshot still does not see it: only the look-up looked past it
        cur.execute("SELECT count(*) FROM mqtt_message_history WHERE id = %s", (reply_id,))
        assert cur.fetchone()[0] == 0
        odoo.rollback()
    finally:
        odoo.close()


def test_wait_for_reply_returns_the_newest_received_row(conn, make_broker, topic):
    b = make_broker(start=False)
    corr = unique("corr").encode()
    insert_reply(conn, b.id, f"{topic}/old", corr, age_s=10)
    newest = insert_reply(conn, b.id, f"{topic}/new", corr, age_s=5)
    insert_reply(conn, b.id, f"{topic}/older", corr, age_s=20)
    insert_reply(conn, b.id, f"{topic}/request", corr, direction="send")  # our own request: not a reply
    insert_reply(conn, b.id, f"{topic}/other", corr + b"x")
    row = conn.execute(WAIT, (corr, "0")).fetchone()
    assert row[:3] == (newest, f"{topic}/new", "receive")


def test_wait_for_reply_times_out_with_null(conn):
    corr = unique("none").encode()
    started = time.monotonic()
    row = conn.execute(WAIT, (corr, "700 milliseconds")).fetchone()
    elapsed = time.monotonic() - started
    assert row == (None, None, None, None)
    assert 0.65 <= elapsed < 5, elapsed
    started = time.monotonic()
    assert conn.execute("SELECT mqtt_wait_for_reply(%s, '0') IS NULL", (corr,)).fetchone()[0] is True
    assert time.monotonic() - started < 2


def test_wait_for_reply_honours_statement_timeout_and_cancel(conn, connect):
    corr = unique("none").encode()
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled, match="statement timeout"):
            conn.execute(WAIT, (corr, "60 seconds"))
    assert time.monotonic() - started < 10
    other = connect()
    pid = other.execute("SELECT pg_backend_pid()").fetchone()[0]
    box = {}

    def run():
        try:
            other.execute(WAIT, (corr, "60 seconds"))
        except psycopg.Error as e:
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    th.start()
    wait_until_waiting(conn, pid)
    conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
    th.join(10)
    assert isinstance(box.get("error"), psycopg.errors.QueryCanceled)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("corr,timeout,words", [
    (None, "1 second", "correlation_data must not be NULL"),
    (b"", "1 second", "correlation_data must not be empty"),
    (b"x" * 65536, "1 second", "longer than MQTT allows"),
    (b"x", None, "timeout must not be NULL"),
    (b"x", "-1 second", "timeout must not be negative"),
    (b"x", "-1 month", "timeout must not be negative"),
])
def test_wait_for_reply_bad_input(conn, corr, timeout, words):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=words):
        conn.execute("SELECT mqtt_wait_for_reply(%s::bytea, %s::interval)", (corr, timeout))


def test_wait_for_reply_default_timeout_is_in_the_signature(conn):
    args = conn.execute("SELECT pg_get_function_arguments('mqtt_wait_for_reply'::regproc)").fetchone()[0]
    assert args == ("correlation_data bytea, timeout interval DEFAULT '00:00:10'::interval, "
                    "since timestamp with time zone DEFAULT NULL::timestamp with time zone")


def test_wait_for_reply_since_ignores_older_replies(conn, make_broker, topic):
    """With `since`, a reply stored before it does not count (correlation data reused, or a
    reply sent in advance): the look-up finds only what came at or after it."""
    b = make_broker(start=False)
    corr = unique("since").encode()
    old = insert_reply(conn, b.id, f"{topic}/old", corr, age_s=86400)
    assert conn.execute(WAIT, (corr, "0")).fetchone()[0] == old, "without since, any age counts"
    since = conn.execute("SELECT now()").fetchone()[0]
    waited = "SELECT (r).id FROM (SELECT mqtt_wait_for_reply(%s, %s, %s) r) x"
    assert conn.execute(waited, (corr, "0", since)).fetchone()[0] is None
    new = insert_reply(conn, b.id, f"{topic}/new", corr)
    assert conn.execute(waited, (corr, "2 seconds", since)).fetchone()[0] == new
    assert conn.execute(waited, (corr, "0", None)).fetchone()[0] == new


def test_wait_for_reply_uses_the_correlation_index(conn, make_broker, topic):
    """With history of realistic size, the look-up is an index probe, not a scan (checked on the
    statement the function runs, as EXPLAIN shows it)."""
    b = make_broker(start=False)
    conn.execute("INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction) "
                 "SELECT %s, %s, 'x', 0, 'receive' FROM generate_series(1, 20000)", (b.id, f"{topic}/bulk"))
    corr = unique("idx").encode()
    reply = insert_reply(conn, b.id, f"{topic}/r", corr)
    part = conn.execute("SELECT tableoid::regclass::text FROM mqtt_message_history WHERE id = %s",
                        (reply,)).fetchone()[0]
    conn.execute("ANALYZE mqtt_message_history")
    plan = conn.execute(
        "EXPLAIN (FORMAT JSON) SELECT h FROM mqtt_message_history h WHERE h.direction = 'receive' "
        "AND h.properties ? 'correlation_data' AND (h.properties ->> 'correlation_data') = %s "
        "ORDER BY h.\"timestamp\" DESC, h.id DESC LIMIT 1", (corr.hex(),)).fetchone()[0]

    def nodes(n):
        yield n
        for child in n.get("Plans", []):
            yield from nodes(child)

    # The partition holding the 20,000 rows is probed through its piece of the partial index
    # (empty partitions, costing nothing, may be scanned; the planner's choice).
    scans = [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name") == part]
    assert [n["Node Type"] for n in scans] in (["Index Scan"], ["Bitmap Heap Scan"]), plan
    index = scans[0].get("Index Name") or scans[0]["Plans"][0]["Index Name"]
    parent = conn.execute("SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = %s::regclass",
                          (index,)).fetchone()
    assert parent == ("mqtt_message_history_correlation",), (index, parent)
    # and the function finds the row through it
    assert conn.execute(WAIT, (corr, "0")).fetchone()[0] == reply
    conn.execute("DELETE FROM mqtt_message_history WHERE broker_id = %s", (b.id,))


def test_version_gate_and_the_five_argument_symbols(pg, scratch_db):
    """Until ALTER EXTENSION UPDATE, the SQL of an older version calls into this library: its
    mqtt_publish(text, text, integer, boolean, text) points at the five-argument symbols, which
    must still take five arguments, and every new function refuses with 55000 while the SQL
    objects are of another version."""
    db = scratch_db("gate")
    with pg.connect(db) as c:
        c.execute("CREATE EXTENSION mqtt_pg")
        c.execute("INSERT INTO mqtt_broker (name, host, port, protocol_version) VALUES ('b', '127.0.0.1', 1, '5')")
        for kind in ("text", "bytea"):
            c.execute(f"CREATE FUNCTION old_publish_{kind}(text, {kind}, integer, boolean, text) RETURNS bigint "
                      f"LANGUAGE c AS '$libdir/mqtt_pg', 'mqtt_publish_{kind}_wrapper'")
        assert c.execute("SELECT old_publish_text('a/b', 'x', 1, false, 'b')").fetchone()[0] > 0
        assert c.execute("SELECT old_publish_bytea('a/b', '\\x00'::bytea, 1, false, 'b')").fetchone()[0] > 0
        assert c.execute("SELECT count(*), count(properties) FROM mqtt_outbox").fetchone() == (2, 0)
        version = c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0]
        c.execute("UPDATE pg_extension SET extversion = '0.0.1' WHERE extname = 'mqtt_pg'")
        try:
            # a new session, as after the restart that loads a new library
            with pg.connect(db) as fresh:
                for query in ("SELECT old_publish_text('a/b', 'x', 1, false, 'b')",
                              "SELECT mqtt_publish('a/b', 'x', 1, false, 'b', '{\"content_type\": \"a\"}')",
                              "SELECT mqtt_wait_for_reply('\\x01'::bytea, '1 second')"):
                    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is at version 0.0.1"):
                        fresh.execute(query)
        finally:
            c.execute("UPDATE pg_extension SET extversion = %s WHERE extname = 'mqtt_pg'", (version,))


@pytest.fixture
def plain_role(pg):
    """A login role that is not a superuser and holds no privilege on mqtt_pg's tables."""
    role = unique("plain")
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
    yield role
    with pg.connect("mqtt_e2e") as admin:
        admin.execute("DELETE FROM mqtt_topic WHERE owner_role = %s", (role,))
        admin.execute("DELETE FROM mqtt_access_control WHERE role_name = %s", (role,))
        admin.execute(f'DROP OWNED BY "{role}" CASCADE')  # its grants and objects, here
    with pg.connect() as admin:
        admin.execute(f'DROP ROLE "{role}"')


def connect_as(pg, role) -> psycopg.Connection:
    return psycopg.connect(host=HOST, port=pg.port, dbname="mqtt_e2e", user=role, autocommit=True)


def test_wait_for_reply_needs_select_on_history(pg, conn, make_broker, topic, plain_role):
    b = make_broker(start=False)
    corr = unique("secret").encode()
    insert_reply(conn, b.id, f"{topic}/secret", corr)
    with connect_as(pg, plain_role) as c:
        started = time.monotonic()
        for corr_try in (corr, b"nothing"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                c.execute(WAIT, (corr_try, "5 seconds"))
            # refused at the first look-up, before any wait, the same whether a row exists
            assert "permission denied for table mqtt_message_history" in str(e.value)
        assert time.monotonic() - started < 3


def test_wait_for_reply_obeys_row_level_security(pg, conn, make_broker, topic, plain_role):
    b = make_broker(start=False)
    mine, theirs = unique("mine").encode(), unique("theirs").encode()
    insert_reply(conn, b.id, f"{topic}/mine", mine)
    insert_reply(conn, b.id, f"{topic}/theirs", theirs)
    conn.execute(f'GRANT SELECT ON mqtt_message_history TO "{plain_role}"')
    conn.execute("ALTER TABLE mqtt_message_history ENABLE ROW LEVEL SECURITY")
    try:
        conn.execute(f'CREATE POLICY e2e_mine ON mqtt_message_history FOR SELECT TO "{plain_role}" '
                     f"USING (topic LIKE '%%/mine')")
        with connect_as(pg, plain_role) as c:
            assert c.execute(WAIT, (mine, "0")).fetchone()[1] == f"{topic}/mine"
            assert c.execute(WAIT, (theirs, "200 milliseconds")).fetchone() == (None, None, None, None)
        # the owner (the superuser here) still sees it
        assert conn.execute(WAIT, (theirs, "0")).fetchone()[1] == f"{topic}/theirs"
    finally:
        conn.execute("DROP POLICY IF EXISTS e2e_mine ON mqtt_message_history")
        conn.execute("ALTER TABLE mqtt_message_history DISABLE ROW LEVEL SECURITY")


def test_hostile_role(pg, conn, make_broker, topic, plain_role):
    """A non-superuser with a publish rule and SELECT on history: crafted properties are data
    (stored verbatim, never SQL, never a forged log line), huge ones are refused cleanly, and
    wait_for_reply's argument cannot reach past its own rights."""
    b = make_broker(start=False, protocol_version="5")
    conn.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (%s, %s, true)",
                 (plain_role, f"{topic}/#"))
    conn.execute(f'GRANT SELECT ON mqtt_message_history TO "{plain_role}"')
    nasty = {
        "content_type": "text/plain'); DROP TABLE mqtt_outbox; --",
        "response_topic": f"{topic}/\n2026-12-08 LOG:  forged line",
        "user_properties": [["x\"'\\", "$$; SELECT pg_sleep(10); $$"], ["\u202e\t\r", "\U0001f600"]],
        "correlation_data": "27" * 100,
    }
    with connect_as(pg, plain_role) as c:
        c.execute("SELECT mqtt_publish(%s, 'x', 1, false, %s, %s)", (f"{topic}/a", b.name, json.dumps(nasty)))
        # the largest values MQTT allows are accepted; beyond, 22023 and nothing queued
        big = {"user_properties": [["k", "v" * 65535]], "correlation_data": "ab" * 65535}
        c.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, %s)", (f"{topic}/big", b.name, json.dumps(big)))
        for props in ({"user_properties": [["k", "v"]] * 100000, "content_type": "y" * 65536},
                      {"correlation_data": "ab" * 65536}):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                c.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, %s)", (f"{topic}/huge", b.name, json.dumps(props)))
        # what it writes into an error (and so the server log) is escaped and cut short
        forged = "k\n2026-12-08 00:00:00.000 UTC [1] LOG:  forged" + "z" * 100000
        for props in ({forged: 1}, {"payload_format": forged}, {"user_properties": [[forged]]}):
            with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
                c.execute("SELECT mqtt_publish(%s, 'x', 0, false, %s, %s)", (f"{topic}/huge", b.name, json.dumps(props)))
            message = e.value.diag.message_primary
            assert "\n" not in message and len(message) < 400, message[:200]
        # no rule for other topics: properties change nothing about that
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT mqtt_publish('elsewhere/x', 'x', 0, false, %s, '{}')", (b.name,))
        # and its own reads stay its own: no outbox access
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT properties FROM mqtt_outbox")
        # the broker's MQTT 5 settings are the database owner's to set, not a publishing role's
        for setting in ("protocol_version = '3.1.1'", "receive_maximum = 1", "session_expiry = 0"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(f"UPDATE mqtt_broker SET {setting} WHERE id = %s", (b.id,))
        # correlation data is a value, never SQL
        for corr in (b"'; DROP TABLE mqtt_outbox; --", b"\x00\x01\xff", b"%s%s%n"):
            assert c.execute(WAIT, (corr, "0")).fetchone() == (None, None, None, None)
    assert [p for _, p in outbox(conn, f"{topic}/a")] == [nasty]
    assert queued(conn, f"{topic}/big") == 1 and queued(conn, f"{topic}/huge") == 0
    assert conn.execute("SELECT to_regclass('mqtt_outbox') IS NOT NULL").fetchone()[0]


# --------------------------------------------------------------------------------------------
# on the wire (needs the engine's MQTT 5 path)


def require_v5_on_the_wire(conn, mosq, b):
    """Skip unless the worker's connection for broker `b` (protocol_version '5') is MQTT 5:
    mosquitto logs the protocol of each connection, `p5` for MQTT 5."""
    wait_status(conn, b.name, "connected")
    line = next((l for l in reversed(mosq.log_text().splitlines())
                 if "New client connected" in l and f" as {b.client_id} " in l), "")
    if "(p5," not in line:
        pytest.skip("the installed library connects protocol_version '5' brokers as MQTT 3.1.1 "
                    "(the engine's MQTT 5 path is not merged yet)")


def v5_client(port, on_message=None, subscribe: str | None = None):
    """A paho MQTT 5 client, connected (and subscribed to `subscribe`, SUBACK received)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=unique("v5"), protocol=mqtt.MQTTv5)
    connected, subscribed = threading.Event(), threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.on_subscribe = lambda *a: subscribed.set()
    if on_message:
        c.on_message = on_message
    c.connect(HOST, port)
    c.loop_start()
    assert connected.wait(10), "paho MQTT 5 client did not connect"
    if subscribe:
        c.subscribe(subscribe, qos=1)
        assert subscribed.wait(10), f"paho MQTT 5 client did not subscribe to {subscribe}"
    return c


def test_handler_sees_received_properties(conn, make_broker, mosq, topic, plain_role):
    b = make_broker(protocol_version="5")
    require_v5_on_the_wire(conn, mosq, b)
    ns = unique("mq5")
    conn.execute(f'CREATE SCHEMA {ns} AUTHORIZATION "{plain_role}"')
    conn.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, '#', true)",
                 (plain_role,))
    try:
        conn.execute(f'SET ROLE "{plain_role}"')
        try:
            conn.execute(f"CREATE TABLE {ns}.seen (correlation text, users jsonb, content_type text)")
            conn.execute(f"CREATE FUNCTION {ns}.h(msg mqtt_message_history) RETURNS void LANGUAGE sql AS $$ "
                         f"INSERT INTO {ns}.seen VALUES (msg.properties->>'correlation_data', "
                         f"msg.properties->'user_properties', msg.properties->>'content_type') $$")
            conn.execute("SELECT mqtt_subscribe(%s, 1, %s, %s::regprocedure)",
                         (f"{topic}/in/#", b.name, f"{ns}.h(mqtt_message_history)"))
        finally:
            conn.execute("RESET ROLE")
        mosq.wait_subscribed(b.client_id, f"{topic}/in/#")
        c = v5_client(mosq.port)
        try:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = b"\x01\x02req"
            props.UserProperty = [("device", "d1"), ("device", "d2")]
            props.ContentType = "text/plain"
            c.publish(f"{topic}/in/x", b"hello", qos=1, properties=props).wait_for_publish(5)
            row = wait_for(lambda: conn.execute(f"SELECT * FROM {ns}.seen").fetchone(), timeout=20,
                           message="the handler's row")
        finally:
            c.loop_stop()
            c.disconnect()
        assert row == (b"\x01\x02req".hex(), [["device", "d1"], ["device", "d2"]], "text/plain")
        [stored] = wait_history(conn, f"{topic}/in/x", 1, direction="receive")
        assert conn.execute("SELECT properties FROM mqtt_message_history WHERE id = %s",
                            (stored["id"],)).fetchone()[0] == {
            "content_type": "text/plain", "correlation_data": b"\x01\x02req".hex(),
            "user_properties": [["device", "d1"], ["device", "d2"]]}
    finally:
        conn.execute("DELETE FROM mqtt_topic WHERE broker_id = %s", (b.id,))
        conn.execute(f"DROP SCHEMA {ns} CASCADE")


def test_request_response_round_trip(pg, conn, make_broker, mosq, topic):
    """Publish a request with a response topic and correlation data; a responder (paho, MQTT 5)
    answers; mqtt_wait_for_reply, in a later REPEATABLE READ transaction, returns the reply."""
    b = make_broker(protocol_version="5")
    require_v5_on_the_wire(conn, mosq, b)
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/replies/#", b.name))
    mosq.wait_subscribed(b.client_id, f"{topic}/replies/#")

    def answer(client, userdata, msg):
        p = Properties(PacketTypes.PUBLISH)
        p.CorrelationData = msg.properties.CorrelationData
        client.publish(msg.properties.ResponseTopic, b"pong:" + msg.payload, qos=1, properties=p)

    responder = v5_client(mosq.port, on_message=answer, subscribe=f"{topic}/requests")
    try:
        corr = unique("rr").encode()
        odoo = odoo_cursor(pg)
        try:
            cur = odoo.cursor()
            cur.execute("SELECT mqtt_publish(%s, 'ping', 1, false, %s, %s)",
                        (f"{topic}/requests", b.name,
                         json.dumps({"response_topic": f"{topic}/replies/1", "correlation_data": corr.hex()})))
            odoo.commit()
            cur.execute(WAIT, (corr, "20 seconds"))
            [(rid, rtopic, direction, props)] = cur.fetchall()
            assert (rtopic, direction) == (f"{topic}/replies/1", "receive")
            assert props["correlation_data"] == corr.hex()
            odoo.rollback()
        finally:
            odoo.close()
    finally:
        responder.loop_stop()
        responder.disconnect()
        conn.execute("SELECT mqtt_unsubscribe(%s, %s)", (f"{topic}/replies/#", b.name))
