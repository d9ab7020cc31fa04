"""The xDS type URLs of what the compiler produces, by which its output is keyed.

Here, at the bottom, so the compiler names its own output; snapshots and the xDS layer above take them from here.
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# ECDS: an HTTP filter's configuration, named by `HttpFilter.config_discovery` (docs/envoy-ecds.md). Served by
# the xDS layer; nothing is compiled to it yet.
EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
