"""Who gains or loses what between two resolved policies: `controlplane diff`'s comparison, kept pure.

Read from the resolved policies, not from text: the very grants the RBAC compiler encodes and the Evaluator
evaluates, so a reordered file or a renamed role that grants the same changes nothing here. Per backend, each
subject (worded as `resolved.yaml` words it) is compared by the (method, path) pairs its enforced grants allow;
a pair counts as gained only when none of the subject's old pairs already covers it (`/v1/*` covers `/v1/a`),
and as lost only when no new pair covers it. Shadow grants allow nothing (Envoy logs them only), so a binding
going shadow -> enforce shows as its gains and as a mode change ("would start enforcing").

The cloud identity a backend's requests are sent upstream as (resolved/cloud.py: an `aws:` role, a `gcp:`
service account, and every setting of those blocks; a binding's own `aws_role_arn`) is an access change too: the
same request then does other things in the cloud. Each setting that differs is one `CloudChange`, old -> new.

Not compared: one subject covering another (a new, narrower subject beside a broader old one is listed as
gaining), and GitLab's live state (both sides are resolved the same way, by the caller).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from controlplane.model.policy import Mode
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.cloud import CloudIdentity
from controlplane.resolved.conditions import ResolvedSubject
from controlplane.resolved.render import condition_text

ANY = "any"  # a rule with no methods, or no paths: any of them


class Change(NamedTuple):
    """One subject gaining (or losing) `methods` on `path`, through the grants named in `via`."""

    subject: str
    methods: tuple[str, ...]
    path: str
    via: tuple[str, ...]
    resolved: ResolvedSubject  # what the evaluator checks (not part of the JSON)


class ModeChange(NamedTuple):
    grant: str
    old: str
    new: str


class CloudChange(NamedTuple):
    """One setting of a backend's cloud identity changing (`binding` None), or a binding's own role there.

    `setting` is "provider" (old/new "aws", "gcp" or None: the backend turns into or out of a cloud backend),
    a key of the `aws:`/`gcp:` block, or "aws_role_arn" for a binding; None on a side that has no such value."""

    binding: str | None
    setting: str
    old: str | None
    new: str | None


class BackendDiff(NamedTuple):
    name: str
    status: str  # "added", "removed" or "changed"
    gains: tuple[Change, ...]
    losses: tuple[Change, ...]
    modes: tuple[ModeChange, ...]
    shadow_added: tuple[str, ...]  # new shadow grants: logged by Envoy, allow nothing (access unchanged)
    shadow_removed: tuple[str, ...]
    cloud: tuple[CloudChange, ...] = ()  # who its requests reach the cloud as, changed

    @property
    def access_changed(self) -> bool:
        return self.status != "changed" or bool(self.gains or self.losses or self.modes or self.cloud)


class FrontChange(NamedTuple):
    """A gateway that starts (or stops) fronting a backend: the backend becomes reachable (or not) through it."""

    gateway: str
    backend: str
    added: bool


class PolicyDiff(NamedTuple):
    backends: tuple[BackendDiff, ...]  # only those that changed, by name
    gateways_added: tuple[str, ...]
    gateways_removed: tuple[str, ...]
    fronts: tuple[FrontChange, ...]  # of gateways on both sides

    @property
    def changed(self) -> bool:
        """Whether access changed: what `diff`'s exit status says (shadow grants alone change nothing)."""
        return any(b.access_changed for b in self.backends) or bool(
            self.gateways_added or self.gateways_removed or self.fronts
        )


def subject_text(subject: ResolvedSubject) -> str:
    """`project_id = 42 and ref_protected = true`, with `any of (a and b | c)` for alternatives."""
    parts = [condition_text(c) for c in subject.conditions]
    if subject.alternatives:
        alternatives = " | ".join(" and ".join(condition_text(c) for c in alt) for alt in subject.alternatives)
        parts.append(f"any of ({alternatives})")
    return " and ".join(parts) or "any token"


def compare(
    old: ResolvedPolicy,
    new: ResolvedPolicy,
    old_gateways: Mapping[str, Iterable[str]],
    new_gateways: Mapping[str, Iterable[str]],
) -> PolicyDiff:
    """`old_gateways`, `new_gateways`: each gateway's name and the backends it fronts."""
    backends = []
    for name in sorted(old.backends.keys() | new.backends.keys()):
        status = "added" if name not in old.backends else "removed" if name not in new.backends else "changed"
        diff = _backend(name, status, old.grants(name), new.grants(name))
        diff = diff._replace(cloud=cloud_changes(old.cloud.get(name), new.cloud.get(name)))
        if diff.access_changed or diff.shadow_added or diff.shadow_removed:
            backends.append(diff)
    before, after = set(old_gateways), set(new_gateways)
    fronts: list[FrontChange] = []
    for gateway in sorted(before & after):
        was, now = set(old_gateways[gateway]), set(new_gateways[gateway])
        fronts.extend(FrontChange(gateway, b, True) for b in sorted(now - was))
        fronts.extend(FrontChange(gateway, b, False) for b in sorted(was - now))
    return PolicyDiff(tuple(backends), tuple(sorted(after - before)), tuple(sorted(before - after)), tuple(fronts))


_Pairs = dict[tuple[str, str], set[str]]  # (method, path) -> grant names allowing it


class _Side(NamedTuple):
    pairs: dict[str, _Pairs]  # subject text -> its pairs
    subjects: dict[str, ResolvedSubject]


