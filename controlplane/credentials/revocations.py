"""Jobs whose access ended: their job_id is denied fleet-wide until nothing they hold could still be valid.

A GitLab ID token stays valid until its `exp` (the job timeout: hours) even after the job finished, and an
exchanged credential until its own expiry. When GitLab reports the job finished, its job_id goes on a deny list
that every Envoy enforces (one RBAC DENY policy on the `job_id` claim, which credentials and ID tokens both
carry). An entry ages out when the last thing it guards has expired, so the list stays short.

The list is kept in the state directory, so a restart does not hand back access a finished job lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from controlplane.statefile import (
    OffLoopWriter,
    StateFileError,
    atomic_write_json,
    malformed,
    read_json,
    report_write_failure,
)
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.revocations")

REVOCATIONS_FILE = "revoked-jobs.json"  # its name in the state directory

TERMINAL_JOB_STATUSES = frozenset({"success", "failed", "canceled", "cancelled", "skipped"})

REVOCATIONS = Counter(
    "controlplane_revocations_total",
    "Jobs whose access was revoked when GitLab reported them finished.",
    registry=REGISTRY,
)
_UNSAVED = "the deny list is enforced from memory, not yet on disk"
REVOKED_JOBS = Gauge("controlplane_revoked_jobs", "Job ids currently on the fleet-wide deny list.", registry=REGISTRY)


class Revocations:
    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._until: dict[str, float] = self._load()
        self._dirty = False
        self._writer = None if path is None else OffLoopWriter(path, _UNSAVED)
        REVOKED_JOBS.set_function(lambda: len(self._until))

    def revoke(self, job_id: str, until: float, *, save: bool = True) -> bool:
        """Deny `job_id` until `until` (Unix time). True when the deny list changed. With `save=False` the caller
        persists later with `persist()` (off the event loop, after pushing the denial to Envoy)."""
        if until <= self.clock() or self._until.get(job_id, 0.0) >= until:
            return False
        first = job_id not in self._until
        self._until[job_id] = until
        self._dirty = True
        if save:
            self._save()
        if first:
            REVOCATIONS.inc()
        return True

    def prune(self, *, save: bool = True) -> bool:
        """Drop entries whose guarded tokens have all expired. True when the list changed."""
        now = self.clock()
        expired = [job for job, until in self._until.items() if until <= now]
        for job in expired:
            del self._until[job]
        if expired:
            self._dirty = True
            if save:
                self._save()
        return bool(expired)

    async def persist(self) -> None:
        """Write the list if it changed since the last successful write, in a worker thread."""
        if self._writer is None or not self._dirty:
            return
        self._dirty = False
        if not await self._writer.write(self._document()):
            self._dirty = True

    def active(self) -> tuple[str, ...]:
        now = self.clock()
        return tuple(sorted(job for job, until in self._until.items() if until > now))

    def is_revoked(self, job_id: str) -> bool:
        return self._until.get(job_id, 0.0) > self.clock()

    def next_expiry(self) -> float | None:
        return min(self._until.values(), default=None)

    def status(self) -> dict[str, object]:
        return {"revoked_jobs": len(self._until), "next_expiry": self.next_expiry()}

    def _load(self) -> dict[str, float]:
        """The persisted list; {} only when there is none yet. A file that cannot be read raises
        `StateFileError`: starting with an empty list would hand access back to every finished job."""
        if self.path is None:
            return {}
        document = read_json(self.path)
        if document is None:
            return {}
        revoked = document.get("revoked") if isinstance(document, dict) else None
        if not isinstance(revoked, dict):
            raise malformed(self.path, 'expected an object with a "revoked" object (job id -> Unix time)')
        try:
            return {str(job): float(until) for job, until in revoked.items()}
        except (TypeError, ValueError):
            raise malformed(self.path, "a revocation's time is not a number") from None

    def _save(self) -> None:
        """The whole list, atomically; a failure is reported and the in-memory list stays in force."""
        if self.path is None:
            return
        try:
            atomic_write_json(self.path, self._document())
        except StateFileError as error:
            report_write_failure(self.path, error, _UNSAVED)
        else:
            self._dirty = False

    def _document(self) -> dict[str, object]:
        return {"version": 1, "revoked": dict(self._until)}
