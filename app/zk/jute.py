"""Jute, ZooKeeper's serialization: big-endian ints and longs, length-prefixed buffers, strings and vectors."""

from __future__ import annotations

import builtins
import struct

_INT = struct.Struct(">i")
_LONG = struct.Struct(">q")
_HEADER = struct.Struct(">iqi")  # reply header: xid, zxid, err


class JuteError(ValueError):
    """A packet that does not decode: too short, a negative or oversize length, bad UTF-8."""


class Reader:
    """Reads jute values from one packet; every read checks that the bytes are there."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> builtins.int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def int(self) -> builtins.int:
        """A 32-bit signed integer."""
        end = self.pos + 4
        if end > len(self.data):
            raise JuteError("packet ends inside an int")
        (value,) = _INT.unpack_from(self.data, self.pos)
        self.pos = end
        return int(value)

    def long(self) -> builtins.int:
        """A 64-bit signed integer."""
        end = self.pos + 8
        if end > len(self.data):
            raise JuteError("packet ends inside a long")
        (value,) = _LONG.unpack_from(self.data, self.pos)
        self.pos = end
        return int(value)

    def bool(self) -> builtins.bool:
        """One byte, non-zero is true."""
        if self.pos >= len(self.data):
            raise JuteError("packet ends inside a bool")
        value = self.data[self.pos] != 0
        self.pos += 1
        return value

    def buffer(self) -> bytes | None:
        """Length-prefixed bytes; length -1 is null."""
        size = self.int()
        if size == -1:
            return None
        if size < 0 or self.pos + size > len(self.data):
            raise JuteError(f"buffer length {size} does not fit the packet")
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        return bytes(value)

    def ustring(self) -> str:
        """A length-prefixed UTF-8 string (null reads as the empty string)."""
        raw = self.buffer()
        if raw is None:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise JuteError("a string is not valid UTF-8") from None

    def count(self) -> builtins.int:
        """A vector's length (-1, null, reads as 0), checked against what the packet can hold."""
        size = self.int()
        if size == -1:
            return 0
        if size < 0 or size > self.remaining():
            raise JuteError(f"vector length {size} does not fit the packet")
        return size

    def strings(self) -> list[str]:
        """A vector of strings."""
        return [self.ustring() for _ in range(self.count())]


class Writer:
    """Builds one packet; `frame()` prefixes its length."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray(b"\0\0\0\0")  # room for the length

    def int(self, value: builtins.int) -> Writer:
        self.buf += _INT.pack(value)
        return self

    def long(self, value: builtins.int) -> Writer:
        self.buf += _LONG.pack(value)
        return self

    def bool(self, value: builtins.bool) -> Writer:
        self.buf.append(1 if value else 0)
        return self

    def buffer(self, value: bytes | None) -> Writer:
        if value is None:
            return self.int(-1)
        self.buf += _INT.pack(len(value))
        self.buf += value
        return self

    def ustring(self, value: str) -> Writer:
        return self.buffer(value.encode("utf-8"))

    def strings(self, values: list[str]) -> Writer:
        self.int(len(values))
        for value in values:
            self.ustring(value)
        return self

    def header(self, xid: builtins.int, zxid: builtins.int, err: builtins.int) -> Writer:
        """A reply header."""
        self.buf += _HEADER.pack(xid, zxid, err)
        return self

    def frame(self) -> bytes:
        """The packet with its 4-byte length in front."""
        _INT.pack_into(self.buf, 0, len(self.buf) - 4)
        return bytes(self.buf)
