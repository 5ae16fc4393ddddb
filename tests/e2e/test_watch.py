"""Publishing row changes: mqtt_publish_trigger() and mqtt_watch_table() / mqtt_unwatch_table(),
seen by an independent subscriber on a real mosquitto.

Absence is never slept on: wherever a change must publish nothing, a later message on the same
topic and QoS (a "marker": another row change or an mqtt_publish) is waited for, and anything
the change had sent would have arrived before it.

Payloads are compared with what `SELECT to_jsonb(t)` gives in the same session, parsed with
Decimal for numbers so that no digit of a numeric is lost in the comparison.
"""

from __future__ import annotations

import json
from collections import Counter
from decimal import Decimal

import psycopg
import pytest
from psycopg import sql

from harness import (HOST, mosquitto_pub, mqtt_sub, unique, wait_for,
                     wait_history, wait_status)

ALL_EVENTS_DEF = "AFTER INSERT OR DELETE OR UPDATE"  # how pg_get_triggerdef spells all three


# ---- helpers -----------------------------------------------------------------------------------

def level(value: str | None) -> str:
    """The spec's encoding of one value as one topic level (independent re-implementation)."""
    if value is None or value == "":
        return "_"
    if value == "_":
        return "%5F"
    return (value.replace("%", "%25").replace("/", "%2F").replace("+", "%2B")
            .replace("#", "%23").replace("$", "%24"))


def jload(data: bytes | str):
    return json.loads(data, parse_float=Decimal)


def row_json(conn, tbl: str, where: str = "true", params=()) -> dict:
    """to_jsonb of one row, as this session gives it."""
    [text] = conn.execute(f"SELECT to_jsonb(t)::text FROM {tbl} t WHERE {where}", params).fetchone()
    return jload(text)


def watch(conn, tbl: str, template, **kw):
    """SELECT mqtt_watch_table(tbl, template, <named args given>)."""
    casts = {"qos": "integer", "retain": "boolean", "broker": "text", "columns": "text[]", "events": "text[]"}
    parts = [sql.SQL("{}::regclass").format(sql.Literal(tbl)), sql.SQL("%s::text")]
    params = [template]
    for k, v in kw.items():
        parts.append(sql.SQL("{} => %s::" + casts[k]).format(sql.Identifier(k)))
        params.append(v)
    q = sql.SQL("SELECT mqtt_watch_table({})").format(sql.SQL(", ").join(parts))
    return conn.execute(q, params).fetchone()[0]


def unwatch(conn, tbl: str):
    return conn.execute("SELECT mqtt_unwatch_table(%s::regclass)", (tbl,)).fetchone()[0]


def create_trigger(conn, tbl: str, args: list[str], name: str = "t", timing: str = "AFTER",
                   events: str = "INSERT OR UPDATE OR DELETE", level_: str = "ROW") -> None:
    conn.execute(sql.SQL("CREATE TRIGGER {} {} {} ON {} FOR EACH {} EXECUTE FUNCTION mqtt_publish_trigger({})").format(
        sql.Identifier(name), sql.SQL(timing), sql.SQL(events), sql.SQL(tbl), sql.SQL(level_),
        sql.SQL(", ").join(map(sql.Literal, args))))


def triggers(conn) -> list[tuple]:
    """Every user trigger of the database: what must not change when a call fails."""
    return conn.execute(
        "SELECT oid, tgrelid::regclass::text, tgname, tgtype, tgenabled, tgfoid::regproc::text, "
        "tgnargs, tgargs FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgrelid, tgname").fetchall()


def trigger_args(conn, tbl: str, name: str = "mqtt_watch") -> list[str] | None:
    row = conn.execute("SELECT tgnargs, tgargs FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                       (tbl, name)).fetchone()
    if row is None:
        return None
    n, raw = row
    return [a.decode() for a in bytes(raw).split(b"\x00")[:n]]


def trigger_names(conn, tbl: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal ORDER BY tgname", (tbl,))]


def triggerdef(conn, tbl: str, name: str = "mqtt_watch") -> str:
    return conn.execute("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                        (tbl, name)).fetchone()[0]


def outbox_under(conn, prefix: str) -> list[tuple[str, bytes]]:
    return [(t, bytes(p)) for t, p in conn.execute(
        "SELECT topic, payload FROM mqtt_outbox WHERE starts_with(topic, %s) ORDER BY id", (prefix + "/",))]


def config_counts(conn) -> tuple:
    """Rows of mqtt_broker, mqtt_topic, mqtt_access_control (the outbox is compared by topic
    prefix: other tests' messages may still be leaving it)."""
    return conn.execute("SELECT (SELECT count(*) FROM mqtt_broker), (SELECT count(*) FROM mqtt_topic), "
                        "(SELECT count(*) FROM mqtt_access_control)").fetchone()


def marker(conn, t: str, broker: str | None, qos: int = 1) -> None:
    conn.execute("SELECT mqtt_publish(%s, 'marker', %s, false, %s)", (t, qos, broker))


def sqlstate_of(fn) -> str | None:
    """Run fn(); return the SQLSTATE it failed with, or None if it did not fail."""
    try:
        fn()
    except psycopg.Error as e:
        return e.sqlstate
    return None


@pytest.fixture
def make_table(conn):
    """make_table("id int PRIMARY KEY, v text", name=None, schema=None) -> the quoted,
    qualified name; dropped (CASCADE) after the test."""
    made: list[sql.Composable] = []

    def make(columns: str, name: str | None = None, schema: str | None = None) -> str:
        name = name or unique("w")
        ident = sql.Identifier(schema, name) if schema else sql.Identifier(name)
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(columns)))
        made.append(ident)
        return ident.as_string(conn)

    yield make
    # A test that failed half-way may leave a connection in an open transaction holding locks
    # on its tables: end those sessions so the DROP cannot wait forever.
    conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                 "AND state LIKE 'idle in transaction%'")
    conn.execute("SET lock_timeout = '10s'")
    for ident in reversed(made):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(ident))


@pytest.fixture
def owned_db(pg):
    """A database owned by a non-superuser role, the extension created by a superuser (as an
    Odoo installation has it). Yields an object with .db, .owner, .connect(user=owner) and
    .new_role(prefix, *extra); roles and database are dropped afterwards."""
    owner, db = unique("wown"), unique("wdb")
    roles = [owner]
    opened: list[psycopg.Connection] = []
    with pg.connect() as admin:
        admin.execute(f'CREATE ROLE "{owner}" LOGIN NOSUPERUSER')
        admin.execute(f'CREATE DATABASE "{db}" OWNER "{owner}"')
    with pg.connect(db) as su:
        su.execute("CREATE EXTENSION mqtt_pg")

    class Owned:
        pass

    o = Owned()
    o.db, o.owner = db, owner

    def connect(user: str = owner, autocommit: bool = True) -> psycopg.Connection:
        c = psycopg.connect(host=HOST, port=pg.port, dbname=db, user=user, autocommit=autocommit)
        opened.append(c)
        return c

    def new_role(prefix: str, *extra: str) -> str:
        r = unique(prefix)
        with pg.connect() as admin:
            admin.execute(f'CREATE ROLE "{r}" LOGIN NOSUPERUSER {" ".join(extra)}')
        roles.append(r)
        return r

    o.connect, o.new_role = connect, new_role
    yield o
    for c in opened:
        c.close()
    with pg.connect() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        for r in reversed(roles):
            admin.execute(f'DROP ROLE IF EXISTS "{r}"')


# ---- payloads and topics -----------------------------------------------------------------------

