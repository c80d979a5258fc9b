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

# The shard scheduler's log (its data nodes' subjects are in app/services/scheduler/protocol.py).
SCHEDULER_STREAM = "FLEETMATE_SCHEDULER"
SCHEDULER_LOG = f"{PREFIX}.log.scheduler"


# KV bucket and key of the leader lease (nats backend).
LEASE_BUCKET = "fleetmate_lease"
LEASE_KEY = "leader"


def system_info(node_id: str) -> str:
    """Request subject answered by one replica's system service with its NodeInfo."""
    return f"{PREFIX}.system.{node_id}.info"


# `fleetmate agent` (one per database host). Payloads are msgspec JSON; the Structs are in
# app/services/agent/messages.py. A node id "heartbeat" or "facts" is refused: it would clash.
AGENT_SERVICE = "fleetmate-agent"
# Every agent's heartbeat (Heartbeat) and facts (NodeFacts), for a subscriber that watches all.
AGENT_HEARTBEATS = f"{PREFIX}.agent.heartbeat.*"
AGENT_FACTS = f"{PREFIX}.agent.facts.*"
# The endpoints each agent answers at fleetmate.agent.<node_id>.<endpoint>.
AGENT_ENDPOINTS = ("info", "ports", "free_ports", "scan", "clean", "net", "facts", "pg_rejoin")


def agent_heartbeat(node_id: str) -> str:
    """Subject on which agent node_id publishes a Heartbeat every membership.heartbeat_interval."""
    return f"{PREFIX}.agent.heartbeat.{node_id}"


def agent_facts(node_id: str) -> str:
    """Subject on which agent node_id publishes its NodeFacts whenever they change."""
    return f"{PREFIX}.agent.facts.{node_id}"


def agent_request(node_id: str, endpoint: str) -> str:
    """Request subject of one agent endpoint (see AGENT_ENDPOINTS)."""
    return f"{PREFIX}.agent.{node_id}.{endpoint}"
