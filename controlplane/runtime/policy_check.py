"""A policy tree judged, read-only and never served: a merge request's head.

Shared by `controlplane mr-check` (in CI: the policy alone, as `validate --offline` judges it) and by serve's
merge-request statuses (each open MR's head read through the API, with GitLab's state now as `LiveInputs`). Both
must give the verdict the default branch will get for the same files, and neither may touch what is served, so
this builds its own `Resolution` and compiles without what only serving adds (keys, credentials, secrets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import NamedTuple

from controlplane.compiler.compile import check_reserved_names
from controlplane.model.errors import PolicyError
from controlplane.model.inventory import Inventory
from controlplane.model.loader import parse_policy, policy_warnings
from controlplane.model.policy import Policy
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.index import Resolution
from controlplane.snapshots.build import compile_model
from controlplane.snapshots.snapshot import Snapshot


class LiveInputs(NamedTuple):
    """GitLab as it is now, for a candidate that is judged but not served: each `api:` issuer's inventory (holding
    at least what the candidate names) and the project ids paths resolved to before."""

    inventories: Mapping[str, Inventory]
    pins: Mapping[str, Mapping[str, int]]


NEVER_READ = Inventory(stale=True)  # an issuer nobody watches yet: its bindings are withdrawn, as serve does


class CheckedPolicy(NamedTuple):
    policy: Policy
    resolved: ResolvedPolicy
    snapshots: Mapping[str, Snapshot]
    warnings: list[PolicyError]  # valid but almost certainly not meant (validate prints them too)


def check_policy_files(texts: Mapping[str, str], live: Callable[[Policy], LiveInputs] | None = None) -> CheckedPolicy:
    """Parse, resolve and compile `texts` ({path: YAML}); raises `PolicyInvalid` with every error found.

    `live`: asked, with the parsed policy, for GitLab's state now (serve); without it the policy alone, as
    `validate --offline` judges it. `policy` in the answer is the policy as written, without live inputs."""
    policy = parse_policy(texts)
    check_reserved_names(policy, None)
    model, pins = policy, None
    if live is not None and any(i.api is not None for i in policy.issuers):
        inputs = live(policy)
        issuers = tuple(
            replace(i, inventory=inputs.inventories.get(i.name) or NEVER_READ) if i.api is not None else i
            for i in policy.issuers
        )
        model, pins = replace(policy, issuers=issuers), inputs.pins
    resolved = Resolution().update(model, pins)
    snapshots = compile_model(model, resolved=resolved)
    return CheckedPolicy(policy, resolved, snapshots, sorted([*policy_warnings(policy), *resolved.warnings]))


def first_error_line(errors: list[PolicyError], total: int) -> str:
    """One line for a commit status: the first error, and how many more there are."""
    if not errors:
        return "invalid policy"
    more = f" (+{total - 1} more)" if total > 1 else ""
    return f"{errors[0]}{more}"