TYPED = ('id int PRIMARY KEY, n numeric, ts timestamptz, j jsonb, arr int[], tarr text[], q text, '
         'nul text, b boolean, f float8, d date, i8 bigint, "Mixed Case" text')


def test_insert_update_delete_payloads_are_exact(conn, broker, mosq, topic, make_table):
    # A session time zone that is not UTC: to_jsonb of a timestamptz depends on it.
    conn.execute("SET TimeZone = 'Asia/Kathmandu'")
    tbl = make_table(TYPED)
    name = tbl.strip('"')
    tpl = f"{topic}/{{schema}}/{{table}}/{{op}}/{{id}}"
    assert watch(conn, tbl, tpl, qos=1, broker=broker.name) == "mqtt_watch"
    quote = 'he said "hi", it\'s \\ back\nslash / tab\t ü €'
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(
            f"INSERT INTO {tbl} VALUES (1, 12345678901234567890.123456789012, '2024-02-29 23:59:59.123456+05:30', "
            "%s::jsonb, '{1,NULL,3}', ARRAY['a\"b', 'c,d', NULL], %s, NULL, true, 1.5e-7, '2024-01-02', "
            "9007199254740993, 'mc')",
            ('{"a": [1, 2.50, {"b": null}], "s": "q\\" / ü", "big": 1e30, "neg": -0.000001}', quote))
        after_insert = row_json(conn, tbl, "id = 1")
        conn.execute(f"UPDATE {tbl} SET n = -0.00000000000000000001, f = 'Infinity', nul = '', j = 'null', "
                     f"arr = '{{}}', q = q || '!', \"Mixed Case\" = NULL WHERE id = 1")
        after_update = row_json(conn, tbl, "id = 1")
        conn.execute(f"DELETE FROM {tbl} WHERE id = 1")
        got = sub.wait_count(3)

    assert [m[0] for m in got] == [f"{topic}/public/{name}/{op}/1" for op in ("insert", "update", "delete")]
    assert [m[2] for m in got] == [1, 1, 1]
    docs = [jload(m[1]) for m in got]
    assert docs[0] == {"op": "insert", "schema": "public", "table": name, "new": after_insert, "old": None}
    assert docs[1] == {"op": "update", "schema": "public", "table": name, "new": after_update, "old": after_insert}
    assert docs[2] == {"op": "delete", "schema": "public", "table": name, "new": None, "old": after_update}
    # spot checks of the forms to_jsonb gives, so the comparison above cannot be vacuous
    assert docs[0]["new"]["n"] == Decimal("12345678901234567890.123456789012")
    assert docs[0]["new"]["i8"] == 9007199254740993
    assert docs[0]["new"]["ts"] == "2024-03-01T00:14:59.123456+05:45", docs[0]["new"]["ts"]
    assert docs[0]["new"]["q"] == quote and docs[0]["new"]["nul"] is None
    assert docs[0]["new"]["tarr"] == ['a"b', "c,d", None]
    assert docs[0]["new"]["j"]["a"][2] == {"b": None}
    assert docs[1]["new"]["f"] == "Infinity" and docs[1]["new"]["j"] is None and docs[1]["new"]["nul"] == ""
    # every message is in the history as sent, with its QoS
    rows = wait_history(conn, got[2][0], 1, direction="send")
    assert rows[0]["qos"] == 1 and rows[0]["retain"] is False


SCALARS = ("id int8 PRIMARY KEY, s int2, i int4, n numeric, b bool, t text, v varchar(20), c char(6), "
           "dom_n numeric_dom, f float8")


