"""TLS contexts from PEM files for fleetmate's listeners and its CLI, each failure naming the key or flag at fault."""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 and 1.3: ZooKeeper's Java client, curl, httpx and kazoo all speak both; nothing older.
MIN_VERSION = ssl.TLSVersion.TLSv1_2
_BEGIN_CERT = b"-----BEGIN CERTIFICATE-----"


class TlsFileError(Exception):
    """A certificate, key or CA file that cannot be used; `key` is the configuration key (or flag) that named it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise TlsFileError(key, f"file not found: {path}") from None
    except IsADirectoryError:
        raise TlsFileError(key, f"{path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise TlsFileError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def _check_certs(key: str, path: str, what: str) -> str:
    """The path, once it holds at least one PEM certificate that OpenSSL can parse."""
    if _BEGIN_CERT not in _read(key, path):
        raise TlsFileError(key, f"{path} is not a PEM {what} (no '-----BEGIN CERTIFICATE-----' block)")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=str(Path(path).expanduser()))
    except ssl.SSLError as exc:
        raise TlsFileError(key, f"{path} holds no usable PEM certificate: {exc.reason or exc}") from None
    return str(Path(path).expanduser())


def _check_key(key: str, path: str) -> str:
    text = _read(key, path)
    if b"PRIVATE KEY-----" not in text:
        raise TlsFileError(key, f"{path} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' block)")
    if b"ENCRYPTED" in text:
        # OpenSSL would ask for the passphrase on the terminal, or fail without one.
        raise TlsFileError(key, f"{path} is encrypted; give an unencrypted key and protect it with file permissions")
    return str(Path(path).expanduser())


def _no_password() -> bytes:
    return b""


def _load_pair(ctx: ssl.SSLContext, cert: str, key: str, cert_key: str, key_key: str) -> None:
    cert_path = _check_certs(cert_key, cert, "certificate")
    key_path = _check_key(key_key, key)
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise TlsFileError(key_key, f"{key} is not the private key of the certificate in {cert}") from None
        raise TlsFileError(key_key, f"cannot load {key} with {cert}: {exc.reason or exc}") from None


def server_context(
    cert: str,
    key: str,
    client_ca: str = "",
    *,
    keys: tuple[str, str, str] = ("tls_cert", "tls_key", "tls_client_ca"),
) -> ssl.SSLContext:
    """A server context presenting cert (a chain) with key; with client_ca, a client must present a
    certificate that client_ca signed. keys name the three settings in errors."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    _load_pair(ctx, cert, key, keys[0], keys[1])
    if client_ca:
        ctx.load_verify_locations(cafile=_check_certs(keys[2], client_ca, "CA bundle"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    cacert: str = "",
    cert: str = "",
    key: str = "",
    *,
    keys: tuple[str, str, str] = ("--cacert", "--cert", "--key"),
) -> ssl.SSLContext:
    """A client context that checks the server's certificate and name against cacert (else the system's
    store), presenting cert/key when given (a key may also sit in the cert file)."""
    ctx = ssl.create_default_context(cafile=_check_certs(keys[0], cacert, "CA bundle") if cacert else None)
    ctx.minimum_version = MIN_VERSION
    if cert:
        _load_pair(ctx, cert, key or cert, keys[1], keys[2] if key else keys[1])
    elif key:
        raise TlsFileError(keys[2], f"a key needs its certificate: give {keys[1]} too")
    return ctx
