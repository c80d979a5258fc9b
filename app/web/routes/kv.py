"""KV routes: /api/v1/kv (put, get, delete, batch, scan, shards, split) and MatrixKV's /set, /get, /delete, /shards."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post, websocket
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from app.errors import FleetmateError, Unavailable
from app.node import Node
from app.services.kv import checks as kv_checks
from app.services.kv.errors import BadKvRequest, KeyNotFound, NoSuchShard
from app.services.kv.holder import CLUSTER
from app.services.kv.service import KvService
from app.services.kv.views import ShardInfo, matrixkv_shards, shard_infos
from app.services.kv.watcher import RangeWatch, parse_resume, resume_token
from app.services.kv.wire import BatchCheck, BatchOp, KvItem, KvReply, KvRequest
from app.services.scheduler.messages import Operator
from app.services.scheduler.model import Procedure
from app.web.errors import ErrorBody
from app.web.sockets import drain, fail

BASE = "/api/v1/kv"
_json = msgspec.json.Encoder()
ERRORS = {
    400: ResponseSpec(data_container=ErrorBody, description="Empty or oversize key or value, bad UTF-8, bad range"),
    404: ResponseSpec(data_container=ErrorBody, description="No such key or shard"),
    409: ResponseSpec(data_container=ErrorBody, description="A compare-and-set found another revision"),
    503: ResponseSpec(data_container=ErrorBody, description="The key's shard did not answer (moving, no live holder)"),
}


class PutBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Set a key; if_revision makes it a compare-and-set (0: only if the key does not exist); ttl (seconds)
    or session (a registry session id, POST /api/v1/sessions) makes it end with the time or the session."""

    key: str
    value: str
    if_revision: int = -1
    ttl: float = 0.0
    session: int = 0


class DeleteBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Delete a key; if_revision deletes only that revision of it."""

    key: str
    if_revision: int = -1


class BatchBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Writes within one shard, all or none, if every check holds."""

    ops: list[BatchOp]
    checks: list[BatchCheck] = []


class WriteResult(msgspec.Struct, frozen=True):
    """A write's revision (the previous one of the key; keys deleted), its shard and read token."""

    revision: int
    prev_revision: int
    deleted: int
    shard: int
    token: str  # PARTITION:SEQ, where the write landed: a read given it on any replica sees the write


class ScanResult(msgspec.Struct, frozen=True):
    """Keys in order; more: the limit stopped the scan, go on from `next`."""

    items: list[KvItem]
    more: bool
    next: str


class SplitBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Split a shard at a key ("" for its middle key)."""

    key: str = ""


class MatrixSet(msgspec.Struct, frozen=True):
    """MatrixKV's /set body."""

    key: str = ""
    value: str = ""


_matrix_set = msgspec.json.Decoder(MatrixSet)


class MatrixKey(msgspec.Struct, frozen=True):
    """MatrixKV's /delete body."""

    key: str = ""


def _write(r: KvReply) -> WriteResult:
    return WriteResult(r.revision, r.prev_revision, r.deleted, r.shard, f"{r.partition}:{r.seq}")


def _prefix_end(prefix: str) -> str:
    """The first key after every key with this prefix ("" when there is none: the top)."""
    chars = list(prefix)
    while chars:
        if ord(chars[-1]) < 0x10FFFF:
            chars[-1] = chr(ord(chars[-1]) + 1)
            return "".join(chars)
        chars.pop()
    return ""


def _token(text: str) -> tuple[int, int] | None:
    """A read token `PARTITION:SEQ` as given back by a write (None when not given)."""
    if not text:
        return None
    part, sep, seq = text.partition(":")
    if not sep or not part.isdigit() or not seq.isdigit() or len(part) > 3 or len(seq) > 18:
        raise BadKvRequest(f"token {text!r} is not PARTITION:SEQ as a write gives it")
    return int(part), int(seq)


# ---- handlers the routes and the lean path (app/web/fastpath.py) share ---------------------------


async def put_key(kv: KvService, data: PutBody) -> WriteResult:
    """POST /api/v1/kv/put."""
    if not 0 <= data.ttl <= 10 * 365 * 86400:
        raise BadKvRequest(f"ttl {data.ttl} is out of range (0 to ten years, in seconds)")
    if not 0 <= data.session < 1 << 63:
        raise BadKvRequest(f"session {data.session} is out of range")
    ttl_ms = max(1, math.ceil(data.ttl * 1000)) if data.ttl else 0
    return _write(await kv.put(data.key, data.value, data.if_revision, ttl_ms, data.session))


