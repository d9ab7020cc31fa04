"""Which AWS role signs a job's request: a binding's own `aws_role_arn`, chosen by the job's token, else the
backend's `role_arn`. The one answer the compiler (routes), `explain` and the audit trail all read.

Envoy chooses the signing filter by route, and the route is chosen again after jwt_authn wrote the token's payload
into dynamic metadata (docs/aws-backends.md, observed fact 7): so each binding role is a list of routes whose
RouteMatch `dynamic_metadata` holds the binding's subject, one route per alternative of it (a RouteMatch's
matchers are ANDed; alternatives are ORed, so each becomes a route of its own).

The order is the contract: bindings by name, then each binding's subjects as resolved, then their alternatives.
A job matching bindings with different roles is signed with the FIRST one's (Envoy takes the first route that
matches); one matching none of them with the backend's role. Only enforced grants choose a role: a shadow binding
grants nothing, so it signs nothing. The role follows who the job is, not which grant allowed the request: RBAC
still decides allow or deny on every route, with every grant of the backend.

Every condition a subject resolves to is expressible as a route match (a MetadataMatcher with `or_match` for
several values or a list claim, `invert` for a negated condition, as RBAC's `not_id`): nothing is refused here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from controlplane.model.errors import PolicyError
from controlplane.model.policy import Binding, Mode, Policy
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.conditions import Condition, ResolvedSubject, is_glob
from controlplane.resolved.evaluate import Evaluator


class RoleChoice(NamedTuple):
    """A binding's AWS role on one backend, and the tokens it is chosen for: any of `matches`, each an AND."""

    binding: str
    role_arn: str
    matches: tuple[tuple[Condition, ...], ...]


def route_alternatives(subject: ResolvedSubject) -> tuple[tuple[Condition, ...], ...]:
    """The subject as ORed ANDs: its conditions with each alternative (or alone when it has none)."""
    if not subject.alternatives:
        return (subject.conditions,)
    return tuple(subject.conditions + alternative for alternative in subject.alternatives)


def backend_role_choices(grants: Sequence[Grant], bindings: Mapping[str, Binding]) -> tuple[RoleChoice, ...]:
    """The backend's role choices in the order Envoy tries them (by binding name). A binding whose grants here lost
    every subject (GitLab withdrew them) chooses nothing."""
    by_binding: dict[str, list[ResolvedSubject]] = {}
    for grant in grants:
        binding = bindings.get(grant.binding)
        if binding is None or binding.aws_role_arn is None or grant.mode is not Mode.ENFORCE:
            continue
        subjects = by_binding.setdefault(grant.binding, [])
        subjects.extend(s for s in grant.subjects if s not in subjects)  # a binding's roles share its subjects
    choices = []
    for name in sorted(by_binding):
        arn = bindings[name].aws_role_arn
        assert arn is not None
        matches = merged_projects(tuple(m for s in by_binding[name] for m in route_alternatives(s)))
        if matches:
            choices.append(RoleChoice(name, arn, matches))
    return tuple(choices)


def merged_projects(matches: Sequence[tuple[Condition, ...]]) -> tuple[tuple[Condition, ...], ...]:
    """Alternatives of one choice that differ only in one exact `project_id` pin, as one alternative pinning
    their ids together: (C and project_id=a) or (C and project_id=b) is C and project_id in {a, b}. A live
    inventory makes an alternative per project of a group subject, and each alternative is a route carrying the
    role's credential (~1.6 KB): 10,000 projects were 15.8 MB of routes, matched in order on every request (twice).
    Within one choice the order is free (every alternative signs with the same role); each group keeps the place
    of its first alternative, and an alternative merged with no other is kept as it was."""
    groups: dict[tuple[Condition, ...], list[tuple[Condition, ...]]] = {}
    order: list[tuple[Condition, ...] | list[tuple[Condition, ...]]] = []  # kept as it is, or a group's members
    for match in matches:
        pins = [c for c in match if c.claim == PROJECT_ID]
        if len(pins) != 1 or pins[0].negated or pins[0].listy or any(map(is_glob, pins[0].values)):
            order.append(match)
            continue
        rest = tuple(c for c in match if c.claim != PROJECT_ID)
        members = groups.get(rest)
        if members is None:
            members = groups[rest] = []
            order.append(members)
        members.append(match)
    return tuple(item if isinstance(item, tuple) else _merged(item) for item in order)


