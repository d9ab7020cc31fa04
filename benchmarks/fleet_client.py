"""Simulated Envoy fleet: ADS client streams driven from worker processes (see fleet_sim.py).

Each worker process runs one asyncio + grpc.aio loop holding many streams. Every stream has its own channel
with ``grpc.use_local_subchannel_pool=1``: without it grpc shares one subchannel (one TCP connection) between
all channels to the same target, and the "fleet" would silently become a multiplexing test
(../shared/reference/xds-protocol-observed.md §4). Channels open in waves of 100 with ``channel_ready()`` and a
retry, because opening thousands at once from one process makes grpc core fail some of them.

The protocol logic is a ``StreamDriver``; only ``SotwDriver`` exists today. A Delta driver would implement
the same small interface (``start``/``on_response``/``settled``/``converged_to``) and be picked by ``--mode``.

The parent talks to a worker over a ``multiprocessing`` pipe with ``(command, kwargs)`` tuples and gets one
reply per command. Times are ``time.monotonic()``, which on Linux is one system-wide clock, so the parent can
subtract its own file-write timestamp from a worker's ACK timestamp.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2  # type: ignore[import-untyped]

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LABELS = {CDS: "cds", EDS: "eds", LDS: "lds", RDS: "rds"}
URLS = {v: k for k, v in LABELS.items()}
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
HCM_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)
WAVE = 100
STARTUP_ATTEMPTS = 4
STARTUP_READ_TIMEOUT = 20.0
RETRYABLE = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})
POLL = 0.02  # worker-side poll interval for convergence checks; ACK times are stamped when they happen

# Resource names derived from one response version are the same for every stream: parse each version once per
# worker, otherwise the load generator's CPU (on the server's cores) grows with N x response size.
_NAMES_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}


def eds_names(response: discovery_pb2.DiscoveryResponse) -> tuple[str, ...]:
    """Clusters Envoy would subscribe to over EDS: those of type EDS, by service name or cluster name."""
    key = (response.type_url, response.version_info)
    if key not in _NAMES_CACHE:
        names = []
        for any_ in response.resources:
            cluster = cluster_pb2.Cluster.FromString(any_.value)
            if cluster.type == cluster_pb2.Cluster.EDS:
                names.append(cluster.eds_cluster_config.service_name or cluster.name)
        _NAMES_CACHE[key] = tuple(sorted(names))
    return _NAMES_CACHE[key]


def route_names(response: discovery_pb2.DiscoveryResponse) -> tuple[str, ...]:
    """Route configurations named by the listeners' HTTP connection managers (what Envoy asks RDS for)."""
    key = (response.type_url, response.version_info)
    if key not in _NAMES_CACHE:
        names = set()
        for any_ in response.resources:
            listener = listener_pb2.Listener.FromString(any_.value)
            for chain in listener.filter_chains:
                for filt in chain.filters:
                    if filt.typed_config.type_url == HCM_URL:
                        hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(filt.typed_config.value)
                        if hcm.HasField("rds"):
                            names.add(hcm.rds.route_config_name)
        _NAMES_CACHE[key] = tuple(sorted(names))
    return _NAMES_CACHE[key]


@dataclass
class StreamState:
    """What one simulated Envoy holds; identical for every protocol mode so the parent's checks are shared."""

    index: int
    node_id: str
    acked: dict[str, str] = field(default_factory=dict)  # label -> version
    last_version: dict[str, str] = field(default_factory=dict)  # label -> version of the latest response
    ack_times: dict[tuple[str, str], float] = field(default_factory=dict)  # first ACK of (label, version)
    received: Counter[tuple[str, str]] = field(default_factory=Counter)  # responses per (label, version)
    nacked: list[tuple[str, str]] = field(default_factory=list)
    nack_next: set[str] = field(default_factory=set)
    subscribed: set[str] = field(default_factory=set)
    ready_at: float | None = None
    connected_at: float = 0.0
    error: str | None = None

    def settled(self) -> bool:
        """Startup finished and every subscribed type's latest response was answered (ACKed or NACKed)."""
        if self.ready_at is None:
            return False
        for label in self.subscribed:
            version = self.last_version.get(label)
            if version is None:
                return False
            if self.acked.get(label) != version and (label, version) not in self.nacked:
                return False
        return True


