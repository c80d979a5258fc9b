"""A real scheduler data node program (`python -m tests.harness.datanode`), its pure logic, `DataNode`, `DataNodes`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from app.services.scheduler.protocol import (
    SUBJECT_ACK,
    SUBJECT_HEARTBEAT,
    SUBJECT_REGISTER,
    SUBJECT_SYNC,
    Ack,
    Assigned,
    Assignment,
    Heartbeat,
    NodeReply,
    RegisterRequest,
    ShardLoad,
    SyncRequest,
    assign_subject,
)
from tests.harness.fleetmate import free_port
from tests.harness.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
PROGRAM = """A data node: registers with a cluster over NATS, heartbeats every lease/3 with each held shard's
load, receives its whole assignment on fleetmate.sched.assign.<cluster>.<node> (or asks for it on
fleetmate.sched.sync), converges its shard files under DIR/shards to it and acknowledges each open and
close. One JSON line per event on stdout; DIR/state.json holds its shards."""
REQUEST_TIMEOUT_S = 1.0  # one ack/register/sync request's wait before it is retried
SILENCE_LEASES = 3  # no assignment for this many leases: ask for one (sync)

# ---- pure convergence logic ------------------------------------------------------------------------


class LocalShard(msgspec.Struct):
    """A shard replica this node holds: what its DIR/shards/<id>.json says."""

    id: int
    role: str
    epoch: int
    start: str = ""
    end: str = ""
    tables: list[str] = []
    opened_at: float = 0.0


class Plan(msgspec.Struct, frozen=True):
    """What converging to an assignment takes.

    opens: shards to (re)open, their file written, then acknowledged "opened" at their epoch;
    reacks: shards already open as assigned whose "opened" ack is still owed;
    closes: local shards to delete, then acknowledged "closed";
    close_acks: shards in the assignment's drop list the node does not hold: acknowledged "closed" only.
    """

    opens: list[Assigned] = []
    reacks: list[Assigned] = []
    closes: list[int] = []
    close_acks: list[int] = []

    @property
    def empty(self) -> bool:
        return not (self.opens or self.reacks or self.closes or self.close_acks)


def is_newer(revision: int, newest_seen: int) -> bool:
    """Whether an assignment at `revision` is to be applied: not older than the newest seen.

    The same revision is applied again (the leader re-pushes every few seconds; converging is
    idempotent and retries what an earlier pass could not finish).
    """
    return revision >= newest_seen


def matches(local: LocalShard | None, want: Assigned) -> bool:
    """Whether the local copy is open as assigned (same role and epoch)."""
    return local is not None and local.role == want.role and local.epoch == want.epoch


def plan(
    local: dict[int, LocalShard],
    assignment: Assignment,
    acked: dict[int, int] | None = None,
    closed_acked: Iterable[int] = (),
) -> Plan:
    """The opens, acks and closes that bring `local` to `assignment`.

    acked: shard -> the epoch whose "opened" ack is settled (answered, ok or refused);
    closed_acked: dropped shards whose "closed" ack is settled.
    A shard both assigned and in drop (a stale copy re-added) is reopened and its stale copy
    acknowledged closed. New opens come after role and epoch changes of shards already held (a
    follower becoming leader is not held up by another shard's catch-up).
    """
    acked = acked or {}
    done_closed = set(closed_acked)
    assigned = {s.id: s for s in assignment.shards}
    changes: list[Assigned] = []
    fresh: list[Assigned] = []
    reacks: list[Assigned] = []
    for sid in sorted(assigned):
        want = assigned[sid]
        have = local.get(sid)
        if matches(have, want):
            if acked.get(sid, -1) < want.epoch:
                reacks.append(want)
        elif have is None:
            fresh.append(want)
        else:
            changes.append(want)
    closes = sorted(sid for sid in local if sid not in assigned)
    close_acks = sorted({sid for sid in assignment.drop if sid not in local or sid in assigned} - done_closed)
    return Plan(opens=changes + fresh, reacks=reacks, closes=closes, close_acks=close_acks)


def parse_hot(specs: Sequence[str]) -> dict[int, float]:
    """`--hot SHARD:RATE` options as shard -> operations a second."""
    out: dict[int, float] = {}
    for spec in specs:
        shard, _, rate = spec.partition(":")
        out[int(shard)] = float(rate or "100")
    return out


def parse_labels(specs: Sequence[str]) -> dict[str, str]:
    """`--label KEY=VALUE` options as a dict."""
    out: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise ValueError(f"a label is KEY=VALUE, not {spec!r}")
        out[key] = value
    return out


def shard_loads(
    local: dict[int, LocalShard], sizes: dict[int, int], hot: dict[int, float], base: float
) -> list[ShardLoad]:
    """Each held shard's load: its file's size; leaders serve `base` (or the --hot rate) writes and reads a second."""
    out = []
    for sid in sorted(local):
        rate = hot.get(sid, base) if local[sid].role == "leader" else 0.0
        out.append(ShardLoad(sid, sizes.get(sid, 0), writes_per_s=rate, reads_per_s=rate))
    return out


# ---- the program ---------------------------------------------------------------------------------------


class Node:
    """The data node's state and loops; one asyncio task converges, one heartbeats, one watches for silence."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cluster: str = args.cluster
        self.name: str = args.node
        self.dir = Path(args.data_dir)
        self.shard_dir = self.dir / "shards"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.lease: float = args.lease
        self.hot = parse_hot(args.hot)
        self.local: dict[int, LocalShard] = self._load()
        self.acked: dict[int, int] = {}  # shard -> epoch whose "opened" ack is settled (this run)
        self.closed_acked: set[int] = set()  # dropped shards acknowledged closed at the newest revision
        self.revision = 0  # the newest assignment revision seen
        self.catching_up: dict[int, float] = {}  # new shard -> when its catch-up (--ack-delay) began
        self.state = ""
        self.pending: Assignment | None = None
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.last_seen = time.monotonic()
        self.nc: Any = None
        self.enc = msgspec.json.Encoder()

    # ---- output ----

    def emit(self, event: str, **fields: Any) -> None:
        line = {"event": event, "t": time.time(), "node": self.name, **fields}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def _load(self) -> dict[int, LocalShard]:
        out: dict[int, LocalShard] = {}
        for path in self.shard_dir.glob("*.json"):
            with contextlib.suppress(ValueError, msgspec.DecodeError):
                shard = msgspec.json.decode(path.read_bytes(), type=LocalShard)
                out[shard.id] = shard
        return out

    def _write_state(self) -> None:
        body = {
            "node": self.name,
            "cluster": self.cluster,
            "revision": self.revision,
            "state": self.state,
            "shards": {
                str(sid): {**msgspec.to_builtins(s), "acked": self.acked.get(sid, 0)}
                for sid, s in sorted(self.local.items())
            },
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, self.dir / "state.json")

    def _sizes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for sid in self.local:
            with contextlib.suppress(OSError):
                out[sid] = (self.shard_dir / f"{sid}.json").stat().st_size
        return out

    # ---- NATS ----

    async def request(self, subject: str, body: msgspec.Struct) -> bytes | None:
        """One request; None on a timeout or no responder (the caller retries)."""
        import nats.errors

        try:
            msg = await self.nc.request(subject, self.enc.encode(body), timeout=REQUEST_TIMEOUT_S)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError):
            return None
        data: bytes = msg.data
        return data

    async def register(self) -> None:
        """Register until a replica answers ok."""
        req = RegisterRequest(
            cluster=self.cluster,
            node=self.name,
            address=self.args.address or f"127.0.0.1:{os.getpid()}",
            labels=parse_labels(self.args.label),
            capacity=self.args.capacity,
            lease_s=self.lease,
        )
        attempt = 0
        while not self.stopping.is_set():
            attempt += 1
            data = await self.request(SUBJECT_REGISTER, req)
            if data is not None:
                reply = _decode_reply(data)
                if reply is not None and reply.ok:
                    if reply.lease_s > 0:
                        self.lease = reply.lease_s
                    self.emit("registered", revision=reply.revision, lease_s=self.lease, attempts=attempt)
                    return
                self.emit("register_refused", reply=_text(data), attempt=attempt)
            await self._sleep(0.3)

    async def sync(self, why: str) -> None:
        """Ask any replica for the whole assignment."""
        data = await self.request(SUBJECT_SYNC, SyncRequest(self.cluster, self.name))
        if data is None:
            self.emit("sync", why=why, ok=False)
            return
        try:
            a = msgspec.json.decode(data, type=Assignment)
        except msgspec.DecodeError:
            self.emit("sync", why=why, ok=False, reply=_text(data))
            return
        self.emit("sync", why=why, ok=True, revision=a.revision)
        self.offer(a, "sync")

    def offer(self, a: Assignment, source: str) -> None:
        """A new assignment arrived: keep it if it is not older than the newest seen, wake the converger."""
        self.last_seen = time.monotonic()
        if a.cluster != self.cluster or a.node != self.name:
            return
        if not is_newer(a.revision, self.revision):
            self.emit("assignment_ignored", revision=a.revision, newest=self.revision, source=source)
            return
        if a.revision > self.revision:
            self.closed_acked.clear()
            self.emit(
                "assignment",
                revision=a.revision,
                source=source,
                state=a.state,
                shards={s.id: [s.role, s.epoch] for s in a.shards},
                drop=a.drop,
            )
        self.revision = a.revision
        self.pending = a
        self.wake.set()

    async def on_assign(self, msg: Any) -> None:
        try:
            a = msgspec.json.decode(msg.data, type=Assignment)
        except msgspec.DecodeError:
            self.emit("bad_assignment", body=_text(msg.data))
            return
        self.offer(a, "push")

    # ---- loops ----

    async def converge_loop(self) -> None:
        while not self.stopping.is_set():
            await self.wake.wait()
            self.wake.clear()
            a = self.pending
            if a is None:
                continue
            if a.state == "down" and self.state != "down":
                self.emit("told_down")
                asyncio.get_running_loop().create_task(self.register())
            self.state = a.state
            await self.converge(a)
            self._write_state()

    async def converge(self, a: Assignment) -> None:
        """Carry out the plan for `a`, stopping early when a newer assignment arrives (it is planned afresh)."""
        p = plan(self.local, a, self.acked, self.closed_acked)
        if p.empty:
            return
        for sid in p.closes:
            if self.pending is not a:
                return
            old = self.local.pop(sid)
            with contextlib.suppress(FileNotFoundError):
                (self.shard_dir / f"{sid}.json").unlink()
            self.acked.pop(sid, None)
            self._write_state()
            self.emit("closed", shard=sid, epoch=old.epoch, revision=a.revision)
            if sid in a.drop:
                if await self.ack(a, sid, old.epoch, "closed"):
                    self.closed_acked.add(sid)
            else:
                await self.ack(a, sid, old.epoch, "closed")
        for sid in p.close_acks:
            if self.pending is not a:
                return
            if await self.ack(a, sid, 0, "closed"):
                self.closed_acked.add(sid)
        changes = [w for w in p.opens if w.id in self.local]
        fresh = [w for w in p.opens if w.id not in self.local]
        for want in changes:
            if self.pending is not a:
                return
            await self.open(a, want, fresh=False)
        if fresh and self.args.ack_delay > 0:
            # New replicas catch up together; a pass cut short by a newer assignment does not start over.
            now = time.monotonic()
            since = min(self.catching_up.setdefault(w.id, now) for w in fresh)
            await self._sleep(self.args.ack_delay - (now - since))
        for want in fresh:
            if self.pending is not a:
                return
            await self.open(a, want, fresh=True)
        for want in p.reacks:
            if self.pending is not a:
                return
            if await self.ack(a, want.id, want.epoch, "opened"):
                self.acked[want.id] = want.epoch

    async def open(self, a: Assignment, want: Assigned, fresh: bool) -> None:
        """Write the shard's file as assigned, then acknowledge it opened at its epoch."""
        shard = LocalShard(want.id, want.role, want.epoch, want.start, want.end, list(want.tables), time.time())
        tmp = self.shard_dir / f"{want.id}.json.tmp"
        tmp.write_bytes(self.enc.encode(shard))
        os.replace(tmp, self.shard_dir / f"{want.id}.json")
        self.local[want.id] = shard
        self.catching_up.pop(want.id, None)
        self._write_state()
        self.emit("opened", shard=want.id, role=want.role, epoch=want.epoch, fresh=fresh, revision=a.revision)
        if await self.ack(a, want.id, want.epoch, "opened"):
            self.acked[want.id] = want.epoch

    async def ack(self, a: Assignment, shard: int, epoch: int, status: str) -> bool:
        """Acknowledge until answered (True: settled, ok or refused); False when a newer assignment came first."""
        body = Ack(self.cluster, self.name, shard, epoch, status)  # type: ignore[arg-type]  # "opened"/"closed"
        tries = 0
        while not self.stopping.is_set():
            tries += 1
            data = await self.request(SUBJECT_ACK, body)
            if data is not None:
                reply = _decode_reply(data)
                ok = reply is not None and reply.ok
                self.emit(
                    "ack",
                    shard=shard,
                    epoch=epoch,
                    status=status,
                    ok=ok,
                    tries=tries,
                    error=reply.error if reply else "undecodable",
                    message=reply.message if reply else _text(data),
                )
                return True  # an error answer is logged, not retried: the next assignment says what to do
            if self.pending is not a:
                self.emit("ack_abandoned", shard=shard, epoch=epoch, status=status, tries=tries)
                return False
            await self._sleep(0.1)
        return False

    async def heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            hb = Heartbeat(
                self.cluster, self.name, time.time(), shard_loads(self.local, self._sizes(), self.hot, self.args.load)
            )
            with contextlib.suppress(Exception):
                await self.nc.publish(SUBJECT_HEARTBEAT, self.enc.encode(hb))
            await self._sleep(self.lease / 3)

    async def silence_loop(self) -> None:
        while not self.stopping.is_set():
            await self._sleep(self.lease / 2)
            if time.monotonic() - self.last_seen > SILENCE_LEASES * self.lease:
                self.last_seen = time.monotonic()
                await self.sync("silence")

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def run(self) -> int:
        import nats

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        resync = asyncio.Event()

        async def reconnected() -> None:
            self.emit("reconnected")
            resync.set()

        async def disconnected() -> None:
            self.emit("disconnected")

        errors = 0

        async def error(exc: Exception) -> None:
            nonlocal errors
            errors += 1
            if errors <= 3 or errors % 100 == 0:  # a NATS outage is retried every 0.2 s: say so, not every time
                self.emit("nats_error", error=repr(exc)[:200], count=errors)

        self.emit("started", pid=os.getpid(), shards=sorted(self.local))
        self._write_state()
        connecting = loop.create_task(
            nats.connect(
                servers=self.args.nats.split(","),
                name=f"datanode-{self.name}",
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.2,
                connect_timeout=2,
                reconnected_cb=reconnected,
                disconnected_cb=disconnected,
                error_cb=error,
            )
        )
        stop = loop.create_task(self.stopping.wait())
        await asyncio.wait([connecting, stop], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            self.emit("stopped", connected=False)
            return 0
        stop.cancel()
        self.nc = connecting.result()
        await self.nc.subscribe(assign_subject(self.cluster, self.name), cb=self.on_assign)
        await self.nc.flush()
        await self.register()
        await self.sync("start")
        tasks = [
            loop.create_task(self.converge_loop()),
            loop.create_task(self.heartbeat_loop()),
            loop.create_task(self.silence_loop()),
        ]

        async def resync_loop() -> None:
            while not self.stopping.is_set():
                await resync.wait()
                resync.clear()
                await self.register()
                await self.sync("reconnect")

        tasks.append(loop.create_task(resync_loop()))
        await self.stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._write_state()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 2)
        self.emit("stopped")
        return 0


