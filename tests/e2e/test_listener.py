"""Listener lifecycle, mqtt_status(), live (un)subscribe and configuration by direct table edits."""

from __future__ import annotations

import threading

import pytest

from harness import (
    broker_status,
    history_rows,
    mosquitto_pub,
    unique,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)

STATUS_KEYS = {"status", "broker", "client_id", "since", "last_error", "last_error_at", "reconnects",
               "messages_received", "messages_sent", "outbox_depth"}


def start(conn, name):
    return conn.execute("SELECT mqtt_start_listener(%s)", (name,)).fetchone()[0]


def stop(conn, name):
    return conn.execute("SELECT mqtt_stop_listener(%s)", (name,)).fetchone()[0]


def subscribe(conn, name, topic_filter, qos=1):
    return conn.execute("SELECT mqtt_subscribe(%s, %s, %s)", (topic_filter, qos, name)).fetchone()[0]


def is_active(conn, name) -> bool:
    return conn.execute("SELECT active FROM mqtt_broker WHERE name = %s", (name,)).fetchone()[0]


def test_status_lifecycle(conn, make_broker, fresh_mosq):
    b = make_broker(port=fresh_mosq.port, start=False)
    s = broker_status(conn, b.name)
    assert STATUS_KEYS <= set(s), f"missing keys: {STATUS_KEYS - set(s)}"
    assert s["status"] == "stopped"
    assert s["broker"] == b.name
    assert not is_active(conn, b.name)

    cid = start(conn, b.name)
    assert isinstance(cid, str) and cid
    assert is_active(conn, b.name)
    assert broker_status(conn, b.name)["status"] in ("connecting", "connected")
    s = wait_status(conn, b.name, "connected")
    assert s["client_id"] == cid
    assert s["since"] is not None
    assert fresh_mosq.connections_of(cid) == 1

    assert stop(conn, b.name) is True
    assert not is_active(conn, b.name)
    wait_status(conn, b.name, "stopped")
    wait_for(lambda: fresh_mosq.disconnections_of(cid) >= 1, message=f"mosquitto to log {cid} leaving")
    assert stop(conn, b.name) is False


def test_start_listener_is_idempotent(conn, connect, broker):
    assert start(conn, broker.name) == broker.client_id
    assert start(connect(), broker.name) == broker.client_id
    assert broker_status(conn, broker.name)["status"] == "connected"


def test_reconnects_and_resubscribes_after_broker_restart(conn, make_broker, fresh_mosq, topic):
    b = make_broker(port=fresh_mosq.port)
    subscribe(conn, b.name, f"{topic}/#")
    wait_ingesting(conn, b.port, f"{topic}/probe")

    fresh_mosq.stop()
    s = wait_status(conn, b.name, "disconnected", "connecting")
    assert s["status"] in ("disconnected", "connecting")
    wait_for(lambda: broker_status(conn, b.name)["last_error"], message="last_error to be set while the broker is down")
    reconnects_before = broker_status(conn, b.name)["reconnects"]

    fresh_mosq.start()  # same port; persistence is off, so the old session and subscriptions are gone
    wait_status(conn, b.name, "connected", timeout=60)
    # re-subscribed: a message published now is ingested
    wait_ingesting(conn, b.port, f"{topic}/probe-after-restart")
    mosquitto_pub(b.port, f"{topic}/after", "after restart", qos=1)
    [row] = wait_history(conn, f"{topic}/after", 1)
    assert row["payload"] == b"after restart"
    assert broker_status(conn, b.name)["reconnects"] >= max(1, reconnects_before)


def test_concurrent_start_makes_one_connection(conn, connect, make_broker, fresh_mosq, topic):
    b = make_broker(port=fresh_mosq.port, start=False)
    subscribe(conn, b.name, f"{topic}/#")
    barrier = threading.Barrier(2, timeout=30)
    results: list = []

    def call():
        c = connect()
        barrier.wait()
        try:
            results.append(start(c, b.name))
        except Exception as e:  # noqa: BLE001 - asserted below
            results.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert len(results) == 2 and all(isinstance(r, str) for r in results), results
    assert results[0] == results[1], f"two listener ids: {results}"
    cid = results[0]
    wait_status(conn, b.name, "connected")

    wait_ingesting(conn, b.port, f"{topic}/probe")
    t = f"{topic}/once"
    mosquitto_pub(b.port, t, "exactly one row", qos=1)
    wait_history(conn, t, 1)
    mosquitto_pub(b.port, f"{topic}/marker", "marker", qos=1)  # a second connection's copy would precede it
    wait_history(conn, f"{topic}/marker", 1)
    assert len(history_rows(conn, t)) == 1
    assert fresh_mosq.connections_of(cid) == 1, (
        f"mosquitto saw {fresh_mosq.connections_of(cid)} connections as {cid}")


