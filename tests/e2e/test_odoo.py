"""mqtt_pg used exactly the way Odoo uses PostgreSQL, through psycopg2 (Odoo's driver).

What Odoo does, and these tests copy (odoo/sql_db.py, odoo/service/model.py):

* it connects as a role that owns its database and is no superuser (here `odoo_...`, with no
  CREATEDB either), in a database where a superuser ran CREATE EXTENSION;
* every request is one REPEATABLE READ transaction (psycopg2 ISOLATION_LEVEL_REPEATABLE_READ,
  autocommit off), committed at the end;
* `cr.savepoint()` is `SAVEPOINT "<uuid1>"`, then on an exception `ROLLBACK TO SAVEPOINT` and in
  every case `RELEASE SAVEPOINT`;
* `retrying()` runs the whole request again, after a rollback, when it fails with a concurrency
  error (40001 serialization failure, 40P01 deadlock, 55P03 lock not available), at most five
  times in all;
* the ORM writes `_auto = False` models with plain INSERT ... RETURNING "id" and UPDATE ... WHERE
  id IN (...), parameters inlined by psycopg2.

The messages are observed by an independent MQTT subscriber. A committed marker published after
what is under test proves that something was not sent without sleeping: one broker connection
delivers a topic's QoS 1 messages in commit order, so anything sent before the marker arrives
before it.
"""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg2
import psycopg2.extensions
import pytest

from harness import HOST, mosquitto_pub, mqtt_sub, unique, wait_for

# odoo.service.model: PG_CONCURRENCY_ERRORS_TO_RETRY and MAX_TRIES_ON_CONCURRENCY_FAILURE
RETRIED = {"40001", "40P01", "55P03"}
MAX_TRIES = 5


class UserError(Exception):
    """Stands in for odoo.exceptions.UserError / ValidationError raised by business code."""


class Savepoint:
    """odoo.sql_db.Savepoint: `with Savepoint(cr):` as `with cr.savepoint():`."""

    def __init__(self, cr):
        self.name = str(uuid.uuid1())
        self._cr = cr
        cr.execute('SAVEPOINT "%s"' % self.name)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._cr.execute('ROLLBACK TO SAVEPOINT "%s"' % self.name)
        self._cr.execute('RELEASE SAVEPOINT "%s"' % self.name)


def odoo_request(cx, func: Callable[[Any, int], Any]) -> tuple[Any, list[str]]:
    """odoo.service.model.retrying: call func(cursor, tryno); on a concurrency error roll back
    and call it again (at most MAX_TRIES calls); commit once it went through. Returns (what func
    returned, the SQLSTATEs of the failed tries). Odoo sleeps a random while between tries;
    nothing here depends on time, so the tests do not."""
    failures: list[str] = []
    for tryno in range(1, MAX_TRIES + 1):
        cr = cx.cursor()
        try:
            result = func(cr, tryno)
            break
        except psycopg2.OperationalError as exc:  # TransactionRollbackError is one
            cx.rollback()
            if exc.pgcode not in RETRIED or tryno == MAX_TRIES:
                raise
            failures.append(exc.pgcode)
        except BaseException:
            cx.rollback()
            raise
        finally:
            cr.close()
    cx.commit()
    return result, failures


def query(cx, sql: str, params: tuple = ()) -> list[tuple]:
    """A read-only request: its rows."""
    def read(cr, _):
        cr.execute(sql, params)
        return cr.fetchall()
    return odoo_request(cx, read)[0]


def execute(cx, sql: str, params: tuple = ()) -> None:
    odoo_request(cx, lambda cr, _: cr.execute(sql, params))


@dataclass
class OdooDb:
    pg: Any
    name: str
    role: str
    opened: list = field(default_factory=list)

    def connect(self):
        """A connection as Odoo's sql_db makes it: the owner role, REPEATABLE READ, no autocommit."""
        cx = psycopg2.connect(host=HOST, port=self.pg.port, dbname=self.name, user=self.role,
                              connect_timeout=10)
        cx.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ)
        self.opened.append(cx)
        return cx


@pytest.fixture
def odoo(pg):
    """A database owned by a NOSUPERUSER NOCREATEDB role, with the extension made by a superuser
    (what an Odoo installation has). Deadlocks are detected after 200 ms instead of 1 s (set by
    the superuser for the role), to keep the deadlock test short."""
    role, db = unique("odoo"), unique("odoodb")
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
        admin.execute(f'ALTER ROLE "{role}" SET deadlock_timeout = \'200ms\'')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{role}"')
    with pg.connect(db) as su:
        su.execute("CREATE EXTENSION mqtt_pg")
    o = OdooDb(pg, db, role)
    yield o
    for cx in o.opened:
        cx.close()
    with pg.connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def wait_connected(cx, broker: str) -> dict:
    def connected():
        [(status,)] = query(cx, "SELECT mqtt_status(%s)", (broker,))
        return status if status["status"] == "connected" else False
    return wait_for(connected, message=f"mqtt_status({broker!r}) connected")


