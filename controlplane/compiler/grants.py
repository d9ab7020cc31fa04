"""Which binding grants what on which backend: the index the RBAC of every virtual host is built from.

The index is updated in place from one policy to the next. A binding whose model object, issuer and
roles are unchanged keeps its resolved grants, so a one-binding change costs one resolution, not ten
thousand. Starting from an empty index gives exactly the same result as updating one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import NamedTuple

from controlplane.compiler.names import policy_name
from controlplane.compiler.rbac import GrantSpec
from controlplane.compiler.resolve import Findings, Resolver
from controlplane.model.errors import PolicyError
from controlplane.model.policy import Binding, Issuer, Policy, Role


class _Entry(NamedTuple):
    binding: Binding
    granted: tuple[tuple[str, GrantSpec], ...]  # (backend, grant)
    errors: tuple[PolicyError, ...]
    warnings: tuple[PolicyError, ...]  # access withdrawn, stale paths: the policy is valid, GitLab changed
    pins: tuple[tuple[str, int], ...]  # project paths and the ids they resolved to


class GrantIndex:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._roles: dict[str, Role] = {}
        self._issuers: dict[str, Issuer] = {}
        self._by_backend: dict[str, dict[str, tuple[GrantSpec, ...]]] = defaultdict(dict)
        self._issuer_by_backend: dict[str, dict[str, str]] = defaultdict(dict)
        self._failing: set[str] = set()
        self._pins: Mapping[str, Mapping[str, int]] = {}
        # Per backend, rebuilt only when a binding granting there changes: unchanged backends keep
        # the very same tuple objects, which is what the compiler's identity memo keys on.
        self._grants_view: dict[str, tuple[GrantSpec, ...]] = {}
        self._issuers_view: dict[str, tuple[str, ...]] = {}

    def update(self, policy: Policy, pins: Mapping[str, Mapping[str, int]] | None = None) -> list[PolicyError]:
        """Bring the index to `policy`; returns every resolution error (the index then must not be used).

        `pins` (issuer → project path → id) are the ids paths resolved to before: with them a path that now
        names another project is an error instead of a silent rebind. A new pins object re-resolves everything.
        """
        pins = pins or {}
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

    def warnings(self) -> list[PolicyError]:
        return sorted(w for entry in self._entries.values() for w in entry.warnings)

    def pins(self) -> dict[str, dict[str, int]]:
        """Issuer → project path → id, as resolved by the current policy (to remember for the next compile)."""
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for entry in self._entries.values():
            out[entry.binding.issuer].update(entry.pins)
        return dict(out)

    def grants(self, backend: str) -> tuple[GrantSpec, ...]:
        """Sorted by policy name. The same object is returned until a grant on this backend changes."""
        view = self._grants_view.get(backend)
        if view is None:
            by_binding = self._by_backend.get(backend, {})
            view = tuple(sorted((g for gs in by_binding.values() for g in gs), key=lambda g: g.policy_name))
            self._grants_view[backend] = view
        return view

    def issuers(self, backend: str) -> tuple[str, ...]:
        """Issuers whose tokens the backend accepts (sorted); the same object until they change."""
        view = self._issuers_view.get(backend)
        if view is None:
            view = tuple(sorted(set(self._issuer_by_backend.get(backend, {}).values())))
            self._issuers_view[backend] = view
        return view

    def _replace(self, name: str, entry: _Entry | None) -> None:
        old = self._entries.pop(name, None)
        if old is not None:
            for backend, _ in old.granted:
                self._by_backend[backend].pop(name, None)
                self._issuer_by_backend[backend].pop(name, None)
                self._forget_views(backend)
        self._failing.discard(name)
        if entry is None:
            return
        self._entries[name] = entry
        if entry.errors:
            self._failing.add(name)
        for backend, _ in entry.granted:
            self._by_backend[backend][name] = tuple(g for b, g in entry.granted if b == backend)
            self._issuer_by_backend[backend][name] = entry.binding.issuer
            self._forget_views(backend)

    def _forget_views(self, backend: str) -> None:
        self._grants_view.pop(backend, None)
        self._issuers_view.pop(backend, None)


def _resolve(binding: Binding, roles: dict[str, Role], resolver: Resolver) -> _Entry:
    found = Findings()
    resolved = [resolver.resolve(s, found) for s in binding.subjects]
    pins = tuple(sorted(found.pins.items()))
    if found.errors:
        return _Entry(binding, (), tuple(found.errors), tuple(found.warnings), pins)
    subjects = tuple(s for s in resolved if s is not None)
    granted = tuple(
        (role.backend, GrantSpec(policy_name(binding.name, role.name), binding.mode, role.rules, subjects))
        for role in (roles[name] for name in binding.roles)
    )
    return _Entry(binding, granted, (), tuple(found.warnings), pins)
