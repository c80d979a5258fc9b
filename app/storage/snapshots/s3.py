"""Snapshots in S3 (MinIO, SeaweedFS, AWS): `<prefix>snapshots/<service>/<name>.snap` with a `.json` meta beside it."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import msgspec

from app import failpoints
from app.config import S3Config
from app.storage.s3client import S3Client
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, log

_meta_dec = msgspec.json.Decoder(SnapshotMeta)


class S3SnapshotStore(SnapshotStore):
    """One bucket shared by every replica.

    The blob is written first and its meta object last, so a snapshot is listed only once it
    is complete; delete goes the other way round. A re-save of the same name overwrites both.
    """

    name: ClassVar[str] = "s3"

    def __init__(self, cfg: S3Config, client: S3Client | None = None) -> None:
        self.client = client or S3Client(cfg)

    def _keys(self, meta: SnapshotMeta) -> tuple[str, str]:
        base = self.client.key("snapshots", meta.service, meta.name)
        return base + ".snap", base + ".json"

    async def open(self) -> None:
        await self.client.ensure_bucket()

    async def close(self) -> None:
        await self.client.close()

    def describe(self) -> str:
        return f"{self.client.endpoint} bucket {self.client.bucket!r} under {self.client.key('snapshots')!r}"

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        blob, side = self._keys(meta)
        await self.client.put(blob, data)
        failpoints.hit("snapshot.write")  # the blob is stored, the meta object that lists it is not
        await self.client.put(side, msgspec.json.encode(meta))

    async def _list(self, service: str) -> list[SnapshotMeta]:
        prefix = self.client.key("snapshots", service, f"{service}-")
        sides = [key for key in await self.client.list(prefix) if key.endswith(".json")]
        found = await asyncio.gather(*(self.client.get(key) for key in sides))
        out = []
        for key, got in zip(sides, found, strict=True):
            if got is None:
                continue  # deleted since the listing
            try:
                out.append(_meta_dec.decode(got[0]))
            except msgspec.DecodeError as exc:
                log.error("unreadable snapshot meta skipped", extra={"store": self.name, "key": key, "error": str(exc)})
        return out

    async def _load(self, meta: SnapshotMeta) -> bytes:
        blob, _ = self._keys(meta)
        got = await self.client.get(blob)
        if got is None:
            raise SnapshotCorrupt(f"{meta.name}: object {blob} is missing")
        return got[0]

    async def _sweep(self, service: str, below_seq: int) -> None:
        # A save cut short leaves a blob without its meta object; so does a delete cut short.
        prefix = self.client.key("snapshots", service, f"{service}-")
        keys = set(await self.client.list(prefix))
        for key in keys:
            stem, dot, ext = key.rpartition(".")
            seq = stem.rpartition("-")[2]
            if dot and ext == "snap" and f"{stem}.json" not in keys and seq.isdigit() and int(seq) < below_seq:
                await self.client.delete(key)
                log.info("snapshot leftover removed", extra={"store": self.name, "key": key})

    async def _delete(self, meta: SnapshotMeta) -> None:
        blob, side = self._keys(meta)
        await self.client.delete(side)
        await self.client.delete(blob)
