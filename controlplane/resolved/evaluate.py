"""Which grants a token's claims satisfy: the same decision Envoy's RBAC takes, computed in Python.

The token exchange must never grant a role Envoy would refuse for the same token (nor refuse one Envoy would
grant), so it evaluates exactly what the compiler encodes into RBAC principals, `ResolvedSubject.conditions`
and `alternatives`, with Envoy's matching rules:

- a claim matches only as a string, as Envoy's `string_match` never matches a number, a bool or null;
- a `listy` claim also matches when it is a list one of whose string elements matches (`list_match.one_of`);
- a glob value is `conditions.glob_to_regex` fully matched (RE2 `safe_regex` is a full match);
- a negated condition is `not_id`: it holds when no value matches, including when the claim is absent.

Only `enforce` grants count: shadow bindings are logged by Envoy, never enforced, so they grant nothing here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from controlplane.model.policy import Mode
from controlplane.resolved.access import Grant
from controlplane.resolved.conditions import Condition, ResolvedSubject, glob_to_regex, is_glob


class Evaluator:
    """Holds the compiled globs: the same few (`release/*`) are evaluated on every exchange. One per resolved
    policy, so what it holds follows the policy and goes with it."""

    def __init__(self) -> None:
        self._globs: dict[str, re.Pattern[str]] = {}

    def grants_for(self, claims: Mapping[str, Any], grants: Sequence[Grant]) -> list[Grant]:
        """The enforced grants (in the given order) of which any subject matches `claims`."""
        return [
            g for g in grants if g.mode is Mode.ENFORCE and any(self.subject_matches(claims, s) for s in g.subjects)
        ]

    def subject_matches(self, claims: Mapping[str, Any], subject: ResolvedSubject) -> bool:
        """All conditions, and one of the alternatives when there are any (Principal and_ids + or_ids)."""
        if not self._all_hold(claims, subject.conditions):
            return False
        return not subject.alternatives or any(self._all_hold(claims, alt) for alt in subject.alternatives)

    def condition_holds(self, claims: Mapping[str, Any], condition: Condition) -> bool:
        value = claims.get(condition.claim)
        matched = any(self._claim_matches(value, wanted, condition.listy) for wanted in condition.values)
        return matched != condition.negated

    def _all_hold(self, claims: Mapping[str, Any], conditions: Sequence[Condition]) -> bool:
        return all(self.condition_holds(claims, c) for c in conditions)

    def _claim_matches(self, value: object, wanted: str, listy: bool) -> bool:
        if isinstance(value, str):
            return self._string_matches(value, wanted)
        if listy and isinstance(value, list):
            return any(isinstance(item, str) and self._string_matches(item, wanted) for item in value)
        return False

    def _string_matches(self, value: str, wanted: str) -> bool:
        if is_glob(wanted):
            return self._glob(wanted).fullmatch(value) is not None
        return value == wanted

    def _glob(self, wanted: str) -> re.Pattern[str]:
        pattern = self._globs.get(wanted)
        if pattern is None:
            pattern = self._globs[wanted] = re.compile(glob_to_regex(wanted))
        return pattern
