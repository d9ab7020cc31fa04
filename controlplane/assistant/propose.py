"""Observed traffic + CI configuration + the current policy → least-privilege Roles and Bindings, with evidence.

Pure and deterministic: the same observations, configurations and policy give the same suggestion byte for byte
(everything is sorted; the only clock is `now`, an input that sets the `--unused-days` window). The rules it
applies are written in docs/policy-assistant.md; in short:

- one Role per (project, backend) that made allowed requests: per method, the exact paths used; where at least
  `GLOB_MIN` distinct values were seen at one segment with every other segment equal, that segment becomes `*`
  (one segment, never deeper); methods with the same paths share a rule;
- one Binding per (project, backend), its subject pinned to the project *id* (the token's `project_id`), plus
  `ref_protected: true` when every request carried `ref_protected: "true"` (the trail's record; GitLab's
  protections now, read by the caller, only for rows recorded before the trail kept the claim), `ref` when every
  CI job asking for the backend's audience may only run on literal refs (as controlplane.assistant.ci_config
  understands its rules), and `pipeline_source` / `environment` when the recorded values agree with such jobs'
  literal ones, or, no such job being read, from the recorded values alone;
- bindings of OIDC issuers and shadow bindings are kept as they are (nothing observed speaks for or against them).
"""

from __future__ import annotations

import difflib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from controlplane.assistant.ci_config import CiConfig, CiJob
from controlplane.model.kinds.role import HTTP_METHODS
from controlplane.model.policy import IssuerKind, Mode, Policy
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.diff import path_pattern

# compiler/names.py's EXCHANGED_POLICY_PREFIX (the assistant does not import the compiler; a test holds them equal):
# Envoy's policy id of a request allowed by a credential exchanged at the control plane is `exchanged/<role>`.
EXCHANGED_POLICY_PREFIX = "exchanged"

REDACTED = "[redacted]"  # what the audit store writes for token-shaped text (audit/store.py)
TEXT_DENIED_SHOWN = 20  # denied kinds of request listed in the text report
GLOB_MIN = 3  # distinct values at one segment before it is generalised to `*`
SUGGESTED_FILE = "suggested.yaml"
DAY = 86_400.0
_NAME_BAD = re.compile(r"[^a-z0-9-]+")
HTTP_METHODS_TEXT = ", ".join(HTTP_METHODS)


@dataclass(frozen=True)
class Observation:
    """One audited request (controlplane/audit/store.py's record, the fields the assistant reads)."""

    time: float
    backend: str | None
    method: str
    path: str
    decision: str
    policy: str | None
    project_id: str | None
    project_path: str | None
    job_id: str | None
    ref: str | None
    issuer: str | None
    # The token's claims as recorded (audit schema version 3); None in rows recorded before the trail kept them.
    ref_protected: str | None = None
    pipeline_source: str | None = None
    environment: str | None = None  # also None for a job without an environment

    @property
    def claims_recorded(self) -> bool:
        """Whether the trail kept this request's ref and pipeline claims: GitLab puts `ref_protected` and
        `pipeline_source` in every ID token, so a row without both predates the columns (or is no GitLab token)."""
        return self.ref_protected is not None and self.pipeline_source is not None


def observation(row: Mapping[str, Any]) -> Observation:
    """An audit record (a row of `query_records`) as the assistant reads it."""
    fields: dict[str, Any] = {name: row.get(name) for name in Observation.__dataclass_fields__}
    return Observation(**fields)


@dataclass(frozen=True)
class Evidence:
    requests: int
    jobs: tuple[str, ...]  # job ids, sorted numerically
    first: float
    last: float

    def text(self) -> str:
        jobs = ", ".join(self.jobs[:5]) + (f" and {len(self.jobs) - 5} more" if len(self.jobs) > 5 else "")
        span = (
            _date(self.first) if _date(self.first) == _date(self.last) else f"{_date(self.first)}..{_date(self.last)}"
        )
        return f"{self.requests} request(s) by {len(self.jobs)} job(s) ({jobs}), {span}"


def evidence_of(observed: Iterable[Observation]) -> Evidence:
    items = list(observed)
    jobs = sorted({o.job_id for o in items if o.job_id}, key=lambda j: (len(j), j))
    return Evidence(len(items), tuple(jobs), min(o.time for o in items), max(o.time for o in items))


@dataclass(frozen=True)
class SuggestedRule:
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    evidence: tuple[str, ...]  # one line per path


@dataclass(frozen=True)
class SuggestedCondition:
    key: str
    value: str | bool | int | tuple[str, ...]
    why: str


@dataclass(frozen=True)
class Suggestion:
    """Role and Binding of the same name for one (project, backend)."""

    name: str
    issuer: str
    backend: str
    project_id: str
    project_path: str | None
    rules: tuple[SuggestedRule, ...]
    conditions: tuple[SuggestedCondition, ...]
    evidence: Evidence
    jobs: tuple[str, ...]  # CI job names asking for the backend's audience


