"""Simulated Envoy fleet: ADS client streams driven from worker processes (see fleet_sim.py).

Each worker process runs one asyncio + grpc.aio loop holding many streams. By default every stream has its own
channel with ``grpc.use_local_subchannel_pool=1``: without it grpc shares one subchannel (one TCP connection)
between all channels to the same target, and the "fleet" would silently become a multiplexing test
(docs/xds-protocol.md, "Connections from one client process"). ``per_channel > 1`` multiplexes that many
streams (distinct node ids) on one channel on purpose; the parent says so in its output. Channels open in waves with
``channel_ready()`` and a retry, because opening thousands at once from one process makes grpc core fail some.

The protocol logic is a ``StreamDriver``: ``SotwDriver`` (StreamAggregatedResources) or ``DeltaDriver``
(DeltaAggregatedResources), picked by ``--mode``. Both fill the same ``StreamState``, whose ``acked[label]`` is
"the version of that type this Envoy holds": SotW's ``version_info``, and for Delta a digest of the held
``{name: version}`` set computed the way the server names a type's content (``held_version``), so the parent
compares versions the same way in both modes.

The parent talks to a worker over a ``multiprocessing`` pipe with ``(command, kwargs)`` tuples and gets one
reply per command. Times are ``time.monotonic()``, which on Linux is one system-wide clock, so the parent can
subtract its own file-write timestamp from a worker's ACK timestamp.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
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
# ECDS: an HTTP filter's configuration, named by the filter (HttpFilter.config_discovery; docs/envoy-ecds.md).
ECDS = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
LABELS = {CDS: "cds", EDS: "eds", LDS: "lds", ECDS: "ecds", RDS: "rds"}
URLS = {v: k for k, v in LABELS.items()}
ORDER = ("cds", "eds", "lds", "ecds", "rds")  # the server's push order (controlplane/snapshots/snapshot.py)
NAMED_BY_LISTENERS = ("ecds", "rds")  # types whose names a listener's HCMs give, subscribed after LDS
# Envoy subscribes to each filter configuration on its own as it builds the filter: one ECDS request per new name
# (SotW: the names so far; Delta: that name), ECDS before RDS, all before the LDS ACK (docs/envoy-ecds.md §8).
ONE_REQUEST_PER_NAME = ("ecds",)
MAKE_BEFORE_BREAK = ("cds", "eds")  # types a Delta client holds a transitional union of during a swap
ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
HCM_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# HTTP/2 flow control as Envoy does it: its xDS connection opens 256 MiB stream and connection windows up front
# (Http2ProtocolOptions defaults) and never sends BDP pings. grpc core's client defaults (a 64 KiB window grown
# by BDP probing) would make the server wait for a WINDOW_UPDATE in the middle of every large response and
# answer pings no real fleet sends.
ENVOY_WINDOW = 268_435_456
CHANNEL_OPTIONS = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", ENVOY_WINDOW),
)
WAVE = 100
STARTUP_ATTEMPTS = 4
# Failures of a call before startup completed that a real Envoy would answer by reconnecting. CANCELLED and
# RESOURCE_EXHAUSTED come from the server's grpc core dropping calls its application had not accepted yet
# (pending-queue limits); INTERNAL "Internal error from Core" is a write on a call the server already ended,
# whose real status grpc.aio overwrites (grpc/grpc#36066).
RETRYABLE = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
POLL = 0.02  # worker-side poll interval for convergence checks; ACK times are stamped when they happen

# Resource names derived from one response version are the same for every stream: parse each version once per
# worker, otherwise the load generator's CPU (on the server's cores) grows with N x response size.
_NAMES_CACHE: dict[tuple[str, str], tuple[str, ...]] = {}
_CLUSTER_CACHE: dict[tuple[str, str], str | None] = {}  # (name, version) -> EDS service name, None if not EDS
# (name, version) -> {"rds": route config names, "ecds": filter config names} of its HCMs
_LISTENER_CACHE: dict[tuple[str, str], dict[str, tuple[str, ...]]] = {}


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit: every stream is a socket (and grpc adds its own fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def held_version(type_url: str, held: Mapping[str, str]) -> str:
    """Name a Delta client's holdings like the server names a type's content (`TypeSnapshot.of`).

    sha256 over the type URL and every ``name\\0version\\0`` in name order, first 16 hex digits: when the client
    holds every resource of the type, this equals the server's type version (also its ``system_version_info``),
    and in any case two clients holding the same set get the same string, which is all the parent compares.
    """
    digest = hashlib.sha256(type_url.encode())
    for name in sorted(held):
        digest.update(name.encode() + b"\0" + held[name].encode() + b"\0")
    return digest.hexdigest()[:16]


def cluster_eds_name(any_value: bytes) -> str | None:
    cluster = cluster_pb2.Cluster.FromString(any_value)
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    name: str = cluster.eds_cluster_config.service_name or cluster.name
    return name


def listener_names(any_value: bytes) -> dict[str, tuple[str, ...]]:
    """What a listener makes Envoy subscribe to: its HCMs' route configurations (RDS) and the HTTP filters whose
    configuration comes by discovery (ECDS: the filter's name is the resource's name).

    Every ``config_discovery`` filter counts: the simulator speaks only ADS, where a real Envoy would also
    subscribe to a filter's configuration from another config source.
    """
    routes: set[str] = set()
    filters: set[str] = set()
    listener = listener_pb2.Listener.FromString(any_value)
    chains = [
        *listener.filter_chains,
        *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else []),
    ]
    for chain in chains:
        for filt in chain.filters:
            if filt.typed_config.type_url == HCM_URL:
                hcm = http_connection_manager_pb2.HttpConnectionManager.FromString(filt.typed_config.value)
                if hcm.HasField("rds"):
                    routes.add(hcm.rds.route_config_name)
                filters.update(f.name for f in hcm.http_filters if f.HasField("config_discovery"))
    return {"rds": tuple(sorted(routes)), "ecds": tuple(sorted(filters))}


def eds_names(response: discovery_pb2.DiscoveryResponse) -> tuple[str, ...]:
    """Clusters Envoy would subscribe to over EDS: those of type EDS, by service name or cluster name."""
    key = ("eds", response.version_info)
    if key not in _NAMES_CACHE:
        names = (cluster_eds_name(any_.value) for any_ in response.resources)
        _NAMES_CACHE[key] = tuple(sorted(n for n in names if n is not None))
    return _NAMES_CACHE[key]


def listed_names(response: discovery_pb2.DiscoveryResponse, label: str) -> tuple[str, ...]:
    """Names of type ``label`` (rds, ecds) the listeners of a SotW LDS response make Envoy subscribe to."""
    key = (label, response.version_info)
    if key not in _NAMES_CACHE:
        names = {n for any_ in response.resources for n in listener_names(any_.value)[label]}
        _NAMES_CACHE[key] = tuple(sorted(names))
    return _NAMES_CACHE[key]


@dataclass
class StreamState:
    """What one simulated Envoy holds; identical for every protocol mode so the parent's checks are shared."""

    index: int
    node_id: str
    acked: dict[str, str] = field(default_factory=dict)  # label -> version held (SotW version_info / Delta digest)
    last_version: dict[str, str] = field(default_factory=dict)  # label -> version of the latest response
    ack_times: dict[tuple[str, str], float] = field(default_factory=dict)  # first ACK of (label, version)
    received: Counter[tuple[str, str]] = field(default_factory=Counter)  # responses per (label, version)
    nacked: list[tuple[str, str]] = field(default_factory=list)
    nack_next: set[str] = field(default_factory=set)
    subscribed: set[str] = field(default_factory=set)
    ready_at: float | None = None
    connected_at: float = 0.0
    error: str | None = None
    # Delta only: what is held per type (name -> version), explicit subscriptions not yet answered, the server's
    # system_version_info, and per resource version how often it arrived / which ones were NACKed.
    held: dict[str, dict[str, str]] = field(default_factory=dict)
    wanted: dict[str, frozenset[str]] = field(default_factory=dict)
    # SotW only: the resource names last subscribed per type, re-sent with the held versions on a reconnect.
    sotw_names: dict[str, tuple[str, ...]] = field(default_factory=dict)
    system_version: dict[str, str] = field(default_factory=dict)
    resources_received: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    nacked_resources: list[tuple[str, str, str]] = field(default_factory=list)
    # Serialized DiscoveryResponse bytes received per type over the proxy's life (kept across reconnects): what a
    # change costs each Envoy on the wire, gRPC and HTTP/2 framing aside.
    bytes_received: Counter[str] = field(default_factory=Counter)

    def settled(self) -> bool:
        """Startup finished, every latest response was answered and every explicit subscription is held."""
        if self.ready_at is None:
            return False
        for label in self.subscribed:
            version = self.last_version.get(label)
            if version is None:
                return False
            if self.acked.get(label) != version and (label, version) not in self.nacked:
                return False
        return all(names <= self.held.get(label, {}).keys() for label, names in self.wanted.items())

    def final(self, label: str, transitional: str = "+keep") -> str | None:
        """The version held of ``label`` if it is a final one, None during a make-before-break step.

        SotW marks the step in version_info (``+keep``). Delta clients hold the union of old and new clusters
        (and endpoints) meanwhile, so their digest differs from the ``system_version_info`` the server sent.
        Types subscribed by name from listeners (RDS, ECDS) have no such step, and a proxy may hold only some of
        the type's resources, so their digest is not compared with the server's.
        """
        acked = self.acked.get(label)
        if acked is None or acked.endswith(transitional):
            return None
        system = self.system_version.get(label) if label in MAKE_BEFORE_BREAK else None
        return None if system is not None and system != acked else acked

    def stamp(self, label: str, version: str, now: float) -> None:
        """The client now holds ``version`` of ``label`` (ACKed)."""
        self.acked[label] = version
        self.last_version[label] = version
        self.ack_times.setdefault((label, version), now)


