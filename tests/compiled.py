"""Helpers to read compiled resources back as messages in compiler tests."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_config
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from controlplane.compiler.compile import CompiledGroup
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.snapshots.snapshot import CLUSTER, EXTENSION_CONFIG, LISTENER, ROUTE


def policy_of(**files: str) -> Policy:
    return parse_policy({name.replace("__", "/") + ".yaml": text for name, text in files.items()})


def routes(group: CompiledGroup) -> route_pb2.RouteConfiguration:
    ((_, payload),) = group.resources[ROUTE]
    return route_pb2.RouteConfiguration.FromString(payload)


def vhost_rbac(group: CompiledGroup, backend: str) -> rbac_filter.RBACPerRoute:
    vhost = next(v for v in routes(group).virtual_hosts if v.name == backend)
    per_route = rbac_filter.RBACPerRoute()
    vhost.typed_per_filter_config["envoy.filters.http.rbac"].Unpack(per_route)
    return per_route


def connection_manager(group: CompiledGroup) -> hcm_pb2.HttpConnectionManager:
    ((_, payload),) = group.resources[LISTENER]
    listener = listener_pb2.Listener.FromString(payload)
    manager = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def filter_configs(group: CompiledGroup) -> dict[str, extension_pb2.TypedExtensionConfig]:
    """The group's ECDS resources by name."""
    return {name: extension_pb2.TypedExtensionConfig.FromString(b) for name, b in group.resources[EXTENSION_CONFIG]}


def jwt_authentication(group: CompiledGroup) -> jwt_config.JwtAuthentication:
    """Inline in the listener, or its ECDS resource when the filter names one."""
    config = jwt_config.JwtAuthentication()
    first = connection_manager(group).http_filters[0]
    packed = (
        filter_configs(group)[first.name].typed_config if first.HasField("config_discovery") else first.typed_config
    )
    assert packed.Unpack(config)
    return config


def clusters(group: CompiledGroup) -> dict[str, cluster_pb2.Cluster]:
    return {name: cluster_pb2.Cluster.FromString(payload) for name, payload in group.resources[CLUSTER]}


def vhost_requirement_name(group: CompiledGroup, backend: str) -> str | None:
    """The JWT requirement a backend's virtual host names (None: jwt_authn has nothing to require there)."""
    vhost = next(v for v in routes(group).virtual_hosts if v.name == backend)
    if "envoy.filters.http.jwt_authn" not in vhost.typed_per_filter_config:
        return None
    per_route = jwt_config.PerRouteConfig()
    vhost.typed_per_filter_config["envoy.filters.http.jwt_authn"].Unpack(per_route)
    return per_route.requirement_name


def vhost_requirement(group: CompiledGroup, backend: str) -> jwt_config.JwtRequirement:
    """The listener's requirement for a backend, found as Envoy finds it: by the name its virtual host gives."""
    name = vhost_requirement_name(group, backend)
    assert name is not None, f"{backend} names no JWT requirement"
    return jwt_config.JwtRequirement() if name is None else jwt_authentication(group).requirement_map[name]
