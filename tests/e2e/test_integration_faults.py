"""Integration under attack and in PostgreSQL's corners: what a hostile handler can do to the
worker (settings it leaves behind, loops, transient errors), and row-change messages queued by
statements that never pass through the executor's end (COPY, deferred triggers, cursors,
PREPARE TRANSACTION).

Every test runs in a database owned by a non-superuser role, as Odoo's is (see test_security's
`odoo` fixture), and configures routing as that role: routing never runs as a superuser.
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from harness import HOST, PROTOCOL, mosquitto_pub, mqtt_sub, unique, wait_for, wait_status
from test_security import is_superuser, odoo  # noqa: F401  (fixture)

MSG = "public.mqtt_message_history"


def start_broker(o, mosq) -> str:
    name = unique("b")
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES (%s, %s, %s, true)",
              (name, HOST, mosq.port))
    o.execute("SELECT mqtt_start_listener(%s)", (name,))
    wait_status(o, name, "connected")
    return name


def worker_pid(pg, db) -> int | None:
    with pg.connect() as admin:
        row = admin.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' "
                            "AND datname = %s", (db,)).fetchone()
    return row[0] if row else None


def client_id(o, broker) -> str:
    return o.execute("SELECT mqtt_status(%s)->>'client_id'", (broker,)).fetchone()[0] or \
        o.execute("SELECT mqtt_start_listener(%s)", (broker,)).fetchone()[0]


# ---- settings a handler leaves behind -----------------------------------------------------

def test_a_handlers_session_settings_end_with_its_routing(pg, odoo, mosq, topic):  # noqa: F811
    """A plain SET (set_config(..., false)) in a handler must not outlive the routing: not a
    search_path that would make the worker's next statements resolve the owner's types (a
    domain whose CHECK makes the owner a superuser), not default_transaction_read_only = on
    (which would stop all storing)."""
    db, owner, connect = odoo
    o = connect()
    o.execute("CREATE SCHEMA trap")
    o.execute(f"""CREATE FUNCTION trap.evil(int) RETURNS boolean LANGUAGE plpgsql AS
                  $f$BEGIN EXECUTE 'ALTER ROLE "{owner}" SUPERUSER'; RETURN true; END$f$""")
    for t in ("int4", "int8", "int2", "text", "bool", "bytea"):
        o.execute(f"CREATE DOMAIN trap.{t} AS pg_catalog.{t} CHECK (trap.evil(1))")
    o.execute("CREATE TABLE seen (body text, path text, ro text)")
    o.execute(f"""CREATE FUNCTION on_msg(m {MSG}) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
            INSERT INTO public.seen VALUES (pg_catalog.convert_from(m.payload, 'UTF8'),
                pg_catalog.current_setting('search_path'),
                pg_catalog.current_setting('default_transaction_read_only'));
            PERFORM pg_catalog.set_config('search_path', 'trap, pg_catalog', false);
            PERFORM pg_catalog.set_config('default_transaction_read_only', 'on', false);
        END $f$""")
    broker = start_broker(o, mosq)
    t = f"{topic}/set"
    o.execute("SELECT mqtt_subscribe(%s, 1, handler => 'on_msg(mqtt_message_history)')", (t,))
    wait_for(lambda: mosq.subscribed(client_id(o, broker), t), message="subscribed")
    for i in range(3):  # separate batches: each waits for the one before
        mosquitto_pub(mosq.port, t, f"m{i}", qos=1)
        wait_for(lambda: o.execute("SELECT count(*) FROM seen").fetchone()[0] == i + 1, timeout=15,
                 message=f"message {i} handled")
    rows = o.execute("SELECT body, path, ro FROM seen ORDER BY body").fetchall()
    assert rows == [(f"m{i}", '"$user", public, pg_temp', "off") for i in range(3)], rows
    assert o.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s", (t,)).fetchone()[0] == 3
    assert o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0
    assert not is_superuser(pg, owner)


# ---- a handler that never returns ---------------------------------------------------------

def test_sigterm_stops_a_worker_stuck_in_a_handler_that_swallows_cancels(pg, odoo, mosq, topic):  # noqa: F811
    """A handler looping for ever and catching query_canceled outlives mqtt_pg.route_timeout;
    pg_terminate_backend still stops the worker at once (SIGTERM is PostgreSQL's die while a
    subscriber's code runs). Nothing was acknowledged, so once the handler is fixed the next
    worker gets the message again from the broker and routes it once."""
    db, owner, connect = odoo
    o = connect()
    o.execute("CREATE TABLE seen (body text)")
    o.execute(f"""CREATE FUNCTION on_msg(m {MSG}) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
            LOOP
                BEGIN PERFORM pg_catalog.pg_sleep(0.1); EXCEPTION WHEN query_canceled THEN NULL; END;
            END LOOP;
        END $f$""")
    broker = start_broker(o, mosq)
    t = f"{topic}/loop"
    o.execute("SELECT mqtt_subscribe(%s, 1, handler => 'on_msg(mqtt_message_history)')", (t,))
    wait_for(lambda: mosq.subscribed(client_id(o, broker), t), message="subscribed")
    stuck = worker_pid(pg, db)
    mosquitto_pub(mosq.port, t, "hello", qos=1)
    with pg.connect() as admin:
        wait_for(lambda: admin.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                                       (stuck,)).fetchone()[0] == "PgSleep", message="the handler running")
    o.execute(f"""CREATE OR REPLACE FUNCTION on_msg(m {MSG}) RETURNS void LANGUAGE sql AS
                  $f$ INSERT INTO public.seen VALUES (pg_catalog.convert_from(m.payload, 'UTF8')) $f$""")
    with pg.connect() as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (stuck,)).fetchone()[0]
        t0 = time.monotonic()
        wait_for(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                       (stuck,)).fetchone()[0] == 0, timeout=10, message="the stuck worker gone")
        assert time.monotonic() - t0 < 5
    wait_for(lambda: o.execute("SELECT count(*) FROM seen").fetchone()[0] >= 1, timeout=60,
             message="the message routed by the next worker")
    assert o.execute("SELECT body FROM seen").fetchall() == [("hello",)]
    assert o.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s", (t,)).fetchone()[0] == 1


# ---- row-change messages outside the executor's end ---------------------------------------

@pytest.fixture
def watched(pg, odoo, mosq, topic):  # noqa: F811
    db, owner, connect = odoo
    o = connect()
    start_broker(o, mosq)
    o.execute("CREATE TABLE w (id int PRIMARY KEY, v text)")
    o.execute("SELECT mqtt_watch_table('w', %s, 1)", (f"{topic}/w/{{op}}/{{id}}",))
    return o, connect


def ops(sub, n):
    got = [(m[0].rsplit("/", 2)[1], json.loads(m[1])["new"] or json.loads(m[1])["old"]) for m in sub.wait_count(n)]
    return sorted(got, key=lambda x: x[1]["id"])


def test_copy_into_a_watched_table_publishes(watched, mosq, topic):
    o, connect = watched
    with mqtt_sub(mosq.port, f"{topic}/w/#") as sub:
        with o.cursor().copy("COPY w FROM STDIN") as cp:  # autocommit: COPY is its own transaction
            cp.write_row((1, "a"))
            cp.write_row((2, "b/c"))
        with o.transaction():
            with o.cursor().copy("COPY w FROM STDIN") as cp:
                cp.write_row((3, "d"))
            # in the outbox at the end of the COPY, as after any other statement
            assert o.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] >= 1
        assert ops(sub, 3) == [("insert", {"id": i, "v": v}) for i, v in ((1, "a"), (2, "b/c"), (3, "d"))]
    # a delivery is recorded once the broker's acknowledgement is back, which may be after the
    # subscriber has the message
    wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send'").fetchone()[0] == 3,
             message="3 deliveries recorded")


def test_deferred_publish_trigger_and_cursors_at_commit(watched, mosq, topic):
    o, connect = watched
    o.execute("CREATE TABLE d (id int PRIMARY KEY)")
    o.execute("CREATE CONSTRAINT TRIGGER d_mqtt AFTER INSERT ON d DEFERRABLE INITIALLY DEFERRED "
              "FOR EACH ROW EXECUTE FUNCTION mqtt_publish_trigger(%s, '1')" % psycopg.sql.quote(f"{topic}/d/{{id}}"))
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        with o.transaction():
            o.execute("INSERT INTO d VALUES (8)")   # fires at COMMIT
        with o.transaction():
            o.execute("INSERT INTO w VALUES (10, 'x')")
            o.execute("DECLARE c CURSOR FOR SELECT 1")  # closed at commit, after the flush point
        with o.transaction():
            o.execute("INSERT INTO d VALUES (9)")
            o.execute("SET CONSTRAINTS ALL IMMEDIATE")
            o.execute("SELECT 1")
        got = sorted(m[0].split("/", 2)[2] for m in sub.wait_count(3))
    assert got == ["d/8", "d/9", "w/insert/10"]


def test_prepared_transaction_publishes_only_when_committed(watched, mosq, topic, pg):
    o, connect = watched
    with mqtt_sub(mosq.port, f"{topic}/w/#") as sub:
        gid1, gid2 = unique("g"), unique("g")
        o.execute("BEGIN")
        o.execute("INSERT INTO w VALUES (20, 'rolled back')")
        o.execute(f"PREPARE TRANSACTION '{gid1}'")
        o.execute("BEGIN")
        o.execute("INSERT INTO w VALUES (21, 'committed')")
        o.execute(f"PREPARE TRANSACTION '{gid2}'")
        o.execute(f"ROLLBACK PREPARED '{gid1}'")
        o.execute(f"COMMIT PREPARED '{gid2}'")
        o.execute("INSERT INTO w VALUES (22, 'marker')")
        got = [m[0].rsplit("/", 1)[1] for m in sub.wait_count(2)]
    assert sorted(got) == ["21", "22"]


# ---- a rule taken back --------------------------------------------------------------------

def test_a_revoked_rule_ends_the_subscription_and_its_routing(pg, odoo, mosq, topic):  # noqa: F811
    """Rules are checked when a subscription is made and again whenever the worker loads it:
    once the owner takes a role's rule away, that role's subscription is dropped at the broker
    and its handler gets nothing more, not even messages that still arrive through another
    role's subscription."""
    db, owner, connect = odoo
    o = connect()
    dev = connect.new_role("dev")
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, %s, true)",
              (dev, f"{topic}/dev/#"))
    o.execute("CREATE TABLE devlog (body text)")
    o.execute(f'GRANT INSERT ON devlog TO "{dev}"')
    o.execute(f'GRANT CREATE ON SCHEMA public TO "{dev}"')
    broker = start_broker(o, mosq)
    cid = client_id(o, broker)
    d = connect(user=dev)
    # a handler of dev's own: routing runs only functions of its role (or a superuser's)
    d.execute(f"""CREATE FUNCTION dev_h(m {MSG}) RETURNS void LANGUAGE sql AS
                  $f$ INSERT INTO public.devlog VALUES (pg_catalog.convert_from(m.payload, 'UTF8')) $f$""")
    d.execute("SELECT mqtt_subscribe(%s, 1, handler => 'dev_h(mqtt_message_history)')", (f"{topic}/dev/#",))
    o.execute("SELECT mqtt_subscribe(%s, 1)", (f"{topic}/#",))  # the owner's own, plain
    # (On MQTT 5 the broker gets only the covering filter, {topic}/#: see "MQTT 3.1.1 and MQTT 5"
    # in the README; routing still goes by both subscriptions.)
    wait_for(lambda: (PROTOCOL == "5" or mosq.subscribed(cid, f"{topic}/dev/#")) and mosq.subscribed(cid, f"{topic}/#"),
             message="both subscribed")
    mosquitto_pub(mosq.port, f"{topic}/dev/1", "before", qos=1)
    wait_for(lambda: o.execute("SELECT count(*) FROM devlog").fetchone()[0] == 1, message="routed")

    o.execute("DELETE FROM mqtt_access_control WHERE role_name = %s", (dev,))
    # mosquitto logs an UNSUBSCRIBE as "<client id> <filter>" (a SUBSCRIBE has the qos between)
    if PROTOCOL != "5":
        wait_for(lambda: any(line.endswith(f" {cid} {topic}/dev/#") for line in mosq.log_text().splitlines()),
                 timeout=10, message="the revoked subscription unsubscribed at the broker")
    status = wait_for(lambda: o.execute("SELECT mqtt_status(%s)->>'last_error'", (broker,)).fetchone()[0],
                      message="the revoked subscription in the status")
    assert "is not subscribed" in status and dev in status, status
    mosquitto_pub(mosq.port, f"{topic}/dev/2", "after", qos=1)
    wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                               (f"{topic}/dev/2",)).fetchone()[0] == 1,
             message="the message stored through the owner's subscription")
    assert o.execute("SELECT body FROM devlog").fetchall() == [("before",)], \
        "the role whose rule was taken away gets nothing more"
    assert o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0


