"""What the REAL Envoy does with a State-of-the-World EDS response that carries only some of the assignments it
subscribed to: the fact that decides whether a Service's endpoint change may be pushed as that one assignment
(docs/kubernetes-endpoints.md, "EDS over SotW").

A scripted ADS server (below) answers Envoy's EDS subscription for two static EDS clusters with exactly the
responses a test gives it; Envoy's admin `/clusters` shows which hosts each cluster holds."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from controlplane.cli.bootstrap import render_bootstrap
from controlplane.compiler.cluster import load_assignment
from controlplane.compiler.types import ENDPOINT
from controlplane.model.policy import Endpoint
from controlplane.xds.server import SERVICE
from tests.support.envoy import EnvoyProcess
from tests.support.ports import LOOPBACK, poll_until

pytestmark = pytest.mark.e2e

_END = object()


class ScriptedAds:
    """SotW ADS whose responses are exactly those `send` is given; Envoy's requests are kept in `requests`."""

    def __init__(self) -> None:
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"StreamAggregatedResources": handler}),)
        )
        self.port = self._server.add_insecure_port(f"{LOOPBACK}:0")
        self._lock = threading.Lock()

    def __enter__(self) -> ScriptedAds:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._outbox.put(_END)
        self._server.stop(grace=None)

    def send(self, version: str, *assignments: endpoint_pb2.ClusterLoadAssignment) -> None:
        packed = []
        for assignment in assignments:
            item = any_pb2.Any()
            item.Pack(assignment)
            packed.append(item)
        self._outbox.put(
            discovery_pb2.DiscoveryResponse(type_url=ENDPOINT, version_info=version, nonce=version, resources=packed)
        )

    def acked(self, version: str) -> bool:
        with self._lock:
            return any(
                r.response_nonce == version and r.version_info == version and not r.HasField("error_detail")
                for r in self.requests
            )

    def subscribed(self) -> set[str]:
        with self._lock:
            return {n for r in self.requests if r.type_url == ENDPOINT for n in r.resource_names}

    def _stream(self, requests: Iterator[discovery_pb2.DiscoveryRequest], context: Any) -> Iterator[Any]:
        def read() -> None:
            try:
                for request in requests:
                    with self._lock:
                        self.requests.append(request)
            except grpc.RpcError:  # the stream ends when the test stops the server
                pass

        threading.Thread(target=read, daemon=True).start()
        while (item := self._outbox.get()) is not _END:
            yield item


def _assignment(cluster: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    """What the compiler sends for a Service-backed cluster with these ready endpoints (none: no locality)."""
    return load_assignment(cluster, tuple(Endpoint(LOOPBACK, port) for port in ports))


def _hosts(envoy: EnvoyProcess) -> dict[str, set[int]]:
    status, text = envoy.admin_get("/clusters?format=json")
    assert status == 200
    return {
        c["name"]: {h["address"]["socket_address"]["port_value"] for h in c.get("host_statuses", [])}
        for c in json.loads(text)["cluster_statuses"]
        if c["name"] in ("one", "two")
    }


@pytest.fixture
def envoy_on_eds() -> Iterator[tuple[ScriptedAds, EnvoyProcess]]:
    with ScriptedAds() as ads:
        boot = render_bootstrap(group="eds", node_id="eds-facts", xds_host=LOOPBACK, xds_port=ads.port, admin_port=0)
        del boot["dynamic_resources"]["cds_config"]
        del boot["dynamic_resources"]["lds_config"]
        eds = {"ads": {}, "resource_api_version": "V3"}
        boot["static_resources"]["clusters"] += [
            {"name": name, "type": "EDS", "connect_timeout": "1s", "eds_cluster_config": {"eds_config": eds}}
            for name in ("one", "two")
        ]
        envoy = EnvoyProcess(boot, name="eds-facts", wait_ready=False)
        with futures.ThreadPoolExecutor(1) as spawner:  # vfork, as tests/support/ecds_envoy.py explains
            spawner.submit(envoy.start).result()
        try:
            yield ads, envoy
        finally:
            envoy.stop()


def test_a_sotw_eds_response_with_one_assignment_leaves_the_others_in_place(
    envoy_on_eds: tuple[ScriptedAds, EnvoyProcess],
) -> None:
    ads, envoy = envoy_on_eds
    poll_until(lambda: ads.subscribed() == {"one", "two"}, 10, message="Envoy subscribed to both assignments")
    ads.send("1", _assignment("one", 1001), _assignment("two", 2001))
    poll_until(lambda: ads.acked("1"), 10, message="the full response ACKed")
    poll_until(lambda: _hosts(envoy) == {"one": {1001}, "two": {2001}}, 10, message="both assignments applied")

    ads.send("2", _assignment("one", 1002, 1003))  # cluster `two` left out of this response
    poll_until(lambda: ads.acked("2"), 10, message="the one-assignment response ACKed")
    poll_until(lambda: _hosts(envoy)["one"] == {1002, 1003}, 10, message="`one` updated")
    assert _hosts(envoy)["two"] == {2001}  # not removed: EDS over SotW is not full-state

    ads.send("2b")  # no assignment at all (what a version change that touched none of them sends): ACKed, no change
    poll_until(lambda: ads.acked("2b"), 10, message="the empty response ACKed")
    assert _hosts(envoy) == {"one": {1002, 1003}, "two": {2001}}

    ads.send("3", _assignment("two"))  # an empty assignment: no host at all (requests to it fail, 503)
    poll_until(lambda: ads.acked("3"), 10, message="the empty assignment ACKed")
    poll_until(lambda: _hosts(envoy)["two"] == set(), 10, message="`two` emptied")
    assert _hosts(envoy)["one"] == {1002, 1003}
