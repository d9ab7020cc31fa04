"""The proposer of `controlplane suggest`, without Envoy: path generalisation, subjects, what is kept, the flags,
determinism, and that the patched tree loads with the real policy loader (what `validate` runs)."""

from __future__ import annotations

import random

import yaml

from controlplane.assistant.ci_config import load_ci_config
from controlplane.assistant.propose import (
    Inputs,
    Observation,
    ShadowSeen,
    generalise,
    patched_tree,
    render_yaml,
    shadow_matches,
    suggest,
    text_lines,
    unified_diff,
)
from controlplane.model.loader import parse_policy
from controlplane.resolved.evaluate import Evaluator
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import read_policy_dir
from tests.support.assistant import DAY, EXAMPLE, GITLAB, NOW, obs

CI = """\
read-flags:
  id_tokens: {FLAGS: {aud: "api://feature-flags"}}
  rules:
    - if: $CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH
"""


def _inputs(observations: list[Observation]) -> Inputs:
    files = read_policy_dir(EXAMPLE)
    policy = parse_policy(files)
    ci = {"3001": load_ci_config("acme/p3001", {".gitlab-ci.yml": CI}.get, default_branch="main")}
    return Inputs(
        policy,
        Resolution().update(policy),
        observations,
        ci,
        {"3001": {"main": True, "feature": False}},
        now=NOW,
        unused_days=30,
    )


OBSERVED = [
    obs("/flags/a/1", job="11"),
    obs("/flags/a/2", job="12", days_ago=3),
    obs("/flags/a/3", job="12"),
    obs("/flags/b", job="13", method="HEAD", policy="admins-manage-flags/flags-admin"),
    obs("/flags/a/1", decision="denied", policy=None, method="DELETE"),
    obs("/flags/a/1", issuer="https://example.okta.com/oauth2/default", project=""),
    obs("/flags/a/1", method="TRACE"),  # no Role can name it
    obs("/flags/a b"),  # nor this path
]


def test_generalise_one_segment_from_three_values() -> None:
    assert generalise(["/a/1", "/a/2"]) == ("/a/1", "/a/2")
    assert generalise(["/a/1", "/a/2", "/a/3"]) == ("/a/*",)
    assert generalise(["/a/1/x", "/a/2/x", "/a/3/x", "/a/4/y"]) == ("/a/*/x", "/a/4/y")
    # the first segment is never a glob, nor an empty one; glob characters and queries are not paths to copy
    assert generalise(["/a", "/b", "/c"]) == ("/a", "/b", "/c")
    assert generalise(["/x/", "/y/", "/z/"]) == ("/x/", "/y/", "/z/")
    assert generalise(["/a/*", "/a?b", "/a#c", "/a b"]) == ()


def test_suggestion_rules_subject_and_evidence() -> None:
    report = suggest(_inputs(OBSERVED))
    (s,) = report.suggestions
    assert (s.name, s.issuer, s.backend, s.project_id) == ("p3001-feature-flags", "gitlab", "feature-flags", "3001")
    assert [(r.methods, r.paths) for r in s.rules] == [(("GET",), ("/flags/a/*",)), (("HEAD",), ("/flags/b",))]
    assert {c.key: c.value for c in s.conditions} == {"project": 3001, "ref_protected": True, "ref": ("main",)}
    assert s.jobs == ("read-flags",) and s.evidence.jobs == ("11", "12", "13")
    assert report.ignored == 4  # the denied request, the OIDC one, the TRACE, the path with a space
    assert ("path", "feature-flags") in {(f.kind, f.subject) for f in report.flags}
    # the OIDC binding stays, with both roles it names; the GitLab binding is replaced
    assert report.kept_bindings == ("admins-manage-flags",)
    assert report.kept_roles == ("flags-admin", "flags-read")
    text = render_yaml(report)
    assert "# /flags/a/*: 3 request(s) by 2 job(s) (11, 12), 2026-12-02..2026-12-04; from 3 paths" in text
    assert all(doc is None or doc["kind"] in ("Role", "Binding") for doc in yaml.safe_load_all(text))


