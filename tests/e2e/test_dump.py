"""pg_dump keeps mqtt_pg's data: an Odoo backup and restore must not lose brokers,
subscriptions, undelivered messages or history."""

from __future__ import annotations

import subprocess

from harness import HOST, PG_BIN, unique


def test_dump_and_restore_keep_configuration_and_queued_messages(pg, mosq):
    src = unique("dumpsrc")
    dst = src + "_restored"
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{src}"')
        admin.execute(f'CREATE DATABASE "{dst}"')
    try:
        with pg.connect(src) as c:
            c.execute("CREATE EXTENSION mqtt_pg")
            # A broker that is not started: its message stays queued in the outbox.
            c.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('b', %s, %s, true)",
                      (HOST, mosq.port))
            c.execute("SELECT mqtt_subscribe('plant/#', 1)")
            c.execute("SELECT mqtt_publish('plant/cmd', 'queued', 1)")
        dump = subprocess.run(
            [str(PG_BIN / "pg_dump"), "-h", HOST, "-p", str(pg.port), "-U", "postgres", src],
            check=True, capture_output=True, text=True, timeout=60).stdout
        subprocess.run(
            [str(PG_BIN / "psql"), "-h", HOST, "-p", str(pg.port), "-U", "postgres", "-d", dst,
             "-v", "ON_ERROR_STOP=1", "-q"],
            input=dump, check=True, capture_output=True, text=True, timeout=60)
        with pg.connect(dst) as c:
            assert c.execute("SELECT name, port, is_default FROM mqtt_broker").fetchall() == [("b", mosq.port, True)]
            assert c.execute("SELECT name, subscribe FROM mqtt_topic").fetchall() == [("plant/#", True)]
            assert c.execute("SELECT topic, payload FROM mqtt_outbox").fetchall() == [("plant/cmd", b"queued")]
            # Sequences came along too: new rows do not collide with restored ones.
            c.execute("INSERT INTO mqtt_broker (name, host) VALUES ('b2', 'localhost')")
            c.execute("SELECT mqtt_publish('plant/cmd', 'after restore', 0, false, 'b')")
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dst}"')
            admin.execute(f'DROP DATABASE IF EXISTS "{src}"')