class StreamDriver:
    """One ADS stream's protocol behaviour; subclasses implement a wire protocol (SotW or Delta)."""

    method: str = ADS_METHOD
    request_type: Any = discovery_pb2.DiscoveryRequest
    response_type: Any = discovery_pb2.DiscoveryResponse

    def __init__(self, state: StreamState, group: str) -> None:
        self.state = state
        self.group = group
        self.resumed = False  # a reconnect: the first requests told the server everything held

    def first_requests(self) -> list[Any]:
        raise NotImplementedError

    def on_response(self, response: Any, now: float) -> list[Any]:
        raise NotImplementedError


class SotwDriver(StreamDriver):
    """Envoy's SotW startup: CDS wildcard, EDS for EDS clusters, then LDS wildcard, then ECDS for the HTTP
    filters configured by discovery and RDS for the HCMs' routes.

    Envoy sends the EDS subscription before ACKing CDS (cluster warming), and asks for listeners only once
    the clusters are warm; the ECDS and RDS subscriptions a listener implies go out before its LDS ACK (the
    listener warms until they are answered); every later response is ACKed with the version and nonce it
    carried. ECDS, like RDS, is a named type: a response may carry only some of the subscribed configurations
    (docs/envoy-ecds.md §2: one absent from a later response stays in force), so only its version is tracked.
    """

    def __init__(self, state: StreamState, group: str) -> None:
        super().__init__(state, group)
        self.names: dict[str, tuple[str, ...]] = {label: () for label in ORDER} | state.sotw_names
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
        """Startup asks for CDS; a reconnect re-subscribes every type at once with the versions it holds (§1.3)."""
        held = [label for label in ORDER if label in self.state.acked]
        if not held:
            self.state.subscribed.add("cds")
            return [self._request("cds", first=True)]
        self.resumed = self.lds_requested = True
        self.state.subscribed.update(held)
        return [self._request(label, first=i == 0) for i, label in enumerate(held)]

    def _subscribe(self, label: str, names: tuple[str, ...]) -> list[Any]:
        if not names or (label in self.state.subscribed and names == self.names[label]):
            return []
        steps = [names]
        if label in ONE_REQUEST_PER_NAME:  # a request per new name, each naming the ones kept and added so far
            kept = [n for n in self.names[label] if n in names]
            added = [n for n in names if n not in kept]
            steps = [tuple(sorted([*kept, *added[: i + 1]])) for i in range(len(added))] or [names]
        self.state.subscribed.add(label)
        out = []
        for step in steps:
            self.names[label] = step
            out.append(self._request(label))
        self.state.sotw_names[label] = names
        return out

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
            for named in NAMED_BY_LISTENERS:
                out += self._subscribe(named, listed_names(response, named))
        state.stamp(label, version, now)
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


