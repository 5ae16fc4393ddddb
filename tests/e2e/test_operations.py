"""Operations: the mqtt_broker_status view, logging settings, history retention by partitions and
dead-letter retention.

Settings are changed with ALTER SYSTEM, so these tests run on a cluster of their own (the
session's cluster is shared by every other test).
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess

import psycopg
import pytest
from psycopg import sql

from conftest import extension_cluster, TEST_DB
from harness import (
    HOST,
    PG_BIN,
    mosquitto_pub,
    unique,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)

VIEW_COLUMNS = [
    "broker_id", "name", "status", "active", "since", "last_error", "last_error_at", "reconnects",
    "messages_in", "messages_out", "bytes_in", "bytes_out", "messages_in_per_sec",
    "messages_out_per_sec", "last_message_in_at", "last_message_out_at", "outbox_depth",
    "outbox_depth_exact", "outbox_oldest_age", "dead_letters", "client_id", "worker_pid",
]


@pytest.fixture(scope="module")
def ops_pg():
    with extension_cluster() as cluster:
        yield cluster


@pytest.fixture
def oc(ops_pg):
    c = ops_pg.connect(TEST_DB)
    yield c
    c.close()


def set_setting(cluster, name: str, value: str | None) -> None:
    """ALTER SYSTEM SET (or RESET with None) and reload; wait until a new session sees it."""
    with cluster.connect(TEST_DB) as c:
        if value is None:
            c.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        else:
            c.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
        c.execute("SELECT pg_reload_conf()")
    def seen():
        with cluster.connect(TEST_DB) as c:
            setting, source = c.execute("SELECT setting, source FROM pg_settings WHERE name = %s", (name,)).fetchone()
        return source == "default" if value is None else (source == "configuration file" and setting == value)

    wait_for(seen, message=f"{name} = {value!r} after reload")


def add_broker(conn, port: int, start: bool = True) -> str:
    name = unique("ops")
    conn.execute("INSERT INTO mqtt_broker (name, host, port) VALUES (%s, %s, %s)", (name, HOST, port))
    if start:
        conn.execute("SELECT mqtt_start_listener(%s)", (name,))
        wait_status(conn, name, "connected")
    return name


def status_row(conn, name: str) -> dict:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute("SELECT * FROM mqtt_broker_status WHERE name = %s", (name,)).fetchone()


# --------------------------------------------------------------------------------------------
# mqtt_broker_status


def test_status_view_counts_traffic_both_ways(ops_pg, oc, fresh_mosq, topic):
    name = add_broker(oc, fresh_mosq.port)
    row = status_row(oc, name)
    assert list(row) == VIEW_COLUMNS
    assert row["status"] == "connected" and row["active"] is True
    assert row["messages_in"] == row["messages_out"] == 0
    assert row["since"] is not None and row["last_message_in_at"] is None
    workers = ops_pg.worker_pids(TEST_DB)
    assert row["worker_pid"] in workers
    assert row["client_id"] == oc.execute("SELECT mqtt_status(%s)->>'client_id'", (name,)).fetchone()[0]

    # out: 20 messages of 10 bytes each
    oc.execute("SELECT mqtt_publish(%s, 'x123456789', 1, false, %s) FROM generate_series(1, 20)",
               (f"{topic}/out", name))
    wait_for(lambda: status_row(oc, name)["messages_out"] == 20, message="20 messages out")
    # in: subscribe, then 7 messages of 5 bytes (the probe of wait_ingesting counts too)
    oc.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/in/#", name))
    wait_ingesting(oc, fresh_mosq.port, f"{topic}/in/probe")
    before = status_row(oc, name)
    for i in range(7):
        mosquitto_pub(fresh_mosq.port, f"{topic}/in/{i}", "abcde", qos=1)
    wait_for(lambda: status_row(oc, name)["messages_in"] == before["messages_in"] + 7, message="7 more in")
    row = status_row(oc, name)
    assert row["bytes_out"] == 200
    assert row["bytes_in"] == before["bytes_in"] + 35
    assert row["messages_out_per_sec"] == pytest.approx(20 / 60)
    assert row["messages_in_per_sec"] >= 7 / 60
    now = oc.execute("SELECT now()").fetchone()[0]
    assert now - dt.timedelta(minutes=1) < row["last_message_in_at"] <= now + dt.timedelta(seconds=1)
    assert now - dt.timedelta(minutes=1) < row["last_message_out_at"] <= now + dt.timedelta(seconds=1)
    assert row["outbox_depth"] == 0 and row["outbox_depth_exact"] is True
    assert row["outbox_oldest_age"] is None
    assert row["dead_letters"] == 0


def test_status_view_queue_and_stopped_broker(oc, fresh_mosq, topic):
    name = add_broker(oc, fresh_mosq.port, start=False)
    row = status_row(oc, name)
    assert row["status"] == "stopped" and row["active"] is False
    oc.execute("SELECT mqtt_publish(%s, 'queued', 1, false, %s) FROM generate_series(1, 50)", (topic, name))
    bid = row["broker_id"]
    oc.execute("INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error) "
               "SELECT %s, %s, 'x', 1, 'send', 'test' FROM generate_series(1, 3)", (bid, topic))
    row = status_row(oc, name)
    assert row["outbox_depth"] == 50 and row["outbox_depth_exact"] is True
    assert row["outbox_oldest_age"] is not None and row["outbox_oldest_age"] >= dt.timedelta(0)
    assert row["dead_letters"] == 3
    oc.execute("DELETE FROM mqtt_outbox WHERE broker_id = %s", (bid,))
    oc.execute("DELETE FROM mqtt_dead_letter WHERE broker_id = %s", (bid,))


def test_status_view_stays_cheap_with_a_large_queue(oc, fresh_mosq, topic):
    """Polling reads a bounded number of index entries, however many rows are queued: counted
    with the statistics of the polling transaction itself (not a timing)."""
    name = add_broker(oc, fresh_mosq.port, start=False)
    queued = 60_000
    oc.execute("SELECT count(mqtt_publish(%s, 'q', 0, false, %s)) FROM generate_series(1, %s)",
               (topic, name, queued))
    with oc.transaction():
        row = status_row(oc, name)
        read = oc.execute(
            "SELECT sum(pg_stat_get_xact_tuples_returned(c.oid) + pg_stat_get_xact_tuples_fetched(c.oid)) "
            "FROM pg_class c WHERE c.relname IN ('mqtt_outbox', 'mqtt_outbox_broker', 'mqtt_outbox_pkey')"
        ).fetchone()[0]
    assert row["outbox_depth_exact"] is False
    # one publisher took the ids in one statement: the broker's id span is exact
    assert row["outbox_depth"] == queued
    assert read < 25_000, f"the status read {read} outbox entries for {queued} queued rows"
    oc.execute("DELETE FROM mqtt_outbox WHERE broker_id = (SELECT id FROM mqtt_broker WHERE name = %s)", (name,))


def test_status_view_estimates_each_brokers_share(oc, fresh_mosq, topic):
    """Two brokers' queued rows interleaved (their id spans overlap): once the table has
    statistics, each broker's estimate is its share of the live rows."""
    a = add_broker(oc, fresh_mosq.port, start=False)
    b = add_broker(oc, fresh_mosq.port, start=False)
    oc.execute("SELECT count(mqtt_publish(%s, 'q', 0, false, CASE WHEN i %% 26 < 15 THEN %s ELSE %s END)) "
               "FROM generate_series(1, 26000) i", (topic, a, b))
    oc.execute("ANALYZE mqtt_outbox")
    oc.execute("SELECT pg_stat_force_next_flush()")
    got = {r[0]: (r[1], r[2]) for r in oc.execute(
        "SELECT name, outbox_depth, outbox_depth_exact FROM mqtt_broker_status WHERE name IN (%s, %s)", (a, b)).fetchall()}
    assert got[a][1] is False and got[b][1] is False
    assert got[a][0] == pytest.approx(15_000, rel=0.1)
    assert got[b][0] == pytest.approx(11_000, rel=0.1)
    oc.execute("DELETE FROM mqtt_broker WHERE name IN (%s, %s)", (a, b))