def _decode_reply(data: bytes) -> NodeReply | None:
    try:
        return msgspec.json.decode(data, type=NodeReply)
    except msgspec.DecodeError:
        return None


def _text(data: bytes) -> str:
    return data[:500].decode("utf-8", "replace")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m tests.harness.datanode", description=PROGRAM)
    ap.add_argument("--nats", required=True, help="NATS URL(s), comma-separated")
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--lease", type=float, default=1.0, help="lease in seconds; heartbeats every lease/3")
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE (zone=a); repeatable")
    ap.add_argument("--address", default="", help="host:port clients reach the node on")
    ap.add_argument("--capacity", type=int, default=0, help="bytes; 0: unknown")
    ap.add_argument("--ack-delay", type=float, default=0.0, help="seconds new replicas take to catch up")
    ap.add_argument("--hot", action="append", default=[], help="SHARD:RATE, operations a second; repeatable")
    ap.add_argument("--load", type=float, default=1.0, help="operations a second of every shard it leads")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(Node(parse_args(argv)).run())


# ---- the test harness -------------------------------------------------------------------------------


class DataNode:
    """The data node program as a subprocess; its stdout events are collected in `events`."""

    def __init__(
        self,
        workdir: Path,
        nats_url: str,
        cluster: str,
        name: str,
        lease: float = 1.0,
        labels: dict[str, str] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.dir = workdir
        self.name = name
        self.cluster = cluster
        self.nats_url = nats_url
        self.lease = lease
        self.labels = dict(labels or {})
        self.extra = list(extra)
        self.address = f"127.0.0.1:{free_port()}"  # what routes name; nothing listens there
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: threading.Thread | None = None
        self._log: Any = None

    @property
    def argv(self) -> list[str]:
        args = [
            "--nats",
            self.nats_url,
            "--cluster",
            self.cluster,
            "--node",
            self.name,
            "--data-dir",
            str(self.dir),
            "--lease",
            str(self.lease),
            "--address",
            self.address,
        ]
        for key, value in self.labels.items():
            args += ["--label", f"{key}={value}"]
        return [sys.executable, "-m", "tests.harness.datanode", *args, *self.extra]

    def start(self, wait_registered: bool = True, timeout: float = 20) -> DataNode:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
        self._log = (self.dir / "stderr.log").open("ab")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_registered:
            self.wait_registered(timeout)
        return self

    def _read(self) -> None:
        assert self.proc
        assert self.proc.stdout
        with (self.dir / "events.jsonl").open("a") as keep:  # for a look after a failed test
            for raw in self.proc.stdout:
                text = raw.decode("utf-8", "replace").rstrip()
                self.raw.append(text)
                keep.write(text + "\n")
                keep.flush()
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(text))

    def wait_registered(self, timeout: float = 20) -> None:
        def registered() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"data node {self.name} exited with {self.proc.returncode}: {self.stderr()}")
            return bool(self.logged("registered"))

        wait_for(registered, timeout, f"data node {self.name} registered")

    def logged(self, event: str, **match: Any) -> list[dict[str, Any]]:
        """Events of a kind whose fields equal `match`."""
        return [
            e for e in list(self.events) if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr.log").read_text()[-2000:]
        except OSError:
            return ""

    def state(self) -> dict[str, Any]:
        """DIR/state.json ({} before the first write)."""
        try:
            body: dict[str, Any] = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return body

    def shards(self) -> dict[int, dict[str, Any]]:
        """shard id -> {role, epoch, start, end, acked, ...} as the node's state.json says."""
        return {int(k): v for k, v in self.state().get("shards", {}).items()}

    def files(self) -> dict[int, dict[str, Any]]:
        """shard id -> the content of DIR/shards/<id>.json (what is on disk, whatever the process did)."""
        out: dict[int, dict[str, Any]] = {}
        for path in (self.dir / "shards").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                body = json.loads(path.read_text())
                out[int(body["id"])] = body
        return out

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL and reap; the time.time() just after the signal."""
        sent = time.time()
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            sent = time.time()
            self.proc.wait()
        self._join()
        return sent

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the process and wait; its exit code."""
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"data node {self.name} did not stop within {timeout}s") from None
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        if self._reader:
            self._reader.join(2)
        if self._log:
            self._log.close()
            self._log = None

    def restart(self, wait_registered: bool = True, timeout: float = 20) -> DataNode:
        """Start again with the same directory (its shard files kept); a fresh event list."""
        self.kill()
        self.events, self.raw = [], []
        return self.start(wait_registered=wait_registered, timeout=timeout)


