"""ZooKeeper ACLs at the front end: identities from auth packets, the `auth` scheme, and permission checks."""

from __future__ import annotations

import base64
import hashlib
import ipaddress

from app.services.registry.errors import InvalidACL
from app.services.registry.messages import Acl

WORLD = ("world", "anyone")


def digest_id(user_password: str) -> str:
    """ZooKeeper's digest id for "user:password": user:base64(sha1("user:password"))."""
    user = user_password.split(":", 1)[0]
    hashed = base64.b64encode(hashlib.sha1(user_password.encode()).digest()).decode()
    return f"{user}:{hashed}"


def _ip_matches(acl_id: str, client_ip: str) -> bool:
    try:
        return ipaddress.ip_address(client_ip) in ipaddress.ip_network(acl_id, strict=False)
    except ValueError:
        return False


def allowed(acl: tuple[Acl, ...], perm: int, ids: list[tuple[str, str]]) -> bool:
    """True when an entry grants perm to one of the connection's identities."""
    for entry in acl:
        if not entry.perms & perm:
            continue
        if entry.scheme == "world" and entry.id == "anyone":
            return True
        for scheme, ident in ids:
            if scheme != entry.scheme:
                continue
            if scheme == "ip" and _ip_matches(entry.id, ident):
                return True
            if ident == entry.id:
                return True
    return False


def hide_digests(acl: tuple[Acl, ...]) -> tuple[Acl, ...]:
    """The ACL as a reader without ADMIN sees it: each digest id's hash replaced by x (user:x)."""
    return tuple(Acl(e.perms, e.scheme, e.id.split(":", 1)[0] + ":x") if e.scheme == "digest" else e for e in acl)


def resolve(acl: tuple[Acl, ...], ids: list[tuple[str, str]], path: str) -> tuple[Acl, ...]:
    """The ACL as stored: exact duplicates dropped (the first kept, as ZooKeeper's fixupACL does),
    `auth` entries become the connection's authenticated ids; others are checked."""
    out: list[Acl] = []
    for entry in dict.fromkeys(acl):
        if entry.perms & ~31 or entry.perms == 0:
            raise InvalidACL(f"permission bits {entry.perms} are not valid", path)
        if entry.scheme == "auth":
            authed = [(s, i) for s, i in ids if s == "digest"]
            if not authed:
                raise InvalidACL("the auth scheme needs an authenticated (digest) connection", path)
            out.extend(Acl(entry.perms, s, i) for s, i in authed)
        elif entry.scheme == "world":
            if entry.id != "anyone":
                raise InvalidACL("the world scheme only has the id 'anyone'", path)
            out.append(entry)
        elif entry.scheme == "digest":
            if ":" not in entry.id:
                raise InvalidACL("a digest id is user:base64(sha1(user:password))", path)
            out.append(entry)
        elif entry.scheme == "ip":
            try:
                ipaddress.ip_network(entry.id, strict=False)
            except ValueError:
                raise InvalidACL(f"{entry.id!r} is not an address or network", path) from None
            out.append(entry)
        else:
            raise InvalidACL(f"unknown ACL scheme {entry.scheme!r}", path)
    if not out:
        raise InvalidACL("an ACL needs at least one entry", path)
    return tuple(out)
