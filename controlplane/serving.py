"""One aiohttp app on a port of its own: the admin server, the webhook receiver and the token exchange.

They share the event loop (and the process's file descriptors) with the xDS server, so none of them may let
its clients use up what the others need. Each listener therefore:

- accepts through its own loop, one connection per free slot (``HttpLimits.max_connections``): past the
  bound, new connections wait in the kernel's backlog and cost the process no descriptor;
- lets one peer address hold at most its share of the slots (``HttpLimits.per_peer``, a quarter by default),
  so one client cannot keep the kubelet's probe or a scraper waiting: a connection past the share is closed
  at once, counted and logged at a bounded rate;
- closes a connection that has not sent complete request headers ``header_timeout`` after connecting or
  after its previous response (slowloris), and answers 408 when a request (its body included) takes longer
  than ``request_timeout``;
- logs accept failures and aiohttp's own complaints at a bounded rate, and never the client's bytes
  (aiohttp puts the offending header line in its exception, which it logs with a traceback).

docs/http-listeners.md gives the reasons and the defaults.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import resource
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import Counter, Gauge

from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

OPEN_CONNECTIONS = Gauge(
    "controlplane_http_open_connections",
    "Connections open on each HTTP listener (bounded by its max connections).",
    ["listener"],
    registry=REGISTRY,
)

REFUSED_CONNECTIONS = Counter(
    "controlplane_http_refused_connections",
    "Connections an HTTP listener closed at once without serving them, by reason.",
    ["listener", "reason"],
    registry=REGISTRY,
)
PEER_SHARE = "peer share"

# Accept fails with these when the process (or the system) is out of descriptors or buffers; retrying at once
# fails again, so the listener waits a little (asyncio's own loop waits 1 s).
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_SECONDS = 0.5
BACKLOG = 128
LOOPBACK = "127.0.0.1"  # where every listener binds unless told: nothing is exposed by default
FD_LIMIT_CEILING = 1 << 20  # Linux refuses a soft RLIMIT_NOFILE above fs.nr_open (1048576 by default)


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 64
    header_timeout: float = 10.0  # connect (or previous response) -> complete request headers
    request_timeout: float = 30.0  # complete headers -> response ready, reading the body included
    linger: float = 2.0  # after an early answer, how long an unread body is drained before closing
    max_line_size: int = 8190  # request line and each header line (aiohttp's default)
    max_field_size: int = 8190
    max_headers: int = 64
    peer_share: float = 0.25  # of max_connections, for one client address (behind a proxy: every client)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError("max connections must be at least 1")
        if not 0 < self.peer_share <= 1:
            raise ValueError("the per-peer share must be in (0, 1]")
        if min(self.header_timeout, self.request_timeout) <= 0 or self.linger < 0:
            raise ValueError("HTTP timeouts must be positive")

    def with_connections(self, max_connections: int) -> HttpLimits:
        return replace(self, max_connections=max_connections)

    @property
    def per_peer(self) -> int:
        """Connections one client address may hold: derived from the bound, so raising it raises the share."""
        return max(1, int(self.max_connections * self.peer_share))


# Per-listener defaults: together 416, well under the usual soft limit of 1024 open files, leaving the rest
# to xDS streams, the audit store and outgoing calls; `serve` raises the soft limit at start where it can.
ADMIN_LIMITS = HttpLimits(max_connections=32)  # probes and scrapers: a handful
WEBHOOK_LIMITS = HttpLimits(max_connections=128)  # GitLab delivers a few at a time
EXCHANGE_LIMITS = HttpLimits(max_connections=256)  # CI jobs starting together, through the gateways


class AppServer:
    def __init__(self, name: str, listener: str | None = None) -> None:
        """``name`` is for log lines ("admin server"), ``listener`` the metric label ("admin")."""
        self.name = name
        self.listener = listener or name.split()[0]
        self._runner: web.AppRunner | None = None
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._open = 0
        self._per_peer = self._max_connections = 1
        self._peers: dict[str, int] = {}  # open connections by client address, for the per-peer share
        self._ssl: ssl.SSLContext | None = None
        self._handshake_timeout = 10.0
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS connections being set up, off the accept loop
        self._accept_errors = RateLimitedLog(log, burst=3, interval=60.0)
        self._refusals = RateLimitedLog(log, burst=3, interval=60.0)

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def open_connections(self) -> int:
        return self._open

    async def start(
        self,
        app_or_routes: web.Application | Iterable[web.RouteDef],
        host: str,
        port: int,
        limits: HttpLimits = HttpLimits(),
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> list[tuple[str, int]]:
        """Bind and serve (HTTPS with `ssl_context`); returns every bound (host, port). Access logs are off:
        handlers log what matters."""
        if self._runner is not None:
            raise RuntimeError(f"{self.name} already started")
        app = app_or_routes if isinstance(app_or_routes, web.Application) else web.Application()
        if not isinstance(app_or_routes, web.Application):
            app.add_routes(list(app_or_routes))
        app.middlewares.insert(0, _deadline(limits.request_timeout))
        runner = web.AppRunner(
            app,
            access_log=None,
            logger=_ServerLog(self.name),
            keepalive_timeout=limits.header_timeout,  # aiohttp arms it at connect too: our header timeout
            lingering_time=limits.linger,
            max_line_size=limits.max_line_size,
            max_field_size=limits.max_field_size,
            max_headers=limits.max_headers,
        )
        await runner.setup()
        try:
            sockets = _bind(host, port)
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._sockets, self._ssl = runner, sockets, ssl_context
        self._handshake_timeout = limits.header_timeout
        self._per_peer, self._max_connections, self._peers = limits.per_peer, limits.max_connections, {}
        slots = asyncio.Semaphore(limits.max_connections)
        assert runner.server is not None
        self._accepting = [asyncio.create_task(self._accept(sock, runner.server, slots)) for sock in sockets]
        OPEN_CONNECTIONS.labels(self.listener).set(0)
        REFUSED_CONNECTIONS.labels(self.listener, PEER_SHARE)
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in sockets]

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice or before `start`."""
        runner, self._runner = self._runner, None
        accepting, self._accepting = self._accepting, []
        for task in (*accepting, *self._handshakes):
            task.cancel()
        await asyncio.gather(*accepting, *self._handshakes, return_exceptions=True)
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if runner is not None:
            await runner.cleanup()

    async def _accept(self, sock: socket.socket, server: web.Server, slots: asyncio.Semaphore) -> None:
        """Take a connection only when a slot is free: the slot is the descriptor, so the bound is real."""
        loop = asyncio.get_running_loop()
        while True:
            await slots.acquire()
            try:
                conn, address = await loop.sock_accept(sock)
            except OSError as error:
                slots.release()
                await self._accept_failed(error)
                continue
            peer = str(address[0]) if isinstance(address, tuple) else str(address)
            if self._peers.get(peer, 0) >= self._per_peer:
                conn.close()  # at once, unread: its slot goes straight back to the others
                slots.release()
                self._refused(peer)
                continue
            if self._ssl is None:
                await self._serve(conn, peer, server, slots)
            else:  # a handshake takes round trips (up to the header timeout): never hold up the next accept
                task = asyncio.create_task(self._serve(conn, peer, server, slots))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)

    def _refused(self, peer: str) -> None:
        REFUSED_CONNECTIONS.labels(self.listener, PEER_SHARE).inc()
        self._refusals.log(
            logging.WARNING,
            "%s: closed a connection from %s, which already holds its share of %d connection(s) of %d"
            " (behind a proxy every client shares one address: raise the listener's max connections)",
            self.name,
            peer[:64],
            self._per_peer,
            self._max_connections,
            key=PEER_SHARE,
        )

    async def _serve(self, conn: socket.socket, peer: str, server: web.Server, slots: asyncio.Semaphore) -> None:
        self._opened(peer)
        closed = _Once(lambda: self._closed(peer, slots))
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: _Tracked(server(), closed),
                conn,
                ssl=self._ssl,
                ssl_handshake_timeout=self._handshake_timeout if self._ssl is not None else None,
            )
        except BaseException as error:  # the client reset before the transport existed, or we are stopping
            conn.close()
            closed()
            if not isinstance(error, Exception):
                raise
            log.debug("%s: connection dropped while being set up: %s", self.name, error)

    async def _accept_failed(self, error: OSError) -> None:
        if error.errno in _OUT_OF_RESOURCES:
            self._accept_errors.log(
                logging.ERROR,
                "%s: cannot accept connections: %s (open-file limit %d); retrying every %.1fs",
                self.name,
                os.strerror(error.errno or 0),
                open_file_limit(),
                ACCEPT_RETRY_SECONDS,
                key="out of resources",
            )
            await asyncio.sleep(ACCEPT_RETRY_SECONDS)  # back-off: the descriptors come back as connections close
        elif not isinstance(error, ConnectionAbortedError):  # a client gone before accept: nothing to say
            self._accept_errors.log(logging.WARNING, "%s: accept failed: %s", self.name, error, key="other")

    def _opened(self, peer: str) -> None:
        self._open += 1
        self._peers[peer] = self._peers.get(peer, 0) + 1
        OPEN_CONNECTIONS.labels(self.listener).set(self._open)

    def _closed(self, peer: str, slots: asyncio.Semaphore) -> None:
        self._open -= 1
        left = self._peers.pop(peer, 1) - 1
        if left > 0:  # an address with no connection leaves no entry: the map stays bounded by the slots
            self._peers[peer] = left
        OPEN_CONNECTIONS.labels(self.listener).set(self._open)
        slots.release()


