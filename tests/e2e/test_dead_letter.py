"""Dead letters: a message the broker or the database will never take is set aside in
mqtt_dead_letter with the reason, the queue behind it keeps moving, and a function requeues it."""

from __future__ import annotations

import psycopg
import pytest

from harness import (
    PROTOCOL,
    mosquitto_pub,
    mqtt_sub,
    serve_broker,
    subscribe_ingesting,
    table_counts,
    wait_for,
    wait_history,
)


def dead_letters(conn, broker_id: int) -> list[dict]:
    cur = conn.execute(
        "SELECT id, topic, payload, qos, direction, error FROM mqtt_dead_letter WHERE broker_id = %s ORDER BY id",
        (broker_id,))
    cols = [c.name for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def outbox_count(conn, broker_id: int) -> int:
    return conn.execute("SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", (broker_id,)).fetchone()[0]


def test_row_over_the_brokers_max_packet_size_is_dead_lettered(conn, make_broker, mosq, topic):
    """mqtt_broker.max_packet_size: a larger row never reaches the connection; the rows after it
    are delivered in order."""
    b = make_broker(max_packet_size=1000)
    with mqtt_sub(mosq.port, f"{topic}/#", qos=1) as sub:
        with conn.transaction():
            conn.execute("SELECT mqtt_publish(%s, 'first', 1, false, %s)", (f"{topic}/a", b.name))
            conn.execute("SELECT mqtt_publish(%s, repeat('x', 2000), 1, false, %s)", (f"{topic}/big", b.name))
            conn.execute("SELECT mqtt_publish(%s, 'last', 1, false, %s)", (f"{topic}/a", b.name))
        got = sub.wait_count(2)
        assert [m[1] for m in got] == [b"first", b"last"]
    wait_for(lambda: outbox_count(conn, b.id) == 0, message="the outbox empties")
    dead = dead_letters(conn, b.id)
    assert len(dead) == 1
    assert dead[0]["topic"] == f"{topic}/big" and len(dead[0]["payload"]) == 2000
    assert dead[0]["direction"] == "send" and "packet limit" in dead[0]["error"]
    status = conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0]
    assert status["dead_letters"] == 1 and status["status"] == "connected"


def test_message_the_broker_keeps_refusing_is_dead_lettered_and_requeued(
        conn, make_broker, mosquitto_factory, topic):
    """mosquitto's max_packet_size closes the connection on a larger packet (MQTT 3.1.1 has no
    other way to refuse it). The row that is the oldest unacknowledged one each time goes to
    mqtt_dead_letter; the rows behind it are delivered; once the broker accepts it, requeueing
    delivers it."""
    m = mosquitto_factory(extra_conf="max_packet_size 2000\n")
    b = make_broker(port=m.port, reconnect_min_ms=50, reconnect_max_ms=200)
    with mqtt_sub(m.port, f"{topic}/#", qos=1) as sub:
        with conn.transaction():
            conn.execute("SELECT mqtt_publish(%s, 'before', 1, false, %s)", (f"{topic}/a", b.name))
            conn.execute("SELECT mqtt_publish(%s, repeat('y', 5000), 1, false, %s)", (f"{topic}/big", b.name))
            conn.execute("SELECT mqtt_publish(%s, 'after' || g, 1, false, %s) FROM generate_series(1, 50) g",
                         (f"{topic}/a", b.name))
        wait_for(lambda: len(dead_letters(conn, b.id)) == 1, timeout=30,
                 message="the refused row dead-lettered")
        # Rows in flight when the broker cut the connection are sent again, so some may arrive
        # twice (at-least-once); what counts is that every one of them arrives.
        wanted = {b"before"} | {f"after{i}".encode() for i in range(1, 51)}
        wait_for(lambda: set(sub.payloads()) >= wanted, timeout=30,
                 message="every row but the refused one delivered")
        payloads = sub.payloads()
    assert payloads[0] == b"before"
    assert set(payloads) == wanted, "nothing but the refused row's neighbours"
    wait_for(lambda: outbox_count(conn, b.id) == 0, message="the outbox empties")
    dead = dead_letters(conn, b.id)[0]
    # MQTT 5: the broker announced its Maximum Packet Size at connect, and the row was set aside
    # before it was sent; MQTT 3.1.1: after the broker closed the connection on it, each time.
    why = "the broker's Maximum Packet Size" if PROTOCOL == "5" else "max_packet_size"
    assert dead["topic"] == f"{topic}/big" and why in dead["error"], dead["error"]

    # The broker is reconfigured to take it: requeue it by id.
    m.extra_conf = ""
    m.write_config()
    m.restart()
    with mqtt_sub(m.port, f"{topic}/#", qos=1) as sub:
        wait_for(lambda: conn.execute("SELECT mqtt_status(%s)->>'status'", (b.name,)).fetchone()[0] == "connected",
                 message="reconnected")
        new_id = conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead["id"],)).fetchone()[0]
        assert new_id is not None
        got = sub.wait_count(1, timeout=20)
        assert got[0][0] == f"{topic}/big" and got[0][1] == b"y" * 5000
    assert dead_letters(conn, b.id) == []
    wait_for(lambda: outbox_count(conn, b.id) == 0, message="the requeued row leaves the outbox")