def set_setting(pg, db, name: str, value: str | None) -> None:
    """ALTER SYSTEM a sighup setting (None: reset) and wait until new sessions see it."""
    with pg.connect(db) as c:
        if value is None:
            c.execute(f"ALTER SYSTEM RESET {name}")
        else:
            c.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(psycopg.sql.SQL(name), psycopg.sql.Literal(value)))
        c.execute("SELECT pg_reload_conf()")

    def seen():
        with pg.connect(db) as c:
            setting, boot, unit = c.execute("SELECT setting, boot_val, unit FROM pg_settings WHERE name = %s",
                                            (name,)).fetchone()
        return setting == boot if value is None else setting != boot
    wait_for(seen, timeout=10, message=f"{name} reloaded")


def test_a_handler_that_swallows_cancels_is_set_aside_after_restarts(pg, odoo, mosq, topic):  # noqa: F811
    """mqtt_pg.route_timeout cancels routing; a handler that catches the cancel and loops is
    stopped at twice the limit by ending the worker (nothing committed, nothing acknowledged).
    The next worker routes those messages one by one, the next after it sets aside the one that
    held it again: the others are stored and handled once, the stream flows on."""
    db, owner, connect = odoo
    o = connect()
    o.execute("CREATE TABLE seen (body text)")
    o.execute(f"""CREATE FUNCTION on_msg(m {MSG}) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
            IF pg_catalog.convert_from(m.payload, 'UTF8') = 'stuck' THEN
                LOOP
                    BEGIN PERFORM pg_catalog.pg_sleep(0.1); EXCEPTION WHEN query_canceled THEN NULL; END;
                END LOOP;
            END IF;
            INSERT INTO public.seen VALUES (pg_catalog.convert_from(m.payload, 'UTF8'));
        END $f$""")
    set_setting(pg, db, "mqtt_pg.route_timeout", "1s")
    try:
        broker = start_broker(o, mosq)
        t = f"{topic}/held"
        o.execute("SELECT mqtt_subscribe(%s, 1, handler => 'on_msg(mqtt_message_history)')", (t,))
        wait_for(lambda: mosq.subscribed(client_id(o, broker), t), message="subscribed")
        first = worker_pid(pg, db)
        mosquitto_pub(mosq.port, t, lines="a\nstuck\nb\n", qos=1)
        wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 1, timeout=90,
                 message="the message that held the worker set aside")
        [(payload, error)] = o.execute("SELECT convert_from(payload, 'UTF8'), error FROM mqtt_dead_letter").fetchall()
        assert payload == "stuck" and "twice mqtt_pg.route_timeout" in error, error
        wait_for(lambda: o.execute("SELECT count(*) FROM seen").fetchone()[0] >= 2, timeout=20, message="a and b")
        assert sorted(o.execute("SELECT body FROM seen").fetchall()) == [("a",), ("b",)]
        assert sorted(r[0] for r in o.execute("SELECT convert_from(payload, 'UTF8') FROM mqtt_message_history "
                                                "WHERE topic = %s", (t,))) == ["a", "b"]
        assert worker_pid(pg, db) not in (None, first)
        mosquitto_pub(mosq.port, t, "c", qos=1)
        wait_for(lambda: o.execute("SELECT 1 FROM seen WHERE body = 'c'").fetchone(), timeout=20, message="c")
    finally:
        set_setting(pg, db, "mqtt_pg.route_timeout", None)


