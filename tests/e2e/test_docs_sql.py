"""The SQL of docs/odoo.md and of README's "Publish table changes" and "Route incoming messages"
stays true: every tagged ```sql block there runs, statement by statement and as written, as a
non-superuser role that owns its database, and does what the text around it says.

docs/odoo.md runs the way Odoo runs it (psycopg2, each block one REPEATABLE READ request); the
README blocks the way psql runs them (each statement on its own, autocommit unless BEGIN). The
README's ```bash blocks tagged like its sql blocks hold the mosquitto_pub lines the examples
publish with; test_readme.py runs only the untagged blocks, so the two do not overlap.
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import subprocess
from decimal import Decimal
from pathlib import Path

import psycopg
import psycopg2
import pytest

from harness import HOST, MOSQUITTO_PUB, mqtt_sub, unique, wait_for
from test_odoo import odoo, odoo_request, query  # noqa: F401 - odoo is a fixture

ROOT = Path(__file__).resolve().parents[2]
ODOO_MD = ROOT / "docs" / "odoo.md"
README = ROOT / "README.md"


def tagged(path: Path, lang: str, prefix: str = "") -> dict[str, str]:
    """The ```<lang> <tag> blocks of a file whose tag starts with prefix, by tag, in order."""
    found = re.findall(rf"^```{lang} ({re.escape(prefix)}[\w-]*)\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    tags = [t for t, _ in found]
    assert len(tags) == len(set(tags)), f"a tag is used twice in {path.name}: {tags}"
    return dict(found)


def section(path: Path, title: str) -> str:
    text = path.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def statements(block: str) -> list[str]:
    """Split SQL into statements as psql does: on semicolons outside quotes, dollar quotes and
    comments; comments dropped."""
    out, buf, i = [], [], 0
    while i < len(block):
        c = block[i]
        if block.startswith("--", i):
            j = block.find("\n", i)
            i = len(block) if j < 0 else j
            continue
        if c in "'\"":
            j = i + 1
            while True:
                j = block.index(c, j)
                if block.startswith(c * 2, j):
                    j += 2
                    continue
                break
            buf.append(block[i:j + 1])
            i = j + 1
            continue
        m = re.match(r"\$[A-Za-z_]*\$", block[i:]) if c == "$" else None
        if m:
            j = block.index(m.group(0), i + len(m.group(0))) + len(m.group(0))
            buf.append(block[i:j])
            i = j
            continue
        if c == ";":
            out.append("".join(buf).strip())
            buf = []
        else:
            buf.append(c)
        i += 1
    out.append("".join(buf).strip())
    return [s for s in out if s]


def test_statement_splitter():
    assert statements("SELECT 'a;b'; -- c;d\nCREATE FUNCTION f() AS $$ x; y $$; SELECT \"q;\"") == [
        "SELECT 'a;b'", "CREATE FUNCTION f() AS $$ x; y $$", 'SELECT "q;"']


def mosquitto_lines(block: str, port: int) -> list[list[str]]:
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("mosquitto_pub ") for ln in lines), lines
    return [shlex.split(ln.replace("PORT", str(port))) + ["-h", HOST] for ln in lines]


def run_pub(argv: list[str]) -> None:
    assert argv[0] == "mosquitto_pub"
    subprocess.run([MOSQUITTO_PUB, *argv[1:]], check=True, capture_output=True, timeout=30)


# ---- docs/odoo.md ----------------------------------------------------------------------------

ODOO_ORDER = ["odoo-superuser", "odoo-history-view", "odoo-broker", "odoo-access", "odoo-publish",
              "odoo-watch", "odoo-sale-orders", "odoo-handler", "odoo-start", "odoo-status",
              "odoo-refused", "odoo-uninstall", "odoo-orm-tables"]


@pytest.fixture
def plc_role(pg):
    with pg.connect() as admin:
        admin.execute("DROP ROLE IF EXISTS plc_line1")
        admin.execute("CREATE ROLE plc_line1 LOGIN NOSUPERUSER")
    yield "plc_line1"
    with pg.connect() as admin:
        admin.execute("DROP ROLE IF EXISTS plc_line1")