def _merged(members: list[tuple[Condition, ...]]) -> tuple[Condition, ...]:
    if len(members) == 1:
        return members[0]
    ids: dict[str, None] = {}
    for match in members:
        ids.update(dict.fromkeys(v for c in match if c.claim == PROJECT_ID for v in c.values))
    return (*(c for c in members[0] if c.claim != PROJECT_ID), Condition(PROJECT_ID, tuple(ids)))


PROJECT_ID = "project_id"


def role_choices(policy: Policy, resolved: ResolvedPolicy) -> dict[str, tuple[RoleChoice, ...]]:
    """Per AWS backend with any binding role: its choices (backends with none are left out)."""
    bindings = {b.name: b for b in policy.bindings}
    found = {}
    for backend in policy.backends:
        if backend.aws is None:
            continue
        choices = backend_role_choices(resolved.grants(backend.name), bindings)
        if choices:
            found[backend.name] = choices
    return found


def chosen_role(
    choices: Sequence[RoleChoice], default_arn: str, claims: Mapping[str, Any], evaluator: Evaluator | None = None
) -> tuple[str | None, str]:
    """(binding whose role signs, role ARN) for a token with `claims`; (None, the backend's role) if none matches."""
    evaluator = evaluator or Evaluator()
    for choice in choices:
        for match in choice.matches:
            if all(evaluator.condition_holds(claims, c) for c in match):
                return choice.binding, choice.role_arn
    return None, default_arn


def overlap_warnings(policy: Policy, resolved: ResolvedPolicy) -> list[PolicyError]:
    """Two bindings naming different roles on one backend that may both match one job: the first by name signs
    (the module's order), which the author may not expect. Decided cheaply and conservatively: a pair is quiet only
    when some claim is provably held by at most one of them (`_disjoint`); otherwise it is reported."""
    bindings = {b.name: b for b in policy.bindings}
    warnings = []
    for backend, choices in sorted(role_choices(policy, resolved).items()):
        for i, first in enumerate(choices):
            for later in choices[i + 1 :]:
                if first.role_arn == later.role_arn or _never_together(first, later):
                    continue
                warnings.append(
                    PolicyError.at(
                        bindings[later.binding].source,
                        "aws_role_arn",
                        f"binding {later.binding} and binding {first.binding} name different AWS roles on backend "
                        f"{backend} and may both match one job: such a job's requests are signed with "
                        f"{first.binding}'s role (bindings are tried by name); make their subjects exclusive "
                        "(e.g. pipeline_source, ref_protected) if that is not meant",
                    )
                )
    return warnings


def _never_together(a: RoleChoice, b: RoleChoice) -> bool:
    return all(_disjoint(x, y) for x in a.matches for y in b.matches)


def _disjoint(a: Sequence[Condition], b: Sequence[Condition]) -> bool:
    """True when no token can hold all of `a` and all of `b`: some claim both pin to exact values that never meet
    (`x in V` and `x in W`, V and W disjoint), or one pins to values the other excludes (`x in V`, `x not in W`,
    V within W). Globs and list claims are not reasoned about (False: "may overlap")."""
    return any(_exclusive(x, y) or _exclusive(y, x) for x in a for y in b if x.claim == y.claim)


def _exclusive(x: Condition, y: Condition) -> bool:
    if x.negated or x.listy or any(map(is_glob, x.values)) or any(map(is_glob, y.values)):
        return False
    if y.negated:
        return set(x.values) <= set(y.values)
    return not y.listy and not set(x.values) & set(y.values)