class DeltaDriver(StreamDriver):
    """Envoy 1.40's Delta ADS (reference §2): wildcard CDS/LDS, explicit EDS/ECDS/RDS, per-resource versions.

    Startup is CDS with an EMPTY subscribe list (legacy wildcard) and the node; EDS subscriptions for the EDS
    clusters go out, as separate empty-nonce requests, before the CDS ACK; LDS once the clusters are warm; ECDS
    for the HTTP filters configured by discovery and RDS for the HCMs' route names, before the LDS ACK. Names
    that go away are unsubscribed after the ACK, and dropped from what is held (as the server does). A reconnect
    re-sends every type it subscribed at once with ``initial_resource_versions`` = everything held, so a server
    with content-hash versions has nothing to send; a named type holding nothing is not re-sent (an empty
    subscribe list would be a wildcard).
    """

    method = DELTA_METHOD
    request_type = discovery_pb2.DeltaDiscoveryRequest
    response_type = discovery_pb2.DeltaDiscoveryResponse

    def __init__(self, state: StreamState, group: str) -> None:
        super().__init__(state, group)
        self.names: dict[str, frozenset[str]] = {"eds": frozenset(), "ecds": frozenset(), "rds": frozenset()}
        self.lds_requested = False

    def _request(self, label: str, **fields: Any) -> discovery_pb2.DeltaDiscoveryRequest:
        return discovery_pb2.DeltaDiscoveryRequest(type_url=URLS[label], **fields)

    def first_requests(self) -> list[Any]:
        state = self.state
        if not state.held:
            state.subscribed.add("cds")
            state.held["cds"] = {}
            request = self._request("cds")
            request.node.id, request.node.cluster = state.node_id, self.group
            return [request]
        # Reconnect: like Envoy, re-subscribe every type at once, telling the server what is held.
        self.resumed = self.lds_requested = True
        out = []
        for label in ORDER:
            if label in self.names and not state.held.get(label):
                continue
            held = state.held.setdefault(label, {})
            state.subscribed.add(label)
            if label in self.names:
                self.names[label] = frozenset(held)
                state.wanted[label] = self.names[label]
            subscribe = sorted(held) if label in self.names else []
            out.append(self._request(label, resource_names_subscribe=subscribe, initial_resource_versions=held))
            state.stamp(label, held_version(URLS[label], held), time.monotonic())
        out[0].node.id, out[0].node.cluster = state.node_id, self.group
        return out

    def on_response(self, response: Any, now: float) -> list[Any]:
        label = LABELS.get(response.type_url)
        if label is None:
            return []
        state = self.state
        held = dict(state.held.get(label, {}))
        for res in response.resources:
            held[res.name] = res.version
            state.resources_received[label, res.name, res.version] += 1
        for name in response.removed_resources:
            held.pop(name, None)
        version = held_version(response.type_url, held)
        state.received[label, version] += 1
        if label in state.nack_next:
            state.nack_next.discard(label)
            state.last_version[label] = version
            state.nacked.append((label, version))
            state.nacked_resources += [(label, r.name, r.version) for r in response.resources]
            nack = status_pb2.Status(code=13, message="fleet_sim: rejected on command")
            return [self._request(label, response_nonce=response.nonce, error_detail=nack)]
        _learn(label, response)
        state.held[label] = held
        state.system_version[label] = response.system_version_info
        state.stamp(label, version, now)
        subscribe, unsubscribe = self._follow(label, held)
        out = [*subscribe, self._request(label, response_nonce=response.nonce), *unsubscribe]
        if not self.lds_requested and (label == "eds" or (label == "cds" and not self.names["eds"])):
            self.lds_requested = True
            state.subscribed.add("lds")
            state.held["lds"] = {}
            out.append(self._request("lds"))
        if state.ready_at is None and self._startup_done():
            state.ready_at = now
        return out

    def _follow(self, label: str, held: Mapping[str, str]) -> tuple[list[Any], list[Any]]:
        """Subscription changes a CDS/LDS response implies for EDS, or ECDS and RDS: (before the ACK, after)."""
        if label == "cds":
            names = frozenset(n for k, v in held.items() if (n := _CLUSTER_CACHE.get((k, v))))
            return self._retarget("eds", names)
        if label != "lds":
            return [], []
        before: list[Any] = []
        after: list[Any] = []
        for target in NAMED_BY_LISTENERS:
            names = frozenset(n for k, v in held.items() for n in _LISTENER_CACHE.get((k, v), {}).get(target, ()))
            subscribe, unsubscribe = self._retarget(target, names)
            before += subscribe
            after += unsubscribe
        return before, after

    def _retarget(self, target: str, names: frozenset[str]) -> tuple[list[Any], list[Any]]:
        """Subscribe the names ``target`` newly needs (before the ACK), unsubscribe those gone (after it)."""
        added, gone = names - self.names[target], self.names[target] - names
        self.names[target] = names
        if not names and target not in self.state.subscribed:
            return [], []
        self.state.wanted[target] = names
        before = []
        if added or target not in self.state.subscribed:
            self.state.subscribed.add(target)
            self.state.held.setdefault(target, {})
            batches = [[n] for n in sorted(added)] if target in ONE_REQUEST_PER_NAME and added else [sorted(added)]
            before += [self._request(target, resource_names_subscribe=batch) for batch in batches]
        after = []
        if gone:
            after.append(self._request(target, resource_names_unsubscribe=sorted(gone)))
            kept = {n: v for n, v in self.state.held.get(target, {}).items() if n not in gone}
            self.state.held[target] = kept
            self.state.stamp(target, held_version(URLS[target], kept), time.monotonic())
        return before, after

    def _startup_done(self) -> bool:
        state = self.state
        held = state.held
        return (
            self.lds_requested
            and all(label in state.acked for label in state.subscribed)
            and all(names <= held.get(label, {}).keys() for label, names in state.wanted.items())
        )


