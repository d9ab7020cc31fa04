"""The shared HTTP listener (serving.py) against slow and malformed clients, over real loopback sockets.

Issue 10: slow clients exhausted the process's descriptors (point 2) and aiohttp logged the bytes of malformed
requests, secrets included (point 12). The e2e side (a whole `serve` under a 256-file limit) is in
test_e2e_http_flood.py; these pin each mechanism on its own.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from controlplane.serving import (
    ADMIN_LIMITS,
    EXCHANGE_LIMITS,
    WEBHOOK_LIMITS,
    AppServer,
    HttpLimits,
    fit_connection_budget,
    fit_listeners,
    fit_xds_connections,
)
from controlplane.sources.webhooks import WebhookReceiver
from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog
from tests.support.backends import http_request
from tests.support.ports import LOOPBACK, eventually, poll_until

MARKER = "glpat-marker-that-must-never-reach-a-log"
SECRET = b"listener-test-webhook-secret"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the rate-limited logger ------------------------------------------------------------------------------


def test_rate_limited_log_writes_a_burst_then_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = RateLimitedLog(logging.getLogger("test.ratelog"), burst=3, interval=60.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        written = [limited.log(logging.INFO, "rejected %s", n) for n in range(10)]
        other = limited.log(logging.INFO, "another kind %s", 1)  # a different message has its own budget
        clock.now += 61
        after = limited.log(logging.INFO, "rejected %s", 10)
    assert written == [True] * 3 + [False] * 7
    assert other and after
    assert [r.getMessage() for r in caplog.records] == [
        "rejected 0",
        "rejected 1",
        "rejected 2",
        "another kind 1",
        "suppressed 7 more line(s) like 'rejected %s' in the last 61s",
        "rejected 10",
    ]


def test_rate_limited_log_spends_nothing_on_lines_below_the_level(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(logging.getLogger("test.ratelog.level"), burst=1, clock=FakeClock())
    with caplog.at_level(logging.INFO, logger="test.ratelog.level"):
        assert not limited.log(logging.DEBUG, "noise")
        assert limited.log(logging.INFO, "noise")
    assert len(caplog.records) == 1


# --- a listener with small limits -------------------------------------------------------------------------


async def _echo_body(request: web.Request) -> web.Response:
    return web.Response(text=f"{len(await request.read())}\n")


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


@pytest.fixture
async def small() -> AsyncIterator[tuple[AppServer, int]]:
    server = AppServer("test listener", "test")
    limits = HttpLimits(max_connections=3, header_timeout=0.5, request_timeout=0.5, linger=0.1)
    addresses = await server.start([web.get("/ok", _ok), web.post("/body", _echo_body)], LOOPBACK, 0, limits)
    try:
        yield server, addresses[0][1]
    finally:
        await server.stop()


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded: a test never hangs)."""
    return await asyncio.wait_for(reader.read(), timeout=10)


async def test_headers_that_dribble_are_cut_off(small: tuple[AppServer, int]) -> None:
    """Slowloris: a byte of header every 50 ms keeps the connection busy but never completes a request."""
    _, port = small
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    started = time.monotonic()
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    answer = b"unset"
    while time.monotonic() - started < 5:
        writer.write(b"a")
        try:  # the pace of the dribble: wait for the server's close, at most 50 ms
            answer = await asyncio.wait_for(reader.read(), timeout=0.05)
            break
        except TimeoutError:
            continue
    assert answer == b""
    assert 0.4 <= time.monotonic() - started < 2.0
    writer.close()


async def test_an_idle_connection_is_closed_after_the_header_timeout(small: tuple[AppServer, int]) -> None:
    _, port = small
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    assert await _until_closed(reader) == b""
    writer.close()


async def test_a_body_that_dribbles_is_answered_408_and_closed(small: tuple[AppServer, int]) -> None:
    _, port = small
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    answer = await _until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    writer.close()


async def test_a_prompt_request_is_served(small: tuple[AppServer, int]) -> None:
    _, port = small
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcd")
    answer = await _until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n4\n"), answer
    writer.close()


async def test_connections_beyond_the_bound_wait_in_the_backlog(small: tuple[AppServer, int]) -> None:
    server, port = small
    held = [await _connect_from(f"127.0.0.{2 + n}", port) for n in range(5)]  # one peer each: none over its share
    for _, writer in held:
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # half a request each
    await eventually(lambda: server.open_connections == 3, "three connections accepted")
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = asyncio.ensure_future(_until_closed(reader))
    for _, held_writer in held:  # each one closed frees a slot for the next in the backlog
        assert server.open_connections <= 3
        held_writer.close()
    assert (await answer).startswith(b"HTTP/1.1 200")
    writer.close()
    await eventually(lambda: server.open_connections == 0, "every slot given back")


