"""The compiler entry point: a validated policy in, Envoy resources per gateway group out.

Pure: no I/O, no clock, no randomness. The same policy always yields the same bytes, which is what
makes content-hash versions and golden snapshots work.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from controlplane.compiler import aws, cluster, inject, jwt, listener, rbac, revocations, route
from controlplane.compiler.memo import CompilerMemo
from controlplane.compiler.names import (
    CREDENTIAL_PROVIDER,
    EXCHANGE_CA_SECRET,
    EXCHANGE_CLUSTER,
    EXCHANGED_POLICY_PREFIX,
    JWT_FILTER,
    REVOKED_RECENTLY_FILTER,
    backend_cluster,
    jwks_cluster,
    listener_name,
    provider_name,
    requirement_name,
    revocation_bucket_filter,
    route_config_name,
)
from controlplane.compiler.types import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, SECRET
from controlplane.compiler.util import serialized
from controlplane.model.credentials import CredentialInputs
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.policy import Backend, Gateway, Issuer, JwksMode, Policy, Role
from controlplane.resolved.access import NO_ACCESS, Grant, ResolvedPolicy
from controlplane.resolved.aws_roles import RoleChoice, backend_role_choices
from controlplane.resolved.index import Resolution

# Backend.credentials: only the control plane's exchanged credentials are accepted (raw ID tokens refused).
EXCHANGED_ONLY = "exchanged"

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
    credentials: CredentialInputs | None = None,
    secrets: Mapping[str, str] | None = None,
    *,
    resolved: ResolvedPolicy | None = None,
    aws_credentials: Mapping[str, aws.SigningCredential] | None = None,
) -> dict[str, CompiledGroup]:
    """Raises PolicyInvalid when a subject cannot be resolved (unknown path, re-used path, missing pin).

    `resolved`: the policy's resolution (who may do what, see `controlplane.resolved`), when the caller keeps
    a `Resolution` between compiles and hands the same result to the token exchange; None resolves the policy
    afresh, with `pins` (the ids project paths resolved to before, issuer → path → id).
    With a memo from the previous compile, unchanged parts are reused; the result is identical.
    `keys` maps issuer names to the JWKS (canonical JSON) the control plane relays for them; a relayed
    issuer without keys gets a placeholder no token verifies against (fail closed). `credentials` are the
    control plane's own (exchanged credentials, revoked jobs, the exchange endpoint); None: none of them.
    `secrets` are the injected upstream credentials by backend name, read by the control plane; a missing one
    is delivered empty (Envoy refuses the request rather than forward it without the credential).
    `aws_credentials`: valid credentials of AWS roles by role ARN, from the run time; an AWS backend whose role has
    none answers 503 (compiler/aws.py).
    """
    memo = memo or CompilerMemo()
    memo.next_generation()
    credentials = credentials or CredentialInputs()
    check_reserved_names(policy, credentials)
    if resolved is None:
        resolved = Resolution().update(policy, pins)
    shared = _Shared(
        resolved=resolved,
        memo=memo,
        keys=keys or {},
        credentials=credentials,
        # Interned: the memo compares inputs by identity, so equal shapes must be the same object.
        shape=memo.interned(
            _CredentialShape(credentials.issuer if credentials.jwks else None, bool(credentials.exchange_address))
        ),
        roles=_roles_by_backend(policy) if credentials.jwks else {},
        # Encoded once for every gateway (the same bytes everywhere), each bucket only when its ids changed.
        revocations=revocation_resources(credentials, memo),
        secrets=secrets or {},
        aws_credentials=aws_credentials or {},
        aws_roles=_aws_roles(policy, resolved, memo, aws_credentials or {}),
    )
    return {g.name: _compile_gateway(policy, g, shared) for g in policy.gateways}


class _CredentialShape(NamedTuple):
    """What of the credential inputs shapes a backend's own resources: part of its memo key, so revocations
    and key rotations (which do not change it) never recompile a backend."""

    issuer: str | None  # the exchanged credentials' `iss`; None: no credentials provider
    exchange: bool  # the token-exchange route is on every host


@dataclass(frozen=True)
class _Shared:
    """What every gateway of one compile reads."""

    resolved: ResolvedPolicy
    memo: CompilerMemo
    keys: Mapping[str, str]
    credentials: CredentialInputs
    shape: _CredentialShape
    roles: Mapping[str, tuple[Role, ...]]  # by backend; only with a credentials provider
    revocations: tuple[tuple[str, bytes], ...]  # (ECDS resource name, serialized TypedExtensionConfig)
    secrets: Mapping[str, str]  # injected upstream credentials, by backend
    aws_credentials: Mapping[str, aws.SigningCredential]  # valid AWS role credentials, by role ARN
    aws_roles: Mapping[str, _AwsRoles]  # by AWS backend with bindings' own roles


class _AwsRoles(NamedTuple):
    """An AWS backend's binding roles (resolved/aws_roles.py), with what its routes sign with."""

    # Interned: equal choices (and their credentials) must be the same object for the memo. Each choice's
    # credential is in its routes (compiler/aws.py): part of the key, so a refresh recompiles the host.
    choices: tuple[RoleChoice, ...]
    credentials: tuple[aws.SigningCredential | None, ...]  # choice i's valid credential, or None
    issuers: frozenset[str]  # of the choosing bindings: their tokens have the route chosen again (jwt.py)


