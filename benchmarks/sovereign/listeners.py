"""Sovereign template (python source): LDS for the benchmark fleet.

One listener like controlplane's gateway listener: an HTTP connection manager with the same path
normalisation, a file access log to /dev/null and RDS, here polled over REST from sovereign. Only the router
filter: controlplane adds jwt_authn and two RBAC filters, which sovereign has no policy for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


def call(fleet: dict[str, Any], **_: Any) -> Iterator[dict[str, Any]]:
    rest = {
        "api_type": "REST",
        "transport_api_version": "V3",
        "cluster_names": [fleet["xds_cluster"]],
        "refresh_delay": fleet["refresh_delay"],
        "request_timeout": "5s",
    }
    manager = {
        "@type": HCM,
        "stat_prefix": fleet["group"],
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "access_log": [{"name": "envoy.access_loggers.file", "typed_config": {"@type": FILE_LOG, "path": "/dev/null"}}],
        "rds": {
            "route_config_name": fleet["route_config"],
            "config_source": {"resource_api_version": "V3", "api_config_source": rest},
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
    }
    yield {
        "@type": LISTENER,
        "name": fleet["route_config"],
        "address": {"socket_address": {"address": fleet["listen_address"], "port_value": fleet["listen_port"]}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}
        ],
    }
