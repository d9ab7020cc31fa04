"""`controlplane suggest` on the claims the audit trail records (schema version 3): `ref_protected` from what every
request carried (GitLab's protections now only for rows recorded before), `pipeline_source` and `environment`
pinned when observations agree with CI (or, with no CI job read, from observations alone); never narrower than
what was observed, checked through the real loader and evaluator."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controlplane.assistant.ci_config import CiConfig, load_ci_config
from controlplane.assistant.propose import Inputs, Observation, Report, patched_tree, render_yaml, suggest
from controlplane.model.loader import parse_policy
from controlplane.resolved.evaluate import Evaluator
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import read_policy_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gitlab-and-oidc"
GITLAB = "https://gitlab.example.com"
DAY = 86_400.0
NOW = 1_796_500_000.0  # 2026-12-05
PROJECT = "3001"

PUSH_ONLY_CI = """\
read-flags:
  id_tokens: {FLAGS: {aud: "api://feature-flags"}}
  environment: production
  rules:
    - if: $CI_PIPELINE_SOURCE == "push" || $CI_PIPELINE_SOURCE == "schedule"
"""
OPEN_CI = """\
read-flags:
  id_tokens: {FLAGS: {aud: "api://feature-flags"}}
  environment: review/$CI_COMMIT_REF_SLUG
  script: [./read.sh]
"""


def obs(*, job: str = "1", ref: str = "main", protected: str | None = "true", source: str | None = "push",
        environment: str | None = None, days_ago: float = 1, path: str = "/flags/a") -> Observation:  # fmt: skip
    """An allowed request of project 3001 as the trail keeps it; `protected=None, source=None`: a row recorded
    before the trail kept the claims."""
    return Observation(NOW - days_ago * DAY, "feature-flags", "GET", path, "allowed", "ci-reads-flags/flags-read",
                       PROJECT, "acme/flags", job, ref, GITLAB, protected, source, environment)  # fmt: skip


def run(
    observed: Sequence[Observation], *, ci: str | None = None, protected_now: Mapping[str, bool] | None = None
) -> tuple[Report, dict[str, Any]]:
    """The report and the suggested subject's conditions, by key."""
    policy = parse_policy(read_policy_dir(EXAMPLE))
    configs: dict[str, CiConfig] = {}
    if ci is not None:
        configs[PROJECT] = load_ci_config("acme/flags", {".gitlab-ci.yml": ci}.get, default_branch="main")
    protections = {} if protected_now is None else {PROJECT: protected_now}
    report = suggest(Inputs(policy, Resolution().update(policy), observed, configs, protections, now=NOW))
    (suggestion,) = report.suggestions
    return report, {c.key: c for c in suggestion.conditions}


def assert_keeps_what_was_observed(report: Report, observed: Sequence[Observation]) -> None:
    """The suggested tree, loaded as `validate` loads it, grants every observed request with the claims it carried
    (a row recorded before the trail kept them is checked with GitLab's values of the fixture: protected, push)."""
    tree = patched_tree(read_policy_dir(EXAMPLE), report)
    policy = parse_policy(tree)
    grants = Resolution().update(policy).grants("feature-flags")
    for o in observed:
        claims = {"iss": GITLAB, "project_id": o.project_id, "ref": o.ref, "ref_type": "branch",
                  "ref_protected": o.ref_protected or "true",
                  "pipeline_source": o.pipeline_source or "push"}  # fmt: skip
        if o.environment is not None:
            claims["environment"] = o.environment
        assert Evaluator().grants_for(claims, grants), (o, render_yaml(report))


# --- ref_protected ---------------------------------------------------------------------------------------------


def test_ref_protected_is_pinned_from_what_every_request_carried_not_from_gitlab_now() -> None:
    observed = [obs(job="11"), obs(job="12", ref="release")]
    # "release" is unprotected in GitLab now: the requests were made while it was protected, and said so
    report, conditions = run(observed, protected_now={"main": True, "release": False})
    assert conditions["ref_protected"].value is True
    assert (
        conditions["ref_protected"].why
        == 'every request observed: 2 request(s) carried ref_protected "true" (refs main, release)'
    )
    assert_keeps_what_was_observed(report, observed)
    text = render_yaml(report)
    assert '# every request observed: 2 request(s) carried ref_protected "true" (refs main, release)\n' in text


def test_one_request_from_an_unprotected_ref_means_no_pin_whatever_gitlab_says_now() -> None:
    observed = [obs(job="11"), obs(job="12", ref="feature", protected="false")]
    report, conditions = run(observed, protected_now={"main": True, "feature": True})  # protected since
    assert "ref_protected" not in conditions
    assert_keeps_what_was_observed(report, observed)


def test_rows_recorded_before_the_claims_fall_back_on_gitlab_now_and_say_so() -> None:
    old = obs(job="10", ref="stable", protected=None, source=None, days_ago=20)
    observed = [old, obs(job="11")]
    report, conditions = run(observed, protected_now={"main": False, "stable": True})
    assert conditions["ref_protected"].why == (
        '1 request(s) carried ref_protected "true" (refs main); 1 recorded before the trail kept the claim: '
        "its refs (stable) are protected now"
    )
    assert_keeps_what_was_observed(report, observed)
    _, unprotected_now = run(observed, protected_now={"main": True, "stable": False})
    assert "ref_protected" not in unprotected_now  # the old row's ref is not protected now: no evidence
    _, all_old = run([old], protected_now={"stable": True})
    assert (
        all_old["ref_protected"].why
        == "1 recorded before the trail kept the claim: its refs (stable) are protected now"
    )


