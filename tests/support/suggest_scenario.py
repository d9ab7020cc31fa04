"""A wide `controlplane suggest` scenario: what jobs did, what the broad policy allowed that nobody did, and what
the suggestion may still admit by the documented rules (docs/policy-assistant.md).

Shared by the replay through a real Envoy (tests/test_e2e_suggest.py) and its unit-level twin through the
Evaluator (tests/test_assistant_replay.py), so a mutated proposer is shown to fail the same replay.

Five projects of `acme/platform`, two backends:

| project, backend | refs | sources | CI used? | subject the rules give |
|---|---|---|---|---|
| 42 reports | main, tag v1.0 (protected) | push, schedule | no: a tag ran the tag's CI | protected; observed sources |
| 42 deploy | main | push | yes: `deploy-prod` (main, push, production) | protected; ref, source, env from CI |
| 43 reports | main, feature (unprotected) | push | no: feature is not the default branch | observed sources |
| 45 reports | feature-x (unprotected) | merge_request_event | no: not the default branch | observed sources |
| 46 deploy | main | push | yes: `nightly` (push or schedule, staging) | protected; source, env from CI |

Project 44 made no request. The oracle below (`admitted`) applies the documented rules to what was recorded, written
apart from controlplane/assistant/propose.py: paths generalised where 3+ digit-holding values differ at one segment
(repeated), the subject above per (project, backend).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tests.support.policy_parts import backend, binding, documents, gateway, issuer
from tests.support.stack import INVENTORY_FILE, PolicyInputs

REPORTS_HOST, DEPLOY_HOST = "reports.local", "deploy.local"
BACKEND_OF_HOST = {REPORTS_HOST: "reports-api", DEPLOY_HOST: "deploy-api"}
AUDIENCE_OF_HOST = {REPORTS_HOST: "https://reports.local", DEPLOY_HOST: "https://deploy.local"}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
MR = "merge_request_event"

PROJECTS: dict[int, str] = {
    42: "acme/platform/deployer",
    43: "acme/platform/other",
    44: "acme/platform/third",
    45: "acme/platform/web",
    46: "acme/platform/tools",
}
INVENTORY = (
    "groups:\n  - {id: 10, path: acme}\n  - {id: 11, path: acme/platform, parent_id: 10}\nprojects:\n"
    + "".join(f"  - {{id: {i}, path: {p}, namespace_id: 11}}\n" for i, p in PROJECTS.items())
)

DEPLOYER_CI = """\
include:
  - local: ci/deploy.yml
stages: [test, deploy]
.reports:
  id_tokens:
    REPORTS_TOKEN:
      aud: https://reports.local
read-reports:
  extends: .reports
  stage: test
  rules:
    - if: $CI_COMMIT_REF_PROTECTED == "true"
  script: [./reports.sh]
"""
DEPLOYER_DEPLOY_CI = """\
deploy-prod:
  stage: deploy
  id_tokens:
    DEPLOY_TOKEN:
      aud: https://deploy.local
  environment:
    name: production
    deployment_tier: production
  rules:
    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH && $CI_PIPELINE_SOURCE == "push"
  script: [./deploy.sh]
"""
OTHER_CI = """\
fetch-status:
  id_tokens:
    T:
      aud: https://reports.local
  script: [./status.sh]
"""
WEB_CI = """\
review:
  id_tokens:
    T:
      aud: https://reports.local
  only: [merge_requests]
  script: [./preview.sh]
"""
TOOLS_CI = """\
nightly:
  id_tokens:
    T:
      aud: https://deploy.local
  environment: staging
  rules:
    - if: $CI_PIPELINE_SOURCE == "schedule" || $CI_PIPELINE_SOURCE == "push"
  script: [./nightly.sh]
