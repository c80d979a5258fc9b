"""Lease backends by name (the `lease.backend` config key): a new backend is a module plus one entry."""

from __future__ import annotations

from collections.abc import Callable

from app.bus import subjects
from app.bus.connection import Bus
from app.config import Config
from app.log.lease.base import LeaseBackend
from app.log.lease.nats import NatsLease
from app.log.lease.s3 import S3Lease
from app.log.lease.sql import SqlLease

Factory = Callable[[Config, Bus, int], LeaseBackend]

BACKENDS: dict[str, Factory] = {
    NatsLease.name: lambda cfg, bus, replicas: NatsLease(
        bus, subjects.LEASE_BUCKET, subjects.LEASE_KEY, cfg.lease.ttl, replicas
    ),
    SqlLease.name: lambda cfg, bus, replicas: SqlLease(
        cfg.sql.dsn, cfg.sql.table_prefix, cfg.lease.name, cfg.lease.ttl
    ),
    S3Lease.name: lambda cfg, bus, replicas: S3Lease(cfg.s3, cfg.lease.name, cfg.lease.ttl),
}


def create(cfg: Config, bus: Bus, replicas: int) -> LeaseBackend:
    """The backend named by `lease.backend`."""
    return BACKENDS[cfg.lease.backend](cfg, bus, replicas)
