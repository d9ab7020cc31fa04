"""The client-side bound on the request rate to GitLab: a token bucket, and the split of one rate between
the inventory reads and the job status reads.

Apart from the transport because the bound is a policy about GitLab as a whole (every thread, every reader of
one instance shares it), testable with a fake clock, while the transport only takes a token before each send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["JOB_SHARE", "TokenBucket", "split_rate"]


class TokenBucket:
    """At most `burst` requests at once, then `rate` per second, shared by every thread using the client.

    A reservation bucket: each caller takes a token (the balance may go negative) and sleeps off its own debt
    outside the lock, so concurrent callers are served in arrival order and none spins.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()

    def acquire(self) -> float:
        """Take one token, waiting if needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# Job status reads (revocation of jobs whose webhook was missed) get this share of `requests_per_second`, the
# inventory the rest: a burst of jobs seen at the gateways after a restart never delays the re-read a webhook
# asked for, and the bound on GitLab as a whole is unchanged.
JOB_SHARE = 0.25


def split_rate(rate: float) -> tuple[TokenBucket, TokenBucket]:
    """The inventory's bucket and the job status reads' bucket, whose rates add up to `rate`."""
    inventory, jobs = rate * (1 - JOB_SHARE), rate * JOB_SHARE
    return TokenBucket(inventory, burst=max(1, int(inventory))), TokenBucket(jobs, burst=max(1, int(jobs)))
