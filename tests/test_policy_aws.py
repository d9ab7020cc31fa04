"""AWS backends in policy (`aws:`, a binding's `aws_role_arn`) and the fail-closed routes they compile to."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.aws_request_signing.v3 import aws_request_signing_pb2 as signing_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from controlplane.compiler.aws import PLACEHOLDER_KEY_ID, UNAVAILABLE_STATUS, SigningCredential, signing_filter
from controlplane.compiler.compile import compile_policy
from controlplane.model.credentials import CredentialInputs
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy, policy_warnings
from controlplane.model.policy import AwsSigning, Policy
from controlplane.snapshots import golden
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, LISTENER, ROUTE, build_snapshots

ISSUER = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n"
GATEWAY = "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [a, b]\n"
ROLES = "kind: Role\nname: r\nbackend: a\nrules: [{methods: [GET]}]\n---\nkind: Role\nname: rb\nbackend: b\n"
ARN = "arn:aws:iam::123456789012:role/ci-read"
DEPLOY_ARN = "arn:aws:iam::123456789012:role/path/ci-deploy"
CREDENTIAL = SigningCredential("ASIAEXAMPLEKEYID", "secret/EXAMPLE/value", "session-token-EXAMPLE")
JWKS = '{"keys": []}'
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
    assert policy_warnings(policy) == []  # compiled (tests/test_aws_binding_roles.py): nothing to warn about
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
        # through the gateway a job would carry role credentials or access keys away (docs/cloud-attacks3.md)
        (AWS.replace("service: s3", "service: sts"), "aws.service", 6, "cannot be a backend: STS hands out"),
        (AWS.replace("service: s3", "service: iam"), "aws.service", 6, "cannot be a backend: IAM hands out"),
        (AWS + "  session_name: 'a b'\n", "aws.session_name", 9, "2 to 64"),
        (AWS + "  source: keys\n", "aws.source", 9, "web_identity"),
        (AWS + "  secret_access_key: abc\n", "aws.secret_access_key", 9, "AWS keys never go in policy files"),
        (AWS + "inject: {secret_env: A}\n", "aws", 5, "not both"),
        ("aws: s3\n", "aws", 5, "expected a mapping"),
        (AWS + "public_paths: [/healthz]\n", "public_paths", 9, "lend the role to anyone"),
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


def _compiled(credentials: dict[str, SigningCredential] | None = None) -> dict[str, list[tuple[str, bytes]]]:
    exchange = CredentialInputs(jwks=JWKS, issuer="https://cp.example", exchange_address=("127.0.0.1", 9443))
    group = compile_policy(_policy(), credentials=exchange, aws_credentials=credentials)["gw"]
    return {t: list(r) for t, r in group.resources.items()}


def _hosts(resources: dict[str, list[tuple[str, bytes]]]) -> dict[str, route_components_pb2.VirtualHost]:
    ((_, raw),) = resources[ROUTE]
    return {v.name: v for v in route_pb2.RouteConfiguration.FromString(raw).virtual_hosts}


def test_without_a_credential_the_routes_answer_503_and_the_signer_stays_off() -> None:
    """Envoy would send the request unsigned with the job's Authorization (docs/envoy-aws-signing.md fact 8)."""
    resources = _compiled()
    hosts = _hosts(resources)
    for route in hosts["a"].routes:
        if route.name.endswith("-exchange"):
            assert route.WhichOneof("action") == "route"
            continue
        assert route.WhichOneof("action") == "direct_response", route.name
        if route.name.endswith("-aws-copy-refused"):  # S3 copies: refused whether or not there is a credential
            continue
        assert route.direct_response.status == UNAVAILABLE_STATUS
    assert signing_filter("a") not in hosts["a"].typed_per_filter_config
    assert {r.WhichOneof("action") for r in hosts["b"].routes} == {"route"}
    # the listener still names the filter's ECDS resource, which carries no usable credential
    config = _signing_config(resources)
    assert config.credential_provider.inline_credential.access_key_id == PLACEHOLDER_KEY_ID


def test_with_a_credential_the_backend_host_signs_and_the_exchange_does_not() -> None:
    resources = _compiled({ARN: CREDENTIAL})
    hosts = _hosts(resources)
    assert {r.WhichOneof("action") for r in hosts["a"].routes if not r.name.endswith("-copy-refused")} == {"route"}
    switch = route_components_pb2.FilterConfig()
    hosts["a"].typed_per_filter_config[signing_filter("a")].Unpack(switch)
    assert not switch.disabled and switch.HasField("config")
    (exchange,) = [r for r in hosts["a"].routes if r.name.endswith("-exchange")]
    off = route_components_pb2.FilterConfig()
    exchange.typed_per_filter_config[signing_filter("a")].Unpack(off)
    assert off.disabled
    assert signing_filter("a") not in hosts["b"].typed_per_filter_config
    config = _signing_config(resources)
    assert (config.service_name, config.region, config.use_unsigned_payload) == ("s3", "eu-west-1", True)
    inline = config.credential_provider.inline_credential
    assert (inline.access_key_id, inline.secret_access_key, inline.session_token) == (
        CREDENTIAL.access_key_id,
        CREDENTIAL.secret_access_key,
        CREDENTIAL.session_token,
    )
    ((_, raw),) = resources[LISTENER]
    names = [f.name for f in _manager(raw).http_filters]
    assert names.index(signing_filter("a")) == len(names) - 2  # last before the router
    assert next(f for f in _manager(raw).http_filters if f.name == signing_filter("a")).disabled


def test_golden_snapshots_redact_the_secret_and_session_token() -> None:
    snapshot = build_snapshots({"gw": _compiled({ARN: CREDENTIAL})})["gw"]
    text = "".join(golden.render(snapshot).values())
    assert CREDENTIAL.secret_access_key not in text and CREDENTIAL.session_token not in text
    assert CREDENTIAL.access_key_id in text and "REDACTED" in text
    assert CREDENTIAL.secret_access_key not in repr(CREDENTIAL)


def _signing_config(resources: dict[str, list[tuple[str, bytes]]]) -> signing_pb2.AwsRequestSigning:
    (raw,) = [data for name, data in resources[EXTENSION_CONFIG] if name == signing_filter("a")]
    config = signing_pb2.AwsRequestSigning()
    extension_pb2.TypedExtensionConfig.FromString(raw).typed_config.Unpack(config)
    return config


def _manager(raw: bytes) -> hcm.HttpConnectionManager:
    manager = hcm.HttpConnectionManager()
    listener_pb2.Listener.FromString(raw).filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager
