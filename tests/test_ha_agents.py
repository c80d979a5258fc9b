"""Which agent runs an instance: matching host:port against agents' reported sockets and interface addresses."""

from __future__ import annotations

import msgspec

from app.adaptors.types import Address
from app.services.agent.messages import (
    Interface,
    InterfaceAddress,
    ListeningPort,
    ListeningPorts,
    NetStatus,
)
from app.services.ha.agents import agents_serving


def _facts(sockets: list[tuple[str, int]], addresses: list[str]) -> dict[str, bytes]:
    ports = ListeningPorts(tuple(ListeningPort("tcp", "ipv4", host, port, 10, "postgres") for host, port in sockets))
    iface = Interface("eth0", True, 1000, 1500, tuple(InterfaceAddress("ipv4", a) for a in addresses))
    net = NetStatus((iface,), None)
    return {"ports": msgspec.json.encode(ports), "network": msgspec.json.encode(net)}


def test_exact_address_and_port() -> None:
    facts = {"db-1": _facts([("10.0.0.1", 5432)], ["10.0.0.1"]), "db-2": _facts([("10.0.0.2", 5432)], ["10.0.0.2"])}
    assert agents_serving(Address("10.0.0.2", 5432), facts) == ["db-2"]
    assert agents_serving(Address("10.0.0.2", 5433), facts) == []


def test_wildcard_socket_needs_the_address_on_an_interface() -> None:
    facts = {"db-1": _facts([("0.0.0.0", 5432)], ["10.0.0.1"]), "db-2": _facts([("::", 5432)], ["10.0.0.2"])}
    assert agents_serving(Address("10.0.0.1", 5432), facts) == ["db-1"]
    assert agents_serving(Address("10.0.0.2", 5432), facts) == ["db-2"]
    assert agents_serving(Address("10.0.0.3", 5432), facts) == []


def test_loopback_matches_every_agent_listening_there() -> None:
    facts = {"a": _facts([("127.0.0.1", 5432)], ["127.0.0.1"]), "b": _facts([("127.0.0.1", 5432)], ["127.0.0.1"])}
    assert agents_serving(Address("127.0.0.1", 5432), facts) == ["a", "b"]  # ambiguous: locate() refuses


def test_udp_missing_or_unreadable_facts_are_ignored() -> None:
    udp = ListeningPorts((ListeningPort("udp", "ipv4", "10.0.0.1", 5432),))
    facts = {
        "udp": {"ports": msgspec.json.encode(udp)},
        "none": {},
        "junk": {"ports": b"{not json"},
        "nonet": {"ports": _facts([("0.0.0.0", 5432)], [])["ports"]},
    }
    assert agents_serving(Address("10.0.0.1", 5432), facts) == []
