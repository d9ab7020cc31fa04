"""`controlplane suggest` accepted end to end: record, suggest, replay, all through a REAL Envoy and `serve`.

1. A deliberately broad policy (the whole `acme/platform` group may do anything on both backends) is served by
   `controlplane serve`; CI "jobs" (tokens minted by the fake GitLab, whose projects hold the `.gitlab-ci.yml`
   files the jobs' tokens come from) call the backends through the Envoy; serve audits every request (ALS).
2. `controlplane suggest` reads serve's audit trail (its state dir, read-only) and the projects' CI configuration
   through the fake GitLab's API, and writes the patched policy tree, which `validate` accepts.
3. Requests nobody made but the broad policy allows (other methods, paths, refs, projects, environments,
   pipeline sources) are checked allowed through the Envoy under the old policy; then the suggested tree
   replaces the old one in serve's policy directory and, once the Envoy holds it, every recorded request is
   replayed (still allowed) and every unused one is denied.

The second test widens it (tests/support/suggest_scenario.py): five projects, two backends, tags and branches,
protected and not, push/schedule/merge-request pipelines, environments, globbed and exact segments; 330 requests
recorded, every one replayed; 1,112 requests the broad policy allowed and nobody made, each denied unless the
documented rules admit it (an oracle written from docs/policy-assistant.md, apart from the proposer: a sibling at
a glob's segment, a source the project's CI allows), that exception set printed. tests/test_assistant_replay.py
replays the same scenario through the Evaluator and shows mutations of the proposer failing it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.audit.store import DB_NAME
from controlplane.cli.main import main
from tests.support import suggest_scenario as wide
from tests.support.policy_parts import ACME_INVENTORY, binding
from tests.support.ports import poll_until
from tests.support.stack import NODE, EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

TOKEN_ENV = "SUGGEST_E2E_GITLAB_TOKEN"
DEPLOYER = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
OTHER = {"project_id": 43, "project_path": "acme/platform/other", "namespace_id": 11}
THIRD = {"project_id": 44, "project_path": "acme/platform/third", "namespace_id": 11}
INVENTORY = ACME_INVENTORY + "  - {id: 44, path: acme/platform/third, namespace_id: 11}\n"


def broad_policy(given: PolicyInputs) -> dict[str, str]:
    """Anything on both backends for the whole group, and a binding nobody uses."""
    return wide.broad_policy(
        given,
        INVENTORY,
        roles=["kind: Role\nname: reports-read\nbackend: reports-api\nrules:\n  - methods: [GET, HEAD]\n"],
        bindings=[binding("legacy-reader", ["reports-read"], "{project: 43, ref: legacy}")],
    )


class Tokens:
    """One token per distinct set of claims: signing is the slow part of a request, not the Envoy."""

    def __init__(self, stack: Served) -> None:
        self.stack = stack
        self.minted: dict[tuple[str, tuple[tuple[str, Any], ...]], str] = {}

    def status(self, made: wide.Call) -> int:
        key = (made.host, made.claims)
        if key not in self.minted:
            aud = wide.AUDIENCE_OF_HOST[made.host]
            self.minted[key] = self.stack.gitlab.mint(aud=aud, ttl=3600, **made.claim)
        return self.stack.request(made.host, made.path, self.minted[key], method=made.method).status


def call(host: str, method: str, path: str, project: dict[str, Any], **claims: Any) -> wide.Call:
    base = {"ref": "main", "ref_protected": True, "pipeline_source": "push", **project, **claims}
    return wide.Call(host, method, path, tuple(sorted(base.items())))


def recorded_calls() -> list[wide.Call]:
    """What the jobs did: three read-reports jobs, one deploy job, one job of the other project."""
    made = []
    for job, months in ((9001, ("01", "02")), (9002, ("03",)), (9003, ("04", "01"))):
        made += [call("reports.local", "GET", f"/reports/2026/{m}", DEPLOYER, job_id=job) for m in months]
    made.append(call("reports.local", "HEAD", "/reports/index", DEPLOYER, job_id=9003))
    made.append(call("deploy.local", "POST", "/deployments/prod", DEPLOYER, job_id=9004, environment="production"))
    made.append(call("reports.local", "GET", "/status", OTHER, job_id=9100))
    return made


def unused_calls() -> list[wide.Call]:
    """What the broad policy allows and nobody did: other methods, paths, refs, projects, environments, sources."""
    reports = []
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        reports.append(call("reports.local", method, "/reports/2026/01", DEPLOYER, job_id=9201))
    for path in ("/reports/2025/01", "/reports/2026/01/raw", "/reports", "/admin", "/status"):
        reports.append(call("reports.local", "GET", path, DEPLOYER, job_id=9202))
    reports.append(call("reports.local", "GET", "/reports/index", DEPLOYER, job_id=9203))
    reports.append(call("reports.local", "GET", "/reports/2026/01", DEPLOYER, job_id=9204, ref="feature",
                        ref_protected=False))  # fmt: skip
    reports.append(call("reports.local", "GET", "/reports/2026/01", THIRD, job_id=9205))
    reports.append(call("reports.local", "POST", "/status", OTHER, job_id=9206))
    reports.append(call("reports.local", "GET", "/reports/2026/01", OTHER, job_id=9207))
    reports.append(call("reports.local", "GET", "/status", OTHER, job_id=9208, ref="feature", ref_protected=False))
    deploy = []
    prod = {"environment": "production"}
    for method in ("PUT", "DELETE", "GET"):
        deploy.append(call("deploy.local", method, "/deployments/prod", DEPLOYER, job_id=9301, **prod))
    deploy.append(call("deploy.local", "POST", "/deployments/staging", DEPLOYER, job_id=9302, **prod))
    deploy.append(call("deploy.local", "POST", "/deployments/prod", DEPLOYER, job_id=9303, environment="staging"))
    deploy.append(call("deploy.local", "POST", "/deployments/prod", DEPLOYER, job_id=9304, pipeline_source="web",
                       **prod))  # fmt: skip
    deploy.append(call("deploy.local", "POST", "/deployments/prod", DEPLOYER, job_id=9305, ref="dev", **prod))
    deploy.append(call("deploy.local", "POST", "/deployments/prod", OTHER, job_id=9306, **prod))
    deploy.append(call("deploy.local", "POST", "/deployments/prod", THIRD, job_id=9307, **prod))
    return reports + deploy


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Served]:
    spec = EnvoySpec(NODE, "suggest-envoy", flush_logs=True)
    with serve_stack(
        tmp_path,
        broad_policy,
        kind=Served,
        envoy=spec,
        backends=("reports", "deploy"),
        ready=lambda built: built.call("reports.local", None, path="/healthz") == 200,
    ) as built:
        gitlab = built.gitlab
        gitlab.add_project(
            "acme/platform/deployer",
            id=42,
            branches=["main", "feature", "dev"],
            protected=["main", "dev"],
            files={".gitlab-ci.yml": wide.DEPLOYER_CI, "ci/deploy.yml": wide.DEPLOYER_DEPLOY_CI},
        )
        gitlab.add_project(
            "acme/platform/other", id=43, branches=["main", "feature"], files={".gitlab-ci.yml": wide.OTHER_CI}
        )
        yield built


def _audited(db: Path) -> int:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM audit WHERE job_id IS NOT NULL").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _logged(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"job_id":"9' in line.replace(" ", ""))


def _suggest(stack: Served, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    argv = ["suggest", str(stack.policy), "--state-dir", str(stack.controlplane.state_dir), "--since", "1h"]
    argv += ["--gitlab-url", stack.gitlab.base_url, "--gitlab-token-env", TOKEN_ENV, "--out", str(out)]
    argv += ["--format", "json", "--diff", str(out.parent / f"{out.name}.diff"), "--access-log", str(stack.access_log)]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def _swap_policy(stack: Served, tree: Path) -> None:
    """The suggested tree replaces the policy directory's files; returns once the Envoy holds the new version."""
    before = stack.controlplane.status()["policy"]["snapshot_versions"]["ci-gateway"]
    new = {p.name: p.read_text() for p in tree.iterdir()}
    for name, text in sorted(new.items()):
        stack.write(name, text)
    for old in stack.policy.iterdir():
        if old.name not in new and not old.name.startswith("."):
            stack.remove(old.name)
    written = time.time()  # a load that started after this read the whole new tree (same host clock)

    def served() -> bool:
        status = stack.controlplane.status()
        policy = status["policy"]
        if policy["errors"] or policy["snapshot_versions"]["ci-gateway"] == before:
            return False
        if policy["last_attempt"] < written or policy["last_good_load"] < policy["last_attempt"]:
            return False
        types = status["summary"]["groups"].get("ci-gateway", {}).get("types", {})
        proxy = next((p for p in status["proxies"] if p["node"] == NODE), None)
        acked = proxy["acked"] if proxy is not None else {}
        return bool(acked) and all(types.get(t, {}).get("current") == v for t, v in acked.items())

    poll_until(served, 20, interval=0.05, message="the Envoy holds the suggested policy")