def test_odoo_md_sql_runs_as_odoo_runs_it(pg, odoo, mosq, plc_role):
    blocks = tagged(ODOO_MD, "sql")
    assert list(blocks) == ODOO_ORDER, "every sql block of docs/odoo.md is run below, in this order"
    port = str(mosq.port)
    cx = odoo.connect()

    def request(tag):
        """One Odoo request sending the block's statements one by one; the last one's rows."""
        def run(cr, _):
            rows = None
            for stmt in statements(blocks[tag].replace("1883", port)):
                cr.execute(stmt)
                rows = cr.fetchall() if cr.description else None
            return rows
        return odoo_request(cx, run)[0]

    # The superuser's step, as written, in a database of its own (the fixture's database got the
    # extension the same way).
    fresh = unique("odoomd")
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{fresh}" OWNER "{odoo.role}"')
    try:
        with pg.connect(fresh) as su:
            for stmt in statements(blocks["odoo-superuser"]):
                su.execute(stmt)
            assert su.execute("SELECT extname FROM pg_extension WHERE extname = 'mqtt_pg'").fetchone()
    finally:
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE "{fresh}" WITH (FORCE)')

    request("odoo-orm-tables")  # what the ORM made for sale.order and plant.scale.reading
    request("odoo-history-view")
    assert request("odoo-broker") == [(True, None)]
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):  # a mapped sealed column's write
        odoo_request(cx, lambda cr, _: cr.execute('UPDATE "mqtt_broker" SET "password_sealed" = NULL WHERE id IN (1)'))
    assert query(cx, "SELECT has_password FROM mqtt_broker") == [(True,)]
    request("odoo-access")
    assert query(cx, "SELECT allow_publish, allow_subscribe FROM mqtt_access_control "
                     "WHERE role_name = 'plc_line1'") == [(True, False)]
    assert query(cx, "SELECT mqtt_check_permission('plc_line1', 'plant/line1/state', 'publish'), "
                     "mqtt_check_permission('plc_line1', 'plant/line2/state', 'publish')") == [(True, False)]
    request("odoo-handler")

    with mqtt_sub(mosq.port, "odoo/#", qos=1) as sub:
        request("odoo-publish")
        assert request("odoo-watch") == [("mqtt_watch",)]
        request("odoo-sale-orders")
        # the broker is not started yet: all three wait in the outbox, the chatter write added none
        assert query(cx, "SELECT topic FROM mqtt_outbox ORDER BY id") == [
            ("odoo/warehouse/WH/prepare",), ("odoo/sale/draft/S00042",), ("odoo/sale/sale/S00042",)]

        request("odoo-start")
        status_stmt = statements(blocks["odoo-status"])[0]
        wait_for(lambda: query(cx, status_stmt) == [("connected",)], message="the broker connected")
        assert request("odoo-status") == [(0,)]  # nothing to requeue
        got = sub.wait_count(3)
    assert [(t, q) for t, _, q, _ in got] == [("odoo/warehouse/WH/prepare", 1), ("odoo/sale/draft/S00042", 1),
                                              ("odoo/sale/sale/S00042", 1)]
    assert json.loads(got[0][1]) == {"order": "S00042"}
    row = {"id": 1, "state": "draft", "amount_total": 120.0}
    assert json.loads(got[1][1]) == {"op": "insert", "schema": "public", "table": "sale_order",
                                     "new": row, "old": None}
    assert json.loads(got[2][1]) == {"op": "update", "schema": "public", "table": "sale_order",
                                     "new": {**row, "state": "sale"}, "old": row}

    # a scale's reading becomes a plant.scale.reading record
    [(client_id,)] = query(cx, "SELECT mqtt_status('plant')->>'client_id'")
    mosq.wait_subscribed(client_id, "plant/scale/+/weight")
    subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", port, "-q", "1", "-t", "plant/scale/S1/weight",
                    "-m", '{"kg": 12.5}'], check=True, timeout=30)
    [(scale, kg, received_at, created)] = wait_for(
        lambda: query(cx, "SELECT scale, weight_kg, received_at, create_date FROM plant_scale_reading"),
        message="the scale reading record")
    assert (scale, kg) == ("S1", 12.5)
    assert received_at.tzinfo is None and created.tzinfo is None, "Odoo Datetime columns hold naive UTC"
    # the history model's view gives Odoo a naive UTC timestamp; the table's own is aware
    [(vts, vpayload, vbroker)] = query(cx, "SELECT \"timestamp\", payload_text, broker_id FROM "
                                           "plant_mqtt_message_history WHERE topic = 'plant/scale/S1/weight'")
    [(ts,)] = query(cx, "SELECT \"timestamp\" FROM mqtt_message_history WHERE topic = 'plant/scale/S1/weight'")
    assert ts.tzinfo is not None and vts.tzinfo is None
    assert vts == ts.astimezone(datetime.timezone.utc).replace(tzinfo=None) == received_at
    assert (vpayload, vbroker) == ('{"kg": 12.5}', 1)

    # a message the handler cannot take is a dead letter, not a record; requeueing keeps it
    subprocess.run([MOSQUITTO_PUB, "-h", HOST, "-p", port, "-q", "1", "-t", "plant/scale/S2/weight",
                    "-m", "not json"], check=True, timeout=30)
    [(error,)] = wait_for(lambda: query(cx, "SELECT error FROM mqtt_dead_letter WHERE topic = 'plant/scale/S2/weight'"),
                          message="the dead letter")
    assert "json" in error.lower(), error
    assert request("odoo-status") == [(0,)]
    assert query(cx, "SELECT count(*) FROM mqtt_dead_letter") == [(1,)]
    assert query(cx, "SELECT count(*) FROM plant_scale_reading") == [(1,)]
    assert query(cx, "SELECT count(*) FROM mqtt_message_history WHERE topic = 'plant/scale/S2/weight'") == [(0,)]

    # what Odoo's uninstall would do to the extension's tables is refused, and changes nothing
    refusals = [(psycopg2.errors.InsufficientPrivilege, "must be owner of table mqtt_broker"),
                (psycopg2.errors.DependentObjectsStillExist, "extension mqtt_pg requires it")]
    for stmt, (error, match) in zip(statements(blocks["odoo-refused"]), refusals, strict=True):
        with pytest.raises(error, match=match):
            odoo_request(cx, lambda cr, _: cr.execute(stmt))
    assert query(cx, "SELECT name, host FROM mqtt_broker") == [("plant", "127.0.0.1")]

    assert request("odoo-uninstall") is None  # DROP FUNCTION
    assert query(cx, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'sale_order'::regclass "
                     "AND NOT tgisinternal") == [(0,)]
    assert query(cx, "SELECT subscribe FROM mqtt_topic WHERE name = 'plant/scale/{scale}/weight'") == [(False,)]


