"""Outside attacks on the choice of a binding's AWS role (docs/aws-role-attacks.md), through the real `serve`, a
REAL Envoy 1.40 and moto with SigV4 and IAM enforced: the stack of tests/test_e2e_aws_binding_roles.py, built by
tests/support/aws_roles_world.py (a merge-request job reads with a read-only role, protected main deploys with a
deploy role). A hostile job tries to get the deploy role, and every output is searched for the secrets of the
roles' sessions."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2
from google.protobuf import json_format
from moto.sts.models import sts_backends

from controlplane.compiler.aws import SigningCredential, role_routes
from controlplane.resolved.aws_roles import RoleChoice, merged_projects, route_alternatives
from controlplane.resolved.conditions import Condition, ResolvedSubject
from tests.compiled import policy_of
from tests.support.aws_role_policy import AWS_POLICY
from tests.support.aws_roles_world import HOST, PATH, READ_WRITE, Roles, World, aws_roles_world, policy
from tests.support.envoy import EnvoyProcess
from tests.support.fake_aws import ACCOUNT
from tests.support.policy_parts import issuer
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.role_choice_envoy import HCM_URL, ISSUER, JWT_URL, ROUTER_URL, Issuer, route_taken
from tests.support.stack import PolicyInputs

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """This module's own stack, as tests/test_e2e_aws_binding_roles.py builds it."""
    with aws_roles_world(tmp_path_factory.mktemp("aws-binding-roles")) as built:
        yield built


def _raw(on: World, headers: Sequence[tuple[str, str]], target: str = PATH) -> tuple[int, str | None]:
    """A GET with `headers` sent as they are, repeated names included: (status, the role AWS saw it signed as)."""
    seen = len(on.fake.signed_by)
    conn = http.client.HTTPConnection(LOOPBACK, on.stack.listen_port, timeout=5)
    try:
        conn.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        for name, value in [("Host", HOST), *headers]:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
    finally:
        conn.close()
    signed = on.fake.signed_by[seen:]
    return response.status, on.fake.role_of_key(signed[0]) if signed else None


def test_two_tokens_in_one_request_never_buy_the_deploy_role(world: World) -> None:
    job = world.stack.job
    mr = job(201, ref="feature", ref_protected=False, pipeline_source="merge_request_event")
    main = job(202, ref="main", ref_protected=True)
    # two Authorization headers (either order), or two tokens in one: Envoy joins repeated headers with ',', so
    # jwt_authn sees one malformed token: 401, never one token's payload with the other's route
    for first, second in ((mr, main), (main, mr)):
        assert _raw(world, [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]) == (401, None)
    assert _raw(world, [("Authorization", f"Bearer {mr}, Bearer {main}")]) == (401, None)
    # the deploy token in the query (jwt_authn reads only `Authorization: Bearer`), the job's own in the header
    assert _raw(world, [("Authorization", f"Bearer {mr}")], f"{PATH}?access_token={main}") == (
        200,
        world.roles.mr_read,
    )
    assert _raw(world, [], f"{PATH}?access_token={main}") == (401, None)
    # a header named like the metadata, Envoy's internal headers, a second Host: nothing a job sends is metadata
    forged = [
        ("x-envoy-internal", "true"),
        ("x-envoy-original-path", "/deploy"),
        ("x-envoy-decorator-operation", "s3-role/main-deploys/0"),
        # (hyphenated: the fake's WSGI server mangles '.' and '_' in names, which breaks any signature over them)
        ("x-jwt-authn-jwt-payload", '{"ref_protected": "true", "pipeline_source": "push"}'),
        ("Authorization", f"Bearer {mr}"),
    ]
    assert _raw(world, forged) == (200, world.roles.mr_read)


def _sessions() -> list[tuple[str, str]]:
    """(secret access key, session token) of every session STS issued: the secrets the roles sign with."""
    return [(r.secret_access_key, r.session_token) for r in sts_backends[ACCOUNT]["aws"].assumed_roles]


