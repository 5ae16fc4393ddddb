"""The publish path of issue 9: mqtt_publish queues its message in backend memory and the rows of
a statement reach mqtt_outbox in one INSERT (at the end of the statement, before the next one
starts, after utility statements, at pre-commit / PREPARE); the outbox has no foreign key to
mqtt_broker any more (the publisher locks the broker row FOR KEY SHARE, a trigger deletes a
deleted broker's rows, the worker sets aside rows of brokers that do not exist); the broker is
looked up once per statement; a transaction that commits late tells the worker its lowest id."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from psycopg import sql

from harness import HOST, mqtt_sub, unique, wait_for, wait_status

ORPHAN_ID = 999_999


# ---- helpers --------------------------------------------------------------------------------

def outbox(conn, topic) -> list[tuple[int, int, str]]:
    """(id, broker_id, payload as text) of the outbox rows for one topic, by id."""
    return [tuple(r) for r in conn.execute(
        "SELECT id, broker_id, convert_from(payload, 'UTF8') FROM mqtt_outbox WHERE topic = %s ORDER BY id",
        (topic,))]


def count(conn, query, *args) -> int:
    return conn.execute(query, args or None).fetchone()[0]


def sends(conn, topic, broker_id=None) -> int:
    return count(conn, "SELECT count(*) FROM mqtt_message_history WHERE topic = %s AND direction = 'send' "
                       "AND (%s::int IS NULL OR broker_id = %s)", topic, broker_id, broker_id)


def dead_letters(conn, topic) -> list[tuple]:
    return [tuple(r) for r in conn.execute(
        "SELECT broker_id, convert_from(payload, 'UTF8'), direction, error FROM mqtt_dead_letter "
        "WHERE topic = %s ORDER BY id", (topic,))]


def publish(conn, topic, payload, broker, qos=1) -> int:
    return conn.execute("SELECT mqtt_publish(%s, %s::text, %s, false, %s)",
                        (topic, payload, qos, broker)).fetchone()[0]


def wait_outbox_empty(conn, topic, timeout=60):
    wait_for(lambda: not outbox(conn, topic), timeout=timeout, message=f"mqtt_outbox rows for {topic} to leave")


def wait_lock_wait(conn, pid, timeout=20):
    """Wait until backend `pid` waits for a heavyweight lock (pg_stat_activity)."""
    wait_for(lambda: count(conn, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                                 "AND wait_event_type = 'Lock'", pid) == 1,
             timeout=timeout, message=f"backend {pid} to wait for a lock")


def backend_pid(c) -> int:
    return c.execute("SELECT pg_backend_pid()").fetchone()[0]


class InThread:
    """Run fn() on a thread; join() returns self with .result or .error set."""

    def __init__(self, fn):
        self.result = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._t.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        self.finished_at = time.monotonic()

    def done(self) -> bool:
        return not self._t.is_alive()

    def join(self, timeout=30) -> "InThread":
        self._t.join(timeout)
        assert not self._t.is_alive(), f"the statement on the thread did not finish within {timeout}s"
        return self


def end_transaction(c):
    """Roll back whatever `c` still has open (cleanup: a blocked peer must not stay blocked)."""
    try:
        c.rollback()
    except psycopg.Error:
        pass


class OwnedDb:
    """A database owned by a non-superuser role, with the extension made by a superuser (as an
    Odoo installation has it)."""

    def __init__(self, pg):
        self.pg = pg
        self.owner = unique("owner")
        self.db = unique("owndb")
        self.roles = [self.owner]
        self.opened: list[psycopg.Connection] = []
        with pg.connect() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(self.owner)))
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(self.db),
                                                                        sql.Identifier(self.owner)))
        with pg.connect(self.db) as su:
            su.execute("CREATE EXTENSION mqtt_pg")

    def connect(self, user: str | None = None, autocommit: bool = True) -> psycopg.Connection:
        """As `user` (default: the owner); user='postgres' is the superuser."""
        c = psycopg.connect(host=HOST, port=self.pg.port, dbname=self.db, user=user or self.owner,
                            autocommit=autocommit, connect_timeout=10)
        self.opened.append(c)
        return c

    def su(self) -> psycopg.Connection:
        return self.connect("postgres")

    def new_role(self, prefix: str) -> str:
        r = unique(prefix)
        with self.pg.connect() as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER").format(sql.Identifier(r)))
        self.roles.append(r)
        return r

    def destroy(self):
        for c in self.opened:
            c.close()
        with self.pg.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.db)))
            for r in reversed(self.roles):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(r)))


@pytest.fixture
def owned_db(pg):
    d = OwnedDb(pg)
    yield d
    d.destroy()


# ---- 1. rows are queued in memory and written at the end of the statement -------------------

def test_a_perform_row_is_in_the_outbox_for_the_next_query_of_the_function(conn, broker, mosq, topic):
    """PERFORM mqtt_publish(...) in a function: the function's next query sees the row; the id
    mqtt_publish returns (SELECT ... INTO) is the row's id."""
    t = f"{topic}/perform"
    conn.execute("""
        CREATE FUNCTION pg_temp.perform_then_look(t text, b text,
            OUT after_perform bigint, OUT returned bigint, OUT row_id bigint, OUT total bigint)
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM mqtt_publish(t, 'a', 1, false, b);
            SELECT count(*) INTO after_perform FROM mqtt_outbox o WHERE o.topic = t;
            SELECT mqtt_publish(t, 'b', 1, false, b) INTO returned;
            SELECT o.id INTO row_id FROM mqtt_outbox o WHERE o.topic = t AND o.payload = convert_to('b', 'UTF8');
            SELECT count(*) INTO total FROM mqtt_outbox o WHERE o.topic = t;
        END $$""")
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            after_perform, returned, row_id, total = conn.execute(
                "SELECT * FROM pg_temp.perform_then_look(%s, %s)", (t, broker.name)).fetchone()
            assert after_perform == 1, "the PERFORMed message was not in mqtt_outbox for the function's next query"
            assert (returned, total) == (row_id, 2), (returned, row_id, total)
            assert [r[0] for r in outbox(conn, t)][-1] == returned
        assert [m[1] for m in sub.wait_count(2)] == [b"a", b"b"]
    wait_outbox_empty(conn, t)