def test_status_view_for_a_monitoring_role(ops_pg, oc, fresh_mosq, topic):
    """A role that may read the broker rows' names sees the queue figures without the right to
    read the queued payloads."""
    name = add_broker(oc, fresh_mosq.port, start=False)
    oc.execute("SELECT mqtt_publish(%s, 'secret payload', 1, false, %s) FROM generate_series(1, 5)", (topic, name))
    role = unique("monitor")
    oc.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    oc.execute(sql.SQL("GRANT SELECT (id, name, active, client_id) ON mqtt_broker TO {}").format(sql.Identifier(role)))
    oc.execute(sql.SQL("GRANT SELECT ON mqtt_broker_status TO {}").format(sql.Identifier(role)))
    try:
        with ops_pg.connect(TEST_DB) as c:
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            row = c.execute("SELECT outbox_depth, status FROM mqtt_broker_status WHERE name = %s", (name,)).fetchone()
            assert row == (5, "stopped")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT payload FROM mqtt_outbox").fetchall()
    finally:
        oc.execute("DELETE FROM mqtt_broker WHERE name = %s", (name,))
        oc.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        oc.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_status_view_privileges(ops_pg, oc, fresh_mosq):
    """A role with no privilege on mqtt_broker reads nothing through the view (security_invoker);
    the database owner reads it."""
    name = add_broker(oc, fresh_mosq.port, start=False)
    role = unique("nopriv")
    oc.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        with ops_pg.connect(TEST_DB) as c:
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT * FROM mqtt_broker_status").fetchall()
        with ops_pg.connect(TEST_DB) as c:
            c.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT mqtt_status(%s)", (name,)).fetchone()
    finally:
        oc.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --------------------------------------------------------------------------------------------
