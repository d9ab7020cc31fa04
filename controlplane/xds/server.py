"""The grpc.aio adapter around `protocol.AdsStream` and `delta.DeltaStream`: sockets, tasks, logs and
metrics, and no protocol rules.

Per stream there is one reader (requests → state machine) and one writer (an asyncio.Queue → `context.write`),
so writes never overlap. Snapshot changes arrive from the cache listener in the event loop and are fed to the
state machine of every stream of that group; whatever it returns is queued for the writer. Responses are
serialized but for the stream's nonce (serialize-once), so the response serializer only appends it.

The server owns what its streams share (`FanOutCache`, handed to every state machine it creates) and the
labelled metric children it looks up per message (`_TypeMetrics`); nothing of it lives in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Snapshot
from controlplane.telemetry import metrics
from controlplane.telemetry.ratelog import RateLimitedLog
from controlplane.xds import protocol
from controlplane.xds.delta import DeltaStream
from controlplane.xds.fleet_status import ProxyRecord, ProxyRegistry, truncate_error
from controlplane.xds.memo import FanOutCache
from controlplane.xds.protocol import AdsStream, Output, Response, type_label
from controlplane.xds.tls import ServerTls, peer_identity

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
SHUTDOWN_DETAILS = "control plane shutting down"
# Streams brought up to date per event-loop turn during a fan-out: ~5 ms of work, after which the loop answers
# new connections, ACKs, health checks and the writers it has just fed before the next chunk.
FAN_OUT_CHUNK = 500

PENDING_CALLS_LIMIT = 1 << 17
# What one client may make the server hold (docs/xds-and-audit-bounds.md): Envoy's requests are a few KB (the
# node with its extension list, subscriptions, a NACK's error text) and its ALS batches 16 KB by default; one
# Envoy opens one ADS stream and an ALS stream per worker thread and log, so a connection needs a handful.
MAX_RECEIVE_MESSAGE_BYTES = 2 * 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 100
# The `group` label of controlplane_xds_connected_proxies for groups the policy does not define: a client picks
# its node.cluster, and one series per made-up name would grow the metrics without bound.
UNKNOWN_GROUP = "unknown"
# A fleet reconnecting after a restart is logged in full up to this many streams a minute, then counted.
CONNECTION_LINES_PER_MINUTE = 300
WARNINGS_PER_MINUTE = 10  # per kind of client-caused warning (unknown type, unknown group, refused node)
_SHOWN_CHARS = 128  # of a client-chosen string (a type URL, a version) in one log line
# How long `attest` waits for the ADS stream of a node that names itself on another stream (an Envoy
# reconnecting to a restarted control plane may open its access-log stream first), and for how many at once.
ATTEST_WAIT = 10.0
MAX_AWAITING_ATTESTATION = 1024
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # BDP probing pings a peer whenever data arrives, to grow the receive window; an xDS server only receives
    # small requests, so the pings are pure cost: with it, every ACK also meant a PING and its PING ACK on that
    # proxy's connection (benchmarks/grpc_floor.py, 1,000 connections: 302 -> 167 µs of server CPU per message).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
    # grpc core cancels calls the application has not asked for yet once more than 1,000 wait (at once beyond
    # 3,000), and any that waited 30 s: a fleet reconnecting after a restart had ~5% of 5,000 and ~11% of 10,000
    # calls CANCELLED before the handler ran (benchmarks/fleet_sim.py --inflight 0), and retried. Every proxy
    # that connects is to be served, so the queue may hold a whole fleet, for as long as a connect storm takes.
    ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_LIMIT),
    ("grpc.server_max_unrequested_time_in_server", 300),
    # Envoy's bootstrap pings every 30 s (cli/bootstrap.py). grpc's default server policy answers pings on a quiet
    # connection more often than every 5 minutes with GOAWAY "too_many_pings", which would drop every idle proxy.
    # Our own pings find dead proxies so they leave the status page and the gauges.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)
# A connection that has not completed grpc's handshake (TLS if any, then the HTTP/2 preface and SETTINGS) this
# long after connecting is closed. grpc's default of 120 s let ~17 silent connections a second keep every
# descriptor of the process taken (issue 10); an Envoy finishes it in milliseconds, even over TLS.
HANDSHAKE_TIMEOUT = 10.0
# A connection with no call open this long gets GOAWAY. An Envoy's ADS stream lasts as long as its connection,
# so this only ends connections that finished the handshake and never (or no longer) call: without it they
# would hold a slot of the bound below for good, answering our keep-alive pings.
IDLE_TIMEOUT = 60.0


def connection_options(
    max_connections: int | None, handshake_timeout: float, idle_timeout: float
) -> tuple[tuple[str, int], ...]:
    """grpc core's bounds on connections, per listening socket: past `max_connections` it accepts and closes at
    once (so the descriptor comes straight back), and it drops a connection that does not finish its handshake
    in time or holds no call for `idle_timeout`; docs/http-listeners.md, "The xDS port"."""
    bound = () if max_connections is None else (("grpc.max_allowed_incoming_connections", max_connections),)
    return (
        *bound,
        ("grpc.server_handshake_timeout_ms", _ms(handshake_timeout)),
        ("grpc.max_connection_idle_ms", _ms(idle_timeout)),
    )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class _TypeMetrics:
    """Labelled metric children, looked up once per type instead of once per message (labels() costs ~20 µs).

    Looked up on first use, not at import: a child is exported as soon as it exists, and /metrics shows a
    type's series only once something of that type was pushed or answered.
    """

    def __init__(self) -> None:
        self._pushes: dict[str, tuple[Any, Any, Any]] = {}
        self._ack_latency: dict[str, Any] = {}

    def pushed(self, response: Response) -> None:
        """Count one response written: the response, its bytes and its resources, by type."""
        children = self._pushes.get(response.type_url)
        if children is None:
            label = type_label(response.type_url)
            children = self._pushes[response.type_url] = (
                metrics.XDS_PUSHES.labels(label),
                metrics.XDS_PUSHED_BYTES.labels(label),
                metrics.XDS_PUSHED_RESOURCES.labels(label),
            )
        pushes, sent_bytes, resources = children
        pushes.inc()
        sent_bytes.inc(response.size)
        resources.inc(response.resource_count)

    def ack_latency(self, type_url: str) -> Any:
        child = self._ack_latency.get(type_url)
        if child is None:
            child = self._ack_latency[type_url] = metrics.PUSH_ACK_LATENCY.labels(type_label(type_url))
        return child


def peer_address(peer: str) -> str:
    """`ipv4:10.0.0.1:4242` → `10.0.0.1:4242` (and `ipv6:[::1]:4242` → `[::1]:4242`); others unchanged."""
    for scheme in ("ipv4:", "ipv6:"):
        if peer.startswith(scheme):
            return peer[len(scheme) :]
    return peer


def clip(text: str, limit: int = _SHOWN_CHARS) -> str:
    """A client-chosen string cut for a log line: whatever a client sends, one line stays small."""
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text)} chars]"


def peer_host(peer: str) -> str:
    """The host of a peer address: `ipv4:10.0.0.1:4242` or `10.0.0.1:4242` → `10.0.0.1`, `[::1]:4242` → `::1`.

    Envoy opens its access-log streams on connections of their own (other source ports), so a sender is
    matched to its ADS stream by host, not by the whole address."""
    address = peer_address(peer)
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


@dataclass(frozen=True, slots=True)
class Sender:
    """A gateway vouched for by its live ADS stream: whom the audit trail says an access-log stream came from.

    `label` is its group as metrics may name it (a group the policy defined when the stream was attested),
    `peer` the host both streams come from, `identity` their mTLS client certificate's (None in plain text).

    In plain text, anyone who can reach the xDS port can open an ADS stream as any node, so a `Sender` proves
    only that some client on that host holds one; only a certificate per gateway (mTLS) makes it that gateway.
    """

    node_id: str
    group: str
    label: str
    peer: str
    identity: str | None


def _addresses(host: str) -> int:
    """How many listening sockets grpc opens for `host`: it applies the connection bound to each one."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        return 1  # one wildcard socket (dual-stack for ::)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), 0, type=socket.SOCK_STREAM)
    except OSError:
        return 1  # grpc's own resolution will fail the bind and say so
    return max(1, len({info[4][0] for info in infos}))


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


