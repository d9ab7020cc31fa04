"""A binding's own AWS role (`aws_role_arn`): the one ordered choice (resolved/aws_roles.py) that the compiler's
routes, `explain`, the run time's refreshers and the audit trail all follow (docs/aws-backends.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import extension_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.aws_request_signing.v3 import aws_request_signing_pb2 as signing_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

from controlplane.audit.als import backend_of_route, cloud_identities, record_from_entry, with_cloud_identity
from controlplane.cli.main import main
from controlplane.compiler.aws import UNAVAILABLE_STATUS, SigningCredential, signing_filter
from controlplane.compiler.compile import compile_policy
from controlplane.compiler.memo import CompilerMemo
from controlplane.compiler.names import JWT_FILTER
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.resolved.aws_roles import chosen_role, overlap_warnings, role_choices
from controlplane.resolved.explain import ExplainInputs, Request, document, explain, text_lines
from controlplane.resolved.index import Resolution
from controlplane.runtime.aws_signing import roles_of
from controlplane.snapshots import golden
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, LISTENER, ROUTE, build_snapshots
from controlplane.xds.fleet_status import truncate_error
from tests.support.als_entries import ALLOWED, entry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
READ = "arn:aws:iam::123456789012:role/ci-artifacts-read"
MR_READ = "arn:aws:iam::123456789012:role/ci-artifacts-mr-read"
DEPLOY = "arn:aws:iam::123456789012:role/ci-artifacts-deploy"
GITLAB = "http://127.0.0.1:8090"
NOW = 1_800_000_000


def example(name: str, **replaced: str) -> Policy:
    files = {p.name: p.read_text() for p in sorted((EXAMPLES / name).glob("*.yaml"))}
    for old, new in replaced.items():
        files["bindings.yaml"] = files["bindings.yaml"].replace(old, new)
    return parse_policy(files)


POLICY = example("aws-binding-roles")


def job(**claims: Any) -> dict[str, Any]:
    base = {"iss": GITLAB, "aud": "https://artifacts.s3.local", "exp": NOW + 600, "project_id": "42"}
    return base | {"ref_type": "branch", "ref": "feature", "ref_protected": "false", "pipeline_source": "push"} | claims


MR = job(pipeline_source="merge_request_event")
MAIN = job(ref="main", ref_protected="true")
TAG = job(ref_type="tag", ref="v1")


def test_choices_are_ordered_by_binding_name_and_the_first_match_signs() -> None:
    resolved = Resolution().update(POLICY)
    (choices,) = role_choices(POLICY, resolved).values()
    assert [(c.binding, c.role_arn) for c in choices] == [
        ("main-deploys-artifacts", DEPLOY),
        ("mr-pipelines-read-artifacts", MR_READ),
    ]  # tags-read-artifacts names no role: it is signed with the backend's
    assert chosen_role(choices, READ, MR) == ("mr-pipelines-read-artifacts", MR_READ)
    assert chosen_role(choices, READ, MAIN) == ("main-deploys-artifacts", DEPLOY)
    assert chosen_role(choices, READ, TAG) == (None, READ)
    # a merge-request pipeline on protected main is not main's deploy job (pipeline_source != merge_request_event)
    assert chosen_role(choices, READ, MAIN | {"pipeline_source": "merge_request_event"})[1] == MR_READ
    assert chosen_role(choices, READ, job(iss="https://elsewhere", pipeline_source="merge_request_event"))[1] == READ


def test_overlapping_bindings_with_different_roles_are_warned_about_at_the_later_one() -> None:
    assert overlap_warnings(POLICY, Resolution().update(POLICY)) == []  # exclusive by pipeline_source
    overlapping = example("aws-binding-roles", **{"    pipeline_source: merge_request_event\n": "    ref: main\n"})
    (warning,) = overlap_warnings(overlapping, Resolution().update(overlapping))
    assert (warning.file, warning.field) == ("bindings.yaml", "aws_role_arn")
    assert (
        "mr-pipelines-read-artifacts" in warning.message
        and "signed with main-deploys-artifacts's role" in warning.message
    )
    same_role = example("aws-binding-roles", **{MR_READ: DEPLOY, "    pipeline_source: merge_request_event\n": ""})
    assert overlap_warnings(same_role, Resolution().update(same_role)) == []  # the same role either way


CREDENTIALS = {
    READ: SigningCredential("ASIAREAD", "read-secret", "read-token"),
    DEPLOY: SigningCredential("ASIADEPLOY", "deploy-secret", "deploy-token"),
}


def compiled(policy: Policy, credentials: dict[str, SigningCredential], memo: CompilerMemo | None = None) -> Any:
    group = compile_policy(policy, memo, aws_credentials=credentials)["ci-gateway"]
    return {t: list(r) for t, r in group.resources.items()}


def routes(resources: Any) -> list[route_components_pb2.Route]:
    ((_, raw),) = resources[ROUTE]
    (host,) = route_pb2.RouteConfiguration.FromString(raw).virtual_hosts
    # an S3 backend's first route refuses copies whatever the role (tests/test_cloud_attacks.py): not one of these
    return [r for r in host.routes if not r.name.endswith("-aws-copy-refused")]


def test_each_binding_role_is_a_route_before_the_default_signing_with_its_credential_or_503_alone() -> None:
    """MR_READ has no credential: its route answers 503, the deploy route and the default still sign."""
    resources = compiled(POLICY, CREDENTIALS)
    deploy, mr, default = routes(resources)
    assert [r.name for r in (deploy, mr, default)] == [
        "artifacts-s3-role/main-deploys-artifacts/0",
        "artifacts-s3-role/mr-pipelines-read-artifacts/0",
        "artifacts-s3-default",
    ]
    signer = signing_filter("artifacts-s3")
    assert deploy.route.cluster == default.route.cluster and not default.match.dynamic_metadata
    assert _route_key(deploy, signer) == "ASIADEPLOY"  # the filter reads it from the route it finally serves
    assert mr.direct_response.status == UNAVAILABLE_STATUS and not mr.typed_per_filter_config
    matchers = {tuple(s.key for s in m.path)[1]: m for m in deploy.match.dynamic_metadata}
    assert all(m.filter == JWT_FILTER for m in matchers.values())
    assert matchers["pipeline_source"].invert and not matchers["ref_protected"].invert
    assert matchers["ref_protected"].value.string_match.exact == "true"
    ((_, raw_listener),) = resources[LISTENER]
    manager = hcm.HttpConnectionManager()
    listener_pb2.Listener.FromString(raw_listener).filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.name for f in manager.http_filters if f.name.startswith("aws-sign-")] == [signer]  # one per backend
    config = signing_pb2.AwsRequestSigning()
    extension_pb2.TypedExtensionConfig.FromString(dict(resources[EXTENSION_CONFIG])[signer]).typed_config.Unpack(config)
    assert config.credential_provider.inline_credential.access_key_id == "ASIAREAD"
    assert _clears_route_cache(resources) == {"gitlab": True}


def _route_key(route: route_components_pb2.Route, signer: str) -> str:
    wrapper = route_components_pb2.FilterConfig()
    route.typed_per_filter_config[signer].Unpack(wrapper)
    per_route = signing_pb2.AwsRequestSigningPerRoute()
    wrapper.config.Unpack(per_route)
    assert per_route.stat_prefix  # Envoy NACKs an empty one
    return str(per_route.aws_request_signing.credential_provider.inline_credential.access_key_id)


def test_the_signer_is_on_for_binding_roles_even_when_the_backend_role_has_no_credential() -> None:
    """Envoy chooses the filters to run from the route chosen before jwt_authn, the default one: the host must
    switch the signer on for the binding roles' routes, while the default route answers 503."""
    resources = compiled(POLICY, {DEPLOY: CREDENTIALS[DEPLOY]})
    ((_, raw),) = resources[ROUTE]
    (host,) = route_pb2.RouteConfiguration.FromString(raw).virtual_hosts
    assert signing_filter("artifacts-s3") in host.typed_per_filter_config
    copy_refused, deploy, mr, default = host.routes
    assert copy_refused.direct_response.status == 403
    assert _route_key(deploy, signing_filter("artifacts-s3")) == "ASIADEPLOY"
    assert mr.direct_response.status == default.direct_response.status == UNAVAILABLE_STATUS