@dataclass(frozen=True)
class Flag:
    # unused-rule | unused-methods | unmatched-binding | unpinned-protected | ci | shadow | path | observed | exchanged
    kind: str
    subject: str  # the grant, binding or project it is about
    message: str


@dataclass(frozen=True)
class Report:
    suggestions: tuple[Suggestion, ...]
    flags: tuple[Flag, ...]
    kept_roles: tuple[str, ...]
    kept_bindings: tuple[str, ...]
    observed: int
    ignored: int  # observations not proposed from (denied, no project, no backend, not a GitLab issuer)
    table: tuple[ObservedRow, ...] = ()


@dataclass(frozen=True)
class ObservedRow:
    """Requests alike (project, backend, method, path, decision, policy), with their evidence."""

    project: str  # the project path, else its id, else "-" (no valid token)
    backend: str
    method: str
    path: str
    decision: str
    policy: str
    evidence: Evidence


def observed_table(observations: Iterable[Observation]) -> tuple[ObservedRow, ...]:
    """What the trail shows, per project, backend, method, path, decision and the policy that decided."""
    rows: dict[tuple[str, str, str, str, str, str], list[Observation]] = defaultdict(list)
    for o in observations:
        project = o.project_path or o.project_id or "-"
        rows[(project, o.backend or "-", o.method, o.path, o.decision, o.policy or "-")].append(o)
    return tuple(ObservedRow(*key, evidence_of(found)) for key, found in sorted(rows.items()))


@dataclass(frozen=True)
class ShadowSeen:
    """What a shadow grant would have allowed, from the gateways' JSON access log."""

    requests: int
    projects: tuple[str, ...]


SHADOW_POLICY = "shadow_effective_policy_id"
SHADOW_RESULT = "shadow_engine_result"


def shadow_matches(lines: Iterable[str]) -> dict[str, ShadowSeen]:
    """Per shadow grant (`binding/role`), the requests it would have allowed: Envoy's RBAC writes
    `<backend prefix>shadow_effective_policy_id` and `..._shadow_engine_result` into its dynamic metadata, which
    the file access log carries whole as `rbac` (the audit trail keeps the enforced decision only). Lines that are
    not JSON objects are skipped."""
    counts: dict[str, int] = defaultdict(int)
    projects: dict[str, set[str]] = defaultdict(set)
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        rbac = entry.get("rbac") if isinstance(entry, dict) else None
        if not isinstance(rbac, dict):
            continue
        for key, value in rbac.items():
            if not (isinstance(key, str) and key.endswith(SHADOW_POLICY) and isinstance(value, str)):
                continue
            if rbac.get(key[: -len(SHADOW_POLICY)] + SHADOW_RESULT) != "allowed":
                continue
            counts[value] += 1
            project = entry.get("project_id")
            if isinstance(project, str) and project:
                projects[value].add(project)
    return {name: ShadowSeen(counts[name], tuple(sorted(projects[name]))) for name in sorted(counts)}


@dataclass
class Inputs:
    policy: Policy
    resolved: ResolvedPolicy
    observations: Sequence[Observation]
    ci: Mapping[str, CiConfig] = field(default_factory=dict)  # by project id
    protected: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)  # project id -> ref -> protected now
    now: float = 0.0
    unused_days: int = 30
    shadow: Mapping[str, ShadowSeen] | None = None  # by binding/role; None: no access log was given


