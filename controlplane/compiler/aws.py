"""AWS backends (`aws:` in policy): Envoy signs every allowed request with the role's short-lived credentials, and
the backend fails closed while there are none.

Facts relied on (observed on Envoy 1.40, docs/envoy-aws-signing.md):
- the `aws_request_signing` filter takes credentials only inline in its configuration, so each AWS backend has its
  own signing filter configured by ECDS: a refresh is one small EXTENSION_CONFIG push, no listener or route change,
  no failed request (facts 6, 9);
- the filter is `disabled` on the listener and switched on only on its backend's virtual host by an empty
  per-filter `config`, so no other virtual host names it (as the credential injector, compiler/inject.py);
- without usable credentials it forwards the request unsigned (fact 8): so a backend whose role has no valid
  credential gets routes that answer 503 themselves, and its filter stays off. The compiler has no clock: the run
  time gives it only credentials still valid (and recompiles when one expires).
- the caller's `Authorization` never reaches AWS: jwt_authn removes a verified token (`forward: false`) and the
  signer replaces the header (fact 1); public paths are refused on AWS backends by the loader, so no request is
  signed without a verified job.

`use_unsigned_payload` is on for S3 only: S3 accepts `UNSIGNED-PAYLOAD` and the body then streams, while a hashed
body is buffered whole and answered 413 past Envoy's 1 MiB buffer limit (fact 2); other services want the hash.

The credentials are plain text in the ECDS resource (no SDS type exists for them): delivered only over the mTLS
xDS, redacted in golden snapshots (snapshots/golden.py) and in Envoy's config dump (fact 7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import config_source_pb2, extension_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.aws.v3 import credential_provider_pb2 as aws_credentials
from envoy.extensions.filters.http.aws_request_signing.v3 import aws_request_signing_pb2 as signing
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import string_pb2
from google.protobuf.any_pb2 import Any as AnyProto

from controlplane.compiler.claims import condition_metadata_matcher
from controlplane.compiler.names import IDENTITY_HEADERS
from controlplane.compiler.util import packed, serialized
from controlplane.model.policy import Backend
from controlplane.resolved.aws_roles import RoleChoice

UNAVAILABLE_STATUS = 503
UNAVAILABLE_BODY = "no valid AWS credential for this backend's role: refused rather than sent unsigned\n"
SIGNING_URL = "type.googleapis.com/" + signing.AwsRequestSigning.DESCRIPTOR.full_name
# In the ECDS resource of a role without a valid credential (the listener waits for every ECDS resource it names):
# never used, as the filter is then switched on nowhere.
PLACEHOLDER_KEY_ID = "NO-CREDENTIAL"


@dataclass(frozen=True)
class SigningCredential:
    """Short-lived AWS credentials of one role (STS), as the run time holds them. `repr` hides the secrets."""

    access_key_id: str
    secret_access_key: str
    session_token: str

    def __repr__(self) -> str:
        return f"SigningCredential(access_key_id={self.access_key_id!r}, ...)"


def signing_filter(backend: str) -> str:
    """The HCM filter (and its ECDS resource) signing this backend's requests."""
    return f"aws-sign-{backend}"


def http_filters(backends: Sequence[Backend]) -> list[hcm.HttpFilter]:
    """One disabled ECDS signing filter per AWS backend, in name order: the last filters before the router, as
    everything before the signer is signed and nothing after it may change a header (fact 3)."""
    return [
        hcm.HttpFilter(
            name=signing_filter(b.name),
            disabled=True,
            config_discovery=config_source_pb2.ExtensionConfigSource(config_source=_ads(), type_urls=[SIGNING_URL]),
        )
        for b in sorted(backends, key=lambda b: b.name)
        if b.aws is not None
    ]


def per_filter_config(backend: Backend, signing_on: bool) -> dict[str, rc.FilterConfig]:
    """Switches the backend's signer on for its virtual host when its role has a credential, or when bindings of
    its own roles route there (an empty `config`: `disabled: false` alone is NACKed, fact 10). Envoy decides which
    filters run from the route chosen BEFORE jwt_authn (always the default route: no token is known yet), so a
    binding role's route cannot switch a filter on itself; it overrides the signer's configuration instead (see
    `role_routes`). Without the backend's own credential its default route answers 503, so the placeholder
    configuration signs nothing that is sent."""
    if backend.aws is None or not signing_on:
        return {}
    enabled = rc.FilterConfig()
    enabled.config.SetInParent()
    return {signing_filter(backend.name): enabled}


def per_route_off(backend: Backend) -> dict[str, rc.FilterConfig]:
    """Off again on routes to somewhere other than AWS (the token exchange)."""
    return {signing_filter(backend.name): rc.FilterConfig(disabled=True)} if backend.aws is not None else {}


def role_route_name(backend: str, binding: str, index: int) -> str:
    """`<backend>-role/<binding>/<n>`: the audit trail reads the binding back from it (audit/als.py); neither
    name can hold a '/'."""
    return f"{backend}-role/{binding}/{index}"


