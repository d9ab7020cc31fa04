"""grpc's own Python log lines on the xDS port: never a client's bytes, at a bounded rate (issue 10, point 12).

grpc logs a request whose header value is not valid text as ``Invalid encoding on b'...'`` with a traceback,
once per request: whatever the client put in a header (a token, say) went to the log, as often as it liked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator, Iterator

import pytest

from controlplane.snapshots.cache import SnapshotCache
from controlplane.telemetry.grpclog import route_grpc_logs
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import SERVICE, XdsServer
from tests.support.ports import LOOPBACK, eventually

MARKER = b"MARKERSECRET_H2"
REQUESTS = 20


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing (lengths under 127 bytes)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def send_malformed_header(port: int) -> None:
    """An ADS call whose custom header value holds bytes that are not UTF-8, the client's secret among them."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/{SERVICE}/StreamAggregatedResources".encode()),
        (b":authority", b"xds"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"x-marker", b"\xff\xfe" + MARKER),
    ]
    block = b"".join(_literal(name, value) for name, value in headers)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
    with socket.create_connection((LOOPBACK, port), timeout=5.0) as sock:
        sock.sendall(preface + _frame(1, 4, 1, block) + _frame(0, 1, 1, b"\x00\x00\x00\x00\x00"))
        sock.settimeout(0.2)
        try:
            while sock.recv(4096):  # until the server answers and closes, or goes quiet
                pass
        except TimeoutError:
            pass


@pytest.fixture
def routed() -> Iterator[None]:
    undo = route_grpc_logs()
    try:
        yield
    finally:
        undo()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = XdsServer(SnapshotCache(), ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    bound = await server.start(LOOPBACK, 0)
    try:
        yield bound
    finally:
        await server.stop(1.0)


async def test_a_malformed_header_is_logged_without_its_bytes_at_a_bounded_rate(
    routed: None, port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(REQUESTS):
        await asyncio.to_thread(send_malformed_header, port)

    def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "controlplane.grpc" and "not valid UTF-8" in r.getMessage()]

    await eventually(refused, "the refusal is logged")
    # pytest hangs its own capture handlers on non-propagating loggers too: what the process's handlers see is
    # everything but the grpc loggers' own records.
    written = [r for r in caplog.records if not r.name.startswith("grpc")]
    text = "\n".join(r.getMessage() for r in written)
    assert "MARKERSECRET" not in text and "\\xff\\xfe" not in text
    assert not [r for r in written if r.exc_info], "no traceback quoting the value"
    assert len([r for r in written if r.name == "controlplane.grpc" and r.levelno >= logging.INFO]) <= 5


def test_routing_is_undone() -> None:
    grpc_logger = logging.getLogger("grpc")
    before = (grpc_logger.propagate, list(grpc_logger.handlers))
    route_grpc_logs()()
    assert (grpc_logger.propagate, list(grpc_logger.handlers)) == before
