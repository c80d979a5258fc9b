"""The PostgreSQL adaptor (13+, streaming replication) over asyncpg: probe, wait, promote, repoint, fence, rejoin.

Naming replicas: a primary sees its standbys in pg_stat_replication by client address and
application_name only (the row has the standby's ephemeral client port, not the port it
listens on). A standby's address is therefore taken from, in order:

1. the `members` mapping given to the adaptor (application_name -> Address), as Patroni
   learns its members from the DCS (fleetmate: the cluster's instances in the registry);
2. the convention that a standby's application_name IS its address, `host:port` (set in its
   primary_conninfo; `rejoin` and `repoint` keep or write it that way). In
   synchronous_standby_names such a name is double-quoted: `FIRST 1 ("10.0.0.2:5432")`.

A replica named neither way is listed in `extra["unresolved_replicas"]` (`name@client_addr`)
and not walked by discovery.

The admin role needs SUPERUSER: ALTER SYSTEM, pg_promote(), reading primary_conninfo and
pg_stat_wal_receiver's columns, and serving as pg_rewind's source all require it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import asyncpg

from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.conninfo import format_conninfo, parse_conninfo
from app.adaptors.positions import lsn_value
from app.adaptors.types import Address, Credentials, Engine, InstanceStatus, ReplicationLink

# One round trip for the instance itself. pg_is_in_recovery() is read in every CASE so that a
# function valid only on one role (pg_current_wal_lsn on a primary, pg_is_wal_replay_paused on a
# standby) is never called on the other; a promotion between two reads is retried by probe().
_INSTANCE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('server_version') AS version,
       current_setting('server_version_num')::int AS version_num,
       current_setting('default_transaction_read_only')::bool AS default_read_only,
       current_setting('synchronous_standby_names') AS sync_names,
       current_setting('synchronous_commit') AS sync_commit,
       current_setting('primary_conninfo') AS primary_conninfo,
       current_setting('cluster_name') AS cluster_name,
       (SELECT system_identifier FROM pg_control_system())::text AS system_identifier,
       (SELECT timeline_id FROM pg_control_checkpoint()) AS checkpoint_tli,
       CASE WHEN pg_is_in_recovery() THEN NULL
            -- the insert timeline: pg_control's checkpoint timeline lags a promotion until its checkpoint
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END AS current_tli,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text
           AS position,
       pg_last_wal_receive_lsn()::text AS received,
       pg_last_wal_replay_lsn()::text AS replayed,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused,
       -- replay lag only means something while received WAL waits to be replayed
       (CASE WHEN pg_last_wal_receive_lsn() IS NULL OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
             ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp()) END)::float8 AS lag
"""
_RECEIVER_SQL = """
SELECT status, received_tli, sender_host, sender_port, flushed_lsn::text AS flushed
FROM pg_stat_wal_receiver
"""
_REPLICAS_SQL = """
SELECT application_name, host(client_addr) AS client_addr, state, sync_state
FROM pg_stat_replication
ORDER BY application_name
"""
_APPLIED_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_receive_lsn()::text AS received,
       pg_last_wal_replay_lsn()::text AS replayed,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused
"""
# What a connection or statement can fail with (InternalClientError: a connection lost mid-operation).
_CLIENT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, TimeoutError)
_CHECKPOINT_BEHIND_SQL = """
SELECT NOT pg_is_in_recovery() AND (SELECT timeline_id FROM pg_control_checkpoint())
       <> ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
