"""Real HTTP servers on loopback for end-to-end tests: a tiny routed server, echo backends, and a client.

The fakes (GitLab, OIDC) and the echo backends all need the same thing: a real socket Envoy can connect to,
on an ephemeral 127.0.0.1 port, that runs in a background thread so it works from plain sync pytest tests and
from an asyncio app alike. ``LoopbackHTTPServer`` + ``Router`` is that shared plumbing; routes are a small
table so the fake GitLab can grow REST endpoints by adding entries rather than editing a handler.

Servers never log requests: request lines can carry tokens (``?access_token=``), and test logs get shared.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

from .lifecycle import Started
from .ports import LOOPBACK

# --- request/response


@dataclass(frozen=True)
class Request:
    """What a route handler sees. Header names are lower case, as Envoy's HTTP/1 codec sends them."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""
    params: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    out = {"Content-Type": "application/json"}
    out.update(headers or {})
    return Response(status=status, body=json.dumps(obj).encode(), headers=out)


Handler = Callable[[Request], Response]

_PARAM = re.compile(r"\{(\w+)(?::(path))?\}")


def _compile(pattern: str) -> re.Pattern[str]:
    """``/api/v4/projects/{id}`` -> one path segment per param; ``{rest:path}`` may span slashes."""
    out, pos = [], 0
    for m in _PARAM.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^/]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(out) + "$")


class Router:
    """An ordered route table: first match wins; ``*`` as method matches any method.

    Params are matched on the raw (percent-encoded) path and then unquoted, so GitLab's
    ``projects/acme%2Fdeployer`` arrives as ``{"id": "acme/deployer"}``.
    """

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self._lock = threading.Lock()

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        with self._lock:
            self._routes.append((method.upper(), _compile(pattern), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def deco(fn: Handler) -> Handler:
            self.add(method, pattern, fn)
            return fn

        return deco

    def dispatch(self, request: Request) -> Response:
        with self._lock:
            routes = list(self._routes)
        path_matched = False
        for method, regex, handler in routes:
            m = regex.match(request.path)
            if not m:
                continue
            path_matched = True
            if method in ("*", request.method) or (method == "GET" and request.method == "HEAD"):
                params = {k: unquote(v) for k, v in m.groupdict().items()}
                return handler(
                    Request(request.method, request.path, request.query, request.headers, request.body, params)
                )
        if path_matched:
            return json_response({"message": "405 Method Not Allowed"}, status=405)
        return json_response({"message": "404 Not Found"}, status=404)


# --- server


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so Envoy can keep upstream connections alive, like a real backend.
    protocol_version = "HTTP/1.1"
    # Write replies at once: with Nagle on, each kept-alive response waits ~40 ms for a delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced on purpose: request lines may carry tokens."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        request = Request(
            method=self.command,
            path=split.path,
            query=parse_qs(split.query, keep_blank_values=True),
            headers=headers,
            body=self._read_body(),
        )
        try:
            response = self.server.router.dispatch(request)
        except Exception as exc:  # a broken fake must fail the test visibly, not hang the client
            response = json_response({"message": f"fake server error: {type(exc).__name__}: {exc}"}, status=500)
        self.server.record(request, response)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, router: Router, port: int = 0) -> None:
        self.router = router
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.log: list[tuple[Request, int]] = []
        super().__init__((LOOPBACK, port), _Handler)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def record(self, request: Request, response: Response) -> None:
        with self._lock:
            self.log.append((request, response.status))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client gone before its answer was written (a control plane killed by a failover test) is no error of
        the fake's: no traceback on the test's output for it."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        """Kept-alive client connections would otherwise pin handler threads after stop()."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class LoopbackHTTPServer(Started):
    """A routed HTTP server on 127.0.0.1:<ephemeral> serving from a daemon thread.

    Binding to port 0 (rather than probing for a free port) means there is no race with other tests for the
    port.
    """

    def __init__(self, router: Router | None = None, *, name: str = "http", port: int = 0) -> None:
        """`port` 0 (tests) lets the kernel choose; the demo passes the fixed ports its example policy names."""
        self.name = name
        self.fixed_port = port
        self.router = router or Router()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is not None:
            return self
        self._server = _Server(self.router, self.fixed_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} server is not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """Every request served so far, in arrival order (a copy; safe to read while serving)."""
        if self._server is None:
            return []
        with self._server._lock:
            return [req for req, _ in self._server.log]


class ServedOverLoopback(Started):
    """A fake whose HTTP side is one `LoopbackHTTPServer` held as `_server`: starting, stopping, the address and
    the requests seen are the server's. Written once here so that each fake (the OIDC issuers, the Google APIs)
    keeps only what it serves."""

    _server: LoopbackHTTPServer

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def running(self) -> bool:
        return self._server.running

    @property
    def server(self) -> LoopbackHTTPServer:
        """The server itself, for a stack that starts and stops its servers (tests/support/stack.py)."""
        return self._server

    @property
    def router(self) -> Router:
        """The route table; a test adds an endpoint with ``router.add(method, "/path/{id}", handler)``."""
        return self._server.router

    @property
    def requests(self) -> list[Request]:
        return self._server.requests

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        return self._server.base_url


# --- echo backend


class EchoBackend(LoopbackHTTPServer):
    """Answers every method and path with 200 and what it received, so tests can assert which identity headers
    reached the backend, and that ``authorization`` (the CI job's token) did not."""

    def __init__(self, name: str = "backend", port: int = 0) -> None:
        super().__init__(name=name, port=port)
        self.router.add("*", "{path:path}", self._echo)

    def _echo(self, request: Request) -> Response:
        query = "&".join(f"{k}={v}" for k, vs in request.query.items() for v in vs)
        return json_response(
            {
                "backend": self.name,
                "method": request.method,
                "path": request.path,
                "query": query,
                "headers": dict(request.headers),
                "body": request.body.decode("utf-8", "replace"),
            }
        )


# --- client


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> HttpResponse:
    """One request over a fresh connection, returning 4xx/5xx as values rather than exceptions.

    ``http.client`` rather than ``urllib`` because urllib honours ``*_proxy`` environment variables (loopback
    traffic must never leave through a proxy) and raises on error statuses, which are exactly what tests
    assert. A ``Host`` header in ``headers`` replaces the default, to pick an Envoy virtual host.
    """
    split = urlsplit(url)
    if split.scheme != "http" or not split.hostname:
        raise ValueError(f"only plain http URLs are supported: {url!r}")
    conn = http.client.HTTPConnection(split.hostname, split.port or 80, timeout=timeout)
    try:
        target = split.path or "/"
        if split.query:
            target += "?" + split.query
        hdrs = dict(headers or {})
        skip_host = any(k.lower() == "host" for k in hdrs)
        conn.putrequest(method, target, skip_host=skip_host, skip_accept_encoding=True)
        for name, value in hdrs.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return HttpResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()