_NO_AWS_ROLES = _AwsRoles((), (), frozenset())


def _aws_roles(
    policy: Policy, resolved: ResolvedPolicy, memo: CompilerMemo, credentials: Mapping[str, aws.SigningCredential]
) -> dict[str, _AwsRoles]:
    """Once per compile, not once per gateway fronting the backend. Raw ID tokens' grants do not apply on a
    backend accepting exchanged credentials only, so no binding role is chosen there."""
    backends = [b for b in policy.backends if b.aws is not None]
    if not backends:
        return {}
    bindings = {b.name: b for b in policy.bindings}
    out = {}
    for backend in backends:
        grants = () if backend.credentials == EXCHANGED_ONLY else resolved.grants(backend.name)
        choices = backend_role_choices(grants, bindings)
        if choices:
            out[backend.name] = _AwsRoles(
                memo.interned(choices),
                memo.interned(tuple(credentials.get(c.role_arn) for c in choices)),
                frozenset(bindings[c.binding].issuer for c in choices),
            )
    return out


@dataclass(frozen=True)
class _BackendParts:
    """Everything one backend contributes to a gateway's resources, serialized."""

    requirement: tuple[str, bytes] | None  # (name, serialized JwtRequirement)
    virtual_host: bytes
    cluster: bytes
    endpoints: bytes | None


