"""Bad input gets the contract's SQLSTATE, and a failed call changes nothing."""

from __future__ import annotations

import psycopg
import pytest

from harness import PgCluster, table_counts, unique

INVALID = "22023"  # invalid_parameter_value
UNDEFINED = "42704"  # undefined_object
TOO_LARGE = "54000"  # program_limit_exceeded
PREREQ = "55000"  # object_not_in_prerequisite_state


def expect_error(conn, query, params, sqlstate) -> psycopg.Error:
    """Run `query`, assert it fails with `sqlstate` and that no extension table changed."""
    before = table_counts(conn)
    with pytest.raises(psycopg.Error) as info:
        conn.execute(query, params)
    err = info.value
    assert err.sqlstate == sqlstate, f"{query} {str(params)[:80]}: expected {sqlstate}, got {err.sqlstate}: {err}"
    assert table_counts(conn) == before, "a failed call must not queue or store anything"
    return err


@pytest.fixture
def idle_broker(make_broker):
    """A broker row that exists but is not started: errors must come from the arguments."""
    return make_broker(start=False)


# --- mqtt_publish -----------------------------------------------------------------------------

PUBLISH = "SELECT mqtt_publish(%s, %s::text, %s, false, %s)"


@pytest.mark.parametrize(
    "topic, qos",
    [
        pytest.param("", 0, id="empty-topic"),
        pytest.param("a/+/b", 0, id="plus-in-topic"),
        pytest.param("a/#", 0, id="hash-in-topic"),
        pytest.param("+", 0, id="plus-alone"),
        pytest.param("a" * 65536, 0, id="topic-65536-bytes"),
        pytest.param("é" * 32768, 0, id="topic-65536-bytes-32768-chars"),
        pytest.param("ok/topic", -1, id="qos-minus-1"),
        pytest.param("ok/topic", 3, id="qos-3"),
    ],
)
def test_publish_invalid_arguments(conn, idle_broker, topic, qos):
    # (a NUL byte in a topic cannot be passed in a text argument at all, so it is not tested)
    expect_error(conn, PUBLISH, (topic, "x", qos, idle_broker.name), INVALID)


def test_publish_unknown_broker(conn):
    expect_error(conn, PUBLISH, ("ok/topic", "x", 0, unique("nosuch")), UNDEFINED)


def test_no_default_broker(conn, make_broker):
    """Two brokers, neither is_default: broker NULL is an error (and tells so)."""
    assert conn.execute("SELECT count(*) FROM mqtt_broker WHERE is_default").fetchone()[0] == 0, \
        "precondition: the tests never create a default broker"
    make_broker(start=False)
    make_broker(start=False)
    expect_error(conn, "SELECT mqtt_publish('ok/topic', 'x'::text)", None, UNDEFINED)
    expect_error(conn, "SELECT mqtt_subscribe('ok/#')", None, UNDEFINED)
    expect_error(conn, "SELECT mqtt_status()", None, UNDEFINED)


@pytest.mark.parametrize(
    "cast, payload",
    [
        pytest.param("text", "x" * 101, id="text-101"),
        pytest.param("text", "é" * 51, id="text-102-bytes-51-chars"),
        pytest.param("bytea", b"\0" * 101, id="bytea-101"),
        pytest.param("jsonb", '{"k": "' + "x" * 100 + '"}', id="jsonb-over-100"),
    ],
)
def test_publish_payload_too_large(conn, idle_broker, cast, payload):
    conn.execute("SET mqtt_pg.max_payload_size = 100")
    expect_error(conn, f"SELECT mqtt_publish('ok/topic', %s::{cast}, 0, false, %s)",
                 (payload, idle_broker.name), TOO_LARGE)


def test_publish_payload_at_the_limit_is_accepted(conn, idle_broker):
    conn.execute("SET mqtt_pg.max_payload_size = 100")
    with conn.transaction():
        conn.execute("SELECT mqtt_publish('ok/topic', %s::bytea, 0, false, %s)", (b"\xff" * 100, idle_broker.name))
        raise psycopg.Rollback()  # nothing is left queued


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((None, "x", 0, False), id="null-topic"),
        pytest.param(("ok/topic", None, 0, False), id="null-payload"),
        pytest.param(("ok/topic", "x", None, False), id="null-qos"),
        pytest.param(("ok/topic", "x", 0, None), id="null-retain"),
    ],
)
def test_publish_null_arguments(conn, idle_broker, args):
    """NULLs are refused with a clear error, never silently ignored (a STRICT function would
    return NULL and send nothing without a word)."""
    err = expect_error(conn, "SELECT mqtt_publish(%s, %s::text, %s, %s, %s)", (*args, idle_broker.name), INVALID)
    assert "NULL" in str(err)


def test_errors_say_what_to_do(conn, idle_broker):
    err = expect_error(conn, PUBLISH, ("plant/+/t", "x", 0, idle_broker.name), INVALID)
    assert "wildcard" in str(err)
    assert err.diag.message_hint, "a hint tells how to fix it"
    err = expect_error(conn, PUBLISH, ("ok/topic", "x", 0, "no_such_broker"), UNDEFINED)
    assert "no_such_broker" in str(err)
    assert "mqtt_broker" in err.diag.message_hint
    err = expect_error(conn, PUBLISH, ("ok/topic", "x", 7, idle_broker.name), INVALID)
    assert err.diag.message_hint