def test_a_row_published_by_a_plain_expression_is_in_the_outbox_for_the_next_query(conn, broker, mosq, topic):
    """PL/pgSQL evaluates a simple expression (an assignment, an IF condition) without an
    executor; PERFORM is not one, it runs a query. The ExecutorStart hook must write such a row
    before the function's next query runs, so that query sees it."""
    t = f"{topic}/expression"
    conn.execute("""
        CREATE FUNCTION pg_temp.assign_then_look(t text, b text,
            OUT assigned bigint, OUT row_id bigint, OUT after_if bigint, OUT later bigint)
        LANGUAGE plpgsql AS $$
        BEGIN
            assigned := mqtt_publish(t, 'a', 1, false, b);
            SELECT o.id INTO row_id FROM mqtt_outbox o WHERE o.topic = t AND o.payload = convert_to('a', 'UTF8');
            IF mqtt_publish(t, 'b', 1, false, b) > 0 THEN
                SELECT count(*) INTO after_if FROM mqtt_outbox o WHERE o.topic = t;
            END IF;
            SELECT count(*) INTO later FROM mqtt_outbox o WHERE o.topic = t;
        END $$""")
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            assigned, row_id, after_if, later = conn.execute(
                "SELECT * FROM pg_temp.assign_then_look(%s, %s)", (t, broker.name)).fetchone()
            assert later == 2
            assert (row_id, after_if) == (assigned, 2), \
                f"the next query did not see the row: row id {row_id} for id {assigned}; {after_if} rows after the IF"
        assert [m[1] for m in sub.wait_count(2)] == [b"a", b"b"]
    wait_outbox_empty(conn, t)


def test_bulk_publish_of_20000_in_one_statement(conn, broker, mosq, topic):
    """One statement queues 20,000 messages (the buffer is written out mid-statement as well as
    at its end): strictly increasing ids, each the id of its row, delivered once each, in order."""
    t = f"{topic}/bulk"
    n = 20_000
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        with conn.transaction():
            ids = [r[0] for r in conn.execute(
                "SELECT mqtt_publish(%s, i::text, 1, false, %s) FROM generate_series(1, %s) i",
                (t, broker.name, n))]
            assert len(ids) == n
            assert all(a < b for a, b in zip(ids, ids[1:])), "ids are not strictly increasing"
            rows = outbox(conn, t)
            assert [(r[0], r[2]) for r in rows] == [(id_, str(i)) for i, id_ in enumerate(ids, 1)]
            assert {r[1] for r in rows} == {broker.id}
        sub.wait_count(n, timeout=180)
        # Anything sent twice would arrive before a later message on the same topic.
        publish(conn, t, "marker", broker.name)
        got = sub.wait_count(n + 1, timeout=60)
        assert len(got) == n + 1
        assert [m[1] for m in got] == [str(i).encode() for i in range(1, n + 1)] + [b"marker"]
        assert {m[2] for m in got} == {1}
    wait_for(lambda: sends(conn, t) >= n + 1, timeout=120, message=f"{n + 1} send rows in history")
    assert sends(conn, t) == n + 1
    assert count(conn, "SELECT count(DISTINCT payload) FROM mqtt_message_history WHERE topic = %s "
                       "AND direction = 'send'", t) == n + 1
    wait_outbox_empty(conn, t)


def test_rollback_to_savepoint_drops_a_bulk_publish(connect, broker, mosq, topic):
    t = f"{topic}/savepoint"
    tx = connect(autocommit=False)
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        try:
            publish(tx, t, "keep", broker.name)
            tx.execute("SAVEPOINT s")
            tx.execute("SELECT mqtt_publish(%s, 'rolled-back-' || i, 1, false, %s) FROM generate_series(1, 100) i",
                       (t, broker.name))
            assert len(outbox(tx, t)) == 101
            tx.execute("ROLLBACK TO SAVEPOINT s")
            assert [r[2] for r in outbox(tx, t)] == ["keep"]
            publish(tx, t, "after", broker.name)
            tx.commit()
        finally:
            end_transaction(tx)
        publish(tx, t, "marker", broker.name)
        tx.commit()
        sub.wait_count(3)
        assert sub.payloads() == [b"keep", b"after", b"marker"]
    wait_outbox_empty(tx, t)


def test_an_exception_block_drops_what_it_published(conn, broker, mosq, topic):
    """Caught errors roll back their subtransaction's messages: those still queued in memory
    (assignments in a loop, no query in between) and those already written by a statement."""
    t = f"{topic}/exception"
    conn.execute("""
        CREATE FUNCTION pg_temp.publish_and_fail(t text, b text, OUT inside bigint, OUT final bigint)
        LANGUAGE plpgsql AS $$
        DECLARE n bigint; x bigint;
        BEGIN
            PERFORM mqtt_publish(t, 'before', 1, false, b);
            SELECT count(*) INTO n FROM mqtt_outbox o WHERE o.topic = t;
            BEGIN
                FOR i IN 1..50 LOOP
                    x := mqtt_publish(t, 'queued-' || i, 1, false, b);
                END LOOP;
                RAISE EXCEPTION 'undo the queued ones';
            EXCEPTION WHEN raise_exception THEN
                NULL;
            END;
            BEGIN
                PERFORM mqtt_publish(t, 'written-' || i, 1, false, b) FROM generate_series(1, 50) i;
                SELECT count(*) INTO inside FROM mqtt_outbox o WHERE o.topic = t;
                RAISE EXCEPTION 'undo the written ones';
            EXCEPTION WHEN raise_exception THEN
                NULL;
            END;
            PERFORM mqtt_publish(t, 'after', 1, false, b);
            SELECT count(*) INTO final FROM mqtt_outbox o WHERE o.topic = t;
        END $$""")
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        inside, final = conn.execute("SELECT * FROM pg_temp.publish_and_fail(%s, %s)", (t, broker.name)).fetchone()
        # inside the second block: 'before' and its 50 (the first block's 50 never got there)
        assert inside == 51, inside
        assert final == 2, final
        publish(conn, t, "marker", broker.name)
        sub.wait_count(3)
        assert sub.payloads() == [b"before", b"after", b"marker"]
    wait_for(lambda: sends(conn, t) >= 3, message="3 send rows")
    assert sends(conn, t) == 3
    wait_outbox_empty(conn, t)