def test_golden_rendering_redacts_a_binding_role_secret_in_routes() -> None:
    group = compile_policy(POLICY, aws_credentials=CREDENTIALS)["ci-gateway"]
    (snapshot,) = build_snapshots({"ci-gateway": group.resources}).values()
    text = "".join(golden.render(snapshot).values())
    assert "ASIADEPLOY" in text and "deploy-secret" not in text and "deploy-token" not in text


def _clears_route_cache(resources: Any) -> dict[str, bool]:
    config = jwt_pb2.JwtAuthentication()
    extension_pb2.TypedExtensionConfig.FromString(dict(resources[EXTENSION_CONFIG])[JWT_FILTER]).typed_config.Unpack(
        config
    )
    return {name: p.clear_route_cache for name, p in config.providers.items()}


def test_without_binding_roles_nothing_changes_no_second_route_match() -> None:
    unbound = {f"aws_role_arn: {DEPLOY}\n": "", f"aws_role_arn: {MR_READ}\n": ""}
    resources = compiled(example("aws-binding-roles", **unbound), CREDENTIALS)
    assert [r.name for r in routes(resources)] == ["artifacts-s3-default"]
    assert (
        "clear_route_cache"
        not in (Path(__file__).parent.parent / "snapshots/quickstart")
        .joinpath("ci-gateway/filter_configs.yaml")
        .read_text()
    )
    assert _clears_route_cache(resources) == {"gitlab": False}


