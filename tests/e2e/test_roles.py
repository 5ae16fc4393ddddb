"""The README's three roles (Security section): its statements, run exactly as written, give
each role what the README says and nothing more."""

from __future__ import annotations

import re

import psycopg
import pytest

from harness import HOST, mqtt_sub, wait_status
from test_readme import README


def block(tag: str) -> list[str]:
    """The statements of one README block, one by one (CREATE DATABASE cannot share a
    transaction with others)."""
    [text] = re.findall(rf"```sql {tag}\n(.*?)```", README.read_text(), flags=re.S)
    text = re.sub(r"--[^\n]*", "", text)
    return [s.strip() for s in text.split(";") if s.strip()]


def run(conn, tag: str) -> None:
    for stmt in block(tag):
        conn.execute(stmt)


@pytest.fixture
def roles_db(pg):
    with pg.connect() as admin:
        run(admin, "roles-superuser")
    with pg.connect("odoo") as su:
        run(su, "roles-extension")
    yield
    with pg.connect() as admin:
        admin.execute("DROP DATABASE IF EXISTS odoo WITH (FORCE)")
        for r in ("pump1", "reporting", "odoo"):
            admin.execute(f"DROP ROLE IF EXISTS {r}")


def as_role(pg, role):
    return psycopg.connect(host=HOST, port=pg.port, dbname="odoo", user=role, autocommit=True)


def test_three_roles_do_what_the_readme_says(pg, mosq, roles_db):
    with as_role(pg, "odoo") as odoo, as_role(pg, "pump1") as pump, as_role(pg, "reporting") as rep:
        run(odoo, "roles-owner")
        # odoo administers: brokers, listener, status, history, rules.
        odoo.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('local', %s, %s, true)",
                     (HOST, mosq.port))
        odoo.execute("SELECT mqtt_start_listener()")
        wait_status(odoo, "local", "connected")
        # pump1 publishes to its own topics, and that is all.
        with mqtt_sub(mosq.port, "devices/#", qos=1) as sub:
            pump.execute("SELECT mqtt_publish('devices/pump1/state', 'on')")
            assert sub.wait_count(1)[0][:2] == ("devices/pump1/state", b"on")
        denied = ["SELECT mqtt_publish('devices/pump2/state', 'on')",
                  "SELECT mqtt_subscribe('devices/pump1/#')",
                  "SELECT * FROM mqtt_message_history",
                  "SELECT * FROM mqtt_broker",
                  "SELECT mqtt_start_listener()",
                  "SELECT mqtt_status()",
                  "INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES ('pump1', '#', true)"]
        for stmt in denied:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                pump.execute(stmt)
        # reporting reads history and nothing else.
        odoo.execute("SELECT mqtt_publish('odoo/report', 'r')")
        assert rep.execute("SELECT count(*) FROM mqtt_message_history_text").fetchone()[0] >= 0
        for stmt in ("SELECT mqtt_publish('odoo/x', 'x')", "SELECT mqtt_subscribe('odoo/#')",
                     "SELECT * FROM mqtt_broker", "SELECT * FROM mqtt_outbox", "DELETE FROM mqtt_message_history",
                     "SELECT * FROM mqtt_access_control", "SELECT mqtt_stop_listener()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                rep.execute(stmt)
        odoo.execute("SELECT mqtt_stop_listener()")
    for role in ("odoo", "pump1", "reporting"):
        with pg.connect() as admin:
            assert admin.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0] is False
