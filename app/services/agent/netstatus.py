"""Network status: interfaces and addresses, the client-facing IP, and TCP reachability with round-trip times."""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import time
from collections.abc import Sequence
from typing import Literal

import psutil

from app.services.agent.messages import ClientAddress, Interface, InterfaceAddress, NetStatus, Reachability, Target


def _family(family: int) -> Literal["ipv4", "ipv6", "link"] | None:
    if family == socket.AF_INET:
        return "ipv4"
    if family == socket.AF_INET6:
        return "ipv6"
    if family == psutil.AF_LINK:
        return "link"
    return None


def interfaces() -> tuple[Interface, ...]:
    """Every network interface with its state, speed (Mbit/s, 0 if unknown), MTU and addresses."""
    stats = psutil.net_if_stats()
    addrs = psutil.net_if_addrs()
    out: list[Interface] = []
    for name in sorted(set(stats) | set(addrs)):
        st = stats.get(name)
        rows: list[InterfaceAddress] = []
        for a in addrs.get(name, []):
            fam = _family(a.family)
            if fam is not None:
                rows.append(InterfaceAddress(fam, a.address, a.netmask, a.broadcast))
        out.append(
            Interface(
                name=name,
                is_up=bool(st and st.isup),
                speed_mbps=st.speed if st else 0,
                mtu=st.mtu if st else 0,
                addresses=tuple(rows),
            )
        )
    return tuple(out)


def _owner(ip: str) -> str | None:
    """The interface holding this address, if any."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return str(name)
    return None


def interface_ip(name: str) -> ClientAddress:
    """The address of a named interface: its first IPv4, else its first non-link-local IPv6."""
    addrs = psutil.net_if_addrs().get(name)
    if addrs is None:
        raise ValueError(f"no network interface named {name!r}")
    v4 = [a.address for a in addrs if a.family == socket.AF_INET]
    v6 = [
        a.address
        for a in addrs
        if a.family == socket.AF_INET6 and not ipaddress.ip_address(a.address.split("%")[0]).is_link_local
    ]
    if not v4 and not v6:
        raise ValueError(f"network interface {name!r} has no IP address")
    return ClientAddress((v4 or v6)[0], "interface", name)


def route_ip(host: str, port: int = 9) -> ClientAddress:
    """The source address the kernel picks to reach host: a UDP connect sets the route, sends nothing."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.connect(addr)
        ip = str(s.getsockname()[0]).split("%")[0]
    return ClientAddress(ip, "route", _owner(ip), host)


def probe(targets: Sequence[Target], timeout: float = 2.0) -> tuple[Reachability, ...]:
    """TCP-connect to every target at once; rtt_ms is the connect time, errors are reported by name.

    Each target's first resolved address is tried; all finish within about `timeout` seconds.
    """
    results: list[Reachability | None] = [None] * len(targets)
    pending: dict[socket.socket, tuple[int, float, str]] = {}
    sel = selectors.DefaultSelector()
    try:
        for i, t in enumerate(targets):
            try:
                family, kind, proto, _, addr = socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM)[0]
            except socket.gaierror as e:
                results[i] = Reachability(t.host, t.port, False, error=f"cannot resolve {t.host!r}: {e.strerror}")
                continue
            s = socket.socket(family, kind, proto)
            s.setblocking(False)
            start = time.perf_counter()
            err = s.connect_ex(addr)
            if err in (0, errno.EINPROGRESS):
                sel.register(s, selectors.EVENT_WRITE, s)
                pending[s] = (i, start, str(addr[0]))
            else:
                s.close()
                results[i] = Reachability(t.host, t.port, False, address=str(addr[0]), error=os.strerror(err))
        deadline = time.perf_counter() + timeout
        while pending:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            for key, _ in sel.select(left):
                s = key.data
                i, start, ip = pending.pop(s)
                rtt = (time.perf_counter() - start) * 1000.0
                sel.unregister(s)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                s.close()
                t = targets[i]
                if err == 0:
                    results[i] = Reachability(t.host, t.port, True, rtt_ms=round(rtt, 3), address=ip)
                else:
                    results[i] = Reachability(t.host, t.port, False, address=ip, error=os.strerror(err))
        for i, _, ip in pending.values():
            t = targets[i]
            results[i] = Reachability(t.host, t.port, False, address=ip, error=f"timed out after {timeout:g} s")
    finally:
        for s in pending:
            s.close()
        sel.close()
    return tuple(r for r in results if r is not None)


def net_status(
    interface: str | None = None,
    route_to: str | None = None,
    targets: Sequence[Target] = (),
    timeout: float = 2.0,
) -> NetStatus:
    """Interfaces, the client-facing address and reachability of targets, in one report.

    The client address comes from `interface` if named, else the route to `route_to`, else the
    route to the first target; when none is given, or it cannot be found, client is None and
    error says why.
    """
    client: ClientAddress | None = None
    error: str | None = None
    host = route_to or (targets[0].host if targets else None)
    try:
        if interface is not None:
            client = interface_ip(interface)
        elif host is not None:
            client = route_ip(host)
    except (ValueError, OSError) as e:
        error = f"client address: {e}"
    return NetStatus(interfaces(), client, probe(targets, timeout), error)
