"""`controlplane explain` agrees with a real Envoy: a generated matrix of (claims x request) cases, each sent
through the gateway and asked of a running serve's `POST /explain` (its live policy and deny list) and of the
offline explanation of the same policy directory, with zero disagreements on the decision.

The tokens are real (the fake GitLab and a fake Okta sign them): two issuers plus one the policy does not
know, every audience of the gateway, a wrong one, none and a list; expired and not yet valid beyond and within
the issuer's clock skew; no `exp`; a project id sent as a number; every condition kind of the policy language
(project, group, ref, ref_type, ref_protected, environment, pipeline_source and its implicit negation,
user_login, deployment_tier, user_access_level, another claim through `claims:`, an OIDC list claim, globs and
lists); the control plane's exchanged credentials; revoked jobs (Job Hooks for finished jobs); and requests in
and out of the roles' methods and paths, a public path, an exchanged-only backend, a backend without grants, a
wildcard host, an unknown host, a host with a port and in capitals, paths the gateway normalizes and one it
refuses. Most cases are near misses decided by RBAC: for every binding, tokens that satisfy it and tokens one
claim away, each making exactly one condition fail (every kind: a project, a list of them, a group, a ref, a
glob, ref_type, ref_protected, an environment list, pipeline_source plain and negated, user_login, the tier,
the access level, a sha glob, another claim's glob, an OIDC list claim and a glob in one), sent just inside
and just outside each of its roles' method and path rules; the test checks the server names that binding
and that condition, and that mutated evaluations disagree with Envoy. A second stack watches GitLab through
its API: a server explains with GitLab's state as it is now, and near misses across the alternatives of a
subject narrowed project by project.

What Envoy decided is read from its own access log (each token's requests come from a loopback address of
their own, and the log records method, host, path and that address): its response code details tell a
jwt_authn refusal from the deny list's from RBAC's, and the route name tells "no virtual host".
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from controlplane.admin.explain import explain_inputs, serve_default_credentials
from controlplane.cli.explain import decode_token
from controlplane.cli.main import main
from controlplane.compiler.names import REVOKED_POLICY
from controlplane.model.loader import parse_policy
from controlplane.resolved import evaluate
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
    Request,
    explain,
    normalize_path,
    read_token,
)
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import ReadLimits, read_policy_dir
from tests.support.fake_gitlab import OMIT, FakeGitLab
from tests.support.fake_oidc import FakeOidc, SigningKey
from tests.support.policy_parts import backend, binding, documents, gateway, issuer
from tests.support.ports import LOOPBACK, poll_until
from tests.support.stack import PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

SKEW = 120  # the GitLab issuer's clock skew: "within the skew" cases stay so for the whole run
REVOKED_JOBS = tuple(range(900_001, 900_007))
INVENTORY = """\
groups:
  - {id: 10, path: acme}
  - {id: 11, path: acme/platform, parent_id: 10}
  - {id: 12, path: acme/web, parent_id: 10}
projects:
  - {id: 42, path: acme/platform/deployer, namespace_id: 11}
  - {id: 43, path: acme/platform/other, namespace_id: 11}
  - {id: 44, path: acme/web/site, namespace_id: 12}
"""
ROLES = """\
kind: Role
name: reports-read
backend: reports-api
rules: [{methods: [GET, HEAD], paths: ["/**"]}]
---
kind: Role
name: reports-write
backend: reports-api
rules: [{methods: [POST], paths: ["/reports/*"]}]
---
kind: Role
name: deploy-trigger
backend: deploy-api
rules:
  - {methods: [POST], paths: ["/deployments/**"]}
  - {methods: [GET], paths: ["/deployments/*"]}
