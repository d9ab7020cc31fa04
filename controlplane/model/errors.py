"""Errors that point a platform engineer at the exact place in the policy tree to fix."""

from __future__ import annotations

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
    """Raised with every error found, so one run of `validate` shows them all."""

    def __init__(self, errors: list[PolicyError]) -> None:
        self.errors = sorted(set(errors))
        super().__init__("\n".join(str(e) for e in self.errors))


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