def suggest(given: Inputs) -> Report:
    gitlab = {i.url: i.name for i in given.policy.issuers if i.kind is IssuerKind.GITLAB}
    groups: dict[tuple[str, str, str], list[Observation]] = defaultdict(list)
    unusable: set[tuple[str, str]] = set()
    unnamed: set[tuple[str, str]] = set()
    ignored = 0
    unattributed: dict[str, int] = defaultdict(int)  # binding → allowed requests no suggestion can speak for
    for o in given.observations:
        project = o.project_id or ""
        if o.decision != "allowed" or not canonical_id(project) or not o.backend or o.issuer not in gitlab:
            ignored += 1
            if o.decision == "allowed" and (o.issuer is None or o.issuer in gitlab) and (b := _granting_binding(o)):
                unattributed[b] += 1
            continue
        if o.method not in HTTP_METHODS:  # what a Role can name
            unnamed.add((o.backend, o.method))
            ignored += 1
            continue
        if not _usable(o.path):
            unusable.add((o.backend, o.path))
            ignored += 1
            continue
        groups[(gitlab[o.issuer], project, o.backend)].append(o)
    backends = {b.name: b for b in given.policy.backends}
    exchanged = _exchanged_roles(given.observations)
    kept_bindings, kept_roles = _kept_names(given.policy, exchanged, unattributed)
    taken = set(kept_bindings) | set(kept_roles)  # a suggestion never takes the name of what stays
    suggestions = []
    mismatches: list[Flag] = []
    for (issuer, project_id, backend), observed in sorted(groups.items(), key=lambda kv: _group_key(kv[0])):
        if backend not in backends:
            ignored += len(observed)
            continue
        ci = given.ci.get(project_id)
        jobs = ci.jobs_for(backends[backend].audience) if ci is not None and _describes(ci, observed) else ()
        name = _free_name(_name(f"p{project_id}-{backend}"), taken)
        taken.add(name)
        mismatches.extend(Flag("observed", name, message) for message in disagreements(observed, jobs))
        suggestions.append(
            Suggestion(
                name=name,
                issuer=issuer,
                backend=backend,
                project_id=project_id,
                project_path=max((o.project_path or "" for o in observed), default="") or None,
                rules=_rules(observed),
                conditions=_conditions(project_id, observed, jobs, given.protected.get(project_id)),
                evidence=evidence_of(observed),
                jobs=tuple(sorted(j.name for j in jobs)),
            )
        )
    flags = (
        _flags(given, gitlab, backends)
        + tuple(
            Flag("path", backend, f"{json.dumps(path)} was used but no Role can name it exactly (glob, query or space)")
            for backend, path in sorted(unusable)
        )
        + tuple(
            Flag(
                "method", backend, f"{json.dumps(method)} was used but no Role can name it (not in {HTTP_METHODS_TEXT})"
            )
            for backend, method in sorted(unnamed)
        )
    )
    flags += tuple(mismatches)
    flags += tuple(
        Flag(
            "exchanged",
            b.name,
            f"kept as it is: {sum(exchanged[r] for r in b.roles if r in exchanged)} allowed request(s) used "
            f"credentials exchanged for its role(s) {', '.join(r for r in b.roles if r in exchanged)}; the trail "
            "does not say which binding the exchange granted them by, so nothing narrower is proposed",
        )
        for b in sorted(given.policy.bindings, key=lambda b: b.name)
        if b.name in kept_bindings
        and b.mode is Mode.ENFORCE
        and given.policy.issuer(b.issuer).kind is IssuerKind.GITLAB  # the others stay anyway
        and any(r in exchanged for r in b.roles)
    )
    flags += tuple(
        Flag(
            "unattributed",
            b.name,
            f"kept as it is: {unattributed[b.name]} allowed request(s) it granted carry no GitLab issuer or no "
            "numeric project id in the trail (rows recorded before those fields were, or another issuer's), so "
            "nothing narrower can be proposed for them without shutting them out",
        )
        for b in sorted(given.policy.bindings, key=lambda b: b.name)
        if b.name in unattributed and b.name in kept_bindings and b.mode is Mode.ENFORCE
    )
    table = observed_table(given.observations)
    return Report(tuple(suggestions), flags, kept_roles, kept_bindings, len(given.observations), ignored, table)


def _describes(ci: CiConfig, observed: Sequence[Observation]) -> bool:
    """Whether the CI configuration read is the one every observed request's job ran: complete (no include
    unread, no bound reached), and every request made on the branch it was read from. A job of another ref ran
    that ref's `.gitlab-ci.yml`, which may drop the environment or the rules the default branch's has: pinning
    from the default branch's would shut it out."""
    return ci.complete and ci.default_branch is not None and all(o.ref == ci.default_branch for o in observed)


def _exchanged_roles(observations: Iterable[Observation]) -> dict[str, int]:
    """Roles that allowed requests reached with a credential exchanged at the control plane (Envoy's policy id
    `exchanged/<role>`), with their counts. Those requests carry the control plane's issuer, not GitLab's, so no
    suggestion is made from them; the bindings that let jobs exchange for the role must stay, or the exchange
    would refuse every such job after the merge."""
    counts: dict[str, int] = defaultdict(int)
    for o in observations:
        prefix, _, role = (o.policy or "").partition("/")
        if o.decision == "allowed" and prefix == EXCHANGED_POLICY_PREFIX and role:
            counts[role] += 1
    return dict(counts)


def _granting_binding(o: Observation) -> str | None:
    """The binding Envoy named as allowing `o` (`binding/role`), if a binding did (not an exchanged credential)."""
    binding, _, role = (o.policy or "").partition("/")
    return binding if binding and role and binding != EXCHANGED_POLICY_PREFIX else None


