"""Which login HA uses for a cluster: ha.secrets_file's [clusters.<name>], else [ha] user/password.

Passwords never reach the registry, the API or the logs; a DSN that carries one is refused.
"""

from __future__ import annotations

import tomllib
import urllib.parse
from pathlib import Path

from app.adaptors.types import Address, Credentials, Engine
from app.config import HaConfig
from app.services.ha.errors import BadClusterRequest

SCHEMES: dict[str, Engine] = {
    "mysql": "mysql",
    "mariadb": "mysql",
    "postgresql": "postgresql",
    "postgres": "postgresql",
}
DEFAULT_PORTS: dict[Engine, int] = {"mysql": 3306, "postgresql": 5432}


def parse_seed(dsn: str) -> tuple[Engine, Address, str, str]:
    """mysql://user@host:port/db (or mariadb://, postgresql://) as (engine, address, user, database)."""
    try:
        url = urllib.parse.urlsplit(dsn)
        port = url.port
    except ValueError as exc:
        raise BadClusterRequest(f"the DSN is malformed: {exc}") from None
    engine = SCHEMES.get(url.scheme)
    if engine is None:
        raise BadClusterRequest(f"the DSN must start with one of {', '.join(s + '://' for s in SCHEMES)}")
    if url.password is not None:
        raise BadClusterRequest(
            "the DSN carries a password: put it in ha.secrets_file ([clusters.NAME] password) or ha.password;"
            " passwords are never stored in the registry"
        )
    if not url.hostname:
        raise BadClusterRequest("the DSN has no host")
    address = Address(url.hostname, port or DEFAULT_PORTS[engine])
    return engine, address, urllib.parse.unquote(url.username or ""), url.path.lstrip("/")


def credentials_for(cfg: HaConfig, cluster: str, user: str, database: str) -> tuple[Credentials, Credentials]:
    """(login, replication login) for a cluster; BadClusterRequest when none is configured."""
    entry: dict[str, object] = {}
    if cfg.secrets_file:
        try:
            data = tomllib.loads(Path(cfg.secrets_file).expanduser().read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BadClusterRequest(f"ha.secrets_file cannot be read: {exc}") from None
        clusters = data.get("clusters", {})
        found = clusters.get(cluster, {}) if isinstance(clusters, dict) else {}
        entry = found if isinstance(found, dict) else {}
    login = str(entry.get("user") or user or cfg.user)
    password = str(entry.get("password") or cfg.password)
    if not login:
        raise BadClusterRequest(
            f"no login for cluster {cluster!r}: give a user in the DSN, [clusters.{cluster}] in"
            " ha.secrets_file, or ha.user"
        )
    repl_user = str(entry.get("replication_user") or cfg.replication_user or login)
    repl_password = str(entry.get("replication_password") or cfg.replication_password or password)
    return Credentials(login, password, database), Credentials(repl_user, repl_password, database)
