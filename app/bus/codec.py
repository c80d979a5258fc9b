"""msgspec codecs for bus payloads: MessagePack on the wire, typed Structs in code."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(obj: Any) -> bytes:
    """Encode a Struct (or plain data) for the bus."""
    return _encoder.encode(obj)


def decode(data: bytes, type_: type[T]) -> T:
    """Decode bus bytes into `type_`; raises msgspec.DecodeError/ValidationError on bad input."""
    dec = _decoders.get(type_)
    if dec is None:
        dec = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    result: T = dec.decode(data)
    return result
