"""Fuzzing the scheduler's data-node subjects and log decoder: junk gets a clear error and changes nothing.

Every NATS endpoint a data node uses (register, ack, sync, route, heartbeat) gets random bytes,
random JSON and well-formed bodies with hostile values on a real replica; each answer must be a
NodeReply error (or the asked-for Assignment/Route), the replica must stay up, and the applied state
must be what it was. The log entry decoder is fuzzed in process: anything but an Entry is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.services.scheduler import protocol
from app.services.scheduler.replicated import decode_entry, encode_entry
from tests.harness import Fleetmate, wait_for

BASE = "/api/v1/scheduler"
SUBJECTS = [
    protocol.SUBJECT_REGISTER,
    protocol.SUBJECT_ACK,
    protocol.SUBJECT_SYNC,
    protocol.SUBJECT_ROUTE,
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["cluster", "node", "shard", "epoch", "status", "address", "labels", "capacity", "lease_s", "key", "table"]
hostile = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.just("fz"),
    st.just("n1"),
    st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40),
    st.none(),
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(msgspec.json.encode),
    st.dictionaries(st.sampled_from(FIELDS), hostile, max_size=8).map(msgspec.json.encode),
)


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    replica = Fleetmate(tmp_path_factory.mktemp("fuzz")).start(timeout=30)
    assert (
        replica.post(
            f"{BASE}/clusters", {"name": "fz", "shard_count": 4, "max_replicas": 1, "node_count": 1, "lease_s": 3600}
        ).status_code
        == 201
    )
    assert replica.post(f"{BASE}/clusters/fz/nodes", {"node": "n1"}).status_code == 201
    wait_for(lambda: replica.get(f"{BASE}/clusters/fz").json()["placed"] or None, 15, "placement")
    for s in replica.get(f"{BASE}/clusters/fz/nodes/n1/assignment").json()["shards"]:  # n1 opens them all
        replica.post(f"{BASE}/clusters/fz/nodes/n1/acks", {"shard": s["id"], "epoch": s["epoch"]})
    wait_for(lambda: replica.get(f"{BASE}/clusters/fz").json()["procedures_running"] == 0 or None, 15, "placed")
    yield replica
    replica.stop()


def _snapshot(fm: Fleetmate) -> Any:
    view = fm.get(f"{BASE}/clusters/fz").json()
    view.pop("revision")
    nodes = fm.get(f"{BASE}/clusters/fz/nodes").json()
    for n in nodes:
        n.pop("heard_s_ago")  # a clock, not state
    return view, fm.get(f"{BASE}/clusters/fz/shards").json(), nodes


def _nats_url(fm: Fleetmate) -> str:
    return str(next(line["nats"] for line in fm.lines if line.get("msg") == "fleetmate ready"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=st.sampled_from(SUBJECTS), body=bodies)
def test_junk_on_every_data_node_subject_is_refused_and_changes_nothing(
    fm: Fleetmate, subject: str, body: bytes
) -> None:
    async def ask() -> bytes:
        nc = await nats.connect(_nats_url(fm))
        try:
            await nc.publish(protocol.SUBJECT_HEARTBEAT, body)  # no reply: must be ignored
            return bytes((await nc.request(subject, body, timeout=10)).data)
        finally:
            await nc.close()

    before = _snapshot(fm)
    answer = msgspec.json.decode(asyncio.run(ask()))
    assert isinstance(answer, dict)
    if "ok" in answer:  # a NodeReply; success only for a well-formed request that changes nothing here
        if not answer["ok"]:
            assert answer["error"]
            assert answer["message"]
    else:
        assert {"cluster", "revision"} <= set(answer)  # an Assignment or a Route
    assert fm.alive
    after = _snapshot(fm)
    if subject in (protocol.SUBJECT_REGISTER, protocol.SUBJECT_ACK) and answer.get("ok"):
        return  # a valid registration of n1 again, or a valid ack: allowed to change heard-times and acks
    assert after == before


def test_the_replica_still_serves_after_the_fuzzing(fm: Fleetmate) -> None:
    assert httpx.get(fm.url + "/api/v1/ready", timeout=5).json()["ready"] is True
    assert fm.get(f"{BASE}/clusters/fz").json()["placed"] is True


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_the_log_entry_decoder_refuses_anything_but_an_entry(data: bytes) -> None:
    try:
        commands = decode_entry(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    assert decode_entry(encode_entry(commands)) == commands  # whatever decodes, round-trips


def test_every_command_round_trips_through_the_entry_codec(tmp_path: Path) -> None:
    from app.services.scheduler.messages import (
        Advance,
        Cancel,
        ClusterSpec,
        CreateCluster,
        NodeSpec,
        Operator,
        Propose,
        RecordLoad,
        RegisterNode,
        Report,
    )

    cmds = [
        CreateCluster(ClusterSpec("c", shard_count=100_000), 1),
        RegisterNode("c", NodeSpec("n" * 64, "a" * 256, {"k" * 64: "v" * 256}, 1 << 60, 3600), 2),
        Propose("c", Operator("scatter", (2**31,), targets=("a", "b", "c")), 2**62, 3, "f" * 32),
        Advance(2**62, -1, 2**62, 4, "e" * 32),
        Cancel(1, "x" * 500, 5),
        Report("c", "n", 2**31, 2**62, "closed", 6),
        RecordLoad("c", {1: 1 << 60}, {1: 1e12}, 1, 7),
    ]
    assert decode_entry(encode_entry(cmds)) == cmds
