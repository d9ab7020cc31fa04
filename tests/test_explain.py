"""`controlplane explain` without Envoy: each step's refusal and its words, the nearest grants' order, the JSON
shape, the admin endpoint's strict body, and the command line (exit statuses, token never on argv).

That the decisions are Envoy's own is tests/test_e2e_explain.py's matrix; here, what a developer reads."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.admin.explain import BadExplainRequest, explain_inputs, parse_body, serve_default_credentials
from controlplane.admin.http import AdminServer
from controlplane.cli.main import main
from controlplane.model.inventory import Inventory, Project, Ref
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Mode
from controlplane.resolved import evaluate
from controlplane.resolved.conditions import Condition
from controlplane.resolved.explain import (
    ALLOWED,
    DENIED,
    NO_ROUTE,
    REJECTED,
    REVOKED,
    SIGNATURE_NOTE,
    UNAUTHENTICATED,
    ExplainError,
    ExplainInputs,
    Explanation,
    Request,
    document,
    explain,
    normalize_path,
    read_token,
    text_lines,
)
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import read_policy_dir

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
NOW = 1_800_000_000
GITLAB = "http://127.0.0.1:8090"
OKTA = "https://example.okta.com/oauth2/default"


def _b64(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


RS256 = '{"alg": "RS256"}'


def _jwt(header: str, payload: str, signature: str = "c2ln") -> str:
    return f"{_b64(header)}.{_b64(payload)}.{signature}"


def inputs(example: str = "quickstart", **more: Any) -> ExplainInputs:
    policy = parse_policy(read_policy_dir(ROOT / "examples" / example))
    return ExplainInputs(policy, Resolution().update(policy), **more)


def deployer(**claims: Any) -> dict[str, Any]:
    """The quickstart's deployer on its protected main branch, for the deploy backend, valid for an hour."""
    base = {"iss": GITLAB, "aud": "https://deploy.local", "exp": NOW + 3600, "nbf": NOW - 5, "project_id": "42"}
    base |= {"namespace_id": "11", "ref": "main", "ref_type": "branch", "ref_protected": "true"}
    base |= {"pipeline_source": "push", "job_id": "7001"}
    return base | claims


DEPLOY = Request("POST", "deploy.local", "/deployments/1")


def ask(claims: dict[str, Any] | None, request: Request = DEPLOY, given: ExplainInputs | None = None) -> Explanation:
    return explain(given or inputs(), claims, request, NOW)


def words(answer: Explanation) -> list[str]:
    return [f.text for c in answer.nearest for f in c.failures]


# -- each refusal, in words


def test_allowed_names_the_grant_and_says_the_signature_is_not_checked() -> None:
    answer = ask(deployer())
    assert (answer.decision, answer.status, answer.allowed_by) == (ALLOWED, 0, ("deployer-deploys/deploy-trigger",))
    assert SIGNATURE_NOTE in answer.notes
    assert [s.name for s in answer.steps] == ["gateway", "virtual_host", "route", "jwt_authn", "revocations", "rbac"]


def test_ref_protected_false_is_the_failing_condition_in_the_words_of_the_issue() -> None:
    answer = ask(deployer(ref_protected="false"))
    assert (answer.decision, answer.status) == (DENIED, 403)
    assert words(answer)[0] == 'ref_protected: token says "false", binding needs "true"'
    assert answer.nearest[0].failures[0].condition == "ref_protected = true"


def with_binding(name: str, **changes: Any) -> ExplainInputs:
    """The quickstart with one more binding: a copy of deployer-deploys, its subject changed."""
    policy = inputs().policy
    deploys = next(b for b in policy.bindings if b.name == "deployer-deploys")
    subject = replace(deploys.subjects[0], **changes.pop("subject", {}))
    added = replace(deploys, name=name, subjects=(subject,), **changes)
    bigger = replace(policy, bindings=(*policy.bindings, added))
    return ExplainInputs(bigger, Resolution().update(bigger))


def test_a_list_of_projects_a_glob_a_negation_an_absent_and_a_numeric_claim_are_spelled_out() -> None:
    given = with_binding("two", subject={"projects": (1, 2)})
    two = next(c for c in ask(deployer(project_id="7"), given=given).nearest if c.grant == "two/deploy-trigger")
    assert [f.text for f in two.failures] == ['project_id: token says "7", binding needs one of [1, 2]']
    said = words(ask(deployer(pipeline_source="merge_request_event", ref="dev", ref_type=None)))
    assert 'pipeline_source: token says "merge_request_event", binding needs "push"' in said
    assert 'ref: token says "dev", binding needs "main"' in said
    assert 'ref_type: token says null (not a string: Envoy matches strings only), binding needs "branch"' in said
    numeric = words(ask(deployer(project_id=42)))
    assert 'project_id: token says 42 (a number: Envoy matches strings only), binding needs "42"' in numeric
    absent = {k: v for k, v in deployer().items() if k != "ref_protected"}
    assert 'ref_protected: the token has no such claim, binding needs "true"' in words(ask(absent))