def test_a_memo_changes_nothing_and_a_new_credential_switches_its_routes_on() -> None:
    memo = CompilerMemo()
    assert compiled(POLICY, CREDENTIALS, memo) == compiled(POLICY, CREDENTIALS)
    every = CREDENTIALS | {MR_READ: SigningCredential("ASIAMR", "s", "t")}
    again = compiled(POLICY, every, memo)
    assert again == compiled(POLICY, every)
    assert not any(r.HasField("direct_response") for r in routes(again))


def test_the_refreshers_cover_binding_roles_obtained_like_their_backend() -> None:
    roles = roles_of(POLICY)
    assert sorted(roles) == sorted([READ, MR_READ, DEPLOY])
    assert roles[DEPLOY][1].region == roles[READ][1].region
    assert roles[DEPLOY][1].session_name == "controlplane-artifacts"
    # each obtained for the backend it signs for: the subject asserted to STS (tests/test_cloud_attacks.py)
    assert {backend for backend, _ in roles.values()} == {"artifacts-s3"}


def test_the_audit_record_names_the_role_of_the_route_envoy_took() -> None:
    identities = cloud_identities(POLICY)
    assert identities["artifacts-s3"] == READ

    def identity(route: str, policy: str = "main-deploys-artifacts/artifacts-read") -> str | None:
        rbac = ALLOWED | {"enforced_effective_policy_id": policy}
        built = entry(route=route, cluster="backend-artifacts-s3", rbac=rbac)
        record = record_from_entry(built, gateway="g", node="n")
        assert record.backend == "artifacts-s3" == backend_of_route(route)
        return with_cloud_identity(record, built, identities).cloud_identity

    assert identity("artifacts-s3-role/main-deploys-artifacts/0") == DEPLOY
    assert identity("artifacts-s3-role/mr-pipelines-read-artifacts/3") == MR_READ
    # the route decides, not the allowing policy: RBAC may name another binding the job also matches
    assert identity("artifacts-s3-default", policy="main-deploys-artifacts/artifacts-read") == READ


def test_explain_names_the_role_that_signs_an_allowed_request() -> None:
    inputs = ExplainInputs(POLICY, Resolution().update(POLICY))

    def asked(claims: dict[str, Any], method: str = "GET") -> dict[str, Any]:
        return document(explain(inputs, claims, Request(method, "artifacts.s3.local", "/ci-artifacts/x"), NOW))

    assert asked(MR)["cloud_identity"] == MR_READ
    main = asked(MAIN, "PUT")
    assert main["cloud_identity"] == DEPLOY
    assert any("binding main-deploys-artifacts's AWS role" in line for line in text_lines(main))
    assert asked(TAG)["cloud_identity"] == READ
    assert asked(MR, "PUT")["cloud_identity"] is None  # denied: sent as no one
    gcp = example("gcp-storage")
    gcp_inputs = ExplainInputs(gcp, Resolution().update(gcp))
    claims = job(aud="https://storage.local", ref="main", ref_protected="true")
    answer = explain(gcp_inputs, claims, Request("GET", "storage.local", "/b/o"), NOW)
    assert answer.cloud_identity == "gcs-reader@acme-prod.iam.gserviceaccount.com"
    assert answer.steps[-1].name == "cloud"


def test_a_nack_quoting_a_credential_is_redacted_before_it_is_logged_or_kept() -> None:
    """Observed: Envoy's NACK of a route holding an `AwsRequestSigningPerRoute` quoted `secret_access_key` in clear."""
    nack = 'inline_credential {\n  access_key_id: "ASIAX"\n  secret_access_key: "Jw+2K\\"x"\n  session_token: "tok"\n}'
    shown = truncate_error(nack)
    assert "Jw+2K" not in shown and '"tok"' not in shown and 'access_key_id: "ASIAX"' in shown
    as_json = '{"access_key_id": "ASIAX", "secret_access_key": "Jw+2K", "sessionToken": "tok"}'
    assert (
        truncate_error(as_json)
        == '{"access_key_id": "ASIAX", "secret_access_key": "[redacted]", "sessionToken": "[redacted]"}'
    )


def test_validate_prints_the_overlap_warning_and_still_accepts_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for source in (EXAMPLES / "aws-binding-roles").glob("*.yaml"):
        text = source.read_text()
        if source.name == "bindings.yaml":
            text = text.replace("    pipeline_source: merge_request_event\n", "    ref: main\n")
        (tmp_path / source.name).write_text(text)
    assert main(["validate", str(tmp_path), "--offline"]) == 0
    err = capsys.readouterr().err
    assert "warning: bindings.yaml:" in err and "aws_role_arn: binding mr-pipelines-read-artifacts" in err
    assert main(["validate", str(EXAMPLES / "aws-binding-roles"), "--offline"]) == 0
    assert "aws_role_arn" not in capsys.readouterr().err
