"""Slow clients against `serve` in its own process, with a small open-file limit (issue 10, point 2).

The attack: many connections to the webhook port that send half a request and then nothing. Before listeners
were bounded, each one held a file descriptor until the process hit RLIMIT_NOFILE; from then on every listener
(admin, exchange, xDS) failed to accept and asyncio logged a traceback per failed accept, hundreds of thousands
a minute. The child runs with soft and hard limits of 256 so the flood fits in a test.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import pytest

from controlplane.model.credentials import EXCHANGE_PATH
from controlplane.snapshots.snapshot import CLUSTER
from tests.support.ads import ads_method, first_request
from tests.support.backends import http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.gateway import Webhook
from tests.support.malformed_h2 import REQUESTS, send_malformed_header
from tests.support.ports import LOOPBACK, poll_until

OPEN_FILES = 256
FLOOD = 320  # more half-sent connections than the child has file descriptors
HEADER_TIMEOUT = 1.0
HALF_REQUEST = b"POST /webhooks/gitlab HTTP/1.1\r\nHost: gitlab\r\nX-Gitlab-Ev"
MAX_LOG_LINES = 120

POLICY = """\
kind: Backend
name: api
hosts: [api.local]
audience: https://api.local
endpoints:
  - {address: 127.0.0.1, port: 8081}
---
kind: Gateway
name: ci-gateway
listen: {address: 127.0.0.1, port: 10000}
backends: [api]
"""


def half_sent_connections(port: int, count: int) -> list[socket.socket]:
    """Open `count` connections without waiting for each (the server may leave some in its backlog) and send
    half a request on every one the kernel completes within a short deadline."""
    opened: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((LOOPBACK, port))
            opened.append(sock)
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 3.0
        while selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                selector.unregister(key.fileobj)
                with contextlib.suppress(OSError):
                    opened[opened.index(key.fileobj)].send(HALF_REQUEST)  # type: ignore[arg-type]
    return opened


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset, or never connected: either way the server holds nothing for it
        return True


def xds_answers(port: int) -> bool:
    """A new ADS stream connects and gets CDS for its group (what a restarting Envoy needs)."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        responses = ads_method(channel)(iter([first_request(CLUSTER, "flood-envoy")]), timeout=5.0)
        return bool(next(responses).type_url == CLUSTER)


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[ControlPlaneProcess, int]]:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.yaml").write_text(POLICY)
    webhook = Webhook()
    with ControlPlaneProcess(
        policy,
        extra_args=(*webhook.args, "--http-header-timeout", str(HEADER_TIMEOUT)),
        env=webhook.env,
        open_files=OPEN_FILES,
        log_path=tmp_path / "cp.log",
    ) as cp:
        yield cp, webhook.port


def exchange_answers(cp: ControlPlaneProcess) -> bool:
    response = http_request(
        f"http://{LOOPBACK}:{cp.exchange_port}{EXCHANGE_PATH}",
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=b"",
        timeout=5.0,
    )
    return response.status == 400 and b"invalid_request" in response.body


@dataclass
class Flood:
    """The connections a test floods `cp` with: all closed when the `with` ends, which checks that the flood
    added fewer than MAX_LOG_LINES lines to the control plane's log (`new_lines`)."""

    cp: ControlPlaneProcess
    sockets: list[socket.socket] = field(default_factory=list)
    new_lines: list[str] = field(default_factory=list)
    lines_before: int = 0

    def __enter__(self) -> Self:
        self.lines_before = len(self.cp.log_text().splitlines())
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self.sockets:
            sock.close()
        if exc[0] is None:
            self.new_lines = self.cp.log_text().splitlines()[self.lines_before :]
            assert len(self.new_lines) < MAX_LOG_LINES, "\n".join(self.new_lines[:40])


def all_closed_by_server(flood: list[socket.socket]) -> None:
    """Every half-sent connection is closed: those accepted at once after the header timeout, the ones the
    kernel held in the backlog after theirs."""
    still_open = list(flood)

    def closed() -> bool:
        still_open[:] = [sock for sock in still_open if not closed_by_server(sock)]
        return not still_open

    poll_until(closed, timeout=10 * HEADER_TIMEOUT + 10, interval=0.1, message="flood connections closed")