def _kept_names(
    policy: Policy, exchanged: Mapping[str, int], unattributed: Mapping[str, int]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Bindings kept as they are (shadow ones, other issuers', those granting a role used through exchanged
    credentials or allowing requests no suggestion can speak for), and the Roles they name."""
    bindings = tuple(
        sorted(
            b.name
            for b in policy.bindings
            if b.mode is Mode.SHADOW
            or policy.issuer(b.issuer).kind is not IssuerKind.GITLAB
            or any(r in exchanged for r in b.roles)
            or b.name in unattributed
        )
    )
    roles = tuple(sorted({r for b in policy.bindings if b.name in bindings for r in b.roles}))
    return bindings, roles


def _group_key(key: tuple[str, str, str]) -> tuple[str, int, str, str]:
    issuer, project, backend = key
    return (issuer, int(project) if canonical_id(project) else -1, project, backend)


def canonical_id(text: str) -> bool:
    """An id as a token writes it: ASCII digits, no leading zero. `"٤٢".isdigit()` and `int("042")` are 42, yet
    a subject `project: 42` never matches either claim (and 42 is another project's id)."""
    return text.isascii() and text.isdigit() and text == str(int(text))


def _free_name(name: str, taken: set[str]) -> str:
    """`name`, else `name-s`, `name-s2`, `name-s3`...: each attempt another suffix, the name cut to leave it room
    (cutting `name-s` back to 60 characters and adding `-s` again gave the same name: three backends whose long
    names share their first 57 characters hung the command)."""
    base, attempt = name, 1
    while name in taken:
        suffix = "-s" if attempt == 1 else f"-s{attempt}"
        name = _name(base[: 63 - len(suffix)].rstrip("-") + suffix)
        attempt += 1
    return name


def _name(raw: str) -> str:
    name = _NAME_BAD.sub("-", raw.lower()).strip("-")[:63].rstrip("-")
    return name or "suggested"


# --- roles: methods and paths


def _rules(observed: Sequence[Observation]) -> tuple[SuggestedRule, ...]:
    by_method: dict[str, list[Observation]] = defaultdict(list)
    for o in observed:
        by_method[o.method].append(o)
    patterns: dict[str, tuple[str, ...]] = {
        m: generalise(sorted({o.path for o in obs})) for m, obs in by_method.items()
    }
    by_paths: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for method in sorted(patterns):
        by_paths[patterns[method]].append(method)
    rules = []
    for paths, methods in sorted(by_paths.items(), key=lambda kv: (kv[1], kv[0])):
        by_path: dict[str, list[Observation]] = defaultdict(list)
        for o in (o for m in methods for o in by_method[m]):
            by_path[o.path].append(o)
        shapes: dict[tuple[int, str], list[str]] = defaultdict(list)  # a glob keeps the depth and first segment
        for path in by_path:
            shapes[_shape(path)].append(path)
        lines = []
        for pattern in paths:
            # each pattern against the distinct paths of its shape, not every request: a trail of a million
            # requests over ten thousand paths was ten billion regex matches
            matcher = path_pattern(pattern)
            distinct = sorted(p for p in shapes.get(_shape(pattern), ()) if matcher.fullmatch(p))
            used = [o for p in distinct for o in by_path[p]]
            note = f"; from {len(distinct)} paths: {', '.join(distinct[:3])}..." if pattern not in distinct else ""
            lines.append(f"{pattern}: {evidence_of(used).text()}{note}")
        rules.append(SuggestedRule(tuple(methods), paths, tuple(lines)))
    return tuple(rules)


def _shape(path: str) -> tuple[int, str]:
    parts = path.split("/")
    return len(parts), parts[1] if len(parts) > 1 else ""


def _id_like(segment: str) -> bool:
    """A value that names one of many things (`42`, `2026-01`, `v3`, a hash): it holds a digit. Words (`admin`,
    `users`) are kept exact, so `/api/admin/x`, `/api/users/x`, `/api/jobs/x` never become `/api/*/x`, which
    would admit `/api/secrets/x`."""
    return segment not in ("", "*") and any(c in "0123456789" for c in segment)


def generalise(paths: Sequence[str]) -> tuple[str, ...]:
    """Exact paths, with one segment made `*` where `GLOB_MIN` or more values holding a digit differ only there
    (repeated until nothing changes, so /a/1/x, /a/2/x, /a/3/x → /a/*/x). Empty segments, words and the first
    segment are never made `*`."""
    current = {p for p in paths if _usable(p)}
    changed = True
    while changed:
        changed = False
        for position in range(2, max((len(p.split("/")) for p in current), default=0)):
            buckets: dict[tuple[int, tuple[str, ...]], set[str]] = defaultdict(set)
            for p in current:
                parts = p.split("/")
                if position < len(parts) and _id_like(parts[position]):
                    key = (len(parts), tuple(parts[:position] + parts[position + 1 :]))
                    buckets[key].add(p)
            removed: set[str] = set()
            added: set[str] = set()
            for members in buckets.values():  # disjoint: applied together (one set copy per position, not per glob)
                if len(members) >= GLOB_MIN:
                    parts = next(iter(members)).split("/")
                    parts[position] = "*"
                    removed |= members
                    added.add("/".join(parts))
            if added:
                current = (current - removed) | added
                changed = True
    return tuple(sorted(current))


def _usable(path: str) -> bool:
    """A path a Role may name exactly: no glob characters, query, fragment or white space (the loader's rules)."""
    return path.startswith("/") and not any(c in "*?#" or c.isspace() for c in path)


# --- subjects


def _conditions(
    project_id: str, observed: Sequence[Observation], jobs: Sequence[CiJob], protected: Mapping[str, bool] | None
) -> tuple[SuggestedCondition, ...]:
    out = [SuggestedCondition("project", int(project_id), "the project id the tokens carried (an id, never a path)")]
    refs = sorted({o.ref for o in observed if o.ref})
    pinned = _ref_protected(observed, jobs, protected)
    if pinned is not None:
        out.append(pinned)
    if jobs:
        ci_refs = [j.refs for j in jobs]
        if all(r is not None for r in ci_refs):
            allowed = sorted({ref for r in ci_refs if r is not None for ref in r})
            if allowed and set(refs) <= set(allowed):
                out.append(
                    SuggestedCondition("ref", tuple(allowed), f"the only refs the rules of {_names(jobs)} allow")
                )
    for key in _OBSERVED_KEYS:
        pin = _observed_pin(key, observed, jobs)
        if pin is not None:
            out.append(pin)
    return tuple(out)


def _ref_protected(
    observed: Sequence[Observation], jobs: Sequence[CiJob], protected: Mapping[str, bool] | None
) -> SuggestedCondition | None:
    """`ref_protected: true` when every request carried `ref_protected: "true"`; never when one carried anything
    else (it ran on an unprotected ref: the pin would deny it). Requests recorded before the trail kept the claim
    fall back on GitLab's protections now (or, unread, on CI rules that only run on protected refs), said so."""
    said = [o for o in observed if o.ref_protected is not None]
    if any(o.ref_protected != "true" for o in said):
        return None
    carried = f'{len(said)} request(s) carried ref_protected "true"' + _on_refs(said)
    unsaid = [o for o in observed if o.ref_protected is None]
    if not unsaid:
        return SuggestedCondition("ref_protected", True, f"every request observed: {carried}")
    before = f"{len(unsaid)} recorded before the trail kept the claim"
    lead = f"{carried}; {before}" if said else before.capitalize()
    refs = sorted({o.ref for o in unsaid if o.ref})
    if refs and protected is not None and all(protected.get(r) is True for r in refs):
        return SuggestedCondition("ref_protected", True, f"{lead}: its refs ({', '.join(refs)}) are protected now")
    if protected is None and jobs and all(j.always_protected for j in jobs):
        why = f"{lead}: GitLab's protections not read; the rules of {_names(jobs)} run only on protected refs"
        return SuggestedCondition("ref_protected", True, why)
    return None


def _on_refs(observed: Sequence[Observation]) -> str:
    refs = sorted({o.ref for o in observed if o.ref})
    return f" (refs {', '.join(refs)})" if refs else ""


_OBSERVED_KEYS = ("pipeline_source", "environment")


def _ci_allows(key: str, jobs: Sequence[CiJob]) -> tuple[str, ...] | None:
    """The values every CI job asking for the audience is confined to, or None when one may run with any."""
    if key == "pipeline_source":
        sources = [j.sources for j in jobs]
        if not jobs or any(s is None for s in sources):
            return None
        return tuple(sorted({src for s in sources if s is not None for src in s})) or None
    envs = [j.environment for j in jobs]
    if not jobs or not all(e is not None and "$" not in e for e in envs):
        return None
    return tuple(sorted({e for e in envs if e is not None}))


def _observed_pin(key: str, observed: Sequence[Observation], jobs: Sequence[CiJob]) -> SuggestedCondition | None:
    """`pipeline_source` / `environment` pinned (docs/policy-assistant.md, "Subject"):
    - CI confines every job to literal values: pinned to those, only when every recorded request agrees (a value
      outside them, or no environment at all, means the CI reading missed something: not pinned, flagged);
    - no CI job asking for the audience was read: pinned to the values observed, only when every request
      recorded one (a request recorded before the trail kept the claim could have carried any);
    - CI read but leaving the value open (no rule on it, a `$` environment): not pinned, as CI allows others."""
    recorded = [o for o in observed if o.claims_recorded]
    values = {getattr(o, key) for o in recorded}
    before = len(observed) - len(recorded)
    note = f"; {before} request(s) recorded before the trail kept it" if before else ""
    allowed = _ci_allows(key, jobs)
    if allowed is not None:
        if not values <= set(allowed):
            return None
        if key == "pipeline_source":
            source = f"the only pipeline sources the rules of {_names(jobs)} allow"
        else:
            source = f"the environments of {_names(jobs)}"
        agree = f"{len(recorded)} observed request(s) agree" if recorded else "none observed with the claim"
        return SuggestedCondition(key, allowed, f"{source}; {agree}{note}")
    if jobs or before or not values or not all(_pinnable(v) for v in values):
        return None
    seen = tuple(sorted(v for v in values if v is not None))
    why = f"observed only (no CI job asking for this audience was read): every one of {len(recorded)} request(s)"
    return SuggestedCondition(key, seen, f"{why} carried {' or '.join(seen)}")


def _pinnable(value: str | None) -> bool:
    """A recorded value a subject can name as itself: present, printable, not redacted, and no `*` (a glob)."""
    return bool(value) and value is not None and value.isprintable() and "*" not in value and value != REDACTED


def disagreements(observed: Sequence[Observation], jobs: Sequence[CiJob]) -> list[str]:
    """Recorded claims CI rules say cannot happen: the CI reading missed something, so nothing is pinned there."""
    out = []
    for key in _OBSERVED_KEYS:
        allowed = _ci_allows(key, jobs)
        values = {getattr(o, key) for o in observed if o.claims_recorded}
        if allowed is not None and not values <= set(allowed):
            seen = ", ".join(sorted(v or "(none)" for v in values - set(allowed)))
            out.append(f"{key} {seen} observed, outside what {_names(jobs)} allow ({', '.join(allowed)}): not pinned")
    return out


def _names(jobs: Sequence[CiJob]) -> str:
    return "[" + ", ".join(j.name for j in jobs) + "]"


# --- flags: what the current policy grants that nobody used


def _flags(given: Inputs, gitlab: Mapping[str, str], backends: Mapping[str, Any]) -> tuple[Flag, ...]:
    cutoff = given.now - given.unused_days * DAY
    recent = [o for o in given.observations if o.time >= cutoff and o.decision == "allowed"]
    by_policy: dict[str, list[Observation]] = defaultdict(list)
    for o in recent:
        if o.policy:
            by_policy[o.policy].append(o)
    flags: list[Flag] = []
    used_bindings = {name.partition("/")[0] for name in by_policy}
    for binding in sorted(given.policy.bindings, key=lambda b: b.name):
        if binding.mode is Mode.SHADOW:
            flags.append(Flag("shadow", binding.name, _shadow_message(binding.name, binding.roles, given.shadow)))
        elif binding.name not in used_bindings:
            flags.append(
                Flag("unmatched-binding", binding.name, f"no allowed request in {given.unused_days} days named it")
            )
    for name, access in sorted(given.resolved.backends.items()):
        for grant in access.grants:
            if grant.mode is not Mode.ENFORCE:
                continue
            flags.extend(_grant_flags(grant.name, name, grant.rules, by_policy.get(grant.name, []), given))
    flags.extend(_protected_flags(given, by_policy))
    flags.extend(_ci_flags(given, gitlab, backends))
    return tuple(flags)


def _shadow_message(binding: str, roles: Sequence[str], shadow: Mapping[str, ShadowSeen] | None) -> str:
    if shadow is None:
        return (
            "shadow binding: what it would have matched is not in the audit trail (it keeps the enforced decision "
            "only); give the gateways' JSON access logs (--access-log) to count it"
        )
    seen = [(role, shadow[f"{binding}/{role}"]) for role in roles if f"{binding}/{role}" in shadow]
    if not seen:
        return "shadow binding: would have allowed no request in the access logs given"
    parts = [f"{role}: {s.requests} request(s) from project(s) {', '.join(s.projects) or '-'}" for role, s in seen]
    return "shadow binding: would have allowed " + "; ".join(parts) + " (by the access logs given)"


def _grant_flags(
    grant: str, backend: str, rules: Sequence[Any], used: Sequence[Observation], given: Inputs
) -> list[Flag]:
    if not used:
        return []  # the binding as a whole is flagged
    out = []
    requests = sorted({(o.method, o.path) for o in used})  # distinct: a rule is judged once per kind of request
    for rule in rules:
        matchers = [path_pattern(p) for p in rule.paths or ("/**",)]
        matching = [
            (method, path)
            for method, path in requests
            if (not rule.methods or method in rule.methods) and any(m.fullmatch(path) for m in matchers)
        ]
        shown = f"{'|'.join(rule.methods) or 'any method'} {', '.join(rule.paths) or 'any path'}"
        if not matching:
            message = f"on {backend}: rule {shown} unused for {given.unused_days} days"
            out.append(Flag("unused-rule", grant, message))
            continue
        unused = sorted(set(rule.methods) - {method for method, _ in matching})
        if unused:
            message = f"on {backend}: rule {shown}: methods {', '.join(unused)} unused for {given.unused_days} days"
            out.append(Flag("unused-methods", grant, message))
    return out


def _protected_flags(given: Inputs, by_policy: Mapping[str, Sequence[Observation]]) -> list[Flag]:
    out = []
    by_binding: dict[str, list[Observation]] = defaultdict(list)  # one pass over the trail, not one per binding
    for name, obs in by_policy.items():
        by_binding[name.partition("/")[0]].extend(obs)
    for binding in sorted(given.policy.bindings, key=lambda b: b.name):
        if binding.mode is Mode.SHADOW or any(m.claim == "ref_protected" for s in binding.subjects for m in s.claims):
            continue
        observed = by_binding.get(binding.name, [])
        if observed and all(_was_protected(o, given.protected) for o in observed):
            refs = ", ".join(sorted({o.ref or "" for o in observed}))
            message = f"no subject pins ref_protected, yet every request it allowed came from protected refs {refs}"
            before = sum(1 for o in observed if o.ref_protected is None)
            if before:
                message += f" ({before} recorded before the trail kept the claim: by GitLab's protections now)"
            out.append(Flag("unpinned-protected", binding.name, message))
    return out


def _was_protected(o: Observation, protected: Mapping[str, Mapping[str, bool]]) -> bool:
    """The recorded claim; for a request recorded before the trail kept it, GitLab's protection of its ref now."""
    if o.ref_protected is not None:
        return o.ref_protected == "true"
    return protected.get(o.project_id or "", {}).get(o.ref or "") is True


def _ci_flags(given: Inputs, gitlab: Mapping[str, str], backends: Mapping[str, Any]) -> list[Flag]:
    audiences = {b.audience: b.name for b in backends.values()}
    used = {(o.project_id, o.backend) for o in given.observations if o.decision == "allowed"}
    out = []
    for project_id, ci in sorted(given.ci.items(), key=lambda kv: _group_key(("", kv[0], ""))):
        for note in ci.notes:
            out.append(Flag("ci", ci.project, note))
        for job in ci.jobs:
            for aud in sorted(job.audiences):
                backend = audiences.get(aud)
                if backend is None:
                    out.append(Flag("ci", ci.project, f"job {job.name}: audience {aud} is no backend's"))
                elif (project_id, backend) not in used:
                    out.append(
                        Flag("ci", ci.project, f"job {job.name}: asks for {backend} but made no allowed request")
                    )
            for unknown in job.unknown:
                out.append(Flag("ci", ci.project, f"job {job.name}: {unknown}"))
    return out


# --- output: YAML with evidence comments, JSON, text


def render_yaml(report: Report) -> str:
    """The suggested Roles and Bindings as policy documents, each line's evidence in a comment above it."""
    docs = []
    for s in report.suggestions:
        head = _comment(f"{s.project_path or 'project ' + s.project_id} on {s.backend}: {s.evidence.text()}")
        jobs = _comment(f"CI jobs asking for this backend's audience: {', '.join(s.jobs) or 'none found'}")
        role = [head, jobs, "kind: Role", f"name: {s.name}", f"backend: {s.backend}", "rules:"]
        for rule in s.rules:
            role.append(f"  - methods: [{', '.join(rule.methods)}]")
            role.append("    paths:")
            for path, line in zip(rule.paths, rule.evidence, strict=True):
                role.append(f"      {_comment(line)}")
                role.append(f"      - {quoted(path)}")
        docs.append("\n".join(role))
        binding = [head, "kind: Binding", f"name: {s.name}", f"issuer: {s.issuer}", f"roles: [{s.name}]", "subjects:"]
        for index, c in enumerate(s.conditions):
            binding.append(f"    {_comment(c.why)}")
            prefix = "  - " if index == 0 else "    "
            binding.append(f"{prefix}{c.key}: {_scalar(c.value)}")
        docs.append("\n".join(binding))
    header = (
        "# Suggested by `controlplane suggest` from observed requests and CI configuration\n"
        "# (docs/policy-assistant.md)."
        " Review before merging: every line carries its evidence.\n"
    )
    return header + "".join(f"---\n{d}\n" for d in docs)


def _comment(text: str) -> str:
    """`text` as one YAML comment line. Job names, project paths and refs come from CI files, tokens and the
    trail: a line break in one (`\\n`, or U+2028, U+0085 that YAML also breaks lines on) would end the comment and
    write policy into the suggestion, so every character that is not printable is written escaped."""
    return "# " + one_line(text)


def one_line(text: str) -> str:
    """`text` with every non-printable character (line breaks, terminal escapes) written as `\\uXXXX`."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text
    )


def _scalar(value: str | bool | int | tuple[str, ...]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(quoted(v) for v in value) + "]"
    return quoted(value)


def quoted(value: str) -> str:
    """`value` as a YAML double-quoted scalar that reads back exactly: printable ASCII as is, everything else
    escaped, characters past U+FFFF as `\\U` (json.dumps writes them as a surrogate pair, which YAML reads as two
    invalid characters: a path with an emoji made the whole suggestion invalid)."""
    out = []
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def document(report: Report) -> dict[str, Any]:
    return {
        "observed": report.observed,
        "ignored": report.ignored,
        "suggestions": [
            {
                "name": s.name,
                "issuer": s.issuer,
                "backend": s.backend,
                "project_id": s.project_id,
                "project_path": s.project_path,
                "jobs": list(s.jobs),
                "evidence": _evidence(s.evidence),
                "rules": [
                    {"methods": list(r.methods), "paths": list(r.paths), "evidence": list(r.evidence)} for r in s.rules
                ],
                "subject": [
                    {"key": c.key, "value": list(c.value) if isinstance(c.value, tuple) else c.value, "why": c.why}
                    for c in s.conditions
                ],
            }
            for s in report.suggestions
        ],
        "flags": [{"kind": f.kind, "subject": f.subject, "message": f.message} for f in report.flags],
        "observed_requests": [
            {
                "project": r.project,
                "backend": r.backend,
                "method": r.method,
                "path": r.path,
                "decision": r.decision,
                "policy": r.policy,
                **_evidence(r.evidence),
            }
            for r in report.table
        ],
        "kept": {"roles": list(report.kept_roles), "bindings": list(report.kept_bindings)},
    }


def _evidence(e: Evidence) -> dict[str, Any]:
    return {"requests": e.requests, "jobs": list(e.jobs), "first": _date(e.first), "last": _date(e.last)}


def text_lines(report: Report) -> list[str]:
    lines = [
        f"{report.observed} request(s) observed, {report.ignored} not proposed from (denied, no project, "
        f"no backend or not a GitLab issuer); {len(report.suggestions)} role(s) and binding(s) suggested"
    ]
    for s in report.suggestions:
        lines.append(f"  {s.name}: {s.project_path or s.project_id} on {s.backend}: {s.evidence.text()}")
        for rule in s.rules:
            lines.append(f"    {'|'.join(rule.methods)} {' '.join(rule.paths)}")
        lines.append("    subject: " + ", ".join(f"{c.key}={_scalar(c.value)}" for c in s.conditions))
    if report.kept_bindings:
        lines.append(f"kept as they are: bindings {', '.join(report.kept_bindings)}")
    denied = [r for r in report.table if r.decision == "denied"]
    if denied:
        lines.append(f"denied in the window ({len(denied)} kind(s) of request; all in --format json):")
        for r in denied[:TEXT_DENIED_SHOWN]:
            lines.append(f"  {r.project} {r.backend} {r.method} {r.path}: {r.evidence.text()}")
    lines.append(f"{len(report.flags)} finding(s) about the current policy:")
    lines.extend(f"  [{f.kind}] {f.subject}: {f.message}" for f in report.flags)
    return [one_line(line) for line in lines]  # names from CI files and tokens: no terminal escapes, one line each


# --- the patched tree: the current policy without the Roles and Bindings the suggestion replaces


def patched_tree(files: Mapping[str, str], report: Report) -> dict[str, str]:
    """The policy files as they would be after the merge request: the replaced Role and Binding documents removed
    from each file (the others kept verbatim, comments included), a file left empty removed, and `suggested.yaml`."""
    out: dict[str, str] = {}
    for name, text in sorted(files.items()):
        kept = [doc for doc in _documents(text) if _kept(doc, report)]
        if any(doc.strip() and not _blank(doc) for doc in kept):
            out[name] = "---\n".join(kept)
    target = SUGGESTED_FILE
    while target in out:
        target = "_" + target
    out[target] = render_yaml(report)
    return out


def _documents(text: str) -> list[str]:
    """The file's YAML documents as text (separator lines dropped), so kept ones stay verbatim."""
    docs: list[str] = [""]
    for line in text.splitlines(keepends=True):
        if line.rstrip() == "---" or line.startswith("--- "):
            rest = line[4:]
            docs.append("" if rest.lstrip().startswith("#") or not rest.strip() else rest)
            continue
        docs[-1] += line
    return docs


def _blank(doc: str) -> bool:
    return all(not line.strip() or line.lstrip().startswith("#") for line in doc.splitlines())


def _kept(doc: str, report: Report) -> bool:
    try:
        data = yaml.safe_load(doc)
    except yaml.YAMLError:
        return True
    if not isinstance(data, dict):
        return True
    if data.get("kind") == "Role":
        return data.get("name") in report.kept_roles
    if data.get("kind") == "Binding":
        return data.get("name") in report.kept_bindings
    return True


def unified_diff(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    out: list[str] = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, ""), new.get(name, "")
        if a == b:
            continue
        out.extend(
            difflib.unified_diff(
                a.splitlines(keepends=True),
                b.splitlines(keepends=True),
                fromfile=f"a/{name}" if name in old else "/dev/null",
                tofile=f"b/{name}" if name in new else "/dev/null",
            )
        )
    return "".join(line if line.endswith("\n") else line + "\n" for line in out)


# --- dates without a clock module: days since the epoch to a proleptic Gregorian date


def _date(timestamp: float) -> str:
    days = int(timestamp // DAY) + 719_468
    era = days // 146_097
    doe = days - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return f"{year:04d}-{month:02d}-{day:02d}"
