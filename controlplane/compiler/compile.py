"""The compiler entry point: a validated policy in, Envoy resources per gateway group out.

Pure: no I/O, no clock, no randomness. The same policy always yields the same bytes, which is what
makes content-hash versions and golden snapshots work.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_config

from controlplane.compiler import cluster, jwt, listener, route
from controlplane.compiler.claims import ResolvedSubject, Resolver
from controlplane.compiler.memo import CompilerMemo
from controlplane.compiler.names import (
    backend_cluster,
    jwks_cluster,
    listener_name,
    policy_name,
    requirement_name,
    route_config_name,
)
from controlplane.compiler.rbac import GrantSpec
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.policy import Backend, Binding, Gateway, Issuer, Policy, Role
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE

Resources = dict[str, list[tuple[str, bytes]]]


@dataclass(frozen=True)
class CompiledGroup:
    """Everything one gateway group receives, as serialized messages by type URL."""

    group: str
    resources: Mapping[str, Sequence[tuple[str, bytes]]]


@dataclass
class _Grants:
    """Per backend: what each binding grants there, and which issuers' tokens it accepts."""

    by_backend: dict[str, list[GrantSpec]] = field(default_factory=lambda: defaultdict(list))
    issuers_by_backend: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


def compile_policy(policy: Policy, memo: CompilerMemo | None = None) -> dict[str, CompiledGroup]:
    """Raises PolicyInvalid when a subject cannot be resolved (unknown path, missing pin)."""
    memo = memo or CompilerMemo()
    memo.next_generation()
    errors: list[PolicyError] = []
    grants = _collect_grants(policy, memo, errors)
    if errors:
        raise PolicyInvalid(errors)
    return {g.name: _compile_gateway(policy, g, grants, memo) for g in policy.gateways}


def _collect_grants(policy: Policy, memo: CompilerMemo, errors: list[PolicyError]) -> _Grants:
    roles = {r.name: r for r in policy.roles}
    issuers = {i.name: i for i in policy.issuers}
    resolvers = {name: Resolver(issuer) for name, issuer in issuers.items()}
    grants = _Grants()
    for binding in policy.bindings:
        subjects, binding_errors = memo.grants.get(
            (binding, issuers[binding.issuer]), lambda b=binding: _resolve_subjects(b, resolvers[b.issuer])
        )  # type: ignore[misc]
        errors.extend(binding_errors)
        if binding_errors:
            continue
        for role_name in binding.roles:
            role = roles[role_name]
            grant = memo.grants.get((binding, role, subjects), lambda b=binding, r=role, s=subjects: _grant(b, r, s))
            grants.by_backend[role.backend].append(grant)  # type: ignore[arg-type]
            grants.issuers_by_backend[role.backend].add(binding.issuer)
    return grants


def _resolve_subjects(binding: Binding, resolver: Resolver) -> tuple[tuple[ResolvedSubject, ...], tuple[PolicyError, ...]]:
    errors: list[PolicyError] = []
    resolved = [resolver.resolve(s, errors) for s in binding.subjects]
    return tuple(s for s in resolved if s is not None), tuple(errors)


def _grant(binding: Binding, role: Role, subjects: tuple[ResolvedSubject, ...]) -> GrantSpec:
    return GrantSpec(policy_name(binding.name, role.name), binding.mode, role.rules, subjects)


def _compile_gateway(policy: Policy, gateway: Gateway, grants: _Grants, memo: CompilerMemo) -> CompiledGroup:
    backends = [policy.backend(name) for name in sorted(gateway.backends)]
    issuers = _gateway_issuers(policy, backends, grants)
    requirements: dict[str, jwt_config.JwtRequirement] = {}
    vhosts: list[bytes] = []
    for backend in backends:
        accepted = sorted(grants.issuers_by_backend.get(backend.name) or [i.name for i, _ in issuers])
        if accepted:
            requirements[requirement_name(backend.name)] = jwt.requirement(accepted, backend.audience)
        backend_grants = tuple(sorted(grants.by_backend.get(backend.name, ()), key=lambda g: g.policy_name))
        vhosts.append(
            memo.virtual_hosts.get(
                (backend, bool(accepted), *backend_grants),
                lambda b=backend, g=backend_grants, a=bool(accepted): route.virtual_host_bytes(b, g, a),  # type: ignore[misc]
            )
        )
    authentication = jwt.authentication(issuers, requirements)
    resources: Resources = {
        CLUSTER: _clusters(backends, [i for i, _ in issuers], memo),
        ENDPOINT: _endpoints(backends, memo),
        LISTENER: [(listener_name(gateway.name), _serialize(listener.gateway_listener(gateway, authentication)))],
        ROUTE: [(route_config_name(gateway.name), route.route_configuration_bytes(route_config_name(gateway.name), vhosts))],
    }
    return CompiledGroup(gateway.name, resources)


def _gateway_issuers(
    policy: Policy, backends: Sequence[Backend], grants: _Grants
) -> list[tuple[Issuer, list[str]]]:
    """Issuers whose tokens some backend on this gateway accepts, each with those backends' audiences."""
    audiences: dict[str, list[str]] = defaultdict(list)
    for backend in backends:
        for issuer in grants.issuers_by_backend.get(backend.name, ()):
            audiences[issuer].append(backend.audience)
    return [(policy.issuer(name), sorted(set(aud))) for name, aud in sorted(audiences.items())]


def _clusters(backends: Sequence[Backend], issuers: Sequence[Issuer], memo: CompilerMemo) -> list[tuple[str, bytes]]:
    out = [
        (
            backend_cluster(b.name),
            memo.clusters.get((b,), lambda b=b: _serialize(cluster.backend_cluster_config(b))),  # type: ignore[misc]
        )
        for b in backends
    ]
    for issuer in issuers:
        host, port, tls = jwt.jwks_endpoint(issuer)
        out.append((jwks_cluster(issuer.name), _serialize(cluster.jwks_cluster_config(issuer, host, port, tls))))
    return sorted(out)


def _endpoints(backends: Sequence[Backend], memo: CompilerMemo) -> list[tuple[str, bytes]]:
    return [
        (
            backend_cluster(b.name),
            memo.endpoints.get(
                (b,),
                lambda b=b: _serialize(cluster.load_assignment(backend_cluster(b.name), b.endpoints)),  # type: ignore[misc]
            ),
        )
        for b in backends
        if cluster.uses_eds(b)
    ]


def _serialize(message: object) -> bytes:
    return message.SerializeToString(deterministic=True)  # type: ignore[attr-defined, no-any-return]