def _compile_gateway(policy: Policy, gateway: Gateway, shared: _Shared) -> CompiledGroup:
    by_name = {b.name: b for b in policy.backends}
    backends = [by_name[name] for name in sorted(gateway.backends)]
    issuers = _gateway_issuers(policy, backends, shared.resolved)
    # Interned: the memo compares inputs by identity, so a backend without grants (it accepts every issuer)
    # stays memoized.
    every_issuer = shared.memo.interned(tuple(i.name for i, _ in issuers))
    resolved = shared.resolved.backends
    parts = []
    rechoose: set[str] = set()  # issuers of bindings choosing an AWS role on a backend of this gateway
    for backend in backends:
        if backend.credentials == EXCHANGED_ONLY:
            # Raw ID tokens are refused here: no issuer of theirs is accepted, no binding's policy applies.
            backend_grants: tuple[Grant, ...] = ()
            accepted: tuple[str, ...] = ()
        else:
            access = resolved.get(backend.name, NO_ACCESS)
            backend_grants = access.grants
            accepted = access.issuers or every_issuer
        roles = shared.roles.get(backend.name, ())
        signing = backend.aws is not None and backend.aws.role_arn in shared.aws_credentials
        # The empty tuple is one object: a backend without binding roles needs no interning.
        choices, choices_signing, choosing = shared.aws_roles.get(backend.name, _NO_AWS_ROLES)
        rechoose.update(choosing)
        parts.append(
            shared.memo.backends.get(
                (backend, backend_grants, accepted, shared.shape, signing, choices, choices_signing, *roles),
                functools.partial(
                    _backend_parts,
                    backend,
                    backend_grants,
                    accepted,
                    shared.shape,
                    roles,
                    shared.memo.rbac,
                    signing,
                    choices,
                    choices_signing,
                ),
            )
        )
    requirements = dict(p.requirement for p in parts if p.requirement is not None)
    # Only the issuers of bindings choosing an AWS role have the route chosen again (a second match per request).
    providers = {
        provider_name(i.name): jwt.provider(i, aud, shared.keys.get(i.name), i.name in rechoose) for i, aud in issuers
    }
    if shared.shape.issuer is not None:
        audiences = [b.audience for b in backends]
        providers[CREDENTIAL_PROVIDER] = jwt.credential_provider(shared.credentials, audiences)
    authentication = jwt.authentication_bytes(providers, list(requirements.items()))
    route_name = route_config_name(gateway.name)
    virtual_hosts = [p.virtual_host for p in parts]
    resources: Resources = {
        CLUSTER: sorted(
            [(backend_cluster(b.name), p.cluster) for b, p in zip(backends, parts, strict=True)]
            + [_jwks_cluster(i) for i, _ in issuers if i.jwks_mode is JwksMode.REMOTE]
            + _exchange_cluster(shared.credentials)
        ),
        ENDPOINT: [
            (backend_cluster(b.name), p.endpoints)
            for b, p in zip(backends, parts, strict=True)
            if p.endpoints is not None
        ],
        LISTENER: [(listener_name(gateway.name), serialized(listener.gateway_listener(gateway, backends)))],
        ROUTE: [(route_name, route.route_configuration_bytes(route_name, virtual_hosts))],
        # jwt_authn's configuration (keys, requirements) and the deny list: changing either changes no listener.
        EXTENSION_CONFIG: sorted(
            [
                (JWT_FILTER, listener.authentication_config_bytes(authentication)),
                *shared.revocations,
                *aws.extension_configs(backends, shared.aws_credentials),
            ]
        ),
        SECRET: sorted(inject.secrets(backends, shared.secrets) + _exchange_ca(shared.credentials)),
    }
    return CompiledGroup(gateway.name, resources)


def revocation_resources(credentials: CredentialInputs, memo: CompilerMemo) -> tuple[tuple[str, bytes], ...]:
    """Every bucket and the recent list, empty ones too: a configuration missing from a snapshot would be removed
    (Delta), and a removed filter configuration falls back to its deny-all default for everyone
    (docs/envoy-ecds.md §2). The same for every gateway group; also used alone to put a revocation into the last
    good snapshots when the policy cannot be compiled (snapshots.build.with_revocations)."""
    lists = [*((revocation_bucket_filter(i), ids) for i, ids in enumerate(credentials.revoked))]
    lists.append((REVOKED_RECENTLY_FILTER, credentials.revoked_recently))
    return tuple((name, memo.revocations.get(name, ids, _encode_bucket)) for name, ids in lists)


def _encode_bucket(name: str, ids: tuple[str, ...]) -> bytes:
    return revocations.bucket_config_bytes(name, ids)


def _backend_parts(
    backend: Backend,
    grants: tuple[Grant, ...],
    issuers: tuple[str, ...],
    shape: _CredentialShape,
    roles: tuple[Role, ...],
    encoder: rbac.RbacEncoder,
    aws_signing: bool = False,
    aws_roles: tuple[RoleChoice, ...] = (),
    aws_roles_credentials: tuple[aws.SigningCredential | None, ...] = (),
) -> _BackendParts:
    providers = [provider_name(i) for i in issuers]
    if shape.issuer is not None:
        providers.append(CREDENTIAL_PROVIDER)
        grants += rbac.exchanged_grants(shape.issuer, roles)
    name = requirement_name(providers, backend.audience) if providers else None
    requirement = (name, serialized(jwt.requirement(providers, backend.audience))) if name is not None else None
    return _BackendParts(
        requirement=requirement,
        virtual_host=serialized(
            route.virtual_host(
                backend,
                encoder.backend_rbac_bytes(backend.name, grants),
                name,
                exchange=shape.exchange,
                aws_signing=aws_signing,
                aws_roles=aws_roles,
                aws_roles_credentials=aws_roles_credentials,
            )
        ),
        cluster=serialized(cluster.backend_cluster_config(backend)),
        endpoints=_load_assignment(backend),
    )


