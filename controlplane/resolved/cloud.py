"""Which cloud identity each backend's requests are sent upstream as: read from the policy, kept pure.

A backend with `aws:` has its requests signed with short-lived credentials of a role; one with `gcp:` has a
Google token of a service account injected. Who may reach the backend is the grants' business (access.py);
*as whom* the request then reaches the cloud is this: changing it changes what a job can do in the cloud as
surely as a new grant does, so `resolved.yaml` shows it (render.py) and `controlplane diff` reports it (diff.py).

A binding's `aws_role_arn` replaces the backend's role for that binding's requests: listed per backend under
the bindings that grant a role there (on an AWS backend only: elsewhere validate refuses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from controlplane.model.policy import AwsSigning, Backend, GcpCredentials, Policy, binding_aws_backends

AWS = "aws"
GCP = "gcp"


class CloudIdentity(NamedTuple):
    """A backend's cloud identity: the provider, who requests are sent as, and every setting of its block."""

    provider: str  # AWS or GCP
    identity: str  # the role ARN, or the service account email
    settings: tuple[tuple[str, str], ...]  # (key as the policy spells it, value), in the block's key order
    roles: tuple[tuple[str, str], ...]  # (binding, role ARN) of bindings signing as a role of their own, by binding
    # Where its requests (carrying the credential: a SigV4 signature with its session token, a Bearer token) go:
    # another address receives the credential, as much a change as another role. Compared by diff, not rendered.
    destination: str = ""


def identities(policy: Policy) -> dict[str, CloudIdentity]:
    """Per backend with an `aws:` or `gcp:` block, by name; backends without one are absent."""
    overrides = _binding_roles(policy)
    out: dict[str, CloudIdentity] = {}
    for backend in policy.backends:
        identity = identity_of(backend, overrides.get(backend.name, {}))
        if identity is not None:
            out[backend.name] = identity
    return out


def identity_of(backend: Backend, roles: Mapping[str, str]) -> CloudIdentity | None:
    """`roles`: binding -> its own role ARN, for the bindings granting on this backend (AWS only)."""
    if backend.aws is not None:
        roles_of = tuple(sorted(roles.items()))
        return CloudIdentity(AWS, backend.aws.role_arn, _aws_settings(backend.aws), roles_of, destination(backend))
    if backend.gcp is not None:
        return CloudIdentity(GCP, backend.gcp.service_account, _gcp_settings(backend.gcp), (), destination(backend))
    return None


def destination(backend: Backend) -> str:
    """`127.0.0.1:9000, service ns/name:http (TLS to sni, CA file)`, or `(plain text)`."""
    places = [f"{e.address}:{e.port}" for e in backend.endpoints]
    places += [f"service {s.namespace}/{s.name}:{s.port}" for s in backend.services]
    tls = f" (TLS to {backend.tls.sni}, CA {backend.tls.ca_file})" if backend.tls is not None else " (plain text)"
    return ", ".join(places) + tls


def _aws_settings(aws: AwsSigning) -> tuple[tuple[str, str], ...]:
    settings = [("service", aws.service), ("region", aws.region), ("role_arn", aws.role_arn), ("source", aws.source)]
    if aws.session_name is not None:
        settings.append(("session_name", aws.session_name))
    return tuple(settings)


def _gcp_settings(gcp: GcpCredentials) -> tuple[tuple[str, str], ...]:
    settings = [
        ("workload_identity_provider", gcp.workload_identity_provider),
        ("service_account", gcp.service_account),
    ]
    if gcp.scopes:
        settings.append(("scopes", " ".join(gcp.scopes)))
    if gcp.id_token_audience is not None:
        settings.append(("id_token_audience", gcp.id_token_audience))
    settings.append(("lifetime", f"{gcp.lifetime_s}s"))
    return tuple(settings)


def _binding_roles(policy: Policy) -> dict[str, dict[str, str]]:
    """Backend -> binding -> role ARN, for bindings with `aws_role_arn` granting a role on an AWS backend."""
    out: dict[str, dict[str, str]] = {}
    if not any(b.aws is not None for b in policy.backends):
        return out  # the common case costs one pass over the backends (Resolution.update runs this each time)
    for binding, arn, on in binding_aws_backends(policy):
        for backend in on:
            out.setdefault(backend, {})[binding.name] = arn
    return out