def test_live_subscribe_and_unsubscribe(conn, broker, topic):
    a, keep = f"{topic}/a/#", f"{topic}/keep/#"
    topic_id = subscribe(conn, broker.name, a)
    assert isinstance(topic_id, int)
    assert conn.execute("SELECT broker_id, name, qos, subscribe FROM mqtt_topic WHERE id = %s",
                        (topic_id,)).fetchone() == (broker.id, a, 1, True)
    subscribe(conn, broker.name, keep)
    wait_ingesting(conn, broker.port, f"{topic}/a/probe")
    wait_ingesting(conn, broker.port, f"{topic}/keep/probe")

    assert conn.execute("SELECT mqtt_unsubscribe(%s, %s)", (a, broker.name)).fetchone()[0] is True
    assert conn.execute("SELECT count(*) FROM mqtt_topic WHERE broker_id = %s AND name = %s AND subscribe",
                        (broker.id, a)).fetchone()[0] == 0

    def round_trip(label: str) -> bool:
        """Publish on the unsubscribed filter, then a marker on the kept one; True when the
        marker is stored and the first message is not."""
        mosquitto_pub(broker.port, f"{topic}/a/{label}", label, qos=1)
        mosquitto_pub(broker.port, f"{topic}/keep/{label}", label, qos=1)
        wait_history(conn, f"{topic}/keep/{label}", 1)
        return not history_rows(conn, f"{topic}/a/{label}")

    # "Applied live": within a few seconds messages on the filter stop being stored ...
    n = iter(range(10**6))
    wait_for(lambda: round_trip(f"r{next(n)}"), timeout=10, interval=0.2,
             message="messages on the unsubscribed filter to stop being stored")
    # ... and stay stopped.
    assert round_trip("final")
    assert conn.execute("SELECT mqtt_unsubscribe(%s, %s)", (a, broker.name)).fetchone()[0] is False


# --- configuration by direct table edits (as an Odoo model would do it) -----------------------


def insert_active_broker(conn, name, port, topic_filter) -> int:
    broker_id = conn.execute(
        "INSERT INTO mqtt_broker (name, host, port, active) VALUES (%s, '127.0.0.1', %s, true) RETURNING id",
        (name, port)).fetchone()[0]
    conn.execute("INSERT INTO mqtt_topic (broker_id, name, qos, subscribe, active) VALUES (%s, %s, 1, true, true)",
                 (broker_id, topic_filter))
    return broker_id


@pytest.fixture
def table_broker(conn, pg):
    """Name of a broker created by INSERT in the test; its listener is stopped afterwards."""
    name = unique("tb")
    yield name
    with pg.connect(conn.info.dbname) as c:
        c.execute("UPDATE mqtt_broker SET active = false WHERE name = %s", (name,))


def test_insert_rows_starts_listener_and_subscribes(conn, fresh_mosq, table_broker, topic):
    insert_active_broker(conn, table_broker, fresh_mosq.port, f"{topic}/#")
    wait_status(conn, table_broker, "connected")
    wait_ingesting(conn, fresh_mosq.port, f"{topic}/probe")
    mosquitto_pub(fresh_mosq.port, f"{topic}/x", "via table rows", qos=1)
    [row] = wait_history(conn, f"{topic}/x", 1)
    assert row["payload"] == b"via table rows"


def test_update_port_moves_connection(conn, mosquitto_factory, table_broker, topic):
    first, second = mosquitto_factory(), mosquitto_factory()
    insert_active_broker(conn, table_broker, first.port, f"{topic}/#")
    wait_ingesting(conn, first.port, f"{topic}/probe-first")
    cid = broker_status(conn, table_broker)["client_id"]

    conn.execute("UPDATE mqtt_broker SET port = %s WHERE name = %s", (second.port, table_broker))
    wait_ingesting(conn, second.port, f"{topic}/probe-second")
    wait_for(lambda: first.disconnections_of(cid) >= 1, message=f"{cid} to leave the first broker")
    assert broker_status(conn, table_broker)["status"] == "connected"


def test_update_active_false_stops_listener(conn, fresh_mosq, table_broker, topic):
    insert_active_broker(conn, table_broker, fresh_mosq.port, f"{topic}/#")
    wait_ingesting(conn, fresh_mosq.port, f"{topic}/probe")
    cid = broker_status(conn, table_broker)["client_id"]

    conn.execute("UPDATE mqtt_broker SET active = false WHERE name = %s", (table_broker,))
    wait_status(conn, table_broker, "stopped")
    wait_for(lambda: fresh_mosq.disconnections_of(cid) >= 1, message=f"{cid} to disconnect")
    assert fresh_mosq.connections_of(cid) == 1
