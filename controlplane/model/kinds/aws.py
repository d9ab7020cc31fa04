"""The `aws:` key of a Backend and `aws_role_arn` of a Binding: which AWS role signs requests, never a key.

Checked as AWS documents the names (IAM role ARN, STS RoleSessionName, region, SigV4 service), so a typo is a
policy error with its line, not an STS refusal at run time.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from controlplane.model import scalars
from controlplane.model.errors import PolicyError, Source
from controlplane.model.fields import Conv, Fields, need, record
from controlplane.model.policy import DEFAULT_AWS_SOURCE, AwsSigning, Policy, binding_aws_backends

AWS_KEYS = ("service", "region", "role_arn", "session_name", "source")
AWS_SOURCES = (DEFAULT_AWS_SOURCE, "assume_role")

# arn:<partition>:iam::<12-digit account>:role/<optional path/>name (IAM: name and path of [\w+=,.@-]).
_ROLE_ARN_RE = re.compile(r"^arn:aws(-[a-z]+)*:iam::[0-9]{12}:role/([\w+=,.@-]+/)*[\w+=,.@-]{1,64}\Z")
# STS RoleSessionName: 2 to 64 of [\w+=,.@-].
_SESSION_RE = re.compile(r"^[\w+=,.@-]{2,64}\Z")
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+\Z")
_SERVICE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")

role_arn = scalars.matching(_ROLE_ARN_RE, "expected an IAM role ARN such as arn:aws:iam::123456789012:role/ci-read")
_session_name = scalars.matching(_SESSION_RE, "expected 2 to 64 of letters, digits and +=,.@_-")
_region = scalars.matching(_REGION_RE, "expected an AWS region such as eu-west-1")
# Services whose answers are AWS credentials (STS AssumeRole*, GetSessionToken; IAM CreateAccessKey): through the
# gateway a job would carry keys away, held outside the gateway, its revocation and its audit, for up to 12 hours
# (IAM: for ever). Only the role's IAM policy could stop it; the policy refuses it instead.
_CREDENTIAL_SERVICES = MappingProxyType(
    {
        "sts": "STS hands out role credentials (AssumeRole, GetSessionToken)",
        "iam": "IAM hands out access keys (CreateAccessKey) and changes who may do what",
    }
)


def _not_a_credential_service(service: str) -> str | None:
    why = _CREDENTIAL_SERVICES.get(service)
    if why is None:
        return None
    return (
        f"service {service} cannot be a backend: {why}, which a job would then hold outside the gateway, its "
        "revocation and its audit"
    )


_service = scalars.checked(
    scalars.matching(_SERVICE_RE, "expected a SigV4 service name such as s3"), _not_a_credential_service
)

_NO_KEYS = MappingProxyType(
    {
        key: "AWS keys never go in policy files: the control plane obtains short-lived credentials for role_arn "
        "(source: web_identity), or reads its own keys from its environment (source: assume_role)"
        for key in ("access_key_id", "secret_access_key", "session_token", "aws_access_key_id")
    }
)


def _aws_fields(f: Fields) -> AwsSigning:
    service = f.required("service", _service)
    region = f.required("region", _region)
    arn = f.required("role_arn", role_arn)
    session = f.maybe("session_name", _session_name)
    source = f.optional("source", scalars.enum("source", AWS_SOURCES), DEFAULT_AWS_SOURCE)
    return AwsSigning(
        service=need(service), region=need(region), role_arn=need(arn), session_name=session, source=need(source)
    )


aws_signing: Conv[AwsSigning] = record(_aws_fields, AWS_KEYS, _NO_KEYS)


def binding_role_errors(policy: Policy) -> list[PolicyError]:
    """A binding's `aws_role_arn` overrides the role of AWS backends only: on a binding none of whose roles is on
    an AWS backend it would be silently ignored, so it is an error (at the binding, as the field's line is gone
    once built)."""
    return [
        PolicyError.at(
            b.source,
            "aws_role_arn",
            f"binding {b.name} grants no role on an AWS backend (a backend with aws:): the role ARN would sign nothing",
        )
        for b, _, on in binding_aws_backends(policy)
        if not on
    ]


def shared_role_errors(policy: Policy) -> list[PolicyError]:
    """A role signs for one backend: the control plane asserts the backend to STS (`sub` = `backend:<name>`, or
    AssumeRole's `ExternalId`), which is what the role's trust policy lets in. A role on two backends (as their
    `role_arn`, or as the `aws_role_arn` of a binding granting on another backend) would share one credential,
    so the second would ride on the trust given to the first: a policy author could name another team's role on
    a backend of their own. One backend with several `hosts` covers one role for many names."""
    claims: list[tuple[str, str, Source, str]] = []  # (role ARN, backend, where, field)
    for b in sorted(policy.backends, key=lambda b: b.name):
        if b.aws is not None:
            claims.append((b.aws.role_arn, b.name, b.source, "aws"))
    for binding, arn, on in sorted(binding_aws_backends(policy), key=lambda found: found[0].name):
        claims.extend((arn, backend, binding.source, "aws_role_arn") for backend in on)
    owner: dict[str, str] = {}
    errors = []
    for arn, backend, where, field in claims:
        first = owner.setdefault(arn, backend)
        if first != backend:
            errors.append(
                PolicyError.at(
                    where,
                    field,
                    f"role {arn} already signs for backend {first}, not also for {backend}: a role signs for one "
                    f"backend (its trust policy names the backend, sub backend:{first}); give {backend} a role "
                    "of its own",
                )
            )
    return errors


def wildcard_host_errors(policy: Policy) -> list[PolicyError]:
    """Without `tls:` Envoy signs and sends the Host the job sent (with it, the SNI: compiler/aws.py). Under a
    wildcard host that Host is the job's choice, and S3 reads the bucket from it (virtual-hosted style): a job
    would pick any bucket the role can reach, its path rules then naming keys only (observed through Envoy and
    moto). Each name listed explicitly, or `tls.sni` naming the one endpoint to sign for, keeps it the policy's."""
    return [
        PolicyError.at(
            b.source,
            "hosts",
            f"backend {b.name}: a wildcard host on an aws: backend without tls: would sign the Host each job "
            "sends (with S3, the bucket it names); list the host names, or set tls.sni",
        )
        for b in policy.backends
        if b.aws is not None and b.tls is None and any(h.startswith("*") for h in b.hosts)
    ]
