"""The fleet simulator speaks ECDS as Envoy does, against the control plane's own `XdsServer`, in SotW and Delta.

Why: issue 13 moves the deny list and jwt_authn into ECDS resources, and the fleet benchmarks measure a revocation
by awaiting the `ecds` label. So a simulated proxy must learn the filter configuration names from its listeners'
HTTP connection managers (`config_discovery`: the filter's name is the resource's), subscribe to them, ACK or
NACK them and hold their version, and a change of one configuration must reach every stream and change nothing
else (Delta: that one resource). The streams run in this test's event loop (fleet_client's `Worker`, without its
pipe), beside the server; the compiler emits no ECDS yet, so the snapshot is built here.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.compiler.names import JWT_FILTER
from controlplane.compiler.revocations import bucket_names
from controlplane.snapshots.build import compile_dir
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, Snapshot
from controlplane.xds.fleet_status import ProxyRegistry
from controlplane.xds.server import XdsServer
from tests.support.ports import LOOPBACK

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fleet_client import (
    DRIVERS,
    ECDS,
    LDS,
    RDS,
    StreamState,
    Worker,
    WorkerConfig,
    listener_names,
    poll,
)

GROUP = "fleet"
STREAMS = [0, 1]
BUCKETS = ("revoked.00", "revoked.01")
RBAC_URL = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def gateway_listener(*, default_chain: bool = False) -> listener_pb2.Listener:
    """A listener whose HCM takes its routes by RDS and two RBAC filters' configurations by ECDS."""
    manager = hcm_pb2.HttpConnectionManager(stat_prefix="gw")
    manager.rds.route_config_name = "routes"
    manager.rds.config_source.ads.SetInParent()
    for name in BUCKETS:
        http_filter = manager.http_filters.add(name=name)
        http_filter.config_discovery.config_source.ads.SetInParent()
        http_filter.config_discovery.type_urls.append(RBAC_URL)
    manager.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
    listener = listener_pb2.Listener(name="gateway")
    chain = listener.default_filter_chain if default_chain else listener.filter_chains.add()
    chain.filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(manager)
    return listener