async def get_item(kv: KvService, key: str, serializable: bool = False, token: str = "") -> KvItem:
    """GET /api/v1/kv/get."""
    r = await kv.get(key, serializable, _token(token))
    if r.item is None:
        raise KeyNotFound(f"key {key!r} does not exist")
    return r.item


def _fail(exc: Exception) -> str:
    return exc.message if isinstance(exc, FleetmateError) else repr(exc)


async def matrix_set(kv: KvService, raw: bytes) -> dict[str, str]:
    """MatrixKV's POST /set: always an answer, the error (if any) in "error"."""
    key = ""
    try:
        try:
            body = _matrix_set.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadKvRequest(f"invalid request body: {exc}") from exc
        key = body.key
        await kv.put(body.key, body.value)
        return {"key": key, "error": ""}
    except Exception as exc:
        return {"key": key, "error": _fail(exc)}


async def matrix_get(kv: KvService, key: str) -> dict[str, str]:
    """MatrixKV's GET /get?key=: value "" when the key does not exist."""
    try:
        r = await kv.get(key)
        return {"key": key, "value": r.item.value if r.item else "", "error": ""}
    except Exception as exc:
        return {"key": key, "value": "", "error": _fail(exc)}


def kv_routes(node: Node) -> list[BaseRouteHandler]:
    """The handlers, closing over the node."""

    def svc() -> KvService:
        k = node.kv
        if k is None:
            raise Unavailable("the kv store is disabled (kv.enabled) or starting")
        return k

    @post(BASE + "/put", tags=["kv"], summary="Set a key", status_code=HTTP_200_OK, responses=ERRORS)
    async def put(data: PutBody) -> WriteResult:
        """Any replica takes it; it runs on a replica holding the key's shard (one hop at most)."""
        return await put_key(svc(), data)

    @get(BASE + "/get", tags=["kv"], summary="A key's value and stat", responses=ERRORS)
    async def get_key(key: str, serializable: bool = False, token: str = "") -> KvItem:
        """Linearizable unless `serializable=true` (then the holder's copy as it is, at once). `token`
        (`PARTITION:SEQ`, a write's read token) makes any replica answer with that write applied."""
        return await get_item(svc(), key, serializable, token)

    @post(BASE + "/delete", tags=["kv"], summary="Delete a key", status_code=HTTP_200_OK, responses=ERRORS)
    async def delete_key(data: DeleteBody) -> WriteResult:
        """`deleted` is 0 when the key did not exist."""
        return _write(await svc().delete(data.key, data.if_revision))

    @post(
        BASE + "/batch",
        tags=["kv"],
        summary="Writes within one shard, all or none",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def batch(data: BatchBody) -> WriteResult:
        """Every check must hold (a key at a revision, 0: absent); keys of more than one shard are refused."""
        if not data.ops:
            raise BadKvRequest("a batch needs at least one write")
        req = KvRequest("batch", data.ops[0].key, ops=tuple(data.ops), checks=tuple(data.checks))
        return _write(await svc().batch(req))

    @get(BASE + "/scan", tags=["kv"], summary="Keys of a range or prefix, in order", responses=ERRORS)
    async def scan(
        start: str = "",
        end: str = "",
        prefix: str = "",
        limit: Annotated[int, Parameter(ge=0, le=10_000)] = 0,
        serializable: bool = False,
        token: str = "",
    ) -> ScanResult:
        """[start, end) ("" end: to the top) or every key with `prefix`; at most `limit` keys (1,000 a
        call at most): go on from `next` while `more`."""
        if prefix:
            if start or end:
                raise BadKvRequest("give a prefix or a range, not both")
            start, end = prefix, _prefix_end(prefix)
        r = await svc().scan(start, end, limit, serializable, _token(token))
        return ScanResult(r.items, r.more, r.next)

    @get(BASE + "/shards", tags=["kv"], summary="The shards: range, partition, holders, leader, size")
    async def shards(local: bool = False) -> list[ShardInfo]:
        """Every shard of the store, or with `local=true` those this replica holds (with its copy's keys)."""
        return shard_infos(svc(), local)

    @post(
        BASE + "/shards/{shard:int}/split",
        tags=["kv"],
        summary="Split a shard",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def split(shard: int, data: SplitBody) -> Procedure:
        """A scheduler procedure: the shard's leader appends the split, every holder applies it at once."""
        kv = svc()
        c = kv.scheduler.state.clusters.get(CLUSTER)
        if c is None or shard not in c.shards:
            raise NoSuchShard(f"the kv store has no shard {shard}")
        key = data.key
        if not key:
            for part in kv.partitions.values():
                held = part.state.held.get(shard)
                if held is not None and len(held.items) >= 2:
                    key = held.items.keys()[len(held.items) // 2]
        return await kv.scheduler.propose(CLUSTER, Operator("split", (shard,), "manual", split_key=key))

    @websocket(BASE + "/watch")
    async def watch(socket: WebSocket[Any, Any, Any]) -> None:
        """Key events of a range (`?start=&end=` or `?prefix=`) as JSON: {"type": "ready", "resume"} first,
        then {"type": "events", "partition", "events": [{kind, key, value, revision, create_revision,
        version, shard}], "resume"}. Ordered by revision within a partition, none lost or repeated
        across splits and moves; `?resume=TOKEN` (the last `resume` seen) goes on after a reconnect.
        An error frame {"type": "error", "error", "message"} ends it (`compacted`: too far back)."""
        await socket.accept()
        q = socket.query_params
        start, end, prefix = q.get("start", ""), q.get("end", ""), q.get("prefix", "")
        try:
            kv = svc()
            if prefix:
                if start or end:
                    raise BadKvRequest("give a prefix or a range, not both")
                start, end = prefix, _prefix_end(prefix)
            kv_checks.scan(start, end, 0, kv.cfg)
            try:
                resume = parse_resume(q.get("resume", ""))
            except ValueError as exc:
                raise BadKvRequest(f"resume: {exc}") from None
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
            return
        rw = RangeWatch(kv, start, end, resume)
        reader = asyncio.create_task(drain(socket))
        try:
            await rw.open()
            await socket.send_text(_json.encode({"type": "ready", "resume": resume_token(rw.delivered)}).decode())
            batches = rw.batches().__aiter__()
            while True:
                nxt = asyncio.ensure_future(batches.__anext__())
                done, _ = await asyncio.wait({nxt, reader}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    return
                partition, events, token = nxt.result()
                message = {
                    "type": "events",
                    "partition": partition,
                    "events": [msgspec.to_builtins(e) for e in events],
                    "resume": token,
                }
                await socket.send_text(_json.encode(message).decode())
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
        except (WebSocketDisconnect, OSError):
            return
        finally:
            reader.cancel()
            await rw.close()

    routes: list[BaseRouteHandler] = [put, get_key, delete_key, batch, scan, shards, split, watch]
    if node.cfg.kv.matrixkv:
        routes += matrixkv_routes(svc)
    return routes


def matrixkv_routes(svc: Any) -> list[BaseRouteHandler]:
    """MatrixKV's own routes: answers always 200 with the error, if any, in "error" (as MatrixKV does)."""

    async def body_of(request: Request[Any, Any, Any], kind: type[Any]) -> Any:
        try:
            return msgspec.json.decode(await request.body(), type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BadKvRequest(f"invalid request body: {exc}") from exc

    @post("/set", tags=["matrixkv"], summary="MatrixKV: set a key", status_code=HTTP_200_OK)
    async def mk_set(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
        """`{"key":"k1","value":"v1"}` -> `{"key":"k1","error":""}`."""
        try:
            kv = svc()
        except FleetmateError as exc:
            return Response({"key": "", "error": exc.message})
        return Response(await matrix_set(kv, await request.body()))

    @get("/get", tags=["matrixkv"], summary="MatrixKV: get a key")
    async def mk_get(key: str = "") -> Response[dict[str, str]]:
        """`?key=k1` -> `{"key":"k1","value":"v1","error":""}` (value "" when the key does not exist)."""
        try:
            kv = svc()
        except FleetmateError as exc:
            return Response({"key": key, "value": "", "error": exc.message})
        return Response(await matrix_get(kv, key))

    @post("/delete", tags=["matrixkv"], summary="MatrixKV: delete a key", status_code=HTTP_200_OK)
    async def mk_delete(request: Request[Any, Any, Any]) -> Response[dict[str, str]]:
        """`{"key":"k1"}` -> `{"key":"k1","error":""}`."""
        key = ""
        try:
            body = await body_of(request, MatrixKey)
            key = body.key
            await svc().delete(body.key)
            return Response({"key": key, "error": ""})
        except Exception as exc:
            return Response({"key": key, "error": _fail(exc)})

    @get("/shards", tags=["matrixkv"], summary="MatrixKV: the shards (?local: this replica's)")
    async def mk_shards(request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
        """MatrixCube's shard records as MatrixKV lists them; `?local=1` (any value) for this replica's."""
        return matrixkv_shards(svc(), local=bool(request.query_params.get("local")))

    return [mk_set, mk_get, mk_delete, mk_shards]
