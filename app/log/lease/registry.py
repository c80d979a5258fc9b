"""Lease backends by name (the `lease.backend` config key): a new backend is a module plus one entry."""

from __future__ import annotations

from collections.abc import Callable

from app.bus import subjects
from app.bus.connection import Bus
from app.config import LeaseConfig
from app.log.lease.base import LeaseBackend
from app.log.lease.nats import NatsLease

Factory = Callable[[LeaseConfig, Bus, int], LeaseBackend]

BACKENDS: dict[str, Factory] = {
    NatsLease.name: lambda cfg, bus, replicas: NatsLease(
        bus, subjects.LEASE_BUCKET, subjects.LEASE_KEY, cfg.ttl, replicas
    ),
}


def create(cfg: LeaseConfig, bus: Bus, replicas: int) -> LeaseBackend:
    """The configured backend."""
    return BACKENDS[cfg.backend](cfg, bus, replicas)
