"""Access follows GitLab as it is now: live-inventory resolution of GitLab subjects."""

from __future__ import annotations

from dataclasses import replace

import pytest
from google.protobuf import json_format

from controlplane.compiler.claims import PrincipalEncoder
from controlplane.model.errors import PolicyInvalid, Source
from controlplane.model.inventory import Environment, Group, Inventory, Project, Ref
from controlplane.model.policy import ClaimMatch, Issuer, IssuerKind, Policy, Subject
from controlplane.resolved.conditions import ResolvedSubject
from controlplane.resolved.index import Resolution
from controlplane.resolved.resolve import Findings, Resolver
from tests.compiled import policy_of

SOURCE = Source("bindings.yaml", 7)
ISSUER = Issuer(
    "gitlab", IssuerKind.GITLAB, "https://gitlab.example.com", "https://gitlab.example.com/keys", 30, 300, SOURCE
)


def project(pid: int, path: str, ns: int = 11, **kw: object) -> Project:
    refs = (Ref("main", "branch", True), Ref("feature", "branch", False), Ref("v1.0", "tag", True))
    envs = (Environment("production", "production", True), Environment("review/x", "development", False))
    base = Project(pid, path, ns, default_branch="main", refs=refs, environments=envs)
    return replace(base, **kw)  # type: ignore[arg-type]


def live(*projects: Project) -> Inventory:
    groups = (Group(10, "acme"), Group(11, "acme/platform", 10), Group(12, "acme/platform/tools", 11))
    return Inventory(projects=projects, groups=groups, fetched_at=1_700_000_000.0)


def subject(
    *claims: tuple[str, tuple[str, ...]], projects: tuple[int | str, ...] = (), groups: tuple[int | str, ...] = ()
) -> Subject:
    matches = tuple(ClaimMatch(c, v, SOURCE) for c, v in claims)
    return Subject(projects, groups, True, matches, SOURCE)


def resolve(
    inv: Inventory, subj: Subject, pins: dict[str, int] | None = None
) -> tuple[ResolvedSubject | None, Findings]:
    found = Findings()
    return Resolver(replace(ISSUER, inventory=inv), pins).resolve(subj, found), found


def principal_json(resolved: ResolvedSubject | None) -> str:
    from envoy.config.rbac.v3 import rbac_pb2

    assert resolved is not None
    return json_format.MessageToJson(rbac_pb2.Principal.FromString(PrincipalEncoder().principal(resolved)))


def test_renamed_project_keeps_access_by_id_and_warns() -> None:
    inv = live(project(42, "acme/platform/deployer-renamed"))
    resolved, found = resolve(inv, subject(projects=("acme/platform/deployer",)), pins={"acme/platform/deployer": 42})
    assert resolved is not None and '"exact": "42"' in principal_json(resolved)
    (warning,) = found.warnings
    assert "is now 'acme/platform/deployer-renamed' (id 42)" in warning.message and warning.line == 7
    assert found.pins == {"acme/platform/deployer": 42} and not found.errors


def test_a_path_reused_by_another_project_is_an_error_not_a_rebind() -> None:
    inv = live(project(42, "acme/platform/moved"), project(99, "acme/platform/deployer"))
    resolved, found = resolve(inv, subject(projects=("acme/platform/deployer",)), pins={"acme/platform/deployer": 42})
    assert resolved is None
    (error,) = found.errors
    assert (
        error.field == "project" and "now belongs to project 99" in error.message and "was project 42" in error.message
    )


def test_first_resolution_records_the_pin() -> None:
    _, found = resolve(live(project(42, "acme/platform/deployer")), subject(projects=("acme/platform/deployer",)))
    assert found.pins == {"acme/platform/deployer": 42}


@pytest.mark.parametrize(
    ("inv", "why"),
    [
        (live(project(42, "acme/platform/deployer", archived=True)), "is archived"),
        (live(), "does not exist"),
    ],
)
def test_archived_or_deleted_projects_lose_access(inv: Inventory, why: str) -> None:
    resolved, found = resolve(inv, subject(projects=(42,)))
    assert resolved is None and not found.errors
    assert any(why in w.message and w.message.startswith("access withdrawn") for w in found.warnings)


def test_protected_ref_requirement_follows_current_protection() -> None:
    subj = subject(("ref_protected", ("true",)), projects=(42,))
    resolved, _ = resolve(live(project(42, "a/b")), subj)
    text = principal_json(resolved)
    assert '"exact": "main"' in text and '"exact": "v1.0"' in text and "feature" not in text
    unprotected = project(42, "a/b", refs=(Ref("main", "branch", False),))
    resolved, found = resolve(live(unprotected), subj)
    assert resolved is None and "no ref with ref_protected=true in a/b now" in found.warnings[0].message


