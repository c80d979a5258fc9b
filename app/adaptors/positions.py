"""Replication positions compared across instances: MySQL GTID sets, MariaDB GTID positions, PostgreSQL LSNs.

Each parser turns the text an adaptor reports (InstanceStatus.position, ReplicationLink's
received/applied positions) into a value with `covers(other)`: True when everything other
holds is also here. That is the question a failover asks: does this replica have every
transaction that one has (and so every acknowledged one)?
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, Protocol

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(:[^,]*)?$")


class PositionError(ValueError):
    """A position string an adaptor reported could not be parsed."""


class Position(Protocol):
    """What the recovery logic needs from a position."""

    def covers(self, other: Position) -> bool: ...

    def size(self) -> int: ...


class Lsn:
    """A PostgreSQL WAL location, e.g. '16/B374D848'."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    @classmethod
    def parse(cls, text: str) -> Lsn:
        hi, sep, lo = text.strip().partition("/")
        try:
            if not sep:
                raise ValueError
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError:
            raise PositionError(f"{text!r} is not an LSN like 16/B374D848") from None

    def covers(self, other: Position) -> bool:
        if not isinstance(other, Lsn):
            raise TypeError("an LSN compares only with an LSN")
        return self.value >= other.value

    def size(self) -> int:
        return self.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lsn) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"Lsn({self.value >> 32:X}/{self.value & 0xFFFFFFFF:X})"


class MariaDBGtidPos:
    """A MariaDB GTID position ('0-1-100,1-2-7'): per replication domain, the last GTID's server and seq_no.

    Within a domain seq_no only grows, so a position covers another when, in every domain of
    the other, its seq_no is at least as high.
    """

    __slots__ = ("domains",)

    def __init__(self, domains: Mapping[int, tuple[int, int]]) -> None:
        self.domains = dict(domains)  # domain -> (server_id, seq_no)

    @classmethod
    def parse(cls, text: str) -> MariaDBGtidPos:
        domains: dict[int, tuple[int, int]] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            pieces = part.split("-")
            if len(pieces) != 3 or not all(p.isdigit() for p in pieces):
                raise PositionError(f"{part!r} in {text!r} is not a MariaDB GTID like 0-1-100")
            domain, server, seq = (int(p) for p in pieces)
            if domain in domains:
                raise PositionError(f"domain {domain} appears twice in {text!r}")
            domains[domain] = (server, seq)
        return cls(domains)

    def covers(self, other: Position) -> bool:
        if not isinstance(other, MariaDBGtidPos):
            raise TypeError("a MariaDB GTID position compares only with another")
        return all(d in self.domains and self.domains[d][1] >= seq for d, (_, seq) in other.domains.items())

    def size(self) -> int:
        return sum(seq for _, seq in self.domains.values())

    def ahead_of(self, other: MariaDBGtidPos) -> dict[int, tuple[int, int]]:
        """Domains where this position has transactions the other lacks (errant ones, seen from a primary)."""
        return {
            d: (server, seq)
            for d, (server, seq) in self.domains.items()
            if d not in other.domains or seq > other.domains[d][1]
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MariaDBGtidPos) and other.domains == self.domains

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.domains.items())))

    def __repr__(self) -> str:
        return "MariaDBGtidPos(" + ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(self.domains.items())) + ")"


