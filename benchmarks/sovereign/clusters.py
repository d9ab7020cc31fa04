"""Sovereign template (python source): CDS for the benchmark fleet.

Sovereign serves REST xDS; EDS over REST would be one polled subscription per cluster per Envoy, so each
cluster carries its endpoints inline (STATIC). Same names, endpoints and connect timeout as controlplane's
EDS clusters. ``fleet`` is the template context loaded from the JSON file the benchmark rewrites.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


def call(fleet: dict[str, Any], **_: Any) -> Iterator[dict[str, Any]]:
    for backend in fleet["backends"]:
        name = f"backend-{backend['name']}"
        yield {
            "@type": CLUSTER,
            "name": name,
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {"address": backend["address"], "port_value": backend["port"]}
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        }
