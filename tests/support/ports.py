"""Loopback port allocation and deadline-bounded polling.

Tests must never synchronise with a fixed sleep: a sleep is either too short on a loaded CI host (flaky) or
too long everywhere else (slow). ``poll_until`` re-checks a condition at a short interval and fails loudly,
with the last observed value, once a deadline passes.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Ask the kernel for a currently unused loopback TCP port.

    There is an unavoidable window between closing this probe socket and the real server binding the port;
    prefer binding to port 0 directly (as the fake servers do) whenever the server can report its own port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


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
