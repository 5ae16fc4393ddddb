"""Fixtures for mqtt_pg's end-to-end tests: a real PostgreSQL 15 with the extension preloaded and
real mosquitto brokers, all on 127.0.0.1 and free ports, all stopped at the end of the session.

Each test gets fresh broker rows and unique topics, so tests do not depend on each other's order.
"""

from __future__ import annotations

import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

sys.path.insert(0, str(Path(__file__).parent))

import harness  # noqa: E402
from harness import Mosquitto, PgCluster, tail, unique, wait_status  # noqa: E402

# The database the tests run in: not `postgres`, as an Odoo database would not be. mqtt_pg runs
# one worker per database that has the extension.
TEST_DB = os.environ.get("MQTT_PG_TEST_DB", "mqtt_e2e")


@dataclass
class Broker:
    id: int
    name: str
    port: int
    client_id: str | None = None


@contextmanager
def extension_cluster():
    """A cluster with shared_preload_libraries = 'mqtt_pg' and the extension created in TEST_DB,
    destroyed on exit."""
    cluster = PgCluster(preload=True, extra_conf=os.environ.get("MQTT_PG_TEST_PGCONF", "")).init()
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.destroy()
        pytest.fail(f"could not start PostgreSQL with mqtt_pg preloaded (is the extension installed? "
                    f"run scripts/setup.sh):\n{e}", pytrace=False)
    try:
        if TEST_DB != "postgres":
            cluster.create_database(TEST_DB)
        with cluster.connect(TEST_DB) as c:
            c.execute("CREATE EXTENSION mqtt_pg")
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def pg():
    """The session's cluster (see extension_cluster)."""
    with extension_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def mosq():
    """A mosquitto shared by the tests that do not stop or restart their broker."""
    m = Mosquitto().start()
    yield m
    m.destroy()


@pytest.fixture
def mosquitto_factory():
    """Start extra brokers for one test (stopped and removed after it)."""
    started: list[Mosquitto] = []

    def make(**kw) -> Mosquitto:
        m = Mosquitto(**kw).start()
        started.append(m)
        return m

    yield make
    for m in started:
        m.destroy()


@pytest.fixture
def fresh_mosq(mosquitto_factory) -> Mosquitto:
    """A mosquitto of this test's own: stop it, restart it, read its log."""
    return mosquitto_factory()


@pytest.fixture
def conn(pg):
    """An autocommit connection to the test database, closed after the test."""
    c = pg.connect(TEST_DB)
    yield c
    c.close()


@pytest.fixture
def connect(pg):
    """Open more connections (closed after the test)."""
    opened: list[psycopg.Connection] = []

    def make(autocommit: bool = True) -> psycopg.Connection:
        c = pg.connect(TEST_DB, autocommit=autocommit)
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.close()


@pytest.fixture
def scratch_db(pg):
    """Create databases for one test: scratch_db("prefix") returns a new database's name. They
    are dropped after the test, whatever state it left them in."""
    made: list[str] = []

    def make(prefix: str = "db") -> str:
        name = unique(prefix)
        with pg.connect() as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return name

    yield make
    with pg.connect() as admin:
        for name in reversed(made):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def topic() -> str:
    """A unique topic prefix for this test, e.g. 'e2e/3f2a...'."""
    return f"e2e/{uuid.uuid4().hex[:16]}"


@pytest.fixture
def make_broker(pg, conn, mosq):
    """Create mqtt_broker rows for this test (never is_default): make_broker(port=..., start=True).

    With start=True the listener is started and the fixture waits until it is connected. After
    the test every listener it made is stopped, so nothing keeps running into the next test."""
    made: list[Broker] = []

    def make(port: int | None = None, start: bool = True, name: str | None = None, **columns) -> Broker:
        name = name or unique("b")
        port = port or mosq.port
        cols = {"name": name, "host": harness.HOST, "port": port, **columns}
        query = sql.SQL("INSERT INTO mqtt_broker ({}) VALUES ({}) RETURNING id").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            sql.SQL(", ").join(sql.Placeholder() * len(cols)),
        )
        broker_id = conn.execute(query, list(cols.values())).fetchone()[0]
        b = Broker(broker_id, name, port)
        made.append(b)
        if start:
            b.client_id = conn.execute("SELECT mqtt_start_listener(%s)", (name,)).fetchone()[0]
            wait_status(conn, name, "connected")
        return b

    yield make
    with pg.connect(TEST_DB) as c:
        for b in made:
            try:
                c.execute("SELECT mqtt_stop_listener(%s)", (b.name,))
            except psycopg.Error:
                pass


@pytest.fixture
def broker(make_broker) -> Broker:
    """A fresh broker row on the shared mosquitto, listener started and connected."""
    return make_broker()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tail of every running server's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for server in list(harness._live):
            text = server.log_text()
            if text:
                report.sections.append((f"log tail: {server!r}", tail(text, 80)))
