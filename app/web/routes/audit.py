"""Audit route (/api/v1/audit): every recorded decision (HA, membership, scheduler), newest first, with its trace id."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

import msgspec
from litestar import get
from litestar.handlers import BaseRouteHandler
from litestar.params import QueryParameter

from app.errors import Unavailable
from app.node import Node
from app.services.ha.errors import UnknownCluster
from app.services.ha.service import HaService
from app.services.membership.service import MembershipService
from app.services.scheduler.service import SchedulerService
from app.web.routes.audit_models import (
    MAX_LIMIT,
    SUBJECT_PATTERN,
    TRACE_ID_PATTERN,
    AuditEntry,
    AuditQuery,
    Source,
    newest,
)

log = logging.getLogger("fleetmate.web")

TraceId = Annotated[
    str | None, QueryParameter(pattern=TRACE_ID_PATTERN, description="only this trace's decisions (32 lowercase hex)")
]
SourceFilter = Annotated[Source | None, QueryParameter(description="only this source: ha, node or scheduler")]
Subject = Annotated[str | None, QueryParameter(pattern=SUBJECT_PATTERN, description="only this cluster or node id")]
Since = Annotated[float | None, QueryParameter(ge=0, description="only decisions at or after this unix time")]
Limit = Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT, description="at most this many, newest first")]
Serializable = Annotated[bool, QueryParameter(description="answer from local state without the read barrier")]


def ha_entries(ha: HaService, subject: str | None) -> Iterator[AuditEntry]:
    """Every HA history entry (of one cluster when subject is given) as an audit entry."""
    for name in ha.names() if subject is None else [subject]:
        try:
            history = ha.history(name)
        except UnknownCluster:
            continue  # no cluster by that name (the subject may be a node id)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # junk written under its history
            log.debug("unreadable HA history skipped", extra={"cluster": name, "error": str(exc)})
            continue
        for e in history:
            yield AuditEntry(e.at, "ha", name, e.kind, e.message, e.trace_id)


def node_entries(members: MembershipService, subject: str | None) -> Iterator[AuditEntry]:
    """Every node state change (of one node when subject is given) as an audit entry; kind is the new state."""
    for node_id, history in members.histories(subject).items():
        for h in history:
            message = f"{h.old or 'unknown'} -> {h.state}" + (f": {h.reason}" if h.reason else "")
            yield AuditEntry(h.at, "node", node_id, h.state, message, h.trace_id)


def scheduler_entries(sched: SchedulerService, subject: str | None) -> Iterator[AuditEntry]:
    """Every step of every procedure the scheduler keeps (of one cluster when subject is given)."""
    for p in list(sched.state.procedures.values()):
        if subject is not None and p.cluster != subject:
            continue
        shards = ",".join(str(s) for s in p.op.shards)
        for h in p.history:
            message = f"procedure {p.id} {p.op.kind} shard {shards} ({p.op.source}): {h.what}"
            yield AuditEntry(h.time_ms / 1000, "scheduler", p.cluster, p.op.kind, message, h.trace_id or p.trace_id)


def audit_routes(node: Node) -> list[BaseRouteHandler]:
    """The handler, closing over the node."""

    @get("/api/v1/audit", tags=["audit"], summary="Recorded decisions from every source, with their trace ids")
    async def audit(
        trace_id: TraceId = None,
        source: SourceFilter = None,
        subject: Subject = None,
        since: Since = None,
        limit: Limit = 100,
        serializable: Serializable = False,
    ) -> list[AuditEntry]:
        """HA detections and recovery steps (/fleet/clusters/<name>/history), node state changes
        (/fleet/nodes/<id>/history) and the scheduler's procedure steps, newest first. Each carries
        the OpenTelemetry trace id of what caused it: the HTTP request of an operator's action
        (continuing its traceparent), or the leader's round. Give that id to your tracing backend
        to see the whole trace."""
        query = AuditQuery(trace_id, source, subject, since, limit)
        members = node.membership
        if members is None and query.wants("node"):
            raise Unavailable("membership is starting")
        if not serializable and node.registry is not None:
            await node.registry.sync()
        entries: list[Iterator[AuditEntry]] = []
        if node.ha is not None and query.wants("ha"):
            entries.append(ha_entries(node.ha, subject))
        if members is not None and query.wants("node"):
            entries.append(node_entries(members, subject))
        if node.scheduler is not None and query.wants("scheduler"):
            entries.append(scheduler_entries(node.scheduler, subject))
        return newest((e for source_entries in entries for e in source_entries), query)

    return [audit]