"""
# Keys of primary_conninfo that name the source or the login: replaced by repoint, kept otherwise.
_SOURCE_KEYS = frozenset({"host", "hostaddr", "port", "user", "password", "service", "dbname"})
_SYNC_COMMITS = frozenset({"on", "remote_write", "remote_apply"})


SYNC_ANY = "ANY 1 (*)"  # what a promoted standby of a synchronous primary waits for


def _sql_literal(text: str) -> str:
    # ALTER SYSTEM takes no bind parameters; standard_conforming_strings (on since 9.1) keeps
    # backslashes literal, so doubling single quotes is the whole escape.
    return "'" + text.replace("'", "''") + "'"


class PostgresAdaptor(Adaptor):
    """HA primitives for PostgreSQL 13+ streaming replication (physical standbys)."""

    engine: ClassVar[Engine] = "postgresql"

    def __init__(
        self,
        credentials: Credentials,
        connect_timeout: float = 2.0,
        *,
        replication: Credentials | None = None,
        members: Mapping[str, Address] | None = None,
        statement_timeout: float = 10.0,
        promote_timeout: float = 60.0,
        repoint_timeout: float = 30.0,
    ) -> None:
        # replication: what standbys log in to their source with (primary_conninfo).
        super().__init__(credentials, connect_timeout, replication, statement_timeout)
        self.members = dict(members or {})
        self.promote_timeout = promote_timeout
        self.repoint_timeout = repoint_timeout

    # --- connections and errors -------------------------------------------------------------

    def _describe(self, what: str, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            detail = "timed out waiting for an answer"
        elif isinstance(exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            detail = f"login refused: {exc}"
        elif isinstance(exc, asyncpg.PostgresError):
            detail = f"{exc.__class__.__name__}: {exc}"
        elif isinstance(exc, ConnectionRefusedError):
            detail = "cannot connect: connection refused"
        elif isinstance(exc, OSError):
            detail = f"cannot connect: {exc}"
        else:
            detail = f"{exc.__class__.__name__}: {exc}"
        return f"{what}: {detail}" if what else detail

    @contextlib.asynccontextmanager
    async def _session(self, address: Address, what: str) -> AsyncIterator[Any]:
        """A connection to one instance; every failure inside becomes an AdaptorError naming it."""
        try:
            conn = await asyncpg.connect(
                host=address.host,
                port=address.port,
                user=self.credentials.user,
                password=self.credentials.password or None,
                database=self.credentials.database or "postgres",
                timeout=self.connect_timeout,
                command_timeout=self.statement_timeout,
                server_settings={"application_name": "fleetmate-ha"},
            )
        except _CLIENT_ERRORS as exc:
            raise self.error(address, what, exc) from None
        try:
            yield conn
        except _CLIENT_ERRORS as exc:
            raise self.error(address, what, exc) from None
        finally:
            try:
                await asyncio.wait_for(conn.close(), 1.0)
            except _CLIENT_ERRORS:
                conn.terminate()

    def _replica_address(self, name: str) -> Address | None:
        if name in self.members:
            return self.members[name]
        try:
            return Address.parse(name)
        except ValueError:
            return None

    # --- probe ------------------------------------------------------------------------------

    async def _probe(self, address: Address, started: float) -> InstanceStatus:
        try:
            async with self._session(address, "") as conn:
                return await self._read_status(conn, address, started)
        except AdaptorError as exc:
            # A promotion between two pg_is_in_recovery() reads of one query: read again.
            if "recovery is not in progress" not in str(exc):
                raise
        async with self._session(address, "") as conn:
            return await self._read_status(conn, address, started)

    async def _read_status(self, conn: Any, address: Address, started: float) -> InstanceStatus:
        row = await conn.fetchrow(_INSTANCE_SQL)
        if row["version_num"] < 130000:
            raise AdaptorError(address, f"PostgreSQL 13 or later is needed, this is {row['version']}")
        receiver = await conn.fetchrow(_RECEIVER_SQL)
        replicas_rows = await conn.fetch(_REPLICAS_SQL)
        in_recovery: bool = row["in_recovery"]
        extra: dict[str, str] = {}

        replicas: list[Address] = []
        sync_replicas: list[Address] = []
        unresolved: list[str] = []
        for r in replicas_rows:
            name = r["application_name"] or ""
            replica = self._replica_address(name)
            if replica is None:
                unresolved.append(f"{name}@{r['client_addr'] or 'local'}")
                continue
            replicas.append(replica)
            if r["sync_state"] in ("sync", "quorum"):
                sync_replicas.append(replica)
        if unresolved:
            extra["unresolved_replicas"] = ",".join(unresolved)

        link: ReplicationLink | None = None
        timeline: int | None = row["current_tli"]
        sync_replication = False
        if in_recovery:
            try:
                conninfo = parse_conninfo(row["primary_conninfo"])
            except ValueError:
                conninfo = {}
            extra["application_name"] = conninfo.get("application_name") or row["cluster_name"] or "walreceiver"
            link = self._link(row, receiver, conninfo)
            timeline = row["checkpoint_tli"]
            if receiver is not None and receiver["received_tli"]:
                timeline = receiver["received_tli"]
        else:
            extra["synchronous_standby_names"] = row["sync_names"]
            extra["synchronous_commit"] = row["sync_commit"]
            sync_replication = bool(row["sync_names"].strip()) and row["sync_commit"] in _SYNC_COMMITS

        return InstanceStatus(
            address=address,
            engine="postgresql",
            reachable=True,
            probed_at=started,
            role="replica" if in_recovery else "primary",
            server_id=row["system_identifier"],
            version=row["version"],
            read_only=in_recovery or row["default_read_only"],
            position=row["position"] or "",
            timeline=timeline,
            replication=link,
            replicas=tuple(sorted(set(replicas))),
            sync_replication=sync_replication,
            sync_replicas=tuple(sorted(set(sync_replicas))),
            extra=extra,
        )

    @staticmethod
    def _link(row: Any, receiver: Any, conninfo: Mapping[str, str]) -> ReplicationLink:
        source: Address | None = None
        error = ""
        if receiver is not None and receiver["sender_host"] and not receiver["sender_host"].startswith("/"):
            source = Address(receiver["sender_host"], receiver["sender_port"])
        else:
            # No WAL receiver (its source is gone, or it is restarting): the configured source.
            host = conninfo.get("host") or conninfo.get("hostaddr") or ""
            port = conninfo.get("port") or "5432"
            if host and not host.startswith("/") and "," not in host and port.isdigit():
                source = Address(host, int(port))
        if receiver is None:
            error = "no WAL receiver running" if conninfo else "no primary_conninfo configured"
        elif receiver["status"] != "streaming":
            error = f"WAL receiver {receiver['status']}"
        return ReplicationLink(
            source=source,
            receiving=receiver is not None and receiver["status"] == "streaming",
            applying=not row["replay_paused"],
            last_error=error,
            lag_seconds=row["lag"],
            received_position=row["received"] or "",
            applied_position=row["replayed"] or "",
        )

    # --- recovery steps ---------------------------------------------------------------------

    async def _wait_applied(self, address: Address, timeout: float) -> InstanceStatus:
        """Wait until a standby has replayed all the WAL it received (a primary: at once); its probe after."""
        deadline = time.monotonic() + timeout
        async with self._session(address, "wait for replay") as conn:
            while True:
                row = await conn.fetchrow(_APPLIED_SQL)
                received, replayed = row["received"], row["replayed"]
                if not row["in_recovery"] or received is None:
                    break
                if replayed is not None and lsn_value(replayed) >= lsn_value(received):
                    break
                if time.monotonic() >= deadline:
                    paused = " (replay is paused)" if row["replay_paused"] else ""
                    raise AdaptorError(
                        address, f"replay at {replayed} has not reached {received} within {timeout:g} s{paused}"
                    )
                await asyncio.sleep(0.02)
        status = await self.probe(address)
        if not status.reachable:
            raise AdaptorError(address, status.error)
        return status

    async def _promote(self, address: Address, synchronous: bool) -> None:
        """pg_promote() and wait until the instance is out of recovery (a primary already: nothing to do).

        synchronous: unless the standby already names synchronous standbys, it gets
        `synchronous_standby_names = 'ANY 1 (*)'` before it is promoted, so that no commit on
        it returns before some standby has it (strict, as Patroni's synchronous_mode_strict:
        with no standby left, commits wait until one replicates from it).
        """
        timeout = self.promote_timeout
        async with self._session(address, "promote") as conn:
            if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                return
            if synchronous and not await conn.fetchval("SELECT current_setting('synchronous_standby_names')"):
                await conn.execute(f"ALTER SYSTEM SET synchronous_standby_names = {_sql_literal(SYNC_ANY)}")
                await conn.execute("SELECT pg_reload_conf()")
                deadline = time.monotonic() + self.statement_timeout
                while await conn.fetchval("SHOW synchronous_standby_names") != SYNC_ANY:
                    if time.monotonic() >= deadline:
                        raise AdaptorError(address, "promote: synchronous_standby_names did not take effect")
                    await asyncio.sleep(0.01)
            done = await conn.fetchval(
                "SELECT pg_promote(wait => true, wait_seconds => $1)", max(1, int(timeout)), timeout=timeout + 5
            )
            if not done or await conn.fetchval("SELECT pg_is_in_recovery()"):
                raise AdaptorError(address, f"promote: still in recovery after {timeout:g} s")

    async def _repoint(self, address: Address, source: Address) -> None:
        """Make a standby stream from source: primary_conninfo + reload (PostgreSQL 13+ needs no restart).

        The standby keeps its application_name (the name synchronous_standby_names and the primary
        know it by). A new timeline on source is followed because recovery_target_timeline
        defaults to 'latest'. Returns once the WAL receiver streams from source (within repoint_timeout).
        """
        timeout = self.repoint_timeout
        async with self._session(address, f"repoint to {source}") as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS in_recovery, current_setting('primary_conninfo') AS conninfo,"
                " current_setting('cluster_name') AS cluster_name"
            )
            if not row["in_recovery"]:
                raise AdaptorError(
                    address,
                    f"repoint to {source}: this is a primary; it must be rewound and restarted as a standby (rejoin)",
                )
            try:
                old = parse_conninfo(row["conninfo"])
            except ValueError:
                old = {}
            params = {k: v for k, v in old.items() if k not in _SOURCE_KEYS}
            params.update(host=source.host, port=str(source.port), user=self.replication.user)
            if self.replication.password:
                params["password"] = self.replication.password
            params["application_name"] = old.get("application_name") or row["cluster_name"] or str(address)
            await conn.execute(f"ALTER SYSTEM SET primary_conninfo = {_sql_literal(format_conninfo(params))}")
            await conn.execute("SELECT pg_reload_conf()")
            deadline = time.monotonic() + timeout
            while True:
                receiver = await conn.fetchrow(_RECEIVER_SQL)
                if (
                    receiver is not None
                    and receiver["status"] == "streaming"
                    and receiver["sender_host"] == source.host
                    and receiver["sender_port"] == source.port
                ):
                    return
                if time.monotonic() >= deadline:
                    state = "no WAL receiver" if receiver is None else f"WAL receiver {receiver['status']}"
                    raise AdaptorError(address, f"repoint to {source}: not streaming after {timeout:g} s ({state})")
                await asyncio.sleep(0.05)

    async def _set_read_only(self, address: Address, read_only: bool) -> None:
        """ALTER SYSTEM SET default_transaction_read_only + reload.

        This fences well-behaved clients only: a session may still `SET default_transaction_read_only
        = off` or `BEGIN READ WRITE`. The real fence of a returning old primary is to make it a
        standby (`rejoin`), since a standby refuses every write.
        """
        value = "on" if read_only else "off"
        async with self._session(address, f"set read_only {value}") as conn:
            await conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            await conn.execute("SELECT pg_reload_conf()")
            # The reload reaches this session asynchronously (postmaster -> SIGHUP -> next command).
            deadline = time.monotonic() + self.statement_timeout
            while await conn.fetchval("SHOW default_transaction_read_only") != value:
                if time.monotonic() >= deadline:
                    raise AdaptorError(address, f"set read_only {value}: the reload did not take effect")
                await asyncio.sleep(0.02)

    async def _rejoin(
        self,
        address: Address,
        source: Address,
        data: Path,
        run_as: str | None,
        bin_dir: str | os.PathLike[str] | None,
        application_name: str | None,
        timeout: float,
    ) -> None:
        """pg_rewind, standby.signal, primary_conninfo.

        Runs where the data directory is (the agent's job on a real host; tests run it locally),
        as the data directory's owner (`run_as` when called as root). pg_rewind (13+) first
        finishes crash recovery itself after a kill -9, needs wal_log_hints=on or data
        checksums, and logs in to source with the admin credentials. It copies source's
        configuration files too (postgresql.auto.conf included: a fence set with
        set_read_only goes). The caller starts postgres afterwards; it then streams from
        source as `application_name` (default: its address, the naming convention above).
        """
        pg_rewind = str(Path(bin_dir) / "pg_rewind") if bin_dir else "pg_rewind"
        login = {
            "host": source.host,
            "port": str(source.port),
            "user": self.credentials.user,
            "dbname": self.credentials.database or "postgres",
            "connect_timeout": str(max(1, int(self.connect_timeout))),
        }
        # pg_rewind compares timelines in the two control files, and a promoted source's records
        # its new timeline only at the checkpoint after promotion: until then pg_rewind finds
        # "the same timeline, no rewind required" and the old primary could never follow.
        async with self._session(source, "rejoin: checkpoint on the source") as conn:
            if await conn.fetchval(_CHECKPOINT_BEHIND_SQL):
                await conn.execute("CHECKPOINT", timeout=timeout)
        env = dict(os.environ)
        env.pop("PGPASSFILE", None)
        if self.credentials.password:
            env["PGPASSWORD"] = self.credentials.password  # not on the command line, where ps shows it
        try:
            proc = await asyncio.create_subprocess_exec(
                pg_rewind,
                f"--target-pgdata={data}",
                f"--source-server={format_conninfo(login)}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                cwd=data,
                user=run_as,
            )
        except OSError as exc:
            raise self.error(address, "rejoin: cannot run pg_rewind", exc) from None
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AdaptorError(address, f"rejoin: pg_rewind did not finish within {timeout:g} s") from None
        if proc.returncode != 0:
            tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-3:])
            raise AdaptorError(address, self.scrub(f"rejoin: pg_rewind exited {proc.returncode}: {tail}"))

        params = {
            "host": source.host,
            "port": str(source.port),
            "user": self.replication.user,
            "application_name": application_name or str(address),
        }
        if self.replication.password:
            params["password"] = self.replication.password
        await asyncio.to_thread(_write_standby_config, data, format_conninfo(params), run_as)


def _write_standby_config(data: Path, conninfo: str, run_as: str | None) -> None:
    # pg_rewind copied source's postgresql.auto.conf (with source's own primary_conninfo and
    # name); the last setting in the file wins, and the next ALTER SYSTEM rewrites it whole.
    with open(data / "postgresql.auto.conf", "a", encoding="utf-8") as auto:
        auto.write(f"primary_conninfo = {_sql_literal(conninfo)}\n")
    signal = data / "standby.signal"
    signal.touch()
    if run_as is not None and os.geteuid() == 0:
        account = pwd.getpwnam(run_as)
        os.chown(signal, account.pw_uid, account.pw_gid)