def test_globs_negation_and_oidc_list_claims() -> None:
    from controlplane.resolved.explain import _failure

    glob = Condition("ref", ("release/*",))
    assert (
        _failure(glob, {"ref": "dev"}).text
        == 'ref: token says "dev", binding needs "release/*" (* matches within one path segment)'
    )
    negated = Condition("pipeline_source", ("merge_request_event",), negated=True)
    text = _failure(negated, {"pipeline_source": "merge_request_event"}).text
    assert text == 'pipeline_source: token says "merge_request_event", binding needs anything but "merge_request_event"'
    okta = {"iss": OKTA, "aud": "api://feature-flags", "exp": NOW + 60, "groups": ["eng"], "email": "a@example.com"}
    answer = ask(okta, Request("GET", "flags.internal.example.com", "/flags/x"), inputs("gitlab-and-oidc"))
    assert answer.decision == DENIED
    assert (
        'groups: token has ["eng"], binding needs a string, or list holding one, equal to "platform-admins"'
        in words(answer)
    )


def test_method_and_path_outside_every_rule_count_as_failures() -> None:
    answer = ask(deployer(), Request("DELETE", "deploy.local", "/elsewhere"))
    assert answer.decision == DENIED
    assert words(answer) == [
        "method: request is DELETE, role deploy-trigger allows POST",
        "path: request is /elsewhere, role deploy-trigger allows /deployments/**",
    ]


def test_jwt_authn_refusals_and_the_clock_skew() -> None:
    assert ask(None).reason.startswith("no token")
    assert (ask(None).decision, ask(None).status) == (UNAUTHENTICATED, 401)
    wrong = ask(deployer(aud="https://reports.local"))
    assert (wrong.status, wrong.reason) == (
        403,
        "audience: token has https://reports.local, backend deploy-api needs https://deploy.local"
        " (a 403 from jwt_authn)",
    )
    stranger = ask(deployer(iss="https://elsewhere.example"))
    assert stranger.status == 401 and stranger.reason.startswith('issuer: token says "https://elsewhere.example"')
    assert ask(deployer(exp=NOW - 31)).reason == "expired: exp was 31s ago, beyond the 30s clock skew"
    assert ask(deployer(exp=NOW - 30)).decision == ALLOWED  # within the skew
    assert ask(deployer(nbf=NOW + 31)).reason == "not yet valid: nbf is 31s from now, beyond the 30s clock skew"
    assert ask(deployer(nbf=NOW + 30)).decision == ALLOWED
    no_exp = {k: v for k, v in deployer().items() if k != "exp"}
    assert (ask(no_exp).status, ask(no_exp).reason) == (401, "the token has no exp: every provider requires one")
    # Envoy checks the audience first (observed by the agreement matrix)
    assert ask(no_exp | {"aud": "x"}).status == 403


def test_revoked_jobs_are_denied_whatever_their_grants_and_unknown_offline() -> None:
    offline = ask(deployer())
    assert any(s.name == "revocations" and s.ok is None and "not known offline" in s.text for s in offline.steps)
    known = inputs(revoked=frozenset({"7001"}), revocations_known=True)
    answer = ask(deployer(), given=known)
    assert (answer.decision, answer.status) == (REVOKED, 403)
    assert "job 7001 is on the deny list" in answer.reason
    assert ask(deployer(job_id=7001), given=known).decision == ALLOWED  # a number never matches the deny list


def test_gitlab_withdrawing_a_project_is_named_with_its_place_in_the_policy() -> None:
    policy = parse_policy(read_policy_dir(ROOT / "examples" / "gitlab-state"))
    (issuer,) = policy.issuers
    assert issuer.inventory is not None
    main_branch = (Ref("main", "branch", True),)
    projects = (
        Project(42, "acme/platform/deployer", 11, refs=main_branch),
        Project(43, "acme/web/frontend", 12, refs=main_branch),
        Project(44, "acme/platform/legacy", 11, archived=True, refs=main_branch),
    )
    live = Inventory(projects, issuer.inventory.groups, fetched_at=1.0)  # as GitLab's API reports it now
    policy = replace(policy, issuers=(replace(issuer, inventory=live),))
    given = ExplainInputs(policy, Resolution().update(policy))
    claims = {"iss": "https://gitlab.example.com", "exp": NOW + 60, "project_id": "44", "namespace_id": "11"}
    claims |= {"aud": policy.backends[0].audience, "ref": "main", "ref_protected": "true", "pipeline_source": "push"}
    answer = ask(claims, Request("GET", "artifacts.internal.example.com", "/artifacts/x"), given)
    assert answer.decision == DENIED
    legacy = next(c for c in answer.nearest if c.grant == "legacy-reads/artifacts-read")
    assert [f.text for f in legacy.failures] == [
        "GitLab withdrew access: project acme/platform/legacy (id 44) is archived (bindings.yaml:24)"
    ]


