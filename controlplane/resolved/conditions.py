"""What a subject requires of a token's claims, once its paths became ids and GitLab's state was applied.

Every claim is matched as a string (GitLab sends `"42"` and `"true"`). Globs are anchored and `*` never
crosses `/`. Both the RBAC compiler and the token exchange read these, so they can never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple


def is_glob(value: str) -> bool:
    return "*" in value or "?" in value


def glob_to_regex(glob: str) -> str:
    """`*` is any run of characters except `/`, `?` one such character; everything else is literal."""
    parts = []
    for char in glob:
        if char == "*":
            parts.append("[^/]*")
        elif char == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(char))
    return "^" + "".join(parts) + "$"


class Condition(NamedTuple):
    """claim ∈ values, or (negated) claim ∉ values. `listy` claims may be a string or a list of strings.

    A NamedTuple, not a dataclass: tens of thousands are made and hashed per compile of a large policy.
    """

    claim: str
    values: tuple[str, ...]
    negated: bool = False
    listy: bool = False


class ResolvedSubject(NamedTuple):
    """All `conditions`, and (when there are any) all of one of the `alternatives`."""

    conditions: tuple[Condition, ...]
    alternatives: tuple[tuple[Condition, ...], ...] = ()

    @classmethod
    def of(cls, conditions: Sequence[Condition], alternatives: Sequence[Sequence[Condition]] = ()) -> ResolvedSubject:
        return cls(tuple(conditions), tuple(tuple(alt) for alt in alternatives))
