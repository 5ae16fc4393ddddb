"""Received messages: mqtt_subscribe() then mosquitto_pub, rows in mqtt_message_history."""

from __future__ import annotations

import pytest

from harness import broker_status, history_rows, mosquitto_pub, wait_history, wait_ingesting

ALL_BYTES = bytes(range(256))


@pytest.fixture
def subscribed(conn, broker, topic):
    """The test's broker subscribed to '<topic>/+/t' at QoS 1, proven live by an ingested probe."""
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/+/t", broker.name))
    wait_ingesting(conn, broker.port, f"{topic}/probe/t")
    return broker


def db_now(conn):
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


@pytest.mark.parametrize(
    "case, payload, payload_text",
    [
        ("text", "21.5 °C ✓".encode(), "21.5 °C ✓"),
        ("empty", b"", ""),
        ("allbytes", ALL_BYTES, None),
        ("latin1", "café crème".encode("latin-1"), None),
    ],
)
def test_received_message_fields(conn, subscribed, topic, tmp_path, case, payload, payload_text):
    t = f"{topic}/{case}/t"
    before = db_now(conn)
    if case == "text":
        mosquitto_pub(subscribed.port, t, payload.decode(), qos=1)  # -m
    elif case == "empty":
        mosquitto_pub(subscribed.port, t, null=True, qos=1)  # -n
    elif case == "allbytes":
        f = tmp_path / "payload.bin"
        f.write_bytes(payload)
        mosquitto_pub(subscribed.port, t, file=f, qos=1)  # -f
    else:
        mosquitto_pub(subscribed.port, t, payload, qos=1)  # -s, bytes on stdin

    [row] = wait_history(conn, t, 1)
    after = db_now(conn)
    assert row["payload"] == payload
    assert row["payload_text"] == payload_text
    assert row["topic"] == t
    assert row["broker_id"] == subscribed.id
    assert row["direction"] == "receive"
    assert row["qos"] == 1
    assert row["retain"] is False
    assert row["message_id"] is not None, "a QoS 1 message has a packet id"
    assert before <= row["timestamp"] <= after


def test_qos0_message(conn, subscribed, topic):
    t = f"{topic}/qos0/t"
    mosquitto_pub(subscribed.port, t, "q0", qos=0)
    [row] = wait_history(conn, t, 1)
    assert (row["payload"], row["qos"], row["direction"]) == (b"q0", 0, "receive")
    assert row["message_id"] is None, "message_id must be NULL for QoS 0"


def test_qos_is_capped_by_subscription(conn, subscribed, topic):
    """Subscribed at QoS 1: a QoS 2 publish is delivered (and stored) at QoS 1."""
    t = f"{topic}/qos2/t"
    mosquitto_pub(subscribed.port, t, "q2", qos=2)
    [row] = wait_history(conn, t, 1)
    assert (row["payload"], row["qos"]) == (b"q2", 1)


def test_retained_message_on_subscribe(conn, broker, topic):
    """A message retained before the subscription arrives with the retain flag set."""
    t = f"{topic}/retained/t"
    mosquitto_pub(broker.port, t, "last known value", qos=1, retain=True)
    try:
        conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/+/t", broker.name))
        [row] = wait_history(conn, t, 1)
        assert (row["payload"], row["retain"], row["direction"]) == (b"last known value", True, "receive")
    finally:
        mosquitto_pub(broker.port, t, null=True, retain=True)


def test_burst_arrives_exactly_once_in_batches(conn, subscribed, topic, capsys):
    t = f"{topic}/burst/t"
    n = 2000
    expected = [f"b{i:05d}" for i in range(n)]
    mosquitto_pub(subscribed.port, t, lines="\n".join(expected) + "\n", qos=1)  # -l: one message a line
    wait_history(conn, t, n, timeout=60)

    # A duplicate (a redelivery) would be stored before a marker published afterwards.
    marker = f"{topic}/marker/t"
    mosquitto_pub(subscribed.port, marker, "marker", qos=1)
    wait_history(conn, marker, 1)

    rows = history_rows(conn, t)
    payloads = [r["payload"].decode() for r in rows]
    assert len(payloads) == n, f"{len(payloads)} rows for {n} messages"
    assert sorted(payloads) == expected, "every message exactly once"
    assert payloads == expected, "stored (by id) in the order they were published"
    assert all(r["direction"] == "receive" and r["qos"] == 1 for r in rows)
    transactions = len({r["xmin"] for r in rows})
    with capsys.disabled():
        print(f"\n[ingest burst] {n} messages stored by {transactions} transactions")
    assert transactions < n, "messages should be inserted in batches, not one transaction each"

    status = broker_status(conn, subscribed.name)
    assert status["messages_received"] >= n
