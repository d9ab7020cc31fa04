"""`controlplane suggest` attacked from outside: a project developer who controls `.gitlab-ci.yml` (job names,
tags, includes, YAML bombs), a hostile GitLab (token claims, refs, error answers), and a platform engineer who
merges the patch blindly. Each test failed before its fix: the suggestion must never carry policy that nobody
wrote, never pin a subject narrower than the jobs observed, and finish in bounded time and memory."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.assistant.ci_config import CiConfig, RuleCase, condition_cases, load_ci_config
from controlplane.assistant.propose import (
    Inputs,
    Observation,
    Report,
    ShadowSeen,
    generalise,
    patched_tree,
    render_yaml,
    shadow_matches,
    suggest,
    text_lines,
)
from controlplane.audit.store import DB_NAME, AuditStore
from controlplane.cli.main import main
from controlplane.model.kinds.role import HTTP_METHODS
from controlplane.model.loader import parse_policy
from controlplane.resolved.access import Grant
from controlplane.resolved.diff import path_pattern
from controlplane.resolved.evaluate import Evaluator
from controlplane.resolved.index import Resolution
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_ci import ci_project
from controlplane.sources.policy_dir import read_policy_dir
from tests.support.assistant import EXAMPLE, GITLAB, NOW, obs
from tests.support.fake_gitlab import FakeGitLab
from tests.support.ports import free_port

AUD = "api://feature-flags"
BOUND = 5.0  # seconds: each bomb below took minutes (or gigabytes) before its fix


def _ci(text: str, **files: str) -> CiConfig:
    return load_ci_config("acme/p3001", {".gitlab-ci.yml": text, **files}.get, default_branch="main")


def _suggest(
    ci: CiConfig | None, observed: list[Observation], protected: Mapping[str, bool] | None = None
) -> tuple[dict[str, str], Report]:
    files = read_policy_dir(EXAMPLE)
    policy = parse_policy(files)
    given = Inputs(
        policy,
        Resolution().update(policy),
        observed,
        {"3001": ci} if ci is not None else {},
        {"3001": dict(protected or {"main": True})},
        now=NOW,
    )
    report = suggest(given)
    return files, report


def _conditions(ci: CiConfig | None, observed: list[Observation] | None = None) -> dict[str, object]:
    _, report = _suggest(ci, observed or [obs("/flags/a")])
    (s,) = report.suggestions
    return {c.key: c.value for c in s.conditions}


# --- (a)+(b): a job name, a project path or a ref that would write YAML into the suggestion


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\u2029", "\x85"])
def test_names_from_ci_and_tokens_cannot_write_policy_through_a_comment(brk: str) -> None:
    injected = f"{brk}kind: Role{brk}name: evil{brk}backend: feature-flags{brk}rules: [{{paths: [/**]}}]{brk}---{brk}#"
    ci = _ci(yaml.safe_dump({f"read{injected}": {"id_tokens": {"T": {"aud": AUD}}}}))
    observed = [obs("/flags/a")]
    observed = [dataclasses.replace(o, project_path=f"acme/x{injected}") for o in observed]
    files, report = _suggest(ci, observed)
    text = render_yaml(report)
    tree = patched_tree(files, report)
    policy = parse_policy(tree)
    assert "evil" not in {r.name for r in policy.roles}
    assert [d["kind"] for d in yaml.safe_load_all(text) if d] == ["Role", "Binding"]
    assert all("\\u" in line for line in text.splitlines() if "kind: Role" in line and line.startswith("#"))
    assert all(line.isprintable() for line in text_lines(report))


# --- (b): what the CI reader cannot read must widen the subject, never narrow it


def test_reference_tags_are_not_environments_refs_or_audiences() -> None:
    ci = _ci(
        """
.env: {environment: production, only: [main]}
job:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: !reference [.env, environment]
  only: !reference [.env, only]
other:
  id_tokens: {T: {aud: !reference [.x, aud]}}
  environment: production
"""
    )
    jobs = {j.name: j for j in ci.jobs}
    assert jobs["job"].environment is None and jobs["job"].refs is None  # was "!reference" for both
    assert jobs["other"].audience_unknown and [j.name for j in ci.jobs_for(AUD)] == ["job", "other"]
    # before: `environment: ["!reference"]`, a pin no job could ever meet
    assert set(_conditions(ci)) == {"project", "ref_protected"}


def test_a_job_whose_audience_is_a_variable_may_ask_for_any_backend() -> None:
    ci = _ci(
        """
