"""AWS backends in policy (`aws:`, a binding's `aws_role_arn`) and the fail-closed routes they compile to."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_pb2

from controlplane.compiler.aws import UNAVAILABLE_STATUS
from controlplane.compiler.compile import compile_policy
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import AwsSigning, Policy
from controlplane.snapshots.snapshot import ROUTE

ISSUER = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
GATEWAY = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [a, b]\n"
ROLES = "kind: Role\nname: r\nbackend: a\nrules: [{methods: [GET]}]\n---\nkind: Role\nname: rb\nbackend: b\n"
ARN = "arn:aws:iam::123456789012:role/ci-read"
DEPLOY_ARN = "arn:aws:iam::123456789012:role/path/ci-deploy"
AWS = f"aws:\n  service: s3\n  region: eu-west-1\n  role_arn: {ARN}\n"


def _backend(name: str, extra: str = "") -> str:
    return f"kind: Backend\nname: {name}\nhosts: [{name}.local]\nendpoints: [{{address: 127.0.0.1, port: 1}}]\n" + extra


def _files(aws: str = AWS, binding_extra: str = "", roles: str = "[r]") -> dict[str, str]:
    binding = f"kind: Binding\nname: bd\nissuer: gitlab\nroles: {roles}\nsubjects: [{{project: 42}}]\n"
    return {
        "i.yaml": ISSUER,
        "a.yaml": _backend("a", aws),
        "b.yaml": _backend("b"),
        "r.yaml": ROLES + "rules: [{methods: [GET]}]\n---\n" + GATEWAY,
        "z.yaml": binding + binding_extra,
    }


def _policy(aws: str = AWS, binding_extra: str = "", roles: str = "[r]") -> Policy:
    return parse_policy(_files(aws, binding_extra, roles))


def test_aws_backend_reads_every_key_with_defaults() -> None:
    policy = _policy(binding_extra=f"aws_role_arn: {DEPLOY_ARN}\n")
    assert policy.backend("a").aws == AwsSigning("s3", "eu-west-1", ARN, None, "web_identity")
    assert policy.backend("b").aws is None
    assert policy.bindings[0].aws_role_arn == DEPLOY_ARN
    full = AWS + "  session_name: ci.gate@x\n  source: assume_role\n"
    assert _policy(full).backend("a").aws == AwsSigning("s3", "eu-west-1", ARN, "ci.gate@x", "assume_role")


@pytest.mark.parametrize(
    ("aws", "field", "line", "message"),
    [
        ("aws: {service: s3, region: eu-west-1}\n", "aws.role_arn", 5, "missing required key"),
        (AWS.replace(ARN, "arn:aws:iam::12345:role/x"), "aws.role_arn", 8, "IAM role ARN"),
        (AWS.replace(ARN, "arn:aws:iam::123456789012:user/x"), "aws.role_arn", 8, "IAM role ARN"),
        (AWS.replace("eu-west-1", "Europe"), "aws.region", 7, "AWS region"),
        (AWS.replace("s3", "S 3"), "aws.service", 6, "SigV4 service name"),
        (AWS + "  session_name: 'a b'\n", "aws.session_name", 9, "2 to 64"),
        (AWS + "  source: keys\n", "aws.source", 9, "web_identity"),
        (AWS + "  secret_access_key: abc\n", "aws.secret_access_key", 9, "AWS keys never go in policy files"),
        (AWS + "inject: {secret_env: A}\n", "aws", 5, "not both"),
        ("aws: s3\n", "aws", 5, "expected a mapping"),
    ],
)
def test_aws_errors_name_file_line_and_field(aws: str, field: str, line: int, message: str) -> None:
    with pytest.raises(PolicyInvalid) as raised:
        _policy(aws)
    (error,) = raised.value.errors
    assert (error.file, error.line, error.field) == ("a.yaml", line, field)
    assert message in error.message


def test_binding_role_arn_is_checked_and_must_sign_something() -> None:
    with pytest.raises(PolicyInvalid) as raised:
        _policy(binding_extra="aws_role_arn: arn:aws:iam::1:role/x\n")
    (error,) = raised.value.errors
    assert (error.file, error.line, error.field) == ("z.yaml", 6, "aws_role_arn")
    # on a binding granting only a role of a plain backend, the override would sign nothing
    with pytest.raises(PolicyInvalid) as raised:
        _policy(binding_extra=f"aws_role_arn: {ARN}\n", roles="[rb]")
    (error,) = raised.value.errors
    assert (error.file, error.field) == ("z.yaml", "aws_role_arn")
    assert "no role on an AWS backend" in error.message


def test_aws_backend_routes_answer_503_and_never_reach_the_cluster() -> None:
    """No signing credentials are delivered yet: the routes must not forward (Envoy would send the request
    unsigned with the job's Authorization, docs/envoy-aws-signing.md fact 8)."""
    policy = _policy(AWS + "public_paths: [/healthz]\n")
    ((_, raw),) = compile_policy(policy)["gw"].resources[ROUTE]
    config = route_pb2.RouteConfiguration.FromString(raw)
    hosts = {v.name: v for v in config.virtual_hosts}
    for route in hosts["a"].routes:
        if route.name.endswith("-exchange"):
            continue
        assert route.WhichOneof("action") == "direct_response", route.name
        assert route.direct_response.status == UNAVAILABLE_STATUS
    assert {r.WhichOneof("action") for r in hosts["b"].routes} == {"route"}
