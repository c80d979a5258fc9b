"""Lease on an SQL row (MySQL/MariaDB or PostgreSQL): conditional UPDATEs whose expiry the database clock decides."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import msgspec

from app.config import sql_flavor
from app.log.lease.base import LeaseBackend, LeaseRecord
from app.storage import sqldb

_dec = msgspec.json.Decoder(LeaseRecord)

# Per flavor: the table, "now" and "now + ttl" on the database's clock. UTC_TIMESTAMP does not
# depend on the session's time zone (NOW() does); clock_timestamp() moves within a transaction.
_DDL = {
    "mysql": (
        "CREATE TABLE IF NOT EXISTS {t} ("
        " name VARCHAR(64) NOT NULL PRIMARY KEY,"
        " holder VARCHAR(255) NOT NULL,"
        " record TEXT NOT NULL,"
        " term BIGINT NOT NULL,"
        " expires_at DATETIME(6) NOT NULL"
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"
    ),
    "postgresql": (
        "CREATE TABLE IF NOT EXISTS {t} ("
        " name VARCHAR(64) NOT NULL PRIMARY KEY,"
        " holder VARCHAR(255) NOT NULL,"
        " record TEXT NOT NULL,"
        " term BIGINT NOT NULL,"
        " expires_at TIMESTAMPTZ NOT NULL"
        ")"
    ),
}
_NOW = {"mysql": "UTC_TIMESTAMP(6)", "postgresql": "clock_timestamp()"}
_LATER = {
    "mysql": "UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND",
    "postgresql": "clock_timestamp() + make_interval(secs => ?)",
}


class SqlLease(LeaseBackend):
    """One row per lease name in `<prefix>lease`; every decision is one conditional statement.

    Expiry is `expires_at` compared with the database server's clock inside the statement, so
    the contenders' clocks (and any skew between their hosts) never matter. Take: UPDATE the row
    where it has expired (or is held under our own id: an earlier run of this replica), else
    INSERT it (a duplicate key means someone holds it). Renew: UPDATE where holder, term and
    "not expired" all still match; 1 row means it is still ours. Release sets `expires_at` to
    now rather than deleting the row, so `term` (bumped on every take) only ever grows.
    """

    name: ClassVar[str] = "sql"

    def __init__(self, dsn: str, table_prefix: str, lease_name: str, ttl: float) -> None:
        super().__init__(ttl)
        self.dsn = dsn
        self.flavor = sql_flavor(dsn)
        if self.flavor not in _DDL:
            raise ValueError(f"sql lease: unsupported DSN scheme in {sqldb.redact(dsn)}")
        self.table = f"{table_prefix}lease"
        self.lease_name = lease_name
        self.term = 0
        self._db: sqldb.Database | None = None
        self._lock = asyncio.Lock()
        now, later = _NOW[self.flavor], _LATER[self.flavor]
        t = self.table
        self._sql_take = (
            f"UPDATE {t} SET holder = ?, record = ?, term = term + 1, expires_at = {later}"
            f" WHERE name = ? AND (expires_at <= {now} OR holder = ?)"
        )
        self._sql_insert = f"INSERT INTO {t} (name, holder, record, term, expires_at) VALUES (?, ?, ?, 1, {later})"
        self._sql_term = f"SELECT term FROM {t} WHERE name = ? AND holder = ?"
        self._sql_renew = (
            f"UPDATE {t} SET record = ?, expires_at = {later}"
            f" WHERE name = ? AND holder = ? AND term = ? AND expires_at > {now}"
        )
        self._sql_release = f"UPDATE {t} SET expires_at = {now} WHERE name = ? AND holder = ? AND term = ?"
        self._sql_read = f"SELECT record FROM {t} WHERE name = ? AND expires_at > {now}"

    def _ttl(self) -> float | int:
        # MySQL takes whole microseconds for INTERVAL; make_interval() takes float seconds.
        return round(self.ttl * 1_000_000) if self.flavor == "mysql" else float(self.ttl)

    async def _conn(self) -> sqldb.Database:
        async with self._lock:
            if self._db is None:
                db = await sqldb.connect(self.dsn, max_size=2, timeout=max(1.0, self.ttl / 2))
                try:
                    await sqldb.ensure_schema(db, [_DDL[self.flavor].format(t=self.table)])
                except BaseException:
                    await db.close()
                    raise
                self._db = db
            return self._db

    async def _acquire(self, record: LeaseRecord) -> bool:
        db = await self._conn()
        body = msgspec.json.encode(record).decode()
        took = await db.execute(self._sql_take, record.holder, body, self._ttl(), self.lease_name, record.holder)
        if took:
            rows = await db.fetch(self._sql_term, self.lease_name, record.holder)
            if not rows:  # cannot happen while the lease is ours; be safe rather than lead blind
                return False
            self.term = int(rows[0][0])
            return True
        try:
            await db.execute(self._sql_insert, self.lease_name, record.holder, body, self._ttl())
        except sqldb.SqlConflict:
            return False  # the row exists and has not expired: someone else holds the lease
        self.term = 1
        return True

    async def _renew(self, record: LeaseRecord) -> bool:
        if not self.term:
            return False
        db = await self._conn()
        body = msgspec.json.encode(record).decode()
        return await db.execute(self._sql_renew, body, self._ttl(), self.lease_name, record.holder, self.term) == 1

    async def _release(self, record: LeaseRecord) -> None:
        db = await self._conn()
        await db.execute(self._sql_release, self.lease_name, record.holder, self.term)

    async def _read(self) -> LeaseRecord | None:
        db = await self._conn()
        rows = await db.fetch(self._sql_read, self.lease_name)
        return _dec.decode(rows[0][0]) if rows else None

    async def close(self) -> None:
        """Close the connection pool."""
        async with self._lock:
            if self._db is not None:
                await self._db.close()
                self._db = None