"""
# project id -> (files, branches, protected branches)
CI_FILES: dict[int, tuple[dict[str, str], list[str], list[str]]] = {
    42: ({".gitlab-ci.yml": DEPLOYER_CI, "ci/deploy.yml": DEPLOYER_DEPLOY_CI}, ["main", "feature"], ["main"]),
    43: ({".gitlab-ci.yml": OTHER_CI}, ["main", "feature"], ["main"]),
    45: ({".gitlab-ci.yml": WEB_CI}, ["main", "feature-x"], ["main"]),
    46: ({".gitlab-ci.yml": TOOLS_CI}, ["main"], ["main"]),
}

# What the documented rules pin, per (project, backend) (the table above); absent keys are not pinned.
EXPECTED_SUBJECTS: dict[tuple[int, str], dict[str, Any]] = {
    (42, "reports-api"): {"project": 42, "ref_protected": True, "pipeline_source": ["push", "schedule"]},
    (42, "deploy-api"): {
        "project": 42,
        "ref_protected": True,
        "ref": ["main"],
        "pipeline_source": ["push"],
        "environment": ["production"],
    },
    (43, "reports-api"): {"project": 43, "pipeline_source": ["push"]},
    (45, "reports-api"): {"project": 45, "pipeline_source": [MR]},
    (46, "deploy-api"): {
        "project": 46,
        "ref_protected": True,
        "pipeline_source": ["push", "schedule"],
        "environment": ["staging"],
    },
}


def broad_policy(
    given: PolicyInputs, inventory: str, *, roles: Sequence[str] = (), bindings: Sequence[str] = ()
) -> dict[str, str]:
    """The broad policy both suggest scenarios start from: anything on both backends for the whole group
    (`platform-all`) and a shadow binding that stays (`deploy-dry-run`), with each scenario's own `roles` and
    `bindings` added after the broad ones."""
    anything = 'rules:\n  - paths: ["/**"]\n'
    return {
        "issuer.yaml": issuer(given.issuer, extra=INVENTORY_FILE),
        "inventory.yaml": inventory,
        "backends.yaml": documents(
            backend("reports-api", given.ports["reports"], extra="public_paths: [/healthz]"),
            backend("deploy-api", given.ports["deploy"]),
        ),
        "roles.yaml": documents(
            f"kind: Role\nname: reports-everything\nbackend: reports-api\n{anything}",
            f"kind: Role\nname: deploy-everything\nbackend: deploy-api\n{anything}",
            *roles,
        ),
        "bindings.yaml": documents(
            binding("platform-all", ["reports-everything", "deploy-everything"], "{group: acme/platform}"),
            *bindings,
            binding("deploy-dry-run", ["deploy-everything"], "{project: 42, ref: main}", extra="mode: shadow"),
        ),
        "gateway.yaml": gateway(given.listen_port, ["reports-api", "deploy-api"], access_log=given.access_log),
    }


def policy(given: PolicyInputs) -> dict[str, str]:
    """The broad policy, with merge-request pipelines only for project 45 on reports (a binding naming no
    pipeline source denies them)."""
    return broad_policy(
        given,
        INVENTORY,
        bindings=[binding("web-reviews", ["reports-everything"], f"{{project: 45, pipeline_source: [{MR}]}}")],
    )


OFFLINE = PolicyInputs("https://gitlab.example.com", 1, {"reports": 2, "deploy": 3}, Path("/dev/null"), Path("/"))


@dataclass(frozen=True)
class Call:
    """One request a job makes through the gateway: the Envoy host, method, path and the token's claims."""

    host: str
    method: str
    path: str
    claims: tuple[tuple[str, Any], ...]

    @property
    def backend(self) -> str:
        return BACKEND_OF_HOST[self.host]

    @property
    def claim(self) -> dict[str, Any]:
        return dict(self.claims)

    def key(self) -> tuple[str, str, str, tuple[tuple[str, Any], ...]]:
        """The request without its job id: two calls alike but for the job are the same kind of request."""
        return self.host, self.method, self.path, tuple(kv for kv in self.claims if kv[0] != "job_id")

    def token_claims(self) -> tuple[tuple[str, Any], ...]:
        return self.claims

    def with_claims(self, **changes: Any) -> Call:
        merged = {**dict(self.claims), **changes}
        return replace(self, claims=tuple(sorted((k, v) for k, v in merged.items() if v is not None)))


def make_call(host: str, method: str, path: str, project: int, **claims: Any) -> Call:
    base = {"ref": "main", "ref_type": "branch", "ref_protected": True, "pipeline_source": "push", **claims}
    base.update(project_id=project, project_path=PROJECTS[project], namespace_id=11)
    return Call(host, method, path, tuple(sorted((k, v) for k, v in base.items() if v is not None)))