def role_routes(
    backend: Backend,
    choices: Sequence[RoleChoice],
    default: rc.Route,
    credentials: Sequence[SigningCredential | None],
) -> list[rc.Route]:
    """Before the default route, one route per (binding role, alternative of its subject), in the choices' order
    (resolved/aws_roles.py): the default route's action, matched on the token's payload in dynamic metadata (the
    route is chosen again after jwt_authn: `clear_route_cache`), signing with the role's credential
    (`credentials[i]` for choice i) by an `AwsRequestSigningPerRoute` (fact 5), which the signer reads from the
    route it finally serves. Without a credential the role's routes answer 503 (fail closed). A choice naming the
    backend's own role keeps the host's signer; it must still come first, so that a job it matches is not signed
    with a later binding's role."""
    if backend.aws is None:
        return []
    routes = []
    for choice, credential in zip(choices, credentials, strict=True):
        own_role = choice.role_arn == backend.aws.role_arn  # the host's signer serves it
        override = None if own_role else _role_signer(backend, choice.binding, credential)  # once per choice
        for index, conditions in enumerate(choice.matches):
            route = rc.Route()
            route.CopyFrom(default)
            route.name = role_route_name(backend.name, choice.binding, index)
            route.match.dynamic_metadata.extend(condition_metadata_matcher(c) for c in conditions)
            if credential is None:
                routes.append(fail_closed(backend, route, False))
                continue
            if override is not None:
                route.typed_per_filter_config[signing_filter(backend.name)].CopyFrom(override)
            routes.append(route)
    return routes


def _role_signer(backend: Backend, binding: str, credential: SigningCredential | None) -> AnyProto | None:
    """The signer's configuration for a binding's own role, as a route's per-filter override (None: no credential,
    its routes answer 503)."""
    if credential is None:
        return None
    per_route = signing.AwsRequestSigningPerRoute(
        aws_request_signing=_signing_config(backend, credential),
        stat_prefix=f"{backend.name}.{binding}.",  # required by Envoy (NACKed empty)
    )
    override = rc.FilterConfig()
    override.config.CopyFrom(packed(per_route))
    return packed(override)


def extension_configs(
    backends: Sequence[Backend], credentials: Mapping[str, SigningCredential]
) -> list[tuple[str, bytes]]:
    """The ECDS resource of each AWS backend's signer, with its role's credential (by role ARN) or a placeholder."""
    out = []
    for backend in backends:
        if backend.aws is None:
            continue
        config = _signing_config(backend, credentials.get(backend.aws.role_arn))
        name = signing_filter(backend.name)
        out.append((name, serialized(extension_pb2.TypedExtensionConfig(name=name, typed_config=packed(config)))))
    return sorted(out)


def _signing_config(backend: Backend, credential: SigningCredential | None) -> signing.AwsRequestSigning:
    assert backend.aws is not None
    return signing.AwsRequestSigning(
        service_name=backend.aws.service,
        region=backend.aws.region,
        host_rewrite=backend.tls.sni if backend.tls is not None else "",
        use_unsigned_payload=backend.aws.service == "s3",
        credential_provider=aws_credentials.AwsCredentialProvider(inline_credential=_inline(credential)),
        # The route configuration sets the x-ci-* identity headers at the router, after this filter: one a job
        # sent would be signed, then replaced, and AWS would refuse the signature. Unsigned, AWS ignores them.
        match_excluded_headers=[string_pb2.StringMatcher(exact=name) for name, _ in IDENTITY_HEADERS],
    )


def _inline(credential: SigningCredential | None) -> aws_credentials.InlineCredentialProvider:
    if credential is None:
        return aws_credentials.InlineCredentialProvider(
            access_key_id=PLACEHOLDER_KEY_ID, secret_access_key=PLACEHOLDER_KEY_ID
        )
    return aws_credentials.InlineCredentialProvider(
        access_key_id=credential.access_key_id,
        secret_access_key=credential.secret_access_key,
        session_token=credential.session_token,
    )


def fail_closed(backend: Backend, route: rc.Route, signing_on: bool) -> rc.Route:
    """`route` unchanged for any other backend or a signing one; for an AWS backend without a valid credential,
    the same match answering 503 directly."""
    if backend.aws is None or signing_on:
        return route
    closed = rc.Route()
    closed.CopyFrom(route)
    closed.ClearField("route")
    closed.direct_response.CopyFrom(
        rc.DirectResponseAction(status=UNAVAILABLE_STATUS, body={"inline_string": UNAVAILABLE_BODY})
    )
    return closed


# S3's CopyObject and UploadPartCopy read the object this header names with the role's credentials: a second
# resource that RBAC, which matches the request's own path, never sees (and the signer signs the header as sent).
COPY_SOURCE_HEADER = "x-amz-copy-source"
COPY_REFUSED_STATUS = 403
COPY_REFUSED_BODY = (
    "S3 copies are refused on this gateway: the copy source (x-amz-copy-source) is an object its path rules "
    "cannot check\n"
)


def refused_routes(backend: Backend) -> list[rc.Route]:
    """Before an S3 backend's other routes: a request naming a copy source answers 403 from Envoy, unsent.

    Without it a job allowed to write one path could copy any object the role can read (another bucket, another
    team's prefix) into it and read it back: the role's power, not the job's grant. Checking the source against
    the job's own read grants would mean matching a URL-encoded header value against path rules; refusing is the
    fence that cannot be got round by an encoding. Copy with a client of your own credentials instead."""
    if backend.aws is None or backend.aws.service != "s3":
        return []
    return [
        rc.Route(
            name=f"{backend.name}-aws-copy-refused",
            match=rc.RouteMatch(prefix="/", headers=[rc.HeaderMatcher(name=COPY_SOURCE_HEADER, present_match=True)]),
            direct_response=rc.DirectResponseAction(
                status=COPY_REFUSED_STATUS, body={"inline_string": COPY_REFUSED_BODY}
            ),
        )
    ]


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )
