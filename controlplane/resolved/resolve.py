"""Who a subject names, as GitLab is now: paths to ids, and access that follows GitLab's current state.

A token's claims are a snapshot taken when its job started; GitLab's state is what is true now. With a live
inventory (read from the GitLab API), a subject only keeps access where GitLab still agrees:

- projects are bound by id: a renamed or transferred project keeps its access (the stale path in the policy
  is reported as a warning), and a path now owned by a different project is an error, never a silent rebind;
- archived or deleted projects, and refs or environments that no longer exist, lose access;
- a subject that requires a protected ref or environment is narrowed to the refs and environments GitLab
  protects now, so a branch that lost its protection loses access although old tokens still claim it.

Withdrawn access is reported as a warning with the subject's file:line; the policy stays valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from controlplane.model.errors import PolicyError, quoted
from controlplane.model.inventory import Inventory, Project
from controlplane.model.policy import ClaimMatch, Issuer, IssuerKind, Subject
from controlplane.resolved.conditions import Condition, ResolvedSubject, glob_to_regex, is_glob

MERGE_REQUEST_SOURCE = "merge_request_event"


@dataclass
class Findings:
    """What resolving one binding found, beside its subjects."""

    errors: list[PolicyError] = field(default_factory=list)
    warnings: list[PolicyError] = field(default_factory=list)
    pins: dict[str, int] = field(default_factory=dict)  # project path -> the id it resolved to


class Resolver:
    """Turns an issuer's subjects into conditions; `pins` are the ids paths resolved to before (path → id)."""

    def __init__(self, issuer: Issuer, pins: Mapping[str, int] | None = None) -> None:
        self.issuer = issuer
        self.inventory = issuer.inventory or Inventory()
        self.pins = pins or {}
        self._by_path = {p.path: p for p in self.inventory.projects}
        self._by_id = {p.id: p for p in self.inventory.projects}
        self._groups = {g.path: g.id for g in self.inventory.groups}
        self._issuer_condition = Condition("iss", (issuer.url,))

    def resolve(self, subject: Subject, found: Findings) -> ResolvedSubject | None:
        """None when the subject is in error (in `found.errors`) or has lost all access (a warning)."""
        claims = list(subject.claims)
        common = [self._issuer_condition]
        if self.issuer.kind is IssuerKind.OIDC:
            common.extend(Condition(m.claim, m.values, listy=True) for m in claims)
            return ResolvedSubject.of(common)
        if self.inventory.stale:
            found.warnings.append(_withdrawn(subject, _stale_reason(self.inventory)))
            return None
        if not any(m.claim == "pipeline_source" for m in claims):
            # Fork merge-request pipelines carry the fork's project claims: denied unless asked for by name.
            common.append(Condition("pipeline_source", (MERGE_REQUEST_SOURCE,), negated=True))
        if self.inventory.live:
            return self._live(subject, claims, common, found)
        return self._offline(subject, claims, common, found)

    # -- offline: an inventory file (or none): paths to ids, nothing more is known

    def _offline(
        self, subject: Subject, claims: list[ClaimMatch], common: list[Condition], found: Findings
    ) -> ResolvedSubject | None:
        before = len(found.errors)
        if subject.projects:
            ids = [self._offline_project_id(ref, subject, found) for ref in subject.projects]
            pin = Condition("project_id", _sorted_ids(ids))
        elif subject.groups:
            groups = [self._group_ids(ref, subject, found) for ref in subject.groups]
            pin = Condition("namespace_id", _sorted_ids(i for g in groups for i in g))
        else:
            found.errors.append(_no_pin(subject))
            return None
        if len(found.errors) > before:
            return None
        return ResolvedSubject.of([common[0], pin, *_conditions(claims), *common[1:]])

    def _offline_project_id(self, ref: int | str, subject: Subject, found: Findings) -> int:
        if isinstance(ref, int):
            return ref
        project = self._by_path.get(ref)
        if project is None:
            found.errors.append(PolicyError.at(subject.source, "project", self._unknown("project", ref)))
            return -1
        return project.id

    # -- live: the inventory is what GitLab says now

    def _live(
        self, subject: Subject, claims: list[ClaimMatch], common: list[Condition], found: Findings
    ) -> ResolvedSubject | None:
        projects = self._live_projects(subject, found)
        if projects is None:
            return None
        by_claim = {m.claim: m for m in claims}
        narrowed_claims = {f.claim for f in _FACETS if f.asked(by_claim)}
        rest = [m for m in claims if m.claim not in narrowed_claims]
        alternatives = []
        for project in projects:
            narrowed = self._narrow(project, by_claim, subject, found)
            if narrowed is not None:
                alternatives.append([Condition("project_id", (str(project.id),)), *narrowed])
        if not alternatives:
            return None
        return ResolvedSubject.of([common[0], *_conditions(rest), *common[1:]], alternatives)

    def _live_projects(self, subject: Subject, found: Findings) -> list[Project] | None:
        if not subject.projects and not subject.groups:
            found.errors.append(_no_pin(subject))
            return None
        before = len(found.errors)
        projects: dict[int, Project] = {}
        for ref in subject.projects:
            project = self._live_project(ref, subject, found)
            if project is not None:
                projects[project.id] = project
        for ref in subject.groups:
            for project in self._group_projects(ref, subject, found):
                projects[project.id] = project
        if len(found.errors) > before:
            return None
        live = [p for _, p in sorted(projects.items()) if not p.archived]
        for archived in (p for _, p in sorted(projects.items()) if p.archived):
            found.warnings.append(_withdrawn(subject, f"project {archived.path} (id {archived.id}) is archived"))
        if not live and not found.warnings:
            found.warnings.append(_withdrawn(subject, "no project matches it in GitLab"))
        return live

    def _live_project(self, ref: int | str, subject: Subject, found: Findings) -> Project | None:
        if isinstance(ref, int):
            project = self._by_id.get(ref)
            if project is None:
                found.warnings.append(_withdrawn(subject, f"project id {ref} does not exist in GitLab"))
            return project
        pinned = self.pins.get(ref)
        owner = self._by_path.get(ref)
        if pinned is not None and owner is not None and owner.id != pinned:
            message = (
                f"path {quoted(ref)} now belongs to project {owner.id}, but it was project {pinned}: "
                f"never rebound silently; write the id of the project you mean"
            )
            found.errors.append(PolicyError.at(subject.source, "project", message))
            return None
        if owner is not None:
            found.pins[ref] = owner.id
            return owner
        if pinned is None:
            found.errors.append(PolicyError.at(subject.source, "project", self._unknown("project", ref)))
            return None
        moved = self._by_id.get(pinned)
        if moved is None:
            found.warnings.append(_withdrawn(subject, f"project {ref} (id {pinned}) was deleted"))
            return None
        found.pins[ref] = pinned
        moved_note = f"{quoted(ref)} is now {quoted(moved.path)} (id {pinned}): access kept; update the policy"
        found.warnings.append(PolicyError.at(subject.source, "project", moved_note))
        return moved

    def _group_projects(self, ref: int | str, subject: Subject, found: Findings) -> list[Project]:
        ids = set(self._group_ids(ref, subject, found))
        return [p for p in self.inventory.projects if p.namespace_id in ids]

    def _narrow(
        self,
        project: Project,
        by_claim: Mapping[str, ClaimMatch],
        subject: Subject,
        found: Findings,
    ) -> list[Condition] | None:
        """The conditions this project adds: refs and environments that GitLab has (and protects) now."""
        out: list[Condition] = []
        for facet in _FACETS:
            if not facet.asked(by_claim):
                continue
            items = facet.items(project)
            if items is None:  # not known (offline data): the subject's own values stand
                if facet.claim in by_claim:
                    out.append(Condition(facet.claim, by_claim[facet.claim].values))
                continue
            names = facet.matching(items, by_claim)
            if not names:
                found.warnings.append(_withdrawn(subject, f"no {facet.wanted(by_claim)} in {project.path} now"))
                return None
            out.append(Condition(facet.claim, names))
        return out

    # -- shared

    def _group_ids(self, ref: int | str, subject: Subject, found: Findings) -> tuple[int, ...]:
        group_id = ref if isinstance(ref, int) else self._groups.get(ref)
        if group_id is None or (self.inventory.live and self.inventory.group_by_id(group_id) is None):
            if self.inventory.live and isinstance(ref, int):
                found.warnings.append(_withdrawn(subject, f"group id {ref} does not exist in GitLab"))
            else:
                found.errors.append(PolicyError.at(subject.source, "group", self._unknown("group", str(ref))))
            return ()
        if not subject.include_subgroups:
            return (group_id,)
        return self.inventory.group_and_descendant_ids(group_id)

    def _unknown(self, what: str, path: str) -> str:
        if self.issuer.inventory is None:
            where = f"an inventory or a GitLab api on issuer {self.issuer.name!r}"
            return f"{what} path {quoted(path)} needs {where} (or write the id)"
        where = "GitLab" if self.inventory.live else f"the inventory of issuer {self.issuer.name!r}"
        return f"no {what} with path {quoted(path)} in {where}"