def test_patched_tree_loads_with_the_real_loader_and_grants_what_was_used() -> None:
    given = _inputs(OBSERVED)
    report = suggest(given)
    old = read_policy_dir(EXAMPLE)
    tree = patched_tree(old, report)
    policy = parse_policy(tree)  # raises PolicyInvalid with every error if the suggestion were invalid
    assert {b.name for b in policy.bindings} == {"admins-manage-flags", "p3001-feature-flags"}
    resolved = Resolution().update(policy)
    grants = resolved.grants("feature-flags")
    claims = {"iss": GITLAB, "project_id": "3001", "ref": "main", "ref_protected": "true", "pipeline_source": "push"}
    granted = Evaluator().grants_for(claims, grants)
    assert [g.name for g in granted] == ["p3001-feature-flags/p3001-feature-flags"]
    for refused in ({"ref": "feature", "ref_protected": "false"}, {"project_id": "3002"}):
        assert Evaluator().grants_for({**claims, **refused}, grants) == []
    diff = unified_diff(old, tree)
    assert "-name: ci-reads-flags" in diff and "+++ b/suggested.yaml" in diff
    assert "admins-manage-flags" not in "".join(line for line in diff.splitlines() if line.startswith("-"))


def test_flags_over_broad_grants() -> None:
    report = suggest(_inputs(OBSERVED))
    flags = {(f.kind, f.subject): f.message for f in report.flags}
    # flags-admin allows any method on /**: used by HEAD only, nothing to name as unused methods
    assert ("unused-rule", "admins-manage-flags/flags-admin") not in flags
    assert not [key for key in flags if key[0] == "ci"]  # the job asks for the backend and was seen
    old = suggest(_inputs([obs("/flags/a/1", days_ago=45)]))
    stale = {(f.kind, f.subject) for f in old.flags}
    assert ("unmatched-binding", "ci-reads-flags") in stale  # only used 45 days ago
    assert ("unmatched-binding", "admins-manage-flags") in stale
    assert ("ci", "acme/p3001") not in stale
    assert ("unpinned-protected", "admins-manage-flags") not in stale  # OIDC tokens have no refs


def test_unused_methods_and_unpinned_protected() -> None:
    # a GitLab binding without ref_protected whose requests all came from protected refs
    files = read_policy_dir(EXAMPLE)
    files["extra.yaml"] = (
        "kind: Role\nname: flags-write\nbackend: feature-flags\nrules:\n  - methods: [GET, POST]\n    paths: [/x]\n"
        "  - methods: [PUT]\n    paths: [/y]\n---\nkind: Binding\nname: ci-writes\nissuer: gitlab\n"
        "roles: [flags-write]\nsubjects:\n  - project: 3001\n"
    )
    policy = parse_policy(files)
    given = Inputs(policy, Resolution().update(policy), [obs("/x", policy="ci-writes/flags-write")], {},
                   {"3001": {"main": True}}, now=NOW)  # fmt: skip
    flags = {(f.kind, f.subject): f.message for f in suggest(given).flags}
    assert "methods POST unused" in flags[("unused-methods", "ci-writes/flags-write")]
    assert "rule PUT /y unused for 30 days" in flags[("unused-rule", "ci-writes/flags-write")]
    assert "protected refs main" in flags[("unpinned-protected", "ci-writes")]


def test_deterministic_whatever_the_order() -> None:
    first = suggest(_inputs(OBSERVED))
    shuffled = list(OBSERVED)
    random.Random(7).shuffle(shuffled)
    second = suggest(_inputs(shuffled))
    assert render_yaml(first) == render_yaml(second)
    assert text_lines(first) == text_lines(second)


def test_shadow_matches_from_access_log_lines() -> None:
    lines = [
        '{"project_id": "42", "rbac": {"deploy_api_shadow_effective_policy_id": "dry/deploy",'
        ' "deploy_api_shadow_engine_result": "allowed"}}',
        '{"project_id": "43", "rbac": {"deploy_api_shadow_effective_policy_id": "dry/deploy",'
        ' "deploy_api_shadow_engine_result": "denied"}}',
        '{"project_id": "44", "rbac": "-"}',
        "not json",
        '{"project_id": "45", "rbac": {"x_shadow_effective_policy_id": "dry/deploy",'
        ' "x_shadow_engine_result": "allowed"}}',
    ]
    assert shadow_matches(lines) == {"dry/deploy": ShadowSeen(2, ("42", "45"))}


