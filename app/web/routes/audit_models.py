"""The audit API's answer (a msgspec Struct shared by the route, the CLI and the shell) and its filters."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Literal

import msgspec

Source = Literal["ha", "node", "scheduler"]
SOURCES: tuple[Source, ...] = ("ha", "node", "scheduler")
TRACE_ID_PATTERN = r"^[0-9a-f]{32}$"
SUBJECT_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # a node id or a cluster name
MAX_LIMIT = 1000


class AuditEntry(msgspec.Struct, frozen=True):
    """One recorded decision: when, which source and subject (cluster name or node id), what, and
    the OpenTelemetry trace id of what caused it ("" for entries recorded before trace ids were kept)."""

    at: float
    source: Source
    subject: str
    kind: str
    message: str
    trace_id: str


class AuditQuery(msgspec.Struct, frozen=True):
    """The filters of one audit read; None matches anything."""

    trace_id: str | None = None
    source: Source | None = None
    subject: str | None = None
    since: float | None = None
    limit: int = 100

    def wants(self, source: Source) -> bool:
        """Whether entries from this source can match."""
        return self.source is None or self.source == source

    def matches(self, entry: AuditEntry) -> bool:
        """Whether an entry passes the trace id, subject and time filters."""
        return (
            (self.trace_id is None or entry.trace_id == self.trace_id)
            and (self.subject is None or entry.subject == self.subject)
            and (self.since is None or entry.at >= self.since)
        )


def newest(entries: Iterable[AuditEntry], query: AuditQuery) -> list[AuditEntry]:
    """The matching entries, newest first, at most query.limit of them."""
    return heapq.nlargest(
        query.limit, (e for e in entries if query.matches(e)), key=lambda e: (e.at, e.source, e.subject)
    )
