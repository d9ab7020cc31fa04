"""Routing: one virtual host per backend, carrying that backend's audience requirement and RBAC policy.

A route configuration can hold thousands of virtual hosts. Each is serialized on its own and the
RouteConfiguration is assembled from those bytes, so a one-binding change re-encodes one virtual host.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from google.protobuf.any_pb2 import Any as AnyProto

from controlplane.compiler.jwt import per_route_disabled, per_route_requirement
from controlplane.compiler.names import (
    IDENTITY_HEADERS,
    JWT_FILTER,
    PAYLOAD_KEY,
    RBAC_FILTER,
    backend_cluster,
)
from controlplane.compiler.rbac import GrantSpec, backend_rbac_bytes, rbac_disabled
from controlplane.compiler.util import millis, packed, serialized
from controlplane.model.policy import Backend
from controlplane.snapshots.snapshot import varint

_VIRTUAL_HOSTS_TAG = b"\x12"  # RouteConfiguration.virtual_hosts = 2, wire type 2
_RBAC_PER_ROUTE_URL = "type.googleapis.com/" + rbac_filter.RBACPerRoute.DESCRIPTOR.full_name


def virtual_host(backend: Backend, grants: Sequence[GrantSpec], authenticated: bool) -> rc.VirtualHost:
    per_filter = {RBAC_FILTER: AnyProto(type_url=_RBAC_PER_ROUTE_URL, value=backend_rbac_bytes(backend.name, grants))}
    if authenticated:
        per_filter[JWT_FILTER] = packed(per_route_requirement(backend.name))
    return rc.VirtualHost(
        name=backend.name,
        domains=_domains(backend.hosts),
        routes=[*(_public_route(backend, p) for p in backend.public_paths), _default_route(backend)],
        typed_per_filter_config=per_filter,
        # Remove runs before add (Envoy's HeaderParser), so a job cannot forge another job's identity.
        request_headers_to_remove=[name for name, _ in IDENTITY_HEADERS],
        request_headers_to_add=[_identity_header(name, claim) for name, claim in IDENTITY_HEADERS],
    )


def virtual_host_bytes(backend: Backend, grants: Sequence[GrantSpec], authenticated: bool) -> bytes:
    return serialized(virtual_host(backend, grants, authenticated))


def route_configuration_bytes(name: str, virtual_hosts: Sequence[bytes]) -> bytes:
    """Byte-identical to serializing RouteConfiguration(name=..., virtual_hosts=[...]) in one go."""
    encoded_name = name.encode()
    parts = [b"\x0a", varint(len(encoded_name)), encoded_name]
    for vhost in virtual_hosts:
        parts += [_VIRTUAL_HOSTS_TAG, varint(len(vhost)), vhost]
    return b"".join(parts)


def route_configuration(name: str, virtual_hosts: Sequence[bytes]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration.FromString(route_configuration_bytes(name, virtual_hosts))


def _domains(hosts: Sequence[str]) -> list[str]:
    return [d for host in hosts for d in (host, f"{host}:*")]


def _default_route(backend: Backend) -> rc.Route:
    return rc.Route(
        name=f"{backend.name}-default",
        match=rc.RouteMatch(prefix="/"),
        route=rc.RouteAction(cluster=backend_cluster(backend.name), timeout=millis(backend.request_timeout_ms)),
    )


def _public_route(backend: Backend, path: str) -> rc.Route:
    """A path the backend declared public: no token, no RBAC. Route-level config replaces the vhost's (G12)."""
    return rc.Route(
        name=f"{backend.name}-public{path}",
        match=rc.RouteMatch(path=path),
        route=rc.RouteAction(cluster=backend_cluster(backend.name), timeout=millis(backend.request_timeout_ms)),
        typed_per_filter_config={
            JWT_FILTER: packed(per_route_disabled()),
            RBAC_FILTER: packed(rbac_disabled()),
        },
    )


def _identity_header(name: str, claim: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=f"%DYNAMIC_METADATA({JWT_FILTER}:{PAYLOAD_KEY}:{claim})%"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
