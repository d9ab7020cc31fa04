"""The one retry policy: how long to wait before trying again, and how many times.

Every loop that talks to something that can be down (the GitLab API, an issuer's JWKS, a reconcile that failed,
a job-recovery sweep GitLab could not finish) waits an exponentially growing, capped delay; the loops differ
only in their numbers, in whether the wait is jittered and in how they sleep (a thread, an event loop, a
scheduled wake-up), so the delays are computed here and the sleeping stays with each caller.

A leaf: no I/O, no clock; only the jitter draws from `random`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

__all__ = ["Backoff", "RetryPolicy", "retry_after_seconds"]

# 2.0 ** 1024 raises OverflowError; from far below that every sane cap has long been reached.
_MAX_EXPONENT = 1023


@dataclass(frozen=True)
class Backoff:
    """Retry n (counted from 0) waits min(cap, base * 2**n), or with `jitter` between half of that and all of it.

    The jitter spreads the retries of several control planes (or threads) coming back to a recovering service at
    once; without it the delays are exact, for loops whose callers are few and whose tests count the waits.
    """

    base_seconds: float
    cap_seconds: float
    jitter: bool = True

    def delay(self, attempt: int) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** min(attempt, _MAX_EXPONENT))
        return ceiling * random.uniform(0.5, 1.0) if self.jitter else ceiling


@dataclass(frozen=True)
class RetryPolicy:
    """At most `max_retries` retries after the first attempt, each after `backoff.delay(retry number)`."""

    max_retries: int
    backoff: Backoff

    def exhausted(self, attempt: int) -> bool:
        """True when attempt number `attempt` (from 0) failed and no retry is left."""
        return attempt >= self.max_retries


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """The server's wait hint on a 429: `Retry-After` (seconds or an HTTP date), else `RateLimit-Reset` (unix
    time, GitLab's). None when there is none or it cannot be read: the caller's backoff applies."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = headers.get("RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            pass
    return None