def test_no_broker_at_all(pg):
    """In a database with no broker row, broker NULL explains how to add one."""
    name = unique("nobroker")
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with pg.connect(name) as c:
            c.execute("CREATE EXTENSION mqtt_pg")
            for query in ("SELECT mqtt_publish('ok/topic', 'x')", "SELECT mqtt_start_listener()",
                          "SELECT mqtt_status()", "SELECT mqtt_subscribe('ok/#')"):
                err = expect_error(c, query, None, UNDEFINED)
                assert "INSERT INTO mqtt_broker" in err.diag.message_hint
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# --- mqtt_subscribe / mqtt_unsubscribe --------------------------------------------------------

SUBSCRIBE = "SELECT mqtt_subscribe(%s, %s, %s)"


@pytest.mark.parametrize(
    "topic_filter, qos",
    [
        pytest.param("a/#/b", 0, id="hash-not-last"),
        pytest.param("a/b#", 0, id="hash-inside-level"),
        pytest.param("a+", 0, id="plus-inside-level"),
        pytest.param("", 0, id="empty-filter"),
        pytest.param("a" * 65536, 0, id="filter-65536-bytes"),
        pytest.param("ok/#", 5, id="qos-5"),
        pytest.param("ok/#", -1, id="qos-minus-1"),
    ],
)
def test_subscribe_invalid_arguments(conn, idle_broker, topic_filter, qos):
    expect_error(conn, SUBSCRIBE, (topic_filter, qos, idle_broker.name), INVALID)


def test_subscribe_unknown_broker(conn):
    expect_error(conn, SUBSCRIBE, ("ok/#", 0, unique("nosuch")), UNDEFINED)


@pytest.mark.parametrize("topic_filter", ["a/#/b", "", None])
def test_unsubscribe_invalid_filter(conn, idle_broker, topic_filter):
    expect_error(conn, "SELECT mqtt_unsubscribe(%s, %s)", (topic_filter, idle_broker.name), INVALID)


def test_unsubscribe_of_a_filter_never_subscribed_is_false(conn, idle_broker):
    assert conn.execute("SELECT mqtt_unsubscribe('never/#', %s)", (idle_broker.name,)).fetchone()[0] is False


def test_subscribe_null_filter_and_qos(conn, idle_broker):
    expect_error(conn, SUBSCRIBE, (None, 0, idle_broker.name), INVALID)
    expect_error(conn, SUBSCRIBE, ("ok/#", None, idle_broker.name), INVALID)


@pytest.mark.parametrize("table", ["mqtt_broker", "mqtt_access_control", "mqtt_outbox", "mqtt_message_history"])
def test_subscribe_refuses_the_extensions_own_tables_as_target(conn, idle_broker, table):
    """Devices must not be able to write brokers, access rules or the outbox by publishing:
    the extension's tables are never a target, whoever asks (here a superuser)."""
    before = conn.execute("SELECT count(*) FROM mqtt_topic").fetchone()[0]
    expect_error(conn, "SELECT mqtt_subscribe('ok/#', 0, %s, target_table => %s::regclass)",
                 (idle_broker.name, table), "22023")
    expect_error(conn, "INSERT INTO mqtt_topic (broker_id, name, subscribe, target_table) "
                       "VALUES ((SELECT id FROM mqtt_broker WHERE name = %s), 'ok/#', true, %s::regclass)",
                 (idle_broker.name, table), "22023")
    assert conn.execute("SELECT count(*) FROM mqtt_topic").fetchone()[0] == before


def test_unsubscribe_unknown_broker(conn):
    expect_error(conn, "SELECT mqtt_unsubscribe(%s, %s)", ("ok/#", unique("nosuch")), UNDEFINED)


# --- listener functions -----------------------------------------------------------------------


@pytest.mark.parametrize("function", ["mqtt_start_listener", "mqtt_stop_listener", "mqtt_status"])
def test_listener_functions_unknown_broker(conn, function):
    expect_error(conn, f"SELECT {function}(%s)", (unique("nosuch"),), UNDEFINED)


# --- loaded without shared_preload_libraries --------------------------------------------------


@pytest.fixture(scope="module")
def unpreloaded_pg():
    cluster = PgCluster(preload=False).init().start()
    yield cluster
    cluster.destroy()


def test_create_extension_requires_shared_preload_libraries(unpreloaded_pg):
    with unpreloaded_pg.connect() as c:
        with pytest.raises(psycopg.Error) as info:
            c.execute("CREATE EXTENSION mqtt_pg")
        err = info.value
        assert err.sqlstate == PREREQ, f"expected {PREREQ}, got {err.sqlstate}: {err}"
        assert "shared_preload_libraries" in (err.diag.message_hint or ""), f"HINT: {err.diag.message_hint!r}"
        assert c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == 0