def snapshot(denied: Mapping[str, str]) -> Snapshot:
    """One EDS cluster, the gateway listener, its routes, and per bucket an RBAC deny list (`denied[bucket]`)."""
    cluster = cluster_pb2.Cluster(name="svc", type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    configs = []
    for name in BUCKETS:
        config = extension_pb2.TypedExtensionConfig(name=name)
        config.typed_config.Pack(rbac_pb2.RBAC(rules_stat_prefix=denied[name]))  # stands in for a deny list
        configs.append((name, config))
    return Snapshot.build(
        GROUP,
        {
            CLUSTER: [("svc", cluster)],
            ENDPOINT: [("svc", endpoint_pb2.ClusterLoadAssignment(cluster_name="svc"))],
            LISTENER: [("gateway", gateway_listener())],
            ROUTE: [("routes", route_pb2.RouteConfiguration(name="routes"))],
            EXTENSION_CONFIG: configs,
        },
    )


@dataclass
class Setup:
    cache: SnapshotCache
    registry: ProxyRegistry
    worker: Worker
    first: Snapshot


@pytest.fixture
async def fleet(request: pytest.FixtureRequest) -> AsyncIterator[Setup]:
    cache, registry = SnapshotCache(), ProxyRegistry()
    server = XdsServer(cache, registry, log=logging.getLogger("controlplane.xds"))
    first = snapshot({"revoked.00": "1001", "revoked.01": "2001"})
    cache.set(first)
    port = await server.start(LOOPBACK, 0)
    parent, child = multiprocessing.Pipe()  # the Worker's command pipe, unused: commands are called directly
    worker = Worker(child, WorkerConfig(f"{LOOPBACK}:{port}", GROUP, request.param, STREAMS, read_timeout=10.0))
    try:
        yield Setup(cache, registry, worker, first)
    finally:
        await worker.cmd_close()
        await server.stop(1.0)
        parent.close()
        child.close()


async def connected(setup: Setup) -> None:
    """Every stream went through Envoy's startup (connect without cmd_connect's gc.freeze of this process)."""
    worker = setup.worker
    assert await worker.open_all(worker.streams.values(), 10.0) == []
    assert await poll(lambda: all(s.state.settled() for s in worker.streams.values()), 10.0)


def test_listener_names_include_filters_configured_by_discovery() -> None:
    expected = {"rds": ("routes",), "ecds": BUCKETS}
    assert listener_names(gateway_listener().SerializeToString()) == expected
    assert listener_names(gateway_listener(default_chain=True).SerializeToString()) == expected
    plain = listener_pb2.Listener(name="plain")
    assert listener_names(plain.SerializeToString()) == {"rds": (), "ecds": ()}


def test_the_compiled_gateway_listener_names_jwt_authn_the_16_buckets_and_the_recent_list() -> None:
    """What the compiler's gateway listener makes a simulated proxy subscribe to at connect: 18 configurations,
    each one of the group's ECDS resources. The fleet run of benchmarks/revocation_scale.py awaits the recent
    list's change on every stream: a proxy that missed that name would never see it."""
    _, snapshots = compile_dir(Path(__file__).resolve().parents[1] / "examples" / "quickstart")
    ((_, snapshot),) = snapshots.items()
    (listener,) = snapshot.types[LISTENER].resources.values()
    names = listener_names(listener.payload)["ecds"]
    assert names == tuple(sorted([JWT_FILTER, *bucket_names()]))
    assert len(names) == 18
    assert set(names) == set(snapshot.types[EXTENSION_CONFIG].resources)


@pytest.mark.parametrize("fleet", ["sotw", "delta"], indirect=True)
async def test_streams_subscribe_to_filter_configs_and_see_one_change(fleet: Setup) -> None:
    await connected(fleet)
    ecds_version = fleet.first.version(EXTENSION_CONFIG)
    for stream in fleet.worker.streams.values():
        state = stream.state
        assert state.acked["ecds"] == ecds_version  # SotW version_info; Delta digest of both held configurations
        assert state.bytes_received["ecds"] > 0
        if stream.mode == "delta":
            assert state.held["ecds"] == {n: fleet.first.types[EXTENSION_CONFIG].resources[n].version for n in BUCKETS}
        else:
            assert state.sotw_names["ecds"] == BUCKETS
    assert {p["acked"].get("ecds") for p in fleet.registry.status()} == {ecds_version}  # the server saw the ACKs

    base = await fleet.worker.cmd_versions(0)
    bytes_before = await fleet.worker.cmd_bytes_received()
    second = snapshot({"revoked.00": "1001", "revoked.01": "2002"})
    fleet.cache.set(second)
    out = await fleet.worker.cmd_await_change(base, ["ecds"], timeout=10.0, exclude=[])
    assert out["converged"] and out["versions"] == {"ecds": second.version(EXTENSION_CONFIG)}
    assert all(times["ecds"] is not None for times in out["ack_times"].values())
    bytes_after = await fleet.worker.cmd_bytes_received()
    for index, stream in fleet.worker.streams.items():
        assert await fleet.worker.cmd_versions(index) == base | out["versions"]  # nothing else changed
        grown = {t for t, n in bytes_after[index].items() if n != bytes_before[index].get(t)}
        assert grown == {"ecds"}  # the proxy received a response of that type only
        if stream.mode == "delta":
            changed = second.types[EXTENSION_CONFIG].resources["revoked.01"].version
            first = fleet.first.types[EXTENSION_CONFIG].resources
            expected = sorted([*((n, first[n].version) for n in BUCKETS), ("revoked.01", changed)])
            assert sorted((n, v) for (t, n, v) in stream.state.resources_received if t == "ecds") == expected
            assert sum(n for (t, _, _), n in stream.state.resources_received.items() if t == "ecds") == 3


@pytest.mark.parametrize("fleet", ["sotw", "delta"], indirect=True)
async def test_a_nacked_filter_config_leaves_the_other_streams_moving(fleet: Setup) -> None:
    await connected(fleet)
    worker = fleet.worker
    base = await worker.cmd_versions(0)
    assert await worker.cmd_nack_next(0, "ecds")
    second = snapshot({"revoked.00": "1002", "revoked.01": "2001"})
    fleet.cache.set(second)
    out = await worker.cmd_await_change(base, ["ecds"], timeout=10.0, exclude=[0])
    assert out["converged"] and out["versions"] == {"ecds": second.version(EXTENSION_CONFIG)}
    nacker = worker.streams[0].state
    assert await poll(lambda: bool(nacker.nacked), 5.0)
    assert [label for label, _ in nacker.nacked] == ["ecds"]
    assert nacker.acked["ecds"] == fleet.first.version(EXTENSION_CONFIG)  # it keeps what it held
    assert await poll(lambda: _last_nack(fleet.registry, "fleet-00000") is not None, 5.0)


def _last_nack(registry: ProxyRegistry, node: str) -> object:
    (proxy,) = [p for p in registry.status() if p["node"] == node]
    return proxy["last_nack"]


@pytest.mark.parametrize("fleet", ["sotw", "delta"], indirect=True)
async def test_a_reconnect_resumes_its_filter_configs(fleet: Setup) -> None:
    """A stream that reconnects tells the server which configurations it holds (SotW: the ECDS version and names;
    Delta: initial_resource_versions) and is sent none again; a later change still reaches it."""
    await connected(fleet)
    worker = fleet.worker
    stream = worker.streams[0]
    held = await worker.cmd_versions(0)
    await stream.close()
    assert await worker.open_all([stream], 10.0) == []
    assert await poll(lambda: stream.state.settled() and stream.state.acked == held, 5.0)
    assert "ecds" in stream.state.subscribed
    assert not stream.state.received  # resumed: nothing of any type was sent again

    second = snapshot({"revoked.00": "1003", "revoked.01": "2001"})
    fleet.cache.set(second)
    out = await worker.cmd_await_change(held, ["ecds"], timeout=10.0, exclude=[])
    assert out["converged"] and out["versions"] == {"ecds": second.version(EXTENSION_CONFIG)}


def _listener_response(mode: str) -> Any:
    """The gateway listener as an LDS response of `mode`'s wire protocol (version "v1", nonce "n1")."""
    packed = any_pb2.Any()
    packed.Pack(gateway_listener())
    if mode == "sotw":
        return discovery_pb2.DiscoveryResponse(type_url=LDS, version_info="v1", nonce="n1", resources=[packed])
    resource = discovery_pb2.Resource(name="gateway", version="v1", resource=packed)
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=LDS, system_version_info="v1", nonce="n1", resources=[resource]
    )