class StreamDriver:
    """One ADS stream's protocol behaviour; subclasses implement a wire protocol (SotW today, Delta later)."""

    def __init__(self, state: StreamState, group: str) -> None:
        self.state = state
        self.group = group

    def first_requests(self) -> list[Any]:
        raise NotImplementedError

    def on_response(self, response: Any, now: float) -> list[Any]:
        raise NotImplementedError

    method: str = ADS_METHOD
    request_type: Any = discovery_pb2.DiscoveryRequest
    response_type: Any = discovery_pb2.DiscoveryResponse


class SotwDriver(StreamDriver):
    """Envoy's SotW startup: CDS wildcard, EDS for EDS clusters, then LDS wildcard, RDS for the HCMs' routes.

    Envoy sends the EDS subscription before ACKing CDS (cluster warming), and asks for listeners only once
    the clusters are warm; every later response is ACKed with the version and nonce it carried.
    """

    def __init__(self, state: StreamState, group: str) -> None:
        super().__init__(state, group)
        self.names: dict[str, tuple[str, ...]] = {"cds": (), "lds": (), "eds": (), "rds": ()}
        self.nonce: dict[str, str] = {}
        self.lds_requested = False

    def _request(self, label: str, *, error: str | None = None, first: bool = False) -> discovery_pb2.DiscoveryRequest:
        request = discovery_pb2.DiscoveryRequest(
            version_info=self.state.acked.get(label, ""),
            type_url=URLS[label],
            response_nonce=self.nonce.get(label, ""),
            resource_names=self.names[label],
        )
        if first:
            request.node.id = self.state.node_id
            request.node.cluster = self.group
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        return request

    def first_requests(self) -> list[Any]:
        self.state.subscribed.add("cds")
        return [self._request("cds", first=True)]

    def _subscribe(self, label: str, names: tuple[str, ...]) -> list[Any]:
        if not names or (label in self.state.subscribed and names == self.names[label]):
            return []
        self.names[label] = names
        self.state.subscribed.add(label)
        return [self._request(label)]

    def on_response(self, response: Any, now: float) -> list[Any]:
        label = LABELS.get(response.type_url)
        if label is None:
            return []
        state, version = self.state, response.version_info
        state.received[label, version] += 1
        state.last_version[label] = version
        self.nonce[label] = response.nonce
        if label in state.nack_next:
            state.nack_next.discard(label)
            state.nacked.append((label, version))
            return [self._request(label, error="fleet_sim: rejected on command")]
        out: list[Any] = []
        if label == "cds":
            out += self._subscribe("eds", eds_names(response))
        elif label == "lds":
            out += self._subscribe("rds", route_names(response))
        state.acked[label] = version
        state.ack_times.setdefault((label, version), now)
        out.append(self._request(label))
        if not self.lds_requested and (label == "eds" or (label == "cds" and "eds" not in state.subscribed)):
            self.lds_requested = True
            state.subscribed.add("lds")
            out.append(self._request("lds"))
        if state.ready_at is None and self._startup_done():
            state.ready_at = now
        return out

    def _startup_done(self) -> bool:
        return self.lds_requested and all(label in self.state.acked for label in self.state.subscribed)


DRIVERS: dict[str, Callable[[StreamState, str], StreamDriver]] = {"sotw": SotwDriver}