---
kind: Role
name: flags-read
backend: flags-api
rules: [{methods: [GET], paths: ["/flags/**"]}]
---
kind: Role
name: wild-read
backend: wild-api
rules: [{methods: [GET]}]
---
kind: Role
name: vault-read
backend: vault-api
rules: [{methods: [GET]}]
"""


def policy(given: PolicyInputs, okta: FakeOidc) -> dict[str, str]:
    port = given.ports["echo"]
    gitlab = "issuer: gitlab"
    return {
        "issuers.yaml": documents(
            issuer(given.issuer, extra=f"inventory: inventory.yaml\nclock_skew: {SKEW}"),
            issuer(okta.issuer, name="okta", kind="oidc", extra=f"jwks_uri: {okta.jwks_uri}"),
            # A second issuer on the same keys (one IdP, two issuer names): the token's `iss` picks the provider.
            issuer(twin_issuer(okta), name="okta-twin", kind="oidc", extra=f"jwks_uri: {okta.jwks_uri}"),
        ),
        "inventory.yaml": INVENTORY,
        "backends.yaml": documents(
            backend("reports-api", port, extra="public_paths: [/healthz]"),
            backend("deploy-api", port),
            backend("flags-api", port, audience="api://flags"),
            backend("vault-api", port, extra="credentials: exchanged"),
            backend("empty-api", port),
            backend("wild-api", port, host='"*.wild.local"', audience="https://reports.local"),
        ),
        "roles.yaml": ROLES,
        "bindings.yaml": documents(
            binding(
                "deployer-reads-reports",
                ["reports-read"],
                "{project: acme/platform/deployer, ref_protected: true}",
                extra=gitlab,
            ),
            binding(
                "deployer-deploys",
                ["deploy-trigger"],
                "{project: 42, ref: main, ref_type: branch, ref_protected: true, pipeline_source: push}",
                extra=gitlab,
            ),
            binding(
                "releases-write-reports",
                ["reports-write"],
                '{group: acme/platform, ref: "release/*", environment: [production, staging]}',
                extra=gitlab,
            ),
            binding(
                "reviewers-deploy",
                ["deploy-trigger"],
                "{project: [42, 43], pipeline_source: merge_request_event, user_login: [alice, bob]}",
                extra=gitlab,
            ),
            binding(
                "admins-read",
                ["flags-read", "reports-read"],
                '{claims: {groups: platform-admins, email: "*@example.com"}}',
                extra="issuer: okta",
            ),
            binding("twins-read", ["reports-read"], "{claims: {groups: twins}}", extra="issuer: okta-twin"),
            binding(
                "acme-dry-run", ["deploy-trigger"], "{group: 10, ref_protected: true}", extra=f"{gitlab}\nmode: shadow"
            ),
            binding(
                "maintainers-read-flags",
                ["flags-read"],
                "{project: 43, deployment_tier: production, user_access_level: [maintainer, owner]}",
                extra=gitlab,
            ),
            binding(
                "web-tags-read",
                ["reports-read"],
                '{group: acme/web, ref_type: tag, sha: "0*", claims: {job_project_path: "acme/web/*"}}',
                extra=gitlab,
            ),
            binding("deployer-vault", ["vault-read"], "{project: 42}", extra=gitlab),
            binding("web-wild", ["wild-read"], "{project: acme/web/site}", extra=gitlab),
        ),
        "gateway.yaml": gateway(
            given.listen_port,
            ["reports-api", "deploy-api", "flags-api", "vault-api", "empty-api", "wild-api"],
            access_log=given.access_log,
        ),
    }


def twin_issuer(okta: FakeOidc) -> str:
    return f"{okta.issuer}/twin"


PROJECTS: tuple[tuple[int, str, int], ...] = (
    (42, "acme/platform/deployer", 11),
    (43, "acme/platform/other", 11),
    (44, "acme/web/site", 12),
)
PROJECTS += ((99, "acme/gone/x", 13),)
REFS = (("main", "branch"), ("release/1", "branch"), ("feature/x", "branch"), ("v1.0", "tag"))
AUDIENCES: tuple[Any, ...] = (
    "https://reports.local",
    "https://deploy.local",
    "api://flags",
    "https://wrong.local",
    ["https://reports.local", "https://deploy.local"],
)


def requests(listen_port: int) -> list[Request]:
    return [
        Request("GET", "reports.local", "/r"),
        Request("HEAD", "reports.local", "/a/b"),
        Request("POST", "reports.local", "/reports/x"),
        Request("POST", "reports.local", "/reports/x/y"),
        Request("DELETE", "reports.local", "/r"),
        Request("GET", "reports.local", "/healthz"),
        Request("GET", f"REPORTS.local:{listen_port}", "/r?x=1"),
        Request("POST", "deploy.local", "/deployments/1"),
        Request("GET", "deploy.local", "/deployments/1"),
        Request("GET", "deploy.local", "/deployments/1/2"),
        Request("POST", "deploy.local", "/other"),
        Request("POST", "deploy.local", "/x/../deployments//9"),
        Request("GET", "flags.local", "/flags/a"),
        Request("GET", "flags.local", "/other"),
        Request("GET", "vault.local", "/v"),
        Request("GET", "empty.local", "/e"),
        Request("GET", "unknown.local", "/x"),
        Request("GET", "a.wild.local", "/w"),
        Request("GET", "wild.local", "/w"),
        Request("GET", "reports.local", "/a%2Fb"),
    ]


def gitlab_tokens(gitlab: FakeGitLab, stranger: FakeOidc) -> list[str]:
    """Sampled from the product of every GitLab dimension, plus the time, type and issuer cases."""
    rng = random.Random(15)
    product = list(
        itertools.product(
            PROJECTS,
            REFS,
            (True, False),
            ("push", "merge_request_event"),
            (None, "production", "dev"),
            ("alice", "carol"),
            AUDIENCES,
            (("production", "maintainer", "0abc"), (None, "developer", "fff")),
        )
    )
    tokens = []
    jobs = itertools.count(500_000)
    for (pid, path, ns), (ref, ref_type), protected, source, env, user, aud, (tier, level, sha) in rng.sample(
        product, 60
    ):
        tokens.append(
            gitlab.mint(
                project_id=pid,
                project_path=path,
                namespace_id=ns,
                ref=ref,
                ref_type=ref_type,
                ref_protected=protected,
                pipeline_source=source,
                environment=env,
                deployment_tier=tier,
                user_access_level=level,
                sha=sha,
                user_login=user,
                aud=aud,
                ttl=3600,
                job_id=next(jobs),
            )
        )
    now = int(time.time())
    deployer: dict[str, Any] = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
    for aud in AUDIENCES[:3]:
        base = {**deployer, "aud": aud, "job_id": next(jobs)}
        tokens += [
            gitlab.mint(**base, iat=now - 4000, exp=now - SKEW - 300),  # expired beyond the skew
            gitlab.mint(**base, iat=now - 4000, exp=now - SKEW // 4),  # expired, within the skew
            gitlab.mint(**base, iat=now, nbf=now + SKEW + 600, exp=now + 3600),  # not yet valid
            gitlab.mint(**base, iat=now, nbf=now + SKEW // 4, exp=now + 3600),  # not yet valid, within the skew
        ]
    for job, aud in zip(REVOKED_JOBS, itertools.cycle(AUDIENCES), strict=False):
        tokens.append(gitlab.mint(**deployer, aud=aud, job_id=job, ttl=3600))
    tokens += [
        gitlab.mint(**deployer, aud=AUDIENCES[0], raw={"project_id": 42}),  # a number: Envoy matches strings only
        gitlab.mint(**deployer, aud=AUDIENCES[0], raw={"exp": OMIT}),  # no exp
        gitlab.mint(**deployer, aud=AUDIENCES[0], raw={"aud": OMIT}),  # no audience
        stranger.mint(aud="https://reports.local"),  # an issuer the policy does not know
        stranger.mint(aud="api://flags"),
    ]
    return tokens


def okta_tokens(okta: FakeOidc) -> list[str]:
    groups: tuple[list[str], ...] = (["platform-admins"], ["eng"], ["eng", "platform-admins"], [])
    emails = ("dev@example.com", "x@evil.example.org")
    audiences = ("api://flags", "https://reports.local", "api://wrong")
    return [okta.mint(groups=g, email=e, aud=a, ttl=3600) for g, e, a in itertools.product(groups, emails, audiences)]


def exchanged_credentials(stack: Served) -> list[str]:
    """The control plane's own credentials for the deployer's job, one per backend it may reach, exchanged
    through the gateway as a job does: their issuer, audiences and `exchanged/<role>` grants (the only way into
    the exchanged-only backend)."""
    out = []
    for audience, host in (("reports-api", "reports"), ("deploy-api", "deploy"), ("vault-api", "vault")):
        subject = stack.gitlab.mint(
            project_id=42, project_path="acme/platform/deployer", namespace_id=11, aud=f"https://{host}.local", ttl=3600
        )
        response = stack.exchange(subject, audience=audience)
        assert response.status == 200, response.text
        out.append(str(response.json()["access_token"]))
    return out


# -- near misses: tokens one claim away from a binding, requests one method or path away from a role


INSIDE, OUTSIDE = "inside", "outside"
RULE = "method or path"  # what an outside request fails: one of the role's rules, whichever is closest
# Per role: (host, method, path, just inside the role's rules or just outside them).
ROLE_REQUESTS: dict[str, tuple[tuple[str, str, str, str], ...]] = {
    "reports-read": (
        ("reports.local", "GET", "/r", INSIDE),
        ("reports.local", "HEAD", "/a/b", INSIDE),
        ("reports.local", "GET", "/", INSIDE),
        ("reports.local", "POST", "/r", OUTSIDE),
        ("reports.local", "DELETE", "/a/b", OUTSIDE),
    ),
    "reports-write": (
        ("reports.local", "POST", "/reports/x", INSIDE),
        ("reports.local", "POST", "/reports/", INSIDE),  # `*` matches an empty segment
        ("reports.local", "POST", "/reports/x.json", INSIDE),
        ("reports.local", "POST", "/reports/x/y", OUTSIDE),  # `*` never crosses `/`
        ("reports.local", "POST", "/reports", OUTSIDE),
        ("reports.local", "POST", "/reportsx/a", OUTSIDE),
        ("reports.local", "PUT", "/reports/x", OUTSIDE),
    ),
    "deploy-trigger": (
        ("deploy.local", "POST", "/deployments/1", INSIDE),
        ("deploy.local", "POST", "/deployments/1/2", INSIDE),
        ("deploy.local", "POST", "/deployments", INSIDE),  # `/**` is the path itself and anything below
        ("deploy.local", "GET", "/deployments/1", INSIDE),
        ("deploy.local", "POST", "/deploymentsx", OUTSIDE),
        ("deploy.local", "GET", "/deployments/1/2", OUTSIDE),
        ("deploy.local", "PUT", "/deployments/1", OUTSIDE),
    ),
    "flags-read": (
        ("flags.local", "GET", "/flags/a", INSIDE),
        ("flags.local", "GET", "/flags/a/b", INSIDE),
        ("flags.local", "GET", "/flags", INSIDE),
        ("flags.local", "GET", "/flagsx", OUTSIDE),
        ("flags.local", "GET", "/flag/a", OUTSIDE),
        ("flags.local", "HEAD", "/flags/a", OUTSIDE),
    ),
    "wild-read": (
        ("a.wild.local", "GET", "/w", INSIDE),
        ("b.wild.local", "GET", "/a/b", INSIDE),
        ("a.wild.local", "POST", "/w", OUTSIDE),
        ("b.wild.local", "HEAD", "/w", OUTSIDE),
    ),
}


@dataclass(frozen=True)
class Miss:
    """A binding, the claims that satisfy it (`bases`: several, which differ in claims it does not ask for), and
    `mutations`: each changes one claim so that exactly one of its conditions fails, named by its kind."""

    binding: str
    roles: tuple[str, ...]
    issuer: str  # gitlab, okta, okta-twin
    audience: Any
    bases: tuple[dict[str, Any], ...]
    mutations: tuple[tuple[str, dict[str, Any]], ...]
    allowed: tuple[dict[str, Any], ...] = ()  # one claim changed, still allowed: the other side of the boundary


DEPLOYER: dict[str, Any] = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
OTHER: dict[str, Any] = {"project_id": 43, "project_path": "acme/platform/other", "namespace_id": 11}
SITE: dict[str, Any] = {"project_id": 44, "project_path": "acme/web/site", "namespace_id": 12}
MR = "merge_request_event"
NEAR_MISSES: tuple[Miss, ...] = (
    Miss(
        "deployer-reads-reports",
        ("reports-read",),
        "gitlab",
        "https://reports.local",
        (
            {**DEPLOYER},
            {**DEPLOYER, "ref": "feature/x", "user_login": "carol"},
            {**DEPLOYER, "ref": "v2", "ref_type": "tag", "pipeline_source": "schedule"},
        ),
        (
            ("project_id", OTHER),
            ("ref_protected", {"ref_protected": False}),
            ("pipeline_source (negated)", {"pipeline_source": MR}),
        ),
        ({"pipeline_source": "merge_request_eventx"}, {"environment": "production"}),
    ),
    Miss(
        "deployer-deploys",
        ("deploy-trigger",),
        "gitlab",
        "https://deploy.local",
        (
            {**DEPLOYER},
            {**DEPLOYER, "environment": "production", "user_login": "carol"},
            {**DEPLOYER, "user_access_level": "owner", "sha": "0abc"},
        ),
        (
            ("project_id", {"project_id": 44}),
            ("ref", {"ref": "main2"}),
            ("ref", {"ref": "Main"}),
            ("ref_type", {"ref_type": "tag"}),
            ("ref_protected", {"ref_protected": False}),
            ("pipeline_source", {"pipeline_source": "schedule"}),
        ),
        ({"sha": "f00"}, {"user_access_level": "maintainer", "user_login": "bob"}),
    ),
    Miss(
        "releases-write-reports",
        ("reports-write",),
        "gitlab",
        ["https://wrong.local", "https://reports.local"],
        (
            {**OTHER, "ref": "release/1", "environment": "production"},
            {**DEPLOYER, "ref": "release/2.0", "environment": "staging", "ref_protected": False},
            {**OTHER, "ref": "release/x", "environment": "staging", "ref_type": "tag", "user_login": "bob"},
        ),
        (
            ("namespace_id", {**SITE}),
            ("ref (glob)", {"ref": "release/1/hotfix"}),
            ("ref (glob)", {"ref": "releases/1"}),
            ("ref (glob)", {"ref": "release"}),
            ("environment (list)", {"environment": "dev"}),
            ("environment (list)", {"environment": "Production"}),
            ("environment (list)", {"environment": "production/eu"}),
            ("pipeline_source (negated)", {"pipeline_source": MR}),
        ),
        ({"ref": "release/"}, {"environment": "staging"}),
    ),
    Miss(
        "reviewers-deploy",
        ("deploy-trigger",),
        "gitlab",
        "https://deploy.local",
        (
            {**OTHER, "pipeline_source": MR, "user_login": "bob"},
            {**DEPLOYER, "pipeline_source": MR, "user_login": "alice", "ref_protected": False, "ref": "feature/x"},
        ),
        (
            ("project_id (list)", {**SITE}),
            ("pipeline_source", {"pipeline_source": "push"}),
            ("user_login (list)", {"user_login": "carol"}),
            ("user_login (list)", {"user_login": "Alice"}),
        ),
        ({"user_login": "alice"}, {"ref_protected": True, "environment": "review/x"}),
    ),
    Miss(
        "maintainers-read-flags",
        ("flags-read",),
        "gitlab",
        "api://flags",
        (
            {**OTHER, "environment": "prod-eu", "deployment_tier": "production", "user_access_level": "maintainer"},
            {**OTHER, "environment": "live", "deployment_tier": "production", "user_access_level": "owner"},
        ),
        (
            ("project_id", {**DEPLOYER}),
            ("deployment_tier", {"deployment_tier": "staging"}),
            ("user_access_level (list)", {"user_access_level": "developer"}),
            ("pipeline_source (negated)", {"pipeline_source": MR}),
        ),
        ({"user_access_level": "owner"}, {"pipeline_source": "web", "ref": "feature/y"}),
    ),
    Miss(
        "web-tags-read",
        ("reports-read",),
        "gitlab",
        "https://reports.local",
        (
            {**SITE, "ref": "v1.0", "ref_type": "tag", "sha": "0abc"},
            {**SITE, "ref": "v2.0", "ref_type": "tag", "sha": "0", "ref_protected": False},
        ),
        (
            ("namespace_id", {"namespace_id": 11}),
            ("ref_type", {"ref_type": "branch"}),
            ("sha (glob)", {"sha": "f00"}),
            ("job_project_path (glob)", {"raw": {"job_project_path": "acme/web/site/x"}}),
            ("job_project_path (glob)", {"raw": {"job_project_path": "acme/webx/site"}}),
            ("pipeline_source (negated)", {"pipeline_source": MR}),
        ),
        ({"sha": "00"}, {"raw": {"job_project_path": "acme/web/"}}),
    ),
    Miss(
        "web-wild",
        ("wild-read",),
        "gitlab",
        "https://reports.local",
        ({**SITE}, {**SITE, "ref": "feature/x", "ref_protected": False}),
        (("project_id", {**OTHER}), ("pipeline_source (negated)", {"pipeline_source": MR})),
        ({"ref_type": "tag", "ref": "v3"}, {"pipeline_source": "trigger"}),
    ),
    Miss(
        "admins-read",
        ("flags-read", "reports-read"),
        "okta",
        ["api://flags", "https://reports.local"],
        (
            {"groups": ["eng", "platform-admins"], "email": "dev@example.com"},
            {"groups": ["platform-admins"], "email": "ops@example.com", "name": "Ops"},
        ),
        (
            ("groups (list claim)", {"groups": ["eng"]}),
            ("groups (list claim)", {"groups": ["platform-admins-x"]}),
            ("email (list claim, glob)", {"email": "dev@example.org"}),
            ("email (list claim, glob)", {"email": "a/b@example.com"}),
        ),
        ({"raw": {"groups": "platform-admins"}}, {"raw": {"email": ["x@example.com"]}}),
    ),
    Miss(
        "twins-read",
        ("reports-read",),
        "okta-twin",
        "https://reports.local",
        ({"groups": ["twins"]}, {"groups": ["eng", "twins"], "email": "x@evil.example.org"}),
        (("groups (list claim)", {"groups": ["twin"]}), ("groups (list claim)", {"raw": {"groups": "twins-2"}})),
        ({"raw": {"groups": "twins"}}, {"groups": ["x", "twins"]}),
    ),
)


@dataclass(frozen=True)
class Sent:
    """One token of the matrix, the requests it sends, and what the generator means each to show: the grant
    and the kind of the only condition it fails (None: that grant allows it; RULE: a method or a path), or
    None (the sampled part; a near miss outside the rules, which fails two)."""

    token: str | None
    asked: tuple[Request, ...]
    expect: tuple[tuple[str, str | None] | None, ...] = ()


def near_miss_tokens(gitlab: FakeGitLab, okta: FakeOidc) -> list[Sent]:
    """Every binding's bases, each as is, with one claim changed and still allowed, and with one claim changed
    to fail exactly one condition, each sent just inside and just outside its roles' rules; each token with its
    audience alone and in a list behind a wrong one. The first base of each GitLab binding also with a revoked
    job (the deny list answers before RBAC)."""
    out: list[Sent] = []
    revoked = itertools.cycle(REVOKED_JOBS)
    for miss in NEAR_MISSES:
        asked, places = [], []
        for role in miss.roles:
            for host, method, path, where in ROLE_REQUESTS[role]:
                asked.append(Request(method, host, path))
                places.append((f"{miss.binding}/{role}", where))
        audiences = [miss.audience]
        if isinstance(miss.audience, str):
            audiences.append(["https://wrong.local", miss.audience])
        for n, base in enumerate(miss.bases):
            variants: list[tuple[str | None, dict[str, Any]]] = [(None, base)]
            variants += [(None, {**base, **a}) for a in miss.allowed]
            variants += [(kind, {**base, **m}) for kind, m in miss.mutations]
            for kind, claims in variants:
                expect = tuple(_expected(grant, where, kind) for grant, where in places)
                for audience in audiences:
                    out.append(Sent(_mint(gitlab, okta, miss, claims, audience), tuple(asked), expect))
            if miss.issuer == "gitlab" and n == 0:
                token = _mint(gitlab, okta, miss, {**base, "job_id": next(revoked)}, miss.audience)
                out.append(Sent(token, tuple(asked), (None,) * len(asked)))
    return out


def _expected(grant: str, where: str, kind: str | None) -> tuple[str, str | None] | None:
    if where == INSIDE:
        return grant, kind
    return (grant, RULE) if kind is None else None  # a changed claim outside the rules fails two


def _mint(gitlab: FakeGitLab, okta: FakeOidc, miss: Miss, claims: dict[str, Any], audience: Any) -> str:
    if miss.issuer == "gitlab":
        return gitlab.mint(**claims, aud=audience, ttl=3600)
    raw = dict(claims.get("raw", {}))
    if miss.issuer == "okta-twin":
        raw["iss"] = twin_issuer(okta)
    given = {k: v for k, v in claims.items() if k != "raw"}
    return okta.mint(**given, aud=audience, ttl=3600, raw=raw)


def failure_kind(failure: dict[str, Any]) -> str:
    """The failing condition's kind, as NEAR_MISSES names it: the claim, and how it matches."""
    what, text = str(failure["what"]), str(failure.get("condition") or "")
    qualifiers = []
    if " has " in text:
        qualifiers.append("list claim")
    elif " in [" in text:
        qualifiers.append("list")
    if "*" in text or "?" in text:
        qualifiers.append("glob")
    if " != " in text or " not in " in text or " has no " in text:
        qualifiers.append("negated")
    return f"{what} ({', '.join(qualifiers)})" if qualifiers else what