@pytest.mark.parametrize("mode", ["sotw", "delta"])
def test_a_listener_makes_the_driver_request_as_envoy_does(mode: str) -> None:
    """Envoy 1.40 (docs/envoy-ecds.md §8): one ECDS request per filter (SotW: the names so far; Delta: that name),
    then RDS, then the LDS ACK."""
    state = StreamState(0, "fleet-00000")
    driver = DRIVERS[mode](state, GROUP)
    driver.first_requests()
    driver.lds_requested = True  # type: ignore[attr-defined]  # the clusters were warm: LDS was asked for
    state.subscribed.add("lds")
    state.held["lds"] = {}
    requests = driver.on_response(_listener_response(mode), 0.0)
    if mode == "sotw":
        seen = [(r.type_url, tuple(r.resource_names), r.response_nonce) for r in requests]
        assert seen == [(ECDS, BUCKETS[:1], ""), (ECDS, BUCKETS, ""), (RDS, ("routes",), ""), (LDS, (), "n1")]
    else:
        seen = [(r.type_url, tuple(r.resource_names_subscribe), r.response_nonce) for r in requests]
        ecds = [(ECDS, (name,), "") for name in BUCKETS]
        assert seen == [*ecds, (RDS, ("routes",), ""), (LDS, (), "n1")]
    assert {"ecds", "rds"} <= state.subscribed
