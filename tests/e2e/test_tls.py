"""TLS and mutual TLS between the worker and a real mosquitto, with certificates made by openssl
in this session: delivery both ways with exact counts, and each failure named in the status."""

from __future__ import annotations

import psycopg
import pytest

from certs import make_certs, tls_listener_conf
from harness import HOST, free_port, mosquitto_pub, mqtt_sub, seq_of, seq_payload, unique, wait_for, wait_status


@pytest.fixture(scope="module")
def certs():
    return make_certs()


@pytest.fixture(scope="module")
def tls_mosq(certs):
    """One mosquitto: the plain listener (for independent test clients), a TLS listener, a TLS
    listener that demands a client certificate, and one whose certificate names only
    broker.test."""
    from harness import Mosquitto

    ports = {"tls": free_port(), "mtls": free_port(), "named": free_port(), "expired": free_port()}
    conf = "\n".join([
        tls_listener_conf(ports["tls"], certs),
        tls_listener_conf(ports["mtls"], certs, require_certificate=True),
        tls_listener_conf(ports["named"], certs, server="named"),
        tls_listener_conf(ports["expired"], certs, server="expired"),
    ])
    m = Mosquitto(extra_conf=conf).start()
    m.tls_ports = ports
    yield m
    m.destroy()


def tls_broker(make_broker, certs, port, start=True, **cols):
    cols.setdefault("ca_cert", certs.text("ca.pem"))
    return make_broker(port=port, start=start, use_tls=True, **cols)


def wait_error(conn, name, *needles, timeout=20):
    """Wait until the broker's last_error contains every needle; return the status."""
    def check():
        s = conn.execute("SELECT mqtt_status(%s)", (name,)).fetchone()[0]
        err = s.get("last_error") or ""
        return s if all(n.lower() in err.lower() for n in needles) else False
    return wait_for(check, timeout=timeout, message=f"last_error of {name} containing {needles}")


def test_delivery_both_ways_over_tls(conn, tls_mosq, certs, make_broker, topic):
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["tls"], host="localhost")
    n = 1000
    # Out: the worker publishes over TLS; a plain-port subscriber on the same broker counts.
    with mqtt_sub(tls_mosq.port, f"{topic}/out", qos=1) as sub:
        conn.execute("SELECT count(mqtt_publish(%s, 'seq=' || i, 1, false, %s)) FROM generate_series(1, %s) i",
                     (f"{topic}/out", b.name, n))
        got = sub.wait_count(n, timeout=60)
    assert sorted(int(p[1].decode().split("=")[1]) for p in got) == list(range(1, n + 1))
    wait_for(lambda: conn.execute("SELECT count(*) FROM mqtt_outbox WHERE broker_id = %s", (b.id,)).fetchone()[0] == 0,
             message="outbox drained")
    assert conn.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s AND direction = 'send'",
                        (f"{topic}/out",)).fetchone()[0] == n
    # In: a plain-port publisher; the worker receives over TLS.
    conn.execute("SELECT mqtt_subscribe(%s, 1, %s)", (f"{topic}/in/#", b.name))
    tls_mosq.wait_subscribed(b.client_id, f"{topic}/in/#")
    mosquitto_pub(tls_mosq.port, f"{topic}/in/x", lines="".join(seq_payload(i) + "\n" for i in range(n)), qos=1)
    wait_for(lambda: conn.execute("SELECT count(*) FROM mqtt_message_history WHERE topic = %s",
                                  (f"{topic}/in/x",)).fetchone()[0] >= n, timeout=60, message="all stored")
    seqs = [seq_of(r[0]) for r in conn.execute("SELECT payload FROM mqtt_message_history WHERE topic = %s",
                                               (f"{topic}/in/x",)).fetchall()]
    assert sorted(set(seqs)) == list(range(n))
    s = conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0]
    assert s["status"] == "connected" and s["reconnects"] == 0, s


@pytest.mark.parametrize("key_file", ["client.key", "client_sec1.key", "client_rsa.key",
                                     "client_rsa_pkcs1.key", "client_ed25519.key"])
def test_mutual_tls(pg, conn, tls_mosq, certs, make_broker, topic, key_file):
    cert_file = {"client.key": "client.pem", "client_sec1.key": "client.pem",
                 "client_ed25519.key": "client_ed25519.pem"}.get(key_file, "client_rsa.pem")
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["mtls"], host="127.0.0.1",
                   client_cert=certs.text(cert_file), client_key=certs.text(key_file))
    with mqtt_sub(tls_mosq.port, f"{topic}/m", qos=1) as sub:
        conn.execute("SELECT mqtt_publish(%s, 'over mtls', 1, false, %s)", (f"{topic}/m", b.name))
        assert sub.wait_count(1)[0][1] == b"over mtls"
    row = conn.execute("SELECT client_key, has_client_key FROM mqtt_broker WHERE id = %s", (b.id,)).fetchone()
    assert row == (None, True)
    # The key is in no column, status or log line.
    seen = " ".join(str(v) for v in conn.execute("SELECT * FROM mqtt_broker WHERE id = %s", (b.id,)).fetchone())
    seen += str(conn.execute("SELECT mqtt_status(%s)", (b.name,)).fetchone()[0]) + pg.log_text()
    for line in certs.text(key_file).splitlines()[1:-1]:
        assert line not in seen


def test_broker_demands_a_client_certificate(conn, tls_mosq, certs, make_broker):
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["mtls"], start=False)
    conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
    s = wait_error(conn, b.name, "client_cert")
    assert s["status"] != "connected"


