"""Cases run per fuzz target, so a run can say how much it tried, not only that it passed.

Each harness calls `count(target)` once per generated case; the conftest prints the table at the end of the
session (and `make fuzz` adds the atheris runs to it).
"""

from __future__ import annotations

from collections import Counter

CASES: Counter[str] = Counter()
PEAKS: dict[str, float] = {}  # the largest value seen of a measured bound (seconds, bytes)


def count(target: str) -> None:
    CASES[target] += 1


def peak(measure: str, value: float) -> None:
    PEAKS[measure] = max(value, PEAKS.get(measure, value))