def test_a_procedure_commits_and_rolls_back_its_queued_messages(conn, broker, mosq, topic):
    """COMMIT inside a procedure writes what is still queued in memory (an assignment runs no
    query, so only the pre-commit callback writes it); ROLLBACK drops it."""
    t = f"{topic}/procedure"
    conn.execute("""
        CREATE PROCEDURE pg_temp.publish_commit_rollback(t text, b text) LANGUAGE plpgsql AS $$
        DECLARE x bigint;
        BEGIN
            x := mqtt_publish(t, 'committed', 1, false, b);
            COMMIT;
            x := mqtt_publish(t, 'rolled-back', 1, false, b);
            ROLLBACK;
            x := mqtt_publish(t, 'last', 1, false, b);
        END $$""")
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        conn.execute("CALL pg_temp.publish_commit_rollback(%s, %s)", (t, broker.name))
        publish(conn, t, "marker", broker.name)
        sub.wait_count(3)
        assert sub.payloads() == [b"committed", b"last", b"marker"]
    wait_outbox_empty(conn, t)


def test_prepared_transactions(conn, connect, broker, mosq, topic):
    """PREPARE TRANSACTION keeps the messages (written before it); COMMIT PREPARED sends them
    (found by the worker's poll), ROLLBACK PREPARED drops them."""
    t = f"{topic}/prepared"
    gids = [unique("gid"), unique("gid")]
    other = connect()
    try:
        with mqtt_sub(mosq.port, t, qos=1) as sub:
            for gid, payload in zip(gids, ("prepared-commit", "prepared-rollback")):
                conn.execute("BEGIN")
                conn.execute("SELECT mqtt_publish(%s, %s || '-' || i, 1, false, %s) FROM generate_series(1, 2) i",
                             (t, payload, broker.name))
                conn.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
            other.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gids[1])))
            other.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gids[0])))
            sub.wait_count(2, timeout=20)
            publish(conn, t, "marker", broker.name)
            sub.wait_count(3)
            assert sub.payloads() == [b"prepared-commit-1", b"prepared-commit-2", b"marker"]
    finally:
        for gid in gids:
            if count(other, "SELECT count(*) FROM pg_prepared_xacts WHERE gid = %s", gid):
                other.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    wait_outbox_empty(conn, t)


@pytest.mark.parametrize("how", ["BEGIN READ ONLY", "SET TRANSACTION READ ONLY"])
def test_read_only_transaction_refuses_to_publish(connect, broker, mosq, topic, how):
    t = f"{topic}/read-only"
    c = connect()
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        for stmt in ("SELECT mqtt_publish(%s, 'one', 1, false, %s)",
                     "SELECT mqtt_publish(%s, 'many-' || i, 1, false, %s) FROM generate_series(1, 100) i"):
            c.execute("BEGIN" if how.startswith("SET") else how)
            if how.startswith("SET"):
                c.execute(how)
            try:
                with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                    c.execute(stmt, (t, broker.name))
            finally:
                c.execute("ROLLBACK")
        assert outbox(c, t) == []
        # A read-write transaction afterwards: nothing of the refused calls comes along.
        publish(c, t, "marker", broker.name)
        sub.wait_count(1)
        assert sub.payloads() == [b"marker"]
    wait_outbox_empty(c, t)
    assert dead_letters(c, t) == []


BAD_ROWS = {
    # name: (topic expression, payload expression, broker expression, error, rows, bad row)
    "null topic": ("CASE WHEN i = %(bad)s THEN NULL ELSE %(t)s END", "i::text", "%(b)s",
                   psycopg.errors.InvalidParameterValue, 1000, 500),
    "wildcard topic": ("CASE WHEN i = %(bad)s THEN 'bad/#' ELSE %(t)s END", "i::text", "%(b)s",
                       psycopg.errors.InvalidParameterValue, 1000, 500),
    "unknown broker": ("%(t)s", "i::text", "CASE WHEN i = %(bad)s THEN %(nob)s ELSE %(b)s END",
                       psycopg.errors.UndefinedObject, 1000, 500),
    "payload too large": ("%(t)s", "CASE WHEN i = %(bad)s THEN repeat('x', 101) ELSE i::text END", "%(b)s",
                          psycopg.errors.ProgramLimitExceeded, 1000, 500),
    # after the first 10,000 were written out mid-statement
    "wildcard after a flush": ("CASE WHEN i = %(bad)s THEN 'bad/+/x' ELSE %(t)s END", "i::text", "%(b)s",
                               psycopg.errors.InvalidParameterValue, 15000, 12000),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_row_fails_its_bulk_statement_and_changes_nothing(conn, connect, broker, mosq, topic, kind):
    topic_x, payload_x, broker_x, error, n, bad = BAD_ROWS[kind]
    t = f"{topic}/bad"
    # a superuser setting, so this session may lower it
    conn.execute("SET mqtt_pg.max_payload_size = 100")
    params = {"t": t, "b": broker.name, "nob": unique("nobroker"), "bad": bad, "n": n}
    bulk = (f"SELECT mqtt_publish({topic_x}, {payload_x}, 1, false, {broker_x}) "
            "FROM generate_series(1, %(n)s) i")
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        # alone (autocommit) ...
        with pytest.raises(error):
            conn.execute(bulk, params)
        assert outbox(conn, t) == []
        # ... and inside a transaction that goes on after rolling back to a savepoint
        with conn.transaction():
            publish(conn, t, "before", broker.name)
            with pytest.raises(error):
                with conn.transaction():
                    conn.execute(bulk, params)
            assert [r[2] for r in outbox(conn, t)] == ["before"]
            publish(conn, t, "after", broker.name)
        assert len(sub.wait_count(2)) >= 2
        # A payload of exactly the limit is good input (checked in a transaction rolled back).
        with conn.transaction():
            publish(conn, t, "y" * 100, broker.name)
            raise psycopg.Rollback()
        # Good input of the same shape works.
        params["bad"] = 0
        assert len(conn.execute(bulk, params).fetchall()) == n
        got = sub.wait_count(n + 2, timeout=120)
        assert [m[1] for m in got] == [b"before", b"after"] + [str(i).encode() for i in range(1, n + 1)]
    wait_outbox_empty(conn, t)
    assert dead_letters(conn, t) == []
    assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE topic LIKE 'bad/%'") == 0


# ---- 2. no foreign key: locks, a delete trigger, orphans ------------------------------------

def test_deleting_a_broker_deletes_its_queued_messages_only(conn, make_broker, topic):
    x = make_broker(start=False)
    y = make_broker(start=False)
    tx, ty = f"{topic}/x", f"{topic}/y"
    try:
        for i in range(3):
            publish(conn, tx, f"x{i}", x.name)
            publish(conn, ty, f"y{i}", y.name)
        kept = outbox(conn, ty)
        assert len(outbox(conn, tx)) == 3 and len(kept) == 3
        assert conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (x.id,)).rowcount == 1
        assert outbox(conn, tx) == []
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", x.id) == 0
        assert outbox(conn, ty) == kept
        # Published and deleted in one function: the PERFORMed row is written before the DELETE
        # starts, and goes with the broker.
        z = make_broker(start=False)
        tz = f"{topic}/z"
        conn.execute(sql.SQL("""DO $$ BEGIN
                PERFORM mqtt_publish({t}, 'z', 1, false, {b});
                DELETE FROM mqtt_broker WHERE name = {b};
            END $$""").format(t=sql.Literal(tz), b=sql.Literal(z.name)))
        assert outbox(conn, tz) == []
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", z.id) == 0
        assert outbox(conn, ty) == kept
    finally:
        conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (y.id,))
    assert outbox(conn, ty) == []


