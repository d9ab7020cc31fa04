"""Names shared between compiled resources, logs and headers.

Filter names must be the canonical extension names: `typed_per_filter_config` entries keyed by any
other name are silently ignored by Envoy (docs/envoy-filters.md#filter-names).
"""

from __future__ import annotations

from collections.abc import Sequence

# The bootstrap's static cluster to the control plane: ADS, and the audit log stream ride on it.
XDS_CLUSTER = "xds_cluster"

JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"
# The deny list's RBAC DENY instances (one per revocation bucket) ahead of the main one, each configured by ECDS
# under its own name (the HttpFilter's name is the ECDS resource's). Their decisions land in the same metadata
# namespace as the main RBAC filter's, so a revoked request is logged with the policy `revoked-jobs`.
REVOCATION_BUCKET_PREFIX = "controlplane.revoked_jobs."
REVOKED_POLICY = "revoked-jobs"
# The deny list's configuration of recent revocations (model/credentials.py `revoked_recently`).
REVOKED_RECENTLY_FILTER = REVOCATION_BUCKET_PREFIX + "recent"

# The jwt_authn provider of the credentials the control plane issues in exchange for ID tokens, and the
# cluster gateways send the exchange endpoint to. Both are reserved: an Issuer may not be named like the provider.
CREDENTIAL_PROVIDER = "controlplane"
EXCHANGE_CLUSTER = "controlplane-exchange"
EXCHANGE_CA_SECRET = "controlplane-exchange-ca"  # the CA bundle gateways verify the exchange's certificate with
EXCHANGED_POLICY_PREFIX = "exchanged"

# Where jwt_authn puts what it learned; every issuer writes the same keys, so RBAC principals
# always pin `iss` as well (a claim named project_id from another IdP must never satisfy a GitLab binding).
PAYLOAD_KEY = "jwt_payload"
HEADER_KEY = "jwt_header"

# Identity forwarded to backends, so they know which job calls without ever seeing the token.
IDENTITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("x-ci-project-id", "project_id"),
    ("x-ci-project-path", "project_path"),
    ("x-ci-pipeline-id", "pipeline_id"),
    ("x-ci-job-id", "job_id"),
    ("x-ci-ref", "ref"),
)


def revocation_bucket_filter(index: int) -> str:
    """`controlplane.revoked_jobs.00` .. `.15`: the filter, and its ECDS resource, of one revocation bucket."""
    return f"{REVOCATION_BUCKET_PREFIX}{index:02d}"


def listener_name(gateway: str) -> str:
    return f"gateway-{gateway}"


def route_config_name(gateway: str) -> str:
    return f"gateway-{gateway}"


def backend_cluster(backend: str) -> str:
    return f"backend-{backend}"


def jwks_cluster(issuer: str) -> str:
    return f"jwks-{issuer}"


def provider_name(issuer: str) -> str:
    return issuer


def requirement_name(providers: Sequence[str], audience: str) -> str:
    """Named after what it requires, not after a backend: when a host moves to another backend with the same
    audience, the name stays, so the listener (which holds the requirement) and the routes (which name it),
    updated one after the other, never disagree (a changed name would be a 403 "Wrong requirement_name" for
    the moment in between). Backends requiring the same share one entry."""
    return f"aud={audience} providers={','.join(sorted(set(providers)))}"


def shadow_stat_prefix(backend: str) -> str:
    return f"{backend.replace('-', '_')}_"


def inject_filter(backend: str) -> str:
    """The HCM filter injecting this backend's credential; one per backend (credential_injector has no
    per-route config: docs/envoy-filters.md#switching-a-filter-on-per-route)."""
    return f"inject-{backend}"


def backend_secret(backend: str) -> str:
    """The SDS secret holding this backend's injected credential."""
    return f"backend-{backend}-credential"