def test_received_message_the_database_refuses_is_set_aside(pg, conn, broker, mosq, topic):
    """A trigger on the history table that fails for one message: that message goes to
    mqtt_dead_letter with the trigger's error, the others are stored, the worker survives; after
    the fix, requeueing stores it."""
    subscribe_ingesting(conn, mosq.port, topic, broker.name)
    workers = pg.worker_pids()
    conn.execute("""
        CREATE FUNCTION public.e2e_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.payload = 'poison'::bytea THEN
                RAISE EXCEPTION 'poison refused by a test trigger';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER e2e_refuse_poison BEFORE INSERT ON mqtt_message_history
            FOR EACH ROW EXECUTE FUNCTION public.e2e_refuse_poison();
    """)
    try:
        for p in ("ok1", "poison", "ok2"):
            mosquitto_pub(mosq.port, f"{topic}/t", p, qos=1)
        wait_history(conn, f"{topic}/t", 2)
        wait_for(lambda: len(dead_letters(conn, broker.id)) == 1, message="the poison dead-lettered")
    finally:
        conn.execute("DROP TRIGGER e2e_refuse_poison ON mqtt_message_history")
        conn.execute("DROP FUNCTION public.e2e_refuse_poison()")
    stored = conn.execute("SELECT payload FROM mqtt_message_history WHERE topic = %s ORDER BY id",
                          (f"{topic}/t",)).fetchall()
    assert [bytes(r[0]) for r in stored] == [b"ok1", b"ok2"]
    dead = dead_letters(conn, broker.id)[0]
    assert dead["direction"] == "receive" and bytes(dead["payload"]) == b"poison" and dead["qos"] == 1
    assert "poison refused by a test trigger" in dead["error"]
    assert pg.worker_pids() == workers, "the worker must not have restarted"

    assert conn.execute("SELECT mqtt_requeue_dead_letters(%s)", (broker.name,)).fetchone()[0] == 1
    stored = conn.execute("SELECT payload, direction, qos FROM mqtt_message_history WHERE topic = %s ORDER BY id",
                          (f"{topic}/t",)).fetchall()
    assert [(bytes(p), d, q) for p, d, q in stored] == [
        (b"ok1", "receive", 1), (b"ok2", "receive", 1), (b"poison", "receive", 1)]
    assert dead_letters(conn, broker.id) == []


@pytest.mark.parametrize("call, code", [
    ("SELECT mqtt_requeue_dead_letter(NULL)", "22023"),
    ("SELECT mqtt_requeue_dead_letter(-1)", "42704"),
    ("SELECT mqtt_requeue_dead_letters('no such broker')", "42704"),
])
def test_requeue_bad_input(conn, broker, call, code):
    before = table_counts(conn)
    with pytest.raises(psycopg.Error) as e:
        conn.execute(call)
    assert e.value.sqlstate == code
    assert e.value.diag.message_hint
    assert table_counts(conn) == before


def test_requeue_of_a_dead_letter_whose_broker_is_gone(conn, make_broker, topic):
    b = make_broker(start=False)
    dead_id = conn.execute(
        "INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error) "
        "VALUES (%s, %s, 'x', 1, 'send', 'test') RETURNING id", (b.id, f"{topic}/x")).fetchone()[0]
    conn.execute("DELETE FROM mqtt_broker WHERE id = %s", (b.id,))
    before = table_counts(conn)
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT mqtt_requeue_dead_letter(%s)", (dead_id,))
    assert e.value.sqlstate == "42704" and "no longer exists" in str(e.value)
    assert table_counts(conn) == before
    conn.execute("DELETE FROM mqtt_dead_letter WHERE id = %s", (dead_id,))


# The worker's WARNING each time the database refuses a batch for a passing reason.
RETRY_LOG = "trying again in a moment"