def test_the_database_owner_deletes_brokers_and_truncate_empties_the_outbox(owned_db):
    """As the database owner, a non-superuser: its DELETE of a broker removes the broker's
    queued messages (it needs no privilege on the outbox). TRUNCATE mqtt_broker CASCADE (a
    superuser) empties the outbox."""
    o = owned_db.connect()
    su = owned_db.su()
    assert count(o, "SELECT count(*) FROM pg_roles WHERE rolname = current_user AND NOT rolsuper") == 1
    for name in ("x", "y", "z"):
        o.execute("INSERT INTO mqtt_broker (name, host, port) VALUES (%s, %s, 1)", (name, HOST))
        for i in range(3):
            publish(o, f"t/{name}", f"{name}{i}", name)
    kept = outbox(su, "t/y")
    assert len(kept) == 3 and len(outbox(su, "t/x")) == 3
    assert o.execute("DELETE FROM mqtt_broker WHERE name = 'x'").rowcount == 1
    assert outbox(su, "t/x") == []
    assert outbox(su, "t/y") == kept
    assert len(outbox(su, "t/z")) == 3
    # The owner may not empty the outbox itself through the trigger's function.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        o.execute("SELECT _mqtt_broker_deleted()")
    su.execute("TRUNCATE mqtt_broker CASCADE")
    assert count(su, "SELECT count(*) FROM mqtt_outbox") == 0
    assert count(su, "SELECT count(*) FROM mqtt_broker") == 0
    assert count(su, "SELECT count(*) FROM mqtt_dead_letter") == 0


def test_a_delete_waits_for_a_publishing_transaction_and_takes_its_messages(conn, connect, make_broker,
                                                                             mosq, topic):
    """A's open transaction has published to broker X (its row locked FOR KEY SHARE); B's DELETE
    of X waits for A; when A commits, B's DELETE removes A's messages with the broker."""
    # X's listener stays stopped. A connected X may send A's rows in the moment between A's
    # commit and B's: they were committed while X existed (as with the old foreign key), so
    # that is no fault, but it makes "nothing reaches the broker" a race. What must hold is
    # that the rows do not outlive the broker, neither in the outbox nor as orphans.
    x = make_broker(start=False)
    y = make_broker()
    t = f"{topic}/a"
    a = connect(autocommit=False)
    b = connect()
    b_pid = backend_pid(b)
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        try:
            ids = [r[0] for r in a.execute(
                "SELECT mqtt_publish(%s, 'from-a-' || i, 1, false, %s) FROM generate_series(1, 3) i",
                (t, x.name))]
            deleter = InThread(lambda: b.execute("DELETE FROM mqtt_broker WHERE name = %s", (x.name,)).rowcount)
            wait_lock_wait(conn, b_pid)
            assert not deleter.done()
            a.commit()
        finally:
            end_transaction(a)
        deleter.join()
        assert deleter.error is None, deleter.error
        assert deleter.result == 1
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE id = ANY(%s)", ids) == 0
        assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE id = %s", x.id) == 0
        # An orphan written after the delete is set aside by the worker's next check: by then
        # A's rows would have been too, had they been left behind.
        probe = f"{topic}/probe"
        conn.execute("INSERT INTO mqtt_outbox (broker_id, topic, payload, qos) VALUES (%s, %s, 'probe', 1)",
                     (ORPHAN_ID, probe))
        wait_for(lambda: dead_letters(conn, probe), timeout=10, message="the probe orphan set aside")
        conn.execute("DELETE FROM mqtt_dead_letter WHERE topic = %s", (probe,))
        publish(conn, t, "marker", y.name)
        sub.wait_count(1)
        assert sub.payloads() == [b"marker"]
    assert dead_letters(conn, t) == []
    assert sends(conn, t, x.id) == 0


