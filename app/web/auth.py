"""Bearer tokens with read and admin scopes, checked on /api/ routes once any token is configured."""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from app.config import Token

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when absent, another scheme or empty.

    Every bearer check (the guard, the lean path, the watch socket) parses the header here.
    """
    if not header:
        return None
    kind, _, presented = header.partition(" ")
    if kind.lower() != "bearer":
        return None
    return presented.strip() or None


class TokenGuard:
    """A Litestar guard: routes marked opt={"public": True} are open; others need read or admin."""

    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self.tokens = tokens

    def scope_of(self, presented: str) -> str | None:
        """The scope of a presented secret, compared in constant time; None when unknown."""
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.secret.encode(), presented.encode()):
                found = token.scope
        return found

    def scope_of_header(self, header: str | None) -> str | None:
        """The scope an Authorization header grants; None when it carries no known bearer token."""
        presented = bearer_token(header)
        return None if presented is None else self.scope_of(presented)

    def __call__(self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        if handler.opt.get("public") or not connection.scope["path"].startswith("/api/"):
            return
        presented = bearer_token(connection.headers.get("authorization"))
        if presented is None:
            raise NotAuthorizedException(
                "an API token is required: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        scope = self.scope_of(presented)
        if scope is None:
            raise NotAuthorizedException("the API token is not valid", headers={"WWW-Authenticate": "Bearer"})
        method = connection.scope.get("method", "GET")
        needed = handler.opt.get("scope") or ("read" if method in READ_METHODS else "admin")
        if needed == "admin" and scope != "admin":
            raise PermissionDeniedException("this route needs a token with the admin scope")
