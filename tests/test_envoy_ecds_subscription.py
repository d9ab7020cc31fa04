"""How a REAL Envoy 1.40 subscribes to the filter configurations its listener names (docs/envoy-ecds.md §8).

Why: the fleet simulator (benchmarks/fleet_client.py) plays thousands of Envoys against the control plane, so its
ECDS requests must be the ones Envoy sends: what this test records is what the simulator reproduces
(`tests/test_fleet_ecds.py::test_a_listener_makes_the_driver_request_as_envoy_does`). A listener with two RBAC
filters by ECDS and an HCM taking its routes by RDS is served by a `TinyAds` that records every request.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format

from tests.support.ecds_envoy import ECDS, RBAC_URL, ads_envoy, ecds_filter, rbac, typed
from tests.support.ports import LOOPBACK, free_port
from tests.support.tiny_ads import TinyAds

pytestmark = pytest.mark.e2e

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
FILTERS = ("bucket-a", "bucket-b")


class RecordingAds(TinyAds):
    """A TinyAds that keeps every request it reads, in arrival order."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def _inbox(self, requests: Iterator[Any]) -> Any:
        def recorded() -> Iterator[Any]:
            for request in requests:
                self.requests.append(request)
                yield request

        return super()._inbox(recorded())


def gateway_listener(port: int) -> listener_pb2.Listener:
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "stat_prefix": "gw",
        "rds": {"route_config_name": "routes", "config_source": {"ads": {}, "resource_api_version": "V3"}},
        "http_filters": [
            *(ecds_filter(name, RBAC_URL) for name in FILTERS),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
    listener = {"name": "gw", "address": {"socket_address": {"address": LOOPBACK, "port_value": port}}}
    return json_format.ParseDict({**listener, "filter_chains": [chain]}, listener_pb2.Listener())


@pytest.mark.parametrize("api", ["sotw", "delta"])
def test_envoy_subscribes_filter_configs_one_by_one_before_routes_and_the_listener_ack(api: str) -> None:
    ads = RecordingAds()
    envoy = ads_envoy(ads.port, api)
    try:
        with ThreadPoolExecutor(1) as spawner:  # not forked from the main thread: see `envoy_on_ads`
            spawner.submit(envoy.start).result()
        with ads:
            ads.put(RDS, "routes", route_pb2.RouteConfiguration(name="routes"))
            for name in FILTERS:
                ads.put(ECDS, name, typed(name, rbac("DENY", ["1"])))
            ads.put(LDS, "gw", gateway_listener(free_port()))
            envoy.wait_for(lambda: all(ads.last_answered(t) for t in (LDS, ECDS, RDS)), 10, "LDS, ECDS, RDS ACKed")
            requests = list(ads.requests)
    finally:
        envoy.stop()

    lds_nonce = next(nonce for type_url, nonce in ads.sent if type_url == LDS)
    lds_ack = next(i for i, r in enumerate(requests) if r.type_url == LDS and r.response_nonce == lds_nonce)
    first_lds = next(i for i, r in enumerate(requests) if r.type_url == LDS)
    between = requests[first_lds + 1 : lds_ack]  # what Envoy asked for while building the listener
    assert all(r.response_nonce == "" for r in between)
    if api == "sotw":
        seen = [(r.type_url, frozenset(r.resource_names)) for r in between]
        grown = [frozenset(FILTERS[: i + 1]) for i in range(len(FILTERS))]
    else:
        seen = [(r.type_url, frozenset(r.resource_names_subscribe)) for r in between]
        grown = [frozenset([name]) for name in FILTERS]
    assert seen == [*((ECDS, names) for names in grown), (RDS, frozenset(["routes"]))]