def create_broker(cx, mosq) -> tuple[int, str]:
    """What model mqtt.broker (_auto = False) sends for create() and then write({'active': True})."""
    name = unique("odoo")

    def create(cr, _):
        cr.execute('INSERT INTO "mqtt_broker" ("host", "is_default", "name", "port") '
                   'VALUES (%s, %s, %s, %s) RETURNING "id"', (HOST, True, name, mosq.port))
        return cr.fetchone()[0]

    broker_id, _ = odoo_request(cx, create)
    execute(cx, 'UPDATE "mqtt_broker" SET "active" = %s WHERE id IN %s', (True, (broker_id,)))
    return broker_id, name


@pytest.fixture
def odoo_broker(odoo, mosq):
    """The database's default broker on the shared mosquitto, made and started through the ORM's
    statements, connected. Yields (connection, broker id, broker name)."""
    cx = odoo.connect()
    broker_id, name = create_broker(cx, mosq)
    wait_connected(cx, name)
    yield cx, broker_id, name
    try:
        execute(cx, 'UPDATE "mqtt_broker" SET "active" = %s WHERE id IN %s', (False, (broker_id,)))
    except psycopg2.Error:
        pass


def make_sale_order(cx) -> None:
    """A business table of the owner's, as the ORM creates it for sale.order (simplified)."""
    execute(cx, "CREATE TABLE sale_order (id serial PRIMARY KEY, name varchar NOT NULL, state varchar, "
                "amount_total numeric, write_date timestamp)")
    execute(cx, "INSERT INTO sale_order (name, state, amount_total) VALUES ('S00001', 'draft', 100)")


def publish(cr, topic: str, payload: str) -> None:
    cr.execute("SELECT mqtt_publish(%s, %s, 1)", (topic, payload))


def sent(cx, topic: str) -> list[str]:
    """Payloads of the history's 'send' rows for a topic, oldest first."""
    return [r[0] for r in query(cx, "SELECT payload_text FROM mqtt_message_history_text "
                                    "WHERE direction = 'send' AND topic = %s ORDER BY id", (topic,))]


def settle(cx, sub, topic: str) -> tuple[list[bytes], list[str]]:
    """Publish a marker on `topic` in a request of its own; wait until it reached the subscriber
    and, with nothing left in the outbox for the topic, the history. Returns (payloads the
    subscriber got, payloads of the history's send rows), marker last in both."""
    execute(cx, "SELECT mqtt_publish(%s, 'marker', 1)", (topic,))
    wait_for(lambda: b"marker" in sub.payloads(), message="the marker at the subscriber")
    wait_for(lambda: "marker" in sent(cx, topic)
             and not query(cx, "SELECT 1 FROM mqtt_outbox WHERE topic = %s", (topic,)),
             message="the marker in the history and an empty outbox")
    return [p for t, p, *_ in list(sub.messages) if t == topic], sent(cx, topic)


# ---- 1a: savepoints ---------------------------------------------------------------------------

def test_publish_in_a_rolled_back_savepoint_is_never_sent(odoo_broker, mosq, topic):
    cx, _, _ = odoo_broker
    t = f"{topic}/order"
    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        def request(cr, tryno):
            cr.execute("SHOW transaction_isolation")
            assert cr.fetchone() == ("repeatable read",)
            publish(cr, t, "before")
            # business code raising inside `with cr.savepoint():`, caught by its caller
            with pytest.raises(UserError):
                with Savepoint(cr):
                    publish(cr, t, "savepoint-user-error")
                    raise UserError("Nothing to ship")
            # a statement failing inside a savepoint (Odoo's IntegrityError-and-go-on pattern),
            # after a nested savepoint that was released
            with pytest.raises(psycopg2.errors.DivisionByZero):
                with Savepoint(cr):
                    with Savepoint(cr):
                        publish(cr, t, "savepoint-nested")
                    publish(cr, t, "savepoint-sql-error")
                    cr.execute("SELECT 1 / 0")
            with Savepoint(cr):  # a savepoint that goes through keeps its message
                publish(cr, t, "savepoint-released")
            publish(cr, t, "after")
            cr.execute("SELECT convert_from(payload, 'UTF8') FROM mqtt_outbox WHERE topic = %s ORDER BY id", (t,))
            return [r[0] for r in cr.fetchall()]

        in_tx, failures = odoo_request(cx, request)
        assert failures == []
        assert in_tx == ["before", "savepoint-released", "after"]
        got, history = settle(cx, sub, t)
    assert got == [b"before", b"savepoint-released", b"after", b"marker"]
    assert history == ["before", "savepoint-released", "after", "marker"]