def recorded_calls() -> list[Call]:
    """What the jobs did (a few hundred requests), each job with its own id."""
    made: list[Call] = []
    job = iter(range(10_000, 20_000))
    reports_42 = [("GET", f"/reports/2026/{m:02d}") for m in range(1, 13)]
    reports_42 += [("GET", f"/reports/summary/{w}") for w in ("daily", "weekly", "monthly")]  # words: kept exact
    reports_42 += [("GET", f"/archive/{y}/q{q}") for y in (2023, 2024, 2025) for q in (1, 2, 3)]  # globbed twice
    reports_42 += [("HEAD", "/reports/index"), ("POST", "/reports/2026/01/render")]
    runs_42: list[dict[str, Any]] = [
        {"ref": "main", "pipeline_source": "push"},
        {"ref": "main", "pipeline_source": "schedule"},
    ]
    runs_42 += [{"ref": "v1.0", "ref_type": "tag", "pipeline_source": "push"}]
    claims: dict[str, Any]
    for run in runs_42 * 3:
        claims = {**run, "job_id": next(job)}
        made += [make_call(REPORTS_HOST, m, p, 42, **claims) for m, p in reports_42]
    deploy_42 = [("POST", "/deployments/prod"), ("DELETE", "/deployments/prod/lock")]
    deploy_42 += [("GET", f"/deployments/prod/releases/r{n}") for n in range(1, 5)]
    for _ in range(4):
        claims = {"job_id": next(job), "environment": "production"}
        made += [make_call(DEPLOY_HOST, m, p, 42, **claims) for m, p in deploy_42]
    other_43 = [("GET", "/status")] + [(m, f"/builds/{b}/log") for b in range(1001, 1005) for m in ("GET", "PUT")]
    for run in ({"ref": "main"}, {"ref": "feature", "ref_protected": False}) * 2:
        made += [make_call(REPORTS_HOST, m, p, 43, job_id=next(job), **run) for m, p in other_43]
    web_45 = [("GET", f"/previews/mr-{n}") for n in (11, 12, 13)] + [("POST", "/previews/mr-11/comments")]
    for _ in range(3):
        claims = {"ref": "feature-x", "ref_protected": False, "pipeline_source": MR, "job_id": next(job)}
        made += [make_call(REPORTS_HOST, m, p, 45, **claims) for m, p in web_45]
    tools_46 = [("POST", "/deployments/staging")] + [("GET", f"/deployments/staging/v{n}") for n in range(1, 6)]
    for _ in range(4):
        claims = {"job_id": next(job), "environment": "staging"}
        made += [make_call(DEPLOY_HOST, m, p, 46, **claims) for m, p in tools_46]
    return made


def unused_calls(recorded: Sequence[Call]) -> list[Call]:
    """Requests nobody made, derived from the recorded ones: other methods, other paths (a segment more, one
    less, a word or a number in place of each segment), other projects, and other refs, protections, sources and
    environments. Those the old policy does not allow are the caller's to drop (`old_policy_allows`)."""
    seen = {c.key() for c in recorded}
    kinds: dict[tuple[str, str, str, tuple[tuple[str, Any], ...]], Call] = {}
    for c in recorded:
        kinds.setdefault(c.key(), c)
    first_per_group: dict[tuple[int, str, str, str], Call] = {}  # one token's claims per (project, backend, request)
    for c in kinds.values():
        first_per_group.setdefault((c.claim["project_id"], c.host, c.method, c.path), c)
    job = iter(range(50_000, 90_000))
    out: dict[tuple[str, str, str, tuple[tuple[str, Any], ...]], Call] = {}

    def add(candidate: Call) -> None:
        if candidate.key() not in seen and candidate.key() not in out:
            out[candidate.key()] = candidate.with_claims(job_id=next(job))

    for model in first_per_group.values():
        for method in METHODS:
            add(replace(model, method=method))
        for other in _other_paths(model.path):
            add(replace(model, path=other))
        for project in PROJECTS:
            if project != model.claim["project_id"]:
                add(model.with_claims(project_id=project, project_path=PROJECTS[project]))
        subject = EXPECTED_SUBJECTS[(model.claim["project_id"], model.backend)]
        for changes in _other_claims(subject):
            add(model.with_claims(**changes))
    return list(out.values())


def _other_paths(path: str) -> Iterable[str]:
    parts = path.split("/")
    yield path + "/raw"
    if len(parts) > 2:
        yield "/".join(parts[:-1])
    for position in range(1, len(parts)):
        for value in ("admin", "99"):
            if parts[position] != value:
                yield "/".join([*parts[:position], value, *parts[position + 1 :]])