def _conditions(claims: Iterable[ClaimMatch]) -> list[Condition]:
    return [Condition(m.claim, m.values) for m in claims]


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return any(re.match(glob_to_regex(p), value) if is_glob(p) else value == p for p in patterns)


Item = tuple[str, str, bool]  # name, type (branch/tag; "" for environments), protected now


@dataclass(frozen=True)
class _Facet:
    """Refs or environments: what a subject can ask of a project that GitLab knows the current state of."""

    claim: str  # the claim narrowed to names GitLab has now
    protected_claim: str
    type_claim: str | None
    items: Callable[[Project], list[Item] | None]

    def asked(self, by_claim: Mapping[str, ClaimMatch]) -> bool:
        return any(c in by_claim for c in (self.claim, self.protected_claim, self.type_claim) if c)

    def matching(self, items: list[Item], by_claim: Mapping[str, ClaimMatch]) -> tuple[str, ...]:
        names = by_claim.get(self.claim)
        types = by_claim.get(self.type_claim) if self.type_claim else None
        protected = by_claim.get(self.protected_claim)
        found = {
            name
            for name, kind, is_protected in items
            if (names is None or _matches(name, names.values))
            and (types is None or kind in types.values)
            and (protected is None or ("true" if is_protected else "false") in protected.values)
        }
        return tuple(sorted(found))

    def wanted(self, by_claim: Mapping[str, ClaimMatch]) -> str:
        claims = (self.claim, self.type_claim, self.protected_claim)
        parts = [f"{c}={'|'.join(by_claim[c].values)}" for c in claims if c and c in by_claim]
        return f"{self.claim} with " + ", ".join(parts)


_FACETS = (
    _Facet(
        "ref",
        "ref_protected",
        "ref_type",
        lambda p: None if p.refs is None else [(r.name, r.type, r.protected) for r in p.refs],
    ),
    _Facet(
        "environment",
        "environment_protected",
        None,
        lambda p: None if p.environments is None else [(e.name, "", e.protected) for e in p.environments],
    ),
)


def _withdrawn(subject: Subject, why: str) -> PolicyError:
    return PolicyError.at(subject.source, "subject", f"access withdrawn: {why}")


def _no_pin(subject: Subject) -> PolicyError:
    return PolicyError.at(subject.source, "subject", "every GitLab subject must pin a project or a group")


def _sorted_ids(ids: Iterable[int]) -> tuple[str, ...]:
    return tuple(str(i) for i in sorted(set(ids)))


def _stale_reason(inventory: Inventory) -> str:
    if inventory.fetched_at is None:
        return "GitLab has not been read yet (fail closed)"
    return "the GitLab inventory is older than max_staleness (fail closed)"