# ---- what the schema's owner could do to another role's routing ---------------------------

@pytest.fixture
def dev_routing(pg, odoo, mosq, topic):  # noqa: F811
    """A role `dev` with a subscribe rule, its own table and handler in public (the owner lets it
    create there), subscribed with that handler; and a secret table only dev can read."""
    db, owner, connect = odoo
    o = connect()
    dev = connect.new_role("dev")
    o.execute(f'GRANT CREATE ON SCHEMA public TO "{dev}"')
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_subscribe) VALUES (%s, %s, true)",
              (dev, f"{topic}/dev/#"))
    broker = start_broker(o, mosq)
    d = connect(user=dev)
    d.execute("CREATE TABLE dev_secret (s text)")
    d.execute("INSERT INTO dev_secret VALUES ('only dev may read this')")
    d.execute("CREATE TABLE dev_log (body text)")
    d.execute(f"""CREATE FUNCTION dev_h(m {MSG}) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN
            IF pg_catalog.convert_from(m.payload, 'UTF8') = 'lock' THEN
                PERFORM pg_catalog.pg_advisory_lock(4242);
                RAISE EXCEPTION 'refused after taking a lock';
            END IF;
            IF pg_catalog.convert_from(m.payload, 'UTF8') = 'boom' THEN RAISE EXCEPTION 'boom'; END IF;
            INSERT INTO dev_log VALUES (pg_catalog.convert_from(m.payload, 'UTF8'));
        END $f$""")
    d.execute("SELECT mqtt_subscribe(%s, 1, handler => 'dev_h(mqtt_message_history)')", (f"{topic}/dev/#",))
    wait_for(lambda: mosq.subscribed(client_id(o, broker), f"{topic}/dev/#"), message="subscribed")
    o.execute("CREATE TABLE loot (s text, who text)")
    o.execute("GRANT INSERT ON loot TO PUBLIC")
    return o, d, dev