class MySQLGtidSet:
    """A MySQL GTID set ('uuid:1-5:7,uuid2:1-3', tagged 'uuid:tag:1-5' from 8.3): per source uuid (and
    tag, as 'uuid:tag'), closed intervals of transaction numbers."""

    __slots__ = ("sets",)

    def __init__(self, sets: Mapping[str, list[tuple[int, int]]]) -> None:
        self.sets = {uuid: _normalise(intervals) for uuid, intervals in sets.items() if intervals}

    @classmethod
    def parse(cls, text: str) -> MySQLGtidSet:
        sets: dict[str, list[tuple[int, int]]] = {}
        for part in filter(None, (p.strip() for p in text.replace("\n", "").split(","))):
            if not _UUID_RE.match(part):
                raise PositionError(f"{part!r} in {text!r} is not uuid:interval[:interval...]")
            uuid, *ranges = part.split(":")
            key = uuid.lower()
            intervals = sets.setdefault(key, [])
            tagged_without_interval = False
            for r in ranges:
                lo, sep, hi = r.partition("-")
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,31}", r):  # MySQL 8.3+ tagged GTIDs: uuid:tag:1-5
                    key = f"{uuid.lower()}:{r}"
                    intervals = sets.setdefault(key, [])
                    tagged_without_interval = True
                    continue
                tagged_without_interval = False
                if not lo.isdigit() or (sep and not hi.isdigit()):
                    raise PositionError(f"{r!r} in {text!r} is not a number or a range a-b")
                start, end = int(lo), int(hi) if sep else int(lo)
                if start < 1 or end < start:
                    raise PositionError(f"{r!r} in {text!r} is not a valid interval")
                intervals.append((start, end))
            if tagged_without_interval:
                raise PositionError(f"{part!r} in {text!r} has a tag without an interval")
        return cls(sets)

    def covers(self, other: Position) -> bool:
        if not isinstance(other, MySQLGtidSet):
            raise TypeError("a MySQL GTID set compares only with another")
        return not other.minus(self).sets

    def size(self) -> int:
        return sum(end - start + 1 for intervals in self.sets.values() for start, end in intervals)

    def minus(self, other: MySQLGtidSet) -> MySQLGtidSet:
        """The transactions here that other lacks."""
        out: dict[str, list[tuple[int, int]]] = {}
        for uuid, intervals in self.sets.items():
            remaining = intervals
            for o_start, o_end in other.sets.get(uuid, []):
                cut: list[tuple[int, int]] = []
                for start, end in remaining:
                    if o_end < start or o_start > end:
                        cut.append((start, end))
                        continue
                    if start < o_start:
                        cut.append((start, o_start - 1))
                    if end > o_end:
                        cut.append((o_end + 1, end))
                remaining = cut
            if remaining:
                out[uuid] = remaining
        return MySQLGtidSet(out)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MySQLGtidSet) and other.sets == self.sets

    def __hash__(self) -> int:
        return hash(tuple((u, tuple(i)) for u, i in sorted(self.sets.items())))

    def __str__(self) -> str:
        return ",".join(
            uuid + "".join(f":{s}" if s == e else f":{s}-{e}" for s, e in intervals)
            for uuid, intervals in sorted(self.sets.items())
        )

    def __repr__(self) -> str:
        return f"MySQLGtidSet({self})"


def _normalise(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def parse(engine: str, flavor: str, text: str) -> Position:
    """The position an adaptor reported: engine 'postgresql' -> Lsn; 'mysql' with flavor 'mariadb' ->
    MariaDBGtidPos, else MySQLGtidSet. An empty text is the empty position (nothing executed)."""
    if engine == "postgresql":
        return Lsn.parse(text) if text.strip() else Lsn(0)
    if flavor == "mariadb":
        return MariaDBGtidPos.parse(text)
    return MySQLGtidSet.parse(text)


def lsn_value(lsn: str) -> int:
    """A WAL position 'X/Y' (hex) as one comparable integer."""
    high, sep, low = lsn.partition("/")
    if not sep:
        raise ValueError(f"{lsn!r} is not an LSN")
    return (int(high, 16) << 32) | int(low, 16)


# --- GTID text as the MySQL adaptor reads it -------------------------------------------------------


def compact(gtids: str) -> str:
    """A GTID set without the line breaks and spaces MySQL puts after its commas."""
    return "".join(gtids.split())


def mariadb_gtids(text: str) -> dict[int, tuple[int, int]]:
    """A MariaDB GTID position ('0-1-100,1-2-7') as domain -> (server_id, seq_no); ValueError if malformed."""
    return MariaDBGtidPos.parse(compact(text)).domains


def mariadb_local_gtids(binlog_pos: str, slave_pos: str, server_id: str) -> str:
    """On a MariaDB replica: the GTIDs it wrote itself past what it replicated (errant ones), as text.

    A domain's last binlogged GTID carrying the replica's own server_id with a seq_no beyond the
    replicated position is a local write its source never had (MySQL needs the source's
    gtid_executed for this, so there the HA service compares the two).
    """
    applied = mariadb_gtids(slave_pos)
    own = int(server_id) if server_id.isdigit() else -1
    found = [
        f"{domain}-{server}-{seq}"
        for domain, (server, seq) in sorted(mariadb_gtids(binlog_pos).items())
        if server == own and seq > applied.get(domain, (0, 0))[1]
    ]
    return ",".join(found)


def mysql_gtids(text: str) -> dict[str, list[tuple[int, int]]]:
    """A MySQL GTID set ('uuid:1-5:7,uuid2[:tag]:1-3') as source -> merged closed intervals."""
    return MySQLGtidSet.parse(compact(text)).sets


def gtid_covers(flavor: Literal["mariadb", "mysql"], have: str, want: str) -> bool:
    """Whether position `have` contains every transaction of position `want`."""
    if flavor == "mariadb":
        return MariaDBGtidPos.parse(compact(have)).covers(MariaDBGtidPos.parse(compact(want)))
    return MySQLGtidSet.parse(compact(have)).covers(MySQLGtidSet.parse(compact(want)))