# ---- 1b: a request retried after serialization failures ---------------------------------------

def test_request_retried_after_two_serialization_failures_publishes_once(odoo, odoo_broker, mosq, topic):
    cx, _, _ = odoo_broker
    other = odoo.connect()  # another Odoo worker, confirming payments on the same order
    make_sale_order(cx)
    t = f"{topic}/sale/S00001/confirmed"
    interfered = []

    def confirm(cr, tryno):
        cr.execute("SELECT state FROM sale_order WHERE name = 'S00001'")  # the snapshot is taken
        assert cr.fetchone() == ("draft",)
        publish(cr, t, f"confirmed, try {tryno}")
        if len(interfered) < 2:
            # a concurrent request commits a change of the same row after our snapshot
            execute(other, "UPDATE sale_order SET amount_total = amount_total + 1 WHERE name = 'S00001'")
            interfered.append(tryno)
        cr.execute("UPDATE sale_order SET state = 'sale' WHERE name = 'S00001'")
        return tryno

    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        tryno, failures = odoo_request(cx, confirm)
        assert (tryno, failures) == (3, ["40001", "40001"])
        got, history = settle(cx, sub, t)
    assert got == [b"confirmed, try 3", b"marker"]
    assert history == ["confirmed, try 3", "marker"]
    assert query(cx, "SELECT state, amount_total FROM sale_order") == [("sale", 102)]


# ---- 1c: two conflicting requests ---------------------------------------------------------------

def backend_waits_on_lock(cx, pid: int) -> bool:
    return query(cx, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)) == [("Lock",)]


def test_conflicting_requests_only_the_winner_and_the_retried_loser_publish(odoo, odoo_broker, mosq, topic):
    cx, _, _ = odoo_broker
    make_sale_order(cx)
    a, b, watcher = odoo.connect(), odoo.connect(), odoo.connect()
    t = f"{topic}/sale/S00001"
    snapshots = threading.Barrier(2, timeout=20)
    a_updated = threading.Event()

    def request(who, cx_):
        def run(cr, tryno):
            cr.execute("SELECT amount_total FROM sale_order WHERE name = 'S00001'")
            publish(cr, t, f"{who} try {tryno}")
            if tryno == 1:
                snapshots.wait()  # both have their snapshot and their message queued
            if who == "B" and tryno == 1:
                assert a_updated.wait(20)
            cr.execute("UPDATE sale_order SET amount_total = amount_total + 10, state = %s "
                       "WHERE name = 'S00001'", (who,))
            if who == "A":
                a_updated.set()
                # commit only once B waits for A's row lock: a real conflict
                wait_for(lambda: backend_waits_on_lock(watcher, b.get_backend_pid()),
                         message="request B waiting for A's row lock")
            return tryno
        return odoo_request(cx_, run)

    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        with ThreadPoolExecutor(2) as pool:
            fa, fb = pool.submit(request, "A", a), pool.submit(request, "B", b)
            assert fa.result(timeout=60) == (1, [])
            assert fb.result(timeout=60) == (2, ["40001"])
        got, history = settle(cx, sub, t)
    assert got == [b"A try 1", b"B try 2", b"marker"]
    assert history == ["A try 1", "B try 2", "marker"]
    assert query(cx, "SELECT state, amount_total FROM sale_order") == [("B", 120)]