RequestT = TypeVar("RequestT")


class _Machine(Protocol):
    """What the adapter needs of a stream's state machine, SotW or Delta (requests go in via `_serve`)."""

    node: base_pb2.Node | None

    @property
    def node_id(self) -> str: ...

    @property
    def group(self) -> str: ...

    def set_snapshot(self, snapshot: Snapshot, now: float) -> Output: ...


class _Session:
    """One ADS stream: its state machine, the writer's queue and its registry record once identified."""

    def __init__(self, machine: _Machine, peer: str, protocol: str, identity: str | None = None) -> None:
        self.machine = machine
        self.peer = peer
        self.identity = identity  # the mTLS client certificate's identity, None in plain text
        self.protocol = protocol  # "sotw" or "delta", as the status page shows it
        self.queue: asyncio.Queue[Response | None] = asyncio.Queue()
        self.record: ProxyRecord | None = None
        self.label = UNKNOWN_GROUP  # its group's label on the connected-proxies gauge, chosen when identified
        self.refusal: str | None = None  # why the stream is refused (INVALID_ARGUMENT), when it is
        self.shutting_down = False

    def close(self, *, shutting_down: bool = False) -> None:
        self.shutting_down = self.shutting_down or shutting_down
        self.queue.put_nowait(None)


class XdsServer:
    """SotW and Delta ADS over grpc.aio. `start` binds and serves; `stop` ends every stream cleanly, then the server."""

    def __init__(
        self,
        cache: SnapshotCache,
        registry: ProxyRegistry,
        *,
        log: logging.Logger,
        max_connections: int | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        connection_lines_per_minute: int = CONNECTION_LINES_PER_MINUTE,
    ) -> None:
        """`max_connections`: this port's share of the process's descriptors (None: unbounded, for tests).
        `connection_lines_per_minute`: "connected" and "disconnected" lines each; anyone reaching the port can
        open streams, so the rest are counted in a "suppressed" line."""
        if max_connections is not None and max_connections < 1:
            raise ValueError("xDS max connections must be at least 1")
        self.cache = cache
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.registry = registry
        self.log = log
        self.fan_out = FanOutCache()  # what every stream of a push computes alike, shared by all of ours
        self._metrics = _TypeMetrics()
        self._server: grpc.aio.Server | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: set[_Session] = set()
        self._by_group: defaultdict[str, set[_Session]] = defaultdict(set)
        self._by_node: defaultdict[str, set[_Session]] = defaultdict(set)  # identified streams by node id
        self._awaiting: defaultdict[str, set[asyncio.Future[None]]] = defaultdict(set)  # attest() by node id
        self._awaiting_count = 0
        self.attest_wait = ATTEST_WAIT
        self._latest: dict[str, Snapshot] = {}  # the snapshot a running fan-out is delivering, by group
        self._fan_outs: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._last_activity: float | None = None  # monotonic time of the last push or request
        self._unsupported_log = RateLimitedLog(self.log, burst=WARNINGS_PER_MINUTE)
        self._unknown_group_log = RateLimitedLog(self.log, burst=WARNINGS_PER_MINUTE)
        self._refused_log = RateLimitedLog(self.log, burst=WARNINGS_PER_MINUTE)
        self._connections_log = RateLimitedLog(self.log, burst=connection_lines_per_minute)

    def idle_for(self) -> float:
        """Seconds since the last push started or request arrived; 0 during a fan-out, inf before any."""
        if self._fan_outs:
            return 0.0
        return float("inf") if self._last_activity is None else time.monotonic() - self._last_activity

    # -- lifecycle

    async def start(
        self,
        host: str,
        port: int,
        *,
        tls: ServerTls | None = None,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> int:
        """Bind `host:port` (0 = ephemeral) and serve; returns the bound port.

        `extra_handlers`: other services on the same port (the audit ALS), so Envoy needs one cluster only.
        Given here, not to the constructor: the ALS asks this server who holds an ADS stream, so it is built
        with the server and its handler joins when the port opens.

        With `tls`, the port speaks TLS only and (by default) requires a client certificate signed by its CA;
        the files are read here, so a missing or malformed one stops start-up instead of every handshake.
        """
        per_socket = None if self.max_connections is None else max(1, self.max_connections // _addresses(host))
        options = SERVER_OPTIONS + connection_options(per_socket, self.handshake_timeout, self.idle_timeout)
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((self._handlers(), *extra_handlers))
        address = _bind_address(host, port)
        credentials = tls.credentials() if tls is not None else None
        try:
            if credentials is None:
                bound: int = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpc reports a failed bind as RuntimeError, with no reason
            raise OSError(f"cannot bind the xDS server to {host}:{port} (address in use or not local?)") from error
        await server.start()
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._unsubscribe = self.cache.subscribe(self._on_snapshot)
        return bound

    async def stop(self, grace: float) -> None:
        """End our streams ourselves (UNAVAILABLE, so Envoy reconnects) and then stop grpc.

        Letting grpc cancel live handlers prints a CancelledError traceback per stream (reference §7.12);
        closed first, handlers return normally and only a writer stuck on a dead peer waits for `grace`.
        """
        self._stopping = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for task in tuple(self._fan_outs.values()):
            task.cancel()
        for session in tuple(self._sessions):
            session.close(shutting_down=True)
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=self._serialize,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self._delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=self._serialize,
                ),
            },
        )

    def _serialize(self, response: Response) -> bytes:
        """The bytes on the wire, built as grpc writes them: queues hold the shared bytes, not a copy each."""
        return response.wire(self.fan_out)

    # -- one stream

    async def _stream(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        machine = AdsStream(self.fan_out, self.registry.rejections)
        session = _Session(machine, peer_address(context.peer()), "sotw", peer_identity(context))
        await self._serve(session, machine.receive, requests, context)

    async def _delta(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        machine = DeltaStream(self.fan_out, self.registry.rejections)
        session = _Session(machine, peer_address(context.peer()), "delta", peer_identity(context))
        await self._serve(session, machine.receive, requests, context)

    async def _serve(
        self,
        session: _Session,
        receive: Callable[[RequestT, float], Output],
        requests: AsyncIterator[RequestT],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Both protocols share everything but the machine: `receive` is its request entry point."""
        if self._stopping:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(SHUTDOWN_DETAILS)
            return
        self._sessions.add(session)
        reader = asyncio.create_task(self._read(session, receive, requests))
        try:
            await self._write(session, context)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._forget(session)
        if session.refusal is not None:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(session.refusal)
        elif session.shutting_down:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(SHUTDOWN_DETAILS)

    async def _write(self, session: _Session, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        debug = self.log.isEnabledFor(logging.DEBUG)
        while (response := await session.queue.get()) is not None:
            await context.write(response)
            self._metrics.pushed(response)
            if debug:
                self.log.debug(
                    "pushed %s version %s nonce %s (%d resources, %d bytes) to %s",
                    response.label,
                    response.version,
                    response.nonce,
                    response.resource_count,
                    response.size,
                    session.machine.node_id,
                )

    async def _read(
        self, session: _Session, receive: Callable[[RequestT, float], Output], requests: AsyncIterator[RequestT]
    ) -> None:
        try:
            async for request in requests:
                self._on_request(session, receive, request)
        except asyncio.CancelledError:
            raise
        except protocol.InvalidRequest as error:  # the message names sizes, never the content
            session.refusal = str(error)
            self._refused_log.log(logging.WARNING, "refused ADS stream from %s: %s", session.peer, error)
        except Exception as error:  # a broken peer or a bug: end this stream, keep the others
            self.log.warning("ADS stream from %s (%s) failed: %r", session.peer, clip(session.machine.node_id), error)
        finally:
            session.close()  # the peer half-closed or failed: end the writer, and so the RPC

    def _on_request(self, session: _Session, receive: Callable[[RequestT, float], Output], request: RequestT) -> None:
        now = self._last_activity = time.monotonic()
        self._apply(session, receive(request, now))
        if session.record is None and session.machine.node is not None:
            if _new_process(request):  # before the snapshot is set: nothing was withheld from it yet
                self.registry.rejections.forget(session.machine.node_id)
            self._identify(session, now)

    def _identify(self, session: _Session, now: float) -> None:
        """First request seen: register the proxy and serve the snapshot of its group (node.cluster)."""
        machine = session.machine
        group = machine.group
        session.record = self.registry.connect(machine.node_id, group, session.peer, time.time())
        session.record.protocol = session.protocol
        self._by_group[group].add(session)
        self._by_node[machine.node_id].add(session)
        for waiter in self._awaiting.pop(machine.node_id, ()):
            if not waiter.done():
                waiter.set_result(None)
        known = self.cache.known(group)
        session.label = group if known else UNKNOWN_GROUP
        metrics.CONNECTED_PROXIES.labels(session.label).inc()
        self._connections_log.log(
            logging.INFO, "proxy %s connected from %s (group %s)", clip(machine.node_id), session.peer, clip(group)
        )
        if not known:
            self._unknown_group_log.log(
                logging.WARNING,
                "proxy %s belongs to gateway group %r, which no policy defines: serving it an empty config",
                clip(machine.node_id),
                clip(group),
            )
        self._apply(session, machine.set_snapshot(self.cache.get(group), now))

    def _forget(self, session: _Session) -> None:
        self._sessions.discard(session)
        record = session.record
        if record is None:
            return
        streams = self._by_group.get(record.group)
        if streams is not None:
            streams.discard(session)
            if not streams:
                del self._by_group[record.group]
        same_node = self._by_node.get(record.node_id)
        if same_node is not None:
            same_node.discard(session)
            if not same_node:
                del self._by_node[record.node_id]
        self._proxy_left(session.label)
        for type_url in self.registry.disconnect(record, time.monotonic()):
            metrics.XDS_PROXIES_WITH_NACK.labels(type_label(type_url)).dec()
        self._connections_log.log(
            logging.INFO,
            "proxy %s disconnected (group %s, from %s)",
            clip(record.node_id),
            clip(record.group),
            record.peer,
        )

    # -- attesting other streams' senders (the audit ALS)

    async def attest(
        self, node_id: str, cluster: str, peer: str, identity: str | None, *, wait: float | None = None
    ) -> Sender | str:
        """The gateway behind a stream that says it is node `node_id` of `cluster`, or why there is none.

        Only a client that holds an ADS stream right now as that node id and cluster, from the same host and
        (with mTLS) with the same certificate identity, in a group the policy defines, is that gateway. The
        reasons, a bounded set for metrics: `no_xds_stream`, `peer_mismatch`, `identity_mismatch`,
        `unknown_group`, `overloaded`. A node with no ADS stream yet is waited for up to `wait` seconds (default
        `attest_wait`), a bounded number at a time.
        """
        wait = self.attest_wait if wait is None else wait
        if (
            len(node_id.encode()) > protocol.MAX_NODE_ID_BYTES
            or len(cluster.encode()) > protocol.MAX_NODE_CLUSTER_BYTES
        ):
            return "no_xds_stream"  # no ADS stream can have such a node: not worth waiting for
        host = peer_host(peer)
        verdict = self._match(node_id, cluster, host, identity)
        if isinstance(verdict, Sender) or verdict != "no_xds_stream" or wait <= 0:
            return verdict
        if self._awaiting_count >= MAX_AWAITING_ATTESTATION:
            return "overloaded"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._awaiting_count += 1
        try:
            while isinstance(verdict, str) and (remaining := deadline - loop.time()) > 0:
                waiter: asyncio.Future[None] = loop.create_future()
                self._awaiting[node_id].add(waiter)
                try:
                    await asyncio.wait({waiter}, timeout=remaining)
                finally:
                    self._stop_awaiting(node_id, waiter)
                verdict = self._match(node_id, cluster, host, identity)
            return verdict
        finally:
            self._awaiting_count -= 1

    def _stop_awaiting(self, node_id: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._awaiting.get(node_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._awaiting[node_id]
        waiter.cancel()

    def _match(self, node_id: str, cluster: str, host: str, identity: str | None) -> Sender | str:
        reason = "no_xds_stream"
        for session in self._by_node.get(node_id, ()):
            if session.machine.group != cluster:
                continue
            if peer_host(session.peer) != host:
                reason = "peer_mismatch"
            elif session.identity != identity:
                reason = "identity_mismatch"
            elif not self.cache.known(cluster):  # any client may name a group: its rows would name no gateway
                return "unknown_group"
            else:
                return Sender(node_id, cluster, cluster, host, identity)
        return reason

    def _proxy_left(self, label: str) -> None:
        """One proxy fewer on the gauge; a group the policy dropped loses its series once no proxy is left."""
        gauge = metrics.CONNECTED_PROXIES.labels(label)
        gauge.dec()
        if label != UNKNOWN_GROUP and not self.cache.known(label) and gauge._value.get() <= 0:
            metrics.CONNECTED_PROXIES.remove(label)

    # -- snapshot fan-out

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        """Cache listener. Hops onto the event loop when set() was called from another thread."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            self._loop.call_soon_threadsafe(self._push, snapshot)
        else:
            self._push(snapshot)

    def _push(self, snapshot: Snapshot) -> None:
        """Deliver `snapshot` to its group: by a fan-out task, or by the one already running (coalescing)."""
        group = snapshot.group
        self._latest[group] = snapshot
        self._last_activity = time.monotonic()
        if group not in self._fan_outs and self._loop is not None:
            self._fan_outs[group] = self._loop.create_task(self._fan_out(group))

    async def _fan_out(self, group: str) -> None:
        """Bring every stream of `group` to its newest snapshot, FAN_OUT_CHUNK streams per loop turn.

        A snapshot that arrives mid-way is what the remaining streams get, and one more pass then updates
        the streams served before it; so a burst of changes costs at most one pass more than a single change,
        and streams never receive the intermediate states they no longer need.
        """
        try:
            while True:
                first = self._latest[group]
                sessions = tuple(self._by_group.get(group, ()))
                for start in range(0, len(sessions), FAN_OUT_CHUNK):
                    if start:
                        await asyncio.sleep(0)
                    snapshot = self._latest[group]
                    now = time.monotonic()
                    for session in sessions[start : start + FAN_OUT_CHUNK]:
                        self._apply(session, session.machine.set_snapshot(snapshot, now))
                if self._latest[group] is first:  # nothing newer arrived: every stream got this one
                    return
        finally:
            del self._fan_outs[group]
            self._latest.pop(group, None)

    # -- outputs

    def _apply(self, session: _Session, output: Output) -> None:
        for response in output.responses:
            session.queue.put_nowait(response)
        for event in output.events:
            self._record(session, event)

    def _record(self, session: _Session, event: protocol.Event) -> None:
        node = clip(session.machine.node_id)
        record = session.record
        match event:
            case protocol.Ack(type_url=t, version=v, latency=latency, refusing=refusing):
                self._metrics.ack_latency(t).observe(latency)
                self.log.debug("ACK from %s: %s version %s (%.1f ms)", node, type_label(t), v, latency * 1e3)
                if record is not None and self.registry.acked(record, t, v, refusing=bool(refusing)):
                    metrics.XDS_PROXIES_WITH_NACK.labels(type_label(t)).dec()
            case protocol.Nack(type_url=t, version=v, latency=latency):
                self._nack(session, event)
                self._metrics.ack_latency(t).observe(latency)
            case protocol.Resumed(type_url=t, version=v):
                self.log.debug("proxy %s already holds %s version %s: nothing to send", node, type_label(t), v)
                if record is not None and self.registry.acked(record, t, v):
                    metrics.XDS_PROXIES_WITH_NACK.labels(type_label(t)).dec()
            case protocol.Withheld(type_url=t, version=v):
                self.log.info("not sending %s version %s to %s: it rejected that version", type_label(t), v, node)
            case protocol.Stale(type_url=t, nonce=n, expected=expected):
                self.log.debug("stale %s request from %s (nonce %s, last sent %s)", type_label(t), node, n, expected)
            case protocol.Subscribed(type_url=t, names=names):
                shown = "*" if names is None else ",".join(sorted(names))
                self.log.debug("proxy %s subscribes %s: %s", node, type_label(t), clip(shown, 1024))
            case protocol.Unsupported(type_url=t):
                self._unsupported_log.log(
                    logging.WARNING,
                    "proxy %s asked for type %r, which this control plane does not serve",
                    node,
                    clip(t),
                )
            case protocol.NodeIdentified():
                pass  # handled by _identify once the request is applied

    def _nack(self, session: _Session, nack: protocol.Nack) -> None:
        label = type_label(nack.type_url)
        metrics.XDS_NACKS.labels(label).inc()
        error = truncate_error(nack.error)
        self.log.warning(
            "NACK from %s (group %s): %s version %s rejected%s (%s), still running %s: %s",
            clip(session.machine.node_id),
            clip(session.machine.group),
            label,
            nack.version,
            " in an earlier response than the last sent" if nack.late else "",
            clip(",".join(nack.resources), 1024) or "no resource",
            clip(nack.accepted_version) or "(nothing)",
            error,
        )
        record = session.record
        if record is None:
            if nack.rejects_version:
                self.registry.rejections.remember_rejected(session.machine.node_id, nack.type_url, nack.version)
        elif self.registry.nacked(
            record, nack.type_url, nack.version, error, time.time(), remember=nack.rejects_version
        ):
            metrics.XDS_PROXIES_WITH_NACK.labels(label).inc()


def _new_process(request: object) -> bool:
    """The stream's first request holds no version: an Envoy that accepted nothing yet (a new process), not a
    reconnect (which names the versions it holds, SotW `version_info` or Delta `initial_resource_versions`)."""
    if isinstance(request, discovery_pb2.DiscoveryRequest):
        return not request.response_nonce and not request.version_info
    if isinstance(request, discovery_pb2.DeltaDiscoveryRequest):
        return not request.response_nonce and not request.initial_resource_versions
    return False
