"""The typed, validated policy: what the loader produces and the compiler consumes.

Everything is frozen and ordered so the compiler can be a pure function of it: the same policy
always compiles to the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from controlplane.model.errors import Source
from controlplane.model.inventory import Inventory


class Named(Protocol):
    """Every kind of policy element: its name is unique within its kind, and what other elements refer to."""

    @property
    def name(self) -> str: ...


class IssuerKind(StrEnum):
    GITLAB = "gitlab"
    OIDC = "oidc"


class JwksMode(StrEnum):
    RELAY = "relay"  # the control plane fetches the keys and pushes them inline over xDS (default)
    REMOTE = "remote"  # every Envoy fetches the JWKS itself through a cluster


class Mode(StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"


# The defaults of optional policy keys, each written once: the dataclass fields below and the kinds that read
# the YAML (model/kinds) both name these, so a policy that omits a key and one that spells the default agree.
DEFAULT_RECONCILE_SECONDS = 300
DEFAULT_REQUESTS_PER_SECOND = 10.0
DEFAULT_JWKS_MODE = JwksMode.RELAY
DEFAULT_INJECTION_HEADER = "Authorization"
DEFAULT_INJECTION_PREFIX = ""
DEFAULT_BACKEND_CREDENTIALS = "any"
# Which finished jobs a backend accepting raw ID tokens keeps denied (docs/revocation-coverage.md): "finished-jobs"
# every finished job (a token first used after its job ended is refused at once); "seen-jobs" only jobs whose
# tokens a gateway has seen or that hold credentials (a token first used after its job ended passes until its
# access-log record reaches the control plane, then the job is denied fleet-wide).
DEFAULT_BACKEND_REVOKE = "finished-jobs"
DEFAULT_CREDENTIAL_TTL_SECONDS = 900
# How the control plane obtains an AWS role's credentials (controlplane/cloud/aws.py): "web_identity" is STS
# AssumeRoleWithWebIdentity with a token it signs as an OIDC issuer (no AWS key anywhere); "assume_role" is STS
# AssumeRole from AWS keys the control plane itself holds (environment or file, never policy).
DEFAULT_AWS_SOURCE = "web_identity"


@dataclass(frozen=True)
class GitLabApi:
    """How the control plane watches a GitLab instance. The token is never in the policy: only where to find it."""

    url: str  # API base (scheme://host[:port]); default: the issuer url
    token_env: str | None = None  # environment variable holding a read_api token
    token_file: str | None = None  # or a file holding it
    groups: tuple[str, ...] = ()  # top-level groups (paths) watched beyond the ones the policy names
    reconcile_seconds: int = DEFAULT_RECONCILE_SECONDS  # full re-sync period; catches what webhooks never report
    max_staleness_seconds: int | None = None  # past this, inventory-dependent bindings are withdrawn
    requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND  # bound on API request rate


@dataclass(frozen=True)
class Issuer:
    """A trusted token issuer. `url` must equal the tokens' `iss` exactly."""

    name: str
    kind: IssuerKind
    url: str
    jwks_uri: str
    clock_skew_seconds: int
    jwks_cache_seconds: int
    source: Source
    # GitLab only: where project and group paths resolve to ids when GitLab is not watched live.
    inventory: Inventory | None = None
    jwks_mode: JwksMode = DEFAULT_JWKS_MODE
    # GitLab only: watch this instance through its API (projects, branches, protections, environments).
    api: GitLabApi | None = None


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int


