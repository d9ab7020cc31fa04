"""Loopback port allocation and deadline-bounded polling.

Tests must never synchronise with a fixed sleep: a sleep is either too short on a loaded CI host (flaky) or
too long everywhere else (slow). ``poll_until`` re-checks a condition at a short interval and fails loudly,
with the last observed value, once a deadline passes.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


# Ports handed out by this process: never twice, so two servers of one test never race for one port.
_HANDED_OUT: set[int] = set()
_FIRST_PORT = 10_000


def free_port() -> int:
    """A loopback TCP port that is free now, below the kernel's ephemeral range.

    There is an unavoidable window between this probe and the real server binding the port; prefer binding to
    port 0 directly (as the fake servers do) whenever the server can report its own port. A port the kernel
    hands out itself (`bind(0)`) lies in its ephemeral range, which is also where every outgoing connection's
    local port comes from: with PostgreSQL pools and HTTP clients opening connections meanwhile, one of them
    took such a port before the server bound it (a replica failed to start, `Address already in use`). Below
    the range no outgoing connection lands.
    """
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(_FIRST_PORT, low)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # the range below is crowded: the kernel's
        sock.bind((LOOPBACK, 0))
        kernel: int = sock.getsockname()[1]
        return kernel


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def poll_until(
    fn: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    message: str = "condition not met",
) -> T:
    """Call ``fn`` until it returns a truthy value, and return that value.

    Exceptions raised by ``fn`` propagate immediately, so a predicate can abort the wait early (for example
    when the process it is waiting on has died). On timeout an AssertionError carries ``message`` and the
    last value, which is usually exactly what the failing test needs to show.
    """
    deadline = time.monotonic() + timeout
    last: T = fn()
    while not last:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:.2f}s: {message}; last value: {last!r}")
        time.sleep(min(interval, remaining))  # poll interval, bounded by the deadline
        last = fn()
    return last


async def eventually(check: Callable[[], T], message: str, timeout: float = 10.0, interval: float = 0.005) -> T:
    """`poll_until` for async tests: polls without blocking the event loop the code under test runs on."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.2f}s: {message}; last value: {value!r}")
        await asyncio.sleep(interval)  # the poll interval, bounded by the deadline above
    return value
