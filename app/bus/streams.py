"""Declare JetStream streams and KV buckets idempotently (create, or update to the wanted config)."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger("fleetmate.bus")

STREAM_NAME_IN_USE = 10058


def _retryable(exc: Exception) -> bool:
    """A timeout (no meta leader yet), or another replica creating the same stream at the same moment."""
    if isinstance(exc, TimeoutError | NatsTimeout):
        return True
    return isinstance(exc, APIError) and exc.err_code == STREAM_NAME_IN_USE


async def ensure_stream(js: JetStreamContext, config: StreamConfig, attempts: int = 30) -> None:
    """Create the stream, or update it when it exists with another config.

    Retries while the NATS cluster has no JetStream meta leader yet (a fresh
    3-node cluster needs a few seconds).
    """
    assert config.name
    for attempt in range(attempts):
        try:
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                await js.add_stream(config)
                log.info("stream created", extra={"stream": config.name})
                return
            if (
                info.config.subjects != config.subjects
                or info.config.max_age != config.max_age
                or info.config.num_replicas != config.num_replicas
                or (config.max_bytes is not None and info.config.max_bytes != config.max_bytes)
            ):
                await js.update_stream(config)
                log.info("stream updated", extra={"stream": config.name})
            return
        except (TimeoutError, NatsTimeout, APIError) as exc:
            if attempt == attempts - 1 or not _retryable(exc):
                raise
            await asyncio.sleep(0.5)


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    ttl: float | None = None,
    replicas: int = 1,
    attempts: int = 30,
) -> KeyValue:
    """Return the KV bucket, creating it when missing."""
    for attempt in range(attempts):
        try:
            try:
                return await js.key_value(bucket)
            except (BucketNotFoundError, NotFoundError):
                kv = await js.create_key_value(
                    KeyValueConfig(
                        bucket=bucket,
                        history=history,
                        ttl=ttl,
                        replicas=replicas,
                        storage=StorageType.FILE,
                    )
                )
                log.info("kv bucket created", extra={"bucket": bucket})
                return kv
        except (TimeoutError, NatsTimeout, APIError) as exc:
            if attempt == attempts - 1 or not _retryable(exc):
                raise
            await asyncio.sleep(0.5)
    raise RuntimeError("unreachable")


class _Cluster(msgspec.Struct):
    leader: str = ""


class _LeaderInfo(msgspec.Struct):
    cluster: _Cluster = msgspec.field(default_factory=_Cluster)


async def step_down_if_leading(nc: Client, streams: list[str], server_name: str, timeout: float = 2.0) -> list[str]:
    """Ask JetStream to move the leadership of each stream that `server_name` leads to another server.

    Used on a graceful stop: when the host then goes down with its nats-server, the log is not
    left waiting out a Raft election timeout (4-9 s). Returns the streams that were stepped down.
    """
    moved = []
    for stream in streams:
        try:
            reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=timeout)
            if msgspec.json.decode(reply.data, type=_LeaderInfo).cluster.leader != server_name:
                continue
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=timeout)
            moved.append(stream)
        except Exception as exc:  # best effort: the stop goes on
            log.warning("stream leader step-down failed", extra={"stream": stream, "error": repr(exc)})
    if moved:
        log.info("stepped stream leadership away before stopping", extra={"streams": moved, "server": server_name})
    return moved