def _side(grants: Iterable[Grant]) -> _Side:
    pairs: dict[str, _Pairs] = defaultdict(lambda: defaultdict(set))
    subjects: dict[str, ResolvedSubject] = {}
    for grant in grants:
        if grant.mode is not Mode.ENFORCE:
            continue
        for subject in grant.subjects:
            text = subject_text(subject)
            subjects[text] = subject
            for rule in grant.rules:
                for method in rule.methods or (ANY,):
                    for path in rule.paths or (ANY,):
                        pairs[text][(method, path)].add(grant.name)
    return _Side(pairs, subjects)


def _backend(name: str, status: str, old: tuple[Grant, ...], new: tuple[Grant, ...]) -> BackendDiff:
    before, after = _side(old), _side(new)
    gains = _uncovered(after, before)
    losses = _uncovered(before, after)
    old_modes = {g.name: g.mode for g in old}
    modes = tuple(
        ModeChange(g.name, old_modes[g.name].value, g.mode.value)
        for g in new
        if g.name in old_modes and old_modes[g.name] is not g.mode
    )
    old_shadow = {g.name for g in old if g.mode is Mode.SHADOW}
    new_shadow = {g.name for g in new if g.mode is Mode.SHADOW}
    shadow_added = tuple(sorted(n for n in new_shadow - old_shadow if n not in old_modes))
    shadow_removed = tuple(sorted(n for n in old_shadow - new_shadow if n not in {g.name for g in new}))
    return BackendDiff(name, status, gains, losses, modes, shadow_added, shadow_removed)


def cloud_changes(old: CloudIdentity | None, new: CloudIdentity | None) -> tuple[CloudChange, ...]:
    """Every setting that differs, the provider first, then the block's keys (old side's order, then new keys),
    then bindings' own roles by binding."""
    if old == new:
        return ()
    changes = []
    was, now = (old.provider if old else None), (new.provider if new else None)
    if was != now:
        changes.append(CloudChange(None, "provider", was, now))
    before, after = dict(old.settings if old else ()), dict(new.settings if new else ())
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key) != after.get(key):
            changes.append(CloudChange(None, key, before.get(key), after.get(key)))
    if old is not None and new is not None and old.destination != new.destination:
        # the same identity, its credential sent somewhere else: an MR moving a backend hands it to that address
        changes.append(CloudChange(None, "destination", old.destination, new.destination))
    roles_before, roles_after = dict(old.roles if old else ()), dict(new.roles if new else ())
    for binding in sorted(roles_before.keys() | roles_after.keys()):
        if roles_before.get(binding) != roles_after.get(binding):
            changes.append(CloudChange(binding, "aws_role_arn", roles_before.get(binding), roles_after.get(binding)))
    return tuple(changes)


def cloud_text(change: CloudChange) -> str:
    """`cloud role_arn: A -> B`, `binding x aws_role_arn: none -> B`: one reviewer's line, without the backend."""
    who = "cloud" if change.binding is None else f"binding {change.binding}"
    return f"{who} {change.setting}: {change.old or 'none'} -> {change.new or 'none'}"


def _uncovered(side: _Side, other: _Side) -> tuple[Change, ...]:
    """The pairs of `side` that no pair of the same subject in `other` covers, grouped by subject and path."""
    grouped: dict[tuple[str, str], tuple[set[str], set[str]]] = {}
    for subject, pairs in side.pairs.items():
        theirs = other.pairs.get(subject, {})
        for (method, path), via in pairs.items():
            if any(_covers(m, p, method, path) for m, p in theirs):
                continue
            methods, names = grouped.setdefault((subject, path), (set(), set()))
            methods.add(method)
            names.update(via)
    return tuple(
        Change(subject, tuple(sorted(methods)), path, tuple(sorted(names)), side.subjects[subject])
        for (subject, path), (methods, names) in sorted(grouped.items())
    )


def _covers(method: str, path: str, wanted_method: str, wanted_path: str) -> bool:
    """Whether (method, path) allows every request (wanted_method, wanted_path) allows."""
    if method != ANY and method != wanted_method:
        return False
    if path == ANY:
        return True
    if wanted_path == ANY:
        return False
    if wanted_path.endswith("/**") and not path.endswith("/**"):
        return False  # only an any-depth pattern covers any depth
    return path_pattern(path).fullmatch(wanted_path) is not None


def path_pattern(pattern: str) -> re.Pattern[str]:
    """A role path as a regex: exact, `*` within one segment, a trailing `/**` the path and anything below.

    Matched against a pattern too, its `*` read as a character: a segment glob covers a narrower one."""
    any_depth = pattern.endswith("/**")
    stem = pattern[: -len("/**")] if any_depth else pattern
    body = "".join("[^/]*" if char == "*" else re.escape(char) for char in stem)
    return re.compile(body + ("(/.*)?" if any_depth else ""))


def document(diff: PolicyDiff) -> dict[str, object]:
    """The diff as JSON-ready data, with stable keys and sorted lists."""
    return {
        "changed": diff.changed,
        "backends": [
            {
                "name": b.name,
                "status": b.status,
                "gains": [_change(c) for c in b.gains],
                "losses": [_change(c) for c in b.losses],
                "modes": [{"grant": m.grant, "old": m.old, "new": m.new} for m in b.modes],
                "shadow": {"added": list(b.shadow_added), "removed": list(b.shadow_removed)},
                "cloud": [c._asdict() for c in b.cloud],
            }
            for b in diff.backends
        ],
        "gateways": {
            "added": list(diff.gateways_added),
            "removed": list(diff.gateways_removed),
            "fronts": [{"gateway": f.gateway, "backend": f.backend, "added": f.added} for f in diff.fronts],
        },
    }


def _change(change: Change) -> Mapping[str, object]:
    return {"subject": change.subject, "methods": list(change.methods), "path": change.path, "via": list(change.via)}
