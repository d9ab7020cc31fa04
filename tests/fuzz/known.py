"""Crashes already reported (docs/fuzzing.md, Findings), recognised so a hunting run can look past them.

`FUZZ_AVOID_KNOWN=1 make fuzz` discards the cases that hit one of these, so the search goes on to new ones.
It is never set in `make test`: there a known crash fails its harness until the product is fixed.
"""

from __future__ import annotations

import os

from hypothesis import reject

AVOID_KNOWN = os.environ.get("FUZZ_AVOID_KNOWN") == "1"


def is_known(error: BaseException) -> bool:
    """F1 deep nesting (RecursionError); F2, F3, F8 integers past Python's 4,300-digit conversion limit (loader,
    compiler, /status); F6 a JWT header whose alg is a list or object (unhashable in the exchange); F12 a URL with
    an unbalanced bracket; F14 an infinite exp."""
    if isinstance(error, RecursionError):
        return True
    if isinstance(error, ValueError) and ("4300 digits" in str(error) or "Invalid IPv6 URL" in str(error)):
        return True  # F12: urlsplit raises on an unbalanced bracket in a URL field
    if isinstance(error, OverflowError) and "infinity" in str(error):
        return True  # F14: an issuer-signed "exp": Infinity
    return isinstance(error, TypeError) and "unhashable type" in str(error)


def avoid_known(error: BaseException) -> None:
    """In a hunting run, discard the current case if `error` is a known crash; otherwise return (re-raise it)."""
    if AVOID_KNOWN and is_known(error):
        reject()
