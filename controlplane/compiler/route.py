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

from controlplane.compiler import aws, inject
from controlplane.compiler.jwt import per_route_disabled, per_route_requirement
from controlplane.compiler.names import (
    EXCHANGE_CLUSTER,
    IDENTITY_HEADERS,
    JWT_FILTER,
    PAYLOAD_KEY,
    RBAC_FILTER,
    backend_cluster,
)
from controlplane.compiler.rbac import rbac_disabled
from controlplane.compiler.util import millis, packed, serialized
from controlplane.compiler.wire import varint
from controlplane.model.credentials import EXCHANGE_PATH
from controlplane.model.policy import Backend
from controlplane.resolved.aws_roles import RoleChoice

_VIRTUAL_HOSTS_TAG = b"\x12"  # RouteConfiguration.virtual_hosts = 2, wire type 2
_RBAC_PER_ROUTE_URL = "type.googleapis.com/" + rbac_filter.RBACPerRoute.DESCRIPTOR.full_name


# The token exchange answers within this; it signs one credential, so far less is needed.
EXCHANGE_TIMEOUT_MS = 10_000


def virtual_host(
    backend: Backend,
    rbac: bytes,
    requirement: str | None,
    exchange: bool = False,
    aws_signing: bool = False,
    aws_roles: Sequence[RoleChoice] = (),
    aws_roles_credentials: Sequence[aws.SigningCredential | None] = (),
) -> rc.VirtualHost:
    """`rbac`: the host's serialized RBACPerRoute (see `rbac.RbacEncoder`); `requirement`: the name of the
    listener's JWT requirement for this host (None: no issuer accepts tokens here); `exchange`: the
    token-exchange endpoint is routed first on this host (see `_exchange_route`); `aws_signing`: an AWS
    backend's role has a valid credential (else its routes answer 503, compiler/aws.py); `aws_roles`: its
    bindings' own roles (resolved/aws_roles.py), each routed before the default route and signing with the valid
    credential at the same index of `aws_roles_credentials` (None: its routes answer 503)."""
    default = _default_route(backend)
    per_filter = {RBAC_FILTER: AnyProto(type_url=_RBAC_PER_ROUTE_URL, value=rbac)}
    if requirement is not None:
        per_filter[JWT_FILTER] = packed(per_route_requirement(requirement))
    per_filter.update((name, packed(config)) for name, config in inject.per_filter_config(backend).items())
    signer_on = aws_signing or any(c is not None for c in aws_roles_credentials)
    per_filter.update((name, packed(config)) for name, config in aws.per_filter_config(backend, signer_on).items())
    return rc.VirtualHost(
        name=backend.name,
        domains=_domains(backend.hosts),
        routes=[
            *([_exchange_route(backend)] if exchange else []),
            *(aws.fail_closed(backend, _public_route(backend, p), aws_signing) for p in backend.public_paths),
            *aws.refused_routes(backend),
            *aws.role_routes(backend, aws_roles, default, aws_roles_credentials),
            aws.fail_closed(backend, default, aws_signing),
        ],
        typed_per_filter_config=per_filter,
    )


def route_configuration_bytes(name: str, virtual_hosts: Sequence[bytes]) -> bytes:
    """Byte-identical to serializing the RouteConfiguration (name, virtual hosts, identity headers) in one go.

    The deny list is not here: it is the listener's revocation buckets, by ECDS (compiler/revocations.py).
    """
    encoded_name = name.encode()
    parts = [b"\x0a", varint(len(encoded_name)), encoded_name]
    for vhost in virtual_hosts:
        parts += [_VIRTUAL_HOSTS_TAG, varint(len(vhost)), vhost]
    parts.append(_IDENTITY_HEADERS_ENTRY)
    return b"".join(parts)


def route_configuration(name: str, virtual_hosts: Sequence[bytes]) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration.FromString(route_configuration_bytes(name, virtual_hosts))