def test_a_handler_replaced_by_the_schemas_owner_is_not_run(dev_routing, mosq, topic):
    o, d, dev = dev_routing
    mosquitto_pub(mosq.port, f"{topic}/dev/1", "first", qos=1)
    wait_for(lambda: d.execute("SELECT count(*) FROM dev_log").fetchone()[0] == 1, message="routed")
    # The owner of public drops dev's function and puts one of its own in its place.
    o.execute(f"DROP FUNCTION dev_h({MSG})")
    o.execute(f"""CREATE FUNCTION dev_h(m {MSG}) RETURNS void LANGUAGE sql AS
                  $f$ INSERT INTO public.loot SELECT s, current_user FROM public.dev_secret $f$""")
    mosquitto_pub(mosq.port, f"{topic}/dev/2", "second", qos=1)
    wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 1, message="set aside")
    error = o.execute("SELECT error FROM mqtt_dead_letter").fetchone()[0]
    assert "configure the subscription again" in error, error
    assert o.execute("SELECT count(*) FROM loot").fetchone()[0] == 0, "the owner's function never ran as dev"


def test_requeue_in_the_owners_session_ignores_its_temporary_tables(dev_routing, mosq, topic):
    """mqtt_requeue_dead_letter routes in the caller's session: the handler's unqualified names
    must not find the caller's temporary tables (pg_temp comes last, not first)."""
    o, d, dev = dev_routing
    mosquitto_pub(mosq.port, f"{topic}/dev/1", "boom", qos=1)
    wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 1, message="set aside")
    d.execute(f"""CREATE OR REPLACE FUNCTION dev_h(m {MSG}) RETURNS void LANGUAGE plpgsql AS $f$
        BEGIN INSERT INTO dev_log VALUES (pg_catalog.convert_from(m.payload, 'UTF8')); END $f$""")
    o.execute("""CREATE FUNCTION pg_temp.grab() RETURNS trigger LANGUAGE plpgsql AS
                 $f$ BEGIN INSERT INTO public.loot SELECT s, current_user FROM public.dev_secret; RETURN NULL; END $f$""")
    o.execute("CREATE TEMP TABLE dev_log (body text)")
    o.execute("GRANT ALL ON dev_log TO PUBLIC")
    o.execute("CREATE TRIGGER grab AFTER INSERT ON pg_temp.dev_log FOR EACH ROW EXECUTE FUNCTION pg_temp.grab()")
    dead = o.execute("SELECT id FROM mqtt_dead_letter").fetchone()[0]
    o.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead,))
    assert d.execute("SELECT body FROM dev_log").fetchall() == [("boom",)], "into dev's own table"
    assert o.execute("SELECT count(*) FROM pg_temp.dev_log").fetchone()[0] == 0
    assert o.execute("SELECT count(*) FROM loot").fetchone()[0] == 0