def test_deadlocked_request_retries_and_publishes_once(odoo, odoo_broker, mosq, topic):
    """The same with a deadlock (40P01): two requests update two orders in opposite order."""
    cx, _, _ = odoo_broker
    make_sale_order(cx)
    execute(cx, "INSERT INTO sale_order (name, state, amount_total) VALUES ('S00002', 'draft', 200)")
    a, b = odoo.connect(), odoo.connect()
    t = f"{topic}/sale/batch"
    first_rows = threading.Barrier(2, timeout=20)

    def request(who, cx_, order):
        def run(cr, tryno):
            publish(cr, t, f"{who} try {tryno}")
            cr.execute("UPDATE sale_order SET state = %s WHERE name = %s", (who, order[0]))
            if tryno == 1:
                first_rows.wait()  # each holds one row; now each wants the other's
            cr.execute("UPDATE sale_order SET state = %s WHERE name = %s", (who, order[1]))
            return tryno
        return odoo_request(cx_, run)

    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(request, "A", a, ("S00001", "S00002"))
            fb = pool.submit(request, "B", b, ("S00002", "S00001"))
            results = {"A": fa.result(timeout=60), "B": fb.result(timeout=60)}
        [loser] = [w for w, (_, failures) in results.items() if failures]
        [winner] = [w for w in results if w != loser]
        assert results[winner] == (1, [])
        # the loser's second try may start before the winner committed and then fail once more
        # with 40001 when it reaches a row the winner changed
        last, failures = results[loser]
        assert failures[0] == "40P01" and set(failures) <= RETRIED and last == len(failures) + 1
        got, history = settle(cx, sub, t)
    assert got == [f"{winner} try 1".encode(), f"{loser} try {last}".encode(), b"marker"]
    assert history == [f"{winner} try 1", f"{loser} try {last}", "marker"]
    assert query(cx, "SELECT DISTINCT state FROM sale_order") == [(loser,)]


# ---- 1d: configuration, publishing, history and triggers as the owner -------------------------

def test_owner_configures_publishes_and_reads_like_auto_false_models(odoo, mosq, topic):
    cx = odoo.connect()
    broker_id, name = create_broker(cx, mosq)  # INSERT ... RETURNING "id"; UPDATE ... SET "active"

    def create_topic(cr, _):
        cr.execute('INSERT INTO "mqtt_topic" ("broker_id", "name", "qos", "subscribe") '
                   'VALUES (%s, %s, %s, %s) RETURNING "id"', (broker_id, f"{topic}/in/#", 1, True))
        return cr.fetchone()[0]

    topic_id, _ = odoo_request(cx, create_topic)
    status = wait_connected(cx, name)
    assert (status["broker"], status["active"]) == (name, True)
    assert query(cx, 'SELECT "name", "subscribe", "active", "owner_role" FROM "mqtt_topic" WHERE id IN %s',
                 ((topic_id,),)) == [(f"{topic}/in/#", True, True, odoo.role)]

    # received: what a device publishes becomes a history row the owner reads
    def stored(payload):
        rows = query(cx, "SELECT topic, payload_text, qos, direction, broker_id FROM mqtt_message_history_text "
                         "WHERE direction = 'receive' AND payload_text = %s", (payload,))
        return rows

    def ingested():
        # repeat until the subscription made at the commit is live at the broker
        p = unique("reading")
        mosquitto_pub(mosq.port, f"{topic}/in/scale1", p, qos=1)
        return wait_for(lambda: stored(p), timeout=0.5, message="a received row")

    [row] = wait_for(ingested, interval=0, message="a message from mosquitto_pub in the history")
    assert (row[0], row[2], row[3], row[4]) == (f"{topic}/in/scale1", 1, "receive", broker_id)

    # sent: a model method's publish, seen by a subscriber and in the history
    with mqtt_sub(mosq.port, f"{topic}/out/#", qos=1) as sub:
        def action(cr, _):
            cr.execute("SELECT mqtt_publish(%s, %s, 1)", (f"{topic}/out/picking", '{"id": 7}'))
            return cr.fetchone()[0]
        outbox_id, _ = odoo_request(cx, action)
        assert isinstance(outbox_id, int)
        assert sub.wait_count(1) == [(f"{topic}/out/picking", b'{"id": 7}', 1, False)]
    wait_for(lambda: sent(cx, f"{topic}/out/picking") == ['{"id": 7}'], message="the send row in the history")
    [(qos, msg_broker, ts)] = query(cx, 'SELECT qos, broker_id, "timestamp" FROM mqtt_message_history '
                                        "WHERE direction = 'send' AND topic = %s", (f"{topic}/out/picking",))
    assert (qos, msg_broker) == (1, broker_id) and ts is not None

    # stopping through the ORM (write({'active': False}))
    execute(cx, 'UPDATE "mqtt_broker" SET "active" = %s WHERE id IN %s', (False, (broker_id,)))
    wait_for(lambda: query(cx, "SELECT mqtt_status(%s)->>'status'", (name,)) == [("stopped",)],
             message="status stopped")