def _learn(label: str, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
    """Parse each (name, version) of a cluster or listener once per worker, for the names it implies."""
    if label == "cds":
        for res in response.resources:
            if (res.name, res.version) not in _CLUSTER_CACHE:
                _CLUSTER_CACHE[res.name, res.version] = cluster_eds_name(res.resource.value)
    elif label == "lds":
        for res in response.resources:
            if (res.name, res.version) not in _LISTENER_CACHE:
                _LISTENER_CACHE[res.name, res.version] = listener_names(res.resource.value)


DRIVERS: dict[str, Callable[[StreamState, str], StreamDriver]] = {"sotw": SotwDriver, "delta": DeltaDriver}


class ChannelPool:
    """Channels of a worker: one per stream (``per_channel == 1``, like real Envoys) or one per group of streams.

    A shared channel outlives its streams' reconnects (churn closes the call, not the connection).
    """

    def __init__(self, target: str, per_channel: int) -> None:
        self.target, self.per_channel = target, per_channel
        self.shared: dict[int, grpc.aio.Channel] = {}
        self.locks: dict[int, asyncio.Lock] = {}

    @property
    def dedicated(self) -> bool:
        return self.per_channel <= 1

    async def get(self, index: int, timeout: float) -> grpc.aio.Channel:
        """A ready channel for stream ``index``; raises TimeoutError / AioRpcError when it never gets ready."""
        if self.dedicated:
            return await self._ready(timeout)
        key = index // self.per_channel
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self.shared:
                self.shared[key] = await self._ready(timeout)
            return self.shared[key]

    async def _ready(self, timeout: float) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except BaseException:
            await channel.close()
            raise
        return channel

    async def release(self, channel: grpc.aio.Channel, *, broken: bool = False) -> None:
        """Close a stream's channel unless it is shared (a broken shared channel is replaced on next get)."""
        if self.dedicated:
            await channel.close()
        elif broken:
            for key, shared in list(self.shared.items()):
                if shared is channel:
                    del self.shared[key]
                    await channel.close()

    async def close(self) -> None:
        channels, self.shared = list(self.shared.values()), {}
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)