def test_shadow_grants_that_would_allow_are_named_as_shadow() -> None:
    given = with_binding("any-ref-dry-run", mode=Mode.SHADOW, subject={"claims": ()})
    answer = ask(deployer(ref_protected="false"), given=given)
    assert answer.decision == DENIED
    assert answer.shadow == ("any-ref-dry-run/deploy-trigger",)
    assert any("shadow binding(s) would allow it" in n for n in answer.notes)
    shown = next(c for c in answer.nearest if c.grant == "deployer-deploys/deploy-trigger")
    assert shown.mode == "enforce"


# -- routing


def test_unknown_host_public_path_exchange_escaped_slash_and_normalized_paths() -> None:
    unknown = ask(deployer(), Request("GET", "nowhere.local", "/x"))
    assert (unknown.decision, unknown.status, unknown.backend) == (NO_ROUTE, 403, None)
    assert ask(None, Request("GET", "nowhere.local", "/x")).status == 401  # jwt_authn's listener-wide rule first
    public = ask(None, Request("GET", "reports.local", "/healthz"))
    assert (public.decision, public.route) == (ALLOWED, "public")
    exchange = explain(
        explain_inputs(inputs().policy, inputs().resolved, serve_default_credentials(True), revocations_known=False),
        None,
        Request("POST", "reports.local", "/.controlplane/token"),
        NOW,
    )
    assert (exchange.decision, exchange.route) == (ALLOWED, "exchange")
    assert ask(deployer(), Request("POST", "deploy.local", "/deployments%2F1")).decision == REJECTED
    normalized = ask(deployer(), Request("POST", "deploy.local", "/x/..//deployments/1?q=1"))
    assert normalized.decision == ALLOWED and "the gateway normalizes the path to /deployments/1" in normalized.notes
    assert ask(deployer(), Request("POST", "DEPLOY.local:10000", "/deployments/1")).backend == "deploy-api"


@pytest.mark.parametrize(
    ("path", "normalized"),
    [
        ("/x/%2e%2e/healthz", "/healthz"),  # escaped dots are dots, then dot segments go
        ("/x/%2E./healthz", "/healthz"),
        ("/heal%74hz?a=b", "/healthz"),  # an escaped unreserved character is decoded
        ("/a\\..\\healthz", "/healthz"),  # a backslash is a slash
        ("/healthz/.", "/healthz/"),  # RFC 3986: a trailing dot segment leaves the slash
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/x//../healthz", "/x/healthz"),  # dot segments first, then slashes merged
        ("/a%3bb%7e", "/a%3Bb~"),  # other escapes kept, their hex in capitals
        ("/a%zz", "/a%zz"),
    ],
)
def test_paths_are_normalized_as_the_gateway_does(path: str, normalized: str) -> None:
    """Each pair observed on the real Envoy (tests/test_e2e_explain.py's adversarial matrix)."""
    assert normalize_path(path) == normalized


def test_escaped_dots_and_letters_reach_the_public_path_as_at_the_gateway() -> None:
    """`/x/%2e%2e/healthz` is `/healthz` at the gateway, a public path: explain said 401 (no token)."""
    for path in ("/x/%2e%2e/healthz", "/heal%74hz", "/%2E/healthz", "/a\\..\\healthz"):
        assert ask(None, Request("GET", "reports.local", path)).route == "public", path
    assert ask(None, Request("GET", "reports.local", "/healthz/.")).decision == UNAUTHENTICATED  # /healthz/


@pytest.mark.parametrize(
    "path", ["/healthz#frag", "/r?a=#b", "/a%00b", "/a%2fb", "/a%5Cb", "/caf\u00e9", "/a\tb", "/a\x7f"]
)
def test_fragments_escaped_nul_and_escaped_slashes_are_refused_before_routing(path: str) -> None:
    answer = ask(deployer(), Request("GET", "reports.local", path))
    assert (answer.decision, answer.status, answer.route) == (REJECTED, 400, None), answer.reason


def test_the_host_header_is_trimmed_and_one_no_authority_could_be_is_refused() -> None:
    """Observed on the real Envoy: blanks around the Host header are dropped (explain said no_route), and a
    host holding a character an authority cannot (non-ASCII, `/`, `"`) is a 400."""
    for host in (" deploy.local", "deploy.local\t", "DEPLOY.local:10000 "):
        assert ask(deployer(), DEPLOY._replace(host=host)).decision == ALLOWED, host
    for host in ("depl\u00f8y.local", "deploy.local/x", 'deploy"local'):
        answer = ask(deployer(), DEPLOY._replace(host=host))
        assert (answer.decision, answer.status) == (REJECTED, 400), host