def _roles_by_backend(policy: Policy) -> dict[str, tuple[Role, ...]]:
    by_backend: dict[str, list[Role]] = defaultdict(list)
    for role in sorted(policy.roles, key=lambda r: r.name):
        by_backend[role.backend].append(role)
    return {name: tuple(roles) for name, roles in by_backend.items()}


def check_reserved_names(policy: Policy, credentials: CredentialInputs | None) -> None:
    """Raises PolicyInvalid when, with credentials on, an Issuer is named like their provider, or a Binding like
    the prefix of their RBAC policies: either would silently replace (or be replaced by) the control plane's own
    entries. Checked before anything else of a compile: a caller that resolves the policy first calls this
    before resolving, so such a clash is reported, as ever, even when a subject cannot be resolved too."""
    errors = _reserved_name_errors(policy, credentials or CredentialInputs())
    if errors:
        raise PolicyInvalid(errors)


def _reserved_name_errors(policy: Policy, credentials: CredentialInputs) -> list[PolicyError]:
    if not credentials.jwks:
        return []
    why = "is reserved for the control plane's exchanged credentials; rename it"
    return [
        *(
            PolicyError.at(i.source, "name", f"{i.name!r} {why}")
            for i in policy.issuers
            if i.name == CREDENTIAL_PROVIDER
        ),
        *(
            PolicyError.at(b.source, "name", f"{b.name!r} {why}")
            for b in policy.bindings
            if b.name == EXCHANGED_POLICY_PREFIX
        ),
    ]


def _exchange_cluster(credentials: CredentialInputs) -> list[tuple[str, bytes]]:
    if credentials.exchange_address is None:
        return []
    host, port = credentials.exchange_address
    tls = credentials.exchange_tls
    server_name = tls.server_name if tls is not None else None
    return [(EXCHANGE_CLUSTER, serialized(cluster.exchange_cluster_config(host, port, server_name)))]


def _exchange_ca(credentials: CredentialInputs) -> list[tuple[str, bytes]]:
    """The exchange's CA bundle as an SDS secret: the cluster names it, so a new bundle changes this secret only
    and Envoy applies it to new connections without rebuilding the cluster."""
    if credentials.exchange_address is None or credentials.exchange_tls is None:
        return []
    return [(EXCHANGE_CA_SECRET, serialized(cluster.exchange_ca_secret(credentials.exchange_tls.ca_pem)))]


def _jwks_cluster(issuer: Issuer) -> tuple[str, bytes]:
    """Only REMOTE issuers need one: relayed keys are inline, so Envoy needs no route to the issuer."""
    host, port, tls = jwt.jwks_endpoint(issuer)
    return jwks_cluster(issuer.name), serialized(cluster.jwks_cluster_config(issuer, host, port, tls))


def _gateway_issuers(
    policy: Policy, backends: Sequence[Backend], resolved: ResolvedPolicy
) -> list[tuple[Issuer, list[str]]]:
    """Issuers whose tokens some backend on this gateway accepts, each with those backends' audiences."""
    audiences: dict[str, list[str]] = defaultdict(list)
    for backend in backends:
        if backend.credentials == EXCHANGED_ONLY:
            continue
        for issuer in resolved.backends.get(backend.name, NO_ACCESS).issuers:
            audiences[issuer].append(backend.audience)
    return [(policy.issuer(name), sorted(set(aud))) for name, aud in sorted(audiences.items())]


def _load_assignment(backend: Backend) -> bytes | None:
    if not cluster.uses_eds(backend):
        return None
    return serialized(cluster.load_assignment(backend_cluster(backend.name), backend.endpoints))
