"""Which binding grants what on which backend, kept up to date from one policy to the next.

The resolution is updated in place. A binding whose model object, issuer and roles are unchanged keeps its
resolved grants, so a one-binding change costs one resolution, not ten thousand. Starting from an empty
resolution gives exactly the same result as updating one. Its owner (the policy service, or whoever compiles)
holds it between compiles and hands the result to the compiler and to the token exchange alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import NamedTuple

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.policy import Binding, Issuer, Policy, Role
from controlplane.resolved.access import NO_ACCESS, BackendAccess, Grant, ResolvedPolicy
from controlplane.resolved.cloud import identities as cloud_identities
from controlplane.resolved.resolve import Findings, Resolver


class _Entry(NamedTuple):
    binding: Binding
    granted: tuple[tuple[str, Grant], ...]  # (backend, grant)
    errors: tuple[PolicyError, ...]
    warnings: tuple[PolicyError, ...]  # access withdrawn, stale paths: the policy is valid, GitLab changed
    pins: tuple[tuple[str, int], ...]  # project paths and the ids they resolved to


class Resolution:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._roles: dict[str, Role] = {}
        self._issuers: dict[str, Issuer] = {}
        self._by_backend: dict[str, dict[str, tuple[Grant, ...]]] = defaultdict(dict)
        self._issuer_by_backend: dict[str, dict[str, str]] = defaultdict(dict)
        self._failing: set[str] = set()
        self._pins: Mapping[str, Mapping[str, int]] = {}
        # Per backend, rebuilt only when a binding granting there changes: unchanged backends keep
        # the very same objects, which is what the compiler's identity memo keys on.
        self._views: dict[str, BackendAccess] = {}
        self._warnings: tuple[PolicyError, ...] | None = None
        self._pins_view: dict[str, dict[str, int]] | None = None
        self._bindings_of: dict[str, int] = {}  # by issuer

    def update(self, policy: Policy, pins: Mapping[str, Mapping[str, int]] | None = None) -> ResolvedPolicy:
        """Bring the resolution to `policy`. Raises PolicyInvalid with every resolution error, and then starts
        afresh next time (a failed update leaves no half-applied state behind).

        `pins` (issuer → project path → id) are the ids paths resolved to before: with them a path that now
        names another project is an error instead of a silent rebind. A new pins object re-resolves everything.
        """
        errors = self._update(policy, pins or {})
        if errors:
            self._reset()
            raise PolicyInvalid(errors)
        views = self._views
        return ResolvedPolicy(
            backends={b.name: views.get(b.name) or self._access(b.name) for b in policy.backends},
            warnings=self._warning_view(),
            pins=self._pin_view(),
            cloud=cloud_identities(policy),
        )

    def _update(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> list[PolicyError]:
        roles = {r.name: r for r in policy.roles}
        issuers = {i.name: i for i in policy.issuers}
        stale_roles = {n for n, r in roles.items() if self._roles.get(n) is not r} | (self._roles.keys() - roles.keys())
        stale_issuers = {n for n, i in issuers.items() if self._issuers.get(n) is not i}
        if pins is not self._pins and (pins or self._pins):  # no pins before or now is no change
            stale_issuers = set(issuers)
        self._roles, self._issuers, self._pins = roles, issuers, pins
        resolvers: dict[str, Resolver] = {}
        seen: set[str] = set()
        for binding in policy.bindings:
            seen.add(binding.name)
            entry = self._entries.get(binding.name)
            if (
                entry is not None
                and entry.binding is binding
                and not ((stale_roles and stale_roles.intersection(binding.roles)) or binding.issuer in stale_issuers)
            ):
                continue
            if binding.issuer not in resolvers:
                resolvers[binding.issuer] = Resolver(issuers[binding.issuer], pins.get(binding.issuer))
            self._replace(binding.name, _resolve(binding, roles, resolvers[binding.issuer]))
        for gone in self._entries.keys() - seen:
            self._replace(gone, None)
        return [e for name in sorted(self._failing) for e in self._entries[name].errors]

    def _warning_view(self) -> tuple[PolicyError, ...]:
        if self._warnings is None:
            self._warnings = tuple(sorted(w for entry in self._entries.values() for w in entry.warnings))
        return self._warnings

    def _pin_view(self) -> dict[str, dict[str, int]]:
        """Issuer → project path → id, as resolved by the current policy (to remember for the next compile)."""
        if self._pins_view is None:
            out: dict[str, dict[str, int]] = defaultdict(dict)
            for entry in self._entries.values():
                out[entry.binding.issuer].update(entry.pins)
            self._pins_view = dict(out)
        return self._pins_view

    def _access(self, backend: str) -> BackendAccess:
        """Grants sorted by name, issuers sorted; the same object until a grant on this backend changes."""
        view = self._views.get(backend)
        if view is None:
            by_binding = self._by_backend.get(backend)
            if by_binding:
                grants = tuple(sorted((g for gs in by_binding.values() for g in gs), key=lambda g: g.name))
                view = BackendAccess(tuple(sorted(set(self._issuer_by_backend[backend].values()))), grants)
            else:
                view = NO_ACCESS
            self._views[backend] = view
        return view

    def _replace(self, name: str, entry: _Entry | None) -> None:
        """Also drops the cached warnings and pins that this entry's coming or going changes (every issuer
        with a binding has a key in the pins, so an issuer's first and last bindings change them too)."""
        old = self._entries.pop(name, None)
        if old is not None:
            left = self._bindings_of[old.binding.issuer] - 1
            self._bindings_of[old.binding.issuer] = left
            if old.warnings:
                self._warnings = None
            if old.pins or not left:
                self._pins_view = None
            for backend, _ in old.granted:
                self._by_backend[backend].pop(name, None)
                self._issuer_by_backend[backend].pop(name, None)
                self._views.pop(backend, None)
        self._failing.discard(name)
        if entry is None:
            return
        self._entries[name] = entry
        before = self._bindings_of.get(entry.binding.issuer, 0)
        self._bindings_of[entry.binding.issuer] = before + 1
        if entry.warnings:
            self._warnings = None
        if entry.pins or not before:
            self._pins_view = None
        if entry.errors:
            self._failing.add(name)
        for backend, _ in entry.granted:
            self._by_backend[backend][name] = tuple(g for b, g in entry.granted if b == backend)
            self._issuer_by_backend[backend][name] = entry.binding.issuer
            self._views.pop(backend, None)


def _resolve(binding: Binding, roles: dict[str, Role], resolver: Resolver) -> _Entry:
    found = Findings()
    resolved = [resolver.resolve(s, found) for s in binding.subjects]
    pins = tuple(sorted(found.pins.items()))
    if found.errors:
        return _Entry(binding, (), tuple(found.errors), tuple(found.warnings), pins)
    subjects = tuple(s for s in resolved if s is not None)
    granted = tuple(
        (role.backend, Grant(binding.name, role.name, binding.mode, role.rules, subjects))
        for role in (roles[name] for name in binding.roles)
    )
    return _Entry(binding, granted, (), tuple(found.warnings), pins)