def _other_claims(subject: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """Other claims along each dimension the subject pins (where nothing is pinned, any value is admitted, as
    documented, and there is nothing to check)."""
    if subject.get("ref_protected"):
        yield {"ref": "feature-z", "ref_protected": False}
        yield {"ref": "v2.0-rc", "ref_type": "tag", "ref_protected": False}
    if "ref" in subject:
        yield {"ref": "dev", "ref_protected": True}
        yield {"ref": "v2.0", "ref_type": "tag", "ref_protected": True}
    if "pipeline_source" in subject:
        for source in ("push", "schedule", "web", "api", "trigger", "pipeline", MR):
            yield {"pipeline_source": source}
    if "environment" in subject:
        for environment in ("production", "staging", "review/x", None):
            yield {"environment": environment}


def old_policy_allows(call: Call) -> bool:
    """The broad policy: the whole group on both backends except merge-request pipelines (a binding naming no
    pipeline source denies them), which only project 45's binding names, on reports."""
    claim = call.claim
    if claim["pipeline_source"] == MR:
        return claim["project_id"] == 45 and call.backend == "reports-api"
    return True


# --- the oracle: what the suggestion may admit, by the documented rules


def _id_like(segment: str) -> bool:
    return segment not in ("", "*") and any(ch.isascii() and ch.isdigit() for ch in segment)


def documented_globs(paths: Iterable[str], minimum: int = 3) -> set[str]:
    """docs/policy-assistant.md: a segment (not the first) becomes `*` where `minimum` or more digit-holding values
    were seen there with every other segment equal; repeated until nothing changes."""
    current = set(paths)
    while True:
        before = set(current)
        for position in range(2, max(len(p.split("/")) for p in current)):
            groups: dict[tuple[str, ...], set[str]] = defaultdict(set)
            for p in current:
                parts = p.split("/")
                if position < len(parts) and _id_like(parts[position]):
                    groups[tuple([*parts[:position], "\0", *parts[position + 1 :]])].add(parts[position])
            for rest, values in groups.items():
                if len(values) >= minimum:
                    for value in values:
                        current.discard("/".join(rest).replace("\0", value))
                    current.add("/".join(rest).replace("\0", "*"))
        if current == before:
            return current


def _segment_matches(pattern: str, path: str) -> bool:
    want, have = pattern.split("/"), path.split("/")
    pairs = zip(want, have, strict=False)
    return len(want) == len(have) and all((w == "*" and "/" not in h) or w == h for w, h in pairs)


@dataclass(frozen=True)
class Oracle:
    patterns: Mapping[tuple[int, str, str], frozenset[str]]  # (project, backend, method) -> documented paths

    @classmethod
    def of(cls, recorded: Sequence[Call]) -> Oracle:
        paths: dict[tuple[int, str, str], set[str]] = defaultdict(set)
        for c in recorded:
            paths[(c.claim["project_id"], c.backend, c.method)].add(c.path)
        return cls({k: frozenset(documented_globs(v)) for k, v in paths.items()})

    def admitted(self, call: Call) -> bool:
        claim = call.claim
        subject = EXPECTED_SUBJECTS.get((claim["project_id"], call.backend))
        if subject is None or not subject_holds(subject, claim):
            return False
        patterns = self.patterns.get((claim["project_id"], call.backend, call.method), frozenset())
        return any(_segment_matches(p, call.path) for p in patterns)


def describe(made: Call) -> str:
    """One line a reviewer reads: project, backend, method, path and the claims a subject may pin."""
    claim = made.claim
    pins = " ".join(f"{k}={claim.get(k)}" for k in ("ref", "ref_protected", "pipeline_source", "environment"))
    return f"p{claim['project_id']} {made.backend} {made.method} {made.path} [{pins}]"


def subject_holds(subject: Mapping[str, Any], claim: Mapping[str, Any]) -> bool:
    if subject.get("ref_protected") and claim.get("ref_protected") is not True:
        return False
    if "ref" in subject and claim.get("ref") not in subject["ref"]:
        return False
    sources = subject.get("pipeline_source")
    if claim.get("pipeline_source") not in sources if sources else claim.get("pipeline_source") == MR:
        return False
    return "environment" not in subject or claim.get("environment") in subject["environment"]
