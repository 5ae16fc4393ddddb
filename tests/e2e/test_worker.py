"""The background workers' lifecycle: one per database, settings reload, SIGTERM, DROP DATABASE,
and a database that gets the extension while the server runs."""

from __future__ import annotations

import time

from conftest import TEST_DB
from harness import (
    HOST,
    serve_broker,
    mosquitto_pub,
    mqtt_sub,
    pid_alive,
    unique,
    wait_for,
    wait_history,
    wait_ingesting,
    wait_status,
)


def worker_pid(pg, dbname: str) -> int | None:
    with pg.connect() as c:
        row = c.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' AND datname = %s",
            (dbname,),
        ).fetchone()
    return row[0] if row else None


def xact_count(conn, topic_prefix: str) -> tuple[int, int]:
    """(rows, distinct inserting transactions) of received rows under a topic prefix."""
    return conn.execute(
        "SELECT count(*), count(DISTINCT xmin::text) FROM mqtt_message_history "
        "WHERE direction = 'receive' AND topic LIKE %s",
        (topic_prefix + "/%",),
    ).fetchone()


def test_settings_reload_reaches_the_worker(pg, conn, broker, topic):
    """SIGHUP (pg_reload_conf) is handled by the running worker: with ingest_batch_size = 1 every
    received message gets a transaction of its own."""
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/#", broker.name))
    wait_ingesting(conn, broker.port, f"{topic}/probe")
    try:
        conn.execute("ALTER SYSTEM SET mqtt_pg.ingest_batch_size = 1")
        conn.execute("SELECT pg_reload_conf()")

        # The reload reaches the worker asynchronously: send bursts until one is stored one
        # message per transaction (with the default batch size, 30 back-to-back messages share
        # transactions), which proves the new value is in force.
        def burst_in_own_transactions():
            prefix = f"{topic}/{unique('burst')}"
            mosquitto_pub(broker.port, f"{prefix}/x", lines="\n".join(str(i) for i in range(30)) + "\n", qos=1)
            wait_for(lambda: xact_count(conn, prefix)[0] == 30, message="30 burst rows")
            return xact_count(conn, prefix) == (30, 30)

        wait_for(burst_in_own_transactions, timeout=30, interval=0, message="batch size 1 in force")

        prefix = f"{topic}/final"
        mosquitto_pub(broker.port, f"{prefix}/x", lines="\n".join(str(i) for i in range(200)) + "\n", qos=1)
        wait_for(lambda: xact_count(conn, prefix)[0] == 200, message="200 rows")
        assert xact_count(conn, prefix) == (200, 200)
    finally:
        conn.execute("ALTER SYSTEM RESET mqtt_pg.ingest_batch_size")
        conn.execute("SELECT pg_reload_conf()")


def test_terminated_worker_comes_back(pg, conn, broker, topic):
    """pg_terminate_backend stops the worker promptly; the launcher starts a new one, which
    reconnects and subscribes again without anyone calling mqtt_start_listener."""
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/#", broker.name))
    wait_ingesting(conn, broker.port, f"{topic}/probe")
    old = worker_pid(pg, TEST_DB)
    assert old is not None

    conn.execute("SELECT pg_terminate_backend(%s)", (old,))
    wait_for(lambda: not pid_alive(old), timeout=5, message="the worker to exit after SIGTERM")

    new = wait_for(lambda: worker_pid(pg, TEST_DB), timeout=30, message="a new worker")
    assert new != old
    wait_status(conn, broker.name, "connected", timeout=30)
    mosquitto_pub(broker.port, f"{topic}/after", "back", qos=1)
    [row] = wait_history(conn, f"{topic}/after", 1)
    assert row["payload"] == b"back"


def test_drop_and_rename_database_with_a_running_worker(pg, mosq):
    """The worker steps aside for ALTER DATABASE ... RENAME and DROP DATABASE, which need the
    database to themselves; without that both fail with 'being accessed by other users'."""
    name = unique("dropme")
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    with pg.connect(name) as c:
        serve_broker(c, mosq.port)
    assert worker_pid(pg, name) is not None

    renamed = name + "_r"
    with pg.connect() as admin:
        admin.execute(f'ALTER DATABASE "{name}" RENAME TO "{renamed}"')
    # The launcher brings the worker back (after its pause) under the new name.
    wait_for(lambda: worker_pid(pg, renamed), timeout=30, message="the worker back after RENAME")
    with pg.connect(renamed) as c:
        wait_status(c, "b", "connected", timeout=30)

    with pg.connect() as admin:
        admin.execute(f'DROP DATABASE "{renamed}"')
        assert admin.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (renamed,)).fetchone()[0] == 0
    assert worker_pid(pg, renamed) is None


