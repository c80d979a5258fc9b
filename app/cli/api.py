"""The CLI's REST client: addresses tried in order ($FLEETMATE_ADDR), a token ($FLEETMATE_TOKEN), errors as text."""

from __future__ import annotations

import argparse
import os
from typing import Any

ADDR_HELP = "server addresses, tried in order (default: $FLEETMATE_ADDR or http://127.0.0.1:21510)"


class ApiError(Exception):
    """The server answered with an error (message ready to print)."""


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """--addr, --token and --json on a subcommand."""
    parser.add_argument("--addr", metavar="URL[,URL...]", help=ADDR_HELP)
    parser.add_argument("--token", help="API token (default: $FLEETMATE_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    """One request to the first address that answers; ApiError with the server's error code and message."""
    import httpx

    addrs = (args.addr or os.environ.get("FLEETMATE_ADDR") or "http://127.0.0.1:21510").split(",")
    token = args.token or os.environ.get("FLEETMATE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last: Exception | None = None
    for addr in addrs:
        try:
            response = httpx.request(method, addr.rstrip("/") + path, json=body, headers=headers, timeout=timeout)
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
    raise ApiError(f"no address answers ({', '.join(addrs)}): {last}")
