"""grpc's own Python log lines on the xDS port: never a client's bytes, at a bounded rate (issue 10, point 12).

grpc logs a request whose header value is not valid text as ``Invalid encoding on b'...'`` with a traceback,
once per request: whatever the client put in a header (a token, say) went to the log, as often as it liked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import pytest

from controlplane.snapshots.cache import SnapshotCache
from controlplane.telemetry.grpclog import route_grpc_logs
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.malformed_h2 import REQUESTS, send_malformed_header
from tests.support.ports import LOOPBACK, eventually


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
