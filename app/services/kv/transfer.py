"""Shard copies between replicas: a holder exports a shard at one log position in pages; a new holder fetches it."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from sortedcontainers import SortedDict

from app.bus.connection import Bus
from app.log.engine import SharedLog
from app.services.kv.machine import Held, Item, PartitionState, nbytes
from app.services.kv.wire import (
    PAGE_BYTES,
    SUBJECT_EXPORT,
    SUBJECT_PAGE,
    ExportHeader,
    ExportRequest,
    Page,
    PageRequest,
)

log = logging.getLogger("fleetmate.kv")

COPY_TTL_S = 120.0  # a copy nobody asked a page of for this long is forgotten
MAX_COPIES = 16
_enc = msgspec.msgpack.Encoder()
_header = msgspec.msgpack.Decoder(ExportHeader)
_page = msgspec.msgpack.Decoder(Page)
_export_req = msgspec.msgpack.Decoder(ExportRequest)
_page_req = msgspec.msgpack.Decoder(PageRequest)

# partition -> (its log, its machine), or None when this replica does not follow it
Partitions = Callable[[int], tuple[SharedLog[Any], PartitionState] | None]


class TransferFailed(RuntimeError):
    """A copy could not be fetched (the holder refused, went away, or the copy expired)."""


def paginate(items: list[tuple[str, Item]], page_bytes: int = PAGE_BYTES) -> list[list[tuple[str, Item]]]:
    """Cut a shard's keys into pages of about page_bytes (a page holds at least one key)."""
    pages: list[list[tuple[str, Item]]] = []
    page: list[tuple[str, Item]] = []
    size = 0
    for key, item in items:
        cost = nbytes(key) + nbytes(item.value) + 32
        if page and size + cost > page_bytes:
            pages.append(page)
            page, size = [], 0
        page.append((key, item))
        size += cost
    if page or not pages:
        pages.append(page)
    return pages


class Exporter:
    """Serves copies of the shards this replica holds."""

    def __init__(self, bus: Bus, node_id: str, partitions: Partitions) -> None:
        self.bus = bus
        self.node_id = node_id
        self.partitions = partitions
        self._copies: dict[str, tuple[float, list[list[tuple[str, Item]]]]] = {}
        self._ids = itertools.count(1)
        self._subs: list[Any] = []
        self.exported = 0

    async def start(self) -> None:
        """Answer export and page requests addressed to this replica."""
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(f"{SUBJECT_EXPORT}.{self.node_id}", cb=self._on_export),
            await nc.subscribe(f"{SUBJECT_PAGE}.{self.node_id}", cb=self._on_page),
        ]

    async def stop(self) -> None:
        """Stop answering."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be closed already
                log.debug("unsubscribe failed", extra={"error": repr(exc)})
        self._subs = []

    async def _on_export(self, msg: Msg) -> None:
        try:
            req = _export_req.decode(msg.data)
            header = await self.export(req)
        except Exception as exc:
            header = ExportHeader(False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(_enc.encode(header))

    async def export(self, req: ExportRequest) -> ExportHeader:
        """Copy a held shard once this replica has applied req.min_seq."""
        found = self.partitions(req.partition)
        if found is None:
            return ExportHeader(False, error=f"partition {req.partition} is not followed here")
        shared, state = found
        await shared.wait_applied(req.min_seq, timeout=10.0)
        held = state.held.get(req.shard)
        if held is None:
            return ExportHeader(False, error=f"shard {req.shard} is not held here")
        # Items are replaced, never changed in place, on a write: a list of them is a consistent copy.
        pages = paginate(list(held.items.items()))
        now = time.monotonic()
        for cid in [c for c, (t, _) in self._copies.items() if now - t > COPY_TTL_S]:
            del self._copies[cid]
        while len(self._copies) >= MAX_COPIES:
            del self._copies[next(iter(self._copies))]
        cid = f"{self.node_id}-{next(self._ids)}"
        self._copies[cid] = (now, pages)
        self.exported += 1
        log.info(
            "shard copy made",
            extra={"shard": req.shard, "partition": req.partition, "seq": shared.applied_seq, "keys": len(held.items)},
        )
        return ExportHeader(
            True, "", cid, shared.applied_seq, held.start, held.end, held.epoch, len(pages), len(held.items), held.size
        )

    async def _on_page(self, msg: Msg) -> None:
        try:
            req = _page_req.decode(msg.data)
            copy = self._copies.get(req.export)
            if copy is None:
                page = Page(False, error=f"copy {req.export} is gone")
            elif not 0 <= req.page < len(copy[1]):
                page = Page(False, error=f"copy {req.export} has no page {req.page}")
            else:
                self._copies[req.export] = (time.monotonic(), copy[1])
                page = Page(True, copy[1][req.page])
                if req.page == len(copy[1]) - 1:
                    del self._copies[req.export]
        except Exception as exc:
            page = Page(False, error=f"{type(exc).__name__}: {exc}")
        await msg.respond(_enc.encode(page))


async def fetch(bus: Bus, holder: str, partition: int, shard: int, min_seq: int, timeout: float = 15.0) -> Held:
    """A copy of a shard from `holder`, covering at least log position min_seq (TransferFailed if not)."""
    nc = bus.nc
    try:
        reply = await nc.request(
            f"{SUBJECT_EXPORT}.{holder}", _enc.encode(ExportRequest(partition, shard, min_seq)), timeout=timeout
        )
        header = _header.decode(reply.data)
        if not header.ok:
            raise TransferFailed(f"{holder} refused the copy of shard {shard}: {header.error}")
        items: list[tuple[str, Item]] = []
        for n in range(header.pages):
            reply = await nc.request(
                f"{SUBJECT_PAGE}.{holder}", _enc.encode(PageRequest(header.export, n)), timeout=timeout
            )
            page = _page.decode(reply.data)
            if not page.ok:
                raise TransferFailed(f"page {n} of shard {shard} from {holder}: {page.error}")
            items.extend(page.items)
    except TimeoutError as exc:
        raise TransferFailed(f"{holder} did not answer for shard {shard} in time") from exc
    except msgspec.DecodeError as exc:
        raise TransferFailed(f"{holder} sent an unreadable copy of shard {shard}: {exc}") from exc
    except Exception as exc:
        if isinstance(exc, TransferFailed):
            raise
        raise TransferFailed(f"copy of shard {shard} from {holder} failed: {exc!r}") from exc
    return Held(shard, header.start, header.end, header.epoch, SortedDict(items), since=header.seq)
