"""Engine adaptors by name (a cluster record's `engine`): a new engine is a module plus one entry.

Each engine's module is imported on first use, so a replica without HA clusters of that engine
never loads its driver (asyncmy, asyncpg).
"""

from __future__ import annotations

import importlib

from app.adaptors.base import Adaptor
from app.adaptors.types import Credentials

# engine name -> "module:class"
ADAPTORS: dict[str, str] = {
    "mysql": "app.adaptors.mysql:MySQLAdaptor",
    "postgresql": "app.adaptors.postgresql:PostgresAdaptor",
}


class UnknownEngine(ValueError):
    """No adaptor is registered under that engine name."""


def adaptor_class(engine: str) -> type[Adaptor]:
    """The adaptor class registered for engine; UnknownEngine (naming the known ones) otherwise."""
    try:
        module, _, name = ADAPTORS[engine].partition(":")
    except KeyError:
        raise UnknownEngine(f"no adaptor for engine {engine!r}; known engines: {', '.join(sorted(ADAPTORS))}") from None
    found: type[Adaptor] = getattr(importlib.import_module(module), name)
    return found


def create(engine: str, login: Credentials, replication: Credentials, connect_timeout: float) -> Adaptor:
    """An adaptor for engine that logs in as login and has replicas log in to their source as replication."""
    return adaptor_class(engine)(login, connect_timeout, replication=replication)