def test_a_publish_waits_for_an_uncommitted_delete_then_finds_no_broker(conn, connect, make_broker, mosq, topic):
    x = make_broker()
    y = make_broker()
    t = f"{topic}/a"
    b = connect(autocommit=False)
    a = connect()
    a_pid = backend_pid(a)
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        try:
            assert b.execute("DELETE FROM mqtt_broker WHERE name = %s", (x.name,)).rowcount == 1
            publisher = InThread(lambda: publish(a, t, "blocked", x.name))
            wait_lock_wait(conn, a_pid)
            assert not publisher.done()
            b.commit()
        finally:
            end_transaction(b)
        publisher.join()
        assert isinstance(publisher.error, psycopg.errors.UndefinedObject), repr(publisher.error)
        assert x.name in str(publisher.error)
        assert outbox(conn, t) == []
        publish(a, t, "marker", y.name)
        sub.wait_count(1)
        assert sub.payloads() == [b"marker"]
    wait_for(lambda: sends(conn, t) >= 1, message="the marker's send row")
    assert sends(conn, t) == 1
    assert dead_letters(conn, t) == []


def test_rows_of_a_broker_that_does_not_exist_are_set_aside(conn, make_broker, topic):
    y = make_broker(start=False)
    t, ty = f"{topic}/orphan", f"{topic}/real"
    assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE id = %s", ORPHAN_ID) == 0
    try:
        for i in range(2):
            publish(conn, ty, f"real{i}", y.name)
        kept = outbox(conn, ty)
        orphan_id = count(conn, "INSERT INTO mqtt_outbox (broker_id, topic, payload, qos, retain) "
                                "VALUES (%s, %s, 'lost', 1, true) RETURNING id", ORPHAN_ID, t)
        t0 = time.monotonic()
        [(broker_id, payload, direction, error)] = wait_for(lambda: dead_letters(conn, t), timeout=10,
                                                            message="the orphan row in mqtt_dead_letter")
        assert time.monotonic() - t0 < 5, "not set aside within a few poll intervals"
        assert (broker_id, payload, direction) == (ORPHAN_ID, "lost", "send")
        assert "no MQTT broker has id" in error and str(ORPHAN_ID) in error, error
        assert conn.execute("SELECT qos, retain FROM mqtt_dead_letter WHERE topic = %s", (t,)).fetchone() == (1, True)
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE id = %s", orphan_id) == 0
        # The real broker's rows (listener stopped) are untouched.
        assert outbox(conn, ty) == kept
        assert dead_letters(conn, ty) == []
    finally:
        conn.execute("DELETE FROM mqtt_dead_letter WHERE topic = %s", (t,))
        conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (y.id,))


def test_a_broker_id_cannot_change_while_it_has_queued_messages(conn, make_broker, topic):
    x, z, w = (make_broker(start=False) for _ in range(3))
    new_id = count(conn, "SELECT max(id) + 1000000 FROM mqtt_broker")
    t = f"{topic}/idchange"
    try:
        publish(conn, t, "queued", x.name)
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match=x.name):
            conn.execute("UPDATE mqtt_broker SET id = %s WHERE id = %s", (new_id, x.id))
        assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE id = %s", x.id) == 1
        assert [r[1] for r in outbox(conn, t)] == [x.id]
        # A message queued earlier in the same transaction, or in the same function, counts too.
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            with conn.transaction():
                publish(conn, t, "same transaction", z.name)
                conn.execute("UPDATE mqtt_broker SET id = %s WHERE id = %s", (new_id, z.id))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(sql.SQL("""DO $$ BEGIN
                    PERFORM mqtt_publish({t}, 'same function', 1, false, {b});
                    UPDATE mqtt_broker SET id = {new} WHERE id = {old};
                END $$""").format(t=sql.Literal(t), b=sql.Literal(z.name), new=new_id, old=z.id))
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", z.id) == 0
        # No queued messages and no topics: the id may change.
        assert conn.execute("UPDATE mqtt_broker SET id = %s WHERE id = %s", (new_id, w.id)).rowcount == 1
        assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE id = %s AND name = %s", new_id, w.name) == 1
    finally:
        conn.execute("DELETE FROM mqtt_broker WHERE name = ANY(%s)", ([x.name, z.name, w.name],))
    assert outbox(conn, t) == []


# ---- 3. the broker is looked up once per statement, unless something changed ----------------

def test_a_broker_renamed_inside_the_function_is_looked_up_again(conn, make_broker, topic):
    a = make_broker(start=False)
    t = f"{topic}/rename"
    conn.execute("""
        CREATE FUNCTION pg_temp.publish_rename_publish(t text, b text, new_name text,
            OUT first bigint, OUT second bigint)
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM mqtt_publish(t, 'first', 1, false, b);
            first := currval('mqtt_outbox_id_seq');
            UPDATE mqtt_broker SET name = new_name WHERE name = b;
            RAISE NOTICE 'renamed % to %', b, new_name;
            second := mqtt_publish(t, 'second', 1, false, b);
        END $$""")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    try:
        # The same name again: a write to mqtt_broker, and the broker is still there.
        first, second = conn.execute("SELECT * FROM pg_temp.publish_rename_publish(%s, %s, %s)",
                                     (t, a.name, a.name)).fetchone()
        assert [(r[0], r[1]) for r in outbox(conn, t)] == [(first, a.id), (second, a.id)]
        notices.clear()
        with pytest.raises(psycopg.errors.UndefinedObject, match=a.name):
            conn.execute("SELECT * FROM pg_temp.publish_rename_publish(%s, %s, %s)", (t, a.name, a.name + "2"))
        assert notices == [f"renamed {a.name} to {a.name}2"], notices
        assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE name = %s", a.name) == 1
        assert len(outbox(conn, t)) == 2
        # The same across statements of one transaction.
        with pytest.raises(psycopg.errors.UndefinedObject):
            with conn.transaction():
                publish(conn, t, "first", a.name)
                conn.execute("UPDATE mqtt_broker SET name = %s WHERE name = %s", (a.name + "2", a.name))
                publish(conn, t, "second", a.name)
        assert len(outbox(conn, t)) == 2
    finally:
        conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (a.id,))