def test_flooded_http_listeners_starve_nothing_else(plane: tuple[ControlPlaneProcess, int]) -> None:
    cp, webhook_port = plane
    assert "lowered to admin 9, webhook 39, exchange 78" in cp.log_text()  # 32/128/256 fitted into 256 // 2
    with Flood(cp) as flood:
        flood.sockets += half_sent_connections(webhook_port, FLOOD)
        assert http_request(f"{cp.admin_url}/healthz", timeout=5.0).status == 200
        assert exchange_answers(cp)
        assert xds_answers(cp.xds_port)
        all_closed_by_server(flood.sockets)
        # Both public listeners at once: their bounds together still leave admin and xDS their descriptors.
        half = FLOOD // 2
        flood.sockets += half_sent_connections(webhook_port, half) + half_sent_connections(cp.exchange_port, half)
        assert http_request(f"{cp.admin_url}/healthz", timeout=5.0).status == 200
        assert xds_answers(cp.xds_port)
        all_closed_by_server(flood.sockets)
        assert exchange_answers(cp)
        assert cp.running
    assert not [line for line in flood.new_lines if "Traceback" in line], "\n".join(flood.new_lines[:40])


def silent_connections(port: int, count: int) -> list[socket.socket]:
    """Raw TCP connections that never send a byte: no HTTP/2 preface, so grpc never sees a call."""
    opened: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex((LOOPBACK, port))
        opened.append(sock)
    return opened


def webhook_answers(port: int) -> bool:
    """A delivery with a wrong secret is refused (what matters: the listener reads and answers it)."""
    response = http_request(
        f"http://{LOOPBACK}:{port}/webhooks/gitlab",
        method="POST",
        headers={"X-Gitlab-Token": "wrong", "X-Gitlab-Event": "System Hook", "Content-Type": "application/json"},
        body=b"{}",
        timeout=5.0,
    )
    return response.status in (401, 403)


def xds_answers_eventually(port: int, timeout: float) -> None:
    def answers() -> bool:
        try:
            return xds_answers(port)
        except grpc.RpcError:
            return False

    poll_until(answers, timeout=timeout, interval=0.5, message="a new ADS stream is served")


def test_flooded_xds_port_starves_nothing_else(plane: tuple[ControlPlaneProcess, int]) -> None:
    """Point 2 of issue 10 for the xDS port: more silent connections than the process has descriptors."""
    cp, webhook_port = plane
    with Flood(cp) as flood:
        flood.sockets += silent_connections(cp.xds_port, FLOOD)
        assert http_request(f"{cp.admin_url}/healthz", timeout=5.0).status == 200
        assert exchange_answers(cp)
        assert webhook_answers(webhook_port)
        # Silent connections past the bound are closed at once, the ones within it after the handshake timeout:
        # then a real ADS stream gets its slot.
        xds_answers_eventually(cp.xds_port, timeout=30.0)
        flood.sockets += silent_connections(cp.xds_port, FLOOD)  # a second wave while the first is being dropped
        assert http_request(f"{cp.admin_url}/healthz", timeout=5.0).status == 200
        assert exchange_answers(cp)
        xds_answers_eventually(cp.xds_port, timeout=30.0)
        assert cp.running


def test_grpc_logs_no_header_bytes_and_a_bounded_number_of_lines(plane: tuple[ControlPlaneProcess, int]) -> None:
    """Issue 10, point 12: grpc logged a non-UTF-8 header value (and a traceback) once per request."""
    cp, _ = plane
    lines_before = len(cp.log_text().splitlines())
    for _ in range(REQUESTS):
        send_malformed_header(cp.xds_port)
    poll_until(lambda: "not valid UTF-8" in cp.log_text(), timeout=10.0, message="the refusal is logged")
    new_lines = cp.log_text().splitlines()[lines_before:]
    assert not [line for line in new_lines if "MARKERSECRET" in line or "Invalid encoding" in line]
    assert len([line for line in new_lines if "grpc" in line]) <= 5, "\n".join(new_lines[:40])