async def _connect_from(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from another loopback address (Linux routes all of 127/8 to lo): another peer."""
    return await asyncio.open_connection(LOOPBACK, port, local_addr=(host, 0))


def _refused(listener: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "controlplane_http_refused_connections_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


async def test_one_peer_cannot_take_the_slots_another_needs(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10 point 2: 40 answered keep-alive connections from one client held every admin slot, so the
    kubelet's /healthz waited for the header timeout. One address now holds at most a quarter of the slots;
    connections past that are closed at once, counted and logged at a bounded rate."""
    server = AppServer("peers listener", "peers")
    limits = HttpLimits(max_connections=8, header_timeout=5.0, request_timeout=5.0, linger=0.1)
    assert limits.per_peer == 2
    (_, port), *_ = await server.start([web.get("/ok", _ok)], LOOPBACK, 0, limits)
    before = _refused("peers", "peer share")
    hog: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        with caplog.at_level(logging.INFO, logger="controlplane.serving"):
            for _ in range(12):  # each sends a request, reads nothing and stays open (keep-alive)
                reader, writer = await _connect_from("127.0.0.2", port)
                writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
                hog.append((reader, writer))
            await eventually(lambda: _refused("peers", "peer share") - before == 10, "ten connections refused")
            assert server.open_connections == 2
            started = time.monotonic()
            reader, writer = await _connect_from("127.0.0.3", port)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await _until_closed(reader)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert time.monotonic() - started < 1.0
            answers = [await asyncio.wait_for(r.read(), timeout=10) for r, _ in hog[2:]]
            assert answers == [b""] * 10  # closed unanswered
        refusals = [r for r in caplog.records if "share" in r.getMessage()]
        assert 1 <= len(refusals) <= 3, [r.getMessage() for r in refusals]
        assert server.open_connections == 2
    finally:
        for _, writer in hog:
            writer.close()
        await server.stop()


def test_the_per_peer_share_is_a_quarter_of_the_slots_at_least_one() -> None:
    assert [HttpLimits(max_connections=n).per_peer for n in (1, 3, 4, 32, 256)] == [1, 1, 1, 8, 64]
    assert HttpLimits(max_connections=32, peer_share=1.0).per_peer == 32
    with pytest.raises(ValueError):
        HttpLimits(peer_share=0.0)
    with pytest.raises(ValueError):
        HttpLimits(peer_share=1.5)


# --- aiohttp's own logging --------------------------------------------------------------------------------


@pytest.fixture
async def webhook_port() -> AsyncIterator[int]:
    async def on_event(_event: object) -> None:
        return None

    receiver = WebhookReceiver(secrets=[SECRET], on_event=on_event)
    port = await receiver.start(LOOPBACK, 0)
    try:
        yield port
    finally:
        await receiver.stop()


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "header",
    [
        f"X-Gitlab-Token: {MARKER}{'A' * 9000}".encode(),  # over max_field_size: aiohttp quotes the line
        f"X-Gitlab-Token: {MARKER}\x01".encode(),  # a control character: an invalid header, quoted too
        f"X-Gitlab-Token {MARKER}".encode(),  # no colon
    ],
)
async def test_malformed_request_bytes_never_reach_the_logs(
    webhook_port: int, caplog: pytest.LogCaptureFixture, header: bytes
) -> None:
    request = b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nContent-Length: 0\r\n\r\n"
    with caplog.at_level(logging.DEBUG):
        answer = await _raw(webhook_port, request)
    assert answer.split(b" ", 2)[1] == b"400", answer[:200]
    assert MARKER not in caplog.text
    for record in caplog.records:
        assert MARKER not in record.getMessage() and MARKER not in (record.exc_text or "")
        assert record.exc_info is None or MARKER not in repr(record.exc_info[1])
    assert any("malformed request" in r.getMessage() for r in caplog.records)


