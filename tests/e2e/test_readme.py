"""README.md stays true: every ```sql example in it runs, in order, against a real cluster and
broker, and the quick start does what the README says it does."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from harness import HOST, unique, wait_for, wait_status

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def readme_db(pg, mosq):
    """A database of its own with the extension and the demo's default broker 'local'."""
    name = unique("readme")
    with pg.connect() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    c = pg.connect(name)
    try:
        c.execute("CREATE EXTENSION mqtt_pg")
        c.execute("INSERT INTO mqtt_broker (name, host, port, is_default) VALUES ('local', %s, %s, true)",
                  (HOST, mosq.port))
        c.execute("SELECT mqtt_start_listener('local')")
        wait_status(c, "local", "connected")
        yield c
    finally:
        c.execute("UPDATE mqtt_broker SET active = false")
        c.close()
        with pg.connect() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_readme_has_examples():
    assert len(blocks("sql")) >= 8
    assert any("mosquitto_pub" in b for b in blocks("bash"))


def test_every_sql_example_runs(readme_db, mosq):
    c = readme_db
    for block in blocks("sql"):
        if block.strip() == "CREATE EXTENSION mqtt_pg;":
            continue  # done by the fixture: the install section's step
        # The README talks about the standard port; the test broker listens elsewhere.
        c.execute(block.replace("1883", str(mosq.port)))

    # The reference stops 'local' in an example; messages queued for it wait for a start.
    c.execute("SELECT mqtt_start_listener('local')")
    # The quick start's effects: the committed command went out and left the outbox, the
    # rolled-back one never existed; the subscription is in place.
    wait_for(lambda: c.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == 0,
             message="the outbox to drain")
    sent = c.execute("SELECT payload_text FROM mqtt_message_history_text "
                     "WHERE direction = 'send' AND topic = 'plant/line1/cmd'").fetchall()
    assert ('{"start": true}',) in sent
    assert c.execute("SELECT count(*) FROM mqtt_message_history_text "
                     "WHERE payload_text = 'never'").fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM mqtt_dead_letter").fetchone()[0] == 0

    # The quick start's mosquitto_pub line ingests a row (the later examples unsubscribed
    # 'plant/+/temperature' on the default broker, not on 'plant').
    [cmd] = [line for b in blocks("bash") for line in b.splitlines() if line.startswith("mosquitto_pub")]
    argv = shlex.split(cmd.split("#")[0].replace("PORT", str(mosq.port)))

    def published_and_stored():
        # Repeat until the subscription made at the quick start's commit is live.
        subprocess.run(argv + ["-h", HOST, "-q", "1"], check=True, timeout=30)
        return wait_for(lambda: c.execute(
            "SELECT topic, payload_text FROM mqtt_message_history_text "
            "WHERE direction = 'receive' AND topic = 'plant/line1/temperature'").fetchone(),
            timeout=0.5, message="the README's mosquitto_pub message in history")

    row = wait_for(published_and_stored, interval=0, message="the README's mosquitto_pub message")
    assert row == ("plant/line1/temperature", "21.5")