@pytest.mark.parametrize("values", [
    ("-9223372036854775808", "-32768", "2147483647", "1.50", "true", "q\"\\ \n\t\u0001\u007f é 😀 / {x}",
     "", "ab", "NaN", "1e20"),
    ("9223372036854775807", "0", "-1", "NaN", "false", "", "\"", "", "Infinity", "-0"),
    ("1", "1", "1", "-Infinity", None, None, None, None, None, "NaN"),
    ("2", None, None, "-0.000", None, "_", "x", "abcdef", "0.1", "Infinity"),
    ("3", None, None, "123456789012345678901234567890.000000000000000000001", None, "x" * 300, None, None, None, None),
])
def test_scalar_columns_are_byte_for_byte_what_to_jsonb_prints(conn, broker, topic, make_table, values):
    # The common scalar types are written straight from their output functions (a fast path):
    # each value's JSON text must be exactly what to_jsonb prints, not merely equal once parsed.
    # A domain and float8 go through to_jsonb itself; they are here to show both paths agree.
    conn.execute("DO $$ BEGIN CREATE DOMAIN numeric_dom AS numeric; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    tbl = make_table(SCALARS)
    watch(conn, tbl, f"{topic}/{{id}}", qos=0, broker=broker.name)
    conn.execute("SELECT mqtt_stop_listener(%s)", (broker.name,))
    with conn.transaction():
        conn.execute(f"INSERT INTO {tbl} VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", values)
        [payload] = conn.execute("SELECT convert_from(payload, 'UTF8') FROM mqtt_outbox WHERE topic = %s",
                                 (f"{topic}/{values[0]}",)).fetchone()
        expected = dict(conn.execute(f"SELECT key, value::text FROM {tbl} r, jsonb_each(to_jsonb(r)) "
                                     "WHERE id = %s::int8", (values[0],)).fetchall())
    new = payload[payload.index('"new": ') + len('"new": '):payload.rindex(', "old": ')]
    got = [part.split(": ", 1) for part in split_top(new[1:-1])]
    assert [(json.loads(k), v) for k, v in got] == [(k, expected[k]) for k in ORDER]
    assert expected["t"] == "null" or expected["t"].startswith('"')  # the comparison is of texts


ORDER = ["id", "s", "i", "n", "b", "t", "v", "c", "dom_n", "f"]


def split_top(body: str) -> list[str]:
    """Split 'a: 1, b: "x, y"' at the top-level commas (outside strings)."""
    parts, depth, in_str, esc, cur = [], 0, False, False, []
    for ch in body:
        cur.append(ch)
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            cur.pop()
            parts.append("".join(cur).strip())
            cur = []
    if cur:
        parts.append("".join(cur).strip())
    return parts


def test_template_placeholders_use_text_form_new_and_old(conn, broker, mosq, topic, make_table):
    """{column} is the column's ::text (in this session), made safe for one level; from NEW on
    insert and update, from OLD on delete."""
    conn.execute("SET TimeZone = 'Asia/Kathmandu'")
    tbl = make_table("id int PRIMARY KEY, ts timestamptz, n numeric, arr int[], b boolean, j jsonb, v text")
    watch(conn, tbl, f"{topic}/{{op}}/{{id}}/{{ts}}/{{n}}/{{arr}}/{{b}}/{{j}}/{{v}}", qos=1, broker=broker.name)

    def expected(op):
        vals = conn.execute(f"SELECT id::text, ts::text, n::text, arr::text, b::text, j::text, v::text FROM {tbl}").fetchone()
        return "/".join([topic, op, *map(level, vals)])

    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (7, '2024-06-01 12:00:00+00', 3.140, '{{1,2}}', false, "
                     "'{\"k\": \"a/b\"}', 'old')")
        exp_insert = expected("insert")
        conn.execute(f"UPDATE {tbl} SET v = 'new', n = -1")
        exp_update = expected("update")
        exp_delete = expected("delete")  # the row as it is before the delete (OLD)
        conn.execute(f"DELETE FROM {tbl}")
        got = sub.wait_count(3)
    assert [m[0] for m in got] == [exp_insert, exp_update, exp_delete]
    # the timestamptz text form holds '+05:45' in this time zone, the jsonb one a '/'
    assert "%2B05:45" in exp_insert and "%2F" in exp_insert
    assert exp_delete.endswith("/new") and exp_insert.endswith("/old")


def test_values_never_add_a_level_a_wildcard_or_a_dollar_topic(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v text")
    cases = {
        1: ("a/b", "a%2Fb"),
        2: ("a+b", "a%2Bb"),
        3: ("#", "%23"),
        4: ("$SYS", "%24SYS"),
        5: ("100%", "100%25"),
        6: ("", "_"),
        7: (None, "_"),
        8: ("_", "%5F"),
        9: ("%2F", "%252F"),
        10: ("__", "__"),
        11: ("/", "%2F"),
        12: ("+/#", "%2B%2F%23"),
        13: ("a b ü", "a b ü"),
        14: ("%5F", "%255F"),
        15: ("x_", "x_"),
        16: ("a//b/", "a%2F%2Fb%2F"),
    }
    watch(conn, tbl, f"{topic}/pre/{{v}}/post", qos=1, broker=broker.name)
    with mqtt_sub(mosq.port, f"{topic}/#") as everything, mqtt_sub(mosq.port, f"{topic}/pre/+/post") as one_level:
        with conn.transaction():
            for i, (v, _) in cases.items():
                conn.execute(f"INSERT INTO {tbl} VALUES (%s, %s)", (i, v))
        got = everything.wait_count(len(cases))
        one_level.wait_count(len(cases))
        by_id = {jload(m[1])["new"]["id"]: m[0] for m in got}
        assert by_id == {i: f"{topic}/pre/{enc}/post" for i, (_, enc) in cases.items()}
        assert all(t.count("/") == topic.count("/") + 3 for t, *_ in got), "a value added a level"
        assert sorted(m[0] for m in one_level.messages) == sorted(by_id.values())

        # At the first level: '$SYS' must not make a $ topic ('+' does not match those), '' and
        # NULL become '_'.
        tail_ = unique("lvl")
        watch(conn, tbl, f"{{v}}/{tail_}/end", qos=1, broker=broker.name)
        with mqtt_sub(mosq.port, f"+/{tail_}/end") as first:
            conn.execute(f"INSERT INTO {tbl} VALUES (101, '$SYS'), (102, ''), (103, NULL), (104, '#')")
            got = first.wait_count(4)
        assert sorted(m[0] for m in got) == sorted(f"{x}/{tail_}/end" for x in ("%24SYS", "_", "_", "%23"))
    want = sorted(f"{x}/{tail_}/end" for x in ("%24SYS", "_", "_", "%23"))
    wait_for(lambda: sorted(r[0] for r in conn.execute(
        "SELECT topic FROM mqtt_message_history WHERE direction = 'send' AND topic LIKE %s",
        (f"%/{tail_}/end",))) == want, message=f"history 'send' rows {want}")


def test_schema_and_table_names_are_made_safe_too(conn, broker, mosq, topic):
    """Reading of the spec: {schema} and {table} are values like any other, so a '/' or '+' in
    a quoted name cannot add a level or a wildcard either."""
    schema, name = f"s#{unique('x')}", "a/b+c"
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        tbl = sql.Identifier(schema, name).as_string(conn)
        conn.execute(f"CREATE TABLE {tbl} (id int PRIMARY KEY)")
        watch(conn, tbl, f"{topic}/{{schema}}/{{table}}/{{id}}", qos=1, broker=broker.name)
        with mqtt_sub(mosq.port, f"{topic}/#") as sub:
            conn.execute(f"INSERT INTO {tbl} VALUES (1)")
            [(t, payload, _, _)] = sub.wait_count(1)
        assert t == f"{topic}/{level(schema)}/a%2Fb%2Bc/1"
        doc = jload(payload)
        assert (doc["schema"], doc["table"]) == (schema, name)
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_odd_table_names_other_schema_and_a_capitalised_column(conn, broker, mosq, topic):
    schema, name = f"Odd Schema {unique('s')}", f'My "Odd" Table {unique("t")}'
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        tbl = sql.Identifier(schema, name).as_string(conn)
        conn.execute(f'CREATE TABLE {tbl} (id int PRIMARY KEY, "Name" text, name text, "my col" int)')
        # an unqualified table of the same name in public must not be the one watched
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, \"Name\" text)").format(sql.Identifier(name)))
        decoy = sql.Identifier(name).as_string(conn)
        # exact, case-sensitive column names
        state = sqlstate_of(lambda: watch(conn, tbl, f"{topic}/{{NAME}}", broker=broker.name))
        assert state == "22023", f"template {{NAME}} for column \"Name\": {state}"
        assert trigger_names(conn, tbl) == []
        assert watch(conn, tbl, f"{topic}/{{schema}}/{{table}}/{{Name}}/{{name}}/{{my col}}", qos=1,
                     broker=broker.name, columns=["Name", "my col"]) == "mqtt_watch"
        assert trigger_names(conn, tbl) == ["mqtt_watch"] and trigger_names(conn, decoy) == []
        with mqtt_sub(mosq.port, f"{topic}/#") as sub:
            conn.execute(f'INSERT INTO {tbl} VALUES (1, %s, %s, 5)', ("Alice/Smith", "lower"))
            conn.execute(f'INSERT INTO {decoy} VALUES (1, %s)', ("decoy",))
            conn.execute(f'UPDATE {tbl} SET "Name" = %s', ("Bob",))
            conn.execute(f'UPDATE {tbl} SET name = %s', ("only lower",))  # not a watched column
            conn.execute(f'DELETE FROM {tbl}')
            got = sub.wait_count(3)
        assert [m[0] for m in got] == [
            f"{topic}/{schema}/{name}/Alice%2FSmith/lower/5",
            f"{topic}/{schema}/{name}/Bob/lower/5",
            f"{topic}/{schema}/{name}/Bob/only lower/5",
        ]
        docs = [jload(m[1]) for m in got]
        assert all((d["schema"], d["table"]) == (schema, name) for d in docs)
        assert docs[0]["new"] == {"id": 1, "Name": "Alice/Smith", "my col": 5}
        assert docs[2]["old"] == {"id": 1, "Name": "Bob", "my col": 5} and docs[2]["new"] is None
        assert unwatch(conn, tbl) is True and trigger_names(conn, tbl) == []
    finally:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


# ---- qos, retain, brokers ----------------------------------------------------------------------

def test_trigger_qos_levels(conn, broker, mosq, topic, make_table):
    """qos '0' / '1' / '2' as trigger arguments (the defaults, qos 0 and retain false with the
    default broker, are in test_default_broker_is_resolved_when_the_trigger_fires)."""
    tbl = make_table("id int PRIMARY KEY")
    for q in (0, 1, 2):
        create_trigger(conn, tbl, [f"{topic}/q{q}/{{id}}", str(q), "false", broker.name], name=f"q{q}")
    with mqtt_sub(mosq.port, f"{topic}/#", qos=2) as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (1)")
        got = sub.wait_count(3)
    assert sorted((m[0], m[2], m[3]) for m in got) == [(f"{topic}/q{q}/1", q, False) for q in (0, 1, 2)]
    for q in (0, 1, 2):
        [row] = wait_history(conn, f"{topic}/q{q}/1", 1, direction="send")
        assert (row["qos"], row["retain"], row["broker_id"]) == (q, False, broker.id)