def test_names_never_collide_with_what_stays_and_inline_documents_are_kept() -> None:
    files = read_policy_dir(EXAMPLE)
    # an OIDC binding (kept) already named as the suggestion would be, written after `--- ` on one line
    files["taken.yaml"] = (
        "--- {kind: Binding, name: p3001-feature-flags, issuer: okta, roles: [flags-read],"
        " subjects: [{claims: {sub: x}}]}\n"
    )
    policy = parse_policy(files)
    given = Inputs(policy, Resolution().update(policy), OBSERVED, {}, {}, now=NOW)
    report = suggest(given)
    assert [s.name for s in report.suggestions] == ["p3001-feature-flags-s"]
    tree = patched_tree(files, report)
    assert "name: p3001-feature-flags," in tree["taken.yaml"]
    assert {b.name for b in parse_policy(tree).bindings} == {
        "admins-manage-flags",
        "p3001-feature-flags",
        "p3001-feature-flags-s",
    }


def test_a_binding_whose_role_is_used_through_exchanged_credentials_is_kept() -> None:
    """Requests with a credential exchanged at the control plane carry its issuer and the policy id
    `exchanged/<role>`: nothing is proposed from them. Replacing the GitLab binding granting that role (as every
    other GitLab binding is) made the exchange refuse those jobs after the merge: it is kept, and said why."""
    from controlplane.assistant.propose import EXCHANGED_POLICY_PREFIX as ASSISTANT_PREFIX
    from controlplane.compiler.names import EXCHANGED_POLICY_PREFIX

    assert ASSISTANT_PREFIX == EXCHANGED_POLICY_PREFIX
    used = [obs(f"/flags/x/{n}", job=str(20 + n), issuer="https://controlplane", policy="exchanged/flags-read")
            for n in range(3)]  # fmt: skip
    report = suggest(_inputs(used))
    assert "ci-reads-flags" in report.kept_bindings and "flags-read" in report.kept_roles
    (flag,) = [f for f in report.flags if f.kind == "exchanged"]
    assert flag.subject == "ci-reads-flags" and "3 allowed request(s)" in flag.message
    tree = patched_tree(read_policy_dir(EXAMPLE), report)
    assert any("name: ci-reads-flags" in text for text in tree.values())
    kept = suggest(_inputs(OBSERVED))  # without exchanged requests the binding is replaced, as before
    assert "ci-reads-flags" not in kept.kept_bindings and not [f for f in kept.flags if f.kind == "exchanged"]


def test_a_binding_that_allowed_requests_without_issuer_or_project_id_is_kept() -> None:
    """Trail rows recorded before the issuer was, or with a project id suggest cannot pin (not a plain number),
    name the binding that allowed them but can back no suggestion. Replacing that binding shut those jobs out
    after the merge (the report fixture: 31 allowed requests, nothing proposed, access removed): it is kept, and
    said why. A suggestion is still made from the attributable rows beside it."""
    unattributed = [
        Observation(
            NOW - DAY,
            "feature-flags",
            "GET",
            f"/flags/old/{n}",
            "allowed",
            "ci-reads-flags/flags-read",
            "3001",
            "acme/p3001",
            str(40 + n),
            "main",
            None,
        )
        for n in range(3)
    ] + [obs("/flags/x", project="03001", job="50")]
    report = suggest(_inputs([*OBSERVED, *unattributed]))
    assert "ci-reads-flags" in report.kept_bindings and "flags-read" in report.kept_roles
    (flag,) = [f for f in report.flags if f.kind == "unattributed"]
    assert flag.subject == "ci-reads-flags" and "4 allowed request(s)" in flag.message
    assert report.suggestions, "the attributable requests still get their own suggestion"
    tree = patched_tree(read_policy_dir(EXAMPLE), report)
    assert any("name: ci-reads-flags" in text for text in tree.values())
    assert "ci-reads-flags" not in suggest(_inputs(OBSERVED)).kept_bindings  # all attributable: replaced