def test_suggested_policy_keeps_what_was_used_and_denies_the_rest(
    stack: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, stack.gitlab.api_token)
    tokens = Tokens(stack)
    recorded = recorded_calls()
    for made in recorded:
        assert tokens.status(made) == 200, made
    db = stack.controlplane.state_dir / DB_NAME
    poll_until(lambda: _audited(db) >= len(recorded), 15, message="every request in the audit trail")
    poll_until(lambda: _logged(stack.access_log) >= len(recorded), 15, message="every request in the access log")

    document = _suggest(stack, tmp_path / "suggested", capsys)
    again = _suggest(stack, tmp_path / "again", capsys)
    assert document == again  # deterministic: the same trail and GitLab give the same output
    assert (tmp_path / "suggested" / "suggested.yaml").read_bytes() == (
        tmp_path / "again" / "suggested.yaml"
    ).read_bytes()

    assert stack.gitlab.api_token not in json.dumps(document)
    observed = {(r["project"], r["method"], r["path"]): r for r in document["observed_requests"]}
    assert observed[("acme/platform/deployer", "GET", "/reports/2026/01")]["requests"] == 2
    assert (
        observed[("acme/platform/deployer", "GET", "/reports/2026/01")]["policy"] == "platform-all/reports-everything"
    )
    by_name = {s["name"]: s for s in document["suggestions"]}
    assert sorted(by_name) == ["p42-deploy-api", "p42-reports-api", "p43-reports-api"]
    reports = by_name["p42-reports-api"]
    assert [(r["methods"], r["paths"]) for r in reports["rules"]] == [
        (["GET"], ["/reports/2026/*"]),
        (["HEAD"], ["/reports/index"]),
    ]
    assert {c["key"]: c["value"] for c in reports["subject"]} == {"project": 42, "ref_protected": True}
    assert reports["jobs"] == ["read-reports"] and reports["evidence"]["jobs"] == ["9001", "9002", "9003"]
    # from the trail's claims: every request carried ref_protected "true"; the one deploy agrees with CI's source
    why = {c["key"]: c["why"] for c in reports["subject"]}
    assert why["ref_protected"].startswith('every request observed: 6 request(s) carried ref_protected "true"'), why
    why = {c["key"]: c["why"] for c in by_name["p42-deploy-api"]["subject"]}
    assert why["pipeline_source"].endswith("allow; 1 observed request(s) agree"), why
    deploy = {c["key"]: c["value"] for c in by_name["p42-deploy-api"]["subject"]}
    assert deploy == {
        "project": 42,
        "ref_protected": True,
        "ref": ["main"],
        "pipeline_source": ["push"],
        "environment": ["production"],
    }
    flags = {(f["kind"], f["subject"]) for f in document["flags"]}
    assert ("unmatched-binding", "legacy-reader") in flags
    assert ("unpinned-protected", "platform-all") in flags
    (shadow,) = [f["message"] for f in document["flags"] if f["kind"] == "shadow"]
    assert "deploy-everything: 1 request(s) from project(s) 42" in shadow, shadow
    assert document["kept"] == {"bindings": ["deploy-dry-run"], "roles": ["deploy-everything"]}
    assert main(["validate", str(tmp_path / "suggested"), "--offline"]) == 0, capsys.readouterr().err
    yaml_text = (tmp_path / "suggested" / "suggested.yaml").read_text()
    assert "# /reports/2026/*: 5 request(s) by 3 job(s) (9001, 9002, 9003)" in yaml_text, yaml_text

    unused = unused_calls()
    refused_before = [c for c in unused if tokens.status(c) != 200]
    assert refused_before == [], "the broad policy must allow every unused request"

    _swap_policy(stack, tmp_path / "suggested")
    still_allowed = [c for c in recorded if tokens.status(c) == 200]
    now_denied = [c for c in unused if tokens.status(c) == 403]
    print(
        f"replay through Envoy: {len(still_allowed)}/{len(recorded)} recorded requests still allowed, "
        f"{len(now_denied)}/{len(unused)} unused requests the old policy allowed now denied"
    )
    assert still_allowed == recorded
    assert now_denied == unused