def test_a_handlers_advisory_lock_ends_with_its_routing(dev_routing, mosq, topic, pg):
    o, d, dev = dev_routing
    mosquitto_pub(mosq.port, f"{topic}/dev/1", "lock", qos=1)
    wait_for(lambda: o.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 1, message="set aside")
    mosquitto_pub(mosq.port, f"{topic}/dev/2", "after", qos=1)
    wait_for(lambda: d.execute("SELECT count(*) FROM dev_log").fetchone()[0] == 1, message="the next one routed")
    assert o.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0], \
        "the worker must not keep a lock its handler took"
    o.execute("SELECT pg_advisory_unlock(4242)")


def test_the_extension_needs_a_utf8_database(pg):
    """Topics and text payloads are UTF-8: in a LATIN1 database a row change would have its
    text silently mangled, so CREATE EXTENSION refuses it (0A000) and leaves nothing behind."""
    db = unique("latin1")
    with pg.connect() as admin:
        admin.execute(f"CREATE DATABASE {db} ENCODING 'LATIN1' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        with pg.connect(db) as c:
            with pytest.raises(psycopg.errors.FeatureNotSupported, match="needs a UTF8 database"):
                c.execute("CREATE EXTENSION mqtt_pg")
            assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == 0
            assert c.execute("SELECT to_regclass('mqtt_broker')").fetchone()[0] is None
    finally:
        with pg.connect() as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_row_changes_keep_their_order_beside_publishes_in_exception_blocks(conn, broker, mosq, topic):
    """A common "do not fail my DML" pattern: an AFTER trigger calling mqtt_publish inside an
    exception block. The row-change message of each row still goes out before that row's audit
    message (outbox ids are taken when a message is queued, not when its row is written)."""
    conn.execute("CREATE TABLE ordered (id int PRIMARY KEY)")
    conn.execute("SELECT mqtt_watch_table('ordered', %s, 1, false, %s)", (f"{topic}/row/{{id}}", broker.name))
    conn.execute(f"""CREATE FUNCTION ordered_audit() RETURNS trigger LANGUAGE plpgsql AS $f$
        BEGIN
            BEGIN PERFORM mqtt_publish('{topic}/audit/' || NEW.id, 'audit', 1, false, '{broker.name}');
            EXCEPTION WHEN others THEN RAISE WARNING '%', SQLERRM; END;
            RETURN NULL;
        END $f$""")
    conn.execute("CREATE TRIGGER z_audit AFTER INSERT ON ordered FOR EACH ROW EXECUTE FUNCTION ordered_audit()")
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute("INSERT INTO ordered SELECT generate_series(1, 3)")
        got = [m[0][len(topic) + 1:] for m in sub.wait_count(6)]
    assert got == ["row/1", "audit/1", "row/2", "audit/2", "row/3", "audit/3"], got
