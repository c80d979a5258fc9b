"""SQL connection pools from a DSN: asyncmy for MySQL/MariaDB, asyncpg for PostgreSQL, behind one small interface."""

from __future__ import annotations

import asyncio
import functools
import re
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar

from app.config import sql_flavor

if TYPE_CHECKING:
    import asyncmy.pool
    import asyncpg

Row = tuple[Any, ...]


class SqlError(Exception):
    """The database cannot be reached, refused us, or failed a statement (the DSN's password is never shown)."""


class SqlConflict(SqlError):
    """A unique key already holds that value (duplicate primary key)."""


def redact(dsn: str) -> str:
    """The DSN with its password replaced by ***."""
    url = urllib.parse.urlsplit(dsn)
    if url.password is None:
        return dsn
    netloc = url.netloc.replace(f":{url.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(url._replace(netloc=netloc))


@functools.lru_cache(maxsize=256)
def _mysql_sql(sql: str, with_params: bool) -> str:
    # asyncmy interpolates %s (and so needs a literal % doubled) only when parameters are given.
    return sql.replace("%", "%%").replace("?", "%s") if with_params else sql


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class Executor(ABC):
    """Runs statements written with `?` placeholders, whichever driver is underneath."""

    @abstractmethod
    async def execute(self, sql: str, *params: Any) -> int:
        """Run one statement; the number of rows it matched (UPDATE/DELETE) or inserted."""

    @abstractmethod
    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        """Run a query; its rows as tuples."""


class Database(Executor, ABC):
    """A connection pool; `transaction()` gives one connection inside BEGIN ... COMMIT (ROLLBACK on error)."""

    flavor: ClassVar[str]

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.where = redact(dsn)

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """A connection in a transaction, committed when the block ends without error."""

    @abstractmethod
    async def close(self) -> None:
        """Close every connection."""


# --- MySQL / MariaDB (asyncmy) -------------------------------------------------------------


def _mysql_error(where: str, exc: Exception) -> SqlError:
    from asyncmy import errors

    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    text = exc.args[1] if len(exc.args) > 1 else str(exc)
    if isinstance(exc, errors.IntegrityError) and code == 1062:
        return SqlConflict(f"{where}: {text}")
    if code == 1045:
        return SqlError(f"{where}: access denied: check the user and password in sql.dsn ({text})")
    if code in (2002, 2003, 2005, 2006, 2013) or isinstance(exc, OSError | TimeoutError):
        return SqlError(f"{where}: cannot reach the database: {text}")
    return SqlError(f"{where}: {text}")


class _MySqlConn(Executor):
    def __init__(self, conn: Any, where: str) -> None:
        self.conn = conn
        self.where = where

    async def execute(self, sql: str, *params: Any) -> int:
        from asyncmy import errors

        try:
            async with self.conn.cursor() as cur:
                await cur.execute(_mysql_sql(sql, bool(params)), params or None)
                count: int = cur.rowcount
                return count
        except (errors.MySQLError, OSError) as exc:
            raise _mysql_error(self.where, exc) from exc

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        from asyncmy import errors

        try:
            async with self.conn.cursor() as cur:
                await cur.execute(_mysql_sql(sql, bool(params)), params or None)
                return [tuple(row) for row in await cur.fetchall()]
        except (errors.MySQLError, OSError) as exc:
            raise _mysql_error(self.where, exc) from exc


class MySqlDatabase(Database):
    """MySQL or MariaDB through an asyncmy pool, autocommit on, rowcount = rows matched (FOUND_ROWS)."""

    flavor: ClassVar[str] = "mysql"

    def __init__(self, dsn: str, pool: asyncmy.pool.Pool) -> None:
        super().__init__(dsn)
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, max_size: int, timeout: float) -> MySqlDatabase:
        """Connect a pool (one connection made at once, so a bad DSN fails here)."""
        import asyncmy
        from asyncmy import errors
        from asyncmy.constants import CLIENT

        url = urllib.parse.urlsplit(dsn)
        where = redact(dsn)
        try:
            pool = await asyncmy.create_pool(
                minsize=1,
                maxsize=max_size,
                host=url.hostname or "127.0.0.1",
                port=url.port or 3306,
                user=urllib.parse.unquote(url.username or ""),
                password=urllib.parse.unquote(url.password or ""),
                db=url.path.lstrip("/") or None,
                autocommit=True,
                # Count matched rows, as PostgreSQL does: a conditional UPDATE that matched
                # but changed nothing still reports 1.
                client_flag=CLIENT.FOUND_ROWS,
                connect_timeout=max(1, round(timeout)),
                read_timeout=timeout,
                charset="utf8mb4",
                pool_recycle=300,
            )
        except (errors.MySQLError, OSError, TimeoutError) as exc:
            raise _mysql_error(where, exc) from exc
        return cls(dsn, pool)

    async def execute(self, sql: str, *params: Any) -> int:
        async with self.pool.acquire() as conn:
            return await _MySqlConn(conn, self.where).execute(sql, *params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        async with self.pool.acquire() as conn:
            return await _MySqlConn(conn, self.where).fetch(sql, *params)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Executor]:
        from asyncmy import errors

        async with self.pool.acquire() as conn:
            try:
                await conn.begin()
            except (errors.MySQLError, OSError) as exc:
                raise _mysql_error(self.where, exc) from exc
            try:
                yield _MySqlConn(conn, self.where)
            except BaseException:
                try:
                    await conn.rollback()
                except (errors.MySQLError, OSError):
                    conn.close()  # a connection in an unknown state must not go back to the pool
                raise
            try:
                await conn.commit()
            except (errors.MySQLError, OSError) as exc:
                raise _mysql_error(self.where, exc) from exc

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        return self._transaction()

    async def close(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()


# --- PostgreSQL (asyncpg) ------------------------------------------------------------------


def _pg_error(where: str, exc: BaseException) -> SqlError:
    import asyncpg

    if isinstance(exc, asyncpg.UniqueViolationError):
        return SqlConflict(f"{where}: {exc}")
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
        return SqlError(f"{where}: access denied: check the user and password in sql.dsn ({exc})")
    if isinstance(exc, OSError | TimeoutError | asyncpg.ConnectionDoesNotExistError):
        return SqlError(f"{where}: cannot reach the database: {exc!r}")
    return SqlError(f"{where}: {exc}")


def _pg_count(status: str) -> int:
    # asyncpg returns the command tag: "UPDATE 1", "DELETE 0", "INSERT 0 1".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PgConn(Executor):
    def __init__(self, conn: Any, where: str) -> None:
        self.conn = conn
        self.where = where

    async def execute(self, sql: str, *params: Any) -> int:
        import asyncpg

        try:
            return _pg_count(await self.conn.execute(_pg_sql(sql), *params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _pg_error(self.where, exc) from exc

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        import asyncpg

        try:
            return [tuple(row) for row in await self.conn.fetch(_pg_sql(sql), *params)]
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _pg_error(self.where, exc) from exc


class PostgresDatabase(Database):
    """PostgreSQL through an asyncpg pool (each statement outside `transaction()` commits by itself)."""

    flavor: ClassVar[str] = "postgresql"

    def __init__(self, dsn: str, pool: asyncpg.Pool) -> None:
        super().__init__(dsn)
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, max_size: int, timeout: float) -> PostgresDatabase:
        """Connect a pool (one connection made at once, so a bad DSN fails here)."""
        import asyncpg

        where = redact(dsn)
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                timeout=timeout,
                command_timeout=timeout,
                # No prepared-statement cache: it breaks behind pgbouncer and buys little here.
                statement_cache_size=0,
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _pg_error(where, exc) from exc
        return cls(dsn, pool)

    async def execute(self, sql: str, *params: Any) -> int:
        async with self.pool.acquire() as conn:
            return await _PgConn(conn, self.where).execute(sql, *params)

    async def fetch(self, sql: str, *params: Any) -> list[Row]:
        async with self.pool.acquire() as conn:
            return await _PgConn(conn, self.where).fetch(sql, *params)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Executor]:
        import asyncpg

        async with self.pool.acquire() as conn:
            tx = conn.transaction()
            try:
                await tx.start()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise _pg_error(self.where, exc) from exc
            try:
                yield _PgConn(conn, self.where)
            except BaseException:
                await tx.rollback()
                raise
            try:
                await tx.commit()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
                raise _pg_error(self.where, exc) from exc

    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        return self._transaction()

    async def close(self) -> None:
        await self.pool.close()


async def connect(dsn: str, max_size: int = 4, timeout: float = 10.0) -> Database:
    """A pool for a mysql://, mariadb://, postgresql:// or postgres:// DSN; SqlError when it cannot connect."""
    flavor = sql_flavor(dsn)
    if flavor == "mysql":
        return await MySqlDatabase.open(dsn, max_size, timeout)
    if flavor == "postgresql":
        return await PostgresDatabase.open(dsn, max_size, timeout)
    raise SqlError(f"{redact(dsn)}: unsupported scheme (use mysql://, mariadb://, postgresql:// or postgres://)")


async def ensure_schema(db: Database, statements: list[str]) -> None:
    """Run CREATE ... IF NOT EXISTS statements; tolerate a replica creating the same table at the same moment."""
    for statement in statements:
        try:
            await db.execute(statement)
        except SqlConflict:
            # PostgreSQL: two concurrent CREATE TABLE IF NOT EXISTS can collide on its catalog
            # ("pg_type_typname_nsp_index"); the loser finds the table there on a second try.
            await asyncio.sleep(0.05)
            await db.execute(statement)
