"""Jobs whose access ended: their job_id is denied fleet-wide until nothing they hold could still be valid.

A GitLab ID token stays valid until its `exp` (the job timeout: hours) even after the job finished, and an
exchanged credential until its own expiry. When GitLab reports the job finished, its job_id goes on a deny list
that every Envoy enforces (one RBAC DENY policy on the `job_id` claim, which credentials and ID tokens both
carry). An entry ages out when the last thing it guards has expired, so the list stays short.

`Revocations` is this replica's view of the list, in memory, because it is read synchronously on hot paths
(every compile, every gateway check). It is fed by a `RevocationStore` (revocation_store.py): the state
directory's file, or PostgreSQL shared by every replica. Loaded at start (unreadable: the start fails, never an
empty list); a revocation is enforced here at once and written through afterwards; with PostgreSQL, what other
replicas revoke arrives through `refresh()` (the change feed).

The list is held in two tiers, each ECDS filter configurations on every gateway (docs/revocation-at-scale.md):
a short list of recent revocations, and 16 sealed buckets (`revocation_bucket`) holding the rest. A revocation
joins the recent list, so what it re-sends to every Envoy is set by how many jobs ended lately, never by how many
are listed. The recent list is sealed into the buckets (each id to its own) when the clock passes a multiple of
`EXPIRY_QUANTUM`, or at once when it would hold more than `RECENT_LIMIT` ids. A seal makes before it breaks: the
ids join their buckets first and leave the recent list `SEAL_SETTLE` seconds later, in a push of its own, so no
Envoy ever holds a configuration where neither denies them. Buckets no id joined or left are
handed to the compiler as the same objects, so nothing sorts or encodes the whole list per revocation. Entries
leave the list at the same quantized times: every replica holding the same entries lists the same ids, and
expiry costs one push per changed bucket per quantum, not one per expiring job. (`is_revoked` stays exact.)

When the store cannot be written (PostgreSQL away, a full disk) nothing waits: the revocation is in force on this
replica's Envoys, and kept in a bounded outbox, retried with backoff until written. Past `OUTBOX_LIMIT` the
entry that expires first leaves the outbox (still enforced here, never shared): counted, logged and in /status.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from controlplane.credentials.revocation_store import (
    REVOCATIONS_FILE,
    FileRevocationStore,
    RevocationStore,
    RevocationStoreError,
)
from controlplane.model.credentials import REVOCATION_BUCKETS, Buckets, revocation_bucket
from controlplane.retry import Backoff
from controlplane.store.changes import RESYNC
from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog

__all__ = [
    "EXPIRY_QUANTUM",
    "OUTBOX_LIMIT",
    "RECENT_LIMIT",
    "REVOCATIONS_FILE",
    "SEAL_SETTLE",
    "TERMINAL_JOB_STATUSES",
    "Revocations",
]

log = logging.getLogger("controlplane.revocations")

TERMINAL_JOB_STATUSES = frozenset({"success", "failed", "canceled", "cancelled", "skipped"})
# Revocations not yet written to the store, at most. 10,000 job ids is under 1 MB of memory and more jobs than a
# large GitLab finishes in an hour of store outage; past it the soonest-expiring one is dropped from the outbox.
OUTBOX_LIMIT = 10_000
RETRY = Backoff(0.5, 30.0)  # between attempts to write the outbox while the store fails
# Expired entries leave the list, and recent ones are sealed into their buckets, when the clock passes a multiple
# of this many seconds (`horizon`).
EXPIRY_QUANTUM = 300.0
# The recent list is sealed early past this many ids: 400 ten-digit ids spread over as many thousand-blocks are a
# 4.5 kB configuration (consecutive ones 0.5 kB). Sealed ids settle (`SEAL_SETTLE`) each on their own seal's time:
# the recent list holds at most this many plus the ids of the last SEAL_SETTLE seconds (twice it, 9 kB, unless
# more than 400 jobs end within 5 s), however many jobs are listed.
RECENT_LIMIT = 400
# Sealed ids stay in the recent list this long after they joined their buckets (the push that carried them has
# reached every connected Envoy long before: the fleet ACKs in well under a second).
SEAL_SETTLE = 5.0


def _endless_if_nan(until: float) -> float:
    """A NaN end (a hostile store row) would be neither denied (`is_revoked`) nor ever pruned, while its bucket
    lists it: taken as endless instead, as the PostgreSQL store does (fail closed)."""
    return math.inf if math.isnan(until) else until


def horizon(now: float) -> float:
    """Entries until this time have left the list: `now` rounded down to EXPIRY_QUANTUM, alike on every replica."""
    return math.floor(now / EXPIRY_QUANTUM) * EXPIRY_QUANTUM


REVOCATIONS = Counter(
    "controlplane_revocations_total",
    "Jobs whose access was revoked when GitLab reported them finished.",
    registry=REGISTRY,
)
REVOKED_JOBS = Gauge("controlplane_revoked_jobs", "Job ids currently on the fleet-wide deny list.", registry=REGISTRY)
PENDING = Gauge(
    "controlplane_revocations_pending",
    "Revocations enforced by this replica but not yet written to the store (its outbox).",
    registry=REGISTRY,
)
UNSHARED = Counter(
    "controlplane_revocations_unshared_total",
    "Revocations dropped from a full outbox: still enforced by this replica, never written to the store.",
    registry=REGISTRY,
)
STORE_FAILURES = Counter(
    "controlplane_revocation_store_failures_total",
    "Failed reads and writes of the deny list's store (each one is retried).",
    registry=REGISTRY,
)


class Revocations:
    def __init__(
        self,
        store: RevocationStore | Path | None,
        *,
        clock: Callable[[], float] = time.time,
        is_leader: Callable[[], bool] = lambda: True,
        outbox_limit: int = OUTBOX_LIMIT,
        retry: Backoff = RETRY,
        recent_limit: int = RECENT_LIMIT,
        settle_on_publication: bool = False,
    ) -> None:
        """A path (or None: memory only) is the state directory's file, read now: a file that cannot be read
        raises `StateFileError` here. Any other store is read by `await open()`. `is_leader`: whether this
        replica prunes the shared store (expired entries are ignored by every reader anyway).
        `settle_on_publication`: sealed ids settle SEAL_SETTLE after `published()` says a push holds their seal
        (CredentialService), not after the seal itself (a compile waiting longer than that for its turn would
        otherwise carry the seal and the settle in one push)."""
        self.clock = clock
        self.is_leader = is_leader
        self.outbox_limit = outbox_limit
        self.retry = retry
        self.recent_limit = recent_limit
        self.settle_on_publication = settle_on_publication
        if store is None or isinstance(store, Path):
            file = FileRevocationStore(store, clock=clock)
            self._until: dict[str, float] = {job: _endless_if_nan(until) for job, until in file.read().items()}
            self._loaded = True
            self.store: RevocationStore = file
        else:
            self._until, self._loaded, self.store = {}, False, store
        # The same entries: sealed by bucket, and each bucket's sorted ids (None: to sort again, after a change);
        # and the recent ones, since the quantum `_recent_quantum` (what came with the store is sealed).
        self._buckets: list[dict[str, float]] = [{} for _ in range(REVOCATION_BUCKETS)]
        self._sorted: list[tuple[str, ...] | None] = [None] * REVOCATION_BUCKETS
        self._all: Buckets | None = None
        self._recent: dict[str, float] = {}
        self._recent_sorted: tuple[str, ...] | None = ()
        self._recent_quantum = 0.0
        # Sealed, and still in the recent list until the time each is mapped to (in the order of their seals).
        self._settling: dict[str, float] = {}
        self._seals = 0  # how many seals were made
        self._unpublished: dict[str, int] = {}  # settling ids whose seal (its number) no push is known to hold
        for job, until in self._until.items():
            self._buckets[revocation_bucket(job)][job] = until
        self._outbox: dict[str, float] = {}
        self._cursor = 0
        self._prune_due = False
        self._failures = 0  # consecutive failed writes
        self._retry_at: float | None = None
        self._last_error: str | None = None
        self._unshared = 0
        self._overflow_log = RateLimitedLog(log, burst=5, interval=60.0)
        self._failure_log = RateLimitedLog(log, burst=3, interval=60.0)
        REVOKED_JOBS.set_function(lambda: len(self._until))
        PENDING.set_function(lambda: len(self._outbox))

    async def open(self) -> None:
        """Load the whole list (once); the store's error propagates: fail closed, as an unreadable file."""
        if self._loaded:
            return
        await self.store.open()
        entries, self._cursor = await self.store.changes(0)
        for job, until in entries.items():
            self._set(job, max(until, self._until.get(job, 0.0)), recent=False)
        self._loaded = True

    def revoke(self, job_id: str, until: float) -> bool:
        """Deny `job_id` until `until` (Unix time), here at once; True when the deny list changed. Written to the
        store by `persist()` (after the caller pushed the denial to Envoy)."""
        if until <= self.clock() or self._until.get(job_id, 0.0) >= until:
            return False
        first = job_id not in self._until
        self._set(job_id, until)
        self._queue(job_id, until)
        if first:
            REVOCATIONS.inc()
        return True

    def prune(self) -> bool:
        """Drop entries whose guarded tokens have all expired by the quantized `horizon` from this view (the store
        is pruned by `persist()`, on the leader), and seal the recent list if a quantum began since its first id.
        True when what the compiler is handed changed."""
        now = self.clock()
        cutoff = horizon(now)
        expired = [job for job, until in self._until.items() if until <= cutoff]
        for job in expired:
            self._drop(job)
            self._outbox.pop(job, None)
        if expired:
            self._prune_due = True
        settled = self._settle(now)
        sealed = bool(self._recent) and cutoff > self._recent_quantum
        if sealed:
            self._seal()
        return bool(expired) or settled or sealed

    async def persist(self, *, now: bool = False) -> bool:
        """Write the outbox to the store, unless a failed write's backoff has not passed (`now`: try anyway, e.g.
        the store just came back); then prune the store if due and this replica leads. True when nothing is
        left to write."""
        if self._outbox and (now or self._retry_at is None or self.clock() >= self._retry_at):
            batch = dict(self._outbox)
            try:
                await self.store.save(batch)
            except RevocationStoreError as error:
                self._failed(error, f"{len(batch)} revocation(s) not written")
                return False
            for job, until in batch.items():
                if self._outbox.get(job) == until:
                    del self._outbox[job]
            self._recovered()
        if self._prune_due and self.is_leader():
            try:
                await self.store.prune()
            except RevocationStoreError as error:
                self._failed(error, "expired revocations not pruned")
            else:
                self._prune_due = False
        return not self._outbox

    async def refresh(self, payload: str = RESYNC) -> bool:
        """Take in what other replicas revoked: entries written after the last one seen, or all of them on a
        resync (`""`: after the change feed reconnected). True when a job became denied here, so the caller
        recompiles. A store error propagates (the feed logs it; the next notification reads again)."""
        since = 0 if payload == RESYNC else self._cursor
        entries, cursor = await self.store.changes(since)
        self._cursor = max(self._cursor, cursor)
        now = self.clock()
        added = False
        for job, until in entries.items():
            if until > self._until.get(job, 0.0) and until > now:
                added = added or self._until.get(job, 0.0) <= now
                self._set(job, until)
        return added

    def active(self) -> tuple[str, ...]:
        now = self.clock()
        return tuple(sorted(job for job, until in self._until.items() if until > now))

    def buckets(self) -> Buckets:
        """The sealed ids by bucket, for the compiler: unchanged buckets (and, with no change, the whole) are the
        same objects as last time. Expired entries stay until `prune()` at the next quantum."""
        if self._all is None:
            self._all = tuple(self._bucket(index) for index in range(REVOCATION_BUCKETS))
        return self._all

    def recent(self) -> tuple[str, ...]:
        """The ids listed since the last seal, sorted (the same object until one joins or leaves)."""
        if self._recent_sorted is None:
            self._recent_sorted = tuple(sorted({*self._recent, *self._settling}))
        return self._recent_sorted

    def _bucket(self, index: int) -> tuple[str, ...]:
        cached = self._sorted[index]
        if cached is None:
            cached = self._sorted[index] = tuple(sorted(self._buckets[index]))
        return cached

    def is_revoked(self, job_id: str) -> bool:
        return self._until.get(job_id, 0.0) > self.clock()

    def leaves_at(self, job_id: str) -> float | None:
        """When `job_id` leaves the list: the quantum boundary at or after its entry's end (None: not listed, or
        never: a hostile store row's endless entry)."""
        until = self._until.get(job_id)
        return None if until is None or math.isinf(until) else math.ceil(until / EXPIRY_QUANTUM) * EXPIRY_QUANTUM

    def next_expiry(self) -> float | None:
        """When `prune()` next has something to do: the quantum boundary at or after the earliest expiry, or the
        one that seals the recent list."""
        due = [self._recent_quantum + EXPIRY_QUANTUM] if self._recent else []
        if (settles := self.settles_at()) is not None:
            due.append(settles)
        if self._until and (first := min(self._until.values())) < math.inf:  # endless entries never leave
            due.append(math.ceil(first / EXPIRY_QUANTUM) * EXPIRY_QUANTUM)
        return min(due, default=None)

    def settles_at(self) -> float | None:
        """When the earliest sealed ids leave the recent list (None: none settling, or none published yet)."""
        settles = min(self._settling.values(), default=math.inf)
        return None if math.isinf(settles) else settles

    def seals(self) -> int:
        """How many seals were made: what a caller about to push passes to `published()` once it has."""
        return self._seals

    def published(self, seals: int) -> bool:
        """A push of inputs read after the first `seals` seals reached the xDS server: their ids settle SEAL_SETTLE
        from now (with `settle_on_publication`). True when some ids got a settle time."""
        settle_at = self.clock() + SEAL_SETTLE
        done = [job for job, seal in self._unpublished.items() if seal <= seals]
        for job in done:
            del self._unpublished[job]
            self._settling[job] = settle_at
        return bool(done)

    def retry_at(self) -> float | None:
        """When the outbox is next written (None: nothing waits)."""
        return self._retry_at if self._outbox else None

    def status(self) -> dict[str, object]:
        return {
            "revoked_jobs": len(self._until),
            "revoked_recently": len(self._recent) + len(self._settling),
            "next_expiry": self.next_expiry(),
            "revocations_store": {
                **self.store.status(),
                "healthy": self._failures == 0,
                "pending": len(self._outbox),
                "outbox_limit": self.outbox_limit,
                "unshared": self._unshared,
                "last_error": self._last_error,
            },
        }

    def _set(self, job_id: str, until: float, *, recent: bool = True) -> None:
        """A new id joins the recent list (`recent`), or its bucket at once (what a start loads); a listed one
        only has its time extended, where it is. NaN (a hostile store row) is endless: denied, never expiring."""
        until = _endless_if_nan(until)
        self._until[job_id] = until
        if job_id in self._recent:
            self._recent[job_id] = until
            return
        index = revocation_bucket(job_id)
        bucket = self._buckets[index]
        if job_id in bucket or not recent:
            if job_id not in bucket:
                self._sorted[index] = self._all = None
            bucket[job_id] = until
            return
        if not self._recent:
            self._recent_quantum = horizon(self.clock())
        self._recent_sorted = None
        self._recent[job_id] = until
        if len(self._recent) > self.recent_limit:
            self._seal()

    def _seal(self) -> None:
        """Each recent id into its bucket (the buckets they join change once); they leave the recent list only
        once they have settled there (`prune`), so the push that empties it comes after the one that fills them.
        Each seal's ids settle on their own time: a later seal never holds back an earlier one's (a burst of limit
        seals would otherwise keep every id of the burst in the recent list until it ended)."""
        self._seals += 1
        settle_at = math.inf if self.settle_on_publication else self.clock() + SEAL_SETTLE
        for job, until in self._recent.items():
            index = revocation_bucket(job)
            self._buckets[index][job] = until
            self._sorted[index] = self._all = None
            self._settling[job] = settle_at
            if self.settle_on_publication:
                self._unpublished[job] = self._seals
        self._recent.clear()

    def _settle(self, now: float) -> bool:
        """The sealed ids whose settle time came leave the recent list; True when any did."""
        due = [job for job, settle_at in self._settling.items() if settle_at <= now]
        for job in due:
            del self._settling[job]
        if due:
            self._recent_sorted = None
        return bool(due)

    def _drop(self, job_id: str) -> None:
        del self._until[job_id]
        if self._recent.pop(job_id, None) is not None:
            self._recent_sorted = None
            return
        self._unpublished.pop(job_id, None)
        if self._settling.pop(job_id, None) is not None:
            self._recent_sorted = None
        index = revocation_bucket(job_id)
        del self._buckets[index][job_id]
        self._sorted[index] = self._all = None

    def _queue(self, job_id: str, until: float) -> None:
        """Into the bounded outbox; when full, the entry expiring first leaves it (still enforced here)."""
        self._outbox[job_id] = until
        if len(self._outbox) <= self.outbox_limit:
            return
        dropped = min(self._outbox, key=lambda job: self._outbox[job])
        del self._outbox[dropped]
        self._unshared += 1
        UNSHARED.inc()
        self._overflow_log.log(
            logging.ERROR,
            "revocation outbox full (%d): job %s stays denied by this replica only, other replicas will not "
            "learn of it from this one",
            self.outbox_limit,
            dropped,
            key="overflow",
        )

    def _failed(self, error: RevocationStoreError, what: str) -> None:
        STORE_FAILURES.inc()
        self._last_error = str(error)
        delay = self.retry.delay(self._failures)
        self._failures += 1
        self._retry_at = self.clock() + delay
        self._failure_log.log(
            logging.ERROR,
            "%s: %s; enforced by this replica meanwhile, retrying in %.1fs",
            error,
            what,
            delay,
            key="failed",
        )

    def _recovered(self) -> None:
        if self._failures:
            log.info("deny list store reachable again: the outbox is written")
        self._failures, self._retry_at, self._last_error = 0, None, None
