"""Upstream credential injection: the backend gets a credential of its own, never the job's token.

Each injecting backend has a credential_injector filter in the HCM, disabled by default and switched on
only in that backend's virtual host. The filter names an SDS secret delivered over ADS, so a changed secret
is one Secret push: the listener's bytes never depend on the value (a listener change would drain
connections).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from envoy.config.core.v3 import config_source_pb2
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.credential_injector.v3 import credential_injector_pb2 as injector
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.extensions.http.injected_credentials.generic.v3 import generic_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from controlplane.compiler.names import backend_secret, inject_filter
from controlplane.compiler.util import packed, serialized
from controlplane.model.policy import Backend

GENERIC_CREDENTIAL = "envoy.http.injected_credentials.generic"


def http_filters(backends: Sequence[Backend]) -> list[hcm.HttpFilter]:
    """One disabled filter per injecting backend, in name order (after RBAC, before the router).

    `overwrite`: whatever the job sent in that header is replaced, so the backend never sees the job's value.
    """
    return [
        hcm.HttpFilter(
            name=inject_filter(b.name),
            disabled=True,
            typed_config=packed(
                injector.CredentialInjector(
                    overwrite=True,
                    credential=TypedExtensionConfig(
                        name=GENERIC_CREDENTIAL,
                        typed_config=packed(
                            generic_pb2.Generic(
                                credential=secret_pb2.SdsSecretConfig(name=backend_secret(b.name), sds_config=_ads()),
                                header=b.inject.header,
                            )
                        ),
                    ),
                )
            ),
        )
        for b in sorted(backends, key=lambda b: b.name)
        if b.inject is not None
    ]


def per_filter_config(backend: Backend) -> dict[str, rc.FilterConfig]:
    """Switches the backend's filter on for its virtual host. An empty `config` Any, never `disabled: false`
    alone, which Envoy rejects
    (docs/envoy-filters.md#switching-a-filter-on-per-route)."""
    if backend.inject is None:
        return {}
    enabled = rc.FilterConfig()
    enabled.config.SetInParent()
    return {inject_filter(backend.name): enabled}


def per_route_off(backend: Backend) -> dict[str, rc.FilterConfig]:
    """Switches it off again on routes that leave for somewhere other than the backend (token exchange)."""
    return {inject_filter(backend.name): rc.FilterConfig(disabled=True)} if backend.inject is not None else {}


def secrets(backends: Sequence[Backend], values: Mapping[str, str]) -> list[tuple[str, bytes]]:
    """The Secret of each injecting backend: its prefix and the value read at run time.

    A value that could not be read is delivered empty: Envoy then refuses the request (no credential to
    inject) rather than forwarding it without one, and the listener never waits for a missing secret.
    """
    out = []
    for backend in backends:
        if backend.inject is None:
            continue
        value = values.get(backend.name)
        name = backend_secret(backend.name)
        data = DataSource(inline_string=backend.inject.prefix + value if value else "")
        out.append(
            (name, serialized(secret_pb2.Secret(name=name, generic_secret=secret_pb2.GenericSecret(secret=data))))
        )
    return sorted(out)


def _ads() -> config_source_pb2.ConfigSource:
    """A new message each time: a module-level one would be mutable state shared by every compile."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
