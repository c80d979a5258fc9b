"""Write deadlines kept per log entry, and the stream sequence read from a delivery's reply subject."""

from __future__ import annotations

import asyncio
import math

import pytest
from nats.aio.msg import Msg

from app.log.batcher import expire_queued
from app.log.engine import stream_seq
from app.log.pending import Pending


async def test_an_entry_fails_only_the_writes_past_their_deadline() -> None:
    loop = asyncio.get_running_loop()
    early, late, answered = loop.create_future(), loop.create_future(), loop.create_future()
    answered.set_result("applied")
    pending = Pending([early, late, answered], [10.0, 20.0, 5.0])
    assert pending.due == 5.0

    pending.expire(now=12.0)

    assert isinstance(early.exception(), TimeoutError)
    assert not late.done()
    assert answered.result() == "applied"  # an answered write is left alone
    assert pending.due == 20.0  # the next deadline still open

    pending.expire(now=20.0)
    assert isinstance(late.exception(), TimeoutError)
    assert pending.due == math.inf


async def test_queued_writes_time_out_before_they_are_published() -> None:
    loop = asyncio.get_running_loop()
    old, new = loop.create_future(), loop.create_future()
    queue = [("set a", 10, old, 1.0), ("set b", 10, new, 9.0)]

    expire_queued(queue, now=2.0)

    assert isinstance(old.exception(), TimeoutError)
    assert not new.done()


def _delivery(reply: str) -> Msg:
    return Msg(_client=None, subject="fleetmate.log", reply=reply, data=b"")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "seq"),
    [
        ("$JS.ACK.REGISTRY.cons.1.42.42.1700000000000000000.0", 42),  # the 9-token form
        ("$JS.ACK.hub.ACCHASH.REGISTRY.cons.1.77.70.1700000000000000000.3.rnd", 77),  # domain, account hash
    ],
)
def test_stream_sequence_comes_from_the_reply_subject(reply: str, seq: int) -> None:
    msg = _delivery(reply)
    assert stream_seq(msg) == seq == msg.metadata.sequence.stream  # what nats-py reads, without its dataclasses


def test_a_message_that_is_no_consumer_delivery_is_refused() -> None:
    from nats.errors import NotJSMessageError

    with pytest.raises(NotJSMessageError):
        stream_seq(_delivery("_INBOX.abc"))
