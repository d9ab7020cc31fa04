"""Who gains or loses what between two resolved policies: `controlplane diff`'s comparison, kept pure.

Read from the resolved policies, not from text: the very grants the RBAC compiler encodes and the Evaluator
evaluates, so a reordered file or a renamed role that grants the same changes nothing here. Per backend, each
subject (worded as `resolved.yaml` words it) is compared by the (method, path) pairs its enforced grants allow;
a pair counts as gained only when none of the subject's old pairs already covers it (`/v1/*` covers `/v1/a`),
and as lost only when no new pair covers it. Shadow grants allow nothing (Envoy logs them only), so a binding
going shadow -> enforce shows as its gains and as a mode change ("would start enforcing").

Also compared: who a backend's requests are sent upstream AS (`upstream_identities`: the AWS role that signs
them, the Google service account whose token is injected, where an injected secret is read from). None of it is
in Envoy's configuration or the grants, yet swapping a read-only role for an admin one changes what every allowed
request can do: a policy change that only swaps it must not read "unchanged".

Not compared: one subject covering another (a new, narrower subject beside a broader old one is listed as
gaining), and GitLab's live state (both sides are resolved the same way, by the caller).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from controlplane.model.policy import Backend, Mode, Policy
from controlplane.resolved.access import Grant, ResolvedPolicy
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


class UpstreamChange(NamedTuple):
    """A backend's requests sent upstream as another identity (None: none, e.g. no `aws:` any more)."""

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
    upstream: UpstreamChange | None = None  # only for a backend on both sides

    @property
    def access_changed(self) -> bool:
        return self.status != "changed" or bool(self.gains or self.losses or self.modes or self.upstream)


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


def upstream_identities(policy: Policy) -> dict[str, str]:
    """Backend name → who its requests are sent upstream as, in words; backends sending as nobody are left out."""
    found: dict[str, str] = {}
    for backend in policy.backends:
        parts = []
        if backend.aws is not None:
            how = " (AssumeRole)" if backend.aws.source == "assume_role" else ""
            parts.append(f"AWS role {backend.aws.role_arn}{how}")
        if backend.gcp is not None:
            gcp = backend.gcp
            what = f"ID token for {gcp.id_token_audience}" if gcp.id_token_audience else " ".join(gcp.scopes)
            parts.append(
                f"Google service account {gcp.service_account} ({what}) through {gcp.workload_identity_provider}"
            )
        elif backend.inject is not None:
            source = backend.inject.secret_env or backend.inject.secret_file
            kind = "environment variable" if backend.inject.secret_env else "file"
            parts.append(f"the secret of {kind} {source} in {backend.inject.header}")
        roles = {r.name for r in policy.roles if r.backend == backend.name}
        parts.extend(
            f"binding {b.name}: AWS role {b.aws_role_arn}"
            for b in sorted(policy.bindings, key=lambda b: b.name)
            if b.aws_role_arn is not None and roles & set(b.roles) and backend.aws is not None
        )
        if parts:
            found[backend.name] = "; ".join(parts) + ", to " + _destination(backend)
    return found


def _destination(backend: Backend) -> str:
    """Where a backend's credential-bearing requests go: a changed address sends the credential (a Bearer token,
    a SigV4 signature with its session token) to someone else, which is as much a change as another role."""
    places = [f"{e.address}:{e.port}" for e in backend.endpoints]
    places += [f"service {s.namespace}/{s.name}:{s.port}" for s in backend.services]
    tls = f" (TLS to {backend.tls.sni}, CA {backend.tls.ca_file})" if backend.tls is not None else " (plain text)"
    return ", ".join(places) + tls


def compare(
    old: ResolvedPolicy,
    new: ResolvedPolicy,
    old_gateways: Mapping[str, Iterable[str]],
    new_gateways: Mapping[str, Iterable[str]],
    upstream: tuple[Mapping[str, str], Mapping[str, str]] = ({}, {}),
) -> PolicyDiff:
    """`old_gateways`, `new_gateways`: each gateway's name and the backends it fronts; `upstream`: each side's
    `upstream_identities`."""
    backends = []
    for name in sorted(old.backends.keys() | new.backends.keys()):
        status = "added" if name not in old.backends else "removed" if name not in new.backends else "changed"
        diff = _backend(name, status, old.grants(name), new.grants(name))
        sent_as, now_as = upstream[0].get(name), upstream[1].get(name)
        if status == "changed" and sent_as != now_as:
            diff = diff._replace(upstream=UpstreamChange(sent_as, now_as))
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
                "upstream": b.upstream._asdict() if b.upstream is not None else None,
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