# --- the wide replay: five projects, two backends, a few hundred requests, a thousand unused ones


@pytest.fixture
def wide_stack(tmp_path: Path) -> Iterator[Served]:
    spec = EnvoySpec(NODE, "suggest-wide-envoy", flush_logs=True)
    with serve_stack(
        tmp_path,
        wide.policy,
        kind=Served,
        envoy=spec,
        backends=("reports", "deploy"),
        ready=lambda built: built.call("reports.local", None, path="/healthz") == 200,
    ) as built:
        for project, (files, branches, protected) in wide.CI_FILES.items():
            built.gitlab.add_project(
                wide.PROJECTS[project], id=project, branches=branches, protected=protected, files=files
            )
        yield built


def test_wide_replay_keeps_every_observed_request_and_denies_what_nobody_used(
    wide_stack: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every allowed request recorded is allowed again under the suggestion; of the requests the broad policy
    allowed and nobody made, only those the documented rules admit (a sibling at a glob's segment, a source the
    project's CI allows) still are; every other one is denied, through the real Envoy."""
    started = time.monotonic()
    stack = wide_stack
    monkeypatch.setenv(TOKEN_ENV, stack.gitlab.api_token)
    tokens = Tokens(stack)
    recorded = wide.recorded_calls()
    refused = [c for c in recorded if tokens.status(c) != 200]
    assert refused == [], refused[:5]
    db = stack.controlplane.state_dir / DB_NAME
    poll_until(lambda: _audited(db) >= len(recorded), 30, message="every request in the audit trail")

    document = _suggest(stack, tmp_path / "suggested", capsys)
    subjects = {
        (int(s["project_id"]), s["backend"]): {c["key"]: c["value"] for c in s["subject"]}
        for s in document["suggestions"]
    }
    assert subjects == wide.EXPECTED_SUBJECTS, json.dumps(document["suggestions"], indent=1)[:4000]
    oracle = wide.Oracle.of(recorded)
    proposed = {
        (int(s["project_id"]), s["backend"], m): set(r["paths"])
        for s in document["suggestions"]
        for r in s["rules"]
        for m in r["methods"]
    }
    assert proposed == {k: set(v) for k, v in oracle.patterns.items()}
    assert main(["validate", str(tmp_path / "suggested"), "--offline"]) == 0, capsys.readouterr().err

    generated = wide.unused_calls(recorded)
    unused = [c for c in generated if wide.old_policy_allows(c)]
    # the broad policy's own rule, checked through the Envoy: everything but merge-request pipelines it never named
    allowed_before = {c.key() for c in generated if tokens.status(c) == 200}
    assert allowed_before == {c.key() for c in unused}
    exceptions = [c for c in unused if oracle.admitted(c)]
    assert all(oracle.admitted(c) for c in recorded)

    _swap_policy(stack, tmp_path / "suggested")
    still_allowed = [c for c in recorded if tokens.status(c) == 200]
    now_allowed = [c for c in unused if tokens.status(c) == 200]
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\nwide replay through Envoy ({elapsed:.1f} s): {len(still_allowed)}/{len(recorded)} recorded requests "
            f"still allowed; {len(unused) - len(now_allowed)}/{len(unused)} unused requests the old policy allowed "
            f"now denied; {len(exceptions)} admitted by the documented rules (glob siblings, a source CI allows):"
        )
        print("\n".join("  " + wide.describe(c) for c in exceptions))
    assert still_allowed == recorded
    assert len(unused) >= 1000 and len(exceptions) <= len(unused) // 20  # the exception set is small
    assert {c.key() for c in now_allowed} == {c.key() for c in exceptions}, [
        wide.describe(c) for c in now_allowed if c not in exceptions
    ][:20]
