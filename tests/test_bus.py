"""The bus layer against a real nats-server: idempotent declarations, codecs, micro services, errors."""

from __future__ import annotations

import msgspec
import pytest
from nats.js.api import StreamConfig

from app.bus import codec
from app.bus.connection import Bus, BusError
from app.bus.micro import Endpoint, HandlerError, call, start_service
from app.bus.streams import ensure_kv, ensure_stream
from tests.harness import NatsServer


class Ping(msgspec.Struct, frozen=True):
    n: int
    data: bytes = b""


async def test_ensure_stream_and_kv_are_idempotent(nats_server: NatsServer) -> None:
    bus = Bus([nats_server.url], "test")
    await bus.connect(5)
    try:
        cfg = StreamConfig(name="T_LOG", subjects=["t.log.>"])
        await ensure_stream(bus.js, cfg)
        await ensure_stream(bus.js, cfg)  # same config: no error, no change
        await bus.js.publish("t.log.a", b"x")
        await ensure_stream(bus.js, StreamConfig(name="T_LOG", subjects=["t.log.>", "t.more.>"]))  # updated
        info = await bus.js.stream_info("T_LOG")
        assert info.config.subjects == ["t.log.>", "t.more.>"]
        assert info.state.messages == 1  # the update kept the data

        kv = await ensure_kv(bus.js, "t_bucket")
        await kv.put("k", b"v")
        again = await ensure_kv(bus.js, "t_bucket")
        assert (await again.get("k")).value == b"v"
        assert await bus.jetstream_ok() is None
    finally:
        await bus.close()


async def test_codec_round_trip_and_rejects_garbage() -> None:
    msg = Ping(n=3, data=b"\x00\xff")
    assert codec.decode(codec.encode(msg), Ping) == msg
    with pytest.raises(msgspec.DecodeError):
        codec.decode(b"\xc1", Ping)
    with pytest.raises(msgspec.ValidationError):
        codec.decode(codec.encode({"n": "three"}), Ping)


async def test_micro_service_round_trip_errors_and_discovery(nats_server: NatsServer) -> None:
    bus = Bus([nats_server.url], "test")
    await bus.connect(5)

    async def echo(data: bytes) -> bytes:
        ping = codec.decode(data, Ping)
        if ping.n < 0:
            raise HandlerError("400", "n must not be negative")
        if ping.n == 13:
            raise RuntimeError("boom")
        return codec.encode(Ping(n=ping.n + 1))

    service = await start_service(
        bus.nc,
        name="test-echo",
        version="1.0.0",
        description="echo",
        endpoints=[Endpoint("echo", "t.echo", echo)],
        metadata={},
    )
    try:
        assert codec.decode(await call(bus.nc, "t.echo", codec.encode(Ping(n=1))), Ping).n == 2
        with pytest.raises(HandlerError) as err:
            await call(bus.nc, "t.echo", codec.encode(Ping(n=-1)))
        assert (err.value.code, err.value.description) == ("400", "n must not be negative")
        with pytest.raises(HandlerError) as err:
            await call(bus.nc, "t.echo", codec.encode(Ping(n=13)))
        assert (err.value.code, err.value.description) == ("500", "internal error")  # no internals leak
        # $SRV.PING finds the service.
        reply = await bus.nc.request("$SRV.PING.test-echo", b"", timeout=2)
        assert msgspec.json.decode(reply.data)["name"] == "test-echo"
    finally:
        await service.stop()
        await bus.close()


async def test_connect_gives_up_after_timeout() -> None:
    bus = Bus(["nats://127.0.0.1:1"], "test")
    with pytest.raises(BusError, match=r"cannot connect to NATS at nats://127\.0\.0\.1:1"):
        await bus.connect(1.0)
    assert await bus.jetstream_ok() == "not connected to NATS"
