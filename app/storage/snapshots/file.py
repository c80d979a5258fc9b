"""Snapshots as files in a directory: `<dir>/<service>/<name>.snap` with a `.json` meta beside it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import ClassVar

import msgspec

from app import failpoints
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, log

_meta_dec = msgspec.json.Decoder(SnapshotMeta)


def _write_atomically(path: Path, data: bytes, failpoint: str = "") -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        if failpoint:
            fh.flush()
            failpoints.hit(failpoint)  # half the bytes in the temporary file, nothing renamed
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSnapshotStore(SnapshotStore):
    """A directory on local disk (or one several replicas mount).

    The blob is written first and the meta last, each through a temporary file, fsync and
    rename, so a snapshot is listed only once it is complete.
    """

    name: ClassVar[str] = "file"
    shared: ClassVar[bool] = False

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    async def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> str:
        return f"directory {self.dir}"

    def _paths(self, meta: SnapshotMeta) -> tuple[Path, Path]:
        base = self.dir / meta.service
        return base / f"{meta.name}.snap", base / f"{meta.name}.json"

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        def write() -> None:
            blob, side = self._paths(meta)
            blob.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(blob, data, "snapshot.write")
            _write_atomically(side, msgspec.json.encode(meta))
            _fsync_dir(blob.parent)

        await asyncio.to_thread(write)

    async def _list(self, service: str) -> list[SnapshotMeta]:
        def scan() -> list[SnapshotMeta]:
            out = []
            for side in (self.dir / service).glob(f"{service}-*.json"):
                try:
                    out.append(_meta_dec.decode(side.read_bytes()))
                except (OSError, msgspec.DecodeError) as exc:
                    log.error("unreadable snapshot meta skipped", extra={"file": str(side), "error": str(exc)})
            return out

        return await asyncio.to_thread(scan)

    async def _load(self, meta: SnapshotMeta) -> bytes:
        blob, _ = self._paths(meta)
        try:
            return await asyncio.to_thread(blob.read_bytes)
        except FileNotFoundError:
            raise SnapshotCorrupt(f"{meta.name}: {blob} is missing") from None

    async def _sweep(self, service: str, below_seq: int) -> None:
        # A cut-short save leaves `.<name>.snap.tmp-<pid>` or `.<name>.json.tmp-<pid>`, or `<name>.snap`
        # with no meta; a cut-short delete the blob. None of them is ever listed.
        leftover = re.compile(
            rf"^\.?(?P<name>{re.escape(service)}-(?P<seq>\d{{20}}))\.(?:snap|json)(?P<tmp>\.tmp-\d+)?$"
        )

        def sweep() -> None:
            folder = self.dir / service
            for path in folder.glob(f"*{service}-*"):
                found = leftover.match(path.name)
                if found is None or int(found["seq"]) >= below_seq:
                    continue
                if found["tmp"] or (path.suffix == ".snap" and not (folder / f"{found['name']}.json").exists()):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    log.info("snapshot leftover removed", extra={"file": str(path)})

        await asyncio.to_thread(sweep)

    async def _delete(self, meta: SnapshotMeta) -> None:
        def remove() -> None:
            blob, side = self._paths(meta)
            for path in (side, blob):  # meta first: a half-deleted snapshot is never listed
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

        await asyncio.to_thread(remove)