def test_a_default_moved_inside_the_function_is_looked_up_again(pg, scratch_db, topic):
    """In a database of its own, so that no other test sees a default broker."""
    db = scratch_db("dflt")
    with pg.connect(db) as c:
        c.execute("CREATE EXTENSION mqtt_pg")
        x = count(c, "INSERT INTO mqtt_broker (name, host, is_default) VALUES ('x', 'localhost', true) RETURNING id")
        y = count(c, "INSERT INTO mqtt_broker (name, host) VALUES ('y', 'localhost') RETURNING id")
        c.execute("""
            CREATE FUNCTION pg_temp.publish_move_publish(t text, OUT first bigint, OUT second bigint)
            LANGUAGE plpgsql AS $$
            BEGIN
                first := mqtt_publish(t, 'first', 1, false, NULL);
                UPDATE mqtt_broker SET is_default = false WHERE name = 'x';
                UPDATE mqtt_broker SET is_default = true WHERE name = 'y';
                second := mqtt_publish(t, 'second', 1, false, NULL);
            END $$""")
        t = f"{topic}/default"
        first, second = c.execute("SELECT * FROM pg_temp.publish_move_publish(%s)", (t,)).fetchone()
        assert outbox(c, t) == [(first, x, "first"), (second, y, "second")]


# ---- 4. a transaction that commits late ------------------------------------------------------

def test_a_late_commit_is_sent_at_once_not_at_the_next_poll(pg, conn, connect, broker, mosq, topic):
    """With a 60 s poll interval, a transaction that took the lower id and commits after a
    higher one was sent still goes out at its commit: it tells the worker its lowest id."""
    t = f"{topic}/late"

    def reload_and_wait(expect_log: str, marker: str, sub):
        before = pg.log_text().count(expect_log)
        conn.execute("SELECT pg_reload_conf()")
        # The postmaster logs the change, then signals every process, the worker included; the
        # worker handles SIGHUP before it looks at the outbox, so a marker sent through it
        # after this proves it runs with the new value.
        wait_for(lambda: pg.log_text().count(expect_log) > before, message=f"log line {expect_log!r}")
        publish(conn, t, marker, broker.name)
        wait_for(lambda: marker.encode() in sub.payloads(), message=f"{marker} through the worker")

    with mqtt_sub(mosq.port, t, qos=1) as sub:
        conn.execute("ALTER SYSTEM SET mqtt_pg.poll_interval = '60s'")
        try:
            reload_and_wait('parameter "mqtt_pg.poll_interval" changed to "60s"', "marker-60s", sub)
            a = connect(autocommit=False)
            b = connect()
            try:
                early = publish(a, t, "early", broker.name)
                late = publish(b, t, "late", broker.name)
                assert early < late
                sub.wait_count(2)
                a.commit()
                committed = time.monotonic()
                got = sub.wait_count(3, timeout=5)
                assert sub.times[2] - committed < 5
            finally:
                end_transaction(a)
            assert [m[1] for m in got] == [b"marker-60s", b"late", b"early"]
            # Proof that the worker polls every 60 s now: a row written directly (nothing
            # wakes the worker) waits. Once 'early' is recorded, nothing else is in flight.
            wait_outbox_empty(conn, t)
            conn.execute("INSERT INTO mqtt_outbox (broker_id, topic, payload, qos) VALUES (%s, %s, 'direct', 1)",
                         (broker.id, t))
            with pytest.raises(AssertionError):
                sub.wait_count(4, timeout=2)
        finally:
            conn.execute("ALTER SYSTEM RESET mqtt_pg.poll_interval")
            reload_and_wait('parameter "mqtt_pg.poll_interval" removed from configuration file', "marker-reset", sub)
    assert sub.payloads() == [b"marker-60s", b"late", b"early", b"direct", b"marker-reset"]
    wait_outbox_empty(conn, t)


# ---- 5. a hostile role ------------------------------------------------------------------------

