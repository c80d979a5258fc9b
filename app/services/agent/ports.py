"""Port usage: the listening TCP/UDP sockets with their processes, and a free-port finder."""

from __future__ import annotations

import errno
import socket

import psutil

from app.services.agent.messages import Family, FreePorts, ListeningPort, ListeningPorts, Proto

_PROTOS: dict[str, int] = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}


def _process_name(pid: int, cache: dict[int, str | None]) -> str | None:
    if pid not in cache:
        try:
            cache[pid] = psutil.Process(pid).name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            cache[pid] = None
    return cache[pid]


def listening_ports(protos: tuple[Proto, ...] = ("tcp", "udp")) -> ListeningPorts:
    """Every TCP socket in LISTEN and every UDP socket with no remote end, IPv4 and IPv6.

    pid and process are None where the system does not show them (other users' sockets when
    not root); the same socket held by several processes is listed once per process.
    """
    names: dict[int, str | None] = {}
    found: set[ListeningPort] = set()
    complete = True
    for proto in protos:
        if proto not in _PROTOS:
            raise ValueError(f"proto must be 'tcp' or 'udp', got {proto!r}")
        try:
            conns = psutil.net_connections(kind=proto)
        except psutil.AccessDenied:
            complete = False
            continue
        for c in conns:
            if not c.laddr:
                continue
            if proto == "tcp" and c.status != psutil.CONN_LISTEN:
                continue
            if proto == "udp" and c.raddr:
                continue
            family: Family = "ipv6" if c.family == socket.AF_INET6 else "ipv4"
            pid = c.pid
            process = _process_name(pid, names) if pid is not None else None
            found.add(ListeningPort(proto, family, c.laddr.ip, c.laddr.port, pid, process))
    ports = sorted(found, key=lambda p: (p.proto, p.port, p.family, p.address, p.pid or 0))
    return ListeningPorts(tuple(ports), complete)


def _check_range(start: int, end: int, proto: str, count: int) -> None:
    for name, value in (("start", start), ("end", end)):
        if not 1 <= value <= 65535:
            raise ValueError(f"port range {name} must be between 1 and 65535, got {value}")
    if start > end:
        raise ValueError(f"port range start {start} is greater than its end {end}")
    if proto not in _PROTOS:
        raise ValueError(f"proto must be 'tcp' or 'udp', got {proto!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return socket.has_ipv6
    except OSError:
        return False


def _bindable(port: int, kind: int, ipv6: bool) -> bool:
    """True when the port can be bound on every address, IPv4 and (if present) IPv6."""
    targets: list[tuple[socket.AddressFamily, str]] = [(socket.AF_INET, "0.0.0.0")]
    if ipv6:
        targets.append((socket.AF_INET6, "::"))
    for family, host in targets:
        # No SO_REUSEADDR: any socket on the port, on any address, makes the bind fail.
        with socket.socket(family, kind) as s:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    return False
                raise
    return True


def free_ports(start: int, end: int, proto: Proto = "tcp", count: int = 1) -> FreePorts:
    """The first `count` ports in [start, end] (inclusive) nothing is bound to, lowest first.

    A port is free when no listening socket uses it and a test bind on 0.0.0.0 (and :: where
    IPv6 exists) succeeds. Raises ValueError for a bad range, proto or count. The answer is a
    snapshot: another process may take the port before the caller does.
    """
    _check_range(start, end, proto, count)
    used = {p.port for p in listening_ports((proto,)).ports}
    kind = _PROTOS[proto]
    ipv6 = _ipv6_available()
    ports: list[int] = []
    for port in range(start, end + 1):
        if port not in used and _bindable(port, kind, ipv6):
            ports.append(port)
            if len(ports) == count:
                break
    return FreePorts(proto, start, end, count, tuple(ports))
