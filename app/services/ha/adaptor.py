"""The engine adaptor contract: one implementation per engine (mysql.py, postgresql.py), one interface.

The HA service (discovery loop, analysis, recovery) talks only to this interface, as ham4db's
adaptors do. Every method takes the instance's Address and uses the cluster's Credentials;
a failure to connect or a refused statement raises AdaptorError with a message naming the
instance (the credentials never appear in it).
"""

from __future__ import annotations

import abc

from app.services.ha.messages import Address, Credentials, Engine, InstanceStatus, Topology


class AdaptorError(Exception):
    """An instance could not be reached or refused a statement; the message names the instance."""

    def __init__(self, address: Address, message: str) -> None:
        super().__init__(f"{address}: {message}")
        self.address = address


class Adaptor(abc.ABC):
    """What HA needs from an engine."""

    engine: Engine

    def __init__(self, credentials: Credentials, connect_timeout: float = 2.0) -> None:
        self.credentials = credentials
        self.connect_timeout = connect_timeout

    @abc.abstractmethod
    async def probe(self, address: Address) -> InstanceStatus:
        """One instance's state; an unreachable instance gives reachable=False (never raises)."""

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

    @abc.abstractmethod
    async def wait_applied(self, address: Address, timeout: float) -> InstanceStatus:
        """Wait until a replica has applied everything it received (relay log / WAL); its probe after."""

    @abc.abstractmethod
    async def promote(self, address: Address, synchronous: bool = False) -> None:
        """Make a replica a writable primary (MySQL: stop and reset replication, read_only OFF;
        PostgreSQL: pg_promote() and wait until it is out of recovery).

        synchronous: the primary it replaces made commits wait for a replica, so the new one
        must too, from its first write (MySQL/MariaDB decide from the replica's own semi-sync
        setting; PostgreSQL sets synchronous_standby_names before promoting).
        """

    @abc.abstractmethod
    async def repoint(self, address: Address, source: Address) -> None:
        """Make an instance replicate from source (MySQL: GTID auto-position; PostgreSQL:
        primary_conninfo + reload) and start replication."""

    @abc.abstractmethod
    async def set_read_only(self, address: Address, read_only: bool) -> None:
        """Refuse (or accept again) client writes on an instance."""
