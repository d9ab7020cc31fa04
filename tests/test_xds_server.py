"""The grpc.aio adapter over a real loopback channel, with a small client that speaks ADS like Envoy 1.40.

Also the two small pieces it is wired to: SnapshotCache (change listeners) and ProxyRegistry (status, NACK
memory). Nothing here sleeps to synchronise: waits poll with a deadline, and "nothing was sent" is proven
with a barrier request whose answer must be the next message on the stream (one stream is ordered).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, Snapshot
from controlplane.telemetry import metrics
from controlplane.telemetry.logformat import LOG_FORMAT, LineFormatter
from controlplane.xds import protocol
from controlplane.xds.fleet_status import ERROR_LIMIT_BYTES, ProxyRegistry, truncate_error
from controlplane.xds.nack_memory import NackMemory
from controlplane.xds.protocol import (
    MAX_NODE_CLUSTER_BYTES,
    MAX_NODE_ID_BYTES,
    MAX_NODE_METADATA_BYTES,
    MAX_SUBSCRIBED_NAMES,
)
from controlplane.xds.server import (
    CONNECTION_LINES_PER_MINUTE,
    FAN_OUT_CHUNK,
    MAX_RECEIVE_MESSAGE_BYTES,
    MAX_STREAMS_PER_CONNECTION,
    SERVER_OPTIONS,
    UNKNOWN_GROUP,
    WARNINGS_PER_MINUTE,
    XdsServer,
    _Session,
    peer_address,
)
from tests.support.ads import FakeEnvoy, delta_method, first_delta_request, names_of, within
from tests.support.ports import eventually

LOOPBACK = "127.0.0.1"

# -------------------------------------------------------------------------------------------- helpers


def snap(
    group: str, tag: str = "v1", *, clusters: Iterable[str] = ("backend",), route_tag: str | None = None
) -> Snapshot:
    names = list(clusters)
    return Snapshot.build(
        group,
        {
            CLUSTER: [(n, cluster_pb2.Cluster(name=n, alt_stat_name=tag)) for n in names],
            ENDPOINT: [(n, endpoint_pb2.ClusterLoadAssignment(cluster_name=n)) for n in names],
            LISTENER: [("listener_0", listener_pb2.Listener(name="listener_0", stat_prefix=tag))],
            ROUTE: [
                (
                    "local_route",
                    route_pb2.RouteConfiguration(name="local_route", internal_only_headers=[route_tag or tag]),
                )
            ],
        },
    )


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Plane:
    server: XdsServer
    cache: SnapshotCache
    registry: ProxyRegistry
    channel: grpc.aio.Channel
    port: int

    def envoy(self, node_id: str, group: str) -> FakeEnvoy:
        return FakeEnvoy(self.channel, node_id, group)

    def proxies(self, node_id: str) -> list[dict[str, Any]]:
        return [p for p in self.registry.status() if p["node"] == node_id]


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    cache = SnapshotCache()
    registry = ProxyRegistry()
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"))
    port = await server.start(LOOPBACK, 0)
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    try:
        yield Plane(server, cache, registry, channel, port)
    finally:
        await channel.close()
        await server.stop(1.0)


# ------------------------------------------------------------------------------------------ the server


async def test_start_binds_an_ephemeral_port_and_serves_envoys_startup(plane: Plane) -> None:
    group = "startup"
    plane.cache.set(snap(group))
    pushes = {t: sample("controlplane_xds_pushes_total", type=t) for t in ("cds", "eds", "lds", "rds")}
    pushed_bytes = sample("controlplane_xds_pushed_bytes_total", type="lds")
    pushed_resources = sample("controlplane_xds_pushed_resources_total", type="lds")
    acks = sample("controlplane_xds_push_ack_latency_seconds_count", type="rds")
    assert plane.port > 0

    envoy = plane.envoy("node-startup", group)
    got = await envoy.startup()
    assert [names_of(got[t]) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)] == [
        ["backend"],
        ["backend"],
        ["listener_0"],
        ["local_route"],
    ]
    nonces = [int(got[t].nonce) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)]
    assert nonces == sorted(set(nonces))
    assert got[CLUSTER].version_info == plane.cache.get(group).version(CLUSTER)

    expected_acked = {label: plane.cache.get(group).version(t) for t, label in _LABELS.items()}
    (proxy,) = await eventually(
        lambda: [p for p in plane.proxies("node-startup") if p["acked"] == expected_acked], "ACKs"
    )
    assert proxy["group"] == group and proxy["protocol"] == "sotw" and proxy["last_nack"] is None
    assert str(proxy["peer"]).startswith(f"{LOOPBACK}:")
    assert isinstance(proxy["connected_since"], float) and abs(proxy["connected_since"] - time.time()) < 60
    assert plane.registry.summary() == {"by_group": {group: 1}}
    assert sample("controlplane_xds_connected_proxies", group=group) == 1
    assert all(sample("controlplane_xds_pushes_total", type=t) == pushes[t] + 1 for t in pushes)
    lds_bytes = len(got[LISTENER].SerializeToString())  # the response as received: the bytes the metric counts
    assert sample("controlplane_xds_pushed_bytes_total", type="lds") == pushed_bytes + lds_bytes
    assert sample("controlplane_xds_pushed_resources_total", type="lds") == pushed_resources + 1
    await eventually(lambda: sample("controlplane_xds_push_ack_latency_seconds_count", type="rds") == acks + 1, "hist")
    envoy.call.cancel()


_LABELS = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}


async def test_idle_for_counts_from_the_last_push_or_request(plane: Plane) -> None:
    """What the scheduled garbage collection waits on (gc_control.py): no collection during a push."""
    assert plane.server.idle_for() == float("inf")
    plane.cache.set(snap("idle"))
    assert plane.server.idle_for() < 1.0  # a push started (no stream yet: the fan-out is at most queued)
    envoy = plane.envoy("node-idle", "idle")
    await envoy.startup()
    after_startup = plane.server.idle_for()
    assert 0.0 <= after_startup < 5.0
    await eventually(lambda: plane.server.idle_for() > after_startup, "time passes without pushes")
    envoy.call.cancel()


async def test_snapshot_change_reaches_only_streams_of_that_group(plane: Plane) -> None:
    plane.cache.set(snap("fan-a"))
    plane.cache.set(snap("fan-b"))
    a1, a2, b = plane.envoy("a1", "fan-a"), plane.envoy("a2", "fan-a"), plane.envoy("b1", "fan-b")
    for envoy in (a1, a2, b):
        await envoy.startup()

    plane.cache.set(snap("fan-a", route_tag="v2"))
    for envoy in (a1, a2):
        rds = await envoy.recv()
        assert rds.type_url == ROUTE and rds.version_info == plane.cache.get("fan-a").version(ROUTE)
        await envoy.ack(rds, ["local_route"])
    await b.barrier(["backend", "other"])  # b got nothing from fan-a's change

    # Push order within one change: CDS, EDS, then (once both are ACKed: warm) LDS, RDS; only what changed.
    plane.cache.set(snap("fan-a", "v3", clusters=("backend", "extra")))
    cds, eds = await a1.recv(), await a1.recv()
    assert (cds.type_url, eds.type_url) == (CLUSTER, ENDPOINT)
    await a1.ack(cds)
    await a1.ack(eds, ["backend"])
    order = [(await a1.recv()).type_url for _ in range(2)]
    assert order == [LISTENER, ROUTE]
    for envoy in (a1, a2, b):
        envoy.call.cancel()


async def test_stale_request_is_ignored_and_the_ack_restates_names(plane: Plane) -> None:
    group = "stale"
    plane.cache.set(snap(group))
    envoy = plane.envoy("stale-1", group)
    got = await envoy.startup()
    plane.cache.set(snap(group, clusters=("backend", "backend2")))
    cds, eds = await envoy.recv(), await envoy.recv()
    assert (cds.type_url, names_of(eds)) == (CLUSTER, [])  # EDS goes as changes: "backend" did not change
    # Envoy's subscription change crosses our EDS push: it carries the previous EDS nonce.
    old = got[ENDPOINT]
    await envoy.send(ENDPOINT, ["backend", "backend2"], version=old.version_info, nonce=old.nonce)
    await envoy.ack(eds, ["backend", "backend2"])
    again = await envoy.recv()
    assert again.version_info == eds.version_info and int(again.nonce) > int(eds.nonce)
    assert sorted(names_of(again)) == ["backend2"]  # the one it lacks
    envoy.call.cancel()


async def test_nack_is_logged_recorded_and_never_resent_even_after_reconnect(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="controlplane.xds")
    group = "nack"
    plane.cache.set(snap(group))
    envoy = plane.envoy("nacker", group)
    got = await envoy.startup()
    nacks = sample("controlplane_xds_nacks_total", type="lds")
    rejecting = sample("controlplane_xds_proxies_rejecting", type="lds")

    plane.cache.set(snap(group, "bad-listener", route_tag="v1", clusters=("backend",)))
    cds = await envoy.recv()  # alt_stat_name changed; the listener follows its ACK (warming)
    await envoy.ack(cds)
    lds = await envoy.recv()
    assert (cds.type_url, lds.type_url) == (CLUSTER, LISTENER)
    huge = "Error adding/updating listener(s) listener_0: " + "x" * 20_000
    await envoy.send(LISTENER, version=got[LISTENER].version_info, nonce=lds.nonce, error=huge)

    (proxy,) = await eventually(lambda: [p for p in plane.proxies("nacker") if p["last_nack"]], "NACK in status")
    nack = proxy["last_nack"]
    assert isinstance(nack, dict)
    assert (nack["type"], nack["version"]) == ("lds", lds.version_info)
    assert len(nack["error"].encode()) <= ERROR_LIMIT_BYTES and nack["error"].startswith("Error adding")
    assert sample("controlplane_xds_nacks_total", type="lds") == nacks + 1
    assert sample("controlplane_xds_proxies_rejecting", type="lds") == rejecting + 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "NACK" in r.getMessage()]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "nacker" in line and "lds" in line and lds.version_info in line and len(line) < ERROR_LIMIT_BYTES + 300

    # The same version is not sent again on this stream...
    await envoy.barrier(["backend", "b2"])
    envoy.call.cancel()
    await eventually(lambda: not plane.proxies("nacker"), "disconnect")
    assert sample("controlplane_xds_proxies_rejecting", type="lds") == rejecting

    # ...nor on a new one: Envoy reconnects holding the old listener version.
    again = plane.envoy("nacker", group)
    await again.send(CLUSTER, version=plane.cache.get(group).version(CLUSTER))
    await again.send(LISTENER, version=got[LISTENER].version_info)
    await again.barrier(["backend"])

    # A fixed listener is a new version and is pushed; its ACK clears the NACK state.
    plane.cache.set(snap(group, "fixed", route_tag="v1"))
    await again.ack(await again.recv())  # CDS first
    fixed = await again.recv()
    assert fixed.type_url == LISTENER
    await again.ack(fixed)
    await eventually(
        lambda: [p for p in plane.proxies("nacker") if p["acked"].get("lds") == fixed.version_info], "fixed ACKed"
    )
    again.call.cancel()


async def test_a_restarted_envoy_is_sent_what_its_previous_process_rejected(plane: Plane) -> None:
    """The NACK memory outlives streams so that a reconnecting Envoy is not sent again what it refused. A new
    Envoy process (its first request holds no version: nothing accepted yet) may refuse nothing of it: the remedy
    docs/envoy-ecds.md gives for a refused deny-list bucket is to re-bootstrap the Envoy, and a re-bootstrapped
    Envoy that was withheld its filter configurations warmed until their fetch timeout, then answered every request
    500 (jwt_authn) or 403 (the buckets' deny-all default) until the next revocation changed the version."""
    group = "nack-restart"
    plane.cache.set(snap(group))
    envoy = plane.envoy("restarted", group)
    got = await envoy.startup()
    plane.cache.set(snap(group, "refused-listener", route_tag="v1", clusters=("backend",)))
    await envoy.ack(await envoy.recv())  # CDS
    lds = await envoy.recv()
    assert lds.type_url == LISTENER
    await envoy.send(LISTENER, version=got[LISTENER].version_info, nonce=lds.nonce, error="refused: old bootstrap")
    await eventually(lambda: [p for p in plane.proxies("restarted") if p["last_nack"]], "NACK in status")
    envoy.call.cancel()
    await eventually(lambda: not plane.proxies("restarted"), "disconnect")

    # A reconnect of the same process (it holds versions) is still not sent the refused listener...
    again = plane.envoy("restarted", group)
    await again.send(CLUSTER, version=plane.cache.get(group).version(CLUSTER))
    await again.send(LISTENER, version=got[LISTENER].version_info)
    await again.barrier(["backend"])
    again.call.cancel()
    await eventually(lambda: not plane.proxies("restarted"), "disconnect")

    # ...but a new process is: its startup gets the current listener.
    fresh = plane.envoy("restarted", group)
    started = await fresh.startup()
    assert started[LISTENER].version_info == lds.version_info
    fresh.call.cancel()


async def test_reconnect_holding_current_versions_gets_nothing(plane: Plane) -> None:
    group = "resume"
    s = snap(group)
    plane.cache.set(s)
    pushes = sample("controlplane_xds_pushes_total", type="cds")
    envoy = plane.envoy("resumer", group)
    await envoy.send(CLUSTER, version=s.version(CLUSTER))
    await envoy.send(LISTENER, version=s.version(LISTENER))
    await envoy.send(ROUTE, ["local_route"], version=s.version(ROUTE))
    await envoy.send(ENDPOINT, ["backend"], version=s.version(ENDPOINT))
    await envoy.barrier(["backend", "x"])
    assert sample("controlplane_xds_pushes_total", type="cds") == pushes
    (proxy,) = plane.proxies("resumer")
    assert proxy["acked"] == {
        "cds": s.version(CLUSTER),
        "eds": s.version(ENDPOINT),
        "lds": s.version(LISTENER),
        "rds": s.version(ROUTE),
    }
    envoy.call.cancel()


async def test_unknown_group_gets_a_warning_and_only_the_empty_snapshot(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.xds")
    plane.cache.set(snap("known-group"))
    envoy = plane.envoy("lost-1", "no-such-group")
    await envoy.send(CLUSTER)
    cds = await envoy.recv()
    assert names_of(cds) == [] and cds.version_info == Snapshot.empty("no-such-group").version(CLUSTER)
    await envoy.ack(cds)
    await envoy.send(LISTENER)
    assert names_of(await envoy.recv()) == []
    assert any(
        r.levelno == logging.WARNING and "lost-1" in r.getMessage() and "no-such-group" in r.getMessage()
        for r in caplog.records
    )
    # Once the group exists, its streams get it.
    plane.cache.set(snap("no-such-group"))
    assert names_of(await envoy.recv()) == ["backend"]
    envoy.call.cancel()


async def test_disconnect_updates_registry_metrics_and_log(plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.xds")
    group = "bye"
    plane.cache.set(snap(group))
    envoy = plane.envoy("leaver", group)
    await envoy.startup()
    assert sample("controlplane_xds_connected_proxies", group=group) == 1
    envoy.call.cancel()
    await eventually(lambda: not plane.proxies("leaver"), "registry forgets the stream")
    assert sample("controlplane_xds_connected_proxies", group=group) == 0
    assert any("leaver" in r.getMessage() and "disconnected" in r.getMessage() for r in caplog.records)


async def test_client_half_close_ends_the_stream(plane: Plane) -> None:
    plane.cache.set(snap("half"))
    envoy = plane.envoy("half-1", "half")
    await envoy.startup()
    await envoy.call.done_writing()
    assert await within(envoy.call.code()) == grpc.StatusCode.OK
    await eventually(lambda: not plane.proxies("half-1"), "forgotten")


async def test_delta_stream_is_served_and_registered_as_delta(plane: Plane) -> None:
    plane.cache.set(snap("delta"))
    call = delta_method(plane.channel)()
    request = first_delta_request(CLUSTER, "delta-1", "delta")
    await call.write(request)
    response = await within(call.read())
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    assert [r.name for r in response.resources] == ["backend"]
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=response.nonce))
    await eventually(lambda: [p["protocol"] for p in plane.proxies("delta-1")] == ["delta"], "delta in status")
    call.cancel()


async def test_stop_ends_streams_without_tracebacks(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    cache, registry = SnapshotCache(), ProxyRegistry()
    cache.set(snap("stop"))
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"))
    port = await server.start(LOOPBACK, 0)
    async with grpc.aio.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        envoys = [FakeEnvoy(channel, f"stop-{i}", "stop") for i in range(3)]
        for envoy in envoys:
            await envoy.startup()
        await within(server.stop(5.0))
        for envoy in envoys:
            assert await within(envoy.call.code()) == grpc.StatusCode.UNAVAILABLE
    assert registry.status() == []
    assert sample("controlplane_xds_connected_proxies", group="stop") == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "CancelledError" not in text and "Traceback" not in text
    # Snapshots set after stop reach nobody (the listener is gone).
    cache.set(snap("stop", "after"))


async def test_start_reports_an_unbindable_address() -> None:
    server = XdsServer(SnapshotCache(), ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    with pytest.raises(OSError):
        await server.start("203.0.113.1", 0)  # TEST-NET-3: not an address of this host
    await server.stop(0)


def test_peer_address() -> None:
    assert peer_address("ipv4:10.0.0.1:4242") == "10.0.0.1:4242"
    assert peer_address("ipv6:[::1]:4242") == "[::1]:4242"
    assert peer_address("unix:/tmp/x") == "unix:/tmp/x"


# ------------------------------------------------------------------------------------------- the cache


def test_cache_get_unknown_group_is_the_empty_snapshot() -> None:
    cache = SnapshotCache()
    assert cache.get("x").version(CLUSTER) == Snapshot.empty("x").version(CLUSTER)
    assert not cache.known("x") and cache.groups() == []


def test_cache_notifies_on_change_only_and_unsubscribes() -> None:
    cache = SnapshotCache()
    seen: list[str] = []
    unsubscribe = cache.subscribe(lambda s: seen.append(s.summary_version))
    assert cache.set(snap("b"))
    assert not cache.set(snap("b"))  # same versions, new object: nobody is told
    assert cache.set(snap("b", "v2"))
    assert cache.set(snap("a"))
    assert len(seen) == 3 and cache.groups() == ["a", "b"] and cache.known("a")
    assert cache.get("b").version(CLUSTER) == snap("b", "v2").version(CLUSTER)
    unsubscribe()
    unsubscribe()  # idempotent
    cache.set(snap("a", "v2"))
    assert len(seen) == 3


def test_cache_listener_failure_does_not_stop_others(caplog: pytest.LogCaptureFixture) -> None:
    cache = SnapshotCache()
    seen: list[str] = []

    def broken(snapshot: Snapshot) -> None:
        raise RuntimeError("boom")

    cache.subscribe(broken)
    cache.subscribe(lambda s: seen.append(s.group))
    assert cache.set(snap("g"))
    assert seen == ["g"] and "boom" in caplog.text


# ---------------------------------------------------------------------------------------- the registry


def test_truncate_error_bounds_bytes() -> None:
    assert truncate_error("short") == "short"
    long = "é" * 5000
    cut = truncate_error(long)
    assert len(cut.encode()) <= ERROR_LIMIT_BYTES and cut.endswith("[truncated]")


def test_a_refused_filter_config_keeps_the_nack_through_acks_and_a_late_one_withholds_no_version() -> None:
    """Envoy ACKs later responses without the filter configuration it refused (docs/envoy-ecds.md §8): such an ACK
    (`refusing`) leaves the NACK in the status and the rejecting gauge; a late SotW NACK names a version the
    later responses share, so it is not remembered as a version never to send again."""
    registry = ProxyRegistry()
    record = registry.connect("n1", "g1", "10.0.0.1:1", 100.0)
    assert registry.nacked(record, EXTENSION_CONFIG, "e1", "RE2 program size", 200.0, remember=False)
    assert not registry.rejections.is_rejected("n1", EXTENSION_CONFIG, "e1")
    assert not registry.acked(record, EXTENSION_CONFIG, "e1", refusing=True)  # still rejecting: no end
    (status,) = registry.status()
    assert status["acked"] == {"ecds": "e1"} and status["last_nack"]["version"] == "e1"
    assert registry.acked(record, EXTENSION_CONFIG, "e2")  # the refused one sent anew and applied: the NACK ends
    assert registry.status()[0]["last_nack"] is None


def test_registry_status_sorted_json_ready_and_nack_lifecycle() -> None:
    registry = ProxyRegistry()
    b = registry.connect("n2", "g2", "10.0.0.2:1", 100.0)
    a2 = registry.connect("n2", "g1", "10.0.0.1:2", 101.0)
    a1 = registry.connect("n1", "g1", "10.0.0.1:1", 102.0)
    assert [(p["group"], p["node"]) for p in registry.status()] == [("g1", "n1"), ("g1", "n2"), ("g2", "n2")]
    assert registry.summary() == {"by_group": {"g1": 2, "g2": 1}}

    assert not registry.acked(a1, CLUSTER, "c1")
    assert registry.nacked(a1, LISTENER, "l2", "bad listener", 200.0)
    assert not registry.nacked(a1, LISTENER, "l3", "still bad", 201.0)  # already rejecting LDS
    (status,) = [p for p in registry.status() if p["node"] == "n1"]
    assert status["acked"] == {"cds": "c1"}
    assert status["last_nack"] == {"type": "lds", "version": "l3", "error": "still bad", "at": 201.0}
    assert registry.acked(a1, LISTENER, "l4")  # an ACK of the type ends the NACK
    assert next(p for p in registry.status() if p["node"] == "n1")["last_nack"] is None

    assert registry.nacked(a2, ROUTE, "r9", "x", 300.0)
    assert registry.disconnect(a2) == [ROUTE]
    assert registry.disconnect(b) == []
    # The memory outlives the streams.
    assert registry.rejections.is_rejected("n2", ROUTE, "r9") and registry.rejections.is_rejected("n1", LISTENER, "l2")
    assert not registry.rejections.is_rejected("n2", LISTENER, "r9") and not registry.rejections.is_rejected(
        "n3", ROUTE, "r9"
    )


def test_registry_nack_memory_is_bounded_to_recent_nodes() -> None:
    memory = NackMemory(memory_nodes=3)
    for node in ("a", "b", "c"):
        memory.remember_rejected(node, CLUSTER, "v")
    memory.remember_rejected("a", CLUSTER, "w")  # a is now the most recent
    memory.remember_rejected("d", CLUSTER, "v")  # evicts b, the least recent
    assert [memory.is_rejected(n, CLUSTER, "v") for n in "abcd"] == [True, False, True, True]
    assert memory.is_rejected("a", CLUSTER, "w")
    assert [memory.has_rejections(n, CLUSTER) for n in "abcd"] == [True, False, True, True]
    assert not memory.has_rejections("a", ROUTE)


# ------------------------------------------------------------------------------ fan-out pacing, coalescing


class _CountingMachine:
    """Stands in for a stream's state machine: records which snapshots it was given, and when."""

    def __init__(self, journal: list[str], group: str, on_given: Callable[[], None] = lambda: None) -> None:
        self.node = None
        self.node_id = "n"
        self.group = group
        self.journal = journal
        self.on_given = on_given
        self.given: list[str] = []

    def set_snapshot(self, snapshot: Snapshot, now: float) -> protocol.Output:
        version = snapshot.types[CLUSTER].version
        if not self.given or self.given[-1] != version:  # as the real machines: the same snapshot is a no-op
            self.given.append(version)
            self.journal.append("stream")
            self.on_given()
        return protocol.Output()


def _fleet_of(
    server: XdsServer, count: int, journal: list[str], on_given: Callable[[], None] = lambda: None
) -> list[_CountingMachine]:
    machines = [_CountingMachine(journal, "g", on_given) for _ in range(count)]
    for machine in machines:
        server._by_group["g"].add(_Session(machine, "peer", "sotw"))  # type: ignore[arg-type]
    return machines


async def test_a_fan_out_to_thousands_of_streams_lets_the_event_loop_run_between_chunks() -> None:
    cache = SnapshotCache()
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    await server.start(LOOPBACK, 0)
    try:
        journal: list[str] = []
        _fleet_of(server, 3 * FAN_OUT_CHUNK, journal)

        async def health_check() -> None:
            journal.append("health check answered")

        cache.set(snap("g", "v2"))
        probe = asyncio.create_task(health_check())
        await eventually(lambda: journal.count("stream") == 3 * FAN_OUT_CHUNK, "every stream served")
        await probe
        answered = journal.index("health check answered")
        assert FAN_OUT_CHUNK <= answered < 3 * FAN_OUT_CHUNK  # after the first chunk, long before the last
    finally:
        await server.stop(0)


async def test_changes_during_a_fan_out_are_coalesced_into_the_newest_snapshot() -> None:
    cache = SnapshotCache()
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    await server.start(LOOPBACK, 0)
    try:
        snapshots = [snap("g", f"v{i}") for i in range(10)]
        burst = iter([snapshots[1:]])

        def nine_more_changes_once() -> None:  # while the first stream is being served
            for later in next(burst, ()):
                cache.set(later)

        machines = _fleet_of(server, 4 * FAN_OUT_CHUNK, [], nine_more_changes_once)
        cache.set(snapshots[0])
        newest = snapshots[-1].types[CLUSTER].version
        await eventually(lambda: all(m.given and m.given[-1] == newest for m in machines), "all on the newest")
        calls = sum(len(m.given) for m in machines)
        assert calls <= len(machines) + FAN_OUT_CHUNK  # one pass, plus a second for the first chunk only
        middle = {s.types[CLUSTER].version for s in snapshots[1:-1]}
        assert not any(v in middle for m in machines for v in m.given)  # nobody got an intermediate state
    finally:
        await server.stop(0)


# ------------------------------------------------------------------------------------- hostile clients


async def _refused(envoy: FakeEnvoy) -> grpc.aio.AioRpcError:
    """The stream must end with an error status instead of a response."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await envoy.recv()
    return error.value


@pytest.mark.parametrize(
    ("field", "size"),
    [("id", MAX_NODE_ID_BYTES + 1), ("cluster", MAX_NODE_CLUSTER_BYTES + 1), ("metadata", MAX_NODE_METADATA_BYTES + 1)],
)
async def test_an_oversized_node_is_refused_and_leaves_nothing_behind(
    plane: Plane, caplog: pytest.LogCaptureFixture, field: str, size: int
) -> None:
    """1 MB node ids were held after the streams left and logged whole (a 130 MB log for 40 nodes)."""
    caplog.set_level(logging.DEBUG, logger="controlplane.xds")
    plane.cache.set(snap("big"))
    huge = "n" * max(size, 1 << 20) if field != "metadata" else ""
    envoy = plane.envoy(huge if field == "id" else "big-node", huge if field == "cluster" else "big")
    request = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    request.node.id, request.node.cluster = envoy.node_id, envoy.group
    if field == "metadata":
        request.node.metadata.fields["blob"].string_value = "m" * size
    envoy.sent_node = True
    await within(envoy.call.write(request))
    error = await _refused(envoy)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"node.{field}" in (error.details() or "") and len(error.details() or "") < 300
    assert plane.registry.status() == [] and plane.registry.summary() == {"by_group": {}}
    assert len(caplog.text) < 2_000
    assert not [s for m in metrics.REGISTRY.collect() for s in m.samples if len(str(s.labels)) > 300]


async def test_a_delta_stream_subscribing_past_the_bound_is_refused_and_forgotten(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    """Names from later Delta requests added up without limit: 1.8M names on one stream took RSS to 1.7 GB."""
    caplog.set_level(logging.INFO, logger="controlplane.xds")  # DEBUG lists (clipped) subscriptions by design
    plane.cache.set(snap("subs"))
    call = delta_method(plane.channel)()
    request = first_delta_request(CLUSTER, "subs-1", "subs")
    await within(call.write(request))
    await within(call.read())
    await eventually(lambda: bool(plane.proxies("subs-1")), "registered")
    step = MAX_SUBSCRIBED_NAMES // 2
    for i in range(3):
        names = [f"secret-name-{i}-{n}" for n in range(step)]
        try:
            await within(
                call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names))
            )
        except grpc.aio.AioRpcError:
            break  # refused already
    with pytest.raises(grpc.aio.AioRpcError) as error:
        for _ in range(10):
            assert await within(call.read()) is not grpc.aio.EOF
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert str(MAX_SUBSCRIBED_NAMES) in details and "secret-name" not in details and len(details) < 300
    await eventually(lambda: not plane.proxies("subs-1"), "forgotten")
    assert "secret-name" not in caplog.text and len(caplog.text) < 2_000


async def test_connected_proxies_are_labelled_only_by_groups_the_policy_knows(plane: Plane) -> None:
    """301 series appeared for made-up groups; they now share one `unknown` label."""
    plane.cache.set(snap("real"))
    unknown = sample("controlplane_xds_connected_proxies", group=UNKNOWN_GROUP)
    made_up = [plane.envoy(f"m-{i}", f"made-up-{i}") for i in range(5)]
    real = plane.envoy("r-1", "real")
    for envoy in (*made_up, real):
        await envoy.send(CLUSTER)
        await envoy.recv()
    assert sample("controlplane_xds_connected_proxies", group=UNKNOWN_GROUP) == unknown + 5
    assert sample("controlplane_xds_connected_proxies", group="real") == 1
    labels = {s.labels.get("group") for m in metrics.REGISTRY.collect() for s in m.samples}
    assert not any(str(label).startswith("made-up") for label in labels)
    for envoy in (*made_up, real):
        envoy.call.cancel()
    await eventually(lambda: plane.registry.status() == [], "all gone")
    assert sample("controlplane_xds_connected_proxies", group=UNKNOWN_GROUP) == unknown


async def test_unknown_type_urls_are_warned_about_at_a_bounded_rate(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.xds")
    plane.cache.set(snap("types"))
    envoy = plane.envoy("typer", "types")
    for i in range(200):
        await envoy.send(f"type.googleapis.com/made.up.Type{i}" + "x" * 5_000)
    await envoy.barrier(["backend"])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "made.up" in r.getMessage()]
    assert 1 <= len(warnings) <= WARNINGS_PER_MINUTE
    assert all(len(r.getMessage()) < 1_000 for r in warnings)
    envoy.call.cancel()


def test_the_server_bounds_what_one_connection_may_send() -> None:
    options = dict(SERVER_OPTIONS)
    assert options["grpc.max_receive_message_length"] == MAX_RECEIVE_MESSAGE_BYTES
    assert options["grpc.max_concurrent_streams"] == MAX_STREAMS_PER_CONNECTION


def test_a_node_gone_for_longer_than_the_grace_period_is_forgotten_entirely() -> None:
    """Only a reconnect within the grace period still finds the versions the node rejected."""
    memory = NackMemory(forget_after=600.0)
    registry = ProxyRegistry(memory)
    first = registry.connect("n1", "g", "peer", 0.0)
    registry.nacked(first, LISTENER, "l1", "bad", 0.0)
    registry.disconnect(first, now=100.0)
    again = registry.connect("n1", "g", "peer", 0.0)  # back within the grace period: remembered
    assert memory.is_rejected("n1", LISTENER, "l1")
    registry.disconnect(again, now=200.0)
    other = registry.connect("n2", "g", "peer", 0.0)
    registry.disconnect(other, now=801.0)  # a later departure sweeps nodes gone for longer than the grace
    assert not registry.rejections.is_rejected("n1", LISTENER, "l1") and not registry.rejections.has_rejections(
        "n1", LISTENER
    )
    assert registry.rejections.memory_size() == 0


async def test_a_node_id_cannot_forge_log_lines(plane: Plane, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10: a node id with a newline and terminal escapes gives one escaped, clipped log line."""
    caplog.set_level(logging.INFO, logger="controlplane.xds")
    caplog.handler.setFormatter(LineFormatter(LOG_FORMAT))
    plane.cache.set(snap("forge"))
    node_id = "MARKER\x00\n2026-01-01 00:00:00,000 INFO controlplane: FAKE LOG LINE\x1b[31m" + "x" * 400
    envoy = plane.envoy(node_id, "forge")
    await envoy.startup()
    connected = [line for line in caplog.text.splitlines() if "connected from" in line]
    assert len(connected) == 1 and not [line for line in caplog.text.splitlines() if line.startswith("2026-01-01")]
    assert "MARKER\\x00\\n2026-01-01" in connected[0] and "\x1b" not in connected[0]
    assert len(connected[0]) < 400
    envoy.call.cancel()


def _raw_h2_connection(port: int) -> socket.socket:
    """A client that completes the HTTP/2 handshake (preface, SETTINGS, ACK) and never starts a call."""
    sock = socket.create_connection((LOOPBACK, port), timeout=5.0)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    sock.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")  # ACK of the server's SETTINGS
    sock.setblocking(False)
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        while data := sock.recv(4096):  # the server's SETTINGS, its ACK, then GOAWAY
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_a_connection_without_calls_is_closed_and_one_with_a_stream_is_not() -> None:
    """Issue 10: a client that finishes the handshake and then starts no call would hold an xDS slot for good;
    an Envoy always has its ADS stream open, so it is never idle in grpc's sense."""
    cache, registry = SnapshotCache(), ProxyRegistry()
    cache.set(snap("idle"))
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"), idle_timeout=1.0)
    port = await server.start(LOOPBACK, 0)
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    idle = None
    try:
        envoy = FakeEnvoy(channel, "busy", "idle")
        await envoy.startup()
        idle = _raw_h2_connection(port)
        await eventually(lambda: _closed(idle), "the connection without calls is closed", timeout=10.0)
        await envoy.send(LISTENER, version="stale", nonce="0")  # the stream outlived the idle timeout
        assert registry.summary() == {"by_group": {"idle": 1}}
        envoy.call.cancel()
    finally:
        if idle is not None:
            idle.close()
        await channel.close()
        await server.stop(1.0)


async def test_the_connection_bound_holds_across_every_address_of_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc applies `grpc.max_allowed_incoming_connections` to each listening socket (checked: bound 10, two
    ports, 20 held), so a host with two addresses (`localhost`: 127.0.0.1 and ::1 on many systems) would have
    doubled the xDS port's share of descriptors. Here the host resolves to one address for grpc and, through
    the patched resolver, to two for the server: the share is halved."""
    real = socket.getaddrinfo

    def two_addresses(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        infos = real(host, *args, **kwargs)
        return [*infos, (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))] if host == LOOPBACK else infos

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    server = XdsServer(SnapshotCache(), ProxyRegistry(), log=logging.getLogger("controlplane.xds"), max_connections=10)
    port = await server.start(LOOPBACK, 0)
    clients: list[socket.socket] = []
    try:
        for _ in range(20):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((LOOPBACK, port))
            clients.append(sock)
        # Past the bound grpc accepts and closes at once; within it, silent connections stay for the handshake
        # timeout (10 s): 15 closed means 5 held.
        await eventually(lambda: sum(_closed(sock) for sock in clients) >= 15, "15 closed at once", timeout=5.0)
    finally:
        for sock in clients:
            sock.close()
        await server.stop(1.0)


async def test_connect_and_disconnect_lines_are_written_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone reaching the port could write two lines per stream, as often as they liked."""
    caplog.set_level(logging.INFO, logger="controlplane.xds")
    cache, registry = SnapshotCache(), ProxyRegistry()
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"), connection_lines_per_minute=5)
    port = await server.start(LOOPBACK, 0)
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{port}")
    try:
        cache.set(snap("churn"))
        for i in range(20):
            envoy = FakeEnvoy(channel, f"churn-{i}", "churn")
            await envoy.barrier(["backend"])
            envoy.call.cancel()
            await eventually(lambda: not registry.status(), "the stream gone")
    finally:
        await channel.close()
        await server.stop(1.0)
    lines = [r.getMessage() for r in caplog.records if "proxy churn-" in r.getMessage()]
    assert sum(" connected from " in line for line in lines) == 5
    assert sum(" disconnected " in line for line in lines) == 5
    assert CONNECTION_LINES_PER_MINUTE >= 100  # a fleet's reconnect storm is still mostly logged by default