def test_each_database_has_its_own_worker_and_client_id(pg, conn, broker, topic, mosq, scratch_db):
    """A second database with the extension and a broker on the same mosquitto works on its own:
    a worker of its own, a different generated client id, its own subscriptions."""
    other = scratch_db("otherdb")
    with pg.connect(other) as c:
        c.execute("CREATE EXTENSION mqtt_pg")
        c.execute("INSERT INTO mqtt_broker (name, host, port) VALUES (%s, %s, %s)",
                  (broker.name, HOST, mosq.port))
        other_client = c.execute("SELECT mqtt_start_listener(%s)", (broker.name,)).fetchone()[0]
        wait_status(c, broker.name, "connected")
        assert other_client != broker.client_id
        assert worker_pid(pg, other) not in (None, worker_pid(pg, TEST_DB))

        c.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/other/#", broker.name))
        conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/main/#", broker.name))
        wait_ingesting(c, mosq.port, f"{topic}/other/probe")
        wait_ingesting(conn, mosq.port, f"{topic}/main/probe")

        mosquitto_pub(mosq.port, f"{topic}/other/x", "for other", qos=1)
        mosquitto_pub(mosq.port, f"{topic}/main/x", "for main", qos=1)
        [row] = wait_history(c, f"{topic}/other/x", 1)
        assert row["payload"] == b"for other"
        [row] = wait_history(conn, f"{topic}/main/x", 1)
        assert row["payload"] == b"for main"
        # Both connections stayed up: neither kicked the other out.
        assert c.execute("SELECT mqtt_status(%s)->>'status'", (broker.name,)).fetchone()[0] == "connected"
        assert c.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                         (f"{topic}/main/x",)).fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                            (f"{topic}/other/x",)).fetchone()[0] == 0


def test_drop_extension_stops_the_worker(pg, mosq, scratch_db):
    """DROP EXTENSION ends that database's worker (and its connections); CREATE EXTENSION
    later brings one back."""
    name = scratch_db("dropext")
    with pg.connect(name) as c:
        serve_broker(c, mosq.port)
        pid = worker_pid(pg, name)
        c.execute("DROP EXTENSION mqtt_pg")
        wait_for(lambda: not pid_alive(pid), timeout=10, message="the worker to exit after DROP EXTENSION")
        assert worker_pid(pg, name) is None

        serve_broker(c, mosq.port, timeout=30)


def test_prepared_transaction_is_sent_after_commit_prepared(pg, conn, broker, topic):
    """PREPARE TRANSACTION fires no commit callback; the worker's periodic look at the outbox
    still sends the message once COMMIT PREPARED makes it visible."""
    assert conn.execute("SHOW max_prepared_transactions").fetchone()[0] != "0", \
        "the harness enables prepared transactions"
    gid = unique("gid")
    with mqtt_sub(broker.port, f"{topic}/#", qos=1) as sub:
        conn.execute("BEGIN")
        conn.execute("SELECT mqtt_publish(%s, 'prepared', 1, false, %s)", (f"{topic}/p", broker.name))
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
        conn.execute(f"COMMIT PREPARED '{gid}'")
        [msg] = sub.wait_count(1)
        assert msg[:3] == (f"{topic}/p", b"prepared", 1)


def test_terminated_launcher_comes_back(pg, conn, broker, topic):
    """pg_terminate_backend on the launcher is not the end of it: the postmaster starts it
    again, and it goes on supervising (a worker terminated afterwards is restarted too)."""
    def launcher_pid():
        with pg.connect() as c:
            row = c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg launcher'").fetchone()
        return row[0] if row else None

    old = launcher_pid()
    assert old is not None
    conn.execute("SELECT pg_terminate_backend(%s)", (old,))
    wait_for(lambda: not pid_alive(old), timeout=5, message="the launcher to exit")
    new = wait_for(launcher_pid, timeout=30, message="a new launcher")
    assert new != old

    worker = worker_pid(pg, TEST_DB)
    conn.execute("SELECT pg_terminate_backend(%s)", (worker,))
    wait_for(lambda: worker_pid(pg, TEST_DB) not in (None, worker), timeout=30,
             message="the new launcher to restart the worker")
    wait_status(conn, broker.name, "connected", timeout=30)