def test_unpinned_protected_is_flagged_from_recorded_claims() -> None:
    files = read_policy_dir(EXAMPLE)
    files["extra.yaml"] = (
        "kind: Binding\nname: ci-any-ref\nissuer: gitlab\nroles: [flags-read]\nsubjects:\n  - project: 3001\n"
    )
    policy = parse_policy(files)

    def flags(observed: list[Observation]) -> dict[str, str]:
        given = Inputs(policy, Resolution().update(policy), observed, {}, {PROJECT: {"main": True}}, now=NOW)
        return {f.subject: f.message for f in suggest(given).flags if f.kind == "unpinned-protected"}

    used = "ci-any-ref/flags-read"
    protected = [obs()]
    assert "protected refs main" in flags([Observation(**{**protected[0].__dict__, "policy": used})])["ci-any-ref"]
    unprotected_then = Observation(**{**obs(protected="false").__dict__, "policy": used})
    assert "ci-any-ref" not in flags([unprotected_then])  # GitLab protects main now; the request said it did not
    before = Observation(**{**obs(protected=None, source=None).__dict__, "policy": used})
    assert "by GitLab's protections now" in flags([before])["ci-any-ref"]


# --- pipeline_source and environment ---------------------------------------------------------------------------


def test_sources_and_environment_confined_by_ci_are_pinned_when_observations_agree() -> None:
    observed = [obs(job="11", environment="production"), obs(job="12", source="schedule", environment="production")]
    report, conditions = run(observed, ci=PUSH_ONLY_CI)
    assert conditions["pipeline_source"].value == ("push", "schedule")
    assert conditions["pipeline_source"].why == (
        "the only pipeline sources the rules of [read-flags] allow; 2 observed request(s) agree"
    )
    assert conditions["environment"].value == ("production",)
    assert conditions["environment"].why == "the environments of [read-flags]; 2 observed request(s) agree"
    assert not [f for f in report.flags if f.kind == "observed"]
    assert_keeps_what_was_observed(report, observed)


def test_an_observation_ci_rules_say_cannot_happen_pins_nothing_and_is_flagged() -> None:
    observed = [obs(job="11", environment="production"), obs(job="12", source="web", environment="staging")]
    report, conditions = run(observed, ci=PUSH_ONLY_CI)
    assert "pipeline_source" not in conditions and "environment" not in conditions
    found = sorted(f.message for f in report.flags if f.kind == "observed")
    assert found == [
        "environment staging observed, outside what [read-flags] allow (production): not pinned",
        "pipeline_source web observed, outside what [read-flags] allow (push, schedule): not pinned",
    ]
    assert_keeps_what_was_observed(report, observed)
    # a request without an environment disagrees with a job that always has one
    _, no_env = run([obs(environment="production"), obs(job="2")], ci=PUSH_ONLY_CI)
    assert "environment" not in no_env and "pipeline_source" in no_env


def test_rows_recorded_before_the_claims_leave_ci_pins_as_they_were_and_say_so() -> None:
    observed = [obs(job="10", protected=None, source=None), obs(job="11", environment="production")]
    _, conditions = run(observed, ci=PUSH_ONLY_CI)
    assert conditions["pipeline_source"].why.endswith(
        "; 1 observed request(s) agree; 1 request(s) recorded before the trail kept it"
    )


def test_without_ci_sources_and_environments_come_from_observations_alone() -> None:
    observed = [obs(job="11", environment="production"), obs(job="12", source="schedule", environment="production")]
    report, conditions = run(observed)
    assert conditions["pipeline_source"].value == ("push", "schedule")
    assert conditions["pipeline_source"].why == (
        "observed only (no CI job asking for this audience was read): every one of 2 request(s) carried push or "
        "schedule"
    )
    assert conditions["environment"].value == ("production",)
    assert_keeps_what_was_observed(report, observed)
    # a request without an environment: environment cannot be pinned (nothing names "none")
    _, mixed = run([*observed, obs(job="13")])
    assert "environment" not in mixed and mixed["pipeline_source"].value == ("push", "schedule")
    # one row recorded before the claims: it could have carried anything, so nothing is pinned from observations
    _, old = run([*observed, obs(job="9", protected=None, source=None)])
    assert "pipeline_source" not in old and "environment" not in old


def test_ci_that_leaves_them_open_is_not_narrowed_to_what_was_observed() -> None:
    observed = [obs(job="11", environment="review/feature-a")]
    _, conditions = run(observed, ci=OPEN_CI)  # any source, an environment per branch
    assert "pipeline_source" not in conditions and "environment" not in conditions


def test_deterministic_whatever_the_order_of_the_claims() -> None:
    observed = [
        obs(job=str(i), source=("push", "schedule", "web")[i % 3], environment="production", ref=f"r{i % 2}")
        for i in range(12)
    ]
    first, _ = run(observed)
    shuffled = list(observed)
    random.Random(3).shuffle(shuffled)
    second, _ = run(shuffled)
    assert render_yaml(first) == render_yaml(second)
    assert 'pipeline_source: ["push", "schedule", "web"]' in render_yaml(first)


def test_a_recorded_value_a_subject_cannot_name_as_itself_is_not_pinned_from_observations() -> None:
    """A glob character would widen, redacted text names nothing, an empty value is no value: rather no pin (never
    narrower than observed) than a wrong one."""
    for odd in ("review/*", "[redacted]", "", "tab\there"):
        _, conditions = run([obs(environment="production"), obs(job="2", environment=odd)])
        assert "environment" not in conditions, odd
        assert conditions["pipeline_source"].value == ("push",)