@pytest.mark.parametrize("method", ["get", "GeT", "FOO", "M-SEARCH", "QUERY", "CONNECT"])
def test_methods_the_http1_codec_refuses_are_400s(method: str) -> None:
    answer = ask(deployer(), DEPLOY._replace(method=method))
    assert (answer.decision, answer.status) == (REJECTED, 400), answer.reason
    assert ask(deployer(), DEPLOY._replace(method="PROPFIND")).status == 403  # known: on to RBAC


@pytest.mark.parametrize(
    ("claims", "says"),
    [
        ({"iat": str(NOW)}, "iat: token says"),
        ({"iat": 1e20}, "0 to 2^64 seconds"),
        ({"exp": None}, "exp: token says null"),
        ({"exp": 2**64}, "0 to 2^64 seconds"),
        ({"exp": 10**400}, "0 to 2^64 seconds"),
        ({"nbf": None}, "nbf: token says null"),
        ({"sub": 7}, "sub: token says 7"),
        ({"jti": 7}, "jti: token says 7"),
        ({"iss": 7}, "iss: token says 7"),
        ({"aud": 5}, "aud: token says 5"),
        ({"aud": None}, "aud: token says null"),
        ({"aud": ["https://deploy.local", 5]}, "a list of strings"),
        ({"x": json.loads("[" * 100 + "]" * 100)}, "nests deeper"),
    ],
)
def test_claims_of_a_type_envoy_cannot_read_are_a_401_before_anything_else(claims: dict[str, Any], says: str) -> None:
    """Envoy's JWT library refuses these at parse time (401), before the issuer and the audience: explain
    allowed some and called others a 403 for the audience."""
    for request in (DEPLOY, DEPLOY._replace(host="reports.local")):  # right and wrong audience
        answer = ask(deployer(**claims), request)
        assert (answer.decision, answer.status) == (UNAUTHENTICATED, 401), (claims, answer.reason)
        assert says in answer.reason


def test_times_are_read_as_whole_seconds_and_zero_is_none() -> None:
    assert ask(deployer(exp=NOW + 0.5, nbf=NOW - 5.5)).decision == ALLOWED  # a fraction is dropped, not refused
    assert ask(deployer(exp=NOW + 3600.9, nbf=NOW - 0.1)).decision == ALLOWED
    zero = ask(deployer(exp=0), DEPLOY._replace(host="reports.local"))  # 0 is no exp: the audience comes first
    assert (zero.decision, zero.status) == (UNAUTHENTICATED, 403)
    assert "exp 0, which Envoy reads as no exp" in ask(deployer(exp=0)).reason
    assert ask(deployer(nbf=0)).decision == ALLOWED


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("not-a-jwt", "not a JWT"),
        ("a.b", "not a JWT"),
        ("a.b.c.d", "not a JWT"),
        (_jwt(RS256, "{}", ""), "not a JWT"),
        (_jwt('{"alg": "none"}', "{}"), 'alg "none" is not one Envoy supports'),
        (_jwt('{"typ": "JWT"}', "{}"), "alg is missing"),
        (_jwt('{"alg": "RS256", "kid": 5}', "{}"), "kid is 5"),
        (_jwt('{"alg": "RS256", "alg": "none"}', "{}"), "header is not JSON"),
        (_jwt(RS256, '{"exp": 1, "exp": 2}'), "payload is not JSON"),
        (_jwt(RS256, '{"x": NaN}'), "payload is not JSON"),
        (_jwt(RS256, "[1]"), "payload is not a JSON object"),
        (_jwt(RS256, "not json"), "payload is not JSON"),
        (_jwt(RS256, "{}", "c2l!"), "signature is not base64url"),
        (_jwt(RS256, '{"x": ' + "[" * 100 + "]" * 100 + "}"), "nests deeper"),
    ],
)
def test_tokens_envoy_cannot_read_are_a_401_said_in_words(token: str, says: str) -> None:
    claims, problem = read_token(token)
    assert claims is None and problem is not None and says in problem, problem
    answer = explain(inputs(), None, DEPLOY, NOW, problem)
    assert (answer.decision, answer.status) == (UNAUTHENTICATED, 401) and says in answer.reason
    public = explain(inputs(), None, Request("GET", "reports.local", "/healthz"), NOW, problem)
    assert public.decision == ALLOWED  # a public path reads no token
    padded = _jwt(RS256, '{"a": 1}').replace(".c2ln", "==.c2ln==")
    assert read_token(padded) == ({"a": 1}, None)  # padding is tolerated, as by Envoy


