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
from controlplane.model.policy import DEFAULT_AWS_SOURCE, AwsSigning, Policy

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
_service = scalars.matching(_SERVICE_RE, "expected a SigV4 service name such as s3")

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
    aws_backends = {b.name for b in policy.backends if b.aws is not None}
    role_backend = {r.name: r.backend for r in policy.roles}
    return [
        PolicyError.at(
            b.source,
            "aws_role_arn",
            f"binding {b.name} grants no role on an AWS backend (a backend with aws:): the role ARN would sign nothing",
        )
        for b in policy.bindings
        if b.aws_role_arn is not None and not any(role_backend.get(r) in aws_backends for r in b.roles)
    ]


def role_source_errors(policy: Policy) -> list[PolicyError]:
    """One AWS role ARN is obtained one way: the run time keeps one refresher per ARN, set up as the first backend
    naming it (by name) says, else as the first binding's (by name) AWS backend (runtime/aws_signing.py `roles_of`).
    Two ways for one ARN would let one backend's `source` or `session_name` silently replace another's: a backend
    named to sort first could make another team's role unobtainable (503 there) or change the session name
    CloudTrail records. So every declaration that differs from the first is an error naming it."""
    first: dict[str, tuple[tuple[str, str | None], str]] = {}
    errors: list[PolicyError] = []

    def declare(arn: str, how: AwsSigning, who: str, at: Source, field: str) -> None:
        way = (how.source, how.session_name)
        seen_way, seen_who = first.setdefault(arn, (way, who))
        if seen_way != way:
            errors.append(
                PolicyError.at(
                    at,
                    field,
                    f"{who} obtains AWS role {arn} with {_way(way)}, but {seen_who} obtains it with {_way(seen_way)}: "
                    "a role is obtained one way (the first by name), so give both the same source and session_name",
                )
            )

    backends = sorted(policy.backends, key=lambda b: b.name)
    for backend in backends:
        if backend.aws is not None:
            declare(backend.aws.role_arn, backend.aws, f"backend {backend.name}", backend.source, "aws.role_arn")
    role_backend = {r.name: r.backend for r in policy.roles}
    for binding in sorted(policy.bindings, key=lambda b: b.name):
        if binding.aws_role_arn is None:
            continue
        on = {role_backend.get(r) for r in binding.roles}
        via = next((b for b in backends if b.name in on and b.aws is not None), None)
        if via is not None and via.aws is not None:
            who = f"binding {binding.name} (as its backend {via.name})"
            declare(binding.aws_role_arn, via.aws, who, binding.source, "aws_role_arn")
    return errors


def _way(way: tuple[str, str | None]) -> str:
    return f"source {way[0]} and session_name {way[1] or '(the default)'}"
