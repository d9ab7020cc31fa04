"""The compiler entry point: a validated policy in, Envoy resources per gateway group out.

Pure: no I/O, no clock, no randomness. The same policy always yields the same bytes, which is what
makes content-hash versions and golden snapshots work.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from controlplane.compiler import cluster, jwt, listener, route
from controlplane.compiler.grants import GrantIndex
from controlplane.compiler.memo import CompilerMemo
from controlplane.compiler.names import (
    backend_cluster,
    jwks_cluster,
    listener_name,
    requirement_name,
    route_config_name,
)
from controlplane.compiler.rbac import GrantSpec
from controlplane.compiler.util import serialized
from controlplane.model.errors import PolicyInvalid
from controlplane.model.policy import Backend, Gateway, Issuer, JwksMode, Policy
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

Resources = dict[str, list[tuple[str, bytes]]]


@dataclass(frozen=True)
class CompiledGroup:
    """Everything one gateway group receives, as serialized messages by type URL."""

    group: str
    resources: Mapping[str, Sequence[tuple[str, bytes]]]


def compile_policy(
    policy: Policy,
    memo: CompilerMemo | None = None,
    keys: Mapping[str, str] | None = None,
    pins: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, CompiledGroup]:
    """Raises PolicyInvalid when a subject cannot be resolved (unknown path, re-used path, missing pin).

    With a memo from the previous compile, unchanged parts are reused; the result is identical.
    `keys` maps issuer names to the JWKS (canonical JSON) the control plane relays for them; a relayed
    issuer without keys gets a placeholder no token verifies against (fail closed). `pins` are the ids
    project paths resolved to before (issuer → path → id). Warnings (access GitLab withdrew, stale paths)
    and the pins of this compile are then in `memo.grant_index`.
    """
    memo = memo or CompilerMemo()
    memo.next_generation()
    with _no_cyclic_gc():
        errors = memo.grant_index.update(policy, pins)
        if errors:
            memo.grant_index = GrantIndex()  # a failed update leaves no half-applied state behind
            raise PolicyInvalid(errors)
        return {g.name: _compile_gateway(policy, g, memo.grant_index, memo, keys or {}) for g in policy.gateways}


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """A compile allocates many small acyclic objects; collector passes over a big policy only cost time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class _BackendParts:
    """Everything one backend contributes to a gateway's resources, serialized."""

    requirement: bytes | None
    virtual_host: bytes
    cluster: bytes
    endpoints: bytes | None


def _compile_gateway(
    policy: Policy, gateway: Gateway, grants: GrantIndex, memo: CompilerMemo, keys: Mapping[str, str]
) -> CompiledGroup:
    by_name = {b.name: b for b in policy.backends}
    backends = [by_name[name] for name in sorted(gateway.backends)]
    issuers = _gateway_issuers(policy, backends, grants)
    every_issuer = tuple(i.name for i, _ in issuers)
    parts = []
    for backend in backends:
        backend_grants = grants.grants(backend.name)
        accepted = grants.issuers(backend.name) or every_issuer
        parts.append(
            memo.backends.get(
                (backend, backend_grants, accepted),
                lambda b=backend, g=backend_grants, a=accepted: _backend_parts(b, g, a),  # type: ignore[misc]
            )
        )
    requirements = [(requirement_name(b.name), p.requirement) for b, p in zip(backends, parts, strict=True)]
    authentication = jwt.authentication_bytes(issuers, [(n, r) for n, r in requirements if r is not None], keys)
    route_name = route_config_name(gateway.name)
    resources: Resources = {
        CLUSTER: sorted(
            [(backend_cluster(b.name), p.cluster) for b, p in zip(backends, parts, strict=True)]
            + [_jwks_cluster(i) for i, _ in issuers if i.jwks_mode is JwksMode.REMOTE]
        ),
        ENDPOINT: [
            (backend_cluster(b.name), p.endpoints)
            for b, p in zip(backends, parts, strict=True)
            if p.endpoints is not None
        ],
        LISTENER: [(listener_name(gateway.name), serialized(listener.gateway_listener(gateway, authentication)))],
        ROUTE: [(route_name, route.route_configuration_bytes(route_name, [p.virtual_host for p in parts]))],
    }
    return CompiledGroup(gateway.name, resources)


def _backend_parts(backend: Backend, grants: tuple[GrantSpec, ...], issuers: tuple[str, ...]) -> _BackendParts:
    requirement = serialized(jwt.requirement(issuers, backend.audience)) if issuers else None
    return _BackendParts(
        requirement=requirement,
        virtual_host=route.virtual_host_bytes(backend, grants, authenticated=bool(issuers)),
        cluster=serialized(cluster.backend_cluster_config(backend)),
        endpoints=_load_assignment(backend),
    )


def _jwks_cluster(issuer: Issuer) -> tuple[str, bytes]:
    """Only REMOTE issuers need one: relayed keys are inline, so Envoy needs no route to the issuer."""
    host, port, tls = jwt.jwks_endpoint(issuer)
    return jwks_cluster(issuer.name), serialized(cluster.jwks_cluster_config(issuer, host, port, tls))


def _gateway_issuers(policy: Policy, backends: Sequence[Backend], grants: GrantIndex) -> list[tuple[Issuer, list[str]]]:
    """Issuers whose tokens some backend on this gateway accepts, each with those backends' audiences."""
    audiences: dict[str, list[str]] = defaultdict(list)
    for backend in backends:
        for issuer in grants.issuers(backend.name):
            audiences[issuer].append(backend.audience)
    return [(policy.issuer(name), sorted(set(aud))) for name, aud in sorted(audiences.items())]


def _load_assignment(backend: Backend) -> bytes | None:
    if not cluster.uses_eds(backend):
        return None
    return serialized(cluster.load_assignment(backend_cluster(backend.name), backend.endpoints))
