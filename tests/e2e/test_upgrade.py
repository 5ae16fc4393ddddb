"""Upgrading with ALTER EXTENSION mqtt_pg UPDATE while the worker runs: from 0.1.0 (the release
before security, integration and operations; through 0.2.0) and from 0.2.0 (before MQTT 5) to
this version.

The released install scripts ship in the extension directory (scripts/setup.sh puts them there),
so a database can be made at an old version with the current library. That library refuses to
act on old objects (55000, and its worker sends nothing) until the update; then nothing may be
lost, the queued messages must go out, and the schema must equal a fresh install.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from harness import HOST, PG_BIN, PgCluster, mqtt_sub, unique, wait_for, wait_status

QUEUED = 500
ROOT = Path(__file__).resolve().parents[2]
# The version this build installs (Cargo.toml's, as the control file says).
CURRENT = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def cluster():
    c = PgCluster(preload=True).init()
    c.start()
    yield c
    c.destroy()


def db(cluster, name: str) -> psycopg.Connection:
    return cluster.connect(name)


def schema_dump(cluster, dbname: str) -> str:
    """pg_dump --schema-only, less what differs between any two databases (comments, SET lines,
    the restrict keys of PostgreSQL 17+)."""
    out = subprocess.run([str(PG_BIN / "pg_dump"), "-h", HOST, "-p", str(cluster.port), "-U", "postgres",
                          "--schema-only", "--no-owner",
                          # the daily partitions depend on the data (no partition for a day
                          # the default partition already holds rows of), not on the install
                          "--exclude-table=*.mqtt_message_history_2*", dbname],
                         check=True, capture_output=True, text=True).stdout
    lines = [ln for ln in out.splitlines()
             if ln.strip() and not ln.startswith("--") and not ln.startswith("SET ")
             and not ln.startswith("SELECT pg_catalog.set_config") and not ln.startswith("\\restrict")
             and not ln.startswith("\\unrestrict")]
    return "\n".join(lines)


def catalog_facts(conn) -> dict:
    """What pg_dump does not show: extension members and config tables, by name (less the
    daily partitions, which follow the data)."""
    members = conn.execute(
        "SELECT pg_describe_object(classid, objid, objsubid) FROM pg_depend "
        "WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'mqtt_pg') AND deptype = 'e' "
        "ORDER BY 1").fetchall()
    # (PostgreSQL 18 records a member table's row type as a member too)
    members = [m for m in members if not re.match(r"(table|type) mqtt_message_history_\d{8}(_\d)?(\[\])?$", m[0])]
    config = conn.execute(
        "SELECT array_agg(c::regclass::text ORDER BY c::regclass::text), extversion "
        "FROM pg_extension, unnest(extconfig) c WHERE extname = 'mqtt_pg' "
        "AND c::regclass::text !~ '^mqtt_message_history_[0-9]{8}$' GROUP BY extversion").fetchone()
    return {"members": [m[0] for m in members], "config": config}


def day_partitions(conn) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'mqtt_message_history'::regclass AND c.relname ~ '_[0-9]{8}$'").fetchall()}


def test_upgrade_from_0_1_0_keeps_everything(cluster, mosquitto_factory):
    mosq = mosquitto_factory()
    old, fresh = unique("up"), unique("fresh")
    cluster.create_database(old)
    cluster.create_database(fresh)
    topic = f"upgrade/{unique('t')}"
    with db(cluster, old) as c:
        c.execute("CREATE EXTENSION mqtt_pg VERSION '0.1.0'")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == "0.1.0"
        # what a 0.1.0 installation holds: brokers (one with a plain-text password, as 0.1.0
        # stored it), subscriptions, queued messages, history and dead letters
        c.execute("INSERT INTO mqtt_broker (id, name, host, port, active, is_default) VALUES (7, 'plant', %s, %s, true, true)",
                  (HOST, mosq.port))
        c.execute("INSERT INTO mqtt_broker (id, name, host, port, username, password) "
                  "VALUES (9, 'spare', 'mqtt.example', 1883, 'odoo', 's3cret')")
        c.execute("SELECT setval('mqtt_broker_id_seq', 9)")
        c.execute("INSERT INTO mqtt_topic (broker_id, name, qos, subscribe) VALUES (7, %s, 1, true), (9, 'x/#', 0, true)",
                  (f"{topic}/in/#",))
        # 0.1.0 reserved handler and target_table without using them
        c.execute("INSERT INTO mqtt_topic (broker_id, name, handler, target_table) "
                  "VALUES (9, 'reserved/#', 'pg_catalog.now()', 'pg_catalog.pg_class')")
        # a role of the DBA's with a grant on history
        reporting = unique("reporting")
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(reporting)))
        c.execute(sql.SQL("GRANT SELECT ON mqtt_message_history, mqtt_message_history_text TO {}").format(
            sql.Identifier(reporting)))
        c.execute("INSERT INTO mqtt_outbox (broker_id, topic, payload, qos) "
                  "SELECT 7, %s, convert_to('m' || i, 'UTF8'), 1 FROM generate_series(1, %s) i", (f"{topic}/out", QUEUED))
        c.execute("INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction, \"timestamp\") "
                  "SELECT 7, %s, '\\x00ff'::bytea, 0, 'receive', now() - i * interval '1 hour' FROM generate_series(1, 300) i",
                  (f"{topic}/old",))
        c.execute("INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error) "
                  "VALUES (7, %s, 'dead', 1, 'send', 'refused')", (f"{topic}/dead",))
        before = {t: c.execute(f"SELECT count(*), coalesce(sum(hashtext(t::text)), 0) FROM {t} t").fetchone()
                  for t in ("mqtt_outbox", "mqtt_message_history", "mqtt_dead_letter")}
        history_ids = c.execute("SELECT array_agg(id ORDER BY id) FROM mqtt_message_history").fetchone()[0]
        outbox_ids = c.execute("SELECT array_agg(id ORDER BY id) FROM mqtt_outbox").fetchone()[0]

        # the new library refuses to act on 0.1.0's objects, and says what to do
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
            c.execute("SELECT mqtt_publish('a/b', 'x')")
        assert "ALTER EXTENSION mqtt_pg UPDATE" in (e.value.diag.message_hint or "")
        wait_for(lambda: f"is at version 0.1.0 in this database but the library is version {CURRENT}"
                 in cluster.log_text(), message="the worker's warning")
        assert cluster.worker_pids(old), "the worker runs (idle) before the update"
        assert c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == QUEUED, "nothing sent before the update"

    sub = mqtt_sub(mosq.port, f"{topic}/out", qos=1)
    try:
        with db(cluster, old) as c:
            warnings = []
            c.add_notice_handler(lambda n: warnings.append(n.message_primary or ""))
            c.execute("ALTER EXTENSION mqtt_pg UPDATE")
            assert any("reserved/#" in w and "not carried over" in w for w in warnings), warnings
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == CURRENT
            assert cluster.worker_pids(old), "the worker ran through the update"
            # the queued messages go out, once each, in order
            sub.wait_count(QUEUED, timeout=60)
            got = [p.decode() for p in sub.payloads()]
            assert got == [f"m{i}" for i in range(1, QUEUED + 1)]
            wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == 0,
                     message="the outbox emptied")
            sent_ids = c.execute("SELECT count(*) FROM mqtt_message_history WHERE direction = 'send' AND topic = %s",
                                 (f"{topic}/out",)).fetchone()[0]
            assert sent_ids == QUEUED
            # history and dead letters kept, ids included
            assert c.execute("SELECT array_agg(id ORDER BY id) FROM mqtt_message_history WHERE direction = 'receive' "
                             "AND topic = %s", (f"{topic}/old",)).fetchone()[0] == history_ids
            for t in ("mqtt_message_history", "mqtt_dead_letter"):
                # the row as 0.1.0 had it: 0.3.0's properties column (NULL here) comes last
                as_before = r"hashtext(regexp_replace(t::text, ',\)$', ')'))"
                if t == "mqtt_message_history":
                    now = c.execute(f"SELECT count(*), coalesce(sum({as_before}), 0) FROM mqtt_message_history t "
                                    "WHERE NOT (direction = 'send' AND topic = %s)", (f"{topic}/out",)).fetchone()
                else:
                    now = c.execute(f"SELECT count(*), coalesce(sum({as_before}), 0) FROM {t} t").fetchone()
                assert now == before[t], t
            # brokers and secrets: the plain-text password is sealed, write-only now
            b = c.execute("SELECT password, has_password, username FROM mqtt_broker WHERE name = 'spare'").fetchone()
            assert b == (None, True, "odoo")
            assert c.execute("SELECT nextval('mqtt_broker_id_seq')").fetchone()[0] == 10
            assert c.execute("SELECT nextval('mqtt_outbox_id_seq')").fetchone()[0] > max(outbox_ids)
            topics = c.execute("SELECT broker_id, name, qos, subscribe, owner_role, handler, target_table "
                               "FROM mqtt_topic ORDER BY id").fetchall()
            assert [t[:4] for t in topics] == [(7, f"{topic}/in/#", 1, True), (9, "x/#", 0, True),
                                               (9, "reserved/#", 0, False)]
            assert all(t[4] == "postgres" for t in topics), "subscriptions belong to the database owner"
            assert all(t[5] is None and t[6] is None for t in topics), "0.1.0's unused routing is not switched on"
            # the DBA's grant is there again, on the new table and view
            assert c.execute("SELECT has_table_privilege(%s, 'mqtt_message_history', 'SELECT'), "
                             "has_table_privilege(%s, 'mqtt_message_history_text', 'SELECT'), "
                             "has_table_privilege(%s, 'mqtt_outbox', 'SELECT')",
                             (reporting, reporting, reporting)).fetchone() == (True, True, False)
            # the subscription works: a message in is stored
            wait_status(c, "plant", "connected")
            c.execute("SELECT mqtt_publish(%s, 'after', 1)", (f"{topic}/in/x",))
            wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s AND direction = 'receive'",
                                       (f"{topic}/in/x",)).fetchone()[0] == 1, message="a message received after the update")
            # the old tables are gone
            assert c.execute("SELECT count(*) FROM pg_namespace WHERE nspname = '_mqtt_pg_0_1_0'").fetchone()[0] == 0
    finally:
        sub.close()

    with db(cluster, fresh) as c:
        c.execute("CREATE EXTENSION mqtt_pg")
    with db(cluster, old) as a, db(cluster, fresh) as b:
        # the worker keeps making daily partitions after the update
        wait_for(lambda: len(day_partitions(a)) >= 3, message="daily partitions in the upgraded database")
        fa, fb = catalog_facts(a), catalog_facts(b)
        assert fa["config"] == fb["config"]
        assert fa["members"] == fb["members"], (
            f"only upgraded: {sorted(set(fa['members']) - set(fb['members']))}; "
            f"only fresh: {sorted(set(fb['members']) - set(fa['members']))}")
    # a dump of the upgraded database restores (as Odoo's restore does: into a database with the
    # extension, whose worker has made today's partition, while the old history sits in the
    # default partition and covers today)
    target = unique("restored")
    cluster.create_database(target)
    with db(cluster, target) as t:
        t.execute("CREATE EXTENSION mqtt_pg")
        wait_for(lambda: len(day_partitions(t)) >= 4, message="the restored database's partitions")
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "-h", HOST, "-p", str(cluster.port), "-U", "postgres", old],
                          check=True, capture_output=True, text=True).stdout
    r = subprocess.run([str(PG_BIN / "psql"), "-h", HOST, "-p", str(cluster.port), "-U", "postgres", "-d", target,
                        "-v", "ON_ERROR_STOP=1", "-q"], input=dump, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "ERROR" in l)
    count = "SELECT count(*), sum(hashtext(h::text)) FROM mqtt_message_history h"
    with db(cluster, old) as a, db(cluster, target) as t:
        assert t.execute(count).fetchone() == a.execute(count).fetchone()

    assert_same_schema(cluster, old, fresh)


def assert_same_schema(cluster, upgraded_db: str, fresh_db: str) -> None:
    upgraded, installed = schema_dump(cluster, upgraded_db), schema_dump(cluster, fresh_db)
    diff = "\n".join(difflib.unified_diff(installed.splitlines(), upgraded.splitlines(), f"fresh {CURRENT}",
                                          "upgraded", lineterm="", n=1))
    assert upgraded == installed, f"the upgraded schema differs from a fresh install:\n{diff}"


def test_upgrade_refuses_when_own_objects_depend(cluster):
    """A view, an index or a trigger of the DBA's on the old tables would go with them: the
    update refuses, names them, and changes nothing."""
    name = unique("upv")
    cluster.create_database(name)
    with db(cluster, name) as c:
        c.execute("CREATE EXTENSION mqtt_pg VERSION '0.1.0'")
        c.execute("CREATE VIEW my_history AS SELECT id, topic FROM mqtt_message_history")
        c.execute("CREATE INDEX my_topic_idx ON mqtt_message_history (topic)")
        c.execute("CREATE FUNCTION my_trg() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'")
        c.execute("CREATE TRIGGER my_trigger BEFORE INSERT ON mqtt_outbox FOR EACH ROW EXECUTE FUNCTION my_trg()")
        with pytest.raises(psycopg.errors.DependentObjectsStillExist) as e:
            c.execute("ALTER EXTENSION mqtt_pg UPDATE")
        for what in ("my_history", "my_topic_idx", "my_trigger"):
            assert what in e.value.diag.message_primary
        assert "Drop them" in (e.value.diag.message_hint or "")
        # nothing changed
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == "0.1.0"
        c.execute("DROP VIEW my_history")
        c.execute("DROP INDEX my_topic_idx")
        c.execute("DROP TRIGGER my_trigger ON mqtt_outbox")
        c.execute("ALTER EXTENSION mqtt_pg UPDATE")
        assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == CURRENT


def test_released_scripts_ship_unchanged():
    """The released versions' install scripts are installed beside this one (scripts/setup.sh),
    and 0.1.0 -> 0.2.0, frozen since 0.2.0's release, holds 0.2.0's install script as released
    (scripts/make_upgrade.py made it so). Later updates are plain ALTERs, checked against a fresh
    install by the tests above and below."""
    share = Path(subprocess.run([str(PG_BIN / "pg_config"), "--sharedir"], check=True, capture_output=True,
                                text=True).stdout.strip()) / "extension"
    for v in ("0.1.0", "0.2.0"):
        assert (share / f"mqtt_pg--{v}.sql").read_text() == (ROOT / "sql" / f"mqtt_pg--{v}.sql").read_text(), v
    update = (ROOT / "sql" / "mqtt_pg--0.1.0--0.2.0.sql").read_text()
    assert (ROOT / "sql" / "mqtt_pg--0.2.0.sql").read_text() in update
    assert re.search(r"DROP SCHEMA _mqtt_pg_0_1_0;", update)
    assert (share / "mqtt_pg--0.2.0--0.3.0.sql").exists()


def test_upgrade_from_0_2_0_keeps_everything(cluster, mosquitto_factory):
    """0.2.0 -> 0.3.0 while the worker runs: brokers, subscriptions, access rules, queued
    messages, history (in its day partitions), dead letters and grants are kept with their ids;
    the queued messages go out in order once the update has run; the new columns have their
    defaults and the owner may set them; the schema equals a fresh install."""
    mosq = mosquitto_factory()
    old, fresh = unique("up2"), unique("fresh2")
    owner = unique("odoo")
    with cluster.connect() as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        for name in (old, fresh):
            admin.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(owner)))
    topic = f"upgrade2/{unique('t')}"
    with db(cluster, old) as c:
        c.execute("CREATE EXTENSION mqtt_pg VERSION '0.2.0'")
        c.execute("INSERT INTO mqtt_broker (id, name, host, port, active, is_default, clean_session) "
                  "VALUES (7, 'plant', %s, %s, true, true, false)", (HOST, mosq.port))
        c.execute("INSERT INTO mqtt_broker (id, name, host, port, username) VALUES (9, 'spare', 'mqtt.example', 1883, 'odoo')")
        c.execute("SELECT setval('mqtt_broker_id_seq', 9)")
        c.execute("INSERT INTO mqtt_topic (broker_id, name, qos, subscribe) VALUES (7, %s, 1, true)", (f"{topic}/in/#",))
        c.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish, allow_subscribe) "
                  "VALUES ('reporting', 'plant/#', false, true)")
        reporting = unique("reporting")
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(reporting)))
        c.execute(sql.SQL("GRANT SELECT ON mqtt_message_history, mqtt_message_history_text TO {}").format(
            sql.Identifier(reporting)))
        c.execute("INSERT INTO mqtt_outbox (broker_id, topic, payload, qos) "
                  "SELECT 7, %s, convert_to('m' || i, 'UTF8'), 1 FROM generate_series(1, %s) i", (f"{topic}/out", QUEUED))
        c.execute("INSERT INTO mqtt_message_history (broker_id, topic, payload, qos, direction, \"timestamp\") "
                  "SELECT 7, %s, '\\x00ff'::bytea, 0, 'receive', now() - i * interval '1 hour' FROM generate_series(1, 300) i",
                  (f"{topic}/old",))
        c.execute("INSERT INTO mqtt_dead_letter (broker_id, topic, payload, qos, direction, error) "
                  "VALUES (7, %s, 'dead', 1, 'send', 'refused')", (f"{topic}/dead",))
        tables = ("mqtt_broker", "mqtt_topic", "mqtt_access_control", "mqtt_outbox", "mqtt_message_history",
                  "mqtt_dead_letter")
        # every row of every table, as its columns of 0.2.0 (the update only adds columns)
        snapshot = {t: c.execute(sql.SQL("SELECT array_agg(t ORDER BY id)::text FROM {} t").format(
            sql.Identifier(t))).fetchone()[0] for t in tables}

        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as e:
            c.execute("SELECT mqtt_publish('a/b', 'x')")
        assert "ALTER EXTENSION mqtt_pg UPDATE" in (e.value.diag.message_hint or "")
        wait_for(lambda: f"is at version 0.2.0 in this database but the library is version {CURRENT}"
                 in cluster.log_text(), message="the worker's warning")
        assert c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == QUEUED, "nothing sent before the update"

    sub = mqtt_sub(mosq.port, f"{topic}/out", qos=1)
    try:
        with db(cluster, old) as c:
            c.execute("ALTER EXTENSION mqtt_pg UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()[0] == CURRENT
            sub.wait_count(QUEUED, timeout=60)
            assert [p.decode() for p in sub.payloads()] == [f"m{i}" for i in range(1, QUEUED + 1)]
            wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == 0,
                     message="the outbox emptied")
            for t in tables:
                cols = [r[0] for r in c.execute(
                    "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                    "AND NOT attisdropped AND attname NOT IN ('protocol_version', 'session_expiry', "
                    "'receive_maximum', 'properties') ORDER BY attnum", (t,)).fetchall()]
                where = sql.SQL("WHERE NOT (direction = 'send' AND topic = {})").format(sql.Literal(f"{topic}/out")) \
                    if t == "mqtt_message_history" else sql.SQL("WHERE false") if t == "mqtt_outbox" else sql.SQL("")
                now = c.execute(sql.SQL("SELECT array_agg(ROW({}) ORDER BY id)::text FROM {} t {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(t), where)).fetchone()[0]
                if t != "mqtt_outbox":
                    assert now == snapshot[t], t
            assert c.execute("SELECT array_agg(DISTINCT protocol_version) FROM mqtt_broker").fetchone()[0] == ["3.1.1"]
            assert c.execute("SELECT count(*) FROM mqtt_message_history WHERE properties IS NOT NULL").fetchone()[0] == 0
            assert c.execute("SELECT has_table_privilege(%s, 'mqtt_message_history_text', 'SELECT')",
                             (reporting,)).fetchone()[0]
            assert c.execute("SELECT nextval('mqtt_broker_id_seq')").fetchone()[0] == 10
        # the database owner may switch a broker to MQTT 5, and it connects so
        with psycopg.connect(host=HOST, port=cluster.port, user=owner, dbname=old, autocommit=True) as o:
            o.execute("UPDATE mqtt_broker SET protocol_version = '5', receive_maximum = 100 WHERE name = 'plant'")
            cid = o.execute("SELECT client_id FROM mqtt_broker_status WHERE name = 'plant'").fetchone()[0]
            wait_for(lambda: f"as {cid} (p5," in mosq.log_text() and o.execute(
                "SELECT status FROM mqtt_broker_status WHERE name = 'plant'").fetchone()[0] == "connected",
                message="the broker on MQTT 5")
            o.execute("SELECT mqtt_publish(%s, 'after', 1, properties => '{\"content_type\": \"text/plain\"}')",
                      (f"{topic}/in/x",))
            wait_for(lambda: o.execute("SELECT properties->>'content_type' FROM mqtt_message_history "
                                       "WHERE topic = %s AND direction = 'receive'", (f"{topic}/in/x",)).fetchone()
                     == ("text/plain",), message="a message with properties received after the update")
    finally:
        sub.close()

    with db(cluster, fresh) as c:
        c.execute("CREATE EXTENSION mqtt_pg")
    with db(cluster, old) as a, db(cluster, fresh) as b:
        fa, fb = catalog_facts(a), catalog_facts(b)
        assert fa["config"] == fb["config"]
        assert fa["members"] == fb["members"], (
            f"only upgraded: {sorted(set(fa['members']) - set(fb['members']))}; "
            f"only fresh: {sorted(set(fb['members']) - set(fa['members']))}")
        # the owner's column privileges on mqtt_broker are those of a fresh install
        priv = ("SELECT array_agg(attname::text ORDER BY attname) FROM pg_attribute WHERE attrelid = 'mqtt_broker'::regclass "
                "AND attnum > 0 AND has_column_privilege(%s, 'mqtt_broker', attname, 'UPDATE WITH GRANT OPTION')")
        assert a.execute(priv, (owner,)).fetchone() == b.execute(priv, (owner,)).fetchone()
        # the DBA's own grant (kept, checked above) is the one difference a dump may show
        a.execute(sql.SQL("REVOKE SELECT ON mqtt_message_history, mqtt_message_history_text FROM {}").format(
            sql.Identifier(reporting)))
    assert_same_schema(cluster, old, fresh)
