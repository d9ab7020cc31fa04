"""A real aiohttp server on a loop in a background thread, and a raw-socket HTTP/1.1 client for it.

Raw sockets, not an HTTP client library: a fuzzed request must reach the server byte for byte (odd header
values, a Content-Type a client would fix up, a query on a POST), and a library would refuse or normalise them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
TIMEOUT_S = 10.0


class LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine on it and waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT_S)
        self.loop.close()


@dataclass(frozen=True)
class Answer:
    status: int
    head: bytes
    body: bytes


def request(
    port: int,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    *,
    chunked: bool = False,
) -> Answer:
    """Send one request on a new connection (closed after it) and read the whole answer."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers]
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + payload
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as conn:
        # The server may answer (413) and close before reading everything: then read what it said.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(raw)
        answer = bytearray()
        while chunk := _recv(conn):
            answer += chunk
    head, _, rest = bytes(answer).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), f"no HTTP answer: {bytes(answer[:200])!r}"
    return Answer(int(status_line.split()[1]), head, rest)


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except ConnectionResetError:
        return b""


def serve(loop: LoopThread, start: Callable[[], Awaitable[int]]) -> int:
    async def go() -> int:
        return await start()

    return loop.run(go())