def test_gateway_by_name_or_port_and_an_unknown_one_is_a_usage_error() -> None:
    assert ask(deployer(), DEPLOY._replace(port=10000)).steps[0].text == "gateway ci-gateway listens on port 10000"
    with pytest.raises(ExplainError, match="no gateway 'nope'"):
        ask(deployer(), DEPLOY._replace(gateway="nope"))


# -- nearest bindings, JSON


def test_nearest_grants_fewest_failures_first_at_most_three() -> None:
    given = inputs()
    for i in (9, 8, 7):
        base = with_binding(f"b{i}", subject={"projects": (i,)})
        policy = replace(given.policy, bindings=(*given.policy.bindings, base.policy.bindings[-1]))
        given = ExplainInputs(policy, Resolution().update(policy))
    answer = ask(deployer(ref_protected="false", project_id="9"), given=given)
    assert [(c.grant, len(c.failures)) for c in answer.nearest] == [
        ("b9/deploy-trigger", 1),
        ("b7/deploy-trigger", 2),
        ("b8/deploy-trigger", 2),
    ]  # deployer-deploys fails twice too (project, ref_protected): fourth by name, not shown


def test_json_document_shape_is_stable() -> None:
    doc = document(ask(deployer(ref_protected="false")))
    assert list(doc) == [
        "decision", "allowed", "status", "reason", "gateway", "backend", "route", "steps", "allowed_by", "shadow",
        "nearest", "notes", "cloud_identity",
    ]  # fmt: skip
    assert doc["steps"][0] == {"step": "gateway", "ok": True, "text": "gateway ci-gateway: fronts that host"}
    assert doc["nearest"][0] == {
        "grant": "deployer-deploys/deploy-trigger",
        "mode": "enforce",
        "failing": 1,
        "failures": [
            {
                "what": "ref_protected",
                "text": 'ref_protected: token says "false", binding needs "true"',
                "condition": "ref_protected = true",
            }
        ],
    }
    assert json.loads(json.dumps(doc)) == doc
    assert text_lines(doc)[0].startswith("DENIED: no grant of deploy-api allows it")


def test_a_mutated_evaluation_changes_the_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The explanation is the Evaluator's: break it and the answer breaks (so the matrix can fail)."""
    mr = deployer(pipeline_source="merge_request_event")
    assert ask(mr, Request("GET", "reports.local", "/r")).decision == UNAUTHENTICATED  # aud is deploy's
    claims = mr | {"aud": "https://reports.local"}
    assert ask(claims, Request("GET", "reports.local", "/r")).decision == DENIED  # MR pipelines are refused
    original = evaluate.Evaluator.condition_holds

    def negation_ignored(self: evaluate.Evaluator, claims: Any, condition: Condition) -> bool:
        return original(self, claims, condition._replace(negated=False))

    monkeypatch.setattr(evaluate.Evaluator, "condition_holds", negation_ignored)
    assert ask(claims, Request("GET", "reports.local", "/r")).decision == ALLOWED


