"""The gateway listener: HTTP connection manager with jwt_authn → revocation buckets → RBAC → credential
injection → router, in that order.

What changes often is not in the listener, which Envoy replaces by draining its connections: jwt_authn (its
keys rotate) and the revocation buckets name their configurations (ECDS, `config_discovery`).

Revocations come before the main RBAC so that a revoked job is denied whatever its grants. The buckets' deny
lists are not in the listener: each bucket filter names its configuration (ECDS, `config_discovery`), which the
compiler emits as an EXTENSION_CONFIG resource (compiler/revocations.py), so a revocation never replaces the
listener (Envoy would drain its connections).
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2, config_source_pb2, extension_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.wrappers_pb2 import BoolValue

from controlplane.compiler import aws, inject
from controlplane.compiler.access_log import file_access_log, grpc_access_log
from controlplane.compiler.names import (
    HCM_FILTER,
    JWT_FILTER,
    RBAC_FILTER,
    ROUTER_FILTER,
    listener_name,
    route_config_name,
)
from controlplane.compiler.rbac import deny_all_filter
from controlplane.compiler.revocations import RBAC_URL, bucket_names
from controlplane.compiler.util import packed, serialized
from controlplane.model.policy import Backend, Gateway

HCM = hcm.HttpConnectionManager
_JWT_CONFIG_URL = "type.googleapis.com/" + jwt.JwtAuthentication.DESCRIPTOR.full_name


def gateway_listener(gateway: Gateway, backends: Sequence[Backend] = ()) -> listener_pb2.Listener:
    """`backends` add their credential injection filters (see inject.http_filters), which only run once RBAC has
    allowed. jwt_authn's configuration is not here either: see `authentication_config_bytes`."""
    manager = HCM(
        stat_prefix=gateway.name.replace("-", "_"),
        codec_type=HCM.AUTO,
        rds=hcm.Rds(
            route_config_name=route_config_name(gateway.name),
            config_source=_ads(),
        ),
        http_filters=[
            _jwt_authn(),
            *revocation_bucket_filters(),
            hcm.HttpFilter(name=RBAC_FILTER, typed_config=packed(deny_all_filter())),
            *inject.http_filters(backends),
            *aws.http_filters(backends),
            hcm.HttpFilter(name=ROUTER_FILTER, typed_config=packed(router_pb2.Router())),
        ],
        access_log=[file_access_log(gateway.access_log_path), grpc_access_log(gateway.name)],
        # Path rules are only as good as the path they see: normalize, and refuse encoded slashes.
        normalize_path=_true(),
        merge_slashes=True,
        path_with_escaped_slashes_action=HCM.REJECT_REQUEST,
        use_remote_address=_true(),
    )
    return listener_pb2.Listener(
        name=listener_name(gateway.name),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=gateway.address, port_value=gateway.port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=packed(manager))]
            )
        ],
    )


def _jwt_authn() -> hcm.HttpFilter:
    """jwt_authn by ECDS, its resource named like the filter (route requirements are keyed by that name): the
    keys it verifies with (ours, relayed issuers') change with every rotation, which must not replace the
    listener. No default: until its configuration arrives the listener warms; after `initial_fetch_timeout`
    every request gets 500 (fail-closed, docs/envoy-ecds.md §2)."""
    return hcm.HttpFilter(
        name=JWT_FILTER,
        config_discovery=config_source_pb2.ExtensionConfigSource(config_source=_ads(), type_urls=[_JWT_CONFIG_URL]),
    )


def authentication_config_bytes(authentication: bytes) -> bytes:
    """The ECDS resource of the gateway's jwt_authn filter: the serialized JwtAuthentication (see
    jwt.authentication_bytes) as a TypedExtensionConfig named JWT_FILTER, without re-encoding it."""
    return serialized(
        extension_pb2.TypedExtensionConfig(
            name=JWT_FILTER, typed_config=AnyProto(type_url=_JWT_CONFIG_URL, value=authentication)
        )
    )


def revocation_bucket_filters() -> list[hcm.HttpFilter]:
    """One RBAC filter per bucket, configured by ECDS. Until its configuration arrives the listener warms (no
    `apply_default_config_without_warming`); after `initial_fetch_timeout` the deny-all default applies:
    fail-closed. The same filters, in the same order, on every gateway."""
    return [
        hcm.HttpFilter(
            name=name,
            config_discovery=config_source_pb2.ExtensionConfigSource(
                config_source=_ads(),
                default_config=packed(deny_all_filter()),
                apply_default_config_without_warming=False,
                type_urls=[RBAC_URL],
            ),
        )
        for name in bucket_names()
    ]


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def _true() -> BoolValue:
    return BoolValue(value=True)