# logging


def test_log_messages_and_connections(ops_pg, oc, fresh_mosq, topic):
    secret_payload = unique("payload-never-logged")
    # off by default: no message line
    assert oc.execute("SHOW mqtt_pg.log_messages").fetchone()[0] == "off"
    assert oc.execute("SHOW mqtt_pg.log_connections").fetchone()[0] == "on"
    log_start = len(ops_pg.log_text())
    name = add_broker(oc, fresh_mosq.port)
    wait_for(lambda: re.search(rf'broker "{name}" \(id \d+\) in database \d+: connected',
                               ops_pg.log_text()[log_start:]), message="a connection line")
    oc.execute("SELECT mqtt_publish(%s, %s, 1, false, %s)", (f"{topic}/quiet", secret_payload, name))
    wait_history(oc, f"{topic}/quiet", direction="send")
    assert f"{topic}/quiet" not in ops_pg.log_text()[log_start:]

    set_setting(ops_pg, "mqtt_pg.log_messages", "on")
    try:
        oc.execute("SELECT mqtt_publish(%s, %s, 1, false, %s)", (f"{topic}/loud", secret_payload, name))
        size = len(secret_payload)
        wait_for(lambda: f'delivered topic "{topic}/loud" ({size} bytes, QoS 1)' in ops_pg.log_text(),
                 message="a delivered line")
        oc.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/in/#", name))
        wait_ingesting(oc, fresh_mosq.port, f"{topic}/in/probe")
        mosquitto_pub(fresh_mosq.port, f"{topic}/in/x", secret_payload, qos=1)
        wait_for(lambda: f'received topic "{topic}/in/x" ({size} bytes, QoS 1)' in ops_pg.log_text(),
                 message="a received line")
        assert secret_payload not in ops_pg.log_text(), "a payload reached the log"
    finally:
        set_setting(ops_pg, "mqtt_pg.log_messages", None)

    # connection events off: a broker restart logs no line for this broker
    set_setting(ops_pg, "mqtt_pg.log_connections", "off")
    try:
        log_off = len(ops_pg.log_text())
        fresh_mosq.restart()
        wait_for(lambda: oc.execute("SELECT reconnects FROM mqtt_broker_status WHERE name = %s",
                                    (name,)).fetchone()[0] >= 1, message="a reconnect")
        wait_status(oc, name, "connected")
        assert f'broker "{name}"' not in ops_pg.log_text()[log_off:]
    finally:
        set_setting(ops_pg, "mqtt_pg.log_connections", None)
    oc.execute("SELECT mqtt_stop_listener(%s)", (name,))


@pytest.mark.parametrize("value", ["30", "2 fortnights", "0 days", "-1 day", "days", "9000 years"])
def test_retention_settings_refuse_bad_values(oc, value):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        oc.execute(sql.SQL("ALTER SYSTEM SET mqtt_pg.history_retention = {}").format(sql.Literal(value)))
    assert e.value.diag.message_detail, "the error says why"
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        oc.execute(sql.SQL("ALTER SYSTEM SET mqtt_pg.dead_letter_retention = {}").format(sql.Literal(value)))
    # sighup settings: not per session
    with pytest.raises(psycopg.errors.CantChangeRuntimeParam):
        oc.execute("SET mqtt_pg.history_retention = '30 days'")


# --------------------------------------------------------------------------------------------
# retention


def partitions(conn) -> dict[str, str]:
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'mqtt_message_history'::regclass ORDER BY 1").fetchall()
    return dict(rows)


def utc_day(offset_days: int) -> dt.date:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=offset_days)).date()