def test_deleted_branch_loses_access_and_globs_follow_existing_refs() -> None:
    resolved, found = resolve(live(project(42, "a/b")), subject(("ref", ("gone",)), projects=(42,)))
    assert resolved is None and found.warnings
    resolved, _ = resolve(
        live(project(42, "a/b")), subject(("ref", ("f*",)), ("ref_type", ("branch",)), projects=(42,))
    )
    assert '"exact": "feature"' in principal_json(resolved)


def test_protected_environment_requirement() -> None:
    subj = subject(("environment_protected", ("true",)), projects=(42,))
    text = principal_json(resolve(live(project(42, "a/b")), subj)[0])
    assert '"exact": "production"' in text and "review/x" not in text
    envs = (Environment("production", "production", False),)
    resolved, found = resolve(live(project(42, "a/b", environments=envs)), subj)
    assert resolved is None and "environment" in found.warnings[0].message


def test_group_pins_expand_to_live_projects_with_their_own_protected_refs() -> None:
    inv = live(
        project(42, "acme/platform/a"),
        project(43, "acme/platform/tools/b", ns=12, refs=(Ref("release", "branch", True),)),
        project(44, "acme/platform/c", archived=True),
        project(45, "other/d", ns=99),
    )
    resolved, found = resolve(inv, subject(("ref_protected", ("true",)), groups=("acme/platform",)))
    text = principal_json(resolved)
    assert '"exact": "42"' in text and '"exact": "43"' in text and '"exact": "release"' in text
    assert '"exact": "44"' not in text and '"exact": "45"' not in text
    assert any("archived" in w.message for w in found.warnings)


def test_stale_inventory_withdraws_everything_fail_closed() -> None:
    resolved, found = resolve(replace(live(project(42, "a/b")), stale=True), subject(projects=(42,)))
    assert resolved is None and "max_staleness" in found.warnings[0].message


def test_merge_request_rule_still_applies_on_live_inventories() -> None:
    text = principal_json(resolve(live(project(42, "a/b")), subject(projects=(42,)))[0])
    assert "merge_request_event" in text and "notId" in text


def test_a_resolution_reports_warnings_and_pins_and_reresolves_on_new_pins() -> None:
    base = policy_of(
        issuer="kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n",
        backends="kind: Backend\nname: b\nhosts: [b.local]\nendpoints: [{address: 127.0.0.1, port: 1}]\n---\n"
        "kind: Role\nname: r\nbackend: b\nrules: [{methods: [GET]}]\n",
        bindings="kind: Binding\nname: x\nroles: [r]\nsubjects:\n  - project: acme/platform/deployer\n",
    )
    issuer = replace(base.issuers[0], inventory=live(project(42, "acme/platform/deployer")))
    policy: Policy = replace(base, issuers=(issuer,))
    resolution = Resolution()
    assert resolution.update(policy).pins == {"gitlab": {"acme/platform/deployer": 42}}
    moved = replace(issuer, inventory=live(project(42, "acme/platform/new"), project(7, "acme/platform/deployer")))
    with pytest.raises(PolicyInvalid) as invalid:
        resolution.update(replace(policy, issuers=(moved,)), pins={"gitlab": {"acme/platform/deployer": 42}})
    errors = invalid.value.errors
    assert errors and "now belongs to project 7" in errors[0].message


def test_a_binding_whose_subjects_all_lost_access_emits_no_empty_policy() -> None:
    """Envoy NACKs an RBAC policy without principals (PGV); the grant must vanish instead."""
    from controlplane.compiler.rbac import RbacEncoder
    from controlplane.model.policy import Mode, RoleRule
    from controlplane.resolved.access import Grant

    withdrawn = Grant("b", "r", Mode.ENFORCE, (RoleRule(("GET",), ()),), ())
    per_route = RbacEncoder().backend_rbac("svc", [withdrawn])
    assert per_route.rbac.HasField("rules") and len(per_route.rbac.rules.policies) == 0


def test_a_never_read_inventory_says_so_rather_than_blaming_max_staleness() -> None:
    """Before GitLab's first answer the withdrawal is right, but 'older than max_staleness' misled operators
    who had set no max_staleness at all."""
    resolved, found = resolve(Inventory(stale=True), subject(projects=(42,)))
    assert resolved is None and "has not been read yet" in found.warnings[0].message
    assert "max_staleness" not in found.warnings[0].message
