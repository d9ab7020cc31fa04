"""Errors that point a platform engineer at the exact place in the policy tree to fix."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Source:
    """Where a policy element was written: reported with every error about it."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, order=True)
class PolicyError:
    """One problem in the policy, with file, line and the dotted field path."""

    file: str
    line: int
    field: str
    message: str

    @classmethod
    def at(cls, source: Source, field: str, message: str) -> PolicyError:
        return cls(source.file, source.line, field, message)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class PolicyInvalid(Exception):
    """Raised with the errors found, so one run of `validate` shows them all (up to `MAX_ERRORS`).

    `omitted` counts errors found but not kept; `stopped` says checking stopped early, so there were more.
    """

    def __init__(self, errors: Iterable[PolicyError], omitted: int = 0, *, stopped: bool = False) -> None:
        self.errors = sorted(set(errors))
        self.omitted = omitted
        self.stopped = stopped
        super().__init__("\n".join(self.lines()))

    @property
    def total(self) -> int:
        """Errors found (shown or not): a lower bound when checking `stopped`."""
        return len(self.errors) + self.omitted

    def more(self) -> str | None:
        """The line that says errors were left out, or None when all are shown."""
        if self.stopped:
            counted = f" ({self.omitted} counted before checking stopped)" if self.omitted else ""
            return f"... and more errors not shown{counted}"
        return f"... and {self.omitted} more errors not shown" if self.omitted else None

    def lines(self, limit: int | None = None) -> list[str]:
        """The errors as text, the first `limit` of them (all kept ones by default), then the `more` line."""
        shown = self.errors if limit is None else self.errors[:limit]
        more = self.more()
        if len(shown) < len(self.errors):
            left = self.total - len(shown)
            more = f"... and {'at least ' if self.stopped else ''}{left} more errors not shown"
        return [*(str(e) for e in shown), *([more] if more else [])]


QUOTE_LIMIT = 40
"""Longest value an error message quotes: enough to recognise a typo, too short to leak a secret pasted by mistake."""


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """`repr(value)`, cut to at most `limit` characters with an ellipsis.

    Errors go to logs, `/status` and GitLab commit statuses, which more people read than the policy repository:
    a value written where it should not be (a key pasted into `backend:`) must not travel further whole.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        short = repr(value[: limit - 3] + "…")
        if len(short) <= limit:
            return short
    return text[: limit - 1] + "…"


MAX_ERRORS_PER_FILE = 100
"""Errors kept per file. One file of 4 MB could hold 2 million mistakes (a list of 2 million bad items):
collecting, sorting, logging and serving them all took 45 s and a GB. Nobody reads past the first screen."""
MAX_ERRORS = 1000
"""Errors kept per load, across all files."""


class Errors:
    """The errors of one load, kept up to `MAX_ERRORS_PER_FILE` per file and `MAX_ERRORS` in all.

    Every error is counted (`found`), so a builder can still tell whether its element had any; only the
    first ones are kept. Readers of long lists and mappings ask `full` and stop early: a file already
    showing its bound gains nothing from two million more checks (`stopped` then records that).
    """

    def __init__(self, per_file: int = MAX_ERRORS_PER_FILE, limit: int = MAX_ERRORS) -> None:
        self.kept: list[PolicyError] = []
        self.found = 0
        self.stopped = False
        self._per_file: Counter[str] = Counter()
        self._per_file_limit = per_file
        self._limit = limit

    def append(self, error: PolicyError) -> None:
        self.found += 1
        self._per_file[error.file] += 1
        if self._per_file[error.file] <= self._per_file_limit and len(self.kept) < self._limit:
            self.kept.append(error)

    def extend(self, errors: Iterable[PolicyError], omitted: int = 0, *, stopped: bool = False) -> None:
        """Adds errors collected elsewhere (a file's YAML errors), with the count of those it left out."""
        for error in errors:
            self.append(error)
        self.found += omitted
        self.stopped = self.stopped or stopped

    def full(self, file: str) -> bool:
        """True when no more errors of `file` would be kept: checking it further is wasted work."""
        return self._per_file[file] >= self._per_file_limit or len(self.kept) >= self._limit

    def stop(self) -> None:
        self.stopped = True

    @property
    def omitted(self) -> int:
        return self.found - len(self.kept)

    def __bool__(self) -> bool:
        return self.found > 0

    def __len__(self) -> int:
        return self.found

    def invalid(self) -> PolicyInvalid:
        return PolicyInvalid(self.kept, self.omitted, stopped=self.stopped)
