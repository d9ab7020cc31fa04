"""Which grants a token's claims satisfy: the same decision Envoy's RBAC takes, computed in Python.

The token exchange must never grant a role Envoy would refuse for the same token (nor refuse one Envoy would
grant), so it evaluates exactly what the compiler encodes into RBAC principals, `ResolvedSubject.conditions`
and `alternatives`, with Envoy's matching rules:

- a claim matches only as a string, as Envoy's `string_match` never matches a number, a bool or null;
- a `listy` claim also matches when it is a list one of whose string elements matches (`list_match.one_of`);
- a glob value is `claims.glob_to_regex` fully matched (RE2 `safe_regex` is a full match);
- a negated condition is `not_id`: it holds when no value matches, including when the claim is absent.

Only `enforce` grants count: shadow bindings are logged by Envoy, never enforced, so they grant nothing here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.compiler.claims import Condition, ResolvedSubject, glob_to_regex, is_glob
from controlplane.compiler.rbac import GrantSpec
from controlplane.model.policy import Mode


def grants_for(claims: Mapping[str, Any], grants: Sequence[GrantSpec]) -> list[GrantSpec]:
    """The enforced grants (in the given order) of which any subject matches `claims`."""
    return [g for g in grants if g.mode is Mode.ENFORCE and any(subject_matches(claims, s) for s in g.subjects)]


def subject_matches(claims: Mapping[str, Any], subject: ResolvedSubject) -> bool:
    """All conditions, and one of the alternatives when there are any (Principal and_ids + or_ids)."""
    if not _all_hold(claims, subject.conditions):
        return False
    return not subject.alternatives or any(_all_hold(claims, alt) for alt in subject.alternatives)


def condition_holds(claims: Mapping[str, Any], condition: Condition) -> bool:
    value = claims.get(condition.claim)
    matched = any(_claim_matches(value, wanted, condition.listy) for wanted in condition.values)
    return matched != condition.negated


def _all_hold(claims: Mapping[str, Any], conditions: Sequence[Condition]) -> bool:
    return all(condition_holds(claims, c) for c in conditions)


def _claim_matches(value: object, wanted: str, listy: bool) -> bool:
    if isinstance(value, str):
        return _string_matches(value, wanted)
    if listy and isinstance(value, list):
        return any(isinstance(item, str) and _string_matches(item, wanted) for item in value)
    return False


def _string_matches(value: str, wanted: str) -> bool:
    if is_glob(wanted):
        return _glob(wanted).fullmatch(value) is not None
    return value == wanted


@functools.lru_cache(maxsize=4096)
def _glob(wanted: str) -> re.Pattern[str]:
    """Compiled once: the same few globs (`release/*`) are evaluated on every exchange."""
    return re.compile(glob_to_regex(wanted))
