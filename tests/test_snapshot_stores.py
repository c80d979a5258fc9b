"""One contract suite for every snapshot store (s3, mysql, postgresql, file, memory), on real servers."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config import S3Config
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, make_meta
from app.storage.snapshots.mysql import MySQLSnapshotStore
from app.storage.snapshots.postgresql import PostgreSQLSnapshotStore
from app.storage.snapshots.s3 import S3SnapshotStore
from tests.harness.servers import MariaDB, Postgres, SeaweedS3

MIB = 1 << 20
STORES = ["s3", "mysql", "postgresql", "file", "memory"]


@dataclass
class StoreCase:
    """An opened store, and how to damage one of its blobs behind its back."""

    store: SnapshotStore
    tamper: Callable[[SnapshotMeta], Awaitable[None]]


async def _open_s3(request: pytest.FixtureRequest, tag: str) -> StoreCase:
    s3: SeaweedS3 = request.getfixturevalue("s3_server")
    cfg = S3Config(
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        bucket=s3.bucket,
        region=s3.region,
        prefix=f"t-{tag}",  # no trailing slash: the client adds it
    )
    store = S3SnapshotStore(cfg)

    async def tamper(meta: SnapshotMeta) -> None:
        key = store.client.key("snapshots", meta.service, meta.name + ".snap")
        found = await store.client.get(key)
        assert found is not None, key
        await store.client.put(key, _flip(found[0]))

    return StoreCase(store, tamper)


async def _open_sql(request: pytest.FixtureRequest, tag: str, kind: str) -> StoreCase:
    store: MySQLSnapshotStore | PostgreSQLSnapshotStore
    if kind == "mysql":
        mariadb: MariaDB = request.getfixturevalue("mariadb")
        store = MySQLSnapshotStore(mariadb.dsn, table_prefix=f"t{tag}_")
    else:
        postgres: Postgres = request.getfixturevalue("postgres")
        store = PostgreSQLSnapshotStore(postgres.dsn, table_prefix=f"t{tag}_")

    async def tamper(meta: SnapshotMeta) -> None:
        rows = await store.db.fetch(
            f"SELECT data FROM {store.chunks} WHERE service = ? AND seq = ? AND idx = 0", meta.service, meta.seq
        )
        assert rows, meta.name
        changed = await store.db.execute(
            f"UPDATE {store.chunks} SET data = ? WHERE service = ? AND seq = ? AND idx = 0",
            _flip(bytes(rows[0][0])),
            meta.service,
            meta.seq,
        )
        assert changed == 1

    return StoreCase(store, tamper)


def _open_file(tmp_path: Path) -> StoreCase:
    from app.storage.snapshots.file import FileSnapshotStore

    root = tmp_path / "snapshots"
    store = FileSnapshotStore(root)

    async def tamper(meta: SnapshotMeta) -> None:
        blob = root / meta.service / f"{meta.name}.snap"
        blob.write_bytes(_flip(blob.read_bytes()))

    return StoreCase(store, tamper)


def _open_memory() -> StoreCase:
    from app.storage.snapshots.memory import MemorySnapshotStore

    store = MemorySnapshotStore()

    async def tamper(meta: SnapshotMeta) -> None:
        items = store._items
        old_meta, data = items[(meta.service, meta.seq)]
        items[(meta.service, meta.seq)] = (old_meta, _flip(data))

    return StoreCase(store, tamper)


def _flip(data: bytes) -> bytes:
    """The same bytes with one flipped in the middle: same size, wrong checksum."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.fixture(params=STORES)
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreCase]:
    """An opened store of the parametrized kind, with tables or prefixes nobody else uses."""
    kind: str = request.param
    tag = uuid.uuid4().hex[:10]
    if kind == "s3":
        made = await _open_s3(request, tag)
    elif kind in ("mysql", "postgresql"):
        made = await _open_sql(request, tag, kind)
    elif kind == "file":
        made = _open_file(tmp_path)
    else:
        made = _open_memory()
    await made.store.open()
    try:
        yield made
    finally:
        await made.store.close()


def blob(size: int, seed: int) -> bytes:
    """size bytes that differ from one seed to another and do not compress to nothing."""
    chunk = os.urandom(4096) + seed.to_bytes(8, "big")
    return (chunk * (size // len(chunk) + 1))[:size]


def meta_for(service: str, seq: int, data: bytes) -> SnapshotMeta:
    return make_meta(service, seq, revision=seq * 10, created_at=time.time(), node_id="n1", data=data)


async def test_save_list_load_round_trip_with_a_multi_chunk_blob(case: StoreCase) -> None:
    store = case.store
    big = blob(5 * MIB + 123, 1)  # more than one 4 MiB chunk
    saved = {}
    for seq, data in ((7, b"small"), (42, big), (9, b""), (100, blob(3000, 2))):
        meta = meta_for("registry", seq, data)
        await store.save(meta, data)
        saved[seq] = (meta, data)
    listed = await store.list("registry")
    assert [m.seq for m in listed] == [100, 42, 9, 7]
    for meta in listed:
        assert meta == saved[meta.seq][0]
        assert await store.load(meta) == saved[meta.seq][1]


async def test_saving_the_same_seq_replaces_it(case: StoreCase) -> None:
    store = case.store
    first = blob(5 * MIB, 3)  # several chunks, then one: no chunk of the first may survive
    await store.save(meta_for("registry", 5, first), first)
    second = b"second version"
    meta = meta_for("registry", 5, second)
    await store.save(meta, second)
    assert await store.list("registry") == [meta]
    assert await store.load(meta) == second


async def test_prune_keeps_the_newest(case: StoreCase) -> None:
    store = case.store
    for seq in (3, 1, 5, 4, 2):
        data = f"state at {seq}".encode()
        await store.save(meta_for("registry", seq, data), data)
    kept = await store.prune("registry", keep=2)
    assert [m.seq for m in kept] == [5, 4]
    assert [m.seq for m in await store.list("registry")] == [5, 4]
    assert await store.load(kept[1]) == b"state at 4"


async def test_a_tampered_blob_is_reported_corrupt(case: StoreCase) -> None:
    store = case.store
    data = blob(2 * MIB, 4)
    meta = meta_for("registry", 11, data)
    await store.save(meta, data)
    await case.tamper(meta)
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        await store.load(meta)


async def test_loading_a_missing_snapshot_is_corrupt_and_deleting_it_is_fine(case: StoreCase) -> None:
    store = case.store
    ghost = meta_for("registry", 77, b"never saved")
    with pytest.raises(SnapshotCorrupt):
        await store.load(ghost)
    await store.delete(ghost)
    await store.delete(ghost)
    data = b"saved"
    meta = meta_for("registry", 78, data)
    await store.save(meta, data)
    await store.delete(meta)
    assert await store.list("registry") == []
    with pytest.raises(SnapshotCorrupt):
        await store.load(meta)


async def test_services_are_kept_apart(case: StoreCase) -> None:
    store = case.store
    assert await store.list("nobody") == []
    await store.save(meta_for("reg", 1, b"a"), b"a")
    await store.save(meta_for("registry", 2, b"b"), b"b")
    assert [m.service for m in await store.list("reg")] == ["reg"]
    assert [m.service for m in await store.list("registry")] == ["registry"]
    assert await store.list("re") == []