def test_worker_creates_daily_partitions_ahead(oc):
    want = {f"mqtt_message_history_{utc_day(i):%Y%m%d}" for i in range(0, 4)}
    wait_for(lambda: want <= set(partitions(oc)), message=f"partitions {sorted(want)}")
    parts = partitions(oc)
    assert parts["mqtt_message_history_default"] == "DEFAULT"
    today = f"mqtt_message_history_{utc_day(0):%Y%m%d}"
    lo = dt.datetime.combine(utc_day(0), dt.time(), dt.timezone.utc)
    bounds = oc.execute("SELECT _mqtt_partition_bound(%s::regclass, 'FROM'), _mqtt_partition_bound(%s::regclass, 'TO')",
                        (today, today)).fetchone()
    assert bounds == (lo, lo + dt.timedelta(days=1))
    # owned like their parent; members of the extension and configuration tables, so pg_dump
    # dumps their rows (see test_dump_and_restore_keep_history_partitions)
    owners = oc.execute("SELECT DISTINCT relowner FROM pg_class WHERE relname = ANY(%s) OR relname = 'mqtt_message_history'",
                        (sorted(want),)).fetchall()
    assert len(owners) == 1
    members = oc.execute(
        "SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid "
        "WHERE d.deptype = 'e' AND c.relname = ANY(%s)", (sorted(want),)).fetchone()[0]
    assert members == len(want)
    config = oc.execute("SELECT count(*) FROM pg_extension, unnest(extconfig) t "
                        "WHERE extname = 'mqtt_pg' AND t::regclass::text = ANY(%s)", (sorted(want),)).fetchone()[0]
    assert config == len(want)
    # retention's drop takes a partition out of the extension (its row type too, which
    # PostgreSQL 18 records as a member of its own) and drops it; the worker makes it again
    last = f"mqtt_message_history_{utc_day(3):%Y%m%d}"
    oc.execute("SELECT _mqtt_history_partition_drop(%s)", (f"public.{last}",))
    assert oc.execute("SELECT to_regclass(%s)", (last,)).fetchone()[0] is None
    assert oc.execute("SELECT count(*) FROM pg_type WHERE typname IN (%s, %s)", (last, f"_{last}")).fetchone()[0] == 0
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        oc.execute("SELECT _mqtt_history_partition_drop('public.mqtt_outbox')")
    # a message received now lands in today's partition
    row = oc.execute(
        "INSERT INTO mqtt_message_history (topic, payload, qos, direction) VALUES ('t', 'p', 0, 'receive') "
        "RETURNING tableoid::regclass::text").fetchone()[0]
    assert row == today


