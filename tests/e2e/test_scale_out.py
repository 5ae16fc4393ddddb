"""Scale-out (issue 11, point 5): two PostgreSQL clusters, each with mqtt_pg subscribed to the
same shared subscription `$share/GROUP/filter` on one mosquitto, split one stream between them.

Two clusters of their own (two initdb's, so two system identifiers and two generated client ids),
as two servers in production would be, and one mosquitto. An independent paho publisher sends
numbered QoS 1 messages ('n=000042'); every assertion counts the numbers stored in each server's
`mqtt_message_history` exactly.

What mosquitto 2.0.11 does (checked with paho clients, 3.1.1 and 5 alike; the README's "Scaling
out" has the table) decides the settings:

* It hands the messages of a group round robin to its members, one each in turn, whatever their
  speed.
* A member that goes away with a persistent session (clean_session false, or an MQTT 5 session
  expiry > 0) stays in the group: its turn comes round as before and its share queues in its
  offline session until it comes back (or is dropped when the session expires). So the others
  do NOT take the whole stream.
* Messages in flight to a member that goes away (sent, not acknowledged) stay with its session:
  a persistent session gets them when it comes back; a clean session loses them. mosquitto never
  hands them to another member of the group.

So with clean sessions the others take over a stopped server's share at once, and what was in
flight to it is lost; with persistent sessions nothing is lost and a stopped server's share
waits for it. Unsubscribing first, then stopping, loses nothing with either. Each test below
shows one of these, counted exactly.

Runs on MQTT 3.1.1; the '5' cases run once `mqtt_broker.protocol_version` exists.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conftest import TEST_DB, extension_cluster
from harness import Mosquitto, SeqPublisher, SeqReport, seq_of, unique, wait_for, wait_status

N = 4000  # messages split between the two servers
M = 2000  # messages published after one of them stopped

PROTOCOLS = ["3.1.1", "5"]


# --------------------------------------------------------------------------------------------
# fixtures: two clusters and one broker for the module


@pytest.fixture(scope="module")
def pg_a():
    with extension_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pg_b():
    with extension_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def smosq():
    """The broker both servers share (no inflight or queue limits, no persistence)."""
    m = Mosquitto().start()
    yield m
    m.destroy()


@pytest.fixture(autouse=True)
def _both_clusters_up(pg_a, pg_b):
    """Every test starts with both clusters running (a failed test may have left one stopped)."""
    for pg in (pg_a, pg_b):
        if not pg.running():
            pg.start()
        pg.wait_ready(TEST_DB)
    yield


def has_column(conn: psycopg.Connection, table: str, column: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                        "AND attname = %s AND NOT attisdropped)", (table, column)).fetchone()[0]


class Member:
    """One server of the group: its cluster, its broker row and its client id."""

    def __init__(self, label: str, pg, broker: str, client_id: str):
        self.label = label
        self.pg = pg
        self.broker = broker
        self.client_id = client_id

    def seqs(self, topic: str) -> list[int]:
        """The numbers of every message stored on `topic` (received), duplicates included."""
        with self.pg.connect(TEST_DB) as c:
            rows = c.execute("SELECT payload FROM mqtt_message_history WHERE topic = %s "
                             "AND direction = 'receive'", (topic,)).fetchall()
        return [seq_of(bytes(r[0])) for r in rows]

    def count(self, topic: str) -> int:
        with self.pg.connect(TEST_DB) as c:
            return c.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s "
                             "AND direction = 'receive'", (topic,)).fetchone()[0]


class Group:
    """Two servers subscribed to `$share/{group}/{prefix}/#`, messages published on `{prefix}/data`."""

    def __init__(self, a: Member, b: Member, shared_filter: str, topic: str, mosq: Mosquitto):
        self.a, self.b = a, b
        self.filter = shared_filter
        self.topic = topic
        self.mosq = mosq

    def seqs(self) -> tuple[list[int], list[int]]:
        return self.a.seqs(self.topic), self.b.seqs(self.topic)

    def wait_union(self, expected: range, timeout: float = 120) -> tuple[list[int], list[int]]:
        """Wait until every number in `expected` is stored on one server or the other; return
        both lists either way (the caller's assertions show what is missing)."""
        exp = set(expected)

        def done():
            if self.a.count(self.topic) + self.b.count(self.topic) < len(exp):
                return False
            a, b = self.seqs()
            return exp <= set(a) | set(b)

        try:
            wait_for(done, timeout=timeout, interval=0.2, message=f"{len(exp)} numbered messages over both servers")
        except AssertionError:
            pass
        return self.seqs()


def join_group(member_pg, label: str, mosq: Mosquitto, shared_filter: str, protocol: str,
               clean_session: bool) -> Member:
    """A broker row on `member_pg` for the shared mosquitto, the listener started, and the shared
    subscription in place (mosquitto's log shows it)."""
    name = unique(f"scale_{label}")
    with member_pg.connect(TEST_DB) as c:
        cols = {"name": name, "host": "127.0.0.1", "port": mosq.port, "clean_session": clean_session}
        if protocol != "3.1.1":
            if not has_column(c, "mqtt_broker", "protocol_version"):
                pytest.skip("mqtt_broker has no protocol_version column yet (MQTT 5 not merged)")
            cols["protocol_version"] = protocol
            if has_column(c, "mqtt_broker", "session_expiry"):
                # MQTT 5's form of the same choice: 0 ends the session with the connection
                cols["session_expiry"] = 0 if clean_session else 86400
        c.execute(sql.SQL("INSERT INTO mqtt_broker ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols))),
            list(cols.values()))
        c.execute("SELECT mqtt_subscribe(%s, 1, %s)", (shared_filter, name))
        client_id = c.execute("SELECT mqtt_start_listener(%s)", (name,)).fetchone()[0]
        wait_status(c, name, "connected")
    mosq.wait_subscribed(client_id, shared_filter, timeout=20)
    return Member(label, member_pg, name, client_id)


@pytest.fixture
def make_group(pg_a, pg_b, smosq):
    """make_group(protocol, clean_session=True) -> Group. Afterwards every listener it started
    is stopped (on whichever cluster is running)."""
    made: list[Member] = []

    def make(protocol: str, clean_session: bool = True) -> Group:
        prefix = f"scale/{uuid.uuid4().hex[:12]}"
        shared_filter = f"$share/{unique('grp')}/{prefix}/#"
        a = join_group(pg_a, "a", smosq, shared_filter, protocol, clean_session)
        made.append(a)
        b = join_group(pg_b, "b", smosq, shared_filter, protocol, clean_session)
        made.append(b)
        return Group(a, b, shared_filter, f"{prefix}/data", smosq)

    yield make
    for m in made:
        try:
            if not m.pg.running():
                m.pg.start()
            m.pg.wait_ready(TEST_DB)
            with m.pg.connect(TEST_DB) as c:
                c.execute("SELECT mqtt_stop_listener(%s)", (m.broker,))
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the test's own failure
            print(f"cleanup of {m.broker} failed: {e}")


@pytest.fixture
def publisher(smosq):
    pub = SeqPublisher(smosq.port).connect()
    yield pub
    pub.close()


# --------------------------------------------------------------------------------------------
# assertions


def publish_and_split(group: Group, pub: SeqPublisher, numbers: range) -> tuple[list[int], list[int]]:
    """Publish `numbers` (QoS 1) and assert: each is stored exactly once over the two servers
    (nothing missing, nothing twice on one server or on both) and both servers stored some."""
    pub.publish_seq(group.topic, numbers)
    pub.wait_all_acked(timeout=120)
    a, b = group.wait_union(range(1, numbers.stop))
    assert_exactly_once(a, b, range(1, numbers.stop))
    new_a = sum(1 for n in a if n in numbers)
    new_b = sum(1 for n in b if n in numbers)
    print(f"\n[split] {len(numbers)} messages: server a stored {new_a}, server b {new_b}")
    assert new_a > 0 and new_b > 0, f"one server got the whole stream: a {new_a}, b {new_b}"
    return a, b


def assert_exactly_once(a: list[int], b: list[int], expected: range) -> None:
    union = SeqReport(a + b, expected)
    assert union.complete and union.dup_count == 0, (
        f"union over both servers: {union}; server a: {SeqReport(a, expected)}; "
        f"server b: {SeqReport(b, expected)}; on both: {sorted(set(a) & set(b))[:10]}")


# --------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_subscription_splits_and_stop_listener_hands_over(make_group, publisher, protocol):
    """N numbered QoS 1 messages on the group's topic are stored exactly once over the two
    servers, each storing a share. Then server a's listener stops (mqtt_stop_listener): the next
    M messages are all stored by server b, exactly once, none by a, and the union over both is
    exactly 1..N+M."""
    g = make_group(protocol)
    publish_and_split(g, publisher, range(1, N + 1))
    a_before = g.a.count(g.topic)

    with g.a.pg.connect(TEST_DB) as c:
        assert c.execute("SELECT mqtt_stop_listener(%s)", (g.a.broker,)).fetchone()[0] is True
        wait_status(c, g.a.broker, "stopped")
    wait_for(lambda: g.mosq.disconnections_of(g.a.client_id) >= 1, timeout=20,
             message="mosquitto to see server a's listener leave")

    t0 = time.monotonic()
    publisher.publish_seq(g.topic, range(N + 1, N + M + 1))
    publisher.wait_all_acked(timeout=120)
    a, b = g.wait_union(range(1, N + M + 1))
    print(f"[stop listener] server b stored all {M} later messages in {time.monotonic() - t0:.1f} s")
    assert_exactly_once(a, b, range(1, N + M + 1))
    assert len(a) == a_before, "server a stored messages after its listener stopped"
    assert set(range(N + 1, N + M + 1)) <= set(b)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_stopped_immediately_hands_over_and_rejoins(make_group, publisher, protocol):
    """As above, but server a's whole PostgreSQL stops with `pg_ctl stop -m immediate` (no
    shutdown checkpoint, no clean MQTT DISCONNECT: the process is gone). Server b stores all M
    later messages exactly once. When server a starts again its listener (still `active`) joins
    the group again and gets a share of what follows; over the whole run every message is
    stored exactly once."""
    g = make_group(protocol)
    publish_and_split(g, publisher, range(1, N + 1))

    g.a.pg.stop("immediate")
    wait_for(lambda: g.mosq.disconnections_of(g.a.client_id) >= 1, timeout=20,
             message="mosquitto to see server a's connection close")

    publisher.publish_seq(g.topic, range(N + 1, N + M + 1))
    publisher.wait_all_acked(timeout=120)
    wait_for(lambda: set(range(N + 1, N + M + 1)) <= set(g.b.seqs(g.topic)), timeout=120, interval=0.2,
             message=f"server b to store all {M} messages published while server a is down")

    g.a.pg.start()
    g.a.pg.wait_ready(TEST_DB)
    wait_for(lambda: sum(1 for line in g.mosq.log_text().splitlines()
                         if line.endswith(f" {g.a.client_id} 1 {g.filter}")) >= 2,
             timeout=30, message="server a to subscribe again after its restart")
    k = 1000
    publisher.publish_seq(g.topic, range(N + M + 1, N + M + k + 1))
    publisher.wait_all_acked(timeout=120)
    a, b = g.wait_union(range(1, N + M + k + 1))
    assert_exactly_once(a, b, range(1, N + M + k + 1))
    assert not set(range(N + 1, N + M + 1)) & set(a), "server a stored messages published while it was down"
    rejoined = sum(1 for n in a if n > N + M)
    print(f"[immediate stop] server b took all {M}; after the restart server a stored {rejoined} of {k}")
    assert rejoined > 0, "server a did not get a share again after its restart"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_crash_with_messages_in_flight(make_group, publisher, protocol, clean_session):
    """The limit of a hand-over: server a crashes (immediate stop) while it holds messages it
    has received but not stored, so not acknowledged (its mqtt_message_history is locked by
    another session). mosquitto 2.0.11 never gives such a message to another member of the
    group:

    * clean session: the messages in flight to server a are dropped with its session. Server b
      stores every message published after the crash; nothing is stored twice; what is missing
      is exactly what had been sent to server a and not stored.
    * persistent session: server a's messages in flight, and its share of everything published
      while it is down, wait in its session at the broker; server b stores only its own share.
      When server a is back it stores them: every message exactly once over both servers (a
      message committed but not yet acknowledged at the crash would be stored twice, by server
      a; here none was committed)."""
    g = make_group(protocol, clean_session=clean_session)
    publish_and_split(g, publisher, range(1, 101))

    x = 400  # published while server a cannot store
    locker = g.a.pg.connect(TEST_DB, autocommit=False)
    try:
        locker.execute("LOCK TABLE mqtt_message_history IN ACCESS EXCLUSIVE MODE")
        publisher.publish_seq(g.topic, range(101, 101 + x))
        publisher.wait_all_acked(timeout=60)

        def a_blocked():
            with g.a.pg.connect(TEST_DB) as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                 "AND backend_type = 'mqtt_pg worker'").fetchone()[0] > 0

        wait_for(a_blocked, timeout=20, message="server a's worker to wait on the locked history table")
        # server b stores its share (mosquitto alternates: half of them); then what is not in
        # b's history is in flight to a
        wait_for(lambda: g.b.count(g.topic) >= 50 + x // 2 - 1, timeout=30,
                 message="server b to store its share of the in-flight batch")
        in_flight_to_a = set(range(101, 101 + x)) - set(g.b.seqs(g.topic))
        g.a.pg.stop("immediate")
    finally:
        try:
            locker.close()
        except psycopg.Error:
            pass
    wait_for(lambda: g.mosq.disconnections_of(g.a.client_id) >= 1, timeout=20,
             message="mosquitto to see server a's connection close")

    later = range(101 + x, 101 + x + M)
    publisher.publish_seq(g.topic, later)
    publisher.wait_all_acked(timeout=120)
    everything = range(1, later.stop)

    if clean_session:
        wait_for(lambda: set(later) <= set(g.b.seqs(g.topic)), timeout=120, interval=0.2,
                 message=f"server b to store all {M} messages published after the crash")
        g.a.pg.start()
        g.a.pg.wait_ready(TEST_DB)
        with g.a.pg.connect(TEST_DB) as c:
            wait_status(c, g.a.broker, "connected", timeout=30)
        a, b = g.seqs()
        lost = sorted(set(everything) - set(a) - set(b))
        print(f"\n[crash, clean session] {len(in_flight_to_a)} messages were in flight to server a; "
              f"lost: {len(lost)}; server b stored all {M} later ones")
        assert not SeqReport(a + b, everything).duplicates, "a message was stored twice"
        assert set(lost) <= in_flight_to_a, "a message that was not in flight to server a is missing"
    else:
        # server b gets only its turns: server a's share of the later messages waits for it
        wait_for(lambda: g.b.count(g.topic) >= 50 + (x + M) // 2 - 1, timeout=120, interval=0.2,
                 message="server b to store its share of the later messages")
        b_later = sum(1 for n in g.b.seqs(g.topic) if n in later)
        print(f"\n[crash, persistent session] {len(in_flight_to_a)} in flight to server a; while it was "
              f"down server b stored {b_later} of {M} (the rest queued for server a's session)")
        assert b_later < M, "server b took the whole stream although server a's session persisted"
        g.a.pg.start()
        a, b = g.wait_union(everything)
        union = SeqReport(a + b, everything)
        assert union.complete, f"union over both servers: {union}"
        assert not set(a) & set(b), f"stored by both servers: {sorted(set(a) & set(b))[:10]}"
        assert not SeqReport(b, everything).duplicates, "server b stored a message twice"
        assert in_flight_to_a <= set(a), "a message in flight to server a was not stored by it"
        print(f"[crash, persistent session] after the restart server a stored {len(a)}; "
              f"duplicates on a: {SeqReport(a, everything).dup_count}")


def unsubscribed(mosq: Mosquitto, client_id: str, topic_filter: str) -> bool:
    """mosquitto's log shows the client's UNSUBSCRIBE ('<time>: <client id> <filter>')."""
    return any(line.endswith(f": {client_id} {topic_filter}") for line in mosq.log_text().splitlines())


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "persistent"])
def test_leave_mid_stream_unsubscribe_first(make_group, publisher, protocol, clean_session):
    """The graceful way to take a server out of the group while messages flow, with either
    session setting: mqtt_unsubscribe the shared filter on it first (the broker stops giving it
    new messages; those already sent to it are still stored and acknowledged on the live
    connection), and stop its listener only then. Nothing is lost, nothing is stored twice, and
    everything published after the UNSUBSCRIBE is stored by server b."""
    g = make_group(protocol, clean_session=clean_session)
    first = range(1, 10_001)
    th = threading.Thread(target=publisher.publish_seq, args=(g.topic, first), daemon=True)
    th.start()
    wait_for(lambda: g.a.count(g.topic) >= 1000, timeout=60, interval=0.01,
             message="server a to be storing its share")
    with g.a.pg.connect(TEST_DB) as c:
        assert c.execute("SELECT mqtt_unsubscribe(%s, %s)", (g.filter, g.a.broker)).fetchone()[0] is True
    wait_for(lambda: unsubscribed(g.mosq, g.a.client_id, g.filter), timeout=20,
             message="mosquitto to log server a's UNSUBSCRIBE")
    th.join(120)
    assert not th.is_alive()
    publisher.wait_all_acked(timeout=120)
    # all of the first batch is stored (server a finishes what was sent to it) before it leaves
    a, b = g.wait_union(first)
    assert_exactly_once(a, b, first)
    with g.a.pg.connect(TEST_DB) as c:
        c.execute("SELECT mqtt_stop_listener(%s)", (g.a.broker,))
        wait_status(c, g.a.broker, "stopped")

    second = range(first.stop, first.stop + M)
    publisher.publish_seq(g.topic, second)
    publisher.wait_all_acked(timeout=120)
    everything = range(1, second.stop)
    a, b = g.wait_union(everything)
    assert_exactly_once(a, b, everything)
    assert set(second) <= set(b)
    print(f"\n[unsubscribe, then stop; {'clean' if clean_session else 'persistent'} session] server a stored "
          f"{len(a)} of the first {len(first)}, server b the rest and all {M} later ones")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stop_listener_mid_stream_clean_session_loses_nothing(make_group, publisher, protocol):
    """Stopping a clean-session member's listener while messages flow, without unsubscribing
    first: every message is still stored once over both servers. The stopping connection
    unsubscribes its shared filters and stores what the broker sent it up to the UNSUBACK
    before it disconnects (before that change, 2 to 94 messages sent to it and not yet read
    were lost here)."""
    g = make_group(protocol, clean_session=True)
    total = range(1, 20_001)
    th = threading.Thread(target=publisher.publish_seq, args=(g.topic, total), daemon=True)
    th.start()
    wait_for(lambda: g.a.count(g.topic) >= 3000, timeout=60, interval=0.01,
             message="server a to be storing its share")
    with g.a.pg.connect(TEST_DB) as c:
        c.execute("SELECT mqtt_stop_listener(%s)", (g.a.broker,))
    th.join(120)
    publisher.wait_all_acked(timeout=120)
    a, b = g.wait_union(total, timeout=30)
    print(f"\n[stop listener mid-stream, clean session] {SeqReport(a + b, total)}")
    assert_exactly_once(a, b, total)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_adopt_the_session_of_a_lost_server(make_group, publisher, smosq, protocol):
    """Persistent sessions, and server a is lost (immediate stop, not started again): its share
    of what follows queues in its session. Server b adopts that session with a second broker row
    carrying server a's client id and the same subscription: it stores what the session kept.
    Then it unsubscribes and stops that row (the README's way out of the group), and every
    message is stored exactly once over both servers."""
    g = make_group(protocol, clean_session=False)
    publish_and_split(g, publisher, range(1, 1001))
    g.a.pg.stop("immediate")
    wait_for(lambda: g.mosq.disconnections_of(g.a.client_id) >= 1, timeout=20,
             message="mosquitto to see server a's connection close")
    later = range(1001, 1001 + M)
    publisher.publish_seq(g.topic, later)
    publisher.wait_all_acked(timeout=120)
    wait_for(lambda: g.b.count(g.topic) >= 500 + M // 2, timeout=60, interval=0.2,
             message="server b to store its own share")

    adopter = unique("adopt")
    with g.b.pg.connect(TEST_DB) as c:
        cols = {"name": adopter, "host": "127.0.0.1", "port": smosq.port, "clean_session": False,
                "client_id": g.a.client_id}
        if protocol != "3.1.1":
            cols["protocol_version"] = protocol
            if has_column(c, "mqtt_broker", "session_expiry"):
                cols["session_expiry"] = 86400
        c.execute(sql.SQL("INSERT INTO mqtt_broker ({}) VALUES ({})").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(", ").join(sql.Placeholder() * len(cols))),
            list(cols.values()))
        c.execute("SELECT mqtt_subscribe(%s, 1, %s)", (g.filter, adopter))
        c.execute("SELECT mqtt_start_listener(%s)", (adopter,))
        try:
            everything = range(1, later.stop)
            a_rows = 500  # server a's share of the first 1000, in its own (stopped) cluster
            a, b = [], []

            def all_there():
                nonlocal b
                b = g.b.seqs(g.topic)
                return len(set(b)) >= len(everything) - a_rows

            wait_for(all_there, timeout=60, interval=0.2, message="server b to store the adopted session's messages")
            c.execute("SELECT mqtt_unsubscribe(%s, %s)", (g.filter, adopter))
            wait_for(lambda: unsubscribed(g.mosq, g.a.client_id, g.filter), timeout=20,
                     message="mosquitto to log the adopter's UNSUBSCRIBE")
        finally:
            c.execute("SELECT mqtt_stop_listener(%s)", (adopter,))
    g.a.pg.start()
    g.a.pg.wait_ready(TEST_DB)
    a, b = g.seqs()
    assert_exactly_once(a, b, everything)
    print(f"\n[adopted session] server b stored {len(b)} (its share and the lost server's), server a {len(a)}")