def test_retain_is_seen_by_a_late_subscriber(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v text")
    t_trig, t_watch = f"{topic}/trig/1", f"{topic}/watch/1"
    try:
        create_trigger(conn, tbl, [f"{topic}/trig/{{id}}", "1", "true", broker.name], name="r")
        conn.execute(f"INSERT INTO {tbl} VALUES (1, 'a')")
        [row] = wait_history(conn, t_trig, 1, direction="send")
        assert (row["retain"], row["qos"]) == (True, 1)
        with mqtt_sub(mosq.port, t_trig) as late:
            [(t, p, q, r)] = late.wait_count(1)
        assert (t, q, r) == (t_trig, 1, True) and jload(p)["new"] == {"id": 1, "v": "a"}

        conn.execute(f"DROP TRIGGER r ON {tbl}")
        watch(conn, tbl, f"{topic}/watch/{{id}}", qos=2, retain=True, broker=broker.name)
        assert trigger_args(conn, tbl)[:4] == [f"{topic}/watch/{{id}}", "2", "true", broker.name]
        conn.execute(f"UPDATE {tbl} SET v = 'b'")
        [row] = wait_history(conn, t_watch, 1, direction="send")
        assert (row["retain"], row["qos"]) == (True, 2)
        with mqtt_sub(mosq.port, t_watch) as late:
            [(t, p, q, r)] = late.wait_count(1)
        assert (t, q, r) == (t_watch, 2, True) and jload(p)["new"] == {"id": 1, "v": "b"}
    finally:
        for t in (t_trig, t_watch):
            mosquitto_pub(mosq.port, t, null=True, retain=True)


def test_a_second_broker_by_name(conn, broker, make_broker, mosquitto_factory, mosq, topic, make_table):
    m2 = mosquitto_factory()
    b2 = make_broker(port=m2.port)
    tbl = make_table("id int PRIMARY KEY")
    t = f"{topic}/second"
    create_trigger(conn, tbl, [t, "1", "false", b2.name], name="two")
    with mqtt_sub(m2.port, f"{topic}/#") as on2, mqtt_sub(mosq.port, f"{topic}/#") as on1:
        conn.execute(f"INSERT INTO {tbl} VALUES (1)")
        [(got_t, p, q, _)] = on2.wait_count(1)
        assert (got_t, q) == (t, 1) and jload(p)["new"] == {"id": 1}
        marker(conn, t, broker.name)  # same topic and QoS on the first broker
        assert on1.wait_count(1) == [(t, b"marker", 1, False)]
    rows = wait_history(conn, t, 2, direction="send")
    assert sorted((r["broker_id"], r["payload"] == b"marker") for r in rows) == sorted([(b2.id, False), (broker.id, True)])
    # and through mqtt_watch_table
    conn.execute(f"DROP TRIGGER two ON {tbl}")
    watch(conn, tbl, f"{topic}/w2/{{id}}", qos=1, broker=b2.name)
    with mqtt_sub(m2.port, f"{topic}/#") as on2:
        conn.execute(f"INSERT INTO {tbl} VALUES (2)")
        assert [m[0] for m in on2.wait_count(1)] == [f"{topic}/w2/2"]


def test_default_broker_is_resolved_when_the_trigger_fires(owned_db, mosq, mosquitto_factory, topic):
    """broker NULL (mqtt_watch_table) and '' / absent (mqtt_publish_trigger): the broker that is
    the default when the row changes, not when the trigger was made."""
    m2 = mosquitto_factory()
    o = owned_db.connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default, active) VALUES ('one', %s, %s, true, true), "
              "('two', %s, %s, false, true)", (HOST, mosq.port, HOST, m2.port))
    wait_status(o, "one", "connected")
    wait_status(o, "two", "connected")
    o.execute("CREATE TABLE items (id int PRIMARY KEY)")
    assert watch(o, "items", f"{topic}/w/{{id}}", qos=1) == "mqtt_watch"
    args = trigger_args(o, "items")
    assert args[0] == f"{topic}/w/{{id}}" and args[3] == "", f"broker stored as {args}"
    create_trigger(o, "items", [f"{topic}/e/{{id}}", "1", "false", ""], name="empty")
    create_trigger(o, "items", [f"{topic}/a/{{id}}", "1"], name="absent")
    create_trigger(o, "items", [f"{topic}/n/{{id}}"], name="bare")  # qos 0, retain false
    qos = {"w": 1, "e": 1, "a": 1, "n": 0}
    with mqtt_sub(mosq.port, f"{topic}/#") as on1, mqtt_sub(m2.port, f"{topic}/#") as on2:
        o.execute("INSERT INTO items VALUES (1)")
        assert sorted((m[0], m[2], m[3]) for m in on1.wait_count(4)) == \
            sorted((f"{topic}/{k}/1", q, False) for k, q in qos.items())
        with o.transaction():
            o.execute("UPDATE mqtt_broker SET is_default = false WHERE name = 'one'")
            o.execute("UPDATE mqtt_broker SET is_default = true WHERE name = 'two'")
        o.execute("INSERT INTO items VALUES (2)")
        assert sorted((m[0], m[2]) for m in on2.wait_count(4)) == sorted((f"{topic}/{k}/2", q) for k, q in qos.items())
        for k, q in qos.items():  # where row 2 would be if it had gone to the old default too
            marker(o, f"{topic}/{k}/2", "one", qos=q)
        on1.wait_count(8)
        assert [m[1] for m in on1.messages[4:]] == [b"marker"] * 4, "row 2 also went to the old default"
    [row] = wait_history(o, f"{topic}/n/1", 1, direction="send")
    assert (row["qos"], row["retain"]) == (0, False)


# ---- columns, events, idempotence, unwatch -----------------------------------------------------

def test_columns_limit_the_payload_and_unchanged_updates_publish_nothing(conn, broker, mosq, topic, make_table):
    tbl = make_table("a int, b text, x int, y text, z int, PRIMARY KEY (a, b)")
    t = f"{topic}/cols"
    watch(conn, tbl, t, qos=1, broker=broker.name, columns=["x", "y"])
    assert trigger_args(conn, tbl) == [t, "1", "false", broker.name, "x", "y"]
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (1, 'k', 10, 'y1', 100)")
        conn.execute(f"UPDATE {tbl} SET z = 101")              # not a watched column: nothing
        conn.execute(f"UPDATE {tbl} SET x = x, y = y, z = 0")  # same values: nothing
        conn.execute(f"UPDATE {tbl} SET x = 11, z = 102")      # publishes
        conn.execute(f"UPDATE {tbl} SET y = NULL")             # value -> NULL publishes
        conn.execute(f"UPDATE {tbl} SET y = NULL, z = 5")      # NULL -> NULL: nothing
        conn.execute(f"UPDATE {tbl} SET y = 'back'")           # NULL -> value publishes
        conn.execute(f"UPDATE {tbl} SET z = 6")                # nothing
        conn.execute(f"DELETE FROM {tbl}")                     # publishes (the marker for the last skip)
        got = sub.wait_count(5)
        marker(conn, t, broker.name)
        got = sub.wait_count(6)
    assert [m[1] for m in got][-1] == b"marker"
    docs = [jload(m[1]) for m in got[:-1]]
    pk = {"a": 1, "b": "k"}
    assert [(d["op"], d["new"], d["old"]) for d in docs] == [
        ("insert", {**pk, "x": 10, "y": "y1"}, None),
        ("update", {**pk, "x": 11, "y": "y1"}, {**pk, "x": 10, "y": "y1"}),
        ("update", {**pk, "x": 11, "y": None}, {**pk, "x": 11, "y": "y1"}),
        ("update", {**pk, "x": 11, "y": "back"}, {**pk, "x": 11, "y": None}),
        ("delete", None, {**pk, "x": 11, "y": "back"}),
    ]


