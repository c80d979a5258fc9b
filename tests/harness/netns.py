"""Test harness: a network namespace joined to the root one by a veth pair, and ways to cut links out of it.

The namespace gets a /24 of its own (10.231.N.0/24, N chosen so that no address or route of the
machine is in it): the root side of the veth is .1, the namespace side .2. Further root-side
addresses (`add_root_address`) give servers in the root namespace addresses that a process in
the namespace reaches over the veth, one per server, so that one of them can be cut off alone.

Cuts act inside the namespace only; the root namespace's own traffic (a replica replicating from
a primary on the same machine) never goes through the veth and is not touched:

- `refuse(ip)`: a `prohibit` route; connects fail at once with EACCES (an `unreachable` route is
  the same with EHOSTUNREACH, and a `blackhole` route also fails at once, with EINVAL, for a local
  sender).
- `drop_from(ip)`: a policy rule `from IP blackhole` placed before the `local` table lookup, so
  that every packet from that address is discarded as it arrives; SYNs still leave, their answers
  never come back, and connects time out as they do when a host or a link is silently gone.

Requires root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip`; `unavailable()` says why not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import subprocess

SUPERNET = "10.231"  # the /16 the namespaces' /24s are taken from


def _ip_binary() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


def unavailable() -> str:
    """Why a namespace cannot be made here ('' when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if _ip_binary() is None:
        return "iproute2's `ip` is not installed"
    done = subprocess.run([_ip_binary() or "ip", "netns", "list"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"`ip netns` does not work here: {done.stderr.strip()}"
    return ""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([_ip_binary() or "ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address (as its network) and route destination of the root namespace."""
    used: list[ipaddress.IPv4Network] = []
    for line in _ip("-4", "-o", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            used.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    for table in ("main", "local"):
        for line in _ip("-4", "route", "show", "table", table).stdout.splitlines():
            words = line.split()
            target = words[1] if words and words[0] in ("local", "broadcast", "unreachable", "prohibit") else words[0]
            with contextlib.suppress(ValueError, IndexError):
                used.append(ipaddress.IPv4Network(target, strict=False))
    return used


class NetNamespace:
    """A network namespace named fmt-<tag>, joined to the root namespace by a veth pair.

    Use as a context manager (or create()/delete()); delete() also removes the root-side
    addresses, which live on the veth. Processes started in the namespace must be stopped first.
    """

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.name = f"fmt-{tag}"
        self.root_if = f"fmt{tag}r"[:15]
        self.ns_if = f"fmt{tag}n"[:15]
        self.prefix = ""  # "10.231.N", once created
        self.created = False

    # --- life cycle ------------------------------------------------------------------------

    def create(self) -> NetNamespace:
        """Make the namespace and the veth pair on a free /24; lo and the veth up on both sides."""
        used = _used_networks()
        start = os.getpid() % 200 + 20
        for n in [*range(start, 250), *range(20, start)]:
            net = ipaddress.IPv4Network(f"{SUPERNET}.{n}.0/24")
            if not any(net.overlaps(u) for u in used):
                self.prefix = f"{SUPERNET}.{n}"
                break
        else:
            raise RuntimeError(f"no free /24 in {SUPERNET}.0.0/16")
        _ip("netns", "add", self.name)
        self.created = True
        try:
            _ip("link", "add", self.root_if, "type", "veth", "peer", "name", self.ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.root_ip}/24", "dev", self.root_if)
            _ip("link", "set", self.root_if, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if)
            _ip("-n", self.name, "link", "set", self.ns_if, "up")
            # drop_from() needs its rules before the local table's lookup (priority 0): move it.
            _ip("-n", self.name, "rule", "add", "pref", "100", "lookup", "local")
            _ip("-n", self.name, "rule", "del", "pref", "0", "lookup", "local")
        except BaseException:
            self.delete()
            raise
        return self

    def delete(self) -> None:
        """Remove the veth pair (with its addresses) and the namespace; safe to call twice."""
        if not self.created:
            return
        _ip("link", "del", self.root_if, check=False)
        _ip("netns", "del", self.name, check=False)
        self.created = False

    def __enter__(self) -> NetNamespace:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # --- addresses -------------------------------------------------------------------------

    @property
    def root_ip(self) -> str:
        return f"{self.prefix}.1"

    @property
    def ns_ip(self) -> str:
        """The namespace side's address: a server bound to it in the namespace is reached there."""
        return f"{self.prefix}.2"

    def host(self, n: int) -> str:
        """Address n of the namespace's /24 (10 < n < 255 for root-side server addresses)."""
        return f"{self.prefix}.{n}"

    def add_root_address(self, address: str) -> None:
        """One more address on the root side of the veth, reachable from the namespace."""
        _ip("addr", "add", f"{address}/32", "dev", self.root_if)

    @property
    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program inside the namespace (it execs, no extra process)."""
        return [_ip_binary() or "ip", "netns", "exec", self.name]

    # --- cuts (inside the namespace) ----------------------------------------------------------

    def refuse(self, address: str) -> None:
        """Connects from the namespace to address fail at once (a prohibit route)."""
        _ip("-n", self.name, "route", "add", "prohibit", f"{address}/32")

    def unrefuse(self, address: str) -> None:
        _ip("-n", self.name, "route", "del", "prohibit", f"{address}/32")

    def drop_from(self, address: str) -> None:
        """Every packet from address is silently discarded on arrival: connects to it time out."""
        _ip("-n", self.name, "rule", "add", "pref", "10", "from", address, "blackhole")

    def undrop_from(self, address: str) -> None:
        _ip("-n", self.name, "rule", "del", "pref", "10", "from", address, "blackhole")
