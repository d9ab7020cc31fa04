"""The result of resolving a policy: per backend, whose tokens it accepts and what each binding grants there.

What the RBAC compiler encodes and the token exchange evaluates, so the two grant exactly the same; and what
`snapshots/<case>/resolved.yaml` shows a reviewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from controlplane.model.errors import PolicyError
from controlplane.model.policy import Mode, RoleRule
from controlplane.resolved.cloud import CloudIdentity
from controlplane.resolved.conditions import ResolvedSubject


class Grant(NamedTuple):
    """A binding's role on one backend: its rules, to the binding's subjects that still have access."""

    binding: str
    role: str
    mode: Mode
    rules: tuple[RoleRule, ...]
    subjects: tuple[ResolvedSubject, ...]  # empty: GitLab withdrew every subject, the grant admits no one

    @property
    def name(self) -> str:
        """`binding/role`: the RBAC policy id in access logs, which leads back to the binding (neither name
        can hold a '/', both are DNS labels)."""
        return f"{self.binding}/{self.role}"


class BackendAccess(NamedTuple):
    issuers: tuple[str, ...]  # names of the issuers whose tokens some grant here admits, sorted
    grants: tuple[Grant, ...]  # sorted by name


NO_ACCESS = BackendAccess((), ())


@dataclass(frozen=True)
class ResolvedPolicy:
    """Who may do what on which backend, as GitLab is now.

    A backend's `BackendAccess` (and the tuples in it) is the very same object from one resolution to the
    next until a grant there changes: the compiler's memo keys on that identity.
    """

    backends: Mapping[str, BackendAccess]  # every backend of the policy, by name
    warnings: tuple[PolicyError, ...]  # access GitLab withdrew, stale paths: the policy is valid
    pins: Mapping[str, Mapping[str, int]]  # issuer → project path → the id it resolved to
    # backend → who its requests are sent upstream as (`aws:`/`gcp:` backends only; resolved/cloud.py)
    cloud: Mapping[str, CloudIdentity] = field(default_factory=dict)

    def access(self, backend: str) -> BackendAccess:
        return self.backends.get(backend, NO_ACCESS)

    def grants(self, backend: str) -> tuple[Grant, ...]:
        return self.access(backend).grants

    def issuers(self, backend: str) -> tuple[str, ...]:
        return self.access(backend).issuers
