"""Small protobuf helpers shared by the compiler modules."""

from __future__ import annotations

import ipaddress

from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message


def packed(message: Message) -> AnyProto:
    """Pack deterministically: `Any.Pack` would serialize maps in arbitrary order."""
    return AnyProto(
        type_url="type.googleapis.com/" + message.DESCRIPTOR.full_name,
        value=message.SerializeToString(deterministic=True),
    )


def serialized(message: Message) -> bytes:
    """Deterministic bytes: map entries in key order, so equal config always hashes equal."""
    return bytes(message.SerializeToString(deterministic=True))


def millis(ms: int) -> Duration:
    return Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def seconds(s: int) -> Duration:
    return Duration(seconds=s)


def is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