def test_history_retention_drops_whole_partitions(ops_pg, oc):
    """Rows dated in the past: a day partition older than the retention is dropped whole, the
    default partition is emptied once every row in it is older, recent rows stay, and no row is
    ever deleted one by one."""
    old_day = utc_day(-40)
    part = f"mqtt_message_history_{old_day:%Y%m%d}"
    lo = dt.datetime.combine(old_day, dt.time(), dt.timezone.utc)
    # a partition made by hand for a past day (as the worker made it back then)
    oc.execute(sql.SQL("CREATE TABLE {} PARTITION OF mqtt_message_history FOR VALUES FROM ({}) TO ({})").format(
        sql.Identifier(part), sql.Literal(lo), sql.Literal(lo + dt.timedelta(days=1))))
    tag = unique("ret")
    oc.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction, \"timestamp\") "
               "SELECT %s, 'p', 0, 'receive', %s FROM generate_series(1, 100)", (f"{tag}/old", lo + dt.timedelta(hours=5)))
    # 35 days ago: no partition covers it, so the default partition takes it
    oc.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction, \"timestamp\") "
               "SELECT %s, 'p', 0, 'receive', now() - interval '35 days' FROM generate_series(1, 10)", (f"{tag}/older",))
    oc.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction) "
               "SELECT %s, 'p', 0, 'receive' FROM generate_series(1, 5)", (f"{tag}/new",))
    assert oc.execute("SELECT count(*) FROM mqtt_message_history_default WHERE topic = %s",
                      (f"{tag}/older",)).fetchone()[0] == 10
    deleted_before = oc.execute(
        "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE relname LIKE 'mqtt_message_history%%'").fetchone()[0]
    log_start = len(ops_pg.log_text())
    set_setting(ops_pg, "mqtt_pg.history_retention", "30 days")
    try:
        wait_for(lambda: part not in partitions(oc), message=f"{part} dropped")
        wait_for(lambda: oc.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                                    (f"{tag}/older",)).fetchone()[0] == 0, message="the default partition emptied")
        assert oc.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                          (f"{tag}/new",)).fetchone()[0] == 5
        assert oc.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                          (f"{tag}/old",)).fetchone()[0] == 0
        log = ops_pg.log_text()[log_start:]
        assert re.search(rf"history maintenance in database \d+: dropped (\w+\.)?{part}\n", log), log
        assert "emptied mqtt_message_history_default" in log
        oc.execute("SELECT pg_stat_force_next_flush()")
        deleted_after = oc.execute(
            "SELECT coalesce(sum(n_tup_del), 0) FROM pg_stat_user_tables WHERE relname LIKE 'mqtt_message_history%%'").fetchone()[0]
        assert deleted_after == deleted_before, "retention deleted rows one by one"

        # the default partition with one row inside the retention is left alone (the worker
        # runs exactly this function; called here to see its answer)
        oc.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction, \"timestamp\") "
                   "VALUES (%s, 'p', 0, 'receive', now() - interval '45 days'), "
                   "       (%s, 'p', 0, 'receive', now() + interval '400 days')", (f"{tag}/a", f"{tag}/b"))
        assert oc.execute("SELECT count(*) FROM mqtt_message_history_default WHERE topic LIKE %s",
                          (f"{tag}/%",)).fetchone()[0] == 2
        plan = oc.execute("SELECT action, part FROM _mqtt_history_plan('30 days')").fetchall()
        assert ("empty", "mqtt_message_history_default") not in plan
        oc.execute("DELETE FROM mqtt_message_history WHERE topic LIKE %s", (f"{tag}/%",))
        plan = oc.execute("SELECT action, part FROM _mqtt_history_plan('30 days') WHERE action <> 'create'").fetchall()
        assert plan == [], "nothing left to do"
        # a day older than the retention is not made ahead, and a bad retention is refused
        plan = oc.execute("SELECT action, part FROM _mqtt_history_plan('1 day', 3, now() - interval '10 days')").fetchall()
        assert ("drop", f"mqtt_message_history_{utc_day(0):%Y%m%d}") not in plan
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            oc.execute("SELECT * FROM _mqtt_history_plan('-1 day')")
    finally:
        set_setting(ops_pg, "mqtt_pg.history_retention", None)


def test_dead_letter_retention(ops_pg, oc):
    tag = unique("dl")
    oc.execute("INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error, \"timestamp\") "
               "SELECT NULL, %s, 'p', 1, 'send', 'x', now() - interval '100 days' FROM generate_series(1, 25)",
               (f"{tag}/old",))
    oc.execute("INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error) "
               "SELECT NULL, %s, 'p', 1, 'send', 'x' FROM generate_series(1, 4)", (f"{tag}/new",))
    set_setting(ops_pg, "mqtt_pg.dead_letter_retention", "90 days")
    try:
        wait_for(lambda: oc.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s",
                                    (f"{tag}/old",)).fetchone()[0] == 0, message="old dead letters deleted")
        assert oc.execute("SELECT count(*) FROM mqtt_dead_letter WHERE topic = %s", (f"{tag}/new",)).fetchone()[0] == 4
        assert "deleted 25 dead letters older than mqtt_pg.dead_letter_retention" in ops_pg.log_text()
    finally:
        set_setting(ops_pg, "mqtt_pg.dead_letter_retention", None)


def test_maintenance_functions_are_not_for_users(ops_pg, oc):
    """The database owner (a non-superuser) can neither run retention nor the partition work."""
    owner = unique("owner")
    db = unique("opsdb")
    oc.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
    with ops_pg.connect() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(owner)))
    try:
        with ops_pg.connect(db) as su:
            su.execute("CREATE EXTENSION mqtt_pg")
        with psycopg.connect(host=HOST, port=ops_pg.port, user=owner, dbname=db, autocommit=True) as c:
            for call in ("SELECT * FROM _mqtt_history_plan('1 day')",
                         "SELECT _mqtt_history_partition_create('mqtt_message_history_20300101', now(), now() + interval '1 day')",
                         f"SELECT _mqtt_history_partition_drop('mqtt_message_history_{utc_day(0):%Y%m%d}')",
                         "SELECT _mqtt_dead_letter_expire('1 day')",
                         "SELECT _mqtt_partition_bound(0, 'TO')"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(call)
            # the owner cannot drop a partition either (it is the extension's)
            wait_for(lambda: c.execute("SELECT to_regclass(%s)", (f"mqtt_message_history_{utc_day(1):%Y%m%d}",)).fetchone()[0],
                     message="tomorrow's partition")
            with pytest.raises(psycopg.errors.DependentObjectsStillExist):
                c.execute(f"DROP TABLE mqtt_message_history_{utc_day(1):%Y%m%d}")
            # reading history works for the owner, through the parent
            assert c.execute("SELECT count(*) FROM mqtt_message_history").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM mqtt_broker_status").fetchone()[0] == 0
    finally:
        with ops_pg.connect() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))


