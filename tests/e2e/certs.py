"""Test certificates made with openssl: a CA, a server certificate for localhost/127.0.0.1
(X.509 v3 with SAN, as rustls requires), one for a DNS name only, client certificates, and an
unrelated CA. Written once per test session into a temporary directory."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Certs:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def text(self, name: str) -> str:
        return (self.dir / name).read_text()


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str | None, client: bool = False,
          keytype: tuple[str, ...] = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")) -> None:
    _openssl("req", *keytype, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=d)
    ext = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
    if san:
        ext.append(f"subjectAltName={san}")
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-extfile", f"{name}.ext", cwd=d)


def _expired(d: Path, name: str, san: str) -> None:
    """A server certificate that expired in 2020: openssl 3.0's `x509 -req` cannot set past
    dates, `openssl ca` can (it wants a small CA directory)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    db = d / "ca-db"
    (db / "new").mkdir(parents=True)
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    (d / "ca-db.cnf").write_text(
        f"[ca]\ndefault_ca = test\n[test]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}/new\n"
        f"serial = {db}/serial\ncertificate = {d}/ca.pem\nprivate_key = {d}/ca.key\ndefault_md = sha256\n"
        f"policy = any\nunique_subject = no\n[any]\ncommonName = supplied\n"
        f"[ext]\nbasicConstraints = CA:FALSE\nextendedKeyUsage = serverAuth\nsubjectAltName = {san}\n")
    _openssl("ca", "-batch", "-notext", "-config", "ca-db.cnf", "-extensions", "ext", "-in", f"{name}.csr",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-out", f"{name}.pem", cwd=d)


def make_certs() -> Certs:
    d = Path(tempfile.mkdtemp(prefix="mqtt_pg_e2e_certs_"))
    _ca(d, "ca")
    _ca(d, "otherca")
    _leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _leaf(d, "named", "ca", "DNS:broker.test")
    _leaf(d, "client", "ca", None, client=True)
    _leaf(d, "client_rsa", "ca", None, client=True, keytype=("-newkey", "rsa:2048"))
    _leaf(d, "client_ed25519", "ca", None, client=True, keytype=("-newkey", "ed25519"))
    _expired(d, "expired", "DNS:localhost,IP:127.0.0.1")
    # The ECDSA key (PKCS#8) in SEC1 form ("BEGIN EC PRIVATE KEY").
    _openssl("ec", "-in", "client.key", "-out", "client_sec1.key", cwd=d)
    # The same RSA key in PKCS#1 form ("BEGIN RSA PRIVATE KEY").
    _openssl("pkey", "-in", "client_rsa.key", "-traditional", "-out", "client_rsa_pkcs1.key", cwd=d)
    return Certs(d)


def tls_listener_conf(port: int, certs: Certs, server: str = "server", require_certificate: bool = False) -> str:
    """mosquitto lines for one more listener, with TLS (options follow their listener line)."""
    lines = [f"listener {port} 127.0.0.1", f"cafile {certs.path('ca.pem')}",
             f"certfile {certs.path(server + '.pem')}", f"keyfile {certs.path(server + '.key')}"]
    if require_certificate:
        lines.append("require_certificate true")
    return "\n".join(lines)
