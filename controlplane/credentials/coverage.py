"""Which finished jobs the deny list must hold, and until when (docs/revocation-coverage.md).

A deny entry matters only while some token of the job could still pass a gateway. So a finished job is listed
when (a) it obtained a credential (the exchange ledger knows until when it holds one, and its subject token's
`exp`), (b) a gateway let one of its raw ID tokens through (this replica's recent sightings, else the audit
trail any replica writes), or (c) a backend accepting raw ID tokens must cover every finished job that could reach
it (`ExchangePolicy.covers`, the default). Anything else costs the fleet nothing: no gateway accepts its tokens
without the control plane hearing of it.

`Sightings` is the in-memory half of (b): the jobs whose raw ID tokens this replica's access-log receiver saw,
with the token's `exp` when the entry carried one; it answers before the audit trail has written them, and it
remembers the jobs recorded finished but not listed, so a later sighting lists them at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_SIGHTINGS = 100_000


@dataclass(frozen=True)
class Sighting:
    """A job seen at a gateway: until when its token may still pass (None: not known, the deny window applies)."""

    token_until: float | None
    last_seen: float


class Sightings:
    """Jobs seen here recently, and finished jobs not listed: both bounded, oldest forgotten first.

    Forgetting is safe: a sighting older than `keep_for` is also in the audit trail (written within seconds), and
    a forgotten finished job is still in the ledger, which a later sighting asks (`CredentialService.job_seen`).
    """

    def __init__(
        self, *, keep_for: float, clock: Callable[[], float] = time.time, capacity: int = MAX_SIGHTINGS
    ) -> None:
        self.keep_for = keep_for
        self.clock = clock
        self.capacity = capacity
        self._seen: OrderedDict[str, Sighting] = OrderedDict()
        # job -> until when a sighting must list it (a policy change that covers it asks the ledger instead:
        # `CredentialService.policy_changed`, which every replica and a restarted one can read)
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._asked: OrderedDict[str, None] = OrderedDict()  # jobs whose ledger entry a sighting has asked about

    def saw(self, job_id: str, token_until: float | None) -> bool:
        """Record a sighting; True the first time this job is seen here (while remembered)."""
        now = self.clock()
        known = self._seen.pop(job_id, None)
        if known is not None and token_until is not None and known.token_until is not None:
            token_until = max(token_until, known.token_until)
        elif known is not None and token_until is None:
            token_until = known.token_until
        self._seen[job_id] = Sighting(token_until, now)
        _bound(self._seen, self.capacity)
        return known is None

    def seen(self, job_id: str) -> Sighting | None:
        """This replica's sighting of the job, if recent enough to matter."""
        found = self._seen.get(job_id)
        if found is None:
            return None
        horizon = self.clock() - self.keep_for
        if found.last_seen < horizon and (found.token_until is None or found.token_until <= self.clock()):
            del self._seen[job_id]
            return None
        return found

    def finished_unlisted(self, job_id: str, until: float) -> None:
        """The job finished and nothing listed it: a sighting before `until` must."""
        self._finished[job_id] = until
        self._finished.move_to_end(job_id)
        _bound(self._finished, self.capacity)

    def take_finished(self, job_id: str) -> bool:
        """True (once) when the job was recorded finished and unlisted here, and still matters."""
        found = self._finished.pop(job_id, None)
        return found is not None and found > self.clock()

    def status(self) -> dict[str, int]:
        return {"seen_jobs": len(self._seen), "finished_unlisted": len(self._finished)}

    def first_ask(self, job_id: str) -> bool:
        """True the first time (while remembered) a sighting of this job should ask the ledger."""
        if job_id in self._asked:
            return False
        self._asked[job_id] = None
        _bound(self._asked, self.capacity)
        return True

    def forget_ask(self, job_id: str) -> None:
        """The ask failed: the next sighting asks again."""
        self._asked.pop(job_id, None)


def _bound(entries: OrderedDict[str, Any], limit: int) -> None:
    while len(entries) > limit:
        entries.popitem(last=False)