def retries_logged(pg) -> int:
    return pg.log_text().count(RETRY_LOG)


def db_with_lock_timeout(pg, mosq, scratch_db, topic: str, prefix: str, lock_timeout: str) -> str:
    """A database of its own with `lock_timeout` set (the worker connects with it), broker 'b'
    connected and `{topic}/in/#` ingesting at QoS 1."""
    db = scratch_db(prefix)
    with pg.connect() as admin:
        admin.execute(f"ALTER DATABASE \"{db}\" SET lock_timeout = '{lock_timeout}'")
    with pg.connect(db) as c:
        serve_broker(c, mosq.port)
        subscribe_ingesting(c, mosq.port, f"{topic}/in")
    return db


def test_passing_database_errors_are_retried_not_dead_lettered(pg, mosq, scratch_db, topic):
    """A lock timeout (or a cancel, a full disk) is about the moment, not the message: the batch
    is stored again later, whole, and nothing is set aside or acknowledged meanwhile. Here the
    database has lock_timeout = 300ms and the history table is locked for several timeouts."""
    db = db_with_lock_timeout(pg, mosq, scratch_db, topic, "locktimeout", "300ms")
    with pg.connect(db) as c, pg.connect(db, autocommit=False) as locker:
        log_before = retries_logged(pg)
        with mqtt_sub(mosq.port, f"{topic}/out", qos=1) as sub:
            locker.execute("LOCK TABLE mqtt_message_history IN SHARE MODE")
            for i in range(5):
                mosquitto_pub(mosq.port, f"{topic}/in/x", f"in{i}", qos=1)
            c.execute("SELECT mqtt_publish(%s, 'out' || g, 1, false, 'b') FROM generate_series(1, 3) g",
                      (f"{topic}/out",))
            # Several lock timeouts and retries go by while the lock is held (meanwhile nothing
            # new goes out either: the worker is busy with the batch it owes the database).
            wait_for(lambda: retries_logged(pg) >= log_before + 3, timeout=20,
                     message="the worker retrying its batch")
            assert c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0
            locker.rollback()
            sub.wait_count(3)
            wait_history(c, f"{topic}/in/x", 5)
            wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == 0,
                     message="the delivered rows recorded")
            received = c.execute("SELECT payload FROM mqtt_message_history WHERE topic = %s AND direction = 'receive'",
                                 (f"{topic}/in/x",)).fetchall()
            assert sorted(bytes(r[0]) for r in received) == [f"in{i}".encode() for i in range(5)]
            sent = c.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s AND direction = 'send'",
                             (f"{topic}/out",)).fetchone()[0]
            assert sent == 3
            assert sorted(sub.payloads()) == [b"out1", b"out2", b"out3"], "delivered once each, none resent"
            assert c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0
        c.execute("UPDATE mqtt_broker SET active = false")


def test_worker_stops_promptly_while_retrying(pg, mosq, scratch_db, topic):
    """A batch the database keeps refusing never holds the worker: SIGTERM (pg_terminate_backend,
    DROP DATABASE, server shutdown) ends it at once. Nothing of the dropped batch was
    acknowledged, so its successor gets every message again."""
    db = db_with_lock_timeout(pg, mosq, scratch_db, topic, "retrystop", "200ms")
    with pg.connect(db) as c, pg.connect(db, autocommit=False) as locker:
        [worker] = pg.worker_pids(db)
        log_before = retries_logged(pg)
        locker.execute("LOCK TABLE mqtt_message_history IN SHARE MODE")
        for i in range(5):
            mosquitto_pub(mosq.port, f"{topic}/in/x", f"in{i}", qos=1)
        wait_for(lambda: retries_logged(pg) > log_before, timeout=20,
                 message="the worker retrying its batch")
        c.execute("SELECT pg_terminate_backend(%s)", (worker,))
        wait_for(lambda: worker not in pg.worker_pids(db), timeout=3, interval=0.05,
                 message="the retrying worker to exit on SIGTERM")
        locker.rollback()
        wait_for(lambda: pg.worker_pids(db), timeout=30, message="a new worker")
        wait_for(lambda: {bytes(r[0]) for r in c.execute(
            "SELECT payload FROM mqtt_message_history WHERE topic = %s", (f"{topic}/in/x",))}
            == {f"in{i}".encode() for i in range(5)}, timeout=30,
            message="every message stored by the new worker")
        assert c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0
        c.execute("UPDATE mqtt_broker SET active = false")