def test_dump_and_restore_keep_history_partitions(ops_pg):
    """Odoo's backup (pg_dump as the owner) and restore (as the owner, into a database a
    superuser made with the extension, whose worker has made its own days) keep every history
    row: the partitions' rows are written through the history table, so each lands where the
    restored database keeps its day; a role that may not write history gets nothing in."""
    owner = unique("owner")
    src, dst = unique("src"), unique("dst")
    with ops_pg.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        for d in (src, dst):
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(d), sql.Identifier(owner)))
            with ops_pg.connect(d) as su:
                su.execute("CREATE EXTENSION mqtt_pg")
    today = f"mqtt_message_history_{utc_day(0):%Y%m%d}"
    try:
        def as_owner(d):
            return psycopg.connect(host=HOST, port=ops_pg.port, user=owner, dbname=d, autocommit=True)

        with as_owner(src) as c:
            wait_for(lambda: c.execute("SELECT to_regclass(%s)", (today,)).fetchone()[0], message="today's partition")
            c.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction) VALUES ('today', 'a', 0, 'receive')")
            c.execute("INSERT INTO mqtt_message_history (topic, payload, qos, direction, \"timestamp\") "
                      "VALUES ('past', 'b', 0, 'receive', now() - interval '10 days')")
            want = c.execute("SELECT id, topic, payload FROM mqtt_message_history ORDER BY id").fetchall()
        with as_owner(dst) as c:
            wait_for(lambda: c.execute("SELECT to_regclass(%s)", (today,)).fetchone()[0],
                     message="today's partition in the restored database")
        dump = subprocess.run([str(PG_BIN / "pg_dump"), "-h", HOST, "-p", str(ops_pg.port), "-U", owner, src],
                              capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        assert f"CREATE TABLE public.{today}" not in dump.stdout, "partitions are the extension's: rows only"
        assert f"COPY public.{today}" in dump.stdout
        r = subprocess.run([str(PG_BIN / "psql"), "-h", HOST, "-p", str(ops_pg.port), "-U", owner, "-d", dst,
                            "-v", "ON_ERROR_STOP=1", "-q"], input=dump.stdout, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "ERROR" in l)
        with as_owner(dst) as c:
            got = c.execute("SELECT id, topic, payload FROM mqtt_message_history ORDER BY id").fetchall()
            assert got == want
            where = dict(c.execute("SELECT topic, tableoid::regclass::text FROM mqtt_message_history").fetchall())
            assert where == {"today": today, "past": "mqtt_message_history_default"}
        # a role without INSERT on history gets nothing in by naming a partition
        stranger = unique("stranger")
        with ops_pg.connect(dst) as su:
            su.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(stranger)))
        try:
            with psycopg.connect(host=HOST, port=ops_pg.port, user=stranger, dbname=dst, autocommit=True) as c:
                for part in (today, "mqtt_message_history_20300101", "mqtt_message_history_default"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        with c.cursor().copy(sql.SQL("COPY {} (topic, payload, qos, direction) FROM STDIN").format(
                                sql.Identifier(part))) as cp:
                            cp.write_row(("x", b"x", 0, "receive"))
                assert c.execute("SELECT to_regclass('mqtt_message_history_20300101')").fetchone()[0] is None
        finally:
            with ops_pg.connect(dst) as su:
                su.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))
    finally:
        with ops_pg.connect() as admin:
            for d in (src, dst):
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(d)))
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(owner)))


def test_a_taken_partition_name_does_not_stop_the_day(oc):
    """A table of the owner's named like a coming day's partition: the day gets its partition
    under another name all the same."""
    day = utc_day(5)
    name = f"mqtt_message_history_{day:%Y%m%d}"
    oc.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(name)))
    try:
        plan = oc.execute("SELECT action, part FROM _mqtt_history_plan(NULL, 3, now() + interval '2 days')").fetchall()
        assert ("create", f"{name}_2") in plan
        assert ("create", name) not in plan
    finally:
        oc.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