def test_no_role_secret_in_any_output(world: World) -> None:
    """Each role's credential is inline in the ROUTE configuration now: Envoy's config dump (routes, ECDS),
    serve's /status and /metrics, its log, Envoy's log and the access log must hold none of it."""
    job = world.stack.job
    for token in (job(211, ref="main"), job(212, pipeline_source="merge_request_event"), job(213)):
        assert world.stack.request(HOST, PATH, token).status == 200
    secrets = [s for pair in _sessions() for s in pair]
    assert len(secrets) >= 6  # the backend's role, the read and the deploy role at least
    status, dump = world.stack.envoy.admin_get("/config_dump?include_eds")
    assert status == 200
    routes = json.loads(world.stack.envoy.admin_get("/config_dump?resource=dynamic_route_configs")[1])
    assert "AwsRequestSigningPerRoute" in json.dumps(routes)  # the role routes are there, and dumped
    outputs = {
        "envoy config dump": dump,
        "serve /status": json.dumps(world.stack.controlplane.status()),
        "serve /metrics": world.stack.controlplane.metrics(),
        "serve log": world.stack.controlplane.log_text(),
        "envoy log": world.stack.envoy.log_text(redact=False),
        "access log": world.stack.access_log.read_text(errors="replace") if world.stack.access_log.exists() else "",
    }
    leaked = {name for name, text in outputs.items() for secret in secrets if secret in text}
    assert not leaked


