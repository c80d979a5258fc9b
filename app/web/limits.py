"""Bounds on what one HTTP request may send: the size of its body and how deeply its JSON nests."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from array import array
from itertools import accumulate

import msgspec
from granian._granian import RSGIHTTPProtocol as HTTPProtocol
from granian._granian import RSGIProtocolClosed as ProtocolClosed
from granian._granian import RSGIProtocolError as ProtocolError

from app.errors import FleetmateError
from app.web.errors import fleetmate_error_parts

# After refusing a body, the rest of it is read and thrown away (at most this much, for at most
# this long) so that the client, still sending, reads the answer: a server that closes a
# connection with unread data makes the kernel reset it, and the reset discards the answer.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_MAX_S = 5.0

_NOT_SHAPE = bytes(b for b in range(256) if b not in b'"[]{}')  # all but quotes and brackets
_BRACKETS_AS_ONE = bytes.maketrans(b"{}", b"[]")
_QUOTED = re.compile(rb'"[^"]*"')
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")  # +1 and -1 as signed bytes
_PASSES = 4  # innermost pairs removed before counting: what most documents need to vanish


class RequestRefused(FleetmateError):
    """A request past one of the configured bounds; answered at once with the JSON error shape."""

    key = ""

    def __init__(self, message: str, limit: float) -> None:
        super().__init__(message)
        self.limit = limit

    def detail(self) -> dict[str, object]:
        """The configuration key that bounds it and its value."""
        return {"key": self.key, "limit": self.limit}


class BodyTooLarge(RequestRefused):
    """The request body is longer than http.max_body_bytes (413)."""

    code = "payload_too_large"
    status = 413
    key = "http.max_body_bytes"


class BodyTooSlow(RequestRefused):
    """The request body did not arrive within http.body_read_timeout (408)."""

    code = "request_timeout"
    status = 408
    key = "http.body_read_timeout"


class JsonTooDeep(RequestRefused):
    """The JSON body nests arrays and objects deeper than http.max_json_depth (400)."""

    code = "bad_request"
    status = 400
    key = "http.max_json_depth"


def too_large(limit: int, declared: int | None = None) -> BodyTooLarge:
    """The error for a body over `limit` bytes."""
    size = f" of {declared} bytes" if declared is not None else ""
    return BodyTooLarge(f"the request body{size} is larger than {limit} bytes (http.max_body_bytes)", limit)


def _few_openers(body: bytes, limit: int) -> bool:
    """True when body holds at most `limit` of '[' and '{' together; stops looking past that."""
    left = limit
    for opener in (b"[", b"{"):
        at = body.find(opener)
        while at >= 0:
            left -= 1
            if left < 0:
                return False
            at = body.find(opener, at + 1)
    return True


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True when the JSON text nests arrays and objects more than `limit` deep.

    A body holding at most `limit` opening brackets cannot nest deeper (memchr finds them).
    Otherwise only quotes and brackets are kept and strings are cut out (their brackets are
    text: once the escapes of a backslash and of a quote are dropped, every quote opens or
    closes a string). A few passes remove innermost bracket pairs, one level each, which is all
    most documents need to vanish; what is left is measured by a running sum over its brackets.
    Every step is a C loop: the worst body, 8 MiB of brackets nested 64 deep, takes ~0.5 s,
    less than decoding it would (~0.65 s). Brackets that do not pair up (not JSON) are counted
    as they come, as the decoder recurses on each until it finds the error.
    """
    if _few_openers(body, limit):
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    shape = body.translate(_BRACKETS_AS_ONE, _NOT_SHAPE)
    if b'"' in shape:
        # Adjacent quotes first (strings without brackets, the most of them): removing a pair
        # leaves every other quote opening or closing what it did.
        shape = _QUOTED.sub(b"", shape.replace(b'""', b""))
    if shape.count(b"[") <= limit:
        return False
    if b"[" * (limit + 1) in shape:
        return True
    # Each pass lowers the deepest point by one (it is always inside an innermost pair) and no
    # other point by more, so passes + the depth of what is left is never below the true depth.
    passes = 0
    while passes < min(_PASSES, limit):
        inner = shape.replace(b"[]", b"")
        passes += 1
        if not inner:
            return False  # gone in `passes` levels, at most `limit`
        shrunk = len(inner) < len(shape) * 3 // 4
        shape = inner
        if not shrunk:
            break  # deep and narrow: the running sum is cheaper than more passes
    deepest = max(accumulate(array("b", shape.translate(_STEPS))))
    return passes + deepest > limit