@dataclass
class ExplainStack(Served):
    okta: FakeOidc | None = None


@pytest.fixture(scope="module")
def explain_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExplainStack]:
    from functools import partial

    from tests.support.stack import EnvoySpec

    with (
        FakeOidc() as okta,
        serve_stack(
            tmp_path_factory.mktemp("explain"),
            partial(policy, okta=okta),
            kind=ExplainStack,
            envoy=EnvoySpec("explain-1", "explain-envoy", flush_logs=True),
            backends=("echo",),
            webhook=True,
            ready=lambda built: built.call("reports.local", None, path="/healthz") == 200,
        ) as built,
    ):
        built.okta = okta
        yield built


class Pool:
    """One keep-alive connection per worker thread, to one address; `close` closes them all."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._local = threading.local()
        self._opened: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def send(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, bytes]:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection(LOOPBACK, self._port, timeout=10)
            with self._lock:
                self._opened.append(connection)
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        with self._lock:
            for connection in self._opened:
                connection.close()


def client_address(index: int) -> str:
    """Each token's requests come from an address of its own (all of 127/8 is this host): Envoy's access log
    records it, which is how a log line is matched to its case (Envoy replaces a client's x-request-id)."""
    return f"127.1.{index // 250}.{index % 250 + 1}"


def send_all(port: int, address: str, token: str | None, asked: list[Request]) -> list[int]:
    """The token's requests in order on one keep-alive connection (a new one only if Envoy closed it)."""
    statuses = []
    connection: http.client.HTTPConnection | None = None
    for request in asked:
        if connection is None:
            connection = http.client.HTTPConnection(LOOPBACK, port, timeout=10, source_address=(address, 0))
        headers = {"Host": request.host}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        connection.request(request.method, request.path, headers=headers)
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        if response.will_close:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()
    return statuses


def envoy_decision(entry: dict[str, Any]) -> str:
    """The decision as Envoy's access log records it."""
    code, details = int(entry["code"]), str(entry.get("details") or "")
    if code == 200:
        return ALLOWED
    if code == 400:
        return REJECTED
    if details.startswith("jwt_authn_access_denied"):
        return UNAUTHENTICATED
    if f"[{REVOKED_POLICY}]" in details:
        return REVOKED
    if details.startswith("rbac_access_denied"):
        return DENIED if entry.get("route") not in (None, "", "-") else NO_ROUTE
    return f"unexpected {code} {details}"


@dataclass(frozen=True)
class Case:
    client: str
    token: str | None
    claims: dict[str, Any] | None
    request: Request
    expect: tuple[str, str | None] | None = None  # Sent.expect


def offline_inputs(directory: Path) -> ExplainInputs:
    policy = parse_policy(read_policy_dir(directory, ReadLimits()))
    return explain_inputs(policy, Resolution().update(policy), serve_default_credentials(True), revocations_known=False)


def _revoke(stack: ExplainStack) -> None:
    before = int(stack.controlplane.status()["credentials"]["revoked_jobs"])
    for job in REVOKED_JOBS:
        stack.job_finished(job)
    poll_until(
        lambda: int(stack.controlplane.status()["credentials"]["revoked_jobs"]) >= before + len(REVOKED_JOBS),
        15,
        message="jobs revoked",
    )
    token = stack.gitlab.mint(
        project_id=42,
        project_path="acme/platform/deployer",
        namespace_id=11,
        aud="https://reports.local",
        job_id=REVOKED_JOBS[-1],
        ttl=3600,
    )
    poll_until(lambda: stack.call("reports.local", token) == 403, 15, message="deny list at the gateway")


@pytest.fixture(scope="module")
def revoked(explain_stack: ExplainStack) -> ExplainStack:
    """The stack once REVOKED_JOBS are on the deny list, at the server and at the gateway."""
    _revoke(explain_stack)
    return explain_stack


def test_explain_agrees_with_envoy_on_every_case_of_the_matrix(
    revoked: ExplainStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = revoked
    assert stack.okta is not None
    with FakeOidc(issuer_path="/stranger") as stranger:
        sampled: list[str | None] = [None, *gitlab_tokens(stack.gitlab, stranger), *okta_tokens(stack.okta)]
    sampled += exchanged_credentials(stack)
    every_request = tuple(requests(stack.listen_port))
    sent = [Sent(token, every_request) for token in sampled] + near_miss_tokens(stack.gitlab, stack.okta)
    cases = [
        Case(client_address(n), s.token, decode_token(s.token) if s.token else None, request, expect)
        for n, s in enumerate(sent)
        for request, expect in itertools.zip_longest(s.asked, s.expect)
    ]
    by_key: dict[tuple[str, str, str, str], Case] = {}
    for case in cases:
        bare = case.request.path.partition("?")[0]
        for path in {bare, normalize_path(bare), unquote(bare)}:  # Envoy logs a refused %2F decoded
            key = (case.client, case.request.method, case.request.host, path)
            assert by_key.setdefault(key, case) is case, f"two cases share {key}"

    started = time.monotonic()
    admin = Pool(stack.controlplane.admin_port)

    def through_server(case: Case) -> dict[str, Any]:
        body = {"claims": case.claims, "method": case.request.method, "host": case.request.host}
        body["path"] = case.request.path
        status, answer = admin.send("POST", "/explain", {"Content-Type": "application/json"}, json.dumps(body).encode())
        assert status == 200, answer
        return dict(json.loads(answer))

    with ThreadPoolExecutor(8) as workers:
        answered = workers.map(
            lambda n: send_all(stack.listen_port, client_address(n), sent[n].token, list(sent[n].asked)),
            range(len(sent)),
        )
        statuses = [status for per_token in answered for status in per_token]
    envoy_seconds = time.monotonic() - started
    with ThreadPoolExecutor(6) as workers:
        served = list(workers.map(through_server, cases))
    admin.close()
    server_seconds = time.monotonic() - started - envoy_seconds

    entries: dict[int, dict[str, Any]] = {}

    def logged() -> bool:
        for line in stack.access_log.read_text().splitlines():
            entry = json.loads(line)
            case = by_key.get((entry["client"], entry["method"], entry["authority"], entry["path"]))
            if case is not None:
                entries[id(case)] = entry
        return len(entries) >= len(cases)

    poll_until(logged, 20, interval=0.2, message="every case in the access log")
    observed = [envoy_decision(entries[id(c)]) for c in cases]

    disagreements = [
        (c, o, s["decision"], status, s["status"])
        for c, o, s, status in zip(cases, observed, served, statuses, strict=True)
        if o != s["decision"] or status != (s["status"] or 200)
    ]
    counts = Counter(observed)
    kinds, misread = near_miss_kinds(cases, observed, served)
    print(
        f"\n{len(cases)} cases: {dict(sorted(counts.items()))}; Envoy {envoy_seconds:.1f}s, "
        f"server explain {server_seconds:.1f}s; disagreements: {len(disagreements)}"
        f"\nthe only failing condition of a denied near miss, by kind: {dict(sorted(kinds.items()))}"
    )
    for case, envoy, said, status, said_status in disagreements[:10]:
        print(f"  {case.request} claims={case.claims}: Envoy {envoy} {status}, explain {said} {said_status}")
    for line in misread[:10]:
        print("  not the near miss meant: " + line)
    assert not disagreements
    assert not misread
    assert {ALLOWED, DENIED, REVOKED, UNAUTHENTICATED, NO_ROUTE, REJECTED} <= set(counts)
    assert counts[ALLOWED] + counts[DENIED] + counts[REVOKED] >= 2000, counts  # decided by RBAC (or the deny list)
    assert min(counts[d] for d in (UNAUTHENTICATED, NO_ROUTE)) >= 50, counts
    assert min(counts[d] for d in (ALLOWED, DENIED)) >= 500, counts
    assert counts[REVOKED] >= 50, counts
    missing = {k: kinds[k] for k in NEAR_MISS_KINDS if kinds[k] < 10}
    assert not missing, f"condition kinds that are the only failure in fewer than 10 denied cases: {missing}"
    assert envoy_seconds + server_seconds < 60
    assert sum(1 for s in served if s["shadow"]) >= 10  # the dry-run binding would allow some, named as shadow
    vault = [o for c, o in zip(cases, observed, strict=True) if c.request.host == "vault.local"]
    assert ALLOWED in vault and UNAUTHENTICATED in vault  # exchanged credentials only

    # The offline answer (the policy directory alone) agrees too, except that it cannot know the deny list.
    inputs = offline_inputs(stack.policy)
    now = int(time.time())
    offline = [explain(inputs, c.claims, c.request, now).decision for c in cases]
    differing = [(c.request, o, d) for c, o, d in zip(cases, observed, offline, strict=True) if o != d]
    assert all(o == REVOKED and d in (ALLOWED, DENIED, NO_ROUTE) for _, o, d in differing), differing[:5]

    # And a mutated evaluation would disagree: negated conditions read as plain ones, globs as literals, an
    # OIDC list claim as a plain string, a list of values as its first.
    decided = [(c, o) for c, o in zip(cases, observed, strict=True) if o in (ALLOWED, DENIED)]  # by RBAC

    def mutated(condition_holds: Callable[..., bool]) -> int:
        with monkeypatch.context() as patch:
            patch.setattr(evaluate.Evaluator, "condition_holds", condition_holds)
            return sum(1 for c, o in decided if explain(inputs, c.claims, c.request, now).decision != o)

    original = evaluate.Evaluator.condition_holds

    def negation_ignored(self: evaluate.Evaluator, claims: Any, condition: Any) -> bool:
        return original(self, claims, condition._replace(negated=False))

    def globs_literal(self: evaluate.Evaluator, claims: Any, condition: Any) -> bool:
        if any("*" in v for v in condition.values):
            return claims.get(condition.claim) in condition.values
        return original(self, claims, condition)

    def lists_as_strings(self: evaluate.Evaluator, claims: Any, condition: Any) -> bool:
        return original(self, claims, condition._replace(listy=False))

    def first_value_only(self: evaluate.Evaluator, claims: Any, condition: Any) -> bool:
        return original(self, claims, condition._replace(values=condition.values[:1]))

    broken = {
        "negation ignored": mutated(negation_ignored),
        "globs literal": mutated(globs_literal),
        "list claims read as strings": mutated(lists_as_strings),
        "a list's first value only": mutated(first_value_only),
    }
    print(f"mutated evaluations disagree with Envoy on: {broken}")
    assert min(broken.values()) >= 20, broken


# Every kind of condition the policy language compiles to, each of which must be the only failing one (by
# `failure_kind`) in some denied cases; and the method or path of a role's rules.
NEAR_MISS_KINDS = (
    "project_id",
    "project_id (list)",
    "namespace_id",
    "ref",
    "ref (glob)",
    "ref_type",
    "ref_protected",
    "environment (list)",
    "pipeline_source",
    "pipeline_source (negated)",
    "user_login (list)",
    "deployment_tier",
    "user_access_level (list)",
    "sha (glob)",
    "job_project_path (glob)",
    "groups (list claim)",
    "email (list claim, glob)",
    "method",
    "path",
)


def near_miss_kinds(
    cases: list[Case], observed: list[str], served: list[dict[str, Any]]
) -> tuple[Counter[str], list[str]]:
    """For each near miss: Envoy allowed it (when meant to be allowed), or Envoy denied it and the server's
    nearest grants name the binding meant, with exactly the one failing condition of the kind meant. The
    counts of those kinds, and the cases that are not what the generator meant."""
    kinds: Counter[str] = Counter()
    misread = []
    for case, envoy, answer in zip(cases, observed, served, strict=True):
        if case.expect is None:
            continue
        grant, kind = case.expect
        if kind is None:
            if envoy != ALLOWED or grant not in answer["allowed_by"]:
                misread.append(f"{case.request} {case.claims}: {envoy}, {answer['reason']}, meant allowed by {grant}")
            continue
        failures = next((n["failures"] for n in answer["nearest"] if n["grant"] == grant), None)
        got = [failure_kind(f) for f in failures or ()]
        meant = ("method", "path") if kind == RULE else (kind,)
        if envoy != DENIED or len(got) != 1 or got[0] not in meant:
            misread.append(f"{case.request} {case.claims}: {envoy}, {grant} fails {got}, meant {kind}")
            continue
        kinds[got[0]] += 1
    return kinds, misread


def test_the_command_asks_a_running_server_which_knows_the_revoked_jobs(
    revoked: ExplainStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = revoked
    deployer = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
    token = tmp_path / "job.jwt"
    token.write_text(stack.gitlab.mint(**deployer, aud="https://reports.local", job_id=REVOKED_JOBS[0], ttl=3600))
    request = ["--token-file", str(token), "--url", f"http://reports.local:{stack.listen_port}/r"]
    server = ["explain", "--server", f"{LOOPBACK}:{stack.controlplane.admin_port}"]
    assert stack.call("reports.local", token.read_text()) == 403
    assert main([*server, *request]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"REVOKED: job {REVOKED_JOBS[0]} is on the deny list") and SIGNATURE_NOTE in out
    assert main(["explain", str(stack.policy), *request]) == 0  # offline, the deny list is unknown
    assert "not known offline" in capsys.readouterr().out
    token.write_text(stack.gitlab.mint(**deployer, aud="https://reports.local", ref_protected=False, ttl=3600))
    assert stack.call("reports.local", token.read_text()) == 403
    assert main([*server, *request, "--format", "json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert (answer["decision"], answer["nearest"][0]["grant"]) == (DENIED, "deployer-reads-reports/reports-read")
    assert answer["nearest"][0]["failures"][0]["text"] == 'ref_protected: token says "false", binding needs "true"'
    assert main(["explain", "--server", f"{LOOPBACK}:1", *request]) == 2


# -- a server watching GitLab answers with GitLab's state as it is now


def live_policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra="api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s"),
        backend("reports-api", given.ports["echo"]),
        "kind: Role\nname: reports-read\nbackend: reports-api\nrules: [{methods: [GET]}]\n",
        binding("deployer-reads-reports", ["reports-read"], "{project: acme/platform/deployer, ref_protected: true}"),
        # A subject over a group, narrowed project by project: one alternative per project, each its own refs.
        binding("platform-releases", ["reports-read"], '{group: acme/platform, ref: "release/*", ref_protected: true}'),
        gateway(given.listen_port, ["reports-api"]),
    )


@dataclass
class LiveStack(Served):
    deployer: int = 0
    projects: dict[str, int] = field(default_factory=dict)  # by path

    def token(self, **claims: Any) -> str:
        base: dict[str, Any] = {
            "project_id": self.deployer,
            "project_path": "acme/platform/deployer",
            "namespace_id": 11,
        }
        return self.gitlab.mint(**{**base, **claims}, aud="https://reports.local", ttl=3600)

    def both(self, token: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
        """Envoy's status and the server's explanation of `method` reports.local/r with `token`."""
        body = {"claims": decode_token(token), "method": method, "host": "reports.local", "path": "/r"}
        pool = Pool(self.controlplane.admin_port)
        try:
            status, answer = pool.send(
                "POST", "/explain", {"Content-Type": "application/json"}, json.dumps(body).encode()
            )
        finally:
            pool.close()
        assert status == 200, answer
        return self.call("reports.local", token, method), dict(json.loads(answer))


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    from tests.support.stack import EnvoySpec

    with FakeGitLab() as gitlab:
        deployer = gitlab.add_project("acme/platform/deployer", branches=["main", "feature"])
        projects = {
            "acme/platform/tools": gitlab.add_project(
                "acme/platform/tools", branches=["release/1", "release/2"], protected=["main", "release/1"]
            ),
            "acme/platform/infra": gitlab.add_project(
                "acme/platform/infra", branches=["release/7"], protected=["release/*"]
            ),
            "acme/web/site": gitlab.add_project("acme/web/site", branches=["release/1"], protected=["release/*"]),
        }
        with serve_stack(
            tmp_path_factory.mktemp("explain-live"),
            live_policy,
            kind=LiveStack,
            envoy=EnvoySpec("explain-live-1", "explain-live-envoy"),
            backends=("echo",),
            gitlab=gitlab,
            gitlab_token=True,
            webhook=True,
        ) as built:
            built.deployer, built.projects = deployer, projects
            poll_until(lambda: built.both(built.token())[0] == 200, 20, message="the deployer reads reports")
            yield built


def test_a_server_watching_gitlab_explains_with_gitlab_as_it_is_now(live_stack: LiveStack) -> None:
    stack = live_stack
    status, answer = stack.both(stack.token())
    assert (status, answer["decision"], answer["allowed_by"]) == (200, ALLOWED, ["deployer-reads-reports/reports-read"])
    # The token says its branch is protected; GitLab protects only main: the subject was narrowed to main.
    status, answer = stack.both(stack.token(ref="feature", ref_protected=True))
    assert (status, answer["decision"]) == (403, DENIED)
    texts = [f["text"] for f in answer["nearest"][0]["failures"]]
    assert texts == ['ref: token says "feature", binding needs "main"'], texts
    stack.gitlab.archive_project(stack.deployer)
    try:
        poll_until(lambda: stack.both(stack.token())[0] == 403, 10, message="archived project denied")
        status, answer = stack.both(stack.token())
        assert (status, answer["decision"]) == (403, DENIED)
        (withdrawn,) = [f["text"] for f in answer["nearest"][0]["failures"]]
        assert withdrawn.startswith(f"GitLab withdrew access: project acme/platform/deployer (id {stack.deployer})")
        assert "is archived (policy.yaml:" in withdrawn
    finally:
        stack.gitlab.archive_project(stack.deployer, archived=False)


def test_near_misses_across_the_alternatives_of_a_subject_narrowed_by_gitlab(live_stack: LiveStack) -> None:
    """`{group: acme/platform, ref: "release/*", ref_protected: true}`, watched live, is one alternative per
    project of the group, each with the release refs GitLab protects in it now. Near misses of it, through
    Envoy and the server: the alternative that comes closest names the one condition that fails."""
    stack, grant = live_stack, "platform-releases/reports-read"
    poll_until(lambda: stack.both(stack.token())[0] == 200, 20, message="GitLab's state as the fixture made it")

    def token(path: str, ref: str, **claims: Any) -> str:
        return stack.token(project_id=stack.projects[path], project_path=path, ref=ref, **claims)

    allowed = [
        token("acme/platform/tools", "release/1"),
        token("acme/platform/infra", "release/7"),
    ]
    near: list[tuple[str, tuple[str, ...]]] = [
        (token("acme/platform/tools", "release/2"), ("ref",)),  # claims protected; GitLab does not protect it
        (token("acme/platform/tools", "release/7"), ("ref", "project_id")),  # infra's ref, tools' project
        (token("acme/web/site", "release/1"), ("project_id",)),  # tools' ref, outside the group
        (token("acme/platform/tools", "release/1", pipeline_source="merge_request_event"), ("pipeline_source",)),
        (token("acme/platform/tools", "release/1", ref_protected=False), ("ref_protected",)),  # both must hold
    ]
    near += [(t, ("method",)) for t in allowed]
    checked = 0
    for one in allowed:
        status, answer = stack.both(one)
        assert (status, answer["decision"], answer["allowed_by"]) == (200, ALLOWED, [grant]), answer
        checked += 1
    for one, kinds in near:
        method = "POST" if kinds == ("method",) else "GET"
        status, answer = stack.both(one, method)
        assert (status, answer["decision"]) == (403, DENIED), answer["reason"]
        (failures,) = [n["failures"] for n in answer["nearest"] if n["grant"] == grant]
        # Beside the failing condition, what GitLab withdrew from the subject (the deployer has no release ref)
        failing = [f["what"] for f in failures if f["what"] != "withdrawn"]
        assert len(failing) == 1 and failing[0] in kinds, failures
        if kinds != ("method",):  # said of a subject that does not match, whose withdrawn parts may be why
            assert "no ref with ref=release/*" in failures[-1]["text"], failures
        checked += 1
    assert checked == len(allowed) + len(near) == 9


# -- the adversarial matrix: what the generated matrix does not produce


def raw_send(port: int, address: str, method: str, host: str, path: str, token: str | None) -> int:
    """One request written byte for byte (http.client would refuse or rewrite some of these), on a connection
    of its own from `address`; Envoy's status, or 0 when it closed without one."""
    import socket

    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    with socket.create_connection((LOOPBACK, port), timeout=10, source_address=(address, 0)) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    parts = answer.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def adversarial_tokens(stack: ExplainStack) -> dict[str, str]:
    """Tokens signed by the policy's GitLab with claims of odd types, odd times and odd shapes, by label."""
    gitlab, now, okta = stack.gitlab, int(time.time()), stack.okta
    assert okta is not None
    deployer: dict[str, Any] = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
    reports = "https://reports.local"

    base = gitlab.mint(**deployer, aud=reports, ttl=3600)
    payload, body = json.dumps(decode_token(base)), base.split(".")[1]

    def mint(**raw: Any) -> str:
        claims = decode_token(base)
        for name, value in raw.items():
            if value is OMIT:
                claims.pop(name)
            else:
                claims[name] = value
        return signed(stack, json.dumps(claims))

    header, _, signature = base.split(".")
    return {
        "ok": base,
        "aud list, one right": mint(aud=["https://wrong.local", reports]),
        "aud list with a number": mint(aud=[reports, 5]),
        "aud a number": mint(aud=5),
        "aud null": mint(aud=None),
        "aud empty list": mint(aud=[]),
        "exp float": mint(exp=now + 3600.5),
        "exp float past": mint(exp=now - SKEW - 100.5),
        "exp string": mint(exp=str(now + 3600)),
        "exp huge float": mint(exp=1e20),
        "exp 2**64": mint(exp=2**64),
        "exp 2**62": mint(exp=2**62),
        "exp null": mint(exp=None),
        "exp true": mint(exp=True),
        "exp negative": mint(exp=-1),
        "exp zero": mint(exp=0),
        "nbf within skew": mint(nbf=now + SKEW // 4),
        "nbf beyond skew": mint(nbf=now + SKEW + 900),
        "nbf float": mint(nbf=now - 5.5),
        "nbf string": mint(nbf=str(now - 5)),
        "nbf null": mint(nbf=None),
        "iat string": mint(iat=str(now)),
        "iat float": mint(iat=now + 0.25),
        "iat huge": mint(iat=1e20),
        "iat future": mint(iat=now + 10_000),
        "iat null": mint(iat=None),
        "sub number": mint(sub=7),
        "sub trailing slash": mint(sub="project_path:acme/platform/deployer/"),
        "jti number": mint(jti=7),
        "iss trailing slash": mint(iss=gitlab.issuer + "/"),
        "iss number": mint(iss=7),
        "iss missing": mint(iss=OMIT),
        "project_id number": mint(project_id=42),
        "ref_protected bool": mint(ref_protected=True),
        "ref_protected null": mint(ref_protected=None),
        "project_path list": mint(project_path=["acme/platform/deployer"]),
        "project_path nested": mint(project_path=[["acme/platform/deployer"]]),
        "project_path unicode": mint(project_path="acme/platform/depl\u043eyer"),
        "job_id number": mint(job_id=REVOKED_JOBS[0]),
        "groups list": mint(groups=["platform-admins"]),
        "okta twin": okta.mint(aud=reports, groups=["twins"], raw={"iss": twin_issuer(okta)}),
        "okta twin, not a twin": okta.mint(aud=reports, groups=["eng"], raw={"iss": twin_issuer(okta)}),
        "okta, a twin": okta.mint(aud=reports, groups=["twins"]),
        "okta twin for flags": okta.mint(aud="api://flags", groups=["twins"], raw={"iss": twin_issuer(okta)}),
        "okta twin, wrong keys": okta.mint(
            aud=reports, groups=["twins"], raw={"iss": twin_issuer(okta)}, key=SigningKey.generate()
        ),
        **{
            f"okta groups {json.dumps(groups)}": okta.mint(aud=reports, raw={"groups": groups})
            for groups in (
                "platform-admins",
                ["platform-admins", 5],
                [["platform-admins"]],
                [None, "platform-admins"],
                {"platform-admins": True},
                [],
                None,
                "PLATFORM-ADMINS",
                ["platform-admins "],
                ["platform-admins\u0000"],
            )
        },
        **{
            f"okta email {json.dumps(email)}": okta.mint(aud=reports, groups=["platform-admins"], raw={"email": email})
            for email in ("@example.com", "a/b@example.com", "x@EXAMPLE.com", ["x@example.com"], 5, "x@example.com\n")
        },
        "not a JWT": "not-a-token",
        "two parts": f"{header}.{base.split('.')[1]}",
        "payload not JSON": f"{header}.bm90IGpzb24.{signature}",
        "payload a list": f"{header}.WzFd.{signature}",
        "header not JSON": f"bm90IGpzb24.{base.split('.')[1]}.{signature}",
        "signature empty": f"{header}.{base.split('.')[1]}.",
        "duplicate exp, last expired": signed(stack, json.dumps(decode_token(base))[:-1] + f', "exp": {now - 9999}}}'),
        "alg none": signed(stack, payload, '{"alg": "none", "typ": "JWT"}'),
        "alg missing": signed(stack, payload, '{"typ": "JWT"}'),
        "alg number": signed(stack, payload, '{"alg": 1}'),
        "kid number": signed(stack, payload, '{"alg": "RS256", "kid": 5}'),
        "header a list": signed(stack, payload, "[1]"),
        "header duplicate alg": signed(stack, payload, '{"alg": "RS256", "alg": "none"}'),
        "header HS256": signed(stack, payload, '{"alg": "HS256"}'),
        "payload NaN": signed(stack, payload[:-1] + ', "x": NaN}'),
        "payload padded": f"{header}.{body}{'=' * (-len(body) % 4) or '=='}.{signature}",
        "payload base64 std": f"{header}.{body.replace('-', '+').replace('_', '/')}.{signature}",
        "signature padded": f"{header}.{body}.{signature}==",
        "four parts": f"{base}.x",
        **{
            f"payload depth {n}": signed(stack, payload[:-1] + ', "x": ' + "[" * n + "]" * n + "}")
            for n in range(97, 103)
        },
        "signature bad chars": f"{header}.{body}.{signature[:-2]}!!",
        "payload deep": signed(stack, payload[:-1] + ', "x": ' + "[" * 200 + "]" * 200 + "}"),
        "duplicate aud, last wrong": signed(stack, json.dumps(decode_token(base))[:-1] + ', "aud": "https://x"}'),
    }


def signed(stack: ExplainStack, payload: str, header: str | None = None) -> str:
    """`payload`, verbatim (any JSON, even a wrong type or a key twice), RS256-signed by the fake GitLab's key."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    def encoded(text: str) -> str:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()

    key = stack.gitlab.signing_key
    header = header or json.dumps({"alg": "RS256", "kid": key.kid, "typ": "JWT"})
    head = encoded(header) + "." + encoded(payload)
    signature = key.private_key.sign(head.encode(), padding.PKCS1v15(), hashes.SHA256())
    return head + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def adversarial_requests(port: int) -> list[Request]:
    """Encoded paths, dot segments, odd hosts and methods, the exchange path."""
    paths = [
        "/reports%2F1",
        "/reports%2f1",
        "/a%5Cb",
        "/a%5cb",
        "/%2e%2e/healthz",
        "/x/%2e%2e/healthz",
        "/x/%2E%2E/healthz",
        "/x/%2e./healthz",
        "/heal%74hz",
        "/heal%74hz?a=b",
        "/%68ealthz",
        "/./healthz",
        "//healthz",
        "/healthz/",
        "/healthz?x=1",
        "/healthz#frag",
        "/healthz;x=1",
        "/HEALTHZ",
        "/x/..",
        "/..",
        "/a/b/../../healthz",
        "/%7Ehealthz",
        "/%41b",
        "/a%20b",
        "/a%00b",
        "/x/./../healthz",
        "/healthz/.",
        "/healthz/..",
        "/%2fhealthz",
        "/a\\..\\healthz",
        "/a%25b",
        "/%zz",
        "/healthz%3Fa",
        "/r?a=%2F",
        "/r%3Bx",
        "/.controlplane/token",
        "/.controlplane/token/",
        "/.controlplane/%74oken",
        "/x/../.controlplane/token",
        "/.controlplane//token",
        "/.CONTROLPLANE/token",
        "/r?a=#b",
        '/a"b',
        "/a<b",
        "/a{b",
        "/a|b",
        "/a^b",
        "/a%2Bb",
        "/a+b",
        "/caf%C3%A9",
        "/a%7eb",
        "/a%5fb",
        "/a%2db",
        "/healthz%2e",
        "/healthz%2E%2E",
        "/a/b/..",
        "/a/b/.",
        "/%2E/healthz",
        "/healthz%5F",
        "/a/.hidden/../healthz",
        "/a/...",
        "/a%3bb",
        "/a%3Bb",
        "/.%2e/healthz",
        "/%2e%2e%2fhealthz",
        "/a\\healthz",
        "/x//../healthz",
        "/healthz//..//healthz",
        "/x/..//healthz",
        "/r?x=%00",
        "/r?x=%5C",
        "/r%3F%23",
    ]
    paths += ["/caf\u00e9", "/a\x7fb", "/a`b", "/a}b", "/a\tb", "/healthz?", "/healthz%3f", "/%2e", "/.%2E"]
    out = [Request("GET", "reports.local", p) for p in paths]
    out += [
        Request("POST", "deploy.local", p) for p in ("/deployments/%31", "/deployments%2F1", "/x/%2e%2e/deployments/1")
    ]
    hosts = [
        f"reports.local:{port}",
        "REPORTS.LOCAL",
        "reports.local.",
        f"reports.local.:{port}",
        "[::1]",
        f"[::1]:{port}",
        "127.0.0.1",
        f"a.wild.local:{port}",
        "A.WILD.LOCAL",
        ".wild.local",
        "x.y.wild.local",
        "wild.local.",
        "reports.local:",
        "reports.local:abc",
        "reports.local:0",
        "*.wild.local",
        "a.wild.local.",
    ]
    hosts += ["reports.local ", "reports.local\t", "reports.local:00080", "reports.local:+1", "reports.local:99999"]
    hosts += ["reports.local:-1", "reports.local:1:2", "reports\u00e9.local", "reports.local;x", "[::ffff:127.0.0.1]"]
    hosts += [" reports.local", "REPORTS.local:" + str(port), "reports.local/x", 'reports"local', "reports.local@x"]
    hosts += ["user@reports.local", "reports.local%2e", "reports.local:8o", "reports.local!", "reports_local"]
    out += [Request("GET", h, "/r") for h in hosts]
    methods = ["get", "head", "GeT", "FOO", "PURGE", "OPTIONS", "HEAD", "PATCH", "PROPFIND", "M-SEARCH", "QUERY"]
    methods += ["SOURCE", "LINK", "TRACE", "MKCALENDAR", "REPORT", "BREW", "SEARCH", "DELETE", "PUT", "COPY"]
    methods += ["LOCK", "MKCOL", "MOVE", "PROPPATCH", "UNLOCK", "BIND", "REBIND", "UNBIND", "ACL", "MKACTIVITY"]
    methods += ["CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "UNLINK", "PRI", "Get", "CONNECT"]
    out += [Request(m, "reports.local", "/r") for m in methods]
    out += [Request(m, "deploy.local", "/deployments/1") for m in ("HEAD", "post", "GET")]
    return out


# Refused by the signature or the issuer's keys, which explain does not hold (it says so: SIGNATURE_NOTE).
SIGNATURE_ONLY = ("header HS256", "payload padded", "okta twin, wrong keys")
SIGNATURE_DETAILS = re.compile(r"Jwt_verification_fails|Jwks_doesn't_have_key")


def explained(inputs: ExplainInputs, token: str | None, request: Request, now: int) -> tuple[str, int]:
    """What `controlplane explain` says, reading the token as the command does."""
    claims, problem = read_token(token) if token is not None else (None, None)
    try:
        answer = explain(inputs, claims, request, now, problem)
    except ExplainError:
        return "exit 2", -1
    return answer.decision, answer.status


def observed_decision(status: int, entry: dict[str, Any] | None) -> tuple[str, int]:
    if entry is None:
        return f"not logged ({status})", status
    if entry.get("details") == "via_upstream":
        return ALLOWED, 0
    return envoy_decision(entry), status


def test_explain_agrees_with_envoy_on_an_adversarial_matrix(explain_stack: ExplainStack) -> None:
    stack = explain_stack
    tokens = adversarial_tokens(stack)
    per_token = [Request("GET", "reports.local", "/r"), Request("GET", "reports.local", "/healthz")]
    per_token += [Request("GET", "unknown.local", "/x"), Request("GET", "deploy.local", "/deployments/1")]
    cases: list[tuple[str, str | None, Request]] = [(label, t, r) for label, t in tokens.items() for r in per_token]
    for request in adversarial_requests(stack.listen_port):
        cases += [("no token", None, request), ("ok", tokens["ok"], request)]
    addresses = [f"127.3.{n // 250}.{n % 250 + 1}" for n in range(len(cases))]

    def one(n: int) -> int:
        _, token, request = cases[n]
        return raw_send(stack.listen_port, addresses[n], request.method, request.host, request.path, token)

    with ThreadPoolExecutor(6) as workers:
        statuses = list(workers.map(one, range(len(cases))))
    entries: dict[str, dict[str, Any]] = {}

    def logged() -> bool:
        for line in stack.access_log.read_text().splitlines():
            entry = json.loads(line)
            if str(entry.get("client", "")).startswith("127.3."):
                entries[entry["client"]] = entry
        return len(entries) >= len(cases)

    poll_until(logged, 15, interval=0.2, message="every case in the access log (the codec's 400s too)")
    inputs = offline_inputs(stack.policy)
    now = int(time.time())
    admin = Pool(stack.controlplane.admin_port)

    def through_server(token: str | None, request: Request) -> tuple[str, int]:
        claims, problem = read_token(token) if token is not None else (None, None)
        body = {"claims": claims, "token_problem": problem, "method": request.method, "host": request.host}
        body["path"] = request.path
        status, answer = admin.send("POST", "/explain", {"Content-Type": "application/json"}, json.dumps(body).encode())
        assert status == 200, answer
        document = json.loads(answer)
        return document["decision"], document["status"]

    disagreements, signature_only = [], 0
    for (label, token, request), address, status in zip(cases, addresses, statuses, strict=True):
        envoy = observed_decision(status, entries.get(address))
        said = explained(inputs, token, request, now)
        served = through_server(token, request)
        if served != said:
            disagreements.append(f"{label}: {request}: the server says {served}, offline {said}")
        if label in SIGNATURE_ONLY and SIGNATURE_DETAILS.search(str((entries.get(address) or {}).get("details"))):
            # explain does not check signatures and says so: it cannot tell, and claims nothing about them
            claims, _ = read_token(str(token))
            assert SIGNATURE_NOTE in explain(inputs, claims, request, now).notes
            signature_only += 1
            continue
        if envoy != said and not (envoy[0] == ALLOWED and said[0] == ALLOWED):
            detail = (entries.get(address) or {}).get("details")
            disagreements.append(f"{label}: {request}: Envoy {envoy} ({detail}), explain {said}")
    admin.close()
    twin = explain(inputs, read_token(tokens["okta twin"])[0], per_token[0], now)
    assert twin.allowed_by == ("twins-read/reports-read",)  # two issuers on one JWKS: the token's iss decides
    twin_at = next(
        a for (label, _, r), a in zip(cases, addresses, strict=True) if label == "okta twin" and r == per_token[0]
    )
    assert entries[twin_at]["details"] == "via_upstream"
    print(f"\n{len(cases)} adversarial cases; disagreements: {len(disagreements)}; signature only: {signature_only}")
    for line in disagreements:
        print("  " + line)
    assert not disagreements