# ---- README: Publish table changes -----------------------------------------------------------

@pytest.fixture
def owner_conn(pg, odoo, mosq):
    """psql as the database's owner (not a superuser), the default broker 'local' started."""
    c = psycopg.connect(host=HOST, port=pg.port, dbname=odoo.name, user=odoo.role, autocommit=True)
    try:
        c.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('local', %s, %s, true)",
                  (HOST, mosq.port))
        client_id = c.execute("SELECT mqtt_start_listener('local')").fetchone()[0]
        wait_for(lambda: c.execute("SELECT mqtt_status('local')->>'status'").fetchone()[0] == "connected",
                 message="broker 'local' connected")
        c.client_id = client_id
        yield c
    finally:
        c.close()


def psql(conn, block: str) -> list:
    """Run a block statement by statement; the rows of each statement that returns some."""
    results = []
    for stmt in statements(block):
        cur = conn.execute(stmt)
        if cur.description:
            results.append(cur.fetchall())
    return results


def test_readme_publish_table_changes(owner_conn, mosq):
    c = owner_conn
    text = section(README, "Publish table changes")
    blocks = tagged(README, "sql", "watch-")
    assert list(blocks) == ["watch-orders", "watch-columns", "watch-trigger"]
    assert all(f"```sql {t}\n" in text for t in blocks)
    [documented] = re.findall(r"```json\n(.*?)```", text, flags=re.S)

    sub = mqtt_sub(mosq.port, "shop/#", qos=1)
    try:
        sub.subscribe("stock/#", qos=1)
        assert psql(c, blocks["watch-orders"]) == [[("mqtt_watch",)]]
        assert psql(c, blocks["watch-columns"]) == [[("mqtt_watch",)], [(True,)]]
        psql(c, blocks["watch-trigger"])
        c.execute("SELECT mqtt_publish('shop/marker', 'marker', 1)")
        wait_for(lambda: b"marker" in sub.payloads(), message="the marker")
        got = [(t, p) for t, p, *_ in list(sub.messages)]
    finally:
        sub.close()

    dec = lambda p: json.loads(p, parse_float=Decimal)  # noqa: E731
    assert [t for t, _ in got] == ["shop/orders/new/1", "shop/orders/paid/1", "shop/orders/new/2",
                                   "shop/orders/shipped/2", "stock/done/WH%2FOUT%2F00007", "shop/marker"]
    p = [dec(payload) for _, payload in got[:-1]]
    order1 = {"id": 1, "customer": "ACME", "status": "new", "total": Decimal("99.50")}
    assert p[0] == {"op": "insert", "schema": "public", "table": "orders", "new": order1, "old": None}
    assert p[1] == dec(documented)
    assert p[1] == {"op": "update", "schema": "public", "table": "orders",
                    "new": {**order1, "status": "paid"}, "old": order1}
    assert p[2] == {"op": "insert", "schema": "public", "table": "orders",
                    "new": {"id": 2, "status": "new"}, "old": None}
    assert p[3] == {"op": "update", "schema": "public", "table": "orders",
                    "new": {"id": 2, "status": "shipped"}, "old": {"id": 2, "status": "new"}}
    assert p[4] == {"op": "update", "schema": "public", "table": "Stock Move",
                    "new": {"Ref": "WH/OUT/00007", "qty": 5, "state": "done"},
                    "old": {"Ref": "WH/OUT/00007", "qty": 5, "state": "draft"}}
    # the rolled-back DELETE of order 1 did not happen; the watched DELETE of order 2 did
    assert c.execute("SELECT id FROM orders").fetchall() == [(1,)]
    assert c.execute("SELECT count(*) FROM \"Stock Move\"").fetchone()[0] == 0


