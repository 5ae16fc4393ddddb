"""An Odoo database is owned by a role that is not a superuser: that role must be able to use
mqtt_pg fully, and other roles must not be able to disturb it."""

from __future__ import annotations

import psycopg
import pytest

from harness import (
    HOST,
    mosquitto_pub,
    mqtt_sub,
    unique,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)


@pytest.fixture
def odoo_db(pg):
    """A database owned by a non-superuser role 'odoo_*', with the extension created by the
    superuser (CREATE EXTENSION needs one), as an Odoo installation has it."""
    role = unique("odoo")
    db = unique("odoodb")
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{role}"')
    with pg.connect(db) as su:
        su.execute("CREATE EXTENSION mqtt_pg")
    yield db, role
    with pg.connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
        admin.execute(f'DROP ROLE IF EXISTS "{role}"')


def connect_as(pg, db, role) -> psycopg.Connection:
    return psycopg.connect(host=HOST, port=pg.port, dbname=db, user=role, autocommit=True)


def test_database_owner_uses_everything(pg, mosq, odoo_db):
    db, role = odoo_db
    t = f"e2e/{unique('priv')}"
    with connect_as(pg, db, role) as c:
        assert c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
        # configure directly, as an Odoo model would, and through the functions
        c.execute("INSERT INTO mqtt_broker (name, host, port) VALUES ('b', %s, %s)", (HOST, mosq.port))
        client_id = c.execute("SELECT mqtt_start_listener('b')").fetchone()[0]
        wait_status(c, "b", "connected")
        c.execute("SELECT mqtt_subscribe(%s, 1, 'b')", (f"{t}/in/#",))
        wait_ingesting(c, mosq.port, f"{t}/in/probe")
        c.execute("UPDATE mqtt_topic SET description = 'sensors' WHERE name = %s", (f"{t}/in/#",))

        with mqtt_sub(mosq.port, f"{t}/out", qos=1) as sub:
            c.execute("SELECT mqtt_publish(%s, 'from odoo', 1, false, 'b')", (f"{t}/out",))
            assert sub.wait_count(1)[0][1] == b"from odoo"

        mosquitto_pub(mosq.port, f"{t}/in/x", "to odoo", qos=1)
        [row] = wait_history(c, f"{t}/in/x", 1)
        assert row["payload"] == b"to odoo"
        # prune history, as a retention cron would
        assert c.execute("DELETE FROM mqtt_message_history WHERE topic = %s", (f"{t}/in/x",)).rowcount == 1
        assert c.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0] == client_id
        assert c.execute("SELECT mqtt_unsubscribe(%s, 'b')", (f"{t}/in/#",)).fetchone()[0] is True
        # dead letters: requeue one (an outgoing row set aside earlier) and see it leave again
        c.execute("UPDATE mqtt_broker SET max_packet_size = 100 WHERE name = 'b'")
        with mqtt_sub(mosq.port, f"{t}/out", qos=1) as sub:
            c.execute("SELECT mqtt_publish(%s, repeat('z', 200), 1, false, 'b')", (f"{t}/out",))
            wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 1,
                     message="the oversized row dead-lettered")
            c.execute("UPDATE mqtt_broker SET max_packet_size = NULL WHERE name = 'b'")
            assert c.execute("SELECT mqtt_requeue_dead_letters('b')").fetchone()[0] == 1
            assert sub.wait_count(1)[0][1] == b"z" * 200
        assert c.execute("SELECT mqtt_stop_listener('b')").fetchone()[0] is True
        # internal functions are not for it
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT _mqtt_pg_wake(2)")


def test_other_roles_get_nothing_by_default(pg, odoo_db):
    db, _ = odoo_db
    other = unique("other")
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{other}" LOGIN NOSUPERUSER')
    try:
        with connect_as(pg, db, other) as c:
            for query in ("SELECT password FROM mqtt_broker",
                          "SELECT * FROM mqtt_message_history",
                          "SELECT mqtt_publish('a/b', 'x')",
                          "SELECT mqtt_requeue_dead_letter(1)",
                          "SELECT mqtt_requeue_dead_letters()"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    c.execute(query)
            # The configuration trigger's function runs as the extension's owner: nobody else
            # may attach it to tables of their own.
            c.execute("CREATE TEMP TABLE t (x int)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("CREATE TRIGGER w AFTER INSERT ON t FOR EACH STATEMENT "
                          "EXECUTE FUNCTION _mqtt_pg_config_changed()")
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP ROLE "{other}"')


def test_a_failed_drop_database_by_another_role_leaves_the_worker_alone(pg, mosq, odoo_db):
    """DROP DATABASE / RENAME by a role that does not own the database fail on their own; they
    must not stop the database's worker on the way."""
    db, role = odoo_db
    other = unique("mallory")
    with connect_as(pg, db, role) as c:
        c.execute("INSERT INTO mqtt_broker (name, host, port, active) VALUES ('b', %s, %s, true)", (HOST, mosq.port))
        wait_status(c, "b", "connected")
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{other}" LOGIN NOSUPERUSER')
        pid = admin.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' "
                            "AND datname = %s", (db,)).fetchone()[0]
    try:
        with psycopg.connect(host=HOST, port=pg.port, dbname="postgres", user=other, autocommit=True) as m:
            for stmt in (f'DROP DATABASE "{db}"', f'ALTER DATABASE "{db}" RENAME TO "{db}_x"'):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    m.execute(stmt)
        # Inside a transaction block DROP DATABASE fails too, even for the owner.
        with connect_as(pg, "postgres", role) as o:
            with pytest.raises(psycopg.errors.ActiveSqlTransaction):
                with o.transaction():
                    o.execute(f'DROP DATABASE "{db}"')
        # A worker told to stop sends nothing more, and its successor starts only seconds
        # later: a message that still goes out at once proves the worker was left alone.
        t = f"e2e/{unique('alive')}"
        with mqtt_sub(mosq.port, t, qos=1) as sub, connect_as(pg, db, role) as c:
            c.execute("SELECT mqtt_publish(%s, 'still here', 1)", (t,))
            sub.wait_count(1, timeout=3)
        with pg.connect() as admin:
            still = admin.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' "
                                  "AND datname = %s", (db,)).fetchone()
        assert still == (pid,), "the worker was stopped by a command that could not succeed"
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP ROLE "{other}"')
