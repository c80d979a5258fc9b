"""What KV replicas say to each other over NATS: forwarded requests and shard copies (msgpack bodies).

Subjects:
- `fleetmate.kv.req.<node>` (request): KvRequest -> KvReply. A replica that does not hold a key's
  shard forwards the request to one that does (one hop: a forwarded request is never forwarded again).
- `fleetmate.kv.watch.<node>` (request): WatchOpen -> WatchOpened, then WatchBatch messages on the
  gateway's inbox, numbered, a heartbeat each second; `fleetmate.kv.watchkeep.<node>` (publish):
  WatchKeep every 2 s keeps the gateway's watches there alive (app/services/kv/watch_source.py).
- `fleetmate.kv.export.<node>` (request): ExportRequest -> ExportHeader, then `fleetmate.kv.page.<node>`
  (request): PageRequest -> Page: a copy of one shard at one log position, in pages, for a replica
  that is to hold it.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from app.services.kv.machine import Item
from app.services.kv.messages import KeyEvent

SUBJECT_REQ = "fleetmate.kv.req"  # .<node>
SUBJECT_EXPORT = "fleetmate.kv.export"  # .<node>
SUBJECT_PAGE = "fleetmate.kv.page"  # .<node>
SUBJECT_WATCH = "fleetmate.kv.watch"  # .<node>
SUBJECT_WATCH_KEEP = "fleetmate.kv.watchkeep"  # .<node>
PAGE_BYTES = 512 << 10  # a copy's page holds about this much (one key and value may pass it)

Op = Literal["put", "get", "delete", "batch", "scan"]


class BatchOp(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One write of an atomic batch: put `value`, or delete when `delete` is true."""

    key: str
    value: str = ""
    delete: bool = False


class BatchCheck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A batch's condition: `key` is at `revision` (0: it does not exist)."""

    key: str
    revision: int


class KvRequest(msgspec.Struct, frozen=True):
    """One KV operation, as a gateway hands it to a replica that holds the key's shard."""

    op: Op
    key: str = ""
    value: str = ""
    if_revision: int = -1
    end: str = ""  # scan: the end of the range ("" to the top)
    limit: int = 0  # scan: at most this many keys (0: the server's page size)
    serializable: bool = False
    after: tuple[int, int] | None = None  # a read token (partition, sequence): answer once that is applied
    ttl_ms: int = 0  # put: the key expires this long after it is written
    session: int = 0  # put: the key lives as long as this registry session
    ops: tuple[BatchOp, ...] = ()
    checks: tuple[BatchCheck, ...] = ()
    forwarded: bool = False


class KvItem(msgspec.Struct, frozen=True):
    """A key and its value and stat."""

    key: str
    value: str
    revision: int
    create_revision: int
    version: int
    expires_ms: int = 0  # when the key expires (Unix ms; 0: never)
    session: int = 0  # the registry session it lives with (0: none)


class KvReply(msgspec.Struct, frozen=True):
    """The answer to a KvRequest: the result, or an error's code and message (and the key's revision on a CAS)."""

    ok: bool = True
    code: str = ""
    message: str = ""
    revision: int = 0  # a write: the revision it made; a read: the key's revision
    prev_revision: int = 0
    deleted: int = 0
    found: bool = False
    item: KvItem | None = None
    items: list[KvItem] = []
    more: bool = False  # scan: the limit stopped it before the end of the range
    next: str = ""  # scan of one shard: where the range goes on in the next shard ("" at the end)
    shard: int = 0
    partition: int = 0
    seq: int = 0  # the read token: the partition's log position this answer includes
    node: str = ""  # the replica that answered (clients may cache the route)


class ExportRequest(msgspec.Struct, frozen=True):
    """Copy shard `shard` of `partition` once the exporter has applied min_seq."""

    partition: int
    shard: int
    min_seq: int


class ExportHeader(msgspec.Struct, frozen=True):
    """A copy is ready: its id, the log position it covers, its range and epoch, how many pages."""

    ok: bool
    error: str = ""
    export: str = ""
    seq: int = 0
    start: str = ""
    end: str = ""
    epoch: int = 0
    pages: int = 0
    keys: int = 0
    size: int = 0


class PageRequest(msgspec.Struct, frozen=True):
    """Page `page` of copy `export`."""

    export: str
    page: int


class Page(msgspec.Struct, frozen=True, array_like=True):
    """Keys of a copy, in order."""

    ok: bool
    items: list[tuple[str, Item]] = []
    error: str = ""


class WatchOpen(msgspec.Struct, frozen=True):
    """Send the key events of [start, end) in `partition` after revision `after` (-1: from now) to `inbox`.

    `bounds`: the range's pieces in this partition, as the gateway's shard table has them; the
    replica must hold shards covering every piece."""

    id: str
    partition: int
    start: str
    end: str
    after: int
    inbox: str
    bounds: list[tuple[str, str]]


class WatchOpened(msgspec.Struct, frozen=True):
    """The answer to a WatchOpen: ok and the revision it starts after, or why not (compacted: from `revision`)."""

    ok: bool
    code: str = ""
    message: str = ""
    revision: int = 0


class WatchBatch(msgspec.Struct, frozen=True, array_like=True):
    """Events in revision order, numbered from 1; `upto`: nothing more in range up to this revision; `end`: why
    the watch ended here (the gateway opens it again elsewhere from its last revision)."""

    id: str
    seq: int
    events: list[KeyEvent]
    upto: int
    end: str = ""


class WatchKeep(msgspec.Struct, frozen=True):
    """A gateway's watches on one replica are alive (close: end them)."""

    ids: list[str]
    close: bool = False
