"""A compiled snapshot as a static Envoy bootstrap, for the tests that run or validate Envoy without an xDS server."""

from __future__ import annotations

from typing import Any

from controlplane.cli.bootstrap import RE2_MAX_PROGRAM_SIZE, RE2_PROGRAM_SIZE_KEY
from controlplane.snapshots import golden
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, Snapshot


def as_static_bootstrap(snapshot: Snapshot) -> dict[str, Any]:
    """Inline RDS, EDS and ECDS (each filter configuration in place of its `config_discovery`) so
    `envoy --mode validate` can check the dynamic resources as Envoy would."""

    def strip(resource: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in resource.items() if k != "@type"}

    endpoints = {e["cluster_name"]: strip(e) for e in golden.resource_dicts(snapshot, ENDPOINT)}
    routes = {r["name"]: strip(r) for r in golden.resource_dicts(snapshot, ROUTE)}
    filter_configs = {f["name"]: f["typed_config"] for f in golden.resource_dicts(snapshot, EXTENSION_CONFIG)}
    clusters = [strip(c) for c in golden.resource_dicts(snapshot, CLUSTER)]
    for cluster in clusters:
        if cluster.get("type") == "EDS":
            del cluster["eds_cluster_config"]
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = endpoints[cluster["name"]]
    listeners = [strip(listener) for listener in golden.resource_dicts(snapshot, LISTENER)]
    for listener in listeners:
        manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
        manager["route_config"] = routes[manager.pop("rds")["route_config_name"]]
        for http_filter in manager["http_filters"]:
            if http_filter.pop("config_discovery", None) is not None:
                http_filter["typed_config"] = filter_configs[http_filter["name"]]
        for log in manager.get("access_log", []):
            if "path" in log["typed_config"]:  # file loggers; the gRPC one (ALS) has no path
                log["typed_config"]["path"] = "/dev/null"
    runtime = {"layers": [{"name": "static_layer", "static_layer": {RE2_PROGRAM_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}}]}
    # A node: Envoy requires one for any SDS secret (an injecting backend's), even in validate mode.
    node = {"id": "validate", "cluster": "validate"}
    return {
        "node": node,
        "static_resources": {"clusters": clusters, "listeners": listeners},
        "layered_runtime": runtime,
    }
