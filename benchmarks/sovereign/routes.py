"""Sovereign template (python source): RDS for the benchmark fleet.

One route configuration named like controlplane's (``gateway-<group>``): a virtual host per backend matching
its host (with and without a port), routing every path to the backend's cluster with a 15 s timeout.
controlplane's virtual hosts also carry identity headers and RBAC per-route config; these do not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

ROUTE_CONFIGURATION = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def call(fleet: dict[str, Any], **_: Any) -> Iterator[dict[str, Any]]:
    hosts = []
    for backend in fleet["backends"]:
        host = backend["host"]
        hosts.append(
            {
                "name": backend["name"],
                "domains": [host, f"{host}:*"],
                "routes": [
                    {
                        "name": f"{backend['name']}-default",
                        "match": {"prefix": "/"},
                        "route": {"cluster": f"backend-{backend['name']}", "timeout": "15s"},
                    }
                ],
            }
        )
    yield {"@type": ROUTE_CONFIGURATION, "name": fleet["route_config"], "virtual_hosts": hosts}
