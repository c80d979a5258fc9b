"""libpq connection strings (primary_conninfo, pg_rewind's --source-server): parsed and written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, unquote, urlsplit

# libpq's keyword/value form: key = value, the value bare or '-quoted, with \-escapes in both.
_CONNINFO_PAIR = re.compile(r"\s*([^=\s]+)\s*=\s*(?:'((?:[^'\\]|\\.)*)'|((?:[^\s'\\]|\\.)*))\s*")
_UNESCAPE = re.compile(r"\\(.)")


def parse_conninfo(text: str) -> dict[str, str]:
    """A libpq connection string, `key=value ...` (values optionally '-quoted) or a postgresql:// URI."""
    text = text.strip()
    params: dict[str, str] = {}
    if text.startswith(("postgresql://", "postgres://")):
        url = urlsplit(text)
        params.update(parse_qsl(url.query))
        if url.hostname:
            params.setdefault("host", unquote(url.hostname))
        if url.port:  # ValueError for a bad or multi-host port list
            params.setdefault("port", str(url.port))
        if url.username:
            params.setdefault("user", unquote(url.username))
        return params
    pos = 0
    while pos < len(text):
        match = _CONNINFO_PAIR.match(text, pos)
        if match is None:
            raise ValueError(f"malformed connection string at character {pos}")
        key, quoted, bare = match.groups()
        params[key] = _UNESCAPE.sub(r"\1", quoted if quoted is not None else bare)
        pos = match.end()
    return params


def format_conninfo(params: Mapping[str, str]) -> str:
    """A libpq `key='value'` connection string (quotes and backslashes escaped)."""
    quoted = (v.replace("\\", "\\\\").replace("'", "\\'") for v in params.values())
    return " ".join(f"{k}='{v}'" for k, v in zip(params, quoted, strict=True))
