"""Findings of the hostile review of MQTT 5 and scale-out, kept as regression tests: correlation
data as long as MQTT allows is stored and found (R1), properties are never dropped silently when
a broker goes back to 3.1.1 (R3), and the 0.2.0 -> 0.3.0 update keeps a DBA's EXECUTE grants on
mqtt_publish (R4) and the history view's security_invoker (R9). (The engine's answers to a
broker that breaks the protocol are in core/tests/mqtt5.rs.)
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import psycopg
import pytest
from psycopg import sql

from harness import HOST, PgCluster, mqtt_sub, unique, wait_for, wait_status
from test_mqtt5 import WAIT, require_v5_on_the_wire, v5_client


# --------------------------------------------------------------------------------------------
# R1: the correlation index cannot hold long correlation data


def test_r1_history_holds_long_correlation_data(conn, make_broker, topic):
    """MQTT allows correlation data up to 65,535 bytes (and mqtt_publish / mqtt_wait_for_reply
    accept that much), but the btree expression index mqtt_message_history_correlation holds
    its hex form: 1,400 random bytes are 2,800 characters, over btree's 2,704-byte entry limit.
    The worker's insert of such a received message fails (54000) and it ends in dead letters."""
    b = make_broker(start=False)
    corr = os.urandom(1400)
    conn.execute(
        "INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction, properties) "
        "VALUES (%s, %s, 'reply', 1, 'receive', jsonb_build_object('correlation_data', encode(%s::bytea, 'hex')))",
        (b.id, f"{topic}/r", corr))
    assert conn.execute(WAIT, (corr, "0")).fetchone()[1] == f"{topic}/r"


def test_r1_received_long_correlation_data_reaches_history(conn, make_broker, mosq, topic):
    """The same from the wire: any peer allowed to publish to a subscribed topic sends a
    message with 1,400 bytes of correlation data; it should be in history, not dead letters."""
    b = make_broker(protocol_version="5")
    require_v5_on_the_wire(conn, mosq, b)
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/in/#", b.name))
    mosq.wait_subscribed(b.client_id, f"{topic}/in/#")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    c = v5_client(mosq.port)
    try:
        p = Properties(PacketTypes.PUBLISH)
        p.CorrelationData = os.urandom(1400)
        c.publish(f"{topic}/in/x", b"hello", qos=1, properties=p).wait_for_publish(5)
        where = wait_for(lambda: conn.execute(
            "SELECT 'history' FROM mqtt_message_history WHERE topic = %s "
            "UNION ALL SELECT 'dead letter: ' || error FROM mqtt_dead_letter WHERE topic = %s",
            (f"{topic}/in/x", f"{topic}/in/x")).fetchone(), timeout=20, message="the message stored")[0]
    finally:
        c.loop_stop()
        c.disconnect()
        conn.execute("DELETE FROM mqtt_topic WHERE broker_id = %s", (b.id,))
    assert where == "history", where


# --------------------------------------------------------------------------------------------
# R2: message_expiry counts from the start of the publishing transaction


def test_r3_properties_not_silently_dropped_when_broker_switches_to_3_1_1(conn, make_broker, mosq, topic):
    b = make_broker(start=False, protocol_version="5")
    conn.execute("SELECT mqtt_publish(%s, 'req', 1, false, %s, %s)",
                 (topic, b.name, json.dumps({"correlation_data": "abcd", "response_topic": f"{topic}/r"})))
    conn.execute("UPDATE mqtt_broker SET protocol_version = '3.1.1' WHERE id = %s", (b.id,))
    got = []
    c = v5_client(mosq.port, on_message=lambda cl, ud, m: got.append(m), subscribe=topic)
    try:
        conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
        wait_status(conn, b.name, "connected")
        wait_for(lambda: got or conn.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s",
                                             (topic,)).fetchone()[0],
                 message="the message sent or set aside")
        time.sleep(0.5)
    finally:
        c.loop_stop()
        c.disconnect()
    sent_props = conn.execute("SELECT properties FROM mqtt_message_history WHERE topic = %s AND direction = 'send'",
                              (topic,)).fetchall()
    if got:
        # history says it went with its correlation data; the wire says otherwise
        assert getattr(got[0].properties, "CorrelationData", None) == bytes.fromhex("abcd"), \
            f"sent without its properties; history claims {sent_props}"


