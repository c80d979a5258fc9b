"""Which fleetmate agent runs a database instance (from the agents' reported ports and addresses), and asking it to act.

An instance is on an agent's host when the agent reports a listening TCP socket on the
instance's port bound to the instance's host address, or bound to a wildcard address
(0.0.0.0, ::) while the host address is on one of its interfaces. A loopback address matches
on every host that listens there, so it is only usable with a single such agent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import msgspec

from app.adaptors.types import Address
from app.bus import subjects
from app.bus.connection import Bus
from app.bus.micro import HandlerError, call
from app.services.agent.messages import ListeningPorts, NetStatus, PgRejoinReport, PgRejoinRequest

WILDCARDS = frozenset({"0.0.0.0", "::", "*", ""})

_ports_dec = msgspec.json.Decoder(ListeningPorts)
_net_dec = msgspec.json.Decoder(NetStatus)
_report_dec = msgspec.json.Decoder(PgRejoinReport)


class AgentCallFailed(Exception):
    """The agent could not be asked, or answered with an error (its message says which step)."""


def _host_addresses(network: bytes | None) -> set[str]:
    if not network:
        return set()
    try:
        net = _net_dec.decode(network)
    except msgspec.DecodeError:
        return set()
    return {a.address.split("%", 1)[0] for i in net.interfaces for a in i.addresses if a.family != "link"}


def agents_serving(address: Address, facts: Mapping[str, Mapping[str, bytes]]) -> list[str]:
    """The agents (node ids, sorted) whose facts show a socket serving address; facts: node -> fact -> JSON."""
    found = []
    for node, fact in facts.items():
        raw = fact.get("ports")
        if not raw:
            continue
        try:
            ports = _ports_dec.decode(raw)
        except msgspec.DecodeError:
            continue
        mine: set[str] | None = None
        for p in ports.ports:
            if p.proto != "tcp" or p.port != address.port:
                continue
            if p.address == address.host:
                found.append(node)
                break
            if p.address in WILDCARDS:
                mine = _host_addresses(fact.get("network")) if mine is None else mine
                if address.host in mine:
                    found.append(node)
                    break
    return sorted(found)


class AgentDirectory:
    """Finds the live agent that runs an instance (from what membership heard) and sends it requests."""

    def __init__(
        self,
        bus: Bus,
        heard: Callable[[], Mapping[str, tuple[float, Mapping[str, bytes]]]],
        live_within: float,
    ) -> None:
        self.bus = bus
        self.heard = heard  # node -> (when last heard, unix seconds; its facts)
        self.live_within = live_within

    def locate(self, address: Address) -> str:
        """The one live agent running address; AgentCallFailed says why there is none."""
        now = time.time()
        live = {node: facts for node, (at, facts) in self.heard().items() if now - at <= self.live_within}
        nodes = agents_serving(address, live)
        if not nodes:
            raise AgentCallFailed(f"no live fleetmate agent reports a socket at {address}")
        if len(nodes) > 1:
            raise AgentCallFailed(f"several agents report a socket at {address}: {', '.join(nodes)}")
        return nodes[0]

    async def pg_rejoin(self, node: str, request: PgRejoinRequest) -> PgRejoinReport:
        """Ask agent `node` to rewind its local former primary into a standby (waits for the whole rejoin)."""
        subject = subjects.agent_request(node, "pg_rejoin")
        try:
            reply = await call(self.bus.nc, subject, msgspec.json.encode(request), 2 * request.timeout + 30)
        except HandlerError as exc:
            raise AgentCallFailed(f"agent {node}: {exc.description}") from None
        except Exception as exc:  # timeout, no responders, connection closed
            raise AgentCallFailed(f"agent {node} did not answer: {exc!r}") from None
        return _report_dec.decode(reply)
