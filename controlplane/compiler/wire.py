"""Protobuf wire encoding by hand, for the one place where building messages dominates compile time.

RBAC policies of ten thousand bindings are mostly the same few claim conditions in new combinations.
Each condition, role rule and subject is serialized once and policies are assembled from those bytes:
valid protobuf, byte-identical to what the message API would produce with deterministic serialization.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message

_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))


def varint(value: int) -> bytes:
    """Protobuf base-128 varint, for framing pre-serialized messages by hand (hot: keep the fast paths)."""
    if value < 0x80:
        return _ONE_BYTE[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def number(message: type[Message], field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)


_TAGS = tuple(varint((n << 3) | 2) for n in range(64))


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return _TAGS[field_number] + varint(len(payload)) + payload


def repeated(field_number: int, payloads: Iterable[bytes]) -> bytes:
    return b"".join(length_delimited(field_number, p) for p in payloads)


def map_entry(field_number: int, key: str, value: bytes) -> bytes:
    """One entry of a map<string, Message>: a nested message with key = 1 and value = 2."""
    return length_delimited(field_number, length_delimited(1, key.encode()) + length_delimited(2, value))