class SimStream:
    """One simulated Envoy: a channel of its own and the ADS call, reconnectable with the same node id."""

    def __init__(self, index: int, target: str, group: str, mode: str) -> None:
        self.index, self.target, self.group, self.mode = index, target, group, mode
        self.state = StreamState(index, f"fleet-{index:05d}")
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        self.retries = 0

    async def open(self, timeout: float = 10.0, attempts: int = 3) -> bool:
        for _ in range(attempts):
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except (TimeoutError, grpc.aio.AioRpcError):
                await channel.close()
                continue
            self.channel = channel
            self.task = asyncio.create_task(self._run(channel))
            return True
        self.state.error = "channel never became ready"
        return False

    async def _run(self, channel: grpc.aio.Channel) -> None:
        """Run the stream; before startup completes, retry a call grpc core fails (INTERNAL / UNAVAILABLE).

        At thousands of channels per process, grpc core sometimes fails the first SendMessage of a call on a
        channel that reported ready (xds-protocol-observed.md §4); a real Envoy would simply reconnect too.
        """
        for attempt in range(STARTUP_ATTEMPTS):
            retry = await self._call(channel)
            if not retry or attempt == STARTUP_ATTEMPTS - 1:
                return
            self.retries += 1
            await channel.close()
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self.channel = channel
            try:
                await asyncio.wait_for(channel.channel_ready(), 10.0)
            except (TimeoutError, grpc.aio.AioRpcError):
                continue

    async def _call(self, channel: grpc.aio.Channel) -> bool:
        """One ADS call; True when it failed during startup in a way worth retrying."""
        nack_next = set(self.state.nack_next)
        self.state = StreamState(self.index, self.state.node_id, nack_next=nack_next, connected_at=time.monotonic())
        driver = DRIVERS[self.mode](self.state, self.group)
        call = channel.stream_stream(
            driver.method,
            request_serializer=driver.request_type.SerializeToString,
            response_deserializer=driver.response_type.FromString,
        )()
        try:
            for request in driver.first_requests():
                await call.write(request)
            while True:
                if self.state.ready_at is None:
                    # Watchdog: a call grpc core silently never started (seen at 2,500 channels per process;
                    # the server never saw it) would otherwise hang the storm forever.
                    response = await asyncio.wait_for(call.read(), STARTUP_READ_TIMEOUT)
                else:
                    response = await call.read()
                if response is grpc.aio.EOF:
                    self.state.error = "server closed the stream"
                    return False
                for request in driver.on_response(response, time.monotonic()):
                    await call.write(request)
        except TimeoutError:
            call.cancel()
            self.state.error = f"no response within {STARTUP_READ_TIMEOUT:.0f} s during startup"
            return True
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return False
            self.state.error = f"{exc.code().name}: {exc.details()}"
            return self.state.ready_at is None and exc.code() in RETRYABLE

    async def close(self) -> None:
        task, channel, self.task, self.channel = self.task, self.channel, None, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if channel is not None:
            await channel.close()


