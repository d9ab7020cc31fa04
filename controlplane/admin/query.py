"""Query and argument values of the admin endpoints, read by the same rules on the server and in the CLI.

A module of its own, free of aiohttp and protobuf, so `controlplane status` checks its arguments as the
server will without importing the server."""

from __future__ import annotations

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class BadQuery(ValueError):
    """A query parameter the operator mistyped; reported as 400 rather than silently ignored."""


def parse_flag(name: str, value: str | None, default: bool = False) -> bool:
    """Read a boolean query flag; an unrecognised value is an error so typos do not widen a filter."""
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadQuery(f"{name} must be 1 or 0, got {shown(value)}")


MAX_COUNT = 1_000_000_000  # a limit or offset past any fleet; it also keeps int() far from its digit cap
MAX_TEXT = 256  # group and node names: longer ones match nothing, and are not echoed back in full


def shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def parse_count(name: str, value: str | None, default: int | None) -> int | None:
    """A non-negative integer query parameter; ``all`` means no bound (None), for ``limit``."""
    if value is None or value.strip() == "":
        return default
    text = value.strip().lower()
    if text == "all" and name == "limit":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > len(str(MAX_COUNT)) or int(text) > MAX_COUNT:
        allowed = f"an integer from 0 to {MAX_COUNT}" + (" or all" if name == "limit" else "")
        raise BadQuery(f"{name} must be {allowed}, got {shown(value)}")
    return int(text)


def parse_text(name: str, value: str | None) -> str | None:
    if value is not None and len(value) > MAX_TEXT:
        raise BadQuery(f"{name} must be at most {MAX_TEXT} characters, got {len(value)}")
    return value or None