# --------------------------------------------------------------------------------------------
# the README's "Scaling out" examples, as written there


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(tag: str) -> str:
    [block] = re.findall(rf"```sql {tag}\n(.*?)```", README.read_text(), flags=re.S)
    return block


def test_readme_scaling_out_examples(pg_a, pg_b, smosq, publisher):
    """The README's statements, on two servers: `scale-join` on each makes one group (the split
    is exact), `scale-fdw` on server a shows the whole stream once, `scale-leave` takes server a
    out and server b then stores everything."""
    prefix = f"scale/{uuid.uuid4().hex[:12]}"
    shared_filter = f"$share/{unique('grp')}/{prefix}/#"
    topic = f"{prefix}/data"
    names = {pg_a: unique("readme_a"), pg_b: unique("readme_b")}

    def adapt(block: str, pg) -> str:
        return (block.replace("$share/odoo-ingest/plant/#", shared_filter)
                .replace("'plant'", f"'{names[pg]}'")
                .replace("mqtt.example.com", "127.0.0.1").replace("1883", str(smosq.port))
                .replace("pg-b.example.com", "127.0.0.1").replace("'5432'", f"'{pg_b.port}'")
                .replace("dbname 'odoo'", f"dbname '{TEST_DB}'")
                .replace("user 'report', password 'secret'", "user 'postgres'")
                .replace("'plant/%'", f"'{prefix}/%'"))

    members = []
    try:
        for label, pg in (("a", pg_a), ("b", pg_b)):
            with pg.connect(TEST_DB) as c:
                c.execute(adapt(readme_block("scale-join"), pg))
                cid = c.execute("SELECT mqtt_status(%s)->>'client_id'", (names[pg],)).fetchone()[0]
                wait_status(c, names[pg], "connected")
            smosq.wait_subscribed(cid, shared_filter, timeout=20)
            members.append(Member(label, pg, names[pg], cid))
        g = Group(members[0], members[1], shared_filter, topic, smosq)
        publish_and_split(g, publisher, range(1, 1001))

        with pg_a.connect(TEST_DB) as c:
            c.execute(adapt(readme_block("scale-fdw"), pg_a))
            seqs = [seq_of(bytes(r[0])) for r in c.execute("SELECT payload FROM plant_messages").fetchall()]
            servers = dict(c.execute("SELECT server, count(*) FROM plant_messages GROUP BY 1").fetchall())
            c.execute("DROP VIEW plant_messages; DROP SCHEMA ingest_b CASCADE; DROP SERVER ingest_b CASCADE")
        assert sorted(seqs) == list(range(1, 1001)), f"the view over both servers: {SeqReport(seqs, range(1, 1001))}"
        assert servers.get("a", 0) > 0 and servers.get("b", 0) > 0, f"rows per server in the view: {servers}"

        with pg_a.connect(TEST_DB) as c:
            c.execute(adapt(readme_block("scale-leave"), pg_a))
            wait_status(c, names[pg_a], "stopped")
        wait_for(lambda: unsubscribed(smosq, g.a.client_id, shared_filter), timeout=20,
                 message="mosquitto to log server a's UNSUBSCRIBE")
        publisher.publish_seq(topic, range(1001, 2001))
        publisher.wait_all_acked(timeout=60)
        a, b = g.wait_union(range(1, 2001))
        assert_exactly_once(a, b, range(1, 2001))
        assert set(range(1001, 2001)) <= set(b)
    finally:
        for pg, name in names.items():
            with pg.connect(TEST_DB) as c:
                c.execute("UPDATE mqtt_broker SET active = false WHERE name = %s", (name,))