def describe(exc: grpc.aio.AioRpcError) -> str:
    """Status plus grpc core's debug string: "Internal error from Core" alone hides the actual failure."""
    debug = (exc.debug_error_string() or "").replace("\n", " ")
    return f"{exc.code().name}: {exc.details()} [{debug[:160]}]"


class SimStream:
    """One simulated Envoy: its channel and ADS call, reconnectable with the same node id (and, Delta, holdings).

    ``slots`` bounds how many streams of the worker are starting at once (channel open until startup is done):
    see ``Worker.open_all`` for why.
    """

    def __init__(self, index: int, pool: ChannelPool, group: str, mode: str, read_timeout: float) -> None:
        self.index, self.pool, self.group, self.mode = index, pool, group, mode
        self.read_timeout = read_timeout
        self.state = StreamState(index, f"fleet-{index:05d}")
        self.channel: grpc.aio.Channel | None = None
        self.task: asyncio.Task[None] | None = None
        self.retries = 0
        self.failures: list[str] = []  # every failed call's error (a retry starts a fresh StreamState)
        self.closing = False
        self._slot: asyncio.Semaphore | None = None

    async def open(self, timeout: float = 10.0, attempts: int = 3, slots: asyncio.Semaphore | None = None) -> bool:
        if slots is not None:
            await slots.acquire()
            self._slot = slots
        self.closing = False
        for _ in range(attempts):
            try:
                channel = await self.pool.get(self.index, timeout)
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                self.failures.append(f"channel_ready: {type(exc).__name__}")
                continue
            self.channel = channel
            self.task = asyncio.create_task(self._run(channel))
            return True
        self.state.error = "channel never became ready"
        self._release()
        return False

    def _release(self) -> None:
        """Give the startup slot back (once): this stream finished starting, or gave up."""
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    async def _run(self, channel: grpc.aio.Channel) -> None:
        """Run the stream; before startup completes, retry a call that failed (as Envoy reconnects).

        Retries are counted and every failure's status is reported by the parent.
        """
        try:
            for attempt in range(STARTUP_ATTEMPTS):
                retry = await self._call(channel)
                if self.state.error:
                    self.failures.append(self.state.error)
                if not retry or attempt == STARTUP_ATTEMPTS - 1:
                    return
                self.retries += 1
                await self.pool.release(channel, broken=True)
                try:
                    channel = await self.pool.get(self.index, 10.0)
                except (TimeoutError, grpc.aio.AioRpcError):
                    continue
                self.channel = channel
        finally:
            self._release()

    def _fresh_state(self) -> StreamState:
        """A new call resumes with what the proxy holds, as Envoy does: Delta's resource versions, SotW's
        accepted version and names per type (pending NACKs carry over); a call that never started starts fresh."""
        old = self.state
        resuming = old.ready_at is not None
        held = {k: dict(v) for k, v in old.held.items()} if self.mode == "delta" and resuming else {}
        sotw = self.mode == "sotw" and resuming
        return StreamState(
            self.index,
            old.node_id,
            nack_next=set(old.nack_next),
            connected_at=time.monotonic(),
            held=held,
            acked=dict(old.acked) if sotw else {},
            last_version=dict(old.acked) if sotw else {},
            sotw_names=dict(old.sotw_names) if sotw else {},
            bytes_received=old.bytes_received,
        )

    async def _call(self, channel: grpc.aio.Channel) -> bool:
        """One ADS call; True when it failed during startup in a way worth retrying."""
        self.state = self._fresh_state()
        driver = DRIVERS[self.mode](self.state, self.group)
        parse, received = driver.response_type.FromString, self.state.bytes_received

        def deserialize(raw: bytes) -> Any:
            """Parse a response and count its size under its type (the type URL is known only once parsed)."""
            response = parse(raw)
            received[LABELS.get(response.type_url, response.type_url)] += len(raw)
            return response

        call = channel.stream_stream(
            driver.method, request_serializer=driver.request_type.SerializeToString, response_deserializer=deserialize
        )()
        try:
            for request in driver.first_requests():
                await call.write(request)
            if driver.resumed:
                self.state.ready_at = time.monotonic()  # nothing to wait for unless the config changed meanwhile
                self._release()
            while True:
                if self.state.ready_at is None:
                    # Watchdog: a call grpc core silently never started (seen at 2,500 channels per process;
                    # the server never saw it) would otherwise hang the storm forever.
                    response = await asyncio.wait_for(call.read(), self.read_timeout)
                else:
                    response = await call.read()
                if response is grpc.aio.EOF:
                    self.state.error = "server closed the stream"
                    return False
                for request in driver.on_response(response, time.monotonic()):
                    await call.write(request)
                if self.state.ready_at is not None:
                    self._release()
        except TimeoutError:
            call.cancel()
            self.state.error = f"no response within {self.read_timeout:.0f} s during startup"
            return True
        except grpc.aio.AioRpcError as exc:
            if self.closing:
                return False
            self.state.error = describe(exc)
            return self.state.ready_at is None and exc.code() in RETRYABLE

    async def close(self) -> None:
        self.closing = True
        task, channel, self.task, self.channel = self.task, self.channel, None, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if channel is not None:
            await self.pool.release(channel)