# ---- README: Route incoming messages ---------------------------------------------------------

def test_readme_route_incoming_messages(owner_conn, mosq):
    c = owner_conn
    text = section(README, "Route incoming messages")
    sql = tagged(README, "sql", "route-")
    bash = tagged(README, "bash", "route-")
    assert list(sql) == ["route-readings", "route-machines", "route-alarms", "route-requeue"]
    assert list(bash) == ["route-readings", "route-machines", "route-alarms", "route-dead-letter"]
    assert all(f"```sql {t}\n" in text for t in sql) and all(f"```bash {t}\n" in text for t in bash)
    pubs = {t: mosquitto_lines(b, mosq.port) for t, b in bash.items()}

    def rows(q):
        return c.execute(q).fetchall()

    # into a table: three messages, four rows documented as the output of the SELECT below
    psql(c, sql["route-readings"])
    mosq.wait_subscribed(c.client_id, "plant/+/temperature")
    for argv in pubs["route-readings"]:
        run_pub(argv)
    wait_for(lambda: rows("SELECT count(*) FROM readings") == [(3,)], message="3 readings")
    [shown] = re.findall(r"```\n(SELECT line, sensor.*?)```", text, flags=re.S)
    select, _, _, *table = shown.strip().splitlines()
    assert [tuple(str(v) for v in r) for r in rows(select)] == \
        [tuple(cell.strip() for cell in line.split("|")) for line in table]
    assert rows("SELECT count(*) FROM readings WHERE received_at IS NULL") == [(0,)]

    # upsert: the second message updates the columns it carries
    psql(c, sql["route-machines"])
    mosq.wait_subscribed(c.client_id, "plant/machine/+/state")
    first, second = pubs["route-machines"]
    run_pub(first)
    wait_for(lambda: rows("SELECT state FROM machine_state") == [("running",)], message="m1 running")
    run_pub(second)
    wait_for(lambda: rows("SELECT state FROM machine_state") == [("stopped",)], message="m1 stopped")
    assert rows("SELECT machine, state, speed FROM machine_state") == [("m1", "stopped", 120)]
    assert "`m1 | stopped | 120`" in text

    # a handler and a notification (the block LISTENs on this connection)
    psql(c, sql["route-alarms"])
    mosq.wait_subscribed(c.client_id, "plant/+/alarm")
    [argv] = pubs["route-alarms"]
    run_pub(argv)
    notes = list(c.notifies(timeout=20, stop_after=1))
    assert [n.channel for n in notes] == ["plant_alarm"]
    [(history_id,)] = rows("SELECT id FROM mqtt_message_history WHERE topic = 'plant/line1/alarm'")
    assert json.loads(notes[0].payload) == {"id": history_id, "topic": "plant/line1/alarm"}
    assert rows("SELECT line, message FROM alarms") == [("line1", "door open")]

    # a dead letter, requeued once its cause is fixed
    [argv] = pubs["route-dead-letter"]
    run_pub(argv)
    [(error,)] = wait_for(lambda: rows("SELECT error FROM mqtt_dead_letter WHERE direction = 'receive' "
                                       "AND topic = 'plant/furnace/temperature'"), message="the dead letter")
    assert "readings_value_check" in error and "plant/{line}/temperature" in error, error
    assert rows("SELECT count(*) FROM mqtt_message_history WHERE topic = 'plant/furnace/temperature'") == [(0,)]
    listed, requeued = psql(c, sql["route-requeue"])
    assert listed == [("plant/furnace/temperature", error)]
    assert requeued == [(1,)]
    assert rows("SELECT line, sensor, value FROM readings WHERE sensor = 'f1'") == [("furnace", "f1", 480)]
    assert rows("SELECT count(*) FROM mqtt_message_history WHERE topic = 'plant/furnace/temperature'") == [(1,)]
    assert rows("SELECT count(*) FROM mqtt_dead_letter") == [(0,)]


def test_readme_reference_examples_run_as_the_owner(owner_conn, mosq):
    """The function reference's routed subscription and watched table, run as the database's
    owner (routing never runs as a superuser), do what their comments say."""
    c = owner_conn
    blocks = tagged(README, "sql", "ref-")
    assert list(blocks) == ["ref-route", "ref-watch"]
    [[(topic_id,)], unsubscribed] = psql(c, blocks["ref-route"])
    assert unsubscribed == [(True,)]
    assert c.execute("SELECT name, target_table::text, notify_channel, owner_role = current_user "
                     "FROM mqtt_topic WHERE id = %s", (topic_id,)).fetchone() == \
        ("plant/{line}/temperature", "line_readings", "line_readings", True)
    assert psql(c, blocks["ref-watch"]) == [[("mqtt_watch",)], [(True,)]]
    with mqtt_sub(mosq.port, "erp/#") as sub:
        c.execute("INSERT INTO sale_order (state, amount_total) VALUES ('draft', 10)")
        c.execute("UPDATE sale_order SET state = 'sale'")
        [(t, payload, qos, _)] = sub.wait_count(1)
    assert (t, qos, json.loads(payload)["new"]["state"]) == ("erp/paid/1", 1, "sale")
