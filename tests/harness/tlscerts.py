"""Test certificates made with the openssl command: a CA, server and client certificates signed by it (PEM)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"
# P-256 keys in PKCS#8 ("BEGIN PRIVATE KEY"), which every client here reads: Python's ssl, Granian
# (rustls), and ZooKeeper's Java PEM loader (which takes PKCS#8 only).
KEY_ARGS = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def have_openssl() -> bool:
    """True when the openssl command is on PATH."""
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path

    def combined(self) -> Path:
        """One file with the key and then the certificate (ZooKeeper's PEM key store, kazoo's certfile)."""
        out = self.cert.with_suffix(".key+cert.pem")
        out.write_bytes(self.key.read_bytes() + self.cert.read_bytes())
        return out


class CertAuthority:
    """A self-signed CA in `directory` that signs server and client certificates."""

    def __init__(self, directory: Path, name: str = "fleetmate test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        slug = name.replace(" ", "-")
        self.cert = self.dir / f"{slug}.pem"
        self.key = self.dir / f"{slug}.key"
        _openssl(
            "req", "-x509", *KEY_ARGS, "-keyout", str(self.key), "-out", str(self.cert), "-days", DAYS,
            "-subj", f"/O=fleetmate tests/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=self.dir,
        )  # fmt: skip

    def issue(self, name: str, *, server: bool, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Pair:
        """A certificate for name: a server's (serverAuth, hosts as subject alternative names) or a client's."""
        key, csr, cert, ext = (self.dir / f"{name}{suffix}" for suffix in (".key", ".csr", ".pem", ".ext"))
        _openssl("req", *KEY_ARGS, "-keyout", str(key), "-out", str(csr), "-subj", f"/O=fleetmate tests/CN={name}",
                 cwd=self.dir)  # fmt: skip
        sans = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}",
            f"subjectAltName={sans}",
        ]
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key), "-CAcreateserial",
            "-out", str(cert), "-days", DAYS, "-extfile", str(ext),
            cwd=self.dir,
        )  # fmt: skip
        return Pair(cert, key)