def test_owner_watches_a_business_table_it_owns(odoo, odoo_broker, mosq, topic):
    cx, _, _ = odoo_broker
    execute(cx, "CREATE TABLE sale_order (id serial PRIMARY KEY, name varchar NOT NULL, state varchar, "
                "amount_total numeric, write_date timestamp)")
    [(trigger,)] = query(cx, "SELECT mqtt_watch_table(%s, %s, 1)", ("sale_order", f"{topic}/sale/{{state}}/{{name}}"))
    assert trigger == "mqtt_watch"

    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        def create(cr, _):  # sale.order.create({...})
            cr.execute('INSERT INTO "sale_order" ("amount_total", "name", "state", "write_date") '
                       'VALUES (%s, %s, %s, %s) RETURNING "id"', (120.5, "S00042", "draft", "2024-05-01 10:00:00"))
            return cr.fetchone()[0]
        order_id, _ = odoo_request(cx, create)
        # order.action_confirm() -> write({'state': 'sale'})
        execute(cx, 'UPDATE "sale_order" SET "state" = %s, "write_date" = %s WHERE id IN %s',
                ("sale", "2024-05-01 10:05:00", (order_id,)))
        got = sub.wait_count(2)
    assert [(m[0], m[2]) for m in got] == [(f"{topic}/sale/draft/S00042", 1), (f"{topic}/sale/sale/S00042", 1)]
    inserted, updated = (json.loads(m[1]) for m in got)
    row = {"id": order_id, "name": "S00042", "state": "draft", "amount_total": 120.5,
           "write_date": "2024-05-01T10:00:00"}
    assert inserted == {"op": "insert", "schema": "public", "table": "sale_order", "new": row, "old": None}
    assert updated == {"op": "update", "schema": "public", "table": "sale_order",
                       "new": {**row, "state": "sale", "write_date": "2024-05-01T10:05:00"}, "old": row}
    wait_for(lambda: len(sent(cx, f"{topic}/sale/sale/S00042")) == 1, message="the update's send row")


def test_subscription_written_through_the_orm_routes_to_a_handler_making_records(odoo_broker, mosq, topic):
    """mqtt.topic.create({... 'handler': ...}) of an _auto = False model: the row is checked and
    routed like one made by mqtt_subscribe; the handler writes a record of an ordinary model."""
    cx, broker_id, name = odoo_broker
    execute(cx, "CREATE TABLE plant_scale_reading (id serial PRIMARY KEY, scale varchar NOT NULL, "
                "weight_kg float8, received_at timestamp, create_date timestamp, write_date timestamp)")
    execute(cx, """
        CREATE FUNCTION plant_scale_reading_from_mqtt(msg mqtt_message_history) RETURNS void
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO plant_scale_reading (scale, weight_kg, received_at, create_date, write_date)
            VALUES (split_part(msg.topic, '/', 4), (mqtt_payload_text(msg.payload)::jsonb ->> 'kg')::float8,
                    msg."timestamp" AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC');
        END $$""")
    handler = "plant_scale_reading_from_mqtt(mqtt_message_history)"
    flt = f"{topic}/scale/{{scale}}/weight"

    def create(cr, _):
        cr.execute('INSERT INTO "mqtt_topic" ("active", "broker_id", "handler", "name", "qos", "subscribe") '
                   'VALUES (%s, %s, %s, %s, %s, %s) RETURNING "id"', (True, broker_id, handler, flt, 1, True))
        return cr.fetchone()[0]

    topic_id, _ = odoo_request(cx, create)
    assert query(cx, "SELECT handler::regprocedure = %s::regprocedure, owner_role = current_user "
                     'FROM "mqtt_topic" WHERE id IN %s', (handler, (topic_id,))) == [(True, True)]
    # a handler that is not f(mqtt_message_history) RETURNS void is refused, and nothing is stored
    with pytest.raises(psycopg2.errors.InvalidParameterValue):
        execute(cx, 'UPDATE "mqtt_topic" SET "handler" = %s WHERE id IN %s', ("now()", (topic_id,)))
    assert query(cx, 'SELECT handler::regprocedure = %s::regprocedure FROM "mqtt_topic" WHERE id IN %s',
                 (handler, (topic_id,))) == [(True,)]

    [(client_id,)] = query(cx, "SELECT mqtt_status(%s)->>'client_id'", (name,))
    mosq.wait_subscribed(client_id, f"{topic}/scale/+/weight")
    mosquitto_pub(mosq.port, f"{topic}/scale/S7/weight", '{"kg": 3.25}', qos=1)
    [(scale, kg, received_at)] = wait_for(
        lambda: query(cx, "SELECT scale, weight_kg, received_at FROM plant_scale_reading"),
        message="the record made by the handler")
    assert (scale, kg) == ("S7", 3.25) and received_at.tzinfo is None
    assert query(cx, "SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                 (f"{topic}/scale/S7/weight",)) == [(1,)]