def test_unknown_ca(conn, tls_mosq, certs, make_broker):
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["tls"], start=False, host="localhost",
                   ca_cert=certs.text("otherca.pem"))
    conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
    wait_error(conn, b.name, "ca_cert")


def test_expired_certificate(conn, tls_mosq, certs, make_broker):
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["expired"], start=False, host="localhost")
    conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
    wait_error(conn, b.name, "expired")


def test_system_roots_do_not_trust_a_private_ca(conn, tls_mosq, certs, make_broker):
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["tls"], start=False, host="localhost", ca_cert=None)
    conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
    wait_error(conn, b.name, "system")


def test_host_name_mismatch_and_tls_server_name(conn, tls_mosq, certs, make_broker, topic):
    # The certificate names only broker.test; reached by IP it does not match...
    b = tls_broker(make_broker, certs, tls_mosq.tls_ports["named"], start=False, host="127.0.0.1")
    conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
    wait_error(conn, b.name, "tls_server_name")
    # ...until tls_server_name says which name to check.
    conn.execute("UPDATE mqtt_broker SET tls_server_name = 'broker.test' WHERE id = %s", (b.id,))
    wait_status(conn, b.name, "connected")
    with mqtt_sub(tls_mosq.port, f"{topic}/n", qos=1) as sub:
        conn.execute("SELECT mqtt_publish(%s, 'named', 1, false, %s)", (f"{topic}/n", b.name))
        assert sub.wait_count(1)[0][1] == b"named"


def test_a_failing_tls_handshake_backs_off(conn, certs, make_broker):
    """A TLS failure is a failure like any other: reconnects back off, no hot loop. The
    "broker" is a socket that counts connection attempts and answers with plain text."""
    import socket
    import threading
    import time
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(16)
    attempts = []

    def serve():
        while True:
            try:
                s, _ = srv.accept()
            except OSError:
                return
            attempts.append(time.monotonic())
            s.sendall(b"HTTP/1.0 400 not mqtt\r\n\r\n")
            s.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        b = tls_broker(make_broker, certs, srv.getsockname()[1], start=False, host="localhost",
                       reconnect_min_ms=500, reconnect_max_ms=2000)
        conn.execute("SELECT mqtt_start_listener(%s)", (b.name,))
        wait_error(conn, b.name, "tls")
        t0 = time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= 4, timeout=6, message="4 s pass")
        recent = [t for t in attempts if t >= t0]
        # 500 ms doubling to 2 s (with jitter) allows about 3-4 attempts in 4 s, never dozens.
        assert 1 <= len(recent) <= 8, f"{len(recent)} attempts in 4 s"
        conn.execute("SELECT mqtt_stop_listener(%s)", (b.name,))
    finally:
        srv.close()


@pytest.mark.parametrize("column,value,needle", [
    ("ca_cert", "not a certificate", "mqtt_broker.ca_cert"),
    ("ca_cert", "-----BEGIN CERTIFICATE-----\nMIIB", "mqtt_broker.ca_cert"),
    ("client_cert", "@key", "mqtt_broker.client_cert"),
    ("client_key", "@cert", "mqtt_broker.client_key"),
    ("client_key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "mqtt_broker.client_key"),
    ("client_key", "@otherkey", "does not belong"),
])
def test_bad_pem_is_refused_naming_the_column(conn, certs, column, value, needle):
    value = {"@key": certs.text("client.key"), "@cert": certs.text("client.pem"),
             "@otherkey": certs.text("client_rsa.key")}.get(value, value)
    name = unique("pem")
    conn.execute("INSERT INTO mqtt_broker (name, host) VALUES (%s, 'localhost')", (name,))
    before = conn.execute("SELECT ca_cert, client_cert, has_client_key FROM mqtt_broker WHERE name = %s", (name,)).fetchone()
    other = {"client_cert": ", client_key = %s", "client_key": ", client_cert = %s"}.get(column, "")
    other_val = {"client_cert": [certs.text("client.key")], "client_key": [certs.text("client.pem")]}.get(column, [])
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        conn.execute(f"UPDATE mqtt_broker SET {column} = %s{other} WHERE name = %s", [value, *other_val, name])
    msg = str(e.value)
    assert needle in msg
    # The error never echoes key material.
    for secret_line in certs.text("client.key").splitlines()[1:-1]:
        assert secret_line not in msg
    after = conn.execute("SELECT ca_cert, client_cert, has_client_key FROM mqtt_broker WHERE name = %s", (name,)).fetchone()
    assert after == before
    conn.execute("DELETE FROM mqtt_broker WHERE name = %s", (name,))


def test_client_cert_and_key_go_together(conn, certs):
    name = unique("pair")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="together"):
        conn.execute("INSERT INTO mqtt_broker (name, host, client_cert) VALUES (%s, 'h', %s)", (name, certs.text("client.pem")))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="together"):
        conn.execute("INSERT INTO mqtt_broker (name, host, client_key) VALUES (%s, 'h', %s)", (name, certs.text("client.key")))
    conn.execute("INSERT INTO mqtt_broker (name, host, client_cert, client_key) VALUES (%s, 'h', %s, %s)",
                 (name, certs.text("client.pem"), certs.text("client.key")))
    # Clearing one alone is refused too; clearing both is fine.
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="together"):
        conn.execute("UPDATE mqtt_broker SET client_key = NULL WHERE name = %s", (name,))
    conn.execute("UPDATE mqtt_broker SET client_key = NULL, client_cert = NULL WHERE name = %s", (name,))
    assert conn.execute("SELECT has_client_key FROM mqtt_broker WHERE name = %s", (name,)).fetchone()[0] is False
    conn.execute("DELETE FROM mqtt_broker WHERE name = %s", (name,))