def _identity_header(name: str, claim: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=f"%DYNAMIC_METADATA({JWT_FILTER}:{PAYLOAD_KEY}:{claim})%"),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


# The job's identity for the backend, set once for every virtual host (Envoy applies route-configuration
# headers to all of them): per host it was ~600 bytes x backends in every RDS push. Remove runs before add
# (Envoy's HeaderParser), so a job cannot forge another job's identity; a request without a verified token
# (a public path, the exchange) has no payload, so the headers are removed and none is added.
_IDENTITY_HEADERS_ENTRY = serialized(
    route_pb2.RouteConfiguration(
        request_headers_to_add=[_identity_header(name, claim) for name, claim in IDENTITY_HEADERS],
        request_headers_to_remove=[name for name, _ in IDENTITY_HEADERS],
    )
)


def _domains(hosts: Sequence[str]) -> list[str]:
    return [d for host in hosts for d in (host, f"{host}:*")]


def _default_route(backend: Backend) -> rc.Route:
    return rc.Route(
        name=f"{backend.name}-default",
        match=rc.RouteMatch(prefix="/"),
        route=rc.RouteAction(cluster=backend_cluster(backend.name), timeout=millis(backend.request_timeout_ms)),
    )


def _public_route(backend: Backend, path: str) -> rc.Route:
    """A path the backend declared public: no token, no RBAC. Route-level config replaces the vhost's
    (docs/envoy-filters.md#route-settings-replace-they-do-not-merge).

    The revocation buckets need no switching off here: with jwt_authn off there is no `job_id` they could match.
    With jwt_authn off, its `forward: false` does not strip a token the job sent anyway, so the route removes
    `Authorization` (see `_public_headers_to_remove`).
    """
    route = _tokenless_route(
        f"{backend.name}-public{path}", path, backend_cluster(backend.name), backend.request_timeout_ms
    )
    route.request_headers_to_remove.extend(_public_headers_to_remove(backend))
    return route


def _public_headers_to_remove(backend: Backend) -> list[str]:
    """What the job's token must not reach the backend in, on a public path.

    The router applies a route's header removals last, after every HTTP filter, so removing `Authorization`
    would also remove a credential the backend's injector just put there. When the backend injects into
    `Authorization` itself, the injector's `overwrite` already replaces the job's value (and refuses the
    request when it has no credential), so nothing is removed.
    """
    if backend.inject is not None and backend.inject.header.lower() == AUTHORIZATION:
        return []
    return [AUTHORIZATION]


AUTHORIZATION = "authorization"


def _exchange_route(backend: Backend) -> rc.Route:
    """First on every host: jobs trade their ID token at the control plane. The subject token travels in the
    form body (RFC 8693), not as a Bearer token, and the control plane authenticates it itself: jwt_authn and
    RBAC are off, so the exchange can answer a revoked job with an OAuth error, not a bare 403. The revocation
    buckets stay on but cannot match: with jwt_authn off there is no `job_id` metadata."""
    route = _tokenless_route(f"{backend.name}-exchange", EXCHANGE_PATH, EXCHANGE_CLUSTER, EXCHANGE_TIMEOUT_MS)
    # The backend's own credential is for the backend only, never for the control plane.
    for name, config in (inject.per_route_off(backend) | aws.per_route_off(backend)).items():
        route.typed_per_filter_config[name].CopyFrom(packed(config))
    return route


def _tokenless_route(name: str, path: str, cluster: str, timeout_ms: int) -> rc.Route:
    """An exact path with jwt_authn and the main RBAC off."""
    return rc.Route(
        name=name,
        match=rc.RouteMatch(path=path),
        route=rc.RouteAction(cluster=cluster, timeout=millis(timeout_ms)),
        typed_per_filter_config={
            JWT_FILTER: packed(per_route_disabled()),
            RBAC_FILTER: packed(rbac_disabled()),
        },
    )