async def poll(check: Callable[[], bool], timeout: float) -> bool:
    """Re-check ``check`` every POLL seconds until it holds or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


class Worker:
    """Serves the parent's commands for the streams this process owns."""

    def __init__(self, conn: Connection, target: str, group: str, mode: str, indices: list[int]) -> None:
        self.conn = conn
        self.streams = {i: SimStream(i, target, group, mode) for i in indices}

    async def open_waves(self, streams: Iterable[SimStream], timeout: float) -> list[int]:
        failed: list[int] = []
        batch = list(streams)
        for start in range(0, len(batch), WAVE):
            wave = batch[start : start + WAVE]
            results = await asyncio.gather(*(s.open(timeout) for s in wave))
            failed += [s.index for s, ok in zip(wave, results, strict=True) if not ok]
        return failed

    def _live(self) -> list[SimStream]:
        return [s for s in self.streams.values() if s.task is not None]

    async def cmd_connect(self, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        failed = await self.open_waves(self.streams.values(), timeout)
        ok = await poll(lambda: all(s.state.settled() for s in self._live()), timeout)
        return {
            "started": started,
            "ready": {s.index: s.state.ready_at for s in self.streams.values()},
            "failed": failed,
            "retries": sum(s.retries for s in self.streams.values()),
            "converged": ok,
            "errors": {s.index: s.state.error for s in self.streams.values() if s.state.error},
        }

    async def cmd_versions(self, index: int) -> dict[str, str]:
        return dict(self.streams[index].state.acked)

    async def cmd_await_change(
        self,
        baseline: dict[str, str],
        labels: list[str],
        timeout: float,
        exclude: list[int],
        transitional: str = "+keep",
    ) -> dict[str, Any]:
        """Wait until every stream settled on one common version (≠ baseline) for each label; return ACK times.

        A version ending in ``transitional`` is the server's make-before-break CDS (new clusters plus the removed
        ones still in use); it is not the target, the final CDS that follows the route update is. Its ACK time is
        reported as ``<label><transitional>``.
        """
        streams = [s for s in self._live() if s.index not in exclude]

        def target() -> dict[str, str] | None:
            versions: dict[str, str] = {}
            for s in streams:
                if not s.state.settled():
                    return None
                for label in labels:
                    acked = s.state.acked.get(label)
                    if acked is None or acked == baseline.get(label) or acked.endswith(transitional):
                        return None
                    if versions.setdefault(label, acked) != acked:
                        return None
            return versions

        ok = await poll(lambda: target() is not None, timeout)
        versions = target() or {}
        times: dict[int, dict[str, float | None]] = {}
        for s in streams:
            times[s.index] = {label: s.state.ack_times.get((label, v)) for label, v in versions.items()}
            for label, v in versions.items():
                if (label, v + transitional) in s.state.ack_times:
                    times[s.index][label + transitional] = s.state.ack_times[label, v + transitional]
        return {"converged": ok, "versions": versions, "ack_times": times}

    async def cmd_nack_next(self, index: int, label: str) -> bool:
        self.streams[index].state.nack_next.add(label)
        return True

    async def cmd_stream_stats(self, index: int) -> dict[str, Any]:
        state = self.streams[index].state
        return {"acked": dict(state.acked), "received": dict(state.received), "nacked": list(state.nacked)}

    async def cmd_seen(self) -> dict[str, int]:
        """Most distinct versions of each type any one stream received (how many pushes reached it)."""
        most: dict[str, int] = {}
        for s in self.streams.values():
            per: Counter[str] = Counter(label for label, _ in s.state.received)
            for label, n in per.items():
                most[label] = max(most.get(label, 0), n)
        return most

    async def cmd_churn(self, fraction: float, seconds: int, timeout: float, seed: int) -> dict[str, Any]:
        """Every second, drop and reopen ``fraction`` of the streams (same node ids); then wait for all to settle.

        The one-second ticks pace the load generator (they are the scenario's definition), not a wait for state.
        """
        rng = random.Random(seed)
        indices = list(self.streams)
        per_tick = max(1, round(fraction * len(indices)))
        reopened: list[SimStream] = []
        failed: list[int] = []
        begin = time.monotonic()
        for tick in range(seconds):
            await asyncio.sleep(max(0.0, begin + tick - time.monotonic()))  # pacing: one churn wave per second
            chosen = [self.streams[i] for i in rng.sample(indices, per_tick)]
            await asyncio.gather(*(s.close() for s in chosen))
            failed += await self.open_waves(chosen, timeout)
            reopened += chosen
        ok = await poll(lambda: all(s.state.settled() for s in self._live()), timeout)
        times = [s.state.ready_at - s.state.connected_at for s in reopened if s.state.ready_at is not None]
        return {
            "reconnects": len(reopened),
            "failed": failed,
            "converged": ok,
            "reconverge_s": times,
            "live": len(self._live()),
        }

    async def cmd_close(self) -> bool:
        await asyncio.gather(*(s.close() for s in self.streams.values()))
        return True

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ready = loop.create_future()
            loop.add_reader(self.conn.fileno(), ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(self.conn.fileno())
            name, kwargs = self.conn.recv()
            if name == "stop":
                await self.cmd_close()
                self.conn.send(("ok", True))
                return
            try:
                result = await getattr(self, f"cmd_{name}")(**kwargs)
                self.conn.send(("ok", result))
            except Exception as exc:  # report to the parent rather than dying silently
                self.conn.send(("error", f"{type(exc).__name__}: {exc}"))


def worker_main(conn: Connection, target: str, group: str, mode: str, indices: list[int]) -> None:
    """Entry point of a worker process (spawned by fleet_sim.py)."""
    asyncio.run(Worker(conn, target, group, mode, indices).serve())
