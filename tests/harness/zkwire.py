"""A tiny blocking ZooKeeper wire client for tests: raw packets kazoo cannot send (addWatch, 4lw, bad frames)."""

from __future__ import annotations

import contextlib
import socket
import struct
from typing import Any


def pack_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">i", len(raw)) + raw


def pack_buffer(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


def split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def four_letter(addr: str, word: str, timeout: float = 5) -> str:
    """Send a four-letter word and read the answer until the server closes."""
    with socket.create_connection(split_addr(addr), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks).decode()
            chunks.append(data)


class WireClient:
    """One session over one socket; requests are sent and their replies read one at a time."""

    def __init__(self, addr: str, timeout_ms: int = 10000, timeout: float = 5) -> None:
        self.sock = socket.create_connection(split_addr(addr), timeout=timeout)
        body = struct.pack(">iqiq", 0, 0, timeout_ms, 0) + pack_buffer(bytes(16)) + b"\x00"
        self.send_raw(struct.pack(">i", len(body)) + body)
        reply = self.read_frame()
        self.protocol, self.timeout_ms, self.session_id = struct.unpack_from(">iiq", reply)
        self.xid = 0
        self.notifications: list[tuple[int, int, str]] = []

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return out

    def read_frame(self) -> bytes:
        (size,) = struct.unpack(">i", self.read_exact(4))
        return self.read_exact(size)

    def request(self, op: int, body: bytes = b"") -> tuple[int, int, bytes]:
        """Send one request; return (zxid, err, body) of its reply, keeping notifications aside."""
        self.xid += 1
        packet = struct.pack(">ii", self.xid, op) + body
        self.send_raw(struct.pack(">i", len(packet)) + packet)
        while True:
            frame = self.read_frame()
            xid, zxid, err = struct.unpack_from(">iqi", frame)
            rest = frame[16:]
            if xid == -1:
                self.notifications.append(self._event(rest))
                continue
            assert xid == self.xid, (xid, self.xid)
            return zxid, err, rest

    def next_notification(self) -> tuple[int, int, str]:
        """Wait for the next watch event: (type, state, path)."""
        if self.notifications:
            return self.notifications.pop(0)
        frame = self.read_frame()
        xid = struct.unpack_from(">i", frame)[0]
        assert xid == -1, xid
        return self._event(frame[16:])

    @staticmethod
    def _event(rest: bytes) -> tuple[int, int, str]:
        etype, state, length = struct.unpack_from(">iii", rest)
        return etype, state, rest[12 : 12 + length].decode()

    def create(self, path: str, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        acl = struct.pack(">ii", 1, 31) + pack_string("world") + pack_string("anyone")
        _, err, body = self.request(1, pack_string(path) + pack_buffer(data) + acl + struct.pack(">i", flags))
        return err, body

    def set_data(self, path: str, data: bytes, version: int = -1) -> int:
        return self.request(5, pack_string(path) + pack_buffer(data) + struct.pack(">i", version))[1]

    def close(self) -> Any:
        with contextlib.suppress(ConnectionError, OSError):
            self.request(-11)
        self.sock.close()