class DataNodes:
    """A group of data nodes of one cluster, each in its own directory under workdir."""

    def __init__(self, workdir: Path, nats_url: str, cluster: str, lease: float = 1.0) -> None:
        self.dir = workdir
        self.nats_url = nats_url
        self.cluster = cluster
        self.lease = lease
        self.nodes: dict[str, DataNode] = {}

    def add(self, name: str, labels: dict[str, str] | None = None, extra: Sequence[str] = ()) -> DataNode:
        node = DataNode(self.dir / name, self.nats_url, self.cluster, name, self.lease, labels, extra)
        self.nodes[name] = node
        return node

    def __getitem__(self, name: str) -> DataNode:
        return self.nodes[name]

    def __iter__(self) -> Iterator[DataNode]:
        return iter(list(self.nodes.values()))

    def start(self, names: Iterable[str] | None = None, timeout: float = 30) -> DataNodes:
        """Start the named nodes (every one by default) at once, then wait until each registered."""
        chosen = [self.nodes[n] for n in (names if names is not None else list(self.nodes))]
        for node in chosen:
            node.start(wait_registered=False)
        for node in chosen:
            node.wait_registered(timeout)
        return self

    def alive(self) -> list[DataNode]:
        return [n for n in self.nodes.values() if n.alive]

    def holdings(self) -> dict[str, dict[int, dict[str, Any]]]:
        """node -> its shard files (live nodes and dead ones alike: the files stay)."""
        return {name: node.files() for name, node in self.nodes.items()}

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()


if __name__ == "__main__":
    sys.exit(main())
