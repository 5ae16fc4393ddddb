"""The ingest path fed random topics and bytes from a raw socket: a fake broker on 127.0.0.1
sends the worker thousands of PUBLISH packets with arbitrary topics and payloads, then garbage.
The worker never crashes, stores every message with a valid topic name byte for byte, sets each
invalid one aside in mqtt_dead_letter, and reconnects after the garbage."""

from __future__ import annotations

import random
import socket
import threading

from harness import HOST, wait_for

SEED = 20261201
ALPHABET = ["a", "b", "/", "+", "#", "\0", "é", "😀", "$", " ", ""]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int, pkid: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + (pkid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + varint(len(body)) + body


def read_packet(s: socket.socket) -> tuple[int, bytes]:
    first = s.recv(1)
    if not first:
        raise EOFError
    n, shift = 0, 0
    while True:
        b = s.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        if not chunk:
            raise EOFError
        body += chunk
    return first[0], body


def valid_topic(t: str) -> bool:
    return t != "" and not any(c in t for c in "+#\0") and len(t.encode()) <= 65535


class FakeBroker:
    """Answers CONNECT and SUBSCRIBE like a broker, then plays `rounds` (one per connection):
    a list of messages, and whether to end with garbage."""

    def __init__(self, rounds):
        self.srv = socket.socket()
        self.srv.bind((HOST, 0))
        self.srv.listen(4)
        self.port = self.srv.getsockname()[1]
        self.rounds = list(rounds)
        self.served = 0
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while self.rounds:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            messages, garbage = self.rounds.pop(0)
            try:
                kind, _ = read_packet(conn)
                assert kind >> 4 == 1, "CONNECT first"
                conn.sendall(b"\x20\x02\x00\x00")
                kind, body = read_packet(conn)
                while kind >> 4 != 8:  # wait for SUBSCRIBE
                    kind, body = read_packet(conn)
                conn.sendall(b"\x90\x03" + body[:2] + b"\x01")
                # Drain acknowledgements so the worker never blocks on a full socket.
                threading.Thread(target=self.drain, args=(conn,), daemon=True).start()
                out = bytearray()
                for i, (topic, payload, qos) in enumerate(messages):
                    out += publish(topic.encode(), payload, qos, (i % 65000) + 1)
                if garbage:
                    out += bytes(random.Random(SEED).randrange(256) for _ in range(64))
                conn.sendall(bytes(out))
                self.served += 1
                if garbage:
                    # End the stream (garbage that announces a long packet would otherwise
                    # keep the worker waiting for the rest until the keep-alive runs out). Only
                    # the sending side: closing with the worker's acknowledgements unread would
                    # answer with a RST, which makes the kernel throw away whatever the worker
                    # had not read yet. The drain closes once the worker has hung up.
                    conn.shutdown(socket.SHUT_WR)
            except (OSError, EOFError):
                pass

    @staticmethod
    def drain(conn):
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        conn.close()

    def close(self):
        self.srv.close()


def make_round(rng: random.Random, n: int):
    messages = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            topic = "a" * 65535
        elif r < 0.04:
            topic = ""
        else:
            topic = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 12)))
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        messages.append((topic, payload, rng.choice((0, 1))))
    return messages


def test_random_topics_and_bytes_from_a_raw_socket(pg, conn, make_broker):
    rng = random.Random(SEED)
    rounds = [(make_round(rng, 700), True), (make_round(rng, 700), True), (make_round(rng, 700), False)]
    sent = [m for msgs, _ in rounds for m in msgs]
    fake = FakeBroker(rounds)
    try:
        b = make_broker(port=fake.port, start=False, reconnect_min_ms=100, reconnect_max_ms=500, keepalive=5)
        conn.execute("INSERT INTO mqtt_topic (broker_id, name, subscribe) VALUES (%s, '#', true)", (b.id,))
        [pid] = pg.worker_pids("mqtt_e2e")
        conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))

        def counts():
            h = conn.execute("SELECT count(*) FROM mqtt_message_history WHERE broker_id = %s", (b.id,)).fetchone()[0]
            d = conn.execute("SELECT count(*) FROM mqtt_dead_letter WHERE broker_id = %s", (b.id,)).fetchone()[0]
            return h, d
        def all_arrived():
            c = counts()
            if sum(c) < len(sent):  # raised, so that a timeout reports how far it got
                raise AssertionError(f"(history, dead letters) = {c}, connections served {fake.served}")
            return True
        wait_for(all_arrived, timeout=60, message=f"{len(sent)} messages stored or set aside")
        assert fake.served == 3, "the worker reconnected after each garbage tail"
        assert pg.worker_pids("mqtt_e2e") == [pid], "the worker did not crash"
        stored = conn.execute("SELECT topic, payload FROM mqtt_message_history WHERE broker_id = %s ORDER BY id",
                              (b.id,)).fetchall()
        assert [(t, bytes(p)) for t, p in stored] == [(t, p) for t, p, _ in sent if valid_topic(t)]
        dead = conn.execute("SELECT payload, error FROM mqtt_dead_letter WHERE broker_id = %s ORDER BY id",
                            (b.id,)).fetchall()
        assert [bytes(p) for p, _ in dead] == [p for t, p, _ in sent if not valid_topic(t)]
        assert all("invalid topic name" in e for _, e in dead)
        conn.execute("SELECT mqtt_stop_listener(%s)", (b.name,))
    finally:
        fake.close()


def test_a_1_gb_payload_is_refused_and_queues_nothing(conn, broker):
    import psycopg
    import pytest
    depth = conn.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0]
    for payload in ("repeat('x', 1000000000)", "convert_to(repeat('x', 1000000000), 'UTF8')"):
        with pytest.raises(psycopg.errors.ProgramLimitExceeded) as e:
            conn.execute(f"SELECT mqtt_publish('big/one', {payload}, 1, false, %s)", (broker.name,))
        assert "mqtt_pg.max_payload_size" in str(e.value)
    assert conn.execute("SELECT count(*) FROM mqtt_outbox").fetchone()[0] == depth
