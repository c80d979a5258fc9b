"""Every NATS subject, stream and bucket name fleetmate uses, in one place."""

from __future__ import annotations

PREFIX = "fleetmate"

# nats.micro service names (discoverable with $SRV.PING / $SRV.INFO).
SYSTEM_SERVICE = "fleetmate-system"

# KV bucket where each replica announces itself (id, addresses, version, start time).
REPLICAS_BUCKET = "fleetmate_replicas"
# Core subject on which every replica publishes its record (and a last one, seen_at 0, on leaving).
REPLICAS_ANNOUNCE = f"{PREFIX}.system.announce"


# The registry's log stream and its subject.
REGISTRY_STREAM = "FLEETMATE_REGISTRY"
REGISTRY_LOG = f"{PREFIX}.log.registry"
# Keepalives go to the leader on this subject (no queue group: every leader subscribed answers).
REGISTRY_KEEPALIVE = f"{PREFIX}.registry.keepalive"


# KV bucket and key of the leader lease (nats backend).
LEASE_BUCKET = "fleetmate_lease"
LEASE_KEY = "leader"


def system_info(node_id: str) -> str:
    """Request subject answered by one replica's system service with its NodeInfo."""
    return f"{PREFIX}.system.{node_id}.info"
