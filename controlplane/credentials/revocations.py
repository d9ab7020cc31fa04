"""Jobs whose access ended: their job_id is denied fleet-wide until nothing they hold could still be valid.

A GitLab ID token stays valid until its `exp` (the job timeout: hours) even after the job finished, and an
exchanged credential until its own expiry. When GitLab reports the job finished, its job_id goes on a deny list
that every Envoy enforces (one RBAC DENY policy on the `job_id` claim, which credentials and ID tokens both
carry). An entry ages out when the last thing it guards has expired, so the list stays short.

The list is kept in the state directory, so a restart does not hand back access a finished job lost.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter, Gauge

from controlplane.admin.metrics import REGISTRY

log = logging.getLogger("controlplane.revocations")

TERMINAL_JOB_STATUSES = frozenset({"success", "failed", "canceled", "cancelled", "skipped"})

REVOCATIONS = Counter(
    "controlplane_revocations_total",
    "Jobs whose access was revoked when GitLab reported them finished.",
    registry=REGISTRY,
)
REVOKED_JOBS = Gauge("controlplane_revoked_jobs", "Job ids currently on the fleet-wide deny list.", registry=REGISTRY)


class Revocations:
    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._until: dict[str, float] = self._load()
        REVOKED_JOBS.set_function(lambda: len(self._until))

    def revoke(self, job_id: str, until: float) -> bool:
        """Deny `job_id` until `until` (Unix time). True when the deny list changed."""
        if until <= self.clock() or self._until.get(job_id, 0.0) >= until:
            return False
        first = job_id not in self._until
        self._until[job_id] = until
        self._save()
        if first:
            REVOCATIONS.inc()
        return True

    def prune(self) -> bool:
        """Drop entries whose guarded tokens have all expired. True when the list changed."""
        now = self.clock()
        expired = [job for job, until in self._until.items() if until <= now]
        for job in expired:
            del self._until[job]
        if expired:
            self._save()
        return bool(expired)

    def active(self) -> tuple[str, ...]:
        now = self.clock()
        return tuple(sorted(job for job, until in self._until.items() if until > now))

    def next_expiry(self) -> float | None:
        return min(self._until.values(), default=None)

    def status(self) -> dict[str, object]:
        return {"revoked_jobs": len(self._until), "next_expiry": self.next_expiry()}

    def _load(self) -> dict[str, float]:
        if self.path is None:
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(job): float(until) for job, until in raw["revoked"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("cannot read %s (%s): starting with an empty deny list", self.path, error)
            return {}

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".revoked-", dir=self.path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump({"version": 1, "revoked": self._until}, out, sort_keys=True)
        os.replace(tmp, self.path)