def test_many_databases_without_the_extension_do_not_starve_one_with_it(mosq):
    """After a restart the launcher probes every database; probes of databases without the
    extension give their slot back, so a cluster with more databases than slots (32) still
    serves the one that uses mqtt_pg."""
    from harness import PgCluster

    cluster = PgCluster().init().start()
    try:
        with cluster.connect() as admin:
            for i in range(34):
                admin.execute(f'CREATE DATABASE "plain_{i:02d}"')
            admin.execute('CREATE DATABASE "zz_mqtt"')
        with cluster.connect("zz_mqtt") as c:
            serve_broker(c, mosq.port)
        cluster.restart()
        with cluster.connect("zz_mqtt") as c:
            wait_status(c, "b", "connected", timeout=60)
        with cluster.connect() as admin:
            workers = admin.execute("SELECT datname FROM pg_stat_activity "
                                    "WHERE backend_type = 'mqtt_pg worker'").fetchall()
        assert workers == [("zz_mqtt",)], "only the database with the extension keeps a worker"
        assert "waits for a free slot" not in cluster.log_text()
    finally:
        cluster.destroy()


def test_never_two_workers_for_one_database(pg, mosq, scratch_db):
    """A database that stops accepting connections loses its worker; when it accepts them again
    the launcher finds it by itself (nobody calls anything) and exactly one worker serves it."""
    name = scratch_db("allowconn")
    with pg.connect(name) as c:
        serve_broker(c, mosq.port)
    first = worker_pid(pg, name)
    with pg.connect() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        # The launcher notices within its nap (10 s) and stops the worker.
        wait_for(lambda: not pid_alive(first), timeout=30, message="the worker to be stopped")
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    # The launcher looks at pg_database every 10 s at the latest.
    wait_for(lambda: worker_pid(pg, name), timeout=40, message="a worker for the database again")
    with pg.connect(name) as c:
        wait_status(c, "b", "connected", timeout=30)
    with pg.connect() as admin:
        n = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' "
                          "AND datname = %s", (name,)).fetchone()[0]
    assert n == 1


def test_drop_and_create_extension_in_one_transaction(pg, mosq, scratch_db):
    """DROP and CREATE EXTENSION in one transaction give a new extension (new tables, new ids):
    the old worker leaves and a new one serves the new configuration."""
    name = scratch_db("recreate")
    with pg.connect(name) as c:
        serve_broker(c, mosq.port)
        old = worker_pid(pg, name)
        with c.transaction():
            c.execute("DROP EXTENSION mqtt_pg")
            c.execute("CREATE EXTENSION mqtt_pg")
            c.execute("INSERT INTO mqtt_broker (name, host, port, active) VALUES ('b2', %s, %s, true)",
                      (HOST, mosq.port))
        wait_for(lambda: worker_pid(pg, name) not in (None, old), timeout=30,
                 message="a new worker for the new extension")
        wait_status(c, "b2", "connected", timeout=30)


def test_create_database_from_a_template_in_use(pg, mosq):
    """Odoo's "Duplicate database" is CREATE DATABASE ... TEMPLATE, which needs the template to
    itself: the worker steps aside, and the copy gets a worker (and client ids) of its own."""
    name = unique("tmplsrc")
    copy = name + "_copy"
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with pg.connect(name) as c:
            serve_broker(c, mosq.port)
            source_client = c.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0]
        with pg.connect() as admin:
            admin.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"')
        with pg.connect(copy) as c:
            wait_status(c, "b", "connected", timeout=40)
            assert c.execute("SELECT mqtt_status('b')->>'client_id'").fetchone()[0] != source_client
        with pg.connect(name) as c:
            wait_status(c, "b", "connected", timeout=40)
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{copy}"')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_drop_extension_with_a_pending_configuration_change_settles(pg, mosq, scratch_db):
    """A configuration change committed with DROP EXTENSION leaves a wake-up behind: it may
    buy one more worker (which finds no extension), never a stream of them."""
    name = scratch_db("dropstorm")
    with pg.connect(name) as c:
        serve_broker(c, mosq.port)
        with c.transaction():
            c.execute("UPDATE mqtt_broker SET port = 2")
            c.execute("DROP EXTENSION mqtt_pg")
    wait_for(lambda: worker_pid(pg, name) is None, timeout=10, message="no worker for the database")
    # Watch for two seconds: a restart loop shows up as ever new worker pids.
    seen = set()
    deadline = time.monotonic() + 2
    with pg.connect() as admin:
        while time.monotonic() < deadline:
            seen.update(r[0] for r in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'mqtt_pg worker' AND datname = %s",
                (name,)))
    assert len(seen) <= 1, f"workers kept being started: {len(seen)} pids in 2 s"


def test_create_database_template_default_is_untouched(pg):
    """`TEMPLATE DEFAULT` names no database: the DDL hook must let it through."""
    name = unique("tmpldefault")
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE DEFAULT')
        admin.execute(f'DROP DATABASE "{name}"')
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE = DEFAULT')
        admin.execute(f'DROP DATABASE "{name}"')
