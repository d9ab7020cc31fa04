"""Observed traffic + CI configuration + the current policy → least-privilege Roles and Bindings, with evidence.

Pure and deterministic: the same observations, configurations and policy give the same suggestion byte for byte
(everything is sorted; the only clock is `now`, an input that sets the `--unused-days` window). The rules it
applies are written in docs/policy-assistant.md; in short:

- one Role per (project, backend) that made allowed requests: per method, the exact paths used; where at least
  `GLOB_MIN` distinct values were seen at one segment with every other segment equal, that segment becomes `*`
  (one segment, never deeper); methods with the same paths share a rule;
- one Binding per (project, backend), its subject pinned to the project *id* (the token's `project_id`), plus
  `ref_protected: true` when every ref the project was observed on is protected (GitLab's verdict, read by the
  caller), `ref` and `pipeline_source` when every CI job asking for the backend's audience may only run on
  literal refs / sources (as controlplane.assistant.ci_config understands its rules), and `environment` when
  every such job names a static environment;
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

TEXT_DENIED_SHOWN = 20  # denied kinds of request listed in the text report
GLOB_MIN = 3  # distinct values at one segment before it is generalised to `*`
SUGGESTED_FILE = "suggested.yaml"
DAY = 86_400.0
_NAME_BAD = re.compile(r"[^a-z0-9-]+")
HTTP_METHODS_TEXT = ", ".join(HTTP_METHODS)


@dataclass(frozen=True, slots=True)
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
    kind: str  # unused-rule | unused-methods | unmatched-binding | unpinned-protected | ci | shadow
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
    for o in given.observations:
        project = o.project_id or ""
        if o.decision != "allowed" or not canonical_id(project) or not o.backend or o.issuer not in gitlab:
            ignored += 1
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
    kept_bindings, kept_roles = _kept_names(given.policy)
    taken = set(kept_bindings) | set(kept_roles)  # a suggestion never takes the name of what stays
    suggestions = []
    for (issuer, project_id, backend), observed in sorted(groups.items(), key=lambda kv: _group_key(kv[0])):
        if backend not in backends:
            ignored += len(observed)
            continue
        ci = given.ci.get(project_id)
        jobs = ci.jobs_for(backends[backend].audience) if ci is not None and _describes(ci, observed) else ()
        name = _free_name(_name(f"p{project_id}-{backend}"), taken)
        taken.add(name)
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
    table = observed_table(given.observations)
    return Report(tuple(suggestions), flags, kept_roles, kept_bindings, len(given.observations), ignored, table)


def _describes(ci: CiConfig, observed: Sequence[Observation]) -> bool:
    """Whether the CI configuration read is the one every observed request's job ran: complete (no include
    unread, no bound reached), and every request made on the branch it was read from. A job of another ref ran
    that ref's `.gitlab-ci.yml`, which may drop the environment or the rules the default branch's has: pinning
    from the default branch's would shut it out."""
    return ci.complete and ci.default_branch is not None and all(o.ref == ci.default_branch for o in observed)


def _kept_names(policy: Policy) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Bindings kept as they are (shadow ones, other issuers'), and the Roles they name."""
    bindings = tuple(
        sorted(
            b.name
            for b in policy.bindings
            if b.mode is Mode.SHADOW or policy.issuer(b.issuer).kind is not IssuerKind.GITLAB
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
    if refs and protected is not None and all(protected.get(r) is True for r in refs):
        why = f"every ref it was observed on ({', '.join(refs)}) is protected in GitLab now"
        out.append(SuggestedCondition("ref_protected", True, why))
    elif protected is None and jobs and all(j.always_protected for j in jobs):
        why = f"GitLab's protections not read; the rules of {_names(jobs)} run only on protected refs"
        out.append(SuggestedCondition("ref_protected", True, why))
    if jobs:
        ci_refs = [j.refs for j in jobs]
        if all(r is not None for r in ci_refs):
            allowed = sorted({ref for r in ci_refs if r is not None for ref in r})
            if allowed and set(refs) <= set(allowed):
                out.append(
                    SuggestedCondition("ref", tuple(allowed), f"the only refs the rules of {_names(jobs)} allow")
                )
        ci_sources = [j.sources for j in jobs]
        if all(s is not None for s in ci_sources):
            allowed = sorted({src for s in ci_sources if s is not None for src in s})
            if allowed:
                why = f"the only pipeline sources the rules of {_names(jobs)} allow"
                out.append(SuggestedCondition("pipeline_source", tuple(allowed), why))
        envs = [j.environment for j in jobs]
        if all(e is not None and "$" not in e for e in envs):
            environments = tuple(sorted({e for e in envs if e is not None}))
            out.append(SuggestedCondition("environment", environments, f"the environments of {_names(jobs)}"))
    return tuple(out)


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
    by_binding: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for name, obs in by_policy.items():
        by_binding[name.partition("/")[0]].update((o.project_id or "", o.ref or "") for o in obs)
    for binding in sorted(given.policy.bindings, key=lambda b: b.name):
        if binding.mode is Mode.SHADOW or any(m.claim == "ref_protected" for s in binding.subjects for m in s.claims):
            continue
        pairs = by_binding.get(binding.name, set())
        if pairs and all(given.protected.get(p, {}).get(r) is True for p, r in pairs):
            refs = ", ".join(sorted({r for _, r in pairs}))
            message = f"no subject pins ref_protected, yet every request it allowed came from protected refs {refs}"
            out.append(Flag("unpinned-protected", binding.name, message))
    return out


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