def check_json_depth(body: bytes, limit: int) -> None:
    """Raise JsonTooDeep when the body nests deeper than `limit` (0: no bound)."""
    if limit and json_depth_exceeds(body, limit):
        raise JsonTooDeep(
            f"the JSON body nests arrays and objects deeper than {limit} levels (http.max_json_depth)", limit
        )


async def drain(proto: HTTPProtocol, already: int = 0) -> None:
    """Read and drop what is left of a refused body, within DRAIN_MAX_BYTES and DRAIN_MAX_S."""
    seen = already
    with contextlib.suppress(TimeoutError, ProtocolError, ProtocolClosed, RuntimeError):
        async with asyncio.timeout(DRAIN_MAX_S):
            async for chunk in proto:
                seen += len(chunk)
                if seen > DRAIN_MAX_BYTES:
                    return


class BodyClock:
    """Ends the body reads that outlast http.body_read_timeout: one sweep a second for them all,
    not a timer per request (a timer cost ~5 us a request, this ~0.3)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reading: dict[asyncio.Task[object], float] = {}  # task -> deadline
        self.expired: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self, task: asyncio.Task[object]) -> None:
        """The task begins reading a body."""
        self.reading[task] = time.monotonic() + self.timeout
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="body-clock")

    def stop(self, task: asyncio.Task[object]) -> bool:
        """The task's read ended; True when it ended because its time ran out."""
        self.reading.pop(task, None)
        if task in self.expired:
            self.expired.discard(task)
            return True
        return False

    async def _sweep(self) -> None:
        every = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            late = [task for task, deadline in self.reading.items() if deadline <= now]
            for task in late:
                del self.reading[task]
                self.expired.add(task)
                task.cancel()


class BodyReader:
    """Reads one request's body within `limit` bytes and the clock's timeout; with `depth` set,
    checks its JSON nesting too.

    A declared Content-Length was checked before (Observe), so such a body is read in one call;
    a body of unknown length (chunked, HTTP/2) is read piece by piece and refused once over.
    Granian has no time limit of its own on a body: one sent a byte a second would hold its
    connection, and this request, for as long as the client likes.
    """

    __slots__ = ("clock", "depth", "known", "limit", "proto")

    def __init__(self, proto: HTTPProtocol, limit: int, known: bool, clock: BodyClock) -> None:
        self.proto = proto
        self.limit = limit
        self.known = known
        self.clock = clock
        self.depth = 0

    async def __call__(self) -> bytes:
        task = asyncio.current_task()
        if task is None:  # not in a task (never so under Granian): no clock
            data = await self._read()
        else:
            self.clock.start(task)
            try:
                data = await self._read()
            except asyncio.CancelledError:
                if not self.clock.stop(task):
                    raise
                task.uncancel()
                timeout = self.clock.timeout
                raise BodyTooSlow(
                    f"the request body did not arrive within {timeout:g} s (http.body_read_timeout)", timeout
                ) from None
            finally:
                self.clock.stop(task)
        if self.depth:
            check_json_depth(data, self.depth)
        return data

    async def _read(self) -> bytes:
        if self.known:
            data: bytes = await self.proto()
            return data
        pieces: list[bytes] = []
        size = 0
        async for chunk in self.proto:
            size += len(chunk)
            if size > self.limit:
                task = asyncio.current_task()
                if task is not None:
                    self.clock.stop(task)  # the drain has its own bound
                await drain(self.proto, size)
                raise too_large(self.limit)
            pieces.append(chunk)
        return b"".join(pieces)


def error_body(exc: FleetmateError) -> bytes:
    """The JSON error shape of app.web.errors for a refusal answered outside Litestar."""
    return msgspec.json.encode(fleetmate_error_parts(exc)[0])