def test_the_role_follows_each_request_on_one_connection_and_through_jwt_authns_cache(world: World) -> None:
    """jwt_authn's cache (a token seen before is not verified again) and one kept-alive connection carrying
    several jobs' requests: every request is routed again on its own payload, never on an earlier one's."""
    job = world.stack.job
    mr = job(221, ref="feature", ref_protected=False, pipeline_source="merge_request_event")
    main = job(222, ref="main", ref_protected=True)
    expected = {mr: world.roles.mr_read, main: world.roles.deploy}
    conn = http.client.HTTPConnection(LOOPBACK, world.stack.listen_port, timeout=5)
    try:
        for token in (mr, main, mr, mr, main, main, mr):
            seen = len(world.fake.signed_by)
            conn.request("GET", PATH, headers={"Host": HOST, "Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            (key,) = world.fake.signed_by[seen:]
            assert (response.status, world.fake.role_of_key(key)) == (200, expected[token])
    finally:
        conn.close()


# -- a live inventory's per-project alternatives, merged into one route, on a static Envoy


def _static_envoy_routes(routes: Sequence[route_components_pb2.Route]) -> list[dict[str, Any]]:
    """The compiled role routes (their match as compiled), each answering its own name; then a default."""
    out = []
    for route in routes:
        as_json = json_format.MessageToDict(route, preserving_proto_field_name=True)
        out.append(
            {
                "name": as_json["name"],
                "match": as_json["match"],
                "direct_response": {"status": 200, "body": {"inline_string": as_json["name"]}},
            }
        )
    default = {"status": 200, "body": {"inline_string": "default"}}
    return [*out, {"name": "default", "match": {"prefix": "/"}, "direct_response": default}]


def _role_routes_bootstrap(port: int, jwks: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    provider = {
        "issuer": ISSUER,
        "audiences": ["s3"],
        "local_jwks": {"inline_string": jwks},
        "forward": False,
        "payload_in_metadata": "jwt_payload",
        "clear_route_cache": True,
    }
    jwt_authn = {
        "@type": JWT_URL,
        "providers": {"ci": provider},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "ci"}}],
    }
    hcm = {
        "@type": HCM_URL,
        "stat_prefix": "roles",
        "route_config": {"virtual_hosts": [{"name": "s3", "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {"name": "envoy.filters.http.jwt_authn", "typed_config": jwt_authn},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_URL}},
        ],
    }
    listener = {
        "name": "roles",
        "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {"admin": {}, "static_resources": {"listeners": [listener]}}


def test_per_project_alternatives_are_one_route_envoy_matches_as_their_union() -> None:
    """1,000 projects of a group subject (one alternative each, as a live inventory resolves them) with the same
    protected ref: one route on the real Envoy, matching every one of those projects on `main` and nothing else."""
    issuer_ = Issuer()
    common = (Condition("iss", (ISSUER,)), Condition("pipeline_source", ("merge_request_event",), negated=True))
    subject = ResolvedSubject.of(
        common, [(Condition("project_id", (str(i),)), Condition("ref", ("main",))) for i in range(1000)]
    )
    matches = merged_projects(route_alternatives(subject))
    assert len(matches) == 1
    backend = policy_of(issuer=issuer("https://g"), backends=AWS_POLICY).backends[0]
    default = route_components_pb2.Route(name="s3-default", match=route_components_pb2.RouteMatch(prefix="/"))
    compiled = role_routes(
        backend,
        [RoleChoice("group-deploys", "arn:aws:iam::1:role/d", matches)],
        default,
        [SigningCredential("A", "s", "t")],
    )
    port = free_port()
    envoy = EnvoyProcess(
        _role_routes_bootstrap(port, issuer_.jwks, _static_envoy_routes(compiled)), name="merged"
    ).start()
    try:
        role_route = "s3-role/group-deploys/0"
        assert route_taken(port, issuer_.token(project_id="0", ref="main")) == (200, role_route)
        assert route_taken(port, issuer_.token(project_id="999", ref="main")) == (200, role_route)
        assert route_taken(port, issuer_.token(project_id="1000", ref="main")) == (200, "default")
        assert route_taken(port, issuer_.token(project_id="999", ref="feature")) == (200, "default")
        mr = issuer_.token(project_id="5", ref="main", pipeline_source="merge_request_event")
        assert route_taken(port, mr) == (200, "default")
    finally:
        envoy.stop()


def test_a_role_renamed_mid_traffic_signs_with_the_new_role_and_the_old_one_is_dropped(world: World) -> None:
    """A policy update gives `main-deploys` another role while protected-main jobs keep sending: their requests
    go from the old role to the new one (never unsigned, never the backend's), and the old role's refresher is
    stopped (its metric series gone). The policy is restored afterwards for the module's other tests."""
    job = world.stack.job
    old = world.roles.deploy
    new = world.fake.add_role("ci-main-deploy-2", READ_WRITE)
    inputs = PolicyInputs(
        world.stack.gitlab.issuer, world.stack.listen_port, {}, world.stack.access_log, world.stack.root
    )

    def write(roles: Roles) -> None:
        for name, text in policy(world.fake, roles)(inputs).items():
            world.stack.write(name, text)

    def series(arn: str) -> bool:
        """The role's refresher runs: its `valid_seconds` gauge is dropped when it stops (counters stay)."""
        wanted = f'controlplane_cloud_credential_valid_seconds{{backend="{arn}",provider="aws"}}'
        return any(line.startswith(wanted) for line in world.stack.controlplane.metrics().splitlines())

    def send(token: str, method: str = "GET") -> tuple[int, str | None]:
        """As `World.send`, but the refreshers' own STS calls (signed with the control plane's user key, so of
        no role) may land in between while roles change: only sessions' signatures count."""
        before = len(world.fake.signed_by)
        path = PATH if method == "GET" else f"/{PATH.split('/')[1]}/written.txt"
        status = world.stack.request(HOST, path, token, method=method).status
        roles = [r for k in world.fake.signed_by[before:] if (r := world.fake.role_of_key(k)) is not None]
        assert len(roles) <= 1, roles
        return status, roles[0] if roles else None

    try:
        assert send(job(231, ref="main")) == (200, old) and series(old)
        write(replace(world.roles, deploy=new))
        seen: list[tuple[int, str | None]] = []

        def switched() -> bool:
            seen.append(send(job(232 + len(seen), ref="main")))
            return seen[-1] == (200, new)

        poll_until(switched, 30, message="protected main signed with the renamed role")
        assert all(answer in ((200, old), (200, new), (503, None)) for answer in seen), seen
        poll_until(lambda: not series(old), 10, message="the old role's refresher stopped")
        assert send(job(299, ref="main", ref_protected=True), "PUT") == (200, new)
    finally:
        write(world.roles)
        poll_until(lambda: send(job(300, ref="main"))[1] == old, 30, message="the original policy back")