def test_events_subset(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v int")
    t = f"{topic}/ev"
    watch(conn, tbl, t, qos=1, broker=broker.name, events=["insert"])
    d = triggerdef(conn, tbl)
    assert "AFTER INSERT ON" in d and "FOR EACH ROW" in d and "UPDATE" not in d and "DELETE" not in d, d
    with mqtt_sub(mosq.port, t) as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (1, 0)")
        conn.execute(f"UPDATE {tbl} SET v = 1")
        conn.execute(f"DELETE FROM {tbl}")
        conn.execute(f"INSERT INTO {tbl} VALUES (2, 0)")  # marker
        got = sub.wait_count(2)
        assert [(jload(m[1])["op"], jload(m[1])["new"]["id"]) for m in got] == [("insert", 1), ("insert", 2)]

        watch(conn, tbl, t, qos=1, broker=broker.name, events=["delete", "update"])
        d = triggerdef(conn, tbl)
        assert "INSERT" not in d and "UPDATE" in d and "DELETE" in d and "FOR EACH ROW" in d, d
        conn.execute(f"INSERT INTO {tbl} VALUES (3, 0)")
        conn.execute(f"UPDATE {tbl} SET v = 5 WHERE id = 3")
        conn.execute(f"DELETE FROM {tbl} WHERE id = 3")
        got = sub.wait_count(4)
    assert [jload(m[1])["op"] for m in got[2:]] == ["update", "delete"]
    # the default: all three
    watch(conn, tbl, t, broker=broker.name)
    assert ALL_EVENTS_DEF in triggerdef(conn, tbl) and "FOR EACH ROW" in triggerdef(conn, tbl)


def test_watch_twice_leaves_one_trigger_and_the_second_settings_win(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v int")
    # a trigger of the user's own, which watching and unwatching must leave alone
    conn.execute(f"CREATE TRIGGER other BEFORE UPDATE ON {tbl} FOR EACH ROW "
                 "EXECUTE FUNCTION suppress_redundant_updates_trigger()")
    assert watch(conn, tbl, f"{topic}/v1/{{id}}", qos=0, broker=broker.name) == "mqtt_watch"
    assert watch(conn, tbl, f"{topic}/v2/{{id}}", qos=1, broker=broker.name, columns=["v"]) == "mqtt_watch"
    assert trigger_names(conn, tbl) == ["mqtt_watch", "other"]
    assert trigger_args(conn, tbl) == [f"{topic}/v2/{{id}}", "1", "false", broker.name, "v"]
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (1, 7)")
        [(t, p, q, _)] = sub.wait_count(1)
        assert (t, q) == (f"{topic}/v2/1", 1)
        assert jload(p)["new"] == {"id": 1, "v": 7}
        marker(conn, f"{topic}/v1/1", broker.name, qos=0)  # where the first settings would publish
        got = sub.wait_count(2)
    assert got[1][:2] == (f"{topic}/v1/1", b"marker") and len(got) == 2
    # unwatch: true, then false; the user's own trigger stays
    assert unwatch(conn, tbl) is True
    assert trigger_names(conn, tbl) == ["other"]
    assert unwatch(conn, tbl) is False
    assert trigger_names(conn, tbl) == ["other"]
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(f"INSERT INTO {tbl} VALUES (2, 8)")
        marker(conn, f"{topic}/v2/2", broker.name)
        assert sub.wait_count(1) == [(f"{topic}/v2/2", b"marker", 1, False)]


def test_unwatch_a_table_never_watched(conn, make_table):
    tbl = make_table("id int PRIMARY KEY")
    before = triggers(conn)
    assert unwatch(conn, tbl) is False
    assert triggers(conn) == before


def test_truncate_publishes_nothing(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY")
    t = f"{topic}/trunc"
    conn.execute(f"INSERT INTO {tbl} SELECT generate_series(1, 5)")
    watch(conn, tbl, t, qos=1, broker=broker.name)
    with mqtt_sub(mosq.port, t) as sub:
        conn.execute(f"TRUNCATE {tbl}")
        marker(conn, t, broker.name)
        assert sub.wait_count(1) == [(t, b"marker", 1, False)]


# ---- bad input -------------------------------------------------------------------------------

BAD_WATCH = [
    # (what, kwargs (template included), expected SQLSTATE)
    ("template with +", {"template": "x/+/{id}"}, "22023"),
    ("template with #", {"template": "x/#"}, "22023"),
    ("template with + inside a level", {"template": "x/a+b/{id}"}, "22023"),
    ("unknown column", {"template": "x/{nope}"}, "22023"),
    ("column in the wrong case", {"template": "x/{ID}"}, "22023"),
    ("unclosed {", {"template": "x/{id"}, "22023"),
    ("empty placeholder", {"template": "x/{}"}, "22023"),
    ("empty template (reading: an empty topic is invalid)", {"template": ""}, "22023"),
    ("NULL template (reading)", {"template": None}, "22023"),
    ("qos 3", {"qos": 3}, "22023"),
    ("qos -1", {"qos": -1}, "22023"),
    ("qos NULL (reading)", {"qos": None}, "22023"),
    ("retain NULL (reading)", {"retain": None}, "22023"),
    ("unknown broker", {"broker": "no_such_broker_x"}, "42704"),
    ("unknown column in columns", {"columns": ["nope"]}, "22023"),
    ("one unknown among known", {"columns": ["id", "nope"]}, "22023"),
    ("column in the wrong case in columns", {"columns": ["V"]}, "22023"),
    ("empty columns", {"columns": []}, "22023"),
    ("NULL in columns", {"columns": [None]}, "22023"),
    ("empty events", {"events": []}, "22023"),
    ("truncate event", {"events": ["truncate"]}, "22023"),
    ("unknown event", {"events": ["insert", "upsert"]}, "22023"),
    ("NULL events (reading: not a non-empty subset)", {"events": None}, "22023"),
]


def test_watch_bad_input_changes_nothing(conn, broker, make_table, topic):
    tbl = make_table("id int PRIMARY KEY, v int")
    fresh = make_table("id int PRIMARY KEY, v int")
    watch(conn, tbl, f"{topic}/keep/{{id}}", qos=1, broker=broker.name, columns=["v"])
    kept = trigger_args(conn, tbl)
    problems = []
    for what, kw, want in BAD_WATCH:
        kw = {"template": f"{topic}/{{id}}", "broker": broker.name, **kw}
        template = kw.pop("template")
        for target in (fresh, tbl):  # a table not watched yet, and one whose watch must stay
            before, counts = triggers(conn), (config_counts(conn), outbox_under(conn, topic))
            state = sqlstate_of(lambda: watch(conn, target, template, **kw))
            if state != want:
                problems.append(f"{what} on {'fresh' if target == fresh else 'watched'} table: "
                                f"SQLSTATE {state}, expected {want}")
            if triggers(conn) != before or (config_counts(conn), outbox_under(conn, topic)) != counts:
                problems.append(f"{what}: something changed (pg_trigger or the extension's tables)")
    if trigger_names(conn, fresh) != []:
        problems.append(f"the fresh table has triggers {trigger_names(conn, fresh)}")
    if trigger_args(conn, tbl) != kept:
        problems.append(f"the watched table's trigger changed: {trigger_args(conn, tbl)}, was {kept}")
    # not a table: a view (PostgreSQL refuses row triggers on it), and no such relation
    view = unique("v")
    conn.execute(f'CREATE VIEW "{view}" AS SELECT 1 AS id')
    before = triggers(conn)
    state = sqlstate_of(lambda: watch(conn, view, f"{topic}/x", broker=broker.name))
    if state is None:
        problems.append("mqtt_watch_table on a view did not fail")
    assert triggers(conn) == before
    conn.execute(f'DROP VIEW "{view}"')
    state = sqlstate_of(lambda: watch(conn, "no_such_table_x", f"{topic}/x", broker=broker.name))
    if state != "42P01":
        problems.append(f"unknown table: {state}, expected 42P01")
    state = sqlstate_of(lambda: unwatch(conn, "no_such_table_x"))
    if state != "42P01":
        problems.append(f"unwatch unknown table: {state}, expected 42P01")
    assert not problems, "\n".join(problems)


BAD_TRIGGER_ARGS = [
    ("no arguments", [], "22023"),
    ("qos 3", ["{t}/{{id}}", "3"], "22023"),
    ("qos x", ["{t}/{{id}}", "x"], "22023"),
    ("qos -1", ["{t}/{{id}}", "-1"], "22023"),
    ("retain 'maybe'", ["{t}/{{id}}", "1", "maybe"], "22023"),
    ("retain '2'", ["{t}/{{id}}", "1", "2"], "22023"),
    ("unknown broker", ["{t}/{{id}}", "1", "false", "no_such_broker_x"], "42704"),
    ("template with +", ["{t}/+/{{id}}"], "22023"),
    ("template with #", ["{t}/#"], "22023"),
    ("unknown column", ["{t}/{{nope}}"], "22023"),
    ("column in the wrong case", ["{t}/{{ID}}"], "22023"),
    ("unclosed {", ["{t}/{{id"], "22023"),
    ("unknown column in columns", ["{t}/{{id}}", "1", "false", "{b}", "nope"], "22023"),
]


def test_trigger_bad_arguments_fail_the_statement_and_change_nothing(conn, broker, make_table, topic):
    tbl = make_table("id int PRIMARY KEY, v int")
    conn.execute(f"INSERT INTO {tbl} VALUES (1, 0)")
    problems = []
    for what, args, want in BAD_TRIGGER_ARGS:
        args = [a.format(t=topic, b=broker.name) for a in args]
        create_trigger(conn, tbl, args, name="bad")
        try:
            for stmt in (f"INSERT INTO {tbl} VALUES (2, 0)", f"UPDATE {tbl} SET v = v + 1", f"DELETE FROM {tbl}"):
                counts = config_counts(conn), outbox_under(conn, topic)
                state = sqlstate_of(lambda: conn.execute(stmt))
                if state != want:
                    problems.append(f"{what} ({stmt.split()[0]}): SQLSTATE {state}, expected {want}")
                rows = conn.execute(f"SELECT id, v FROM {tbl} ORDER BY id").fetchall()
                if rows != [(1, 0)] or (config_counts(conn), outbox_under(conn, topic)) != counts:
                    problems.append(f"{what} ({stmt.split()[0]}): changed something: rows {rows}")
        finally:
            conn.execute(f"DROP TRIGGER bad ON {tbl}")
        if conn.execute(f"SELECT id, v FROM {tbl} ORDER BY id").fetchall() != [(1, 0)]:
            conn.execute(f"ALTER TABLE {tbl} DISABLE TRIGGER USER")
            conn.execute(f"DELETE FROM {tbl}")
            conn.execute(f"INSERT INTO {tbl} VALUES (1, 0)")
            conn.execute(f"ALTER TABLE {tbl} ENABLE TRIGGER USER")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("timing, level_", [("BEFORE", "ROW"), ("AFTER", "STATEMENT"), ("BEFORE", "STATEMENT")])
def test_before_or_statement_trigger_fails_when_fired(conn, broker, mosq, topic, make_table, timing, level_):
    tbl = make_table("id int PRIMARY KEY, v int")
    conn.execute(f"INSERT INTO {tbl} VALUES (1, 0)")
    t = f"{topic}/misuse"
    create_trigger(conn, tbl, [t, "1", "false", broker.name], name="misuse", timing=timing, level_=level_)
    with mqtt_sub(mosq.port, t) as sub:
        for stmt in (f"INSERT INTO {tbl} VALUES (2, 0)", f"UPDATE {tbl} SET v = 1", f"DELETE FROM {tbl}"):
            assert sqlstate_of(lambda: conn.execute(stmt)) == "22023", stmt
        assert conn.execute(f"SELECT id, v FROM {tbl}").fetchall() == [(1, 0)]
        marker(conn, t, broker.name)
        assert sub.wait_count(1) == [(t, b"marker", 1, False)]


# ---- transactions ------------------------------------------------------------------------------

def test_changes_are_in_the_outbox_in_the_transaction_and_arrive_after_commit(connect, broker, mosq, topic,
                                                                             make_table, conn):
    tbl = make_table("id int PRIMARY KEY, v int")
    conn.execute(f"INSERT INTO {tbl} SELECT g, 0 FROM generate_series(1, 3) g")
    watch(conn, tbl, f"{topic}/tx/{{id}}", qos=1, broker=broker.name)
    c = connect(autocommit=False)
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        c.execute(f"UPDATE {tbl} SET v = v + 1")
        mine = outbox_under(c, topic)
        assert sorted(t for t, _ in mine) == [f"{topic}/tx/{i}" for i in (1, 2, 3)]
        assert all(jload(p)["new"]["v"] == 1 and jload(p)["old"]["v"] == 0 for _, p in mine)
        assert outbox_under(conn, topic) == [], "another session sees uncommitted outbox rows"
        c.execute(f"DELETE FROM {tbl} WHERE id = 2")
        assert len(outbox_under(c, topic)) == 4
        c.commit()
        got = sub.wait_count(4)
    assert sorted((m[0], jload(m[1])["op"]) for m in got) == sorted(
        [(f"{topic}/tx/{i}", "update") for i in (1, 2, 3)] + [(f"{topic}/tx/2", "delete")])
    wait_for(lambda: outbox_under(conn, topic) == [], message="the outbox to drain")


def test_rollback_and_rolled_back_savepoint_send_nothing(connect, conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v text")
    t = f"{topic}/tx"
    watch(conn, tbl, t, qos=1, broker=broker.name)
    c = connect(autocommit=False)
    with mqtt_sub(mosq.port, t) as sub:
        c.execute(f"INSERT INTO {tbl} VALUES (1, 'rolled back')")
        assert len(outbox_under(c, topic)) == 1
        c.rollback()
        assert outbox_under(c, topic) == []
        c.execute(f"INSERT INTO {tbl} VALUES (2, 'outer')")
        c.execute("SAVEPOINT s")
        c.execute(f"INSERT INTO {tbl} VALUES (3, 'in rolled-back savepoint')")
        c.execute(f"UPDATE {tbl} SET v = 'updated in savepoint' WHERE id = 2")
        c.execute("ROLLBACK TO SAVEPOINT s")
        assert len(outbox_under(c, topic)) == 1
        c.execute("SAVEPOINT r")
        c.execute(f"INSERT INTO {tbl} VALUES (4, 'in released savepoint')")
        c.execute("RELEASE SAVEPOINT r")
        c.commit()
        got = sub.wait_count(2)
        marker(conn, t, broker.name)
        got = sub.wait_count(3)
    assert [jload(m[1])["new"]["v"] for m in got[:2]] == ["outer", "in released savepoint"]
    assert got[2][1] == b"marker" and len(got) == 3
    sent = [r["payload"] for r in wait_history(conn, t, 3, direction="send")]
    assert sorted(p for p in sent if p != b"marker") == sorted(m[1] for m in got[:2])
    assert len(sent) == 3


@pytest.mark.parametrize("then", ["commit", "another statement", "autocommit"])
def test_copy_into_a_watched_table_publishes_each_row(connect, conn, broker, mosq, topic, make_table, then):
    """COPY FROM fires row triggers like INSERT: each row is in the outbox after the COPY, in
    the same transaction, and arrives after commit; the transaction goes on normally (commit at
    once, another statement first, or COPY in autocommit)."""
    tbl = make_table("id int PRIMARY KEY, v text")
    watch(conn, tbl, f"{topic}/copy/{{id}}", qos=1, broker=broker.name)
    c = connect(autocommit=(then == "autocommit"))
    problems = []
    want = [(f"{topic}/copy/{i}", "insert", f"copied {i}") for i in range(1, 6)]
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        try:
            with c.cursor().copy(f"COPY {tbl} (id, v) FROM STDIN") as cp:
                for i in range(1, 6):
                    cp.write_row((i, f"copied {i}"))
        except psycopg.Error as e:
            problems.append(f"the COPY failed: {e.sqlstate} {e.diag.message_primary}")
            want = []
            if not c.autocommit:
                c.rollback()
        if then != "autocommit" and want:
            in_tx = sorted(t for t, _ in outbox_under(c, topic))
            if in_tx != sorted(f"{topic}/copy/{i}" for i in range(1, 6)):
                problems.append(f"after the COPY, in its transaction, mqtt_outbox holds {in_tx}")
        if then == "another statement" and want:
            try:
                c.execute(f"UPDATE {tbl} SET v = 'updated' WHERE id = 1")
                want.append((f"{topic}/copy/1", "update", "updated"))
            except psycopg.Error as e:
                problems.append(f"the statement after the COPY failed: {e.sqlstate} {e.diag.message_primary}")
                c.rollback()
                want = []
        if then != "autocommit":
            try:
                c.commit()
            except psycopg.Error as e:
                problems.append(f"COMMIT after the COPY failed: {e.sqlstate} {e.diag.message_primary}")
                want = []
        if conn.execute(f"SELECT count(*) FROM {tbl}").fetchone()[0] != (5 if want else 0):
            problems.append("the copied rows are not in the table after commit")
        marker(conn, f"{topic}/copy/9", broker.name)
        msgs = wait_for(lambda: (lambda ms: ms if ms and ms[-1][1] == b"marker" else False)(list(sub.messages)),
                        message="the marker")
    arrived = sorted((m[0], jload(m[1])["op"], jload(m[1])["new"]["v"]) for m in msgs[:-1])
    if arrived != sorted(want):
        problems.append(f"delivered before a later marker: {arrived}, expected {sorted(want)}")
    assert not problems, "\n".join(problems)


def test_a_failed_statement_leaks_nothing_into_the_next(connect, conn, broker, mosq, topic, make_table):
    """Rows a statement queued before it failed (a later AFTER trigger raised) are gone with it:
    after ROLLBACK TO SAVEPOINT, or a plpgsql EXCEPTION block, the next statement sends only
    its own rows."""
    tbl = make_table("id int PRIMARY KEY, v int")
    fail = unique("wfail")
    conn.execute(f"CREATE FUNCTION {fail}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "IF NEW.v < 0 THEN RAISE EXCEPTION 'negative'; END IF; RETURN NULL; END $$")
    try:
        watch(conn, tbl, f"{topic}/f/{{id}}", qos=1, broker=broker.name)
        # fires after mqtt_watch for each row (row triggers fire in name order)
        conn.execute(f"CREATE TRIGGER zz_fail AFTER INSERT OR UPDATE ON {tbl} FOR EACH ROW EXECUTE FUNCTION {fail}()")
        c = connect(autocommit=False)
        with mqtt_sub(mosq.port, f"{topic}/#") as sub:
            c.execute("SAVEPOINT s")
            with pytest.raises(psycopg.errors.RaiseException):
                c.execute(f"INSERT INTO {tbl} VALUES (1, 1), (2, 2), (3, -1)")
            c.execute("ROLLBACK TO SAVEPOINT s")
            c.execute(f"INSERT INTO {tbl} VALUES (10, 10)")
            assert [t for t, _ in outbox_under(c, topic)] == [f"{topic}/f/10"]
            c.commit()
            c.execute(f"""DO $$ BEGIN
                BEGIN
                    INSERT INTO {tbl} VALUES (4, 4), (5, -5);
                EXCEPTION WHEN raise_exception THEN NULL;
                END;
                INSERT INTO {tbl} VALUES (20, 20);
            END $$""")
            c.commit()
            # and in autocommit: a failed statement, then a good one
            with pytest.raises(psycopg.errors.RaiseException):
                conn.execute(f"UPDATE {tbl} SET v = -v WHERE id = 10")
            conn.execute(f"INSERT INTO {tbl} VALUES (30, 30)")
            got = sub.wait_count(3)
            marker(conn, f"{topic}/f/1", broker.name)
            got = sub.wait_count(4)
        assert [m[0] for m in got] == [f"{topic}/f/10", f"{topic}/f/20", f"{topic}/f/30", f"{topic}/f/1"]
        assert got[3][1] == b"marker"
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {tbl}")
        conn.execute(f"DROP FUNCTION {fail}()")


def test_upsert_cte_and_statements_inside_functions(conn, broker, mosq, topic, make_table):
    tbl = make_table("id int PRIMARY KEY, v int")
    watch(conn, tbl, f"{topic}/u/{{id}}/{{op}}", qos=1, broker=broker.name)
    conn.execute(f"INSERT INTO {tbl} VALUES (1, 1)")
    # its message must be gone before the subscriber comes, or the subscriber may get it too
    wait_for(lambda: outbox_under(conn, topic) == [], message="the outbox to drain")
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        # ON CONFLICT: an update for the existing key, an insert for the new one
        conn.execute(f"INSERT INTO {tbl} VALUES (1, 100), (2, 200) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v")
        got = sub.wait_count(2)
        assert sorted(m[0] for m in got) == [f"{topic}/u/1/update", f"{topic}/u/2/insert"]
        upd = next(jload(m[1]) for m in got if m[0].endswith("update"))
        assert (upd["old"]["v"], upd["new"]["v"]) == (1, 100)
        # a writable CTE
        n = conn.execute(f"WITH d AS (DELETE FROM {tbl} WHERE id = 2 RETURNING *) SELECT count(*) FROM d").fetchone()[0]
        assert n == 1
        got = sub.wait_count(3)
        assert got[2][0] == f"{topic}/u/2/delete"
        # a statement inside a function: its rows are in the outbox when the function looks
        # (first let the earlier update of row 1, on the same topic, leave the outbox)
        wait_for(lambda: outbox_under(conn, topic) == [], message="the outbox to drain")
        conn.execute(f"""DO $$ DECLARE k int; BEGIN
                UPDATE {tbl} SET v = v + 1 WHERE id = 1;
                SELECT count(*) INTO k FROM mqtt_outbox WHERE topic = '{topic}/u/1/update';
                IF k <> 1 THEN RAISE EXCEPTION 'the UPDATE''s row is not in mqtt_outbox after the statement: %', k; END IF;
            END $$""")
        got = sub.wait_count(4)
        assert got[3][0] == f"{topic}/u/1/update" and jload(got[3][1])["new"]["v"] == 101


def test_foreign_key_cascades_and_merge_publish(conn, broker, mosq, topic, make_table):
    """Rows changed by an ON DELETE / ON UPDATE CASCADE (PostgreSQL's own triggers, nested
    statements) and by MERGE publish like any other change."""
    parent = make_table("id int PRIMARY KEY")
    child = make_table(f"id int PRIMARY KEY, parent_id int REFERENCES {parent} ON DELETE CASCADE ON UPDATE CASCADE, v int")
    conn.execute(f"INSERT INTO {parent} VALUES (1), (2)")
    conn.execute(f"INSERT INTO {child} VALUES (11, 1, 0), (12, 1, 0), (21, 2, 0)")
    watch(conn, child, f"{topic}/c/{{id}}/{{op}}", qos=1, broker=broker.name)
    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        conn.execute(f"DELETE FROM {parent} WHERE id = 1")
        got = sub.wait_count(2)
        assert sorted(m[0] for m in got) == [f"{topic}/c/11/delete", f"{topic}/c/12/delete"]
        conn.execute(f"UPDATE {parent} SET id = 20 WHERE id = 2")
        got = sub.wait_count(3)
        doc = jload(got[2][1])
        assert got[2][0] == f"{topic}/c/21/update" and (doc["old"]["parent_id"], doc["new"]["parent_id"]) == (2, 20)
        conn.execute(f"INSERT INTO {parent} VALUES (3)")
        conn.execute(f"""MERGE INTO {child} t USING (VALUES (21, 20, 0), (31, 3, 5), (32, 3, 6)) AS s(id, p, v)
                         ON t.id = s.id
                         WHEN MATCHED THEN UPDATE SET v = 99
                         WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.p, s.v)""")
        got = sub.wait_count(6)
        assert sorted(m[0] for m in got[3:]) == sorted([f"{topic}/c/21/update", f"{topic}/c/31/insert",
                                                        f"{topic}/c/32/insert"])
        conn.execute(f"MERGE INTO {child} t USING (VALUES (31)) AS s(id) ON t.id = s.id WHEN MATCHED THEN DELETE")
        got = sub.wait_count(7)
        assert got[6][0] == f"{topic}/c/31/delete" and jload(got[6][1])["old"]["v"] == 5
        marker(conn, f"{topic}/c/32/insert", broker.name)
        assert len(sub.wait_count(8)) == 8


# ---- access rules ------------------------------------------------------------------------------

def test_publish_rules_apply_to_the_role_that_changes_the_row(owned_db, mosq, topic):
    o = owned_db.connect()
    o.execute("INSERT INTO mqtt_broker (name, host, port, is_default, active) VALUES ('b', %s, %s, true, true)",
              (HOST, mosq.port))
    wait_status(o, "b", "connected")
    o.execute("CREATE TABLE zones (id int PRIMARY KEY, zone text, v int)")
    o.execute("INSERT INTO zones VALUES (1, 'allowed', 0), (2, 'denied', 0), (3, 'allowed', 0)")
    watch(o, "zones", f"{topic}/{{zone}}/{{id}}", qos=1)
    device = owned_db.new_role("wdev")
    o.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON zones TO "{device}"')
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES (%s, %s, true)",
              (device, f"{topic}/allowed/#"))
    d = owned_db.connect(device)

    def state():
        return o.execute("SELECT id, zone, v FROM zones ORDER BY id").fetchall(), \
            o.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0]

    with mqtt_sub(mosq.port, f"{topic}/#") as sub:
        d.execute("UPDATE zones SET v = 1 WHERE id = 1")
        [(t, p, _, _)] = sub.wait_count(1)
        assert t == f"{topic}/allowed/1" and jload(p)["new"]["v"] == 1
        before = state()
        for stmt in ("UPDATE zones SET v = 9 WHERE id = 2",          # denied topic
                     "UPDATE zones SET v = v + 10",                   # one denied row among allowed ones
                     "UPDATE zones SET zone = 'denied' WHERE id = 3",  # NEW makes the topic denied
                     "INSERT INTO zones VALUES (4, 'denied', 0)",
                     "DELETE FROM zones WHERE id = 2"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                d.execute(stmt)
            assert state() == before, f"{stmt} changed something"
        d.execute("INSERT INTO zones VALUES (5, 'allowed', 0)")
        # the owner's rule ('#') allows the denied zone: its change is the marker for it
        o.execute("UPDATE zones SET v = 2 WHERE id = 2")
        got = sub.wait_count(3)
    assert [m[0] for m in got] == [f"{topic}/allowed/1", f"{topic}/allowed/5", f"{topic}/denied/2"]


def test_watch_needs_trigger_privilege_on_the_table(owned_db, topic):
    o = owned_db.connect()
    o.execute("INSERT INTO mqtt_broker (name, host, is_default) VALUES ('b', 'localhost', true)")
    o.execute("CREATE TABLE owned (id int PRIMARY KEY, v int)")
    o.execute("CREATE TABLE unwatched (id int PRIMARY KEY)")
    watch(o, "owned", f"{topic}/{{id}}")
    outsider = owned_db.new_role("wout")
    user = owned_db.new_role("wuser")
    o.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE, REFERENCES, TRUNCATE ON owned, unwatched TO "{user}"')
    o.execute("INSERT INTO mqtt_access_control (role_name, topic_filter, allow_publish) VALUES ('public', '#', true)")
    before = triggers(o)
    problems = []
    for role in (outsider, user):
        c = owned_db.connect(role)
        for what, fn in (("watch owned", lambda: watch(c, "owned", f"{topic}/mine/{{id}}")),
                         ("watch unwatched", lambda: watch(c, "unwatched", f"{topic}/{{id}}")),
                         ("unwatch owned", lambda: unwatch(c, "owned"))):
            s = sqlstate_of(fn)
            if s != "42501":
                problems.append(f"{role} {what}: SQLSTATE {s}, expected 42501")
        if triggers(o) != before:
            problems.append(f"{role}: pg_trigger changed")
    assert not problems, "\n".join(problems)
    assert trigger_args(o, "owned")[0] == f"{topic}/{{id}}"


# ---- bulk -------------------------------------------------------------------------------------

def test_bulk_update_of_20000_rows_delivers_each_exactly_once(conn, broker, mosq, topic, make_table, capsys):
    import time
    n = 20_000
    tbl = make_table("id int PRIMARY KEY, v int, s text")
    conn.execute(f"INSERT INTO {tbl} SELECT g, g, 'row ' || g FROM generate_series(1, %s) g", (n,))
    watch(conn, tbl, f"{topic}/bulk/{{id}}", qos=1, broker=broker.name)
    with mqtt_sub(mosq.port, f"{topic}/bulk/#", qos=1) as sub:
        t0 = time.monotonic()
        conn.execute(f"UPDATE {tbl} SET v = v + 1")
        t_update = time.monotonic() - t0
        got = sub.wait_count(n, timeout=180)
        t_all = time.monotonic() - t0
        marker(conn, f"{topic}/bulk/{n}", broker.name)  # a redelivery would come before it
        got = sub.wait_count(n + 1, timeout=30)
    assert got[-1][1] == b"marker" and len(got) == n + 1
    ids = Counter()
    for t, p, q, _ in got[:-1]:
        doc = jload(p)
        assert t == f"{topic}/bulk/{doc['new']['id']}" and q == 1
        assert doc["new"]["v"] == doc["old"]["v"] + 1 == doc["new"]["id"] + 1
        ids[doc["new"]["id"]] += 1
    assert set(ids) == set(range(1, n + 1)) and set(ids.values()) == {1}, "each row exactly once"
    sent = wait_for(lambda: (lambda k: k if k >= n + 1 else False)(conn.execute(
        "SELECT count(*) FROM mqtt_message_history WHERE direction = 'send' AND starts_with(topic, %s)",
        (f"{topic}/bulk/",)).fetchone()[0]), timeout=60, message="history rows")
    assert sent == n + 1
    with capsys.disabled():
        print(f"\n[watch bulk] UPDATE of {n} rows {t_update:.2f} s; all delivered {t_all:.2f} s after it started")
