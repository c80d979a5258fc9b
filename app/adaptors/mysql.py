"""The MySQL 8 / MariaDB 10.6+ adaptor (asyncmy): probes, GTID waits, promotion, repointing, read_only.

Both flavors use GTID replication; the flavor is read from @@version on every connection:

- MariaDB: SHOW SLAVE STATUS / SHOW SLAVE HOSTS, positions in gtid_current_pos (executed),
  gtid_slave_pos (applied by the SQL thread) and Gtid_IO_Pos (received), MASTER_USE_GTID=slave_pos,
  MASTER_GTID_WAIT, server identity @@server_id.
- MySQL 8.0.23+: SHOW REPLICA STATUS / SHOW REPLICAS, gtid_executed, Retrieved_Gtid_Set,
  CHANGE REPLICATION SOURCE TO ... SOURCE_AUTO_POSITION=1, WAIT_FOR_EXECUTED_GTID_SET,
  server identity @@server_uuid, super_read_only.

MySQL's column and variable names (Source_*, Replica_*, rpl_semi_sync_source_*) are renamed to
MariaDB's (Master_*, Slave_*, rpl_semi_sync_master_*) as they are read, so one code path reads both.

Semi-sync follows the role: promote() turns the master side on for a replica that had the slave
side on (so the new primary's commits again wait for an acknowledgement), and repoint() turns the
master side off on an instance that becomes a replica (with rpl_semi_sync_master_wait_no_slave, a
master side with no semi-sync replica of its own would hold each commit for the whole timeout).
A chained (intermediate) semi-sync primary is not supported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from app.adaptors._mysql import Row, Session
from app.adaptors._mysql import text as _text
from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.positions import compact, gtid_covers, mariadb_local_gtids
from app.adaptors.types import Address, Credentials, Engine, InstanceStatus, ReplicationLink, Role

_CANNOT_CONNECT = (2002, 2003, 2005)  # CR_CONNECTION_ERROR, CR_CONN_HOST_ERROR, CR_UNKNOWN_HOST
_CONNECTION_LOST = (2006, 2013, 2055)  # CR_SERVER_GONE_ERROR, CR_SERVER_LOST, CR_SERVER_LOST_EXTENDED
_OUT_OF_ORDER = 1950  # MariaDB ER_GTID_STRICT_OUT_OF_ORDER: a GTID behind this server's own in its domain
_SOURCE_REFUSED = 1236  # ER_MASTER_FATAL_ERROR_READING_BINLOG: the source cannot serve the asked position

_VARIABLES = (
    "version",
    "server_id",
    "server_uuid",
    "read_only",
    "super_read_only",
    "gtid_current_pos",
    "gtid_binlog_pos",
    "gtid_slave_pos",
    "gtid_strict_mode",
    "gtid_executed",
    "gtid_mode",
    "log_bin",
    "log_slave_updates",
    "log_replica_updates",
    "binlog_format",
    "report_host",
    "report_port",
    "hostname",
    "port",
)


def _link_error(row: Row) -> str:
    errors = []
    for side in ("IO", "SQL"):
        code, text = _text(row.get(f"Last_{side}_Errno")), _text(row.get(f"Last_{side}_Error"))
        if text:
            errors.append(f"{side} error {code}: {text}")
    return "; ".join(errors)


class MySQLAdaptor(Adaptor):
    """MySQL 8.0.23+ and MariaDB 10.6+ with GTID replication, through asyncmy."""

    engine: ClassVar[Engine] = "mysql"
    min_secret_length = 4

    def __init__(
        self,
        credentials: Credentials,
        connect_timeout: float = 2.0,
        replication: Credentials | None = None,
        statement_timeout: float = 10.0,
        repoint_timeout: float = 10.0,
    ) -> None:
        # replication: what replicas log in to their source with (CHANGE MASTER TO MASTER_USER/PASSWORD).
        super().__init__(credentials, connect_timeout, replication, statement_timeout)
        self.repoint_timeout = repoint_timeout

    def _describe(self, what: str, exc: BaseException) -> str:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        text = _text(exc.args[1]) if len(exc.args) > 1 else str(exc) or type(exc).__name__
        if code == 1045:
            return f"access denied for user {self.credentials.user!r}: check the credentials ({text})"
        if code in _CANNOT_CONNECT or (code is None and isinstance(exc, OSError)):
            return f"cannot connect: {text}"
        if code in _CONNECTION_LOST:
            return f"connection lost during {what}: {text}"
        return f"{what} failed: ({code}) {text}" if code else f"{what} failed: {text}"

    # --- connections -------------------------------------------------------------------------

    @asynccontextmanager
    async def _session(self, address: Address) -> AsyncIterator[Session]:
        import asyncmy
        from asyncmy import errors

        conn: Any = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                conn = await asyncmy.connect(
                    host=address.host,
                    port=address.port,
                    user=self.credentials.user,
                    password=self.credentials.password,
                    db=self.credentials.database or None,
                    autocommit=True,
                    # Our own timeout above fires first, with a clearer message.
                    connect_timeout=self.connect_timeout + 1,
                    charset="utf8mb4",
                )
                version = ""
                async with conn.cursor() as cur:
                    await cur.execute("SELECT @@version")
                    row = await cur.fetchone()
                    version = _text(row[0]) if row else ""
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise AdaptorError(address, f"cannot connect: no answer within {self.connect_timeout:g}s") from None
        except (errors.MySQLError, OSError) as exc:
            if conn is not None:
                conn.close()
            raise self.error(address, "connect", exc) from None
        try:
            yield Session(conn, address, "mariadb" if "mariadb" in version.lower() else "mysql", self)
        finally:
            conn.close()

    # --- probe ---------------------------------------------------------------------------------

    async def _probe(self, address: Address, started: float) -> InstanceStatus:
        async with self._session(address) as session:
            return await self._read_status(session, started)

    async def _read_status(self, s: Session, started: float) -> InstanceStatus:
        var = await s.variables(_VARIABLES)
        semi_vars, semi_status = await s.semi_sync()
        row = await s.replica_status()
        hosts = await s.replica_hosts()

        extra: dict[str, str] = {"flavor": s.flavor}
        if s.mariadb:
            position = var.get("gtid_current_pos", "")
            server_id = var.get("server_id", "")
            read_only = var.get("read_only", "OFF") != "OFF"
            for name in ("gtid_binlog_pos", "gtid_slave_pos", "gtid_strict_mode"):
                if name in var:
                    extra[name] = var[name]
        else:
            position = compact(var.get("gtid_executed", ""))
            server_id = var.get("server_uuid", "")
            read_only = var.get("read_only", "OFF") != "OFF" or var.get("super_read_only", "OFF") != "OFF"
            extra["server_id"] = var.get("server_id", "")
            for name in ("gtid_mode", "super_read_only"):
                if name in var:
                    extra[name] = var[name]
        for name in ("log_bin", "log_slave_updates", "binlog_format", "report_host", "report_port", "hostname"):
            if var.get(name):
                extra[name] = var[name]

        link = None
        if row is not None:
            lag = row.get("Seconds_Behind_Master")
            link = ReplicationLink(
                source=Address(_text(row["Master_Host"]), int(row.get("Master_Port") or 3306)),
                receiving=_text(row.get("Slave_IO_Running")) == "Yes",
                applying=_text(row.get("Slave_SQL_Running")) == "Yes",
                last_error=self.scrub(_link_error(row)),
                lag_seconds=None if lag is None or _text(lag) == "" else float(lag),
                received_position=compact(_text(row.get("Gtid_IO_Pos" if s.mariadb else "Retrieved_Gtid_Set"))),
                applied_position=(
                    var.get("gtid_slave_pos", "") if s.mariadb else compact(_text(row.get("Executed_Gtid_Set")))
                ),
            )
            extra["io_state"] = _text(row.get("Slave_IO_State"))
            extra["sql_state"] = _text(row.get("Slave_SQL_Running_State"))
            extra["auto_position"] = _text(row.get("Using_Gtid" if s.mariadb else "Auto_Position"))
            if s.mariadb:
                errant = mariadb_local_gtids(var.get("gtid_binlog_pos", ""), var.get("gtid_slave_pos", ""), server_id)
                if errant:
                    extra["errant_gtids"] = errant

        replicas = []
        unreported = 0
        for host in hosts:
            name, port = _text(host.get("Host")), _text(host.get("Port"))
            if name and port.isdigit() and int(port) > 0:
                replicas.append(Address(name, int(port)))
            else:
                unreported += 1  # a replica without report_host: connected, but its address is unknown
        if unreported:
            extra["unreported_replicas"] = str(unreported)

        master_enabled = semi_vars.get("rpl_semi_sync_master_enabled", "OFF") == "ON"
        master_active = semi_status.get("Rpl_semi_sync_master_status", "OFF") == "ON"
        for key, value in (
            ("semi_sync_master_enabled", semi_vars.get("rpl_semi_sync_master_enabled")),
            ("semi_sync_master_status", semi_status.get("Rpl_semi_sync_master_status")),
            ("semi_sync_master_clients", semi_status.get("Rpl_semi_sync_master_clients")),
            ("semi_sync_master_timeout_ms", semi_vars.get("rpl_semi_sync_master_timeout")),
            ("semi_sync_master_wait_point", semi_vars.get("rpl_semi_sync_master_wait_point")),
            ("semi_sync_slave_enabled", semi_vars.get("rpl_semi_sync_slave_enabled")),
            ("semi_sync_slave_status", semi_status.get("Rpl_semi_sync_slave_status")),
        ):
            if value is not None:
                extra[key] = value

        role: Role = "replica" if link is not None else "primary"
        return InstanceStatus(
            address=s.address,
            engine=self.engine,
            reachable=True,
            probed_at=started,
            role=role,
            server_id=server_id,
            version=var.get("version", ""),
            read_only=read_only,
            position=position,
            replication=link,
            replicas=tuple(sorted(set(replicas))),
            # Only a primary's commits wait for acknowledgements; enabled but fallen back to
            # asynchronous (status OFF) does not count.
            sync_replication=role == "primary" and master_enabled and master_active,
            extra=extra,
        )

    # --- waiting, promotion, repointing ---------------------------------------------------------

    async def _wait_applied(self, address: Address, timeout: float) -> InstanceStatus:
        deadline = time.monotonic() + timeout
        async with self._session(address) as s:
            row = await s.replica_status()
            if row is not None:
                received = compact(_text(row.get("Gtid_IO_Pos" if s.mariadb else "Retrieved_Gtid_Set")))
                if received:
                    await self._wait_position(s, received, deadline, timeout)
        return await self.probe(address)

    async def _wait_position(self, s: Session, received: str, deadline: float, timeout: float) -> None:
        # Short waits in a loop rather than one long one, so that a stopped SQL thread (which
        # would never get there) is reported at once with its error.
        wait = "SELECT MASTER_GTID_WAIT(%s, %s)" if s.mariadb else "SELECT WAIT_FOR_EXECUTED_GTID_SET(%s, %s)"
        while True:
            left = deadline - time.monotonic()
            step = max(0.01, min(0.25, left))  # MySQL may read 0 as no timeout at all
            result = await s.value(wait, (received, step), timeout=self.statement_timeout + step)
            if result == "0":
                return
            row = await s.replica_status()
            if row is None:
                raise AdaptorError(s.address, "replication was reset while waiting for the relay log to be applied")
            if _text(row.get("Slave_SQL_Running")) != "Yes":
                why = _link_error(row) or "the SQL thread is stopped"
                raise AdaptorError(s.address, self.scrub(f"cannot apply the relay log up to {received}: {why}"))
            if left <= 0:
                raise AdaptorError(
                    s.address, f"relay log not applied within {timeout:g}s (received {received}, still applying)"
                )

    async def _promote(self, address: Address, synchronous: bool) -> None:
        async with self._session(address) as s:
            var = await s.variables(("log_bin", "log_slave_updates", "gtid_mode"))
            if var.get("log_bin") != "ON":
                raise AdaptorError(
                    address, "cannot promote: the binary log is off (log_bin), replicas could not follow"
                )
            if s.mariadb and var.get("log_slave_updates") != "ON":
                raise AdaptorError(
                    address,
                    "cannot promote: log_slave_updates is OFF, so its binary log lacks the replicated "
                    "transactions that replicas repointed to it would need",
                )
            if not s.mariadb and var.get("gtid_mode") != "ON":
                raise AdaptorError(address, f"cannot promote: gtid_mode is {var.get('gtid_mode', '?')}, not ON")
            semi_vars, _ = await s.semi_sync()
            await s.stop_replication()
            if s.mariadb:
                await self._check_binlog_covers_applied(s)
            await s.execute("RESET SLAVE ALL" if s.mariadb else "RESET REPLICA ALL")
            if (
                semi_vars.get("rpl_semi_sync_slave_enabled") == "ON"
                and semi_vars.get("rpl_semi_sync_master_enabled") == "OFF"
            ):
                # A semi-sync replica becomes a semi-sync primary, before it takes any write:
                # commits keep waiting for a replica's acknowledgement, so the next failover
                # again loses nothing acknowledged. (Off on replicas: with wait_no_slave a
                # master side without replicas would hold every commit for its whole timeout.)
                await s.execute(f"SET GLOBAL {s.real_names['rpl_semi_sync_master_enabled']} = ON")
            await self._apply_read_only(s, False)

    async def _check_binlog_covers_applied(self, s: Session) -> None:
        # With gtid_strict_mode, a new primary's own transactions must continue each domain's
        # sequence after everything it applied: its binlog has to hold what it applied, or the
        # replicas repointed to it would be refused. log_slave_updates gives that; this checks it.
        var = await s.variables(("gtid_binlog_pos", "gtid_slave_pos"))
        binlog, applied = var.get("gtid_binlog_pos", ""), var.get("gtid_slave_pos", "")
        if not gtid_covers("mariadb", binlog, applied):
            await s.start_replication()
            raise AdaptorError(
                s.address,
                f"cannot promote: its binary log ({binlog or 'empty'}) lacks applied transactions "
                f"({applied}); replication restarted",
            )

    async def _repoint(self, address: Address, source: Address) -> None:
        if address == source:
            raise AdaptorError(address, "cannot replicate from itself")
        repl = self.replication
        async with self._session(address) as s:
            semi_vars, _ = await s.semi_sync()
            await s.stop_replication()
            if semi_vars.get("rpl_semi_sync_master_enabled") == "ON":
                # A primary becoming a replica: its master side off (see the module docstring).
                await s.execute(f"SET GLOBAL {s.real_names['rpl_semi_sync_master_enabled']} = OFF")
            if s.mariadb:
                # A former primary never replicated: its own transactions are in gtid_binlog_pos,
                # not gtid_slave_pos. Starting from gtid_current_pos (the binlog's GTID for its own
                # server_id, the slave position otherwise) neither re-applies nor skips anything;
                # a transaction the new source lacks (errant) makes the source refuse the position.
                current = await s.value("SELECT @@GLOBAL.gtid_current_pos")
                await s.execute("SET GLOBAL gtid_slave_pos = %s", (current,))
                await s.execute(
                    # MASTER_CONNECT_RETRY: after RESET SLAVE ALL it is back to 60 s, so one failed
                    # first attempt (a source still finishing its promotion) cost a minute.
                    "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s, MASTER_USER=%s, MASTER_PASSWORD=%s, "
                    "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
                    (source.host, source.port, repl.user, repl.password),
                )
            else:
                # GET_SOURCE_PUBLIC_KEY: caching_sha2_password over a connection without TLS.
                await s.execute(
                    "CHANGE REPLICATION SOURCE TO SOURCE_HOST=%s, SOURCE_PORT=%s, SOURCE_USER=%s, "
                    "SOURCE_PASSWORD=%s, SOURCE_AUTO_POSITION=1, GET_SOURCE_PUBLIC_KEY=1, SOURCE_CONNECT_RETRY=1",
                    (source.host, source.port, repl.user, repl.password),
                )
            await s.start_replication()
            await self._verify_connected(s, source)

    async def _verify_connected(self, s: Session, source: Address) -> None:
        """Wait until both threads run and the source has started sending its binlog (which it does
        only after accepting our GTID position); an error or the deadline raises AdaptorError."""
        deadline = time.monotonic() + self.repoint_timeout
        confirmed = 0
        while True:
            row = await s.replica_status()
            if row is None:
                raise AdaptorError(s.address, "replication configuration vanished after START SLAVE")
            io, sql = _text(row.get("Slave_IO_Running")), _text(row.get("Slave_SQL_Running"))
            error = self.scrub(_link_error(row))
            if io == "No" or sql == "No":
                hint = ""
                if _text(row.get("Last_IO_Errno")) == str(_SOURCE_REFUSED):
                    hint = (
                        " (the source cannot serve this instance's GTID position: it has transactions the "
                        "source lacks, errant GTIDs, or the source purged binlogs it needs)"
                    )
                elif s.mariadb and _text(row.get("Last_SQL_Errno")) == str(_OUT_OF_ORDER):
                    hint = " (gtid_strict_mode: this instance has transactions its source lacks, errant GTIDs)"
                raise AdaptorError(s.address, f"replication from {source} stopped: {error or 'no error given'}{hint}")
            if _text(row.get("Last_IO_Errno")) == "1045":
                # The source refuses the replication user: retrying will not help.
                raise AdaptorError(
                    s.address,
                    f"replication from {source} refused the replication user {self.replication.user!r} "
                    f"(check the replication credentials): {error}; it stays configured and keeps retrying",
                )
            # The source sends a (fake) rotate event naming its binlog file once it accepts the
            # position; seen twice in a row, the connection is established, not just attempted.
            if io == "Yes" and sql == "Yes" and _text(row.get("Master_Log_File")):
                confirmed += 1
                if confirmed >= 2:
                    return
            else:
                confirmed = 0
            if time.monotonic() > deadline:
                raise AdaptorError(
                    s.address,
                    f"replication from {source} not running after {self.repoint_timeout:g}s "
                    f"(IO thread {io or '?'}, SQL thread {sql or '?'}{': ' + error if error else ''}); "
                    "it stays configured and keeps retrying",
                )
            await asyncio.sleep(0.05)

    async def _set_read_only(self, address: Address, read_only: bool) -> None:
        async with self._session(address) as s:
            await self._apply_read_only(s, read_only)

    async def _apply_read_only(self, s: Session, read_only: bool) -> None:
        # Turning read_only on waits for running writes and table locks: bound that wait
        # (lock_wait_timeout, seconds) rather than the server's default of a year.
        await s.execute("SET SESSION lock_wait_timeout = %s", (max(1, int(self.statement_timeout)),))
        if s.mariadb:
            await s.execute("SET GLOBAL read_only = %s", ("ON" if read_only else "OFF",))
        elif read_only:
            await s.execute("SET GLOBAL super_read_only = ON")  # implies read_only
        else:
            await s.execute("SET GLOBAL super_read_only = OFF")
            await s.execute("SET GLOBAL read_only = OFF")
