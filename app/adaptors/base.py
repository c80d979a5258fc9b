"""The engine adaptor interface: public methods here (deadlines, timing, error scrubbing), primitives per engine.

The HA service (discovery loop, analysis, recovery) and the agent talk only to this interface, as
ham4db's adaptors do; app/adaptors/registry.py finds an engine's class by name. Every method takes
the instance's Address and uses the cluster's Credentials; a failure to connect or a refused
statement raises AdaptorError with a message naming the instance (the passwords never appear in it).

An engine implements `_probe`, `_wait_applied`, `_promote`, `_repoint`, `_set_read_only` and
`_describe` (its driver's errors as text); the public methods around them are written once here.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from app.adaptors.types import Address, Credentials, Engine, InstanceStatus, Topology
from app.telemetry import tracer

log = logging.getLogger("fleetmate.adaptors")


class AdaptorError(Exception):
    """An instance could not be reached or refused a statement; the message names the instance."""

    def __init__(self, address: Address, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class Adaptor(abc.ABC):
    """What HA needs from an engine."""

    engine: ClassVar[Engine]
    # Secrets shorter than this are not scrubbed (MySQL: they would mangle ordinary words, and its
    # driver never echoes them); 1 scrubs every non-empty one.
    min_secret_length: ClassVar[int] = 1

    def __init__(
        self,
        credentials: Credentials,
        connect_timeout: float = 2.0,
        replication: Credentials | None = None,
        statement_timeout: float = 10.0,
    ) -> None:
        self.credentials = credentials
        self.connect_timeout = connect_timeout
        # What replicas log in to their source with; fleetmate's own login when not given.
        self.replication = replication or credentials
        self.statement_timeout = statement_timeout

    # --- errors ---------------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        """text with every password this adaptor holds replaced by ***."""
        for secret in {self.credentials.password, self.replication.password}:
            if secret and len(secret) >= self.min_secret_length:
                text = text.replace(secret, "***")
        return text

    def error(self, address: Address, what: str, exc: BaseException) -> AdaptorError:
        """A driver error as an AdaptorError naming the instance and the step, never a password."""
        if isinstance(exc, AdaptorError):
            return exc
        return AdaptorError(address, self.scrub(self._describe(what, exc)))

    @abc.abstractmethod
    def _describe(self, what: str, exc: BaseException) -> str:
        """A driver error (or OSError, TimeoutError) as one line saying what failed and why."""

    @contextlib.asynccontextmanager
    async def _step(self, address: Address, what: str) -> AsyncIterator[None]:
        """One change to an instance: a span, and its duration logged."""
        started = time.monotonic()
        with tracer().start_as_current_span(
            f"adaptor.{what}", attributes={"db.system": self.engine, "ha.instance": str(address)}
        ):
            try:
                yield
            finally:
                seconds = round(time.monotonic() - started, 3)
                log.debug("%s %s", what, address, extra={"engine": self.engine, "seconds": seconds})

    # --- reads ----------------------------------------------------------------------------------

    async def probe(self, address: Address) -> InstanceStatus:
        """One instance's state; an unreachable instance gives reachable=False (never raises)."""
        started = time.time()
        limit = self.connect_timeout + self.statement_timeout
        try:
            async with asyncio.timeout(limit):
                return await self._probe(address, started)
        except AdaptorError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"{address}: probe got no answer within {limit:g}s"
        except Exception as exc:  # a probe never raises: anything unexpected is its error
            error = self.scrub(f"{address}: probe failed: {type(exc).__name__}: {exc}")
        return InstanceStatus(address, self.engine, reachable=False, probed_at=started, error=error)

    async def discover(self, seed: Address, limit: int = 100) -> Topology:
        """Walk the topology from seed: each probe's source and replicas are probed in turn.

        Unreachable instances found through others are kept (reachable=False).
        """
        seen: dict[Address, InstanceStatus] = {}
        todo = [seed]
        while todo and len(seen) < limit:
            address = todo.pop()
            if address in seen:
                continue
            status = await self.probe(address)
            seen[address] = status
            neighbours = list(status.replicas)
            if status.replication is not None and status.replication.source is not None:
                neighbours.append(status.replication.source)
            todo.extend(n for n in neighbours if n not in seen)
        return Topology(self.engine, tuple(sorted(seen.values(), key=lambda s: s.address)))

    async def wait_applied(self, address: Address, timeout: float) -> InstanceStatus:
        """Wait until a replica has applied everything it received (relay log / WAL); its probe after."""
        async with self._step(address, "wait_applied"):
            return await self._wait_applied(address, timeout)

    # --- changes --------------------------------------------------------------------------------

    async def promote(self, address: Address, synchronous: bool = False) -> None:
        """Make a replica a writable primary (MySQL: stop and reset replication, read_only OFF;
        PostgreSQL: pg_promote() and wait until it is out of recovery).

        synchronous: the primary it replaces made commits wait for a replica, so the new one
        must too, from its first write (MySQL/MariaDB decide from the replica's own semi-sync
        setting; PostgreSQL sets synchronous_standby_names before promoting).
        """
        async with self._step(address, "promote"):
            await self._promote(address, synchronous)

    async def repoint(self, address: Address, source: Address) -> None:
        """Make an instance replicate from source (MySQL: GTID auto-position; PostgreSQL:
        primary_conninfo + reload) and start replication."""
        async with self._step(address, "repoint"):
            await self._repoint(address, source)

    async def set_read_only(self, address: Address, read_only: bool) -> None:
        """Refuse (or accept again) client writes on an instance."""
        async with self._step(address, "set_read_only"):
            await self._set_read_only(address, read_only)

    async def rejoin(
        self,
        address: Address,
        source: Address,
        data_dir: str | os.PathLike[str],
        *,
        run_as: str | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        application_name: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        """Turn a stopped former primary into a replica of source from its data directory, on its host
        (PostgreSQL: pg_rewind and standby.signal); the caller starts it afterwards. An engine whose
        returning primary simply replicates again (MySQL/MariaDB: `repoint`) refuses."""
        async with self._step(address, "rejoin"):
            await self._rejoin(address, source, Path(data_dir), run_as, bin_dir, application_name, timeout)

    # --- primitives, one set per engine ---------------------------------------------------------

    @abc.abstractmethod
    async def _probe(self, address: Address, started: float) -> InstanceStatus:
        """Read one reachable instance's state (AdaptorError when it cannot); the base bounds the time."""

    @abc.abstractmethod
    async def _wait_applied(self, address: Address, timeout: float) -> InstanceStatus: ...

    @abc.abstractmethod
    async def _promote(self, address: Address, synchronous: bool) -> None: ...

    @abc.abstractmethod
    async def _repoint(self, address: Address, source: Address) -> None: ...

    @abc.abstractmethod
    async def _set_read_only(self, address: Address, read_only: bool) -> None: ...

    async def _rejoin(
        self,
        address: Address,
        source: Address,
        data_dir: Path,
        run_as: str | None,
        bin_dir: str | os.PathLike[str] | None,
        application_name: str | None,
        timeout: float,
    ) -> None:
        raise AdaptorError(address, f"{self.engine} instances rejoin by repoint, not from their data directory")
