"""The CLI's REST client: addresses tried in order ($FLEETMATE_ADDR), a token ($FLEETMATE_TOKEN), TLS files
($FLEETMATE_CACERT, $FLEETMATE_CLIENT_CERT, $FLEETMATE_CLIENT_KEY), errors as text."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

ADDR_HELP = "server addresses, tried in order (default: $FLEETMATE_ADDR or http://127.0.0.1:21510)"


class ApiError(Exception):
    """The server answered with an error (message ready to print)."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--addr, --token, the TLS options and --json on a subcommand."""
    parser.add_argument("--addr", metavar="URL[,URL...]", help=ADDR_HELP)
    parser.add_argument("--token", help="API token (default: $FLEETMATE_TOKEN)")
    add_tls_options(parser)
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def subcommands(
    sub: Any, name: str, help_text: str, dest: str, arg: str, metavar: str, arg_help: str
) -> Callable[..., argparse.ArgumentParser]:
    """A top-level command (`fleetmate NAME ...`) and a maker of its subcommands: each takes the
    connection options and, unless asked not to (`with_arg=False`), the positional `arg`."""
    top = sub.add_parser(name, help=help_text)
    subs = top.add_subparsers(dest=dest, required=True)

    def command(cmd: str, text: str, with_arg: bool = True) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subs.add_parser(cmd, help=text)
        if with_arg:
            p.add_argument(arg, metavar=metavar, help=arg_help)
        add_connection_options(p)
        return p

    return command


def add_tls_options(
    parser: argparse.ArgumentParser, names: Callable[[str], tuple[str, ...]] = lambda flag: (flag,)
) -> None:
    """--cacert, --cert and --key (curl's names) for https:// addresses; names() adds other spellings."""
    parser.add_argument(
        *names("--cacert"),
        dest="cacert",
        metavar="PATH",
        help="CA bundle (PEM) that signed the server's certificate (default: $FLEETMATE_CACERT, else the system's)",
    )
    parser.add_argument(
        *names("--cert"),
        dest="cert",
        metavar="PATH",
        help="client certificate (PEM), for a server that asks for one (default: $FLEETMATE_CLIENT_CERT)",
    )
    parser.add_argument(
        *names("--key"),
        dest="key",
        metavar="PATH",
        help="the client certificate's key (default: $FLEETMATE_CLIENT_KEY; else in the --cert file)",
    )


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """The context for https:// addresses from --cacert/--cert/--key or their variables; True (the
    system's CA store, no client certificate) when none is given. TlsFileError names the flag or variable."""
    given: list[tuple[str, str]] = []
    for dest, flag, var in (
        ("cacert", "--cacert", "FLEETMATE_CACERT"),
        ("cert", "--cert", "FLEETMATE_CLIENT_CERT"),
        ("key", "--key", "FLEETMATE_CLIENT_KEY"),
    ):
        value = getattr(args, dest, None)
        given.append((flag, value) if value else (var, os.environ.get(var, "")))
    if not any(value for _, value in given):
        return True
    from app import tls

    (ca_name, cacert), (cert_name, cert), (key_name, key) = given
    return tls.client_context(cacert, cert, key, keys=(ca_name, cert_name, key_name))


def tls_hint(exc: BaseException | None) -> str:
    """A hint to append to a connection error that is about certificates."""
    text = str(exc or "")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return " (does --cacert or $FLEETMATE_CACERT name the CA that signed the server's certificate?)"
    if "CERTIFICATE_REQUIRED" in text or "alert bad certificate" in text.lower():
        return " (the server wants a client certificate its CA signed: --cert and --key)"
    return ""


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    """One request to the first address that answers; ApiError with the server's error code and message."""
    import httpx

    addrs = (args.addr or os.environ.get("FLEETMATE_ADDR") or "http://127.0.0.1:21510").split(",")
    token = args.token or os.environ.get("FLEETMATE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    from app.tls import TlsFileError

    try:
        verify = tls_context(args)
    except TlsFileError as exc:
        raise ApiError(str(exc)) from None
    last: Exception | None = None
    for addr in addrs:
        try:
            response = httpx.request(
                method, addr.rstrip("/") + path, json=body, headers=headers, timeout=timeout, verify=verify
            )
        except httpx.TransportError as exc:
            last = exc
            continue
        if response.status_code >= 400:
            try:
                err = response.json()
                raise ApiError(f"{err['error']}: {err['message']}")
            except (ValueError, KeyError):
                raise ApiError(f"HTTP {response.status_code}") from None
        return response.json() if response.content else None
    raise ApiError(f"no address answers ({', '.join(addrs)}): {last}{tls_hint(last)}")