# --------------------------------------------------------------------------------------------
# R4/R5: ALTER EXTENSION UPDATE from 0.2.0 drops and recreates mqtt_publish


@pytest.fixture(scope="module")
def cluster():
    c = PgCluster(preload=True).init()
    c.start()
    yield c
    c.destroy()


OLD_PUBLISH = ["mqtt_publish(text, text, integer, boolean, text)",
               "mqtt_publish(text, bytea, integer, boolean, text)",
               "mqtt_publish(text, jsonb, integer, boolean, text)"]
NEW_PUBLISH = [s.replace("text)", "text, jsonb)") for s in OLD_PUBLISH]


def test_r4_update_keeps_revoked_execute_on_mqtt_publish(cluster):
    """README: 'Every row and grant stays'. A DBA who locked mqtt_publish down at 0.2.0 (REVOKE
    FROM PUBLIC, GRANT to the application role) finds it executable by every role after the
    update: the script DROPs the functions and CREATEs new ones with the default ACL."""
    name = unique("up")
    cluster.create_database(name)
    app, other = unique("app"), unique("other")
    with cluster.connect(name) as c:
        c.execute("CREATE EXTENSION mqtt_pg VERSION '0.2.0'")
        c.execute(sql.SQL("CREATE ROLE {} LOGIN; CREATE ROLE {} LOGIN").format(
            sql.Identifier(app), sql.Identifier(other)))
        for f in OLD_PUBLISH:
            c.execute(f"REVOKE EXECUTE ON FUNCTION {f} FROM PUBLIC")
            c.execute(sql.SQL(f"GRANT EXECUTE ON FUNCTION {f} TO {{}}").format(sql.Identifier(app)))
        c.execute("ALTER EXTENSION mqtt_pg UPDATE")
        for f in NEW_PUBLISH:
            assert c.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (app, f)).fetchone()[0]
            assert not c.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", (other, f)).fetchone()[0], \
                f"{other} may execute {f} after the update; the REVOKE FROM PUBLIC was lost"


def test_r9_update_keeps_security_invoker_on_the_history_view(cluster):
    """A DBA with row-level security on mqtt_message_history makes the text view obey it with
    security_invoker (the view is owned by the superuser that created the extension, which
    bypasses RLS). The update's CREATE OR REPLACE VIEW replaces the view's options with none,
    so afterwards the reporting role reads every row through the view."""
    name = unique("up")
    cluster.create_database(name)
    reporting = unique("reporting")
    with cluster.connect(name) as c:
        c.execute("CREATE EXTENSION mqtt_pg VERSION '0.2.0'")
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(reporting)))
        c.execute("INSERT INTO mqtt_broker (id, name, host) VALUES (1, 'b', 'h')")
        c.execute("INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction) "
                  "VALUES (1, 'public/a', 'x', 0, 'receive'), (1, 'secret/b', 'y', 0, 'receive')")
        c.execute(sql.SQL("GRANT SELECT ON mqtt_message_history, mqtt_message_history_text TO {}").format(
            sql.Identifier(reporting)))
        c.execute("ALTER TABLE mqtt_message_history ENABLE ROW LEVEL SECURITY")
        c.execute(sql.SQL("CREATE POLICY only_public ON mqtt_message_history FOR SELECT TO {} "
                          "USING (topic LIKE 'public/%%')").format(sql.Identifier(reporting)))
        c.execute("ALTER VIEW mqtt_message_history_text SET (security_invoker = true)")

        def seen():
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(reporting)))
            try:
                return c.execute("SELECT array_agg(topic ORDER BY topic) FROM mqtt_message_history_text").fetchone()[0]
            finally:
                c.execute("RESET ROLE")

        assert seen() == ["public/a"]
        c.execute("ALTER EXTENSION mqtt_pg UPDATE")
        assert seen() == ["public/a"], "after the update the view shows rows RLS hides"


# --------------------------------------------------------------------------------------------
# R10: mqtt_wait_for_reply takes any received row with the correlation data, of any age,
# topic or broker


