"""The wide replay of tests/test_e2e_suggest.py at unit level: the same scenario's trail (tests/support/
suggest_scenario.py) through `suggest`, the patched tree loaded as `validate` loads it, every request replayed
through the Evaluator and the rules (the one evaluation RBAC is compiled from). It passes as the proposer is, and
each mutation of the proposer (words globbed, a pin dropped, CI's sources ignored, a method lost, no globs) makes
the same replay fail: the acceptance can fail, in both directions (a request admitted that the documented rules
deny, an observed or legitimately admitted one denied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from controlplane.assistant import propose
from controlplane.assistant.ci_config import load_ci_config
from controlplane.assistant.propose import Inputs, Observation, patched_tree, suggest
from controlplane.model.kinds.role import HTTP_METHODS
from controlplane.model.loader import parse_policy
from controlplane.resolved.diff import path_pattern
from controlplane.resolved.evaluate import Evaluator
from controlplane.resolved.index import Resolution
from tests.support import suggest_scenario as wide

NOW = 1_796_500_000.0  # 2026-12-05
ISSUER = wide.OFFLINE.issuer


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def token_claims(made: wide.Call) -> dict[str, str]:
    """The claims as a GitLab token carries them (every value a string)."""
    return {"iss": ISSUER, **{k: _text(v) for k, v in made.claims}}


def observed(recorded: Sequence[wide.Call]) -> list[Observation]:
    """The trail serve would have written for `recorded` under the broad policy."""
    out = []
    for index, made in enumerate(recorded):
        claim = token_claims(made)
        decider = "web-reviews" if claim["pipeline_source"] == wide.MR else "platform-all"
        role = "reports-everything" if made.backend == "reports-api" else "deploy-everything"
        out.append(
            Observation(
                NOW - 3600 + index,
                made.backend,
                made.method,
                made.path,
                "allowed",
                f"{decider}/{role}",
                claim["project_id"],
                claim["project_path"],
                claim["job_id"],
                claim["ref"],
                ISSUER,
                claim["ref_protected"],
                claim["pipeline_source"],
                claim.get("environment"),
            )
        )
    return out


def replay_violations() -> tuple[list[str], int]:
    """What the replay finds wrong with the suggestion made now, and how many requests it admits by the rules."""
    files = wide.policy(wide.OFFLINE)
    policy = parse_policy(files)
    recorded = wide.recorded_calls()
    configs = {
        str(project): load_ci_config(wide.PROJECTS[project], texts.get, default_branch="main")
        for project, (texts, _, _) in wide.CI_FILES.items()
    }
    report = suggest(Inputs(policy, Resolution().update(policy), observed(recorded), configs, {}, now=NOW))
    suggested = Resolution().update(parse_policy(patched_tree(files, report)))
    oracle = wide.Oracle.of(recorded)

    def allowed(made: wide.Call) -> bool:
        grants = Evaluator().grants_for(token_claims(made), suggested.grants(made.backend))
        return any(
            (not rule.methods or made.method in rule.methods)
            and any(path_pattern(p).fullmatch(made.path) for p in rule.paths or ("/**",))
            for grant in grants
            for rule in grant.rules
        )

    wrong = [f"recorded, now denied: {wide.describe(c)}" for c in recorded if not allowed(c)]
    unused = [c for c in wide.unused_calls(recorded) if wide.old_policy_allows(c)]
    exceptions = 0
    for made in unused:
        expected = oracle.admitted(made)
        exceptions += expected
        if allowed(made) != expected:
            verdict = "admitted, the rules deny it" if expected is False else "denied, the rules admit it"
            wrong.append(f"unused, {verdict}: {wide.describe(made)}")
    return wrong, exceptions


def test_the_suggestion_passes_the_replay() -> None:
    wrong, exceptions = replay_violations()
    assert wrong == []
    assert exceptions == 30


def _words_globbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propose, "_id_like", lambda segment: segment not in ("", "*"))


def _no_protection_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propose, "_ref_protected", lambda *args: None)


def _ci_sources_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    real = propose._ci_allows
    monkeypatch.setattr(propose, "_ci_allows", lambda key, jobs: None if key == "pipeline_source" else real(key, jobs))


def _head_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propose, "HTTP_METHODS", tuple(m for m in HTTP_METHODS if m != "HEAD"))


def _no_globs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(propose, "GLOB_MIN", 10**6)


@pytest.mark.parametrize(
    ("mutate", "caught"),
    [
        (_words_globbed, "unused, admitted, the rules deny it: p42 reports-api GET /reports/summary/admin"),
        (
            _no_protection_pin,
            "unused, admitted, the rules deny it: p42 reports-api GET /reports/2026/01 [ref=feature-z",
        ),
        (
            _ci_sources_ignored,
            "unused, admitted, the rules deny it: p42 deploy-api POST /deployments/prod [ref=main "
            "ref_protected=True pipeline_source=web",
        ),
        (_head_lost, "recorded, now denied: p42 reports-api HEAD /reports/index"),
        (_no_globs, "unused, denied, the rules admit it: p42 reports-api GET /reports/2026/99"),
    ],
)
def test_a_mutated_proposer_fails_the_replay(
    monkeypatch: pytest.MonkeyPatch, mutate: Callable[[pytest.MonkeyPatch], None], caught: str
) -> None:
    mutate(monkeypatch)
    wrong, _ = replay_violations()
    assert any(line.startswith(caught) for line in wrong), wrong[:10]
