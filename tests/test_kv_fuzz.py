"""Fuzzing the KV: log entry and wire decoders, the partition machine with any command, and every body the API takes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.services.kv.errors import KvError
from app.services.kv.machine import PartitionState
from app.services.kv.messages import Batch, Check, Create, Delete, Merge, Op, Put, ShardChanged, Split, Written
from app.services.kv.partition import decode_entry, encode_entry
from app.services.kv.wire import SUBJECT_EXPORT, SUBJECT_PAGE, SUBJECT_REQ, ExportHeader, KvReply, KvRequest, Page
from tests.harness import Fleetmate, free_port, wait_for

text = st.text(max_size=12)
ints = st.integers(min_value=-2, max_value=(1 << 63) - 1)
small = st.integers(min_value=0, max_value=4)
commands = st.one_of(
    st.builds(Create, small, text, text),
    st.builds(Put, small, small, text, text, ints),
    st.builds(Delete, small, small, text, ints),
    st.builds(
        Batch,
        small,
        small,
        st.lists(st.builds(Op, text, st.none() | text), max_size=4).map(tuple),
        st.lists(st.builds(Check, text, ints), max_size=3).map(tuple),
    ),
    st.builds(Split, small, small, text, small),
    st.builds(Merge, small, small, small, small),
)


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_commands_or_a_decode_error(data: bytes) -> None:
    try:
        decoded = decode_entry(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert decode_entry(encode_entry(decoded)) == decoded


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(commands, min_size=1, max_size=5), max_size=25))
def test_the_machine_answers_any_command_without_raising(entries: list[list[Any]]) -> None:
    state = PartitionState(0)
    state.want(0)
    state.begin_entry(1)
    state.apply(Create(0, "", ""))
    for seq, entry in enumerate(entries, start=2):
        assert decode_entry(encode_entry(entry)) == entry
        state.begin_entry(seq)
        for cmd in entry:
            before = {sid: (h.start, h.end, h.epoch, dict(h.items)) for sid, h in state.held.items()}
            result, events = state.apply(cmd)
            assert isinstance(result, Written | ShardChanged | KvError), result
            if isinstance(result, KvError) and not isinstance(cmd, Merge):
                after = {sid: (h.start, h.end, h.epoch, dict(h.items)) for sid, h in state.held.items()}
                assert after == before, (cmd, result)
                assert events == []
        for held in state.held.values():
            assert all(held.covers(k) for k in held.items)


# ---- the API, on a real server ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    root: Path = tmp_path_factory.mktemp("kv-fuzz")
    fm = Fleetmate(root, env={"FLEETMATE_HTTP_PORT": str(free_port()), "FLEETMATE_KV_SHARD_CAPACITY": "65536"})
    fm.start()
    try:
        wait_for(
            lambda: (
                httpx.post(fm.url + "/api/v1/kv/put", json={"key": "keep", "value": "me"}, timeout=30).status_code
                == 200
            ),
            30,
            "the kv store placed and writable",
            0.2,
        )
        yield fm
    finally:
        fm.kill()


def _everything(fm: Fleetmate) -> Any:
    return httpx.get(fm.url + "/api/v1/kv/scan", params={"limit": 10000}, timeout=30).json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"key": json_values, "value": json_values}, optional={"if_revision": json_values, "ops": json_values}
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/set", "/delete", "/api/v1/kv/put", "/api/v1/kv/delete", "/api/v1/kv/batch"]), body=bodies
)
def test_any_body_is_a_clear_answer_and_changes_nothing_unless_valid(server: Fleetmate, path: str, body: bytes) -> None:
    resp = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code < 500, (path, body, resp.text)
    answer = resp.json()
    if path in ("/set", "/delete"):
        assert resp.status_code in (200, 400), resp.text
        assert set(answer) == {"key", "error"} or "error" in answer, answer
    if resp.status_code >= 400 or (path in ("/set", "/delete") and answer.get("error")):
        got = httpx.get(server.url + "/api/v1/kv/get", params={"key": "keep"}, timeout=30).json()
        assert got["value"] == "me"


def test_large_values_in_flight_together_each_get_their_own_answer(server: Fleetmate) -> None:
    """Sixteen 1 MiB puts at once (16 MiB: two log entries' worth) all apply: one large write never fails others."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            answers = await asyncio.gather(
                *(
                    http.post(server.url + "/api/v1/kv/put", json={"key": f"big{i}", "value": "x" * (1 << 20)})
                    for i in range(16)
                )
            )
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 16
    too_big = httpx.post(server.url + "/api/v1/kv/put", json={"key": "big", "value": "x" * ((1 << 20) + 1)}, timeout=30)
    assert too_big.status_code == 400, too_big.text
    assert "kv.max_value_bytes" in too_big.json()["message"]
    batch = {"ops": [{"key": f"b{i}", "value": "y" * (1 << 20)} for i in range(5)]}
    refused = httpx.post(server.url + "/api/v1/kv/batch", json=batch, timeout=30)
    assert refused.status_code == 400, refused.text
    assert httpx.get(server.url + "/api/v1/kv/get", params={"key": "b0"}, timeout=30).status_code == 404


def test_garbage_on_the_replicas_subjects_gets_an_error_answer(server: Fleetmate) -> None:
    """Forwarded requests, copy requests and page requests that do not decode are answered with an error."""
    nats_url = server.logged("fleetmate ready")[0]["nats"]

    async def ask() -> None:
        nc = await nats.connect(nats_url)
        try:
            for data in (b"", b"\xff\x00garbage", msgspec.msgpack.encode({"op": "nope"}), b"\x93\x01\x02"):
                reply = msgspec.msgpack.decode(
                    (await nc.request(f"{SUBJECT_REQ}.t1", data, timeout=10)).data, type=KvReply
                )
                assert not reply.ok
                assert reply.code == "bad_request", reply
                header = msgspec.msgpack.decode(
                    (await nc.request(f"{SUBJECT_EXPORT}.t1", data, timeout=10)).data, type=ExportHeader
                )
                assert not header.ok
                assert header.error
                page = msgspec.msgpack.decode(
                    (await nc.request(f"{SUBJECT_PAGE}.t1", data, timeout=10)).data, type=Page
                )
                assert not page.ok
            ok = msgspec.msgpack.encode(KvRequest("get", "keep"))
            reply = msgspec.msgpack.decode((await nc.request(f"{SUBJECT_REQ}.t1", ok, timeout=10)).data, type=KvReply)
            assert reply.ok
            assert reply.item is not None
            assert reply.item.value == "me"
        finally:
            await nc.close()

    asyncio.run(ask())
    assert not [line for line in server.raw if '"level":"error"' in line or "Traceback" in line]