deploy:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: production
  rules: [{if: '$CI_PIPELINE_SOURCE == "push"'}]
smoke:
  id_tokens: {T: {aud: $FLAGS_AUDIENCE}}
"""
    )
    assert [j.name for j in ci.jobs_for(AUD)] == ["deploy", "smoke"]
    # before: environment [production] and pipeline_source [push], shutting `smoke` out
    assert set(_conditions(ci)) == {"project", "ref_protected"}


def test_an_incomplete_configuration_pins_nothing() -> None:
    text = """
include: [{project: acme/templates, file: jobs.yml}]
deploy:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: production
  rules: [{if: '$CI_COMMIT_BRANCH == "main" && $CI_PIPELINE_SOURCE == "push"'}]
"""
    # the job in acme/templates may ask for the same audience anywhere, without an environment
    assert set(_conditions(_ci(text))) == {"project", "ref_protected"}
    assert not _ci(text).complete
    complete = _ci(text.split("\n", 2)[2])
    assert complete.complete
    assert _conditions(complete) == {
        "project": 3001,
        "ref_protected": True,
        "ref": ("main",),
        "pipeline_source": ("push",),
        "environment": ("production",),
    }


def test_requests_from_another_ref_ran_another_configuration() -> None:
    ci = _ci(
        """
deploy:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: production
"""
    )
    observed = [obs("/flags/a"), obs("/flags/a", ref="feature")]
    # `feature`'s own .gitlab-ci.yml may have dropped the environment: nothing is pinned from main's
    assert set(_conditions(ci, observed)) == {"project"}


def test_a_missing_extends_template_may_hold_the_id_tokens() -> None:
    ci = _ci(
        """
include: [{local: /ci/t.yml}]
deploy:
  extends: .missing
read:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: production
""",
        **{"ci/t.yml": "x: {script: [true]}\n"},
    )
    assert {j.name for j in ci.jobs_for(AUD)} == {"deploy", "read"} and ci.complete
    assert set(_conditions(ci)) == {"project", "ref_protected"}  # not environment: [production]


# --- (b): bombs


def test_extends_fan_out_is_resolved_once_per_template() -> None:
    lines = [".t0: {environment: e}"]
    lines += [f".t{i}: {{extends: [{', '.join([f'.t{i - 1}'] * 8)}]}}" for i in range(1, 10)]
    lines.append('job: {extends: .t9, id_tokens: {T: {aud: "x"}}}')
    start = time.monotonic()
    ci = _ci("\n".join(lines))  # 8^9 walks before
    assert time.monotonic() - start < BOUND
    assert ci.jobs[0].environment == "e"


def test_alias_bomb_merged_by_extends_is_bounded() -> None:
    lines = ["l0: &l0 {a: 1, b: 2}"]
    lines += [f"l{i}: &l{i} {{{', '.join(f'k{j}: *l{i - 1}' for j in range(6))}}}" for i in range(1, 12)]
    lines += [".t: {v: *l11}", 'job: {extends: .t, v: *l11, id_tokens: {T: {aud: "x"}}}']
    start = time.monotonic()
    ci = _ci("\n".join(lines))  # 800 bytes, 6^11 keys to merge
    assert time.monotonic() - start < BOUND
    job = {j.name: j for j in ci.jobs}["job"]
    assert job.audience_unknown and any("steps to merge" in u for u in job.unknown)


def test_alias_bomb_merged_across_includes_is_bounded() -> None:
    bomb = "\n".join(
        ["l0: &l0 {a: 1, b: 2}"]
        + [f"l{i}: &l{i} {{{', '.join(f'k{j}: *l{i - 1}' for j in range(6))}}}" for i in range(1, 12)]
        + ["v: *l11"]
    )
    start = time.monotonic()
    ci = _ci("include: [a.yml, b.yml]\n", **{"a.yml": bomb, "b.yml": bomb})
    assert time.monotonic() - start < BOUND
    assert not ci.complete and any("steps to merge" in n for n in ci.notes)


def test_deep_nesting_is_reported_not_a_crash() -> None:
    ci = _ci("job: " + "[" * 5000 + "]" * 5000 + "\n")
    assert ci.notes == (".gitlab-ci.yml: nested too deep: not parsed",)  # RecursionError before
    unknown: list[str] = []
    (case,) = condition_cases("(" * 5000 + "$X" + ")" * 5000, "main", unknown)
    assert case.refs is None and "not parsed" in unknown[0]


def test_many_jobs_times_workflow_cases_stay_small() -> None:
    workflow = "".join(f'    - if: $CI_COMMIT_BRANCH == "b{i}"\n' for i in range(64))
    rules = "".join(f'  - if: $CI_PIPELINE_SOURCE == "s{k}"\n' for k in range(64))
    jobs = "".join(f"j{i}: {{id_tokens: {{T: {{aud: x}}}}, rules: *r}}\n" for i in range(3000))
    start = time.monotonic()
    ci = _ci(f"workflow:\n  rules:\n{workflow}.r: &r\n{rules}{jobs}")  # 4,096 cases a job before: gigabytes
    assert time.monotonic() - start < 3 * BOUND
    assert len(ci.jobs) == 3000 and all(len(j.cases) == 1 and j.refs is None for j in ci.jobs)


def test_include_spellings_and_escapes() -> None:
    asked: list[str] = []
    files = {".gitlab-ci.yml": "include: [./a.yml, '../../etc/x.yml', 'b.yml?ref=x', /c.yml]\n"}
    files |= {"a.yml": "include: [/a.yml, ./././a.yml]\n", "c.yml": "include: [.//a.yml]\n"}

    def read(path: str) -> str | None:
        asked.append(path)
        return files.get(path)

    ci = load_ci_config("acme/p", read, default_branch="main")
    # every spelling of a.yml is one file: its self-includes are cycles (before: read until the depth bound)
    assert set(asked) == {".gitlab-ci.yml", "a.yml", "c.yml"} and len(asked) == 4  # c.yml includes it again
    assert any("a.yml: include cycle (.gitlab-ci.yml -> a.yml -> a.yml)" in n for n in ci.notes)
    assert any("../../etc/x.yml" in n for n in ci.notes) and any("b.yml?ref=x" in n for n in ci.notes)


# --- (c): a hostile or refusing GitLab


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as gitlab:
        yield gitlab


def test_a_protected_tag_does_not_protect_the_branch_of_the_same_name(fake: FakeGitLab) -> None:
    fake.add_project("acme/p", id=3001, branches=["v1"], tags=["v1"], protected_tags=["v*"], files={})
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=1)
    project = ci_project(source, 3001)
    assert project is not None
    assert project.protected["v1"] is False  # was True: the tag's verdict overwrote the branch's
    observed = [obs("/flags/a", ref="v1")]
    _, report = _suggest(None, observed, project.protected)
    (s,) = report.suggestions
    assert "ref_protected" not in {c.key for c in s.conditions}


def test_a_file_gitlab_refuses_is_not_read_not_a_failed_run(fake: FakeGitLab) -> None:
    fake.add_project("acme/p", id=3001, files={".gitlab-ci.yml": "job: {script: [true]}\n"})
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=1)
    project = ci_project(source, 3001)
    assert project is not None
    for status in (400, 403):
        fake.fail_next(1, status)
        assert project.read(".gitlab-ci.yml") is None  # GitLabRefused before: the whole command failed
    assert project.read(".gitlab-ci.yml") is not None


# --- (a): where it writes


def test_out_through_a_dangling_symlink_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "out"
    link.symlink_to(target)
    AuditStore(tmp_path / DB_NAME, retention=None).close(10)  # an empty trail
    argv = ["suggest", str(EXAMPLE), "--state-dir", str(tmp_path), "--no-gitlab", "--out", str(link)]
    assert main(argv) == 2  # FileExistsError out of mkdir before
    assert not target.exists()
    assert "exists" in capsys.readouterr().err


def test_a_method_no_role_can_name_is_flagged() -> None:
    _, report = _suggest(None, [obs("/flags/a"), obs("/flags/a", method="get"), obs("/flags/a", method="TRACE")])
    flagged = {(f.kind, f.message.split(" ")[0]) for f in report.flags if f.kind == "method"}
    assert flagged == {("method", '"TRACE"'), ("method", '"get"')}


# --- the suggestion replayed through the evaluator RBAC is compiled from, on generated trails

_SEGMENT = st.one_of(
    st.sampled_from(["a", "b", "admin", "1", "2", "3", "x"]),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4),  # emoji, quotes, `: `, `\u2028`
)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_REQUEST = st.tuples(st.sampled_from(["3001", "3002"]), st.sampled_from(HTTP_METHODS), _PATH)


def _allowed(grants: Sequence[Grant], project: str, method: str, path: str) -> bool:
    claims = {"iss": GITLAB, "project_id": project, "ref": "main", "ref_protected": "true", "pipeline_source": "push"}
    return any(
        (not rule.methods or method in rule.methods)
        and any(path_pattern(p).fullmatch(path) for p in (rule.paths or ("/**",)))
        for grant in Evaluator().grants_for(claims, grants)
        for rule in grant.rules
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_REQUEST, min_size=1, max_size=25))
def test_replayed_every_observed_request_is_allowed_and_unused_methods_denied(
    requests: list[tuple[str, str, str]],
) -> None:
    observed = [obs(path, method=m, project=p, job=str(n)) for n, (p, m, path) in enumerate(requests)]
    files, report = _suggest(None, observed)
    tree = patched_tree(files, report)
    policy = parse_policy(tree)  # what `validate` loads: raises with every error if the suggestion were invalid
    grants = Resolution().update(policy).grants("feature-flags")
    flagged = {json.loads(f.message.split(" was used")[0]) for f in report.flags if f.kind == "path"}
    for project, method, path in requests:
        if path in flagged:  # no Role can name it (a space, `*`, `?`, `#`): reported, not proposed
            continue
        assert _allowed(grants, project, method, path), (project, method, path)
    for project in ("3001", "3002"):
        used = {m for p, m, path in requests if p == project and path not in flagged}
        mine = [path for p, _, path in requests if p == project]
        for method in set(HTTP_METHODS) - used:
            assert not any(_allowed(grants, project, method, path) for path in mine), (project, method)
        # a path is allowed only as a one-segment widening of one observed with that method: same depth, first
        # segment and every segment but the widened ones
        for _, method, path in requests:
            if _allowed(grants, project, method, path + "/deeper"):
                assert any(p == project and m == method and q.endswith("/**") for p, m, q in requests), (
                    "never widened across depth"
                )


# --- `rules: if:` read against a reference evaluator of GitLab's expression language, on generated expressions

_VARS = ("CI_COMMIT_BRANCH", "CI_COMMIT_TAG", "CI_COMMIT_REF_NAME", "CI_COMMIT_REF_PROTECTED", "CI_PIPELINE_SOURCE")
_VALUES = ("main", "dev", "v1", "true", "false", "push", "web", "merge_request_event")
_ATOM = st.one_of(
    st.tuples(st.just("cmp"), st.sampled_from((*_VARS, "X")), st.sampled_from(("==", "!=", "=~")),
              st.sampled_from((*_VALUES, "$CI_DEFAULT_BRANCH"))),
    st.tuples(st.just("set"), st.sampled_from((*_VARS, "X"))),
)  # fmt: skip
_EXPR = st.recursive(_ATOM, lambda inner: st.tuples(st.sampled_from(("&&", "||")), inner, inner), max_leaves=6)
_CONTEXT = st.fixed_dictionaries(
    {
        "type": st.sampled_from(("branch", "tag")),
        "ref": st.sampled_from(("main", "dev", "v1")),
        "protected": st.booleans(),
        "source": st.sampled_from(("push", "web", "merge_request_event", "schedule")),
        "X": st.sampled_from(("", "main")),
    }
)


def _text(expr: Any, quote: str) -> str:
    if expr[0] == "cmp":
        _, var, op, value = expr
        right = value if value.startswith("$") else f"/^{value}$/" if op == "=~" else f"{quote}{value}{quote}"
        return f"${var} {op} {right}"
    if expr[0] == "set":
        return f"${expr[1]}"
    return f"({_text(expr[1], quote)} {expr[0]} {_text(expr[2], quote)})"


def _truth(expr: Any, env: Mapping[str, str]) -> bool:
    if expr[0] == "set":
        return bool(env.get(expr[1]))
    if expr[0] == "cmp":
        _, var, op, value = expr
        left = env.get(var)
        right = env.get(value[1:]) if value.startswith("$") else value
        if op == "=~":
            return left is not None and left == value
        return (left == right) if op == "==" else (left != right)
    first, second = _truth(expr[1], env), _truth(expr[2], env)
    return (first and second) if expr[0] == "&&" else (first or second)


def _pipeline_env(c: Mapping[str, Any]) -> dict[str, str]:
    """The predefined variables of a pipeline in context `c` (ref, ref type, protection, source; `X` a variable)."""
    env = {"CI_COMMIT_REF_NAME": c["ref"], "CI_DEFAULT_BRANCH": "main", "X": c["X"]}
    env |= {"CI_COMMIT_BRANCH" if c["type"] == "branch" else "CI_COMMIT_TAG": c["ref"]}
    env |= {"CI_COMMIT_REF_PROTECTED": "true" if c["protected"] else "false", "CI_PIPELINE_SOURCE": c["source"]}
    return env


def _some_case_admits(cases: Sequence[RuleCase], c: Mapping[str, Any]) -> bool:
    """Whether one of the condition cases found admits a pipeline in context `c` (a case's None admits anything)."""
    return any(
        (case.refs is None or c["ref"] in case.refs)
        and case.ref_type in (None, c["type"])
        and case.protected in (None, c["protected"])
        and (case.sources is None or c["source"] in case.sources)
        for case in cases
    )


@settings(max_examples=400, deadline=None)
@given(_EXPR, st.lists(_CONTEXT, min_size=1, max_size=8), st.sampled_from(("'", '"')))
def test_rule_cases_never_exclude_where_the_job_runs(expr: Any, contexts: list[dict[str, Any]], quote: str) -> None:
    unknown: list[str] = []
    cases = condition_cases(_text(expr, quote), "main", unknown)
    for c in contexts:
        env = _pipeline_env(c)
        if not _truth(expr, env):
            continue
        assert _some_case_admits(cases, c), (_text(expr, quote), c, cases)


def _runs(rules: list[tuple[Any, str | None]], env: Mapping[str, str]) -> bool:
    """GitLab: the first rule whose `if` holds decides; `when: never` there, or no rule holding, and it does not run."""
    for expr, when in rules:
        if expr is None or _truth(expr, env):
            return when != "never"
    return False


_RULES = st.lists(st.tuples(st.one_of(st.none(), _EXPR), st.sampled_from((None, "never", "manual"))), max_size=4)


@settings(max_examples=300, deadline=None)
@given(_RULES, st.one_of(st.none(), _RULES), st.lists(_CONTEXT, min_size=1, max_size=8))
def test_job_and_workflow_rules_never_exclude_where_the_job_runs(
    rules: list[tuple[Any, str | None]], workflow: list[tuple[Any, str | None]] | None, contexts: list[dict[str, Any]]
) -> None:
    def written(items: list[tuple[Any, str | None]]) -> list[dict[str, str]]:
        out = []
        for expr, when in items:
            rule = {} if expr is None else {"if": _text(expr, '"')}
            out.append(rule | ({"when": when} if when else {}) or {"when": "always"})
        return out

    config: dict[str, Any] = {"job": {"id_tokens": {"T": {"aud": AUD}}, "rules": written(rules), "script": ["x"]}}
    if workflow is not None:
        config["workflow"] = {"rules": written(workflow)}
    (job,) = _ci(yaml.safe_dump(config)).jobs
    for c in contexts:
        env = _pipeline_env(c)
        if not (_runs(rules, env) and (workflow is None or _runs(workflow, env))):
            continue
        assert _some_case_admits(job.cases, c), (config, c, job.cases)


# --- (c): a hostile server at the GitLab URL: its answers reach stderr, never the token or a traceback

SECRET = "glpat-attack-suggest-0123456789"


class _Hostile(BaseHTTPRequestHandler):
    mode = "echo"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        body: dict[str, object]
        if self.mode == "echo":  # an error body echoing the token it was sent, with terminal escapes
            status, body = 400, {"message": f"token {self.headers.get('PRIVATE-TOKEN')} \x1b[2J is bad"}
        else:  # a 200 whose project is not shaped as GitLab's
            status, body = 200, {"id": "not-an-id", "path_with_namespace": None, "default_branch": ["x"]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("mode", ["echo", "garbage"])
def test_a_hostile_gitlab_never_gets_the_token_printed_nor_a_traceback(
    mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = type("Handler", (_Hostile,), {"mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        AuditStore(tmp_path / DB_NAME, retention=None).close(10)
        monkeypatch.setenv("ATTACK_SUGGEST_TOKEN", SECRET)
        url = f"http://ops:url-password@127.0.0.1:{server.server_port}"  # a credential in the URL, too
        argv = ["suggest", str(EXAMPLE), "--state-dir", str(tmp_path), "--gitlab-url", url]
        assert main([*argv, "--gitlab-token-env", "ATTACK_SUGGEST_TOKEN", "--project", "42"]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    out, err = capsys.readouterr()
    assert SECRET not in out + err and "\x1b" not in err and "url-password" not in err
    assert ("answered HTTP 400: token [token]" if mode == "echo" else "not shaped as GitLab's (ValueError)") in err


# --- huge trails: time stays near linear in the requests and the distinct paths


def test_generalise_many_globs_at_one_position_is_not_quadratic() -> None:
    paths = [f"/a/k{k}/j{k}-{m}" for k in range(20_000) for m in range(3)]  # 20,000 globs at segment 3
    start = time.monotonic()
    assert generalise(paths) == ("/a/*/*",)  # minutes before: one set copy of 60,000 paths per glob
    assert time.monotonic() - start < BOUND


def test_a_large_trail_over_many_paths_is_proposed_in_bounded_time() -> None:
    observed = [obs(f"/p{i % 5000}/x", job=str(i % 997)) for i in range(200_000)]
    start = time.monotonic()
    _, report = _suggest(None, observed)  # every request matched against every pattern before: 10^9 matches
    assert time.monotonic() - start < 3 * BOUND
    (s,) = report.suggestions
    assert s.evidence.requests == 200_000 and len(s.rules[0].paths) == 5000


def test_generalisation_never_makes_a_word_a_glob() -> None:
    # /api/*/x would admit /api/secrets/x: words name different things, ids name one of many
    words = ["/api/admin/x", "/api/users/x", "/api/jobs/x", "/api/health/x"]
    assert generalise(words) == tuple(sorted(words))
    assert generalise(["/admin/1/x", "/admin/2/x", "/admin/3/x"]) == ("/admin/*/x",)  # `admin` itself stays
    assert generalise(["/r/2026-01", "/r/2026-02", "/r/v3", "/r/latest"]) == ("/r/*", "/r/latest")


_RUN = """
import sys
from tests.test_assistant_attacks import _ci, _suggest
from tests.support.assistant import obs
from controlplane.assistant.propose import render_yaml, text_lines
ci = _ci('''
b: {id_tokens: {T: {aud: "api://feature-flags"}}, environment: prod, only: [main, tags, schedules]}
a: {id_tokens: {T: {aud: ["api://feature-flags", "other"]}}, environment: prod,
    rules: [{if: '$CI_COMMIT_BRANCH == "main"'}]}
''')
observed = [obs(f"/flags/{k}/{n}/x", method=m, job=str(n)) for k in "abc" for n in range(9) for m in ("GET", "PUT")]
_, report = _suggest(ci, observed)
sys.stdout.write(render_yaml(report) + "\\n".join(text_lines(report)))
"""


def test_output_is_the_same_whatever_the_hash_seed() -> None:
    root = Path(__file__).resolve().parent.parent
    outputs = set()
    for seed in ("0", "1", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        done = subprocess.run(
            [sys.executable, "-c", _RUN], env=env, cwd=root, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    (text,) = outputs  # sets and dicts of strings iterate in another order under each seed
    assert "/flags/a/*/x" in text and 'environment: ["prod"]' in text


def test_it_only_reads_gitlab_and_never_a_variable_or_a_write(
    fake: FakeGitLab, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only and no secrets: every API request is a GET of a project, its refs and protections, or a raw file
    (`variables:` in the CI file is skipped as a keyword: CI/CD variables, where secrets live, are never asked)."""
    ci = "variables: {DEPLOY_KEY: $SECRET}\ninclude: ci/x.yml\njob: {id_tokens: {T: {aud: https://reports.local}}}\n"
    fake.add_project("acme/platform/deployer", id=42, branches=["v1"], tags=["v1"], protected_tags=["v*"],
                     files={".gitlab-ci.yml": ci, "ci/x.yml": "other: {script: [x]}\n"})  # fmt: skip
    store = AuditStore(tmp_path / DB_NAME, retention=None)
    store.close(10)
    monkeypatch.setenv("ATTACK_SUGGEST_TOKEN", fake.api_token)
    argv = ["suggest", str(Path(EXAMPLE).parent / "quickstart"), "--state-dir", str(tmp_path)]
    argv += ["--gitlab-url", fake.base_url, "--gitlab-token-env", "ATTACK_SUGGEST_TOKEN", "--project", "42"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    calls = fake.api_calls()
    assert calls and {c.method for c in calls} == {"GET"}
    assert not [c for c in calls if "variable" in c.path or "variable" in c.endpoint]
    assert {c.endpoint for c in calls} <= {
        "/projects/:id",
        "/projects/:id/repository/branches",
        "/projects/:id/repository/tags",
        "/projects/:id/protected_tags",
        "/projects/:id/environments",  # the inventory's project read: names and tiers
        "/projects/:id/protected_environments",
        "/projects/:id/repository/files/:path/raw",
    }, {c.endpoint for c in calls}
    assert fake.api_token not in capsys.readouterr().out


def test_rules_on_a_variable_the_file_sets_constrain_nothing() -> None:
    # `variables:` outranks GitLab's predefined variables: this job runs on every branch and source
    ci = _ci(
        """
variables: {CI_COMMIT_BRANCH: main}
deploy:
  variables: {CI_PIPELINE_SOURCE: push}
  id_tokens: {T: {aud: "api://feature-flags"}}
  rules: [{if: '$CI_COMMIT_BRANCH == "main" && $CI_PIPELINE_SOURCE == "push"'}]
"""
    )
    (job,) = ci.jobs
    assert job.refs is None and job.sources is None  # were {main} and {push}
    assert sum("set by the file's variables" in u for u in job.unknown) == 2


def test_an_access_log_line_without_end_is_read_bounded(tmp_path: Path) -> None:
    from controlplane.cli.suggest import MAX_LOG_LINE, _bounded_lines

    log = tmp_path / "access.log"
    rbac = '{"b_shadow_effective_policy_id": "x/y", "b_shadow_engine_result": "allowed"}'
    shadow = '{"project_id": "42", "rbac": ' + rbac + "}"
    log.write_text(shadow + "\n" + "x" * (5 * MAX_LOG_LINE + 7) + "\n" + shadow + "\n" + "y" * (2 * MAX_LOG_LINE))
    with log.open(encoding="utf-8") as handle:
        lines = list(_bounded_lines(handle))
    assert [len(line) for line in lines] == [len(shadow) + 1, MAX_LOG_LINE, len(shadow) + 1, MAX_LOG_LINE]
    assert shadow_matches(lines) == {"x/y": ShadowSeen(2, ("42",))}


def test_long_backend_names_cut_to_one_name_get_distinct_names() -> None:
    files = read_policy_dir(EXAMPLE)
    names = ["b" * 58 + f"-{i}" for i in range(3)]  # "p3001-" + 57 b's for all three once cut to 63
    for i, name in enumerate(names):
        files[f"b{i}.yaml"] = (
            f"kind: Backend\nname: {name}\nhosts: [h{i}.example.com]\naudience: api://b{i}\n"
            f"endpoints:\n  - {{address: 10.0.30.{i + 10}, port: 8080}}\n"
        )
    files["gateway.yaml"] = files["gateway.yaml"].replace(
        "backends: [feature-flags]", "backends: [feature-flags, " + ", ".join(names) + "]"
    )
    policy = parse_policy(files)
    observed = [dataclasses.replace(obs("/x"), backend=name) for name in names]
    given = Inputs(policy, Resolution().update(policy), observed, {}, {"3001": {"main": True}}, now=NOW)
    report = suggest(given)  # the third one looped forever before
    assert [s.name[57:] for s in report.suggestions] == ["bbbbbb", "bbbb-s", "bbb-s2"]
    tree = patched_tree(files, report)
    assert {b.name for b in parse_policy(tree).bindings} >= {s.name for s in report.suggestions}


def test_a_child_pipeline_makes_the_configuration_incomplete() -> None:
    # the child's jobs run in this project on main, from ci/child.yml, maybe without environment or push
    text = """
deploy:
  id_tokens: {T: {aud: "api://feature-flags"}}
  environment: production
  rules: [{if: '$CI_PIPELINE_SOURCE == "push"'}]
child:
  trigger: {include: ci/child.yml}
"""
    ci = _ci(text)
    assert set(_conditions(ci)) == {"project", "ref_protected"}  # environment and pipeline_source pinned before
    assert ci.notes == ("job child: triggers a pipeline whose configuration is not read",)


def test_a_project_id_claim_not_written_as_ascii_digits_is_not_proposed_from() -> None:
    observed = [dataclasses.replace(obs("/x"), project_id=pid) for pid in ("\u0663\u0660\u0660\u0661", "03001")]
    _, report = _suggest(None, observed)
    assert report.suggestions == () and report.ignored == 2  # both became `project: 3001` before


def test_the_projects_own_ci_file_setting_is_what_is_read(fake: FakeGitLab) -> None:
    stale = 'deploy: {id_tokens: {T: {aud: "api://feature-flags"}}, environment: production}\n'
    real = 'deploy: {id_tokens: {T: {aud: "api://feature-flags"}}}\n'  # no environment: a pin would shut it out
    fake.add_project("acme/p", id=3001, ci_config_path="ci/pipeline.yml",
                     files={".gitlab-ci.yml": stale, "ci/pipeline.yml": real})  # fmt: skip
    fake.add_project("acme/q", id=3002, ci_config_path="ci.yml@acme/templates", files={".gitlab-ci.yml": stale})
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=1)
    read = {}
    for pid in (3001, 3002):
        project = ci_project(source, pid)
        assert project is not None
        read[pid] = load_ci_config(
            project.path, project.read, default_branch=project.default_branch, ci_file=project.ci_config_path
        )
    assert read[3001].files == ("ci/pipeline.yml",) and read[3001].jobs[0].environment is None
    assert set(_conditions(read[3001])) == {"project", "ref_protected"}  # environment: [production] before
    assert read[3002].jobs == () and not read[3002].complete and read[3002].files == ()


def test_the_streamed_trail_reads_an_older_serves_file(tmp_path: Path) -> None:
    """A file written by a serve before the trail kept the claims: the claim columns are absent, read as None
    (not "no such column"), and the rows agree with `query_records`."""
    from controlplane.audit.store import open_readonly, query_records
    from controlplane.cli.suggest import _streamed

    db = tmp_path / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE audit (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, gateway TEXT, node TEXT,"
        " backend TEXT, method TEXT, path TEXT, status INTEGER, decision TEXT, details TEXT, policy TEXT,"
        " project_id TEXT, project_path TEXT, pipeline_id TEXT, job_id TEXT, ref TEXT, user TEXT,"
        " credential_jti TEXT, issuer TEXT, peer TEXT, identity TEXT, reported_time REAL)"
    )
    for n in range(3):
        conn.execute(
            "INSERT INTO audit (time, gateway, node, backend, method, path, status, decision, project_id, job_id,"
            " ref, issuer) VALUES (?, 'g', 'n', 'feature-flags', 'GET', ?, 200, 'allowed', '3001', ?, 'main', ?)",
            (NOW - n, f"/flags/{n}", str(n), GITLAB),
        )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    reader = open_readonly(db)
    try:
        streamed = _streamed(reader, NOW - 10, 2)
        rows = query_records(reader, since=NOW - 10, limit=2)
    finally:
        reader.close()
    assert [o.path for o in streamed] == [r["path"] for r in rows] == ["/flags/1", "/flags/0"]
    assert all(o.ref_protected is None and o.environment is None for o in streamed)
