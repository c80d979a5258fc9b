"""`fleetmate restore`: put a snapshot back into a stopped cluster; every replica continues from it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from app import failpoints
from app.bus import subjects
from app.bus.connection import Bus, BusError, client_token, tls_context
from app.bus.embedded import EmbeddedNats, EmbeddedNatsError, server_token
from app.bus.micro import ping
from app.bus.streams import ensure_stream
from app.config import Config
from app.log.engine import log_id, stream_config, stream_seq
from app.log.lease import registry as lease_backends
from app.services.registry import files as registry_files
from app.storage import datadir
from app.storage.snapshots import registry as snapshot_stores
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, make_meta

SERVICE = "registry"  # the registry's snapshots (app.services.registry.service.SNAPSHOT_SERVICE)
STREAM = subjects.REGISTRY_STREAM
PROGRESS_EVERY_S = 1.0

EXIT_OK = 0
EXIT_REFUSED = 1


class Refused(Exception):
    """The restore does not run: a replica is up, no snapshot matches, the store cannot be read..."""


class _Counted(msgspec.Struct, frozen=True, array_like=True):
    """A log entry read only to count its commands (app.services.registry.messages.Entry)."""

    commands: list[msgspec.Raw]


_counted = msgspec.msgpack.Decoder(_Counted)


def add_parser(sub: Any, config_help: str, add_flags: Any) -> None:
    """Add the `restore` command to the top-level subparsers (add_flags: the configuration flags, or None)."""
    p = sub.add_parser(
        "restore",
        help="restore a registry snapshot into a stopped cluster (--list: the snapshots in the store)",
        usage="fleetmate restore [-h] [--config PATH] [--list | --revision R | --at TIME] [--yes] [--KEY VALUE ...]",
        description=(
            "Put a snapshot from the configured store (snapshot.store) back: it is saved as the newest "
            "snapshot, installed in this data directory, and the log is emptied and continued after it, so "
            "every replica restores it when it starts. Refused while any replica runs. Entries after the "
            "snapshot are dropped; revisions go on above the highest the cluster reached. See docs/durability.md."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--config", metavar="PATH", help=config_help)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--list", action="store_true", help="list the snapshots in the store and exit")
    which.add_argument("--revision", type=int, metavar="R", help="the newest snapshot at or before revision R")
    which.add_argument(
        "--at",
        metavar="TIME",
        help="the newest snapshot taken at or before TIME: ISO 8601 (UTC unless it says otherwise) or Unix seconds",
    )
    p.add_argument("--yes", action="store_true", help="do not ask before dropping the log's entries")
    if add_flags is not None:
        add_flags(p)


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run the command; 0 when restored (or listed), 1 when refused or failed."""
    try:
        return asyncio.run(_main(args, cfg))
    except Refused as exc:
        print(f"fleetmate restore: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def parse_time(text: str) -> float:
    """Unix seconds from ISO 8601 (naive: UTC) or a number of seconds."""
    with contextlib.suppress(ValueError):
        return float(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise Refused(f"--at {text!r}: not an ISO 8601 time (2026-12-07T13:30:00Z) nor Unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _utc(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def choose(metas: list[SnapshotMeta], revision: int | None, at: float | None) -> SnapshotMeta:
    """The newest snapshot (metas newest first), at or before a revision or a time when given."""
    if revision is not None:
        found = [m for m in metas if m.revision <= revision]
        what = f"at or before revision {revision}"
    elif at is not None:
        found = [m for m in metas if m.created_at <= at]
        what = f"taken at or before {_utc(at)}"
    else:
        found, what = metas, ""
    if not found:
        oldest = metas[-1]
        raise Refused(
            f"no snapshot {what}; the oldest is {oldest.name} (revision {oldest.revision}, {_utc(oldest.created_at)})"
        )
    return found[0]


def _print_list(store: SnapshotStore, metas: list[SnapshotMeta]) -> None:
    print(f"snapshots of the registry in the {store.name} store ({store.describe()}), newest first:")
    print(f"{'NAME':<31} {'SEQ':>10} {'REVISION':>10}  {'TAKEN':<23} {'SIZE':>10}  BY")
    for m in metas:
        print(f"{m.name:<31} {m.seq:>10} {m.revision:>10}  {_utc(m.created_at):<23} {_size(m.size):>10}  {m.node_id}")


def _registry_files(data: Path) -> list[Path]:
    """The registry files of this data directory: its own and its workers' (serve --workers)."""
    workers = sorted((data / "workers").glob("*/registry.sqlite"))
    own = data / "registry.sqlite"
    return [own, *workers] if own.exists() or not workers else workers


def _port_answers(host: str, port: int) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


class _Session:
    """The NATS this restore works through: the cluster's, or the data directory's embedded server started here."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.embedded: EmbeddedNats | None = None
        self.bus: Bus | None = None

    async def open(self) -> Bus:
        cfg = self.cfg
        if cfg.embedded_nats:
            if cfg.nats.port and _port_answers(cfg.nats.host, cfg.nats.port):
                raise Refused(
                    f"a server answers on the embedded NATS port {cfg.nats.port} (nats.port): a replica of this "
                    "data directory is running; stop it first"
                )
            token = server_token(
                host="127.0.0.1", token=cfg.nats.token, token_file=cfg.nats.token_file, data_dir=cfg.data_path
            )
            self.embedded = EmbeddedNats(
                data_dir=cfg.data_path, name=cfg.node_id, host="127.0.0.1", port=0, sync_always=True, token=token
            )
            url = await self.embedded.start()
            self.bus = Bus([url], name="fleetmate-restore", token=token)
        else:
            tls = tls_context(cfg.nats.tls_ca, cfg.nats.tls_cert, cfg.nats.tls_key)
            token = client_token(cfg.nats.token, cfg.nats.token_file)
            self.bus = Bus(cfg.nats.url, name="fleetmate-restore", token=token, tls=tls)
        await self.bus.connect(cfg.nats.connect_timeout)
        return self.bus

    async def close(self) -> None:
        if self.bus is not None:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self.embedded is not None:
            await self.embedded.stop()


async def running_replicas(cfg: Config, bus: Bus, replicas: int) -> list[str]:
    """Why the cluster is not stopped: replicas answering on the bus, a lease still renewed; [] when stopped.

    A lease with no replica answering is that of a replica killed without releasing it: it
    expires by itself within lease.ttl, so wait for that; one still held after is being renewed.
    """
    found = []
    for reply in await ping(bus.nc, subjects.SYSTEM_SERVICE, 1.0):
        meta = reply.get("metadata")
        node = meta.get("node_id", "?") if isinstance(meta, dict) else "?"
        found.append(f"replica {node} answers on the bus")
    if found:
        return found
    backend = lease_backends.create(cfg, bus, replicas)
    try:
        holder = await backend.current()
        if holder is not None:
            wait = cfg.lease.ttl + cfg.lease.renew_interval + 1.0
            print(f"the leader lease is held by {holder.holder}, which does not answer: waiting up to {wait:g} s ...")
            deadline = time.monotonic() + wait
            while holder is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                holder = await backend.current()
    finally:
        await backend.close()
    if holder is not None:
        found.append(
            f"the leader lease ({cfg.lease.backend}) is held by {holder.holder} and renewed past lease.ttl "
            f"({cfg.lease.ttl:g} s): a replica runs that does not answer on the bus"
        )
    return found


async def count_commands(bus: Bus, start: int, last: int) -> tuple[int, int]:
    """(entries, commands) in the log from sequence start to last, with a progress line every second."""
    if start > last:
        return 0, 0
    inbox: asyncio.Queue[Msg] = asyncio.Queue()

    async def receive(msg: Msg) -> None:
        inbox.put_nowait(msg)

    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    sub = await bus.js.subscribe(subjects.REGISTRY_LOG, stream=STREAM, cb=receive, ordered_consumer=True, config=cfg)
    entries = commands = 0
    total = last - start + 1
    shown = time.monotonic()
    try:
        while True:
            msg = await asyncio.wait_for(inbox.get(), 30.0)
            seq = stream_seq(msg)
            entries += 1
            with contextlib.suppress(msgspec.DecodeError):
                commands += len(_counted.decode(msg.data).commands)
            if time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                done = seq - start + 1
                print(f"  reading the log: {done}/{total} entries ({100 * done // total}%)", file=sys.stderr)
            if seq >= last:
                return entries, commands
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _confirm(args: argparse.Namespace) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise Refused("this drops the log's entries after the snapshot: add --yes to go on")
    answer = input("type yes to restore: ")
    if answer.strip().lower() != "yes":
        raise Refused("not restored")


async def _main(args: argparse.Namespace, cfg: Config) -> int:
    store = snapshot_stores.create(cfg)
    try:
        await store.open()
        metas = await store.list(SERVICE)
    except Exception as exc:
        raise Refused(f"cannot read the {store.name} store ({store.describe()}): {exc}") from exc
    try:
        if args.list:
            _print_list(store, metas)
            return EXIT_OK
        if not store.durable:
            raise Refused("snapshot.store is memory: snapshots do not outlive a replica; nothing to restore")
        if not metas:
            raise Refused(f"no snapshot of the registry in the {store.name} store ({store.describe()})")
        chosen = choose(metas, args.revision, parse_time(args.at) if args.at else None)
        print(
            f"snapshot {chosen.name}: revision {chosen.revision}, log sequence {chosen.seq}, taken "
            f"{_utc(chosen.created_at)} by {chosen.node_id}, {_size(chosen.size)}, from {store.describe()}"
        )
        return await _restore(args, cfg, store, metas, chosen)
    finally:
        with contextlib.suppress(Exception):
            await store.close()


async def _restore(
    args: argparse.Namespace, cfg: Config, store: SnapshotStore, metas: list[SnapshotMeta], chosen: SnapshotMeta
) -> int:
    data = cfg.data_path
    for worker in sorted((data / "workers").glob("*")):
        if (who := datadir.holder(worker)) is not None:
            raise Refused(f"a worker runs in {worker} ({who}): stop fleetmate first")
    lock = datadir.DataDirLock(data)
    try:
        lock.acquire("fleetmate restore")  # no replica starts here while we work
    except datadir.DataDirInUse as exc:
        raise Refused(f"{exc}: stop it first") from None
    session = _Session(cfg)
    try:
        try:
            bus = await session.open()
        except (BusError, EmbeddedNatsError) as exc:
            raise Refused(str(exc)) from None
        replicas = cfg.registry.stream_replicas or min(3, bus.cluster_size())
        print("checking that no replica runs ...")
        if running := await running_replicas(cfg, bus, replicas):
            raise Refused("the cluster is not stopped: " + "; ".join(running))
        await ensure_stream(bus.js, stream_config(STREAM, subjects.REGISTRY_LOG, replicas))
        info = await bus.js.stream_info(STREAM)
        first, last, lid = info.state.first_seq, info.state.last_seq, log_id(info)

        # Where the restored state goes: past every sequence the log or any snapshot or local file
        # used (a sequence names one entry for good), with its revision counter above every
        # revision the cluster may have reached (the newest snapshot plus a command per entry after it).
        files = _registry_files(data)
        local = []
        for path in files:
            if path.exists():
                local.append(registry_files.position(path, cfg.registry.event_history))
        newest = metas[0]
        tail_from = max(first, newest.seq + 1)
        print(f"the log {STREAM} holds sequences {first}-{last}; counting the writes after the newest snapshot ...")
        entries, commands = await count_commands(bus, tail_from, last)
        print(f"  {entries} entries holding {commands} commands after {newest.name}")
        base = max(last, newest.seq, *(seq for seq, _ in local)) + 1
        revision = max(chosen.revision, newest.revision + commands, *(rev for _, rev in local))
        dropped = max(0, last - max(first - 1, chosen.seq))
        print(
            f"the registry goes back to revision {chosen.revision}'s state; {dropped} log entries after it are "
            f"dropped; it continues at log sequence {base + 1}, the next write getting revision {revision + 1}"
        )
        _confirm(args)

        blob = await store.load(chosen)
        try:
            raw = await asyncio.to_thread(zlib.decompress, blob)
            seq, _ = registry_files.image_position(raw)
        except (zlib.error, ValueError) as exc:
            raise SnapshotCorrupt(f"{chosen.name}: {exc}") from exc
        if seq != chosen.seq:
            raise SnapshotCorrupt(f"{chosen.name}: the image says sequence {seq}, the meta {chosen.seq}")
        image = await asyncio.to_thread(registry_files.rebase_image, raw, base, revision)
        packed = await asyncio.to_thread(zlib.compress, image, 6)
        meta = make_meta(SERVICE, base, revision, time.time(), f"restore of {chosen.name}", packed, lid)
        await store.save(meta, packed)
        print(f"saved {meta.name} ({_size(meta.size)}) to the {store.name} store")
        for path in files:
            # Killed from here on, the store's newest snapshot is past the log: a replica refuses to
            # start (LogConflict), or continues an empty log from it, until this command is run again.
            failpoints.hit("snapshot.restore")
            await asyncio.to_thread(registry_files.install, path, cfg.registry.event_history, image, lid)
            print(f"installed in {path}")
        await bus.js.purge_stream(STREAM, seq=base + 1)
        after = await bus.js.stream_info(STREAM)
        if after.state.first_seq != base + 1 or after.state.messages:
            raise Refused(
                f"the log did not come out empty at sequence {base + 1} (it holds {after.state.messages} entries "
                f"from {after.state.first_seq}): did a replica start? Run fleetmate restore again"
            )
        print(f"log {STREAM} emptied; it continues at sequence {base + 1}")
        if not store.shared:
            print(
                f"note: the {store.name} store is this host's; replicas on other hosts restore only from their own "
                f"snapshot directory: copy {meta.name}.snap and {meta.name}.json into it (or share snapshot.dir)"
            )
        print("restored: start the replicas; each restores this snapshot (see docs/durability.md)")
        return EXIT_OK
    except SnapshotCorrupt as exc:
        raise Refused(f"the snapshot cannot be used: {exc}") from None
    finally:
        await session.close()
        lock.release()