def hostile_setup(owned_db, mosq, topic, *, start: bool):
    """Broker 'b' (listener started if `start`) and a role with only a publish rule on
    `topic/#` and a schema of its own. Returns (owner connection, role, role connection)."""
    o = owned_db.connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port) VALUES ('b', %s, %s)", (HOST, mosq.port))
    if start:
        o.execute("SELECT mqtt_start_listener('b')")
        wait_status(o, "b", "connected")
    role = owned_db.new_role("hostile")
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (%s, %s, true)",
              (role, f"{topic}/#"))
    with owned_db.su() as su:
        su.execute(sql.SQL("CREATE SCHEMA h AUTHORIZATION {}").format(sql.Identifier(role)))
    h = owned_db.connect(role)
    for table in ("mqtt_outbox", "mqtt_broker", "mqtt_access_control"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            h.execute(f"SELECT count(*) FROM public.{table}")
    return o, role, h


def test_a_hostile_role_bulk_publishes_into_the_extensions_outbox(owned_db, mosq, topic):
    o, role, h = hostile_setup(owned_db, mosq, topic, start=True)
    h.execute("CREATE TABLE h.ran (what text)")
    h.execute("CREATE TABLE h.mqtt_outbox (id bigint, broker_id int, topic text, payload bytea, "
              "qos smallint, retain boolean, created_at timestamptz)")
    h.execute("CREATE TABLE h.mqtt_broker (id int, name text, is_default boolean)")
    h.execute("INSERT INTO h.mqtt_broker VALUES (424242, 'b', true)")
    h.execute("""CREATE FUNCTION h.unnest(anyarray) RETURNS SETOF anyelement LANGUAGE plpgsql AS $f$
                 BEGIN
                     INSERT INTO h.ran VALUES (current_user || ' ' || pg_catalog.array_length($1, 1));
                     RETURN QUERY SELECT pg_catalog.unnest($1);
                 END $f$""")
    source = count(h, "SELECT md5(prosrc) FROM pg_proc WHERE oid = 'h.unnest(anyarray)'::regprocedure")
    h.execute("SET search_path = h, public, pg_catalog")
    # The traps are live for unqualified names in this session.
    assert count(h, "SELECT count(*) FROM unnest(ARRAY[1, 2, 3])") == 3
    assert count(h, "SELECT count(*) FROM h.ran") == 1
    assert count(h, "SELECT count(*) FROM mqtt_outbox") == 0
    h.execute("DELETE FROM h.ran")
    t = f"{topic}/bulk"
    n = 1000
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        ids = [r[0] for r in h.execute(
            "SELECT mqtt_publish(%s, i::text, 1, false, 'b') FROM generate_series(1, %s) i", (t, n))]
        assert len(ids) == n and all(a < b for a, b in zip(ids, ids[1:]))
        got = sub.wait_count(n, timeout=60)
        assert [m[1] for m in got] == [str(i).encode() for i in range(1, n + 1)]
    su = owned_db.su()
    broker_id = count(su, "SELECT id FROM mqtt_broker WHERE name = 'b'")
    wait_for(lambda: sends(su, t) == n, timeout=30, message=f"{n} send rows")
    assert count(su, "SELECT count(DISTINCT broker_id) FROM mqtt_message_history WHERE topic = %s", t) == 1
    assert sends(su, t, broker_id) == n
    # Its objects are untouched and its function never ran.
    assert count(h, "SELECT count(*) FROM h.ran") == 0
    assert count(h, "SELECT count(*) FROM h.mqtt_outbox") == 0
    assert h.execute("SELECT * FROM h.mqtt_broker").fetchall() == [(424242, "b", True)]
    assert count(h, "SELECT md5(prosrc) FROM pg_proc WHERE oid = 'h.unnest(anyarray)'::regprocedure") == source
    assert count(su, "SELECT count(*) FROM pg_roles WHERE rolname = %s AND NOT rolsuper", role) == 1
    wait_outbox_empty(su, t)
    o.execute("SELECT mqtt_stop_listener('b')")


def test_a_hostile_role_cannot_hold_off_a_broker_delete_beyond_its_transaction(owned_db, mosq, topic):
    o, role, h = hostile_setup(owned_db, mosq, topic, start=False)
    o.execute("INSERT INTO mqtt_broker (name, host, port) VALUES ('c', %s, %s)", (HOST, mosq.port))
    su = owned_db.su()
    t = f"{topic}/lock"
    h_tx = owned_db.connect(role, autocommit=False)
    o_pid = backend_pid(o)
    # Within its transaction the row lock holds the delete back, as the foreign key did ...
    try:
        publish(h_tx, t, "open", "b")
        deleter = InThread(lambda: o.execute("DELETE FROM mqtt_broker WHERE name = 'b'").rowcount)
        wait_lock_wait(su, o_pid)
        assert not deleter.done()
        h_tx.rollback()
        rolled_back = time.monotonic()
    finally:
        end_transaction(h_tx)
    deleter.join()
    assert deleter.error is None, deleter.error
    assert deleter.result == 1
    assert deleter.finished_at - rolled_back < 2
    # ... and after a commit nothing is held at all, with its session still open.
    publish(h_tx, t, "committed-1", "c")
    h_tx.commit()
    publish(h, t, "committed-2", "c")
    assert len(outbox(su, t)) == 2
    o.execute("SET lock_timeout = '2s'")
    assert o.execute("DELETE FROM mqtt_broker WHERE name = 'c'").rowcount == 1
    assert outbox(su, t) == []
    assert count(su, "SELECT count(*) FROM mqtt_broker") == 0


# ---- found by a hostile review -----------------------------------------------------------------

def test_a_stable_function_inside_a_statement_never_moves_its_snapshot(conn, broker, topic):
    """Rows queued by an expression are written when the next query starts, and that query's
    snapshot moves past them; but a query of a STABLE function runs on the calling statement's
    own snapshot, which must never start seeing the statement's own writes half-way."""
    b = broker.name
    conn.execute("SELECT mqtt_stop_listener(%s)", (b,))
    conn.execute("CREATE TEMP TABLE log (i int)")
    conn.execute("CREATE FUNCTION pg_temp.w(i int) RETURNS int VOLATILE LANGUAGE sql AS "
                 "'INSERT INTO log VALUES (i) RETURNING i'")
    conn.execute("CREATE FUNCTION pg_temp.s(x bigint) RETURNS int STABLE LANGUAGE plpgsql AS "
                 "$$ DECLARE n int; BEGIN SELECT count(*) INTO n FROM pg_class WHERE false; RETURN 1; END $$")
    with conn.transaction():
        seen = conn.execute(
            "SELECT (SELECT count(*) FROM log l WHERE l.i <= g.i) FROM generate_series(1, 4) g(i) "
            "WHERE pg_temp.w(g.i) > 0 AND pg_temp.s(mqtt_publish(%s, 'x', 1, false, %s)) = 1", (topic, b)).fetchall()
        assert [r[0] for r in seen] == [0, 0, 0, 0], "the statement saw its own writes"
        assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE topic = %s", topic) == 4
    conn.execute("CREATE TEMP TABLE t (v int, pad text)")
    conn.execute("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 60) g")  # 2 pages
    with conn.transaction():
        n = conn.execute("INSERT INTO t SELECT v + 1000, pad FROM t "
                         "WHERE pg_temp.s(mqtt_publish(%s, v::text, 1, false, %s)) = 1", (topic, b)).rowcount
        assert n == 60
        conn.execute("UPDATE t SET v = v + 1 WHERE pg_temp.s(mqtt_publish(%s, v::text, 1, false, %s)) = 1",
                     (topic, b))
        assert count(conn, "SELECT count(*) FROM t") == 120
    # a BEFORE trigger that publishes by assignment, under an UPDATE that calls a STABLE function
    conn.execute("CREATE TEMP TABLE orders (id int PRIMARY KEY, status text, n int DEFAULT 0, pad text)")
    conn.execute("INSERT INTO orders SELECT g, 'new', 0, repeat('p', 300) FROM generate_series(1, 40) g")
    conn.execute("CREATE TEMP TABLE order_rules (status text)")
    conn.execute("INSERT INTO order_rules VALUES ('new')")
    conn.execute("CREATE FUNCTION pg_temp.is_open(st text) RETURNS bool STABLE LANGUAGE plpgsql AS "
                 "$$ BEGIN RETURN EXISTS (SELECT 1 FROM order_rules r WHERE r.status = st); END $$")
    conn.execute(f"""CREATE FUNCTION pg_temp.notify_order() RETURNS trigger LANGUAGE plpgsql AS
        $$ DECLARE mid bigint; BEGIN mid := mqtt_publish('{topic}/' || NEW.id, NEW.status, 1, false, '{b}');
        RETURN NEW; END $$""")
    conn.execute("CREATE TRIGGER notify BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION pg_temp.notify_order()")
    assert conn.execute("UPDATE orders SET n = n + 1 WHERE pg_temp.is_open(status)").rowcount == 40
    assert count(conn, "SELECT count(*) FROM mqtt_outbox WHERE topic LIKE %s", f"{topic}/%") == 40


def test_a_repeatable_read_delete_racing_a_publisher_fails_rather_than_leave_its_messages(conn, connect,
                                                                                          make_broker, topic):
    """A DBA's REPEATABLE READ transaction (as Odoo's) deletes a broker a publisher holds: once the
    publisher commits, the delete cannot see its rows in its snapshot. As the foreign key's
    cascade did, it fails with 40001 instead of leaving them behind (for the next broker with
    that id to send)."""
    x = make_broker(start=False)
    dba = connect(autocommit=False)
    pub = connect(autocommit=False)
    dba_pid = backend_pid(dba)
    dba.rollback()
    try:
        dba.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        dba.execute("SELECT 1 FROM mqtt_broker LIMIT 1")  # the snapshot is taken
        publish(pub, f"{topic}/rr", "queued", x.name)
        deleter = InThread(lambda: dba.execute("DELETE FROM mqtt_broker WHERE id = %s", (x.id,)))
        wait_lock_wait(conn, dba_pid)
        pub.commit()
        deleter.join()
        assert isinstance(deleter.error, psycopg.errors.SerializationFailure), repr(deleter.error)
        dba.rollback()
        # retried, it goes through and takes the message with it
        dba.execute("DELETE FROM mqtt_broker WHERE id = %s", (x.id,))
        dba.commit()
        assert outbox(conn, f"{topic}/rr") == []
    finally:
        end_transaction(dba)
        end_transaction(pub)


def test_deleting_a_broker_inside_an_exception_block_with_its_messages_outside_is_refused(conn, make_broker, topic):
    x = make_broker(start=False)
    with pytest.raises(psycopg.errors.ObjectInUse):
        conn.execute(f"""DO $$ DECLARE m bigint; BEGIN
            m := mqtt_publish('{topic}/blk', 'outside', 1, false, '{x.name}');
            BEGIN
                DELETE FROM mqtt_broker WHERE id = {x.id};
            EXCEPTION WHEN division_by_zero THEN NULL;  -- a subtransaction
            END;
        END $$""")
    assert count(conn, "SELECT count(*) FROM mqtt_broker WHERE id = %s", x.id) == 1
    assert outbox(conn, f"{topic}/blk") == []
    # outside the block it goes through, and the message goes with the broker
    conn.execute(f"""DO $$ DECLARE m bigint; BEGIN
        m := mqtt_publish('{topic}/blk', 'outside', 1, false, '{x.name}');
        DELETE FROM mqtt_broker WHERE id = {x.id};
    END $$""")
    assert outbox(conn, f"{topic}/blk") == []
    assert count(conn, "SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s", f"{topic}/blk") == 0


def test_commit_prepared_wakes_the_worker(pg, conn, connect, broker, mosq, topic):
    """COMMIT PREPARED runs no commit callback of the prepared transaction: it wakes the worker
    itself, so the message goes at once, not at the next poll (60 s here)."""
    t = f"{topic}/2pc"
    with mqtt_sub(mosq.port, t, qos=1) as sub:
        conn.execute("ALTER SYSTEM SET mqtt_pg.poll_interval = '60s'")
        try:
            before = pg.log_text().count('parameter "mqtt_pg.poll_interval" changed to "60s"')
            conn.execute("SELECT pg_reload_conf()")
            wait_for(lambda: pg.log_text().count('parameter "mqtt_pg.poll_interval" changed to "60s"') > before,
                     message="the reload")
            publish(conn, t, "marker", broker.name)
            sub.wait_count(1)
            gid = unique("gid")
            a = connect(autocommit=False)
            try:
                publish(a, t, "prepared", broker.name)
                a.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
            finally:
                end_transaction(a)
            committed = time.monotonic()
            conn.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
            sub.wait_count(2, timeout=10)
            assert sub.times[1] - committed < 10
        finally:
            conn.execute("ALTER SYSTEM RESET mqtt_pg.poll_interval")
            conn.execute("SELECT pg_reload_conf()")
    assert sub.payloads() == [b"marker", b"prepared"]


def test_neither_a_hostile_role_nor_the_owner_may_call_the_cascade_or_cut_an_outbox_short(owned_db, mosq, topic):
    """_mqtt_broker_cascade (the foreign key's replacement) is the extension's own: EXECUTE is
    revoked from PUBLIC, so neither a role with a publish rule nor the database's owner can
    call it to delete queued messages; deleting a broker (the owner's right) is the way."""
    o, role, h = hostile_setup(owned_db, mosq, topic, start=False)
    t = f"{topic}/cascade"
    h.execute("SELECT mqtt_publish(%s, 'kept', 1, false, 'b')", (t,))
    [bid] = o.execute("SELECT id FROM mqtt_broker WHERE name = 'b'").fetchone()
    for c in (h, o):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT _mqtt_broker_cascade(ARRAY[%s])", (bid,))
    with owned_db.su() as su:
        # Even called by a superuser it deletes only rows of brokers that no longer exist.
        su.execute("SELECT _mqtt_broker_cascade(ARRAY[%s])", (bid,))
        assert su.execute("SELECT count(*) FROM mqtt_outbox WHERE topic = %s", (t,)).fetchone()[0] == 1