async def poll(check: Callable[[], bool], timeout: float) -> bool:
    """Re-check ``check`` every POLL seconds until it holds or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(POLL)
    return True


@dataclass
class WorkerConfig:
    """How a worker builds its streams (picklable: it crosses the spawn boundary)."""

    target: str
    group: str
    mode: str
    indices: list[int]
    per_channel: int = 1
    wave: int = WAVE
    read_timeout: float = 20.0
    inflight: int = 0


class Worker:
    """Serves the parent's commands for the streams this process owns."""

    def __init__(self, conn: Connection, config: WorkerConfig) -> None:
        self.conn = conn
        self.config = config
        self.pool = ChannelPool(config.target, config.per_channel)
        self.streams = {
            i: SimStream(i, self.pool, config.group, config.mode, config.read_timeout) for i in config.indices
        }

    async def open_all(self, streams: Iterable[SimStream], timeout: float) -> list[int]:
        """Open streams with at most ``inflight`` of them starting at once (0: waves of ``wave`` channels).

        Without a bound, every call reaches the server within seconds, faster than its event loop accepts and
        serves them; the server lets them wait in grpc core (controlplane/xds/server.py: with grpc's default
        limits ~5% of 5,000 and ~11% of 10,000 were CANCELLED before its handler ran). Real fleets connect over
        time and retry with backoff; the bound plays that role and the parent reports it.
        """
        batch = list(streams)
        if self.config.inflight > 0:
            slots = asyncio.Semaphore(self.config.inflight)
            results = await asyncio.gather(*(s.open(timeout, slots=slots) for s in batch))
            return [s.index for s, ok in zip(batch, results, strict=True) if not ok]
        failed: list[int] = []
        for start in range(0, len(batch), self.config.wave):
            wave = batch[start : start + self.config.wave]
            results = await asyncio.gather(*(s.open(timeout) for s in wave))
            failed += [s.index for s, ok in zip(wave, results, strict=True) if not ok]
        return failed

    def _live(self) -> list[SimStream]:
        return [s for s in self.streams.values() if s.task is not None]

    async def cmd_connect(self, timeout: float) -> dict[str, Any]:
        started = time.monotonic()
        failed = await self.open_all(self.streams.values(), timeout)
        ok = await poll(lambda: all(s.state.settled() for s in self._live()), timeout)
        # The streams' long-lived state leaves the cyclic collector's view and automatic full collections stop
        # (as the server does, controlplane/runtime/gc_control.py): this load generator shares the server's cores, and
        # full collections over thousands of streams' pending reads would be charged to every push.
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 1 << 30)
        return {
            "started": started,
            "ready": {s.index: s.state.ready_at for s in self.streams.values()},
            "failed": failed,
            "retries": sum(s.retries for s in self.streams.values()),
            "converged": ok,
            "errors": [e for s in self.streams.values() for e in s.failures],
            "stuck": [self._stuck(s) for s in self.streams.values() if s.state.ready_at is None][:5],
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        }

    @staticmethod
    def _stuck(s: SimStream) -> str:
        """Where a stream that never got ready is: types received, age of its current call, past failures."""
        got = sorted({label for label, _ in s.state.received})
        age = time.monotonic() - s.state.connected_at
        return f"#{s.index} received={got} call_age={age:.0f}s retries={s.retries} task_done={s.task and s.task.done()}"

    async def cmd_versions(self, index: int) -> dict[str, str]:
        return dict(self.streams[index].state.acked)

    async def cmd_await_change(
        self,
        baseline: dict[str, str],
        labels: list[str],
        timeout: float,
        exclude: list[int],
        transitional: str = "+keep",
        sample: int = 0,
    ) -> dict[str, Any]:
        """Wait until every stream settled on one common version (≠ baseline) for each label; return ACK times.

        A make-before-break step (``StreamState.final``: SotW's ``transitional`` suffix, Delta's union of old and
        new clusters) is not the target; the final CDS that follows the route update is. The SotW step's ACK time
        is reported as ``<label><transitional>``. ``sample`` > 0 waits for that many streams only.
        """
        streams = [s for s in self._live() if s.index not in exclude]
        if sample:
            streams = streams[:sample]

        def holds_new(s: SimStream, versions: dict[str, str]) -> bool:
            if not s.state.settled():
                return False
            for label in labels:
                acked = s.state.final(label, transitional)
                if acked is None or acked == baseline.get(label) or versions.setdefault(label, acked) != acked:
                    return False
            return True

        def target() -> dict[str, str] | None:
            versions: dict[str, str] = {}
            return versions if all(holds_new(s, versions) for s in streams) else None

        # Polls resume at the first stream that did not hold the new config yet, so waiting costs O(N) per
        # change instead of O(N) per poll (this process shares the server's cores); a full check confirms.
        progress: dict[str, Any] = {"next": 0, "versions": {}}

        def resumed() -> bool:
            while progress["next"] < len(streams) and holds_new(streams[progress["next"]], progress["versions"]):
                progress["next"] += 1
            return progress["next"] == len(streams) and target() is not None

        ok = await poll(resumed, timeout)
        versions = target() or {}
        if sample:
            return {"converged": ok, "versions": versions, "ack_times": {}}
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
        return {
            "acked": dict(state.acked),
            "received": dict(state.received),
            "nacked": list(state.nacked),
            "resources_received": dict(state.resources_received),
            "nacked_resources": list(state.nacked_resources),
            "bytes_received": dict(state.bytes_received),
        }

    async def cmd_bytes_received(self) -> dict[int, dict[str, int]]:
        """Per stream, response bytes received so far by type (the parent subtracts two readings)."""
        return {i: dict(s.state.bytes_received) for i, s in self.streams.items()}

    async def cmd_consistency(self) -> dict[str, Any]:
        """Delta: per type, how many streams' held digest equals the server's last system_version_info."""
        counts: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for s in self._live():
            for label, system in s.state.system_version.items():
                total[label] += 1
                counts[label] += s.state.acked.get(label) == system
        return {"equal": dict(counts), "total": dict(total)}

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
            failed += await self.open_all(chosen, timeout)
            reopened += chosen
        ok = await poll(lambda: all(s.state.settled() for s in self._live()), timeout)
        times = [s.state.ready_at - s.state.connected_at for s in reopened if s.state.ready_at is not None]
        unique = {s.index: s for s in reopened}.values()
        return {
            "reconnects": len(reopened),
            "failed": failed,
            "converged": ok,
            "reconverge_s": times,
            "live": len(self._live()),
            "responses_after_reconnect": sum(sum(s.state.received.values()) for s in unique),
            "reconnected_streams": len(unique),
        }

    async def cmd_close(self) -> bool:
        await asyncio.gather(*(s.close() for s in self.streams.values()))
        await self.pool.close()
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


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of a worker process (spawned by fleet_sim.py)."""
    raise_nofile()
    asyncio.run(Worker(conn, config).serve())