async def test_rejected_webhooks_are_logged_at_a_bounded_rate(
    webhook_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    request = b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: wrong\r\nConnection: close\r\n\r\n"
    with caplog.at_level(logging.INFO, logger="controlplane.webhooks"):
        for _ in range(30):
            assert (await _raw(webhook_port, request)).startswith(b"HTTP/1.1 401")
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert 1 <= len(rejected) <= 5


# --- the process's descriptors ----------------------------------------------------------------------------


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    """In a child whose soft limit is below its hard one, as systemd and most shells start services."""
    script = (
        "import logging, resource; logging.basicConfig(level=logging.INFO, format='%(message)s');"
        "from controlplane.serving import raise_open_file_limit;"
        "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 512))

    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, preexec_fn=limits, timeout=30, check=True
    )
    assert done.stdout.split() == ["512", "512"]
    assert "open-file limit raised from 128 to 512 (hard limit 512)" in done.stderr


def test_connection_bounds_are_fitted_into_half_the_descriptors(caplog: pytest.LogCaptureFixture) -> None:
    wanted = {"admin": 32, "webhook": 128, "exchange": 256}
    assert fit_connection_budget(1_048_576, wanted) == wanted
    assert fit_connection_budget(1024, wanted) == wanted  # the defaults fit the common 1024 with room to spare
    with caplog.at_level(logging.WARNING):
        assert fit_connection_budget(256, wanted) == {"admin": 9, "webhook": 39, "exchange": 78}
    assert "lowered to admin 9, webhook 39, exchange 78" in caplog.text
    assert fit_connection_budget(4, wanted) == {"admin": 1, "webhook": 1, "exchange": 1}  # never 0


def test_xds_gets_what_the_http_listeners_and_the_reserve_leave(caplog: pytest.LogCaptureFixture) -> None:
    http = {"admin": 32, "webhook": 128, "exchange": 256}
    with caplog.at_level(logging.INFO):
        assert fit_xds_connections(1024, http, None) == 1024 - 416 - 64
    assert (
        "open-file limit 1024 shared out: xDS 544 connections; HTTP admin 32, webhook 128, exchange 256" in caplog.text
    )
    assert fit_xds_connections(1_048_576, http, None) == 1_048_576 - 416 - 65_536  # the reserve: 1/16
    assert fit_xds_connections(1024, http, 100) == 100
    with caplog.at_level(logging.WARNING):
        assert fit_xds_connections(1024, http, 5000) == 544
    assert "--xds-max-connections 5000 lowered to 544" in caplog.text
    assert fit_xds_connections(100, {"admin": 50}, None) == 1  # never 0


def test_every_listener_is_fitted_keeping_its_timeouts() -> None:
    slow = HttpLimits(header_timeout=3.0, request_timeout=7.0, max_connections=256)
    fitted, xds = fit_listeners(256, {"admin": ADMIN_LIMITS, "exchange": slow}, None)
    assert fitted["admin"] == ADMIN_LIMITS.with_connections(ADMIN_LIMITS.max_connections * 128 // 288)
    assert fitted["exchange"] == slow.with_connections(256 * 128 // 288)
    assert (fitted["exchange"].header_timeout, fitted["exchange"].request_timeout) == (3.0, 7.0)
    assert xds == fit_xds_connections(256, {name: limits.max_connections for name, limits in fitted.items()}, None)
    assert fit_listeners(1024, {"admin": ADMIN_LIMITS}, 10) == ({"admin": ADMIN_LIMITS}, 10)


def test_serve_fits_only_the_listeners_it_opens(tmp_path: Path) -> None:
    """A webhook or exchange listener that is off takes no share of the descriptors (cli/options.py)."""
    from dataclasses import replace

    from controlplane.cli.options import ServeOptions, WebhookOptions
    from controlplane.credentials.service import CredentialOptions

    alone = ServeOptions(policy=tmp_path).fitted_to(256)
    assert alone.admin_limits == ADMIN_LIMITS and alone.webhook_limits == WEBHOOK_LIMITS
    assert alone.xds_max_connections == 256 - ADMIN_LIMITS.max_connections - 64
    every = replace(
        alone,
        xds_max_connections=None,
        webhooks=WebhookOptions("127.0.0.1", 0),
        credentials=CredentialOptions(("127.0.0.1", 0), ("127.0.0.1", 0), tmp_path),
    ).fitted_to(256)
    assert every.credentials is not None
    wanted = {"admin": ADMIN_LIMITS, "webhook": WEBHOOK_LIMITS, "exchange": EXCHANGE_LIMITS}
    fitted, xds = fit_listeners(256, wanted, None)
    assert (every.admin_limits, every.webhook_limits, every.credentials.http) == tuple(fitted.values())
    assert every.xds_max_connections == xds


LISTENER_SCRIPT = """
import asyncio, logging, sys
from aiohttp import web
from controlplane.serving import AppServer, HttpLimits

async def ok(_request):
    return web.Response(text="ok")

async def main():
    server = AppServer("test listener", "test")
    # A bound above the open-file limit (a misconfiguration `serve` would have lowered): accept must fail.
    limits = HttpLimits(max_connections=500, header_timeout=1.0)
    ((_, port),) = await server.start([web.get("/ok", ok)], "127.0.0.1", 0, limits)
    print(port, flush=True)
    await asyncio.Event().wait()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
asyncio.run(main())
"""


def test_accept_failures_for_lack_of_descriptors_are_logged_a_few_times(tmp_path: Path) -> None:
    """asyncio's own accept loop logs a traceback per failed accept, up to 100 per readiness event."""
    log_path = tmp_path / "listener.log"

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with log_path.open("wb") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-c", LISTENER_SCRIPT], stdout=subprocess.PIPE, stderr=log_file, preexec_fn=limits
        )
    flood: list[socket.socket] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        for _ in range(120):
            sock = socket.create_connection((LOOPBACK, port), timeout=5)
            sock.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
            flood.append(sock)
        poll_until(lambda: "cannot accept" in log_path.read_text(), 10, message="accept failed for lack of files")
        for sock in flood:  # the server closes them after its header timeout, then accepts the rest
            sock.settimeout(10)
            assert sock.recv(100) == b""
        assert http_request(f"http://{LOOPBACK}:{port}/ok").status == 200
    finally:
        for sock in flood:
            sock.close()
        child.terminate()
        child.wait(10)
    text = log_path.read_text()
    assert 1 <= text.count("cannot accept connections: Too many open files") <= 3, text[:3000]
    assert "Traceback" not in text, text[:3000]
