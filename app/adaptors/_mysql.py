"""One autocommit connection to one MySQL/MariaDB instance (asyncmy), for app/adaptors/mysql.py.

MySQL 8's Source/Replica column and variable names are read as MariaDB's Master/Slave ones, so
the adaptor has one code path for both flavors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Literal

from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.types import Address

Flavor = Literal["mariadb", "mysql"]
Row = dict[str, Any]

_MARIADB_WORDS = {"Source": "Master", "Replica": "Slave", "source": "master", "replica": "slave"}


def _mariadb_name(name: str) -> str:
    """MySQL 8's Source/Replica names as MariaDB's Master/Slave ones (MariaDB names pass unchanged)."""
    return "_".join(_MARIADB_WORDS.get(word, word) for word in name.split("_"))


def text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return value.decode(errors="replace")
    return str(value)


# --- one connection to one instance --------------------------------------------------------------


class Session:
    """One autocommit connection to one instance, its flavor known; every failure an AdaptorError."""

    def __init__(self, conn: Any, address: Address, flavor: Flavor, adaptor: Adaptor) -> None:
        self.conn = conn
        self.address = address
        self.flavor = flavor
        self.adaptor = adaptor
        self.real_names: dict[str, str] = {}

    @property
    def mariadb(self) -> bool:
        return self.flavor == "mariadb"

    async def rows(self, sql: str, params: tuple[Any, ...] | None = None, timeout: float | None = None) -> list[Row]:
        """Run one statement; its rows as dicts with MariaDB-style column names."""
        from asyncmy import errors
        from asyncmy.cursors import DictCursor

        limit = self.adaptor.statement_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                cursor: Any = self.conn.cursor(DictCursor)
                async with cursor as cur:
                    await cur.execute(sql, params)
                    fetched = await cur.fetchall()
        except TimeoutError:
            raise AdaptorError(self.address, f"no answer within {limit:g}s to {_verb(sql)}") from None
        except (errors.MySQLError, OSError) as exc:
            raise self.adaptor.error(self.address, _verb(sql), exc) from None
        return [{_mariadb_name(k): v for k, v in row.items()} for row in fetched or ()]

    async def execute(self, sql: str, params: tuple[Any, ...] | None = None) -> None:
        await self.rows(sql, params)

    async def value(self, sql: str, params: tuple[Any, ...] | None = None, timeout: float | None = None) -> str:
        found = await self.rows(sql, params, timeout)
        return text(next(iter(found[0].values()))) if found and found[0] else ""

    async def variables(self, names: Iterable[str]) -> dict[str, str]:
        """Global variables by (MariaDB-style) name; a variable this server lacks is simply absent."""
        wanted = sorted({*names, *(n.replace("slave", "replica").replace("master", "source") for n in names)})
        marks = ", ".join(["%s"] * len(wanted))
        found = await self.rows(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({marks})", tuple(wanted))
        return {_mariadb_name(text(r["Variable_name"])): text(r["Value"]) for r in found}

    async def semi_sync(self) -> tuple[dict[str, str], dict[str, str]]:
        """Semi-sync variables and status counters (both sides), MariaDB-style names.

        Also remembers each variable's real name (MySQL: rpl_semi_sync_source_* or, with the
        older plugin, rpl_semi_sync_master_*) for a later SET GLOBAL.
        """
        names = await self.rows("SHOW GLOBAL VARIABLES LIKE 'rpl_semi_sync%%'", ())
        counters = await self.rows("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync%%'", ())
        self.real_names.update({_mariadb_name(text(r["Variable_name"])): text(r["Variable_name"]) for r in names})
        return (
            {_mariadb_name(text(r["Variable_name"])): text(r["Value"]) for r in names},
            {_mariadb_name(text(r["Variable_name"])): text(r["Value"]) for r in counters},
        )

    async def replica_status(self) -> Row | None:
        """The replication row (default channel/connection), None when replication is not configured."""
        found = await self.rows("SHOW SLAVE STATUS" if self.mariadb else "SHOW REPLICA STATUS")
        if not found or not text(found[0].get("Master_Host")):
            return None  # never configured, or RESET SLAVE ALL
        return found[0]

    async def replica_hosts(self) -> list[Row]:
        return await self.rows("SHOW SLAVE HOSTS" if self.mariadb else "SHOW REPLICAS")

    async def stop_replication(self) -> None:
        """Stop both replication threads if either runs (stopping stopped ones only earns a note)."""
        found = await self.rows("SHOW SLAVE STATUS" if self.mariadb else "SHOW REPLICA STATUS")
        if found and (
            text(found[0].get("Slave_IO_Running")) != "No" or text(found[0].get("Slave_SQL_Running")) != "No"
        ):
            await self.execute("STOP SLAVE" if self.mariadb else "STOP REPLICA")

    async def start_replication(self) -> None:
        await self.execute("START SLAVE" if self.mariadb else "START REPLICA")


def _verb(sql: str) -> str:
    """The first words of a statement, for error messages (never its arguments)."""
    return " ".join(sql.split()[:3]).rstrip(",")