class _Once:
    def __init__(self, action: Callable[[], None]) -> None:
        self._action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol, told apart only in that its end gives the listener's slot back."""

    def __init__(self, inner: asyncio.Protocol, closed: Callable[[], None]) -> None:
        self._inner, self._closed = inner, closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._closed()  # the transport closes the socket right after this returns


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, as ``loop.create_server`` would bind them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:  # the errno's text alone does not say which listener
                raise OSError(error.errno, f"cannot bind to {host}:{port}: {error.strerror}") from error
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _deadline(seconds: float) -> Middleware:
    """A request whose body dribbles in (or whose handling hangs) is answered 408 and its connection closed."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = asyncio.timeout(seconds)
        try:
            async with scope:
                return await handler(request)
        except TimeoutError:
            if not scope.expired():
                raise
        response = web.Response(status=408, text=f"request not completed within {seconds:g}s\n")
        response.force_close()
        return response

    return deadline


class _ServerLog(logging.Logger):
    """Stands in for aiohttp's ``aiohttp.server`` logger on our listeners.

    aiohttp logs a malformed request at ERROR with its exception, whose message quotes the offending bytes
    (the start of an over-long ``X-Gitlab-Token``, say). Such lines are rewritten without the exception; the
    rest (a bug in a handler) keep their traceback. All go through a rate limit.
    """

    def __init__(self, listener: str) -> None:
        super().__init__("aiohttp.server")
        self._listener = listener
        self._limited = RateLimitedLog(log, burst=5, interval=60.0)

    def handle(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):  # the client's fault, and its bytes: type and status only
            self._limited.log(
                logging.INFO,
                "%s: refused a malformed request (%s, HTTP %s); its content is not logged",
                self._listener,
                type(error).__name__,
                error.code,
                key="malformed",
            )
            return
        self._limited.log(
            record.levelno,
            "%s: %s",
            self._listener,
            record.getMessage(),
            key=str(record.msg),
            exc_info=record.exc_info,
        )


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit (each Envoy stream and HTTP client needs a descriptor,
    and distributions still start services at 1024); returns the limit in force, and logs what it did."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_CEILING if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CEILING)
    if target <= soft:
        log.info("open-file limit %d (hard limit %s)", soft, _limit_text(hard))
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        log.warning("open-file limit stays at %d: raising it to %d failed: %s", soft, target, error)
        return soft
    log.info("open-file limit raised from %d to %d (hard limit %s)", soft, target, _limit_text(hard))
    return target


def _limit_text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def fit_connection_budget(limit: int, listeners: dict[str, int]) -> dict[str, int]:
    """Connection bounds that leave at least half the descriptors to xDS streams and everything else.

    When the listeners' bounds add up to more (a low hard limit), each is scaled down in proportion, and the
    operator is told: a flood on one listener then still cannot starve xDS, whatever the flags say.
    """
    budget = max(limit // 2, len(listeners))
    total = sum(listeners.values())
    if total <= budget:
        return dict(listeners)
    fitted = {name: max(1, count * budget // total) for name, count in listeners.items()}
    log.warning(
        "HTTP listeners' connection bounds (%s) add up to %d, over half the open-file limit of %d: lowered to %s",
        _listed(listeners),
        total,
        limit,
        _listed(fitted),
    )
    return fitted


def _listed(listeners: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in listeners.items())


# Descriptors no listener may take: outgoing calls (GitLab, JWKS), the audit store, state files, grpc's own
# (epoll, wake-up pipes) and the one grpc uses for an instant to accept and close a connection past its bound.
RESERVE_MIN = 64


def descriptor_reserve(limit: int) -> int:
    return max(RESERVE_MIN, limit // 16)


def fit_xds_connections(limit: int, listeners: dict[str, int], requested: int | None) -> int:
    """The xDS port's connection bound: what the HTTP listeners (already fitted) and the reserve leave, or less
    if asked. Logs the whole split, so an operator sees where the descriptors went."""
    reserve = descriptor_reserve(limit)
    available = max(1, limit - sum(listeners.values()) - reserve)
    xds = available if requested is None else min(requested, available)
    if requested is not None and requested > available:
        log.warning(
            "--xds-max-connections %d lowered to %d: the open-file limit of %d leaves no more", requested, xds, limit
        )
    log.info(
        "open-file limit %d shared out: xDS %d connections; HTTP %s; %d kept for outgoing calls, files, audit store",
        limit,
        xds,
        _listed(listeners),
        limit - xds - sum(listeners.values()),
    )
    return xds


def fit_listeners(limit: int, http: Mapping[str, HttpLimits], xds: int | None) -> tuple[dict[str, HttpLimits], int]:
    """Every listener's connection bound within the open-file limit `limit`: the HTTP listeners (by name) lowered
    if need be to leave half the descriptors to xDS, and xDS given what they and a reserve leave, or `xds` if
    that is less (docs/http-listeners.md)."""
    fitted = fit_connection_budget(limit, {name: limits.max_connections for name, limits in http.items()})
    lowered = {name: limits.with_connections(fitted[name]) for name, limits in http.items()}
    return lowered, fit_xds_connections(limit, fitted, xds)


def is_loopback(host: str) -> bool:
    """True when a bound socket address only accepts local connections."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