@dataclass(frozen=True, order=True)
class ServiceRef:
    """A Kubernetes Service whose ready EndpointSlice endpoints are the backend's addresses (discovered at run time,
    see docs/kubernetes-endpoints.md). `port` is the Service port's name, or a port number: slices of one Service
    may map a name to different numbers, so it is resolved per slice."""

    namespace: str
    name: str
    port: str | int

    @property
    def key(self) -> str:
        """`namespace/name`, as policy spells it and as metrics and status label it."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class UpstreamTLS:
    sni: str
    ca_file: str


@dataclass(frozen=True)
class Injection:
    """A secret Envoy puts in a header of every request to the backend, replacing what the job sent.

    Only where the secret lives is in the policy (policy files are widely read and kept in git history);
    the control plane reads the value at run time and delivers it to Envoy over SDS. Exactly one of
    `secret_env` and `secret_file` is set.
    """

    header: str = DEFAULT_INJECTION_HEADER
    prefix: str = DEFAULT_INJECTION_PREFIX  # prepended to the secret, e.g. "Bearer "
    secret_env: str | None = None
    secret_file: str | None = None


@dataclass(frozen=True)
class AwsSigning:
    """Requests to the backend are signed with AWS SigV4 by Envoy, with short-lived credentials of `role_arn` that
    the control plane obtains and refreshes (docs/envoy-aws-signing.md). The job never holds an AWS key; its own
    `Authorization` never reaches AWS. No secret is in the policy: only which role to assume."""

    service: str  # the SigV4 service name, e.g. "s3", "sts", "execute-api"
    region: str  # e.g. "eu-west-1"
    role_arn: str  # the role assumed for every binding that names no role of its own (Binding.aws_role_arn)
    session_name: str | None = None  # STS RoleSessionName; default: derived by the control plane
    source: str = DEFAULT_AWS_SOURCE


@dataclass(frozen=True)
class GcpCredentials:
    """A backend's `gcp:` block: the control plane obtains a Google credential for the service account (workload
    identity federation, then impersonation) and injects it as `Authorization: Bearer`. An `id_token_audience`
    asks for an ID token (Cloud Run style) instead of an OAuth access token for `scopes`. No secret here: only
    which identity; the token exists at run time only (controlplane/cloud/gcp.py)."""

    workload_identity_provider: str  # projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/ID
    service_account: str
    scopes: tuple[str, ...] = ()
    id_token_audience: str | None = None
    lifetime_s: int = 3600


@dataclass(frozen=True)
class Backend:
    """A protected upstream, fronted by one or more gateways."""

    name: str
    hosts: tuple[str, ...]
    audience: str
    endpoints: tuple[Endpoint, ...]
    tls: UpstreamTLS | None
    connect_timeout_ms: int
    request_timeout_ms: int
    public_paths: tuple[str, ...]
    source: Source
    # "any": GitLab ID tokens (per bindings) or exchanged credentials; "exchanged": only credentials the
    # control plane issued (raw ID tokens are refused, so access ends with the job, not with the token).
    credentials: str = DEFAULT_BACKEND_CREDENTIALS
    # A credential of the backend's own, injected upstream by Envoy: the backend never sees the job's token.
    inject: Injection | None = None
    # With raw ID tokens accepted: which finished jobs must be denied for it (DEFAULT_BACKEND_REVOKE).
    revoke: str = DEFAULT_BACKEND_REVOKE
    # Kubernetes Services whose ready endpoints the backend is served by. In policy as read `endpoints` is then
    # empty; the run time puts the discovered addresses there (runtime/policy_service.py `_with_live_inputs`).
    services: tuple[ServiceRef, ...] = ()
    # AWS SigV4 signing with a role's short-lived credentials (exclusive with `inject`).
    aws: AwsSigning | None = None
    # A Google Cloud identity whose token the run time obtains and injects (`inject` is then Authorization: Bearer,
    # with no secret_env or secret_file: the value comes from the refresher, never from a file).
    gcp: GcpCredentials | None = None

    @property
    def covers_unseen_jobs(self) -> bool:
        """Whether every finished job that could reach it must be denied, seen at a gateway or not: it accepts raw
        ID tokens (which Envoy alone judges) and did not opt out with `revoke: seen-jobs`."""
        return self.credentials != "exchanged" and self.revoke != "seen-jobs"


@dataclass(frozen=True)
class RoleRule:
    """Methods AND paths; an empty tuple means any. Paths are exact, or globs (`*` one segment, `/**` any depth)."""

    methods: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Role:
    """What may be done on one backend: any of its rules."""

    name: str
    backend: str
    rules: tuple[RoleRule, ...]
    source: Source


@dataclass(frozen=True)
class ClaimMatch:
    """The claim equals one of `values` (OR). A value with `*` or `?` is a glob where `*` never crosses `/`.

    Values are already strings: policy may write `true` or `42`, tokens carry `"true"` and `"42"`.
    """

    claim: str
    values: tuple[str, ...]
    source: Source


ProjectRef = int | str  # an id, or a full path resolved through the issuer's inventory
GroupRef = int | str


@dataclass(frozen=True)
class Subject:
    """An AND of conditions on one token. GitLab subjects pin projects or groups (never both empty)."""

    projects: tuple[ProjectRef, ...]
    groups: tuple[GroupRef, ...]
    include_subgroups: bool
    claims: tuple[ClaimMatch, ...]
    source: Source


@dataclass(frozen=True)
class Binding:
    """Who (any of `subjects`) gets which roles, through tokens of one issuer."""

    name: str
    issuer: str
    roles: tuple[str, ...]
    subjects: tuple[Subject, ...]
    mode: Mode
    source: Source
    # The longest life of a credential exchanged under this binding (capped by the subject token's own).
    credential_ttl_seconds: int = DEFAULT_CREDENTIAL_TTL_SECONDS
    # On AWS backends, the role whose credentials sign this binding's requests instead of the backend's own
    # (e.g. a read-only role for merge-request pipelines, a deploy role for protected main).
    aws_role_arn: str | None = None


@dataclass(frozen=True)
class Gateway:
    """A group of Envoys, matched by `node.cluster == name`."""

    name: str
    address: str
    port: int
    backends: tuple[str, ...]
    access_log_path: str
    source: Source


@dataclass(frozen=True)
class Policy:
    """The whole validated policy tree; every cross reference has been checked by the loader."""

    issuers: tuple[Issuer, ...] = ()
    backends: tuple[Backend, ...] = ()
    roles: tuple[Role, ...] = ()
    bindings: tuple[Binding, ...] = ()
    gateways: tuple[Gateway, ...] = ()
    files: tuple[str, ...] = field(default=())

    def issuer(self, name: str) -> Issuer:
        return next(i for i in self.issuers if i.name == name)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)


def binding_aws_backends(policy: Policy) -> list[tuple[Binding, str, tuple[str, ...]]]:
    """Each binding with its own `aws_role_arn` (in the policy's order), that ARN, and the AWS backends its roles
    grant on (by name, sorted; none: the ARN would sign nothing). The one reading of "where a binding's role signs" that
    validation, `resolved.yaml` (resolved/cloud.py), the runtime's role refreshers and the audit trail share."""
    aws_backends = {b.name for b in policy.backends if b.aws is not None}
    role_backend = {r.name: r.backend for r in policy.roles}
    return [
        (b, b.aws_role_arn, tuple(sorted({role_backend[r] for r in b.roles if role_backend.get(r) in aws_backends})))
        for b in policy.bindings
        if b.aws_role_arn is not None
    ]
