"""Listening sockets straight from the kernel (netlink sock_diag, as `ss -l` does), without process lookups.

The agent checks its ports every heartbeat. Reading /proc/net/tcp costs the kernel a walk of
every socket (~5 ms with a few hundred TIME_WAIT entries), and a full listening_ports() also
walks every process's descriptors; a sock_diag dump filtered to LISTEN (TCP) and unconnected
(UDP) returns only those sockets. The result is a fingerprint: when it changes, the agent
runs the full scan that names the processes.
"""

from __future__ import annotations

import contextlib
import socket
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
TCP_CLOSE = 7  # an unconnected UDP socket

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBBBI48s")  # family, protocol, ext, pad, states, inet_diag_sockid (zeros: any)
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")  # inet_diag_msg up to idiag_inode

Socket = tuple[str, int, str, bytes, int]  # proto, family, local port (hex), local address, inode


def _dump(sock: socket.socket, family: int, protocol: int, states: int, seq: int) -> list[Socket]:
    body = _REQ.pack(family, protocol, 0, 0, states, b"\0" * 48)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    sock.send(header + body)
    proto = "tcp" if protocol == socket.IPPROTO_TCP else "udp"
    out: list[Socket] = []
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                raise OSError("malformed netlink message")
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                (errno,) = struct.unpack_from("=i", data, offset + _NLMSGHDR.size)
                if errno == 0:
                    return out
                raise OSError(-errno, "sock_diag dump failed")
            if kind == SOCK_DIAG_BY_FAMILY:
                f = _MSG.unpack_from(data, offset + _NLMSGHDR.size)
                fam, sport, src, inode = f[0], f[4], f[6], f[14]
                out.append((proto, fam, sport.hex(), src, inode))
            offset += (length + 3) & ~3


def listening_fingerprint() -> frozenset[Socket] | None:
    """Every TCP socket in LISTEN and every unconnected UDP socket (IPv4 and IPv6), with its inode.

    A new inode means a new socket, so a restarted server on the same port changes it too.
    None when the kernel does not offer sock_diag here (the caller then does a full scan).
    """
    found: set[Socket] = set()
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with contextlib.closing(sock):
        try:
            seq = 0
            for family in (socket.AF_INET, socket.AF_INET6):
                for protocol, state in ((socket.IPPROTO_TCP, TCP_LISTEN), (socket.IPPROTO_UDP, TCP_CLOSE)):
                    seq += 1
                    found.update(_dump(sock, family, protocol, 1 << state, seq))
        except OSError:
            return None
    return frozenset(found)
