"""The jute decoder never fails on hostile bytes except with JuteError; encodings round-trip."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.services.registry.messages import Acl
from app.zk import protocol as p
from app.zk.jute import JuteError, Reader, Writer


@settings(max_examples=2000)
@given(st.binary(max_size=256))
def test_random_request_bytes_decode_or_raise_jute_error(data: bytes) -> None:
    with contextlib.suppress(JuteError):
        p.read_request(data)


@settings(max_examples=500)
@given(st.binary(max_size=128))
def test_random_connect_bytes_decode_or_raise_jute_error(data: bytes) -> None:
    with contextlib.suppress(JuteError):
        p.read_connect(data)


OPS = sorted(p.DECODERS)


@settings(max_examples=1500)
@given(st.sampled_from(OPS), st.binary(max_size=200), st.integers(min_value=0, max_value=200))
def test_every_op_with_a_valid_header_and_truncated_or_random_body(op: int, body: bytes, cut: int) -> None:
    packet = struct.pack(">ii", 7, op) + body
    for data in (packet, packet[: max(8, cut)]):
        try:
            xid, got_op, _ = p.read_request(data)
            assert (xid, got_op) == (7, op)
        except JuteError:
            pass


@given(
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.binary(max_size=64),
    st.text(max_size=32),
    st.lists(st.text(max_size=8), max_size=5),
)
def test_writer_and_reader_round_trip(i: int, n: int, b: bool, raw: bytes, text: str, texts: list[str]) -> None:
    frame = Writer().int(i).long(n).bool(b).buffer(raw).ustring(text).strings(texts).frame()
    assert struct.unpack(">i", frame[:4])[0] == len(frame) - 4
    r = Reader(frame[4:])
    assert (r.int(), r.long(), r.bool(), r.buffer(), r.ustring(), r.strings()) == (i, n, b, raw, text, texts)
    assert r.remaining() == 0


def test_a_create_request_decodes_field_by_field() -> None:
    w = Writer().int(3).int(p.CREATE2).ustring("/a").buffer(b"d")
    p.write_acl(w, (Acl(31, "world", "anyone"),)).int(3)
    xid, op, req = p.read_request(w.frame()[4:])
    assert (xid, op) == (3, p.CREATE2)
    assert req == p.CreateRequest("/a", b"d", (Acl(31, "world", "anyone"),), 3)


def test_a_multi_with_a_forbidden_op_is_refused() -> None:
    w = Writer().int(1).int(p.MULTI)
    w.int(p.GET_DATA).bool(False).int(-1).ustring("/a").bool(False)  # a read inside a write multi
    w.int(-1).bool(True).int(-1)
    with pytest.raises(JuteError, match="not allowed"):
        p.read_request(w.frame()[4:])