# -- the admin endpoint


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"method": "GET", "host": "h", "path": "/", "token": "x"}', "unknown field(s) 'token'"),
        (b'{"method": "GET", "host": "h"}', "missing field(s): path"),
        (b'{"method": "GET", "host": "h", "path": "x"}', "path must start with '/'"),
        (b'{"method": 1, "host": "h", "path": "/"}', "method must be a JSON string"),
        (b'{"method": "GET", "host": "h", "path": "/", "port": 0}', "port must be 1 to 65535"),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": []}', "claims must be a JSON object"),
        (b" " * (64 * 1024 + 1), "body over"),
    ],
)
def test_the_admin_body_is_strict(body: bytes, says: str) -> None:
    with pytest.raises(BadExplainRequest, match=None) as raised:
        parse_body(body)
    assert says in str(raised.value)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def test_post_explain_answers_from_the_policy_in_service(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    given = inputs(revoked=frozenset({"7001"}), revocations_known=True)
    state: dict[str, ExplainInputs | None] = {"inputs": None}
    server = AdminServer(status=dict, ready=lambda: True, port=0, explain=lambda: state["inputs"], clock=lambda: NOW)
    port = await server.start()
    url = f"http://127.0.0.1:{port}/explain"
    body = {"claims": deployer(user_email="secret@example.com"), "method": "POST", "host": "deploy.local"}
    body["path"] = "/deployments/1"
    try:
        caplog.set_level("DEBUG")
        async with http.post(url, json=body) as response:
            assert (response.status, await response.text()) == (503, "no policy in service yet\n")
        state["inputs"] = given
        async with http.post(url, json=body) as response:
            assert response.status == 200
            answer = await response.json()
        async with http.post(url, json={**body, "gateway": "nope"}) as response:
            assert response.status == 400 and "no gateway 'nope'" in await response.text()
        async with http.post(url + "?x=1", json=body) as response:
            assert response.status == 400
        async with http.get(url) as response:
            assert response.status == 405
        big = b"{" + b" " * 100_000 + b"}"
        async with http.post(url, data=big, headers={"Content-Type": "application/json"}) as response:
            assert (response.status, await response.text()) == (400, "body over 65536 bytes\n")
    finally:
        await server.stop()
    assert (answer["decision"], answer["status"]) == (REVOKED, 403)
    assert "secret@example.com" not in caplog.text and "7001" not in caplog.text


# -- the command line


def _token(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_cli_exit_statuses_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("Bearer " + _token(deployer(exp=2**40, nbf=0)) + "\n")
    args = ["explain", str(QUICKSTART), "--token-file", str(token), "--method", "POST"]
    assert main([*args, "--url", "http://deploy.local/deployments/1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ALLOWED: allowed by deployer-deploys/deploy-trigger") and SIGNATURE_NOTE in out
    assert main([*args, "--url", "http://deploy.local/nope"]) == 1
    assert "exchanged/" not in capsys.readouterr().out  # the exchange's grants are another issuer's: not near
    assert main([*args, "--host", "deploy.local", "--path", "/nope", "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["decision"] == DENIED
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps(deployer(exp=2**40, nbf=0, ref_protected="false")))
    assert main(["explain", str(QUICKSTART), "--claims", str(claims), "--host", "deploy.local"]) == 1
    assert 'ref_protected: token says "false", binding needs "true"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--host", "deploy.local", "--server", "127.0.0.1:1"], "a policy directory or --server"),
        ([], "give --host"),
        (["--url", "ftp://x/"], "--url must be"),
        (["--url", "http://x/", "--host", "y"], "--url replaces"),
        (["--host", "h", "--gateway", "nope"], "no gateway 'nope'"),
    ],
)
def test_cli_usage_errors_exit_2(
    extra: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(QUICKSTART), *extra]) == 2
    assert says in capsys.readouterr().err


def test_cli_answers_401_for_what_is_not_a_jwt_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Envoy answers a token it cannot read with 401 wherever a token is checked: so does explain (it used to
    exit 2), never repeating the token."""
    token = tmp_path / "token"
    token.write_text("not-a-jwt-but-maybe-a-secret")
    assert main(["explain", str(QUICKSTART), "--token-file", str(token), "--host", "h"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("UNAUTHENTICATED: the token cannot be read: not a JWT") and "(Envoy answers 401)" in out
    assert "maybe-a-secret" not in out + err
    assert (
        main(["explain", str(QUICKSTART), "--token-file", str(token), "--host", "deploy.local", "--format", "json"])
        == 1
    )
    answer = json.loads(capsys.readouterr().out)
    assert (answer["decision"], answer["status"]) == (UNAUTHENTICATED, 401)


def test_cli_reads_the_token_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import sys

    stdin = io.TextIOWrapper(io.BytesIO(_token(deployer(exp=2**40, nbf=0, aud="x")).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["explain", str(QUICKSTART), "--token-file", "-", "--url", "http://deploy.local/deployments/1"]) == 1
    assert capsys.readouterr().out.startswith("UNAUTHENTICATED: audience: token has x, backend deploy-api needs")


# -- attacks on POST /explain


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (
            b'{"method": "GET", "host": "h", "path": "/", "claims": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}",
            "deep",
        ),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": {"exp": NaN}}', "NaN"),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": {"exp": Infinity}}', "Infinity"),
        (b'{"method": "GET", "method": "POST", "host": "h", "path": "/"}', "given twice"),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": {"a": 1, "a": 2}}', "given twice"),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": {"exp": 1' + b"0" * 5000 + b"}}", "not JSON"),
        (b'{"method": "GET", "host": "h", "path": "/", "claims": {}, "token_problem": "x"}', "not both"),
        (b'{"method": "GET", "host": "h", "path": "/\xff"}', "not JSON"),
    ],
)
def test_body_bombs_are_400s_not_500s(body: bytes, says: str) -> None:
    """A nesting bomb raised RecursionError (a 500 and a traceback), NaN and a key twice were taken silently."""
    with pytest.raises(BadExplainRequest) as raised:
        parse_body(body)
    assert says in str(raised.value)


async def test_a_browser_page_cannot_post_a_simple_request_and_query_values_are_not_logged(
    http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """CSRF: a web page may POST text/plain (or a form) to the loopback admin port without a preflight; only
    `application/json`, which a page cannot send cross-origin without the port's consent, is taken. A page
    whose name was rebound to 127.0.0.1 sends its own name as Host: refused. And a token put in the query
    string is not written to the DEBUG log."""
    server = AdminServer(status=dict, ready=lambda: True, port=0, explain=inputs, clock=lambda: NOW)
    port = await server.start()
    url = f"http://127.0.0.1:{port}/explain"
    body = json.dumps({"claims": deployer(), "method": "POST", "host": "deploy.local", "path": "/deployments/1"})
    try:
        caplog.set_level("DEBUG")
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": kind} if kind else {}
            async with http.post(url, data=body.encode(), headers=headers, skip_auto_headers=["Content-Type"]) as sent:
                assert sent.status == 415, (kind, sent.status)
        for kind in ("application/json", "application/json; charset=utf-8"):
            async with http.post(url, data=body.encode(), headers={"Content-Type": kind}) as sent:
                assert sent.status == 200
        deep = b'{"method": "GET", "host": "h", "path": "/", "claims": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}"
        async with http.post(url, data=deep, headers={"Content-Type": "application/json"}) as sent:
            assert sent.status == 400
        for rebound in ("evil.example", "evil.example:80", "127.0.0.1.nip.io"):  # DNS rebinding: its own name
            headers = {"Content-Type": "application/json", "Host": rebound}
            async with http.post(url, data=body.encode(), headers=headers) as sent:
                assert sent.status == 403, rebound
        for local in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
            async with http.post(
                url, data=body.encode(), headers={"Content-Type": "application/json", "Host": local}
            ) as sent:
                assert sent.status == 200, local
        async with http.post(
            url + "?token=eyJsecret", data=body.encode(), headers={"Content-Type": "application/json"}
        ) as sent:
            assert sent.status == 400 and "eyJsecret" not in await sent.text()
    finally:
        await server.stop()
    assert "eyJsecret" not in caplog.text and "Traceback" not in caplog.text


async def test_a_thousand_explains_while_the_policy_changes_each_get_one_whole_answer(
    http: aiohttp.ClientSession,
) -> None:
    """Concurrency: the policy in service flips between two versions on every read (the deployer allowed, then
    revoked); 1,000 requests, 6 at a time (a client's share of connections), each get a 200 with the answer of
    one version, never a mix; and the loop stays responsive (/healthz answers meanwhile)."""
    versions = [inputs(), inputs(revoked=frozenset({"7001"}), revocations_known=True)]
    reads = itertools.count()
    server = AdminServer(
        status=dict, ready=lambda: True, port=0, explain=lambda: versions[next(reads) % 2], clock=lambda: NOW
    )
    port = await server.start()
    url = f"http://127.0.0.1:{port}/explain"
    body = {"claims": deployer(), "method": "POST", "host": "deploy.local", "path": "/deployments/1"}
    gate = asyncio.Semaphore(6)  # the admin port takes 8 connections from one address: the rest are closed
    health: list[float] = []

    async def one() -> tuple[int, str]:
        async with gate, http.post(url, json=body) as sent:
            return sent.status, (await sent.json())["decision"]

    async def probe() -> None:
        for _ in range(20):
            started = time.monotonic()
            async with http.get(f"http://127.0.0.1:{port}/healthz") as sent:
                assert sent.status == 200
            health.append(time.monotonic() - started)

    try:
        started = time.monotonic()
        answers, _ = await asyncio.gather(asyncio.gather(*(one() for _ in range(1000))), probe())
        took = time.monotonic() - started
    finally:
        await server.stop()
    print(f"\n1,000 explains in {took:.1f}s; /healthz meanwhile at most {max(health) * 1000:.0f} ms")
    assert Counter(answers) == {(200, ALLOWED): 500, (200, REVOKED): 500}
    assert max(health) < 2.0


# -- attacks on the command line


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit:  # argparse's own refusals
        return int(exit.code or 0)


@pytest.mark.parametrize(
    "where",
    [
        ["--host", "deploy.local", "{token}"],  # a stray argument: argparse echoed it ("unrecognized arguments")
        ["--token", "{token}", "--host", "deploy.local"],  # a flag that does not exist: echoed too
        ["--host", "deploy.local", "--jwt={token}"],
        ["--host", "{token}"],
        ["--url", "http://deploy.local/x?access_token={token}"],
        ["--host", "deploy.local", "--path", "/x", "--method", "Bearer {token}"],
    ],
)
def test_a_token_on_the_command_line_is_refused_and_never_repeated(
    where: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(deployer())
    argv = ["explain", str(QUICKSTART), *(a.replace("{token}", token) for a in where)]
    assert _run(argv) == 2
    out, err = capsys.readouterr()
    assert token not in out + err and token[-20:] not in out + err
    assert "--token-file" in err
    assert _run(["explain", token, "--host", "deploy.local"]) == 2  # the token where the policy goes
    out, err = capsys.readouterr()
    assert token[-20:] not in out + err


def test_terminal_escapes_in_claims_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audience was printed raw: a token whose `aud` holds ESC sequences could rewrite the developer's
    terminal (title, screen, hyperlinks). Every text line is printed with control and format characters
    escaped; JSON escapes them by itself."""
    hostile = "\x1b]0;owned\x07\x1b[2J\u202egnp.exe\x9b31m"
    token = tmp_path / "token"
    for claims in ({"aud": hostile}, {"aud": [hostile]}, {"iss": hostile}, {"ref": hostile}):
        token.write_text(_token(deployer(exp=2**40, nbf=0, **claims)))
        for output in ("text", "json"):
            argv = [
                "explain",
                str(QUICKSTART),
                "--token-file",
                str(token),
                "--url",
                "http://deploy.local/deployments/1",
            ]
            assert main([*argv, "--format", output]) == 1
            out = capsys.readouterr().out
            assert not any(c in out for c in "\x1b\x07\u202e\x9b"), (output, out)
            assert "\\u001b]0;owned" in out
    lines = text_lines({**document(ask(deployer())), "reason": "a\x1bb", "notes": ["\x07"]})
    assert "\x1b" not in "".join(lines) and "a\\u001bb" in lines[0]


@pytest.mark.parametrize("kind", ["device", "fifo", "huge", "directory", "not utf-8"])
def test_token_files_that_are_not_plain_files_are_read_with_a_bound(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import threading

    path = tmp_path / "token"
    writer = None
    if kind == "device":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
        writer = threading.Thread(target=lambda: path.write_text(_token(deployer())), daemon=True)
        writer.start()
    elif kind == "huge":
        path.write_bytes(b"a" * 10_000_000)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe")
    code = main(["explain", str(QUICKSTART), "--token-file", str(path), "--url", "http://deploy.local/deployments/1"])
    if writer is not None:
        writer.join(5)
        assert code != 2 and "cannot be read" not in capsys.readouterr().out  # <(cat job.jwt) is a pipe: read
    else:
        assert code == 2 and "controlplane explain:" in capsys.readouterr().err


def test_one_explain_builds_the_exchanged_grants_of_the_backend_asked_about_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each POST /explain built every role's `exchanged/<role>` grants on the event loop (tens of ms at a few
    thousand roles); now only the asked backend's (with 1,000 backends: ~60 ms an answer before, ~3 ms now)."""
    import controlplane.admin.explain as admin_explain
    from benchmarks.compile_scale import generate
    from controlplane.model.credentials import CredentialInputs

    built: list[str] = []
    real = admin_explain.exchanged_grants
    monkeypatch.setattr(
        admin_explain, "exchanged_grants", lambda issuer, roles: built.append(roles[0].backend) or real(issuer, roles)
    )
    policy = generate(50, 2)
    credentials = CredentialInputs(jwks="x", exchange_address=("0.0.0.0", 0))
    given = explain_inputs(policy, Resolution().update(policy), credentials, revocations_known=True)
    target = policy.backends[7]
    claims = {"iss": policy.issuers[0].url, "aud": target.audience, "exp": 2**40, "project_id": "1"}
    answer = explain(given, claims, Request("GET", target.hosts[0], "/api/x"), NOW)
    assert answer.backend == target.name and built == [target.name]


def test_a_server_that_answers_oddly_or_with_escapes_is_refused_in_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--server` pointed at something else: a reply without the answer's shape crashed text output with a
    KeyError traceback, and an error body was printed raw (ESC sequences to the terminal)."""
    import http.server
    import threading

    replies = [b'{"decision": "allowed"}', b'{"decision": "denied", "allowed": false, "status": 403}']

    class Odd(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            if replies:
                body, code = replies.pop(0), 200
            else:
                body, code = b"\x1b]0;owned\x07 go away", 400
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        argv = ["explain", "--server", f"127.0.0.1:{server.server_port}", "--host", "deploy.local"]
        for _ in range(3):
            assert main(argv) == 2
            out, err = capsys.readouterr()
            assert "\x1b" not in out + err and "\x07" not in out + err and err.startswith("controlplane explain:")
    finally:
        server.shutdown()
        server.server_close()


def test_claims_json_envoy_would_not_parse_is_the_401_of_the_token_carrying_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--claims` with a key given twice: Python kept the last (here a valid audience) and said allowed; Envoy
    refuses such a payload (401)."""
    claims = tmp_path / "claims.json"
    valid = json.dumps(deployer(exp=2**40, nbf=0))
    claims.write_text(valid[:-1] + ', "aud": "https://deploy.local"}')
    argv = ["explain", str(QUICKSTART), "--claims", str(claims), "--url", "http://deploy.local/deployments/1"]
    assert main(argv) == 1
    said = capsys.readouterr().out
    assert said.startswith("UNAUTHENTICATED: the token cannot be read: the token's payload is not JSON")
    claims.write_text(valid)
    assert main(argv) == 0
    claims.write_text("{not json")
    assert main(argv) == 2
