"""Delivery bookkeeping under stress: mixed QoS, subscription changes during a backlog, and
connections that drop while messages are in flight."""

from __future__ import annotations

import os
import signal
import threading
import time

import paho.mqtt.client as mqtt

from harness import (
    HOST,
    PROTOCOL,
    mosquitto_pub,
    mqtt_sub,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)


def outbox_count(conn, broker_id) -> int:
    return conn.execute("SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", (broker_id,)).fetchone()[0]


def test_brokers_speak_the_protocol_under_test(conn, broker, mosq):
    """This suite runs twice in `./dev test`, on MQTT 3.1.1 and on MQTT 5 (MQTT_PG_PROTOCOL):
    the broker rows the tests make, and the connections mosquitto sees, are of that version."""
    version, cid = conn.execute("SELECT b.protocol_version, s.client_id FROM mqtt_broker_status s "
                                "JOIN mqtt_broker b ON b.id = s.broker_id WHERE b.id = %s",
                                (broker.id,)).fetchone()
    assert version == PROTOCOL
    tag = {"3.1.1": "p2", "5": "p5"}[PROTOCOL]  # mosquitto numbers 3.1.1 as 2
    assert f"as {cid} ({tag}," in mosq.log_text()


def test_mixed_qos1_and_qos2_all_leave_the_outbox(conn, broker, mosq, topic):
    """rumqttc frees a QoS 2 packet id at PUBREC, so the next publish may reuse it while the
    PUBCOMP is still due: every row must still be acknowledged as its own."""
    n = 3000
    with mqtt_sub(mosq.port, f"{topic}/#", qos=2) as sub:
        conn.execute(
            "SELECT mqtt_publish(%s, 'm' || g, CASE WHEN g %% 7 = 0 THEN 2 ELSE 1 END, false, %s) "
            "FROM generate_series(1, %s) g", (f"{topic}/mix", broker.name, n))
        wait_for(lambda: outbox_count(conn, broker.id) == 0, timeout=60,
                 message="every QoS 1 and QoS 2 row acknowledged and out of the outbox")
        got = sub.wait_count(n, timeout=60)
    assert sorted(int(m[1][1:]) for m in got) == list(range(1, n + 1))
    sent = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE qos = 2), count(DISTINCT payload) FROM mqtt_message_history "
        "WHERE direction = 'send' AND topic = %s", (f"{topic}/mix",)).fetchone()
    assert sent == (n, n // 7, n)


def test_subscription_change_during_a_backlog_is_applied(conn, broker, mosq, topic):
    """While a backlog fills the connection's request queue, a new subscription and a removed
    one still reach the broker."""
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/old/#", broker.name))
    wait_ingesting(conn, mosq.port, f"{topic}/old/probe")
    os.kill(mosq.pid, signal.SIGSTOP)
    try:
        conn.execute("SELECT mqtt_publish(%s, repeat('x', 100), 1, false, %s) FROM generate_series(1, 3000)",
                     (f"{topic}/backlog", broker.name))
        with conn.transaction():
            conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/new/#", broker.name))
            conn.execute("SELECT mqtt_unsubscribe(%s, %s)", (f"{topic}/old/#", broker.name))
        # Let the worker hand the change to the (stuck) connection before the broker wakes.
        wait_for(lambda: outbox_count(conn, broker.id) == 3000, message="the backlog queued")
    finally:
        os.kill(mosq.pid, signal.SIGCONT)
    wait_for(lambda: outbox_count(conn, broker.id) == 0, timeout=60, message="the backlog to drain")
    wait_ingesting(conn, mosq.port, f"{topic}/new/probe", timeout=30)
    # The removed filter no longer delivers: publish on it, then a marker on the new one.
    mosquitto_pub(mosq.port, f"{topic}/old/after", "gone", qos=1)
    mosquitto_pub(mosq.port, f"{topic}/new/marker", "marker", qos=1)
    wait_history(conn, f"{topic}/new/marker", 1)
    assert conn.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                        (f"{topic}/old/after",)).fetchone()[0] == 0


def test_no_duplicates_when_the_connection_keeps_dropping(conn, make_broker, mosq, topic, connect):
    """QoS 0 is at most once: however often the connection drops while messages flow, no
    message is sent twice (rows handed to a connection that has gone are resent from the
    outbox once, never also by the old connection's queue)."""
    # Short reconnect delays: many reconnects while the messages flow.
    broker = make_broker(reconnect_min_ms=20, reconnect_max_ms=100)
    total = 20_000
    batch = 500
    kicks = 12
    stop = threading.Event()

    def kick():
        # A client with the worker's client id makes the broker drop the worker's connection.
        for _ in range(kicks):
            if stop.is_set():
                return
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=broker.client_id)
            c.connect(HOST, mosq.port)
            c.loop_start()
            time.sleep(0.05)  # hold the session briefly, so the worker has to reconnect
            c.disconnect()
            c.loop_stop()
            time.sleep(0.25)

    with mqtt_sub(mosq.port, f"{topic}/dup", qos=0) as sub:
        publisher_conn = connect()
        kicker = threading.Thread(target=kick)
        kicker.start()
        try:
            for start in range(0, total, batch):
                publisher_conn.execute(
                    "SELECT mqtt_publish(%s, lpad(g::text, 6, '0'), 0, false, %s) "
                    "FROM generate_series(%s::int, %s::int) g", (f"{topic}/dup", broker.name, start + 1, start + batch))
        finally:
            kicker.join(60)
            stop.set()
        wait_status(conn, broker.name, "connected", timeout=30)
        wait_for(lambda: outbox_count(conn, broker.id) == 0, timeout=60, message="the outbox to drain")
        # A QoS 1 marker after everything: once it arrives, so has all that went before it on
        # the connection (MQTT keeps order).
        conn.execute("SELECT mqtt_publish(%s, 'end', 1, false, %s)", (f"{topic}/dup", broker.name))
        wait_for(lambda: b"end" in sub.payloads(), timeout=30, message="the end marker")
        got = [p for p in sub.payloads() if p != b"end"]
    reconnects = conn.execute("SELECT (mqtt_status(%s)->>'reconnects')::int", (broker.name,)).fetchone()[0]
    assert reconnects >= 3, f"the test did not manage to drop the connection (reconnects={reconnects})"
    dups = len(got) - len(set(got))
    print(f"\n[kicks] {len(got)} QoS 0 messages received of {total}, {reconnects} reconnects, {dups} duplicates")
    assert dups == 0
    assert len(set(got)) >= total * 0.5, "most messages get through"
