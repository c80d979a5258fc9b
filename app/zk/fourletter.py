"""ZooKeeper's four-letter words on the client port (ruok, srvr, stat, mntr, conf, envi, cons, wchs, dirs)."""

from __future__ import annotations

import getpass
import os
import platform
import socket
import sys
from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

from app import __version__

if TYPE_CHECKING:
    from app.node import Node

ALL_WORDS = ("ruok", "srvr", "stat", "mntr", "conf", "envi", "cons", "wchs", "dirs")

# The ZooKeeper release whose client protocol fleetmate speaks. Clients parse the version that
# `envi`/`srvr` report (kazoo's server_version() reads the leading x.y.z to pick features), so it
# leads the string; fleetmate's own version follows, as ZooKeeper puts its build after the number.
ZOOKEEPER_PROTOCOL = "3.8.4"
VERSION = f"{ZOOKEEPER_PROTOCOL}-fleetmate-{__version__}"
BUILT = f"{VERSION}, built on fleetmate {__version__} (ZooKeeper {ZOOKEEPER_PROTOCOL} protocol)"


class ClientFacts(Protocol):
    """What cons and stat print of one connection."""

    @property
    def peer(self) -> str: ...
    @property
    def received(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def session_id(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def timeout_ms(self) -> int: ...


class ServerFacts(Protocol):
    """What the words read of the listener (ZkServer has it): its node, ports, limits and counters."""

    @property
    def node(self) -> Node: ...
    @property
    def received(self) -> int: ...
    @property
    def sent(self) -> int: ...
    @property
    def connections(self) -> Collection[ClientFacts]: ...
    @property
    def client_port(self) -> int: ...
    @property
    def secure_port(self) -> int: ...
    @property
    def max_client_cnxns(self) -> int: ...
    @property
    def max_packet(self) -> int: ...

    def latency_text(self) -> str: ...

    def latency_avg_ms(self) -> float: ...


class FourLetterWords:
    """Answers the whitelisted words; any other known word gets ZooKeeper's refusal line."""

    def __init__(self, whitelist: tuple[str, ...]) -> None:
        self.whitelist = frozenset(whitelist)
        self.known = frozenset(w.encode() for w in ALL_WORDS)

    def answer(self, word: str, server: ServerFacts) -> bytes:
        """The text to send back before closing the connection."""
        if word not in self.whitelist:
            return f"{word} is not executed because it is not in the whitelist.\n".encode()
        text: str = getattr(self, f"_{word}")(server)
        return text.encode()

    @staticmethod
    def _ruok(server: ServerFacts) -> str:
        return "imok"

    @staticmethod
    def _mode(server: ServerFacts) -> str:
        lead = server.node.leadership
        if lead is None:
            return "standalone"
        return "leader" if lead.leading else "follower"

    def _srvr(self, server: ServerFacts) -> str:
        registry = server.node.registry
        figures = registry.stats() if registry else None
        nodes = figures.nodes if figures else 0
        revision = figures.revision if figures else 0
        return (
            f"Zookeeper version: {BUILT}\n"
            f"Latency min/avg/max: {server.latency_text()}\n"
            f"Received: {server.received}\n"
            f"Sent: {server.sent}\n"
            f"Connections: {len(server.connections)}\n"
            f"Outstanding: 0\n"
            f"Zxid: 0x{revision:x}\n"
            f"Mode: {self._mode(server)}\n"
            f"Node count: {nodes}\n"
        )

    def _stat(self, server: ServerFacts) -> str:
        clients = "".join(
            f" /{c.peer}[1](queued=0,recved={c.received},sent={c.sent},sid=0x{c.session_id:x})\n"
            for c in sorted(server.connections, key=lambda c: c.started)
        )
        return self._srvr(server).replace("Latency", f"Clients:\n{clients}\nLatency", 1)

    def _cons(self, server: ServerFacts) -> str:
        return (
            "".join(
                f" /{c.peer}[1](queued=0,recved={c.received},sent={c.sent},sid=0x{c.session_id:x},to={c.timeout_ms})\n"
                for c in sorted(server.connections, key=lambda c: c.started)
            )
            + "\n"
        )

    def _mntr(self, server: ServerFacts) -> str:
        registry = server.node.registry
        figures = registry.stats() if registry else None
        rows = [
            ("zk_version", BUILT),
            ("zk_server_state", self._mode(server)),
            ("zk_avg_latency", server.latency_avg_ms()),
            ("zk_packets_received", server.received),
            ("zk_packets_sent", server.sent),
            ("zk_num_alive_connections", len(server.connections)),
            ("zk_outstanding_requests", 0),
            ("zk_znode_count", figures.nodes if figures else 0),
            ("zk_watch_count", figures.watches if figures else 0),
            ("zk_ephemerals_count", figures.ephemerals if figures else 0),
            ("zk_approximate_data_size", registry.data_bytes() if registry else 0),
            (
                "zk_open_file_descriptor_count",
                len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0,
            ),
            ("zk_zxid", figures.revision if figures else 0),
        ]
        return "".join(f"{k}\t{v}\n" for k, v in rows)

    def _conf(self, server: ServerFacts) -> str:
        cfg = server.node.cfg
        return (
            f"clientPort={server.client_port}\n"
            f"secureClientPort={server.secure_port}\n"
            f"clientPortAddress={cfg.zk.host}\n"
            f"dataDir={cfg.data_path}\n"
            f"minSessionTimeout={cfg.registry.session_timeout_min_ms}\n"
            f"maxSessionTimeout={cfg.registry.session_timeout_max_ms}\n"
            f"maxClientCnxns={server.max_client_cnxns}\n"
            f"serverId={cfg.node_id}\n"
            f"jute.maxbuffer={server.max_packet}\n"
            f"zookeeper.version={VERSION}\n"
            f"fleetmate.version={__version__}\n"
        )

    def _envi(self, server: ServerFacts) -> str:
        return (
            "Environment:\n"
            f"zookeeper.version={BUILT}\n"
            f"fleetmate.version={__version__}\n"
            f"host.name={socket.gethostname()}\n"
            f"python.version={platform.python_version()}\n"
            f"python.executable={sys.executable}\n"
            f"os.name={platform.system()}\n"
            f"os.arch={platform.machine()}\n"
            f"os.version={platform.release()}\n"
            f"user.name={getpass.getuser()}\n"
            f"user.dir={os.getcwd()}\n"
        )

    def _wchs(self, server: ServerFacts) -> str:
        registry = server.node.registry
        count = registry.stats().watches if registry else 0
        return f"{len(server.connections)} connections watching\nTotal watches:{count}\n"

    def _dirs(self, server: ServerFacts) -> str:
        path = server.node.cfg.data_path / "registry.sqlite"
        size = path.stat().st_size if path.exists() else 0
        return f"datadir_size: {size}\nlogdir_size: 0\n"
