"""Jobs holding live exchanged credentials, remembered across restarts.

A job's credentials are revoked when GitLab reports the job finished. A Job Hook sent while the control plane
was down is lost (GitLab does not retry), so after a restart the control plane must ask GitLab about the jobs
that may still hold credentials, and it must know which GitLab and which project to ask: the token exchange's
own index lives in memory only. This file keeps, per job, the project, the issuer and when its last credential
expires; an entry ages out with that credential. It also lets a revocation after a restart last as long as the
job's credentials, even when raw ID tokens are not denied (`deny_id_tokens_for` 0).

Written through `controlplane.statefile` (atomic, fsynced, 0600; a corrupt file stops the start).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controlplane.statefile import (
    OffLoopWriter,
    StateFileError,
    atomic_write_json,
    malformed,
    read_json,
    report_write_failure,
)

_UNSAVED = "the job is remembered in memory only, not yet on disk"


@dataclass(frozen=True)
class LiveJob:
    job_id: str
    project_id: str
    issuer: str  # the GitLab issuer URL the job's ID token came from (its `iss`)
    until: float  # when its last credential expires (Unix time)


class LiveJobs:
    """job id → LiveJob, persisted at `path` (None: memory only, for tests and `--no-exchange`-like set-ups)."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._jobs: dict[str, LiveJob] = self._load()
        self._dirty = False  # changed since the last successful write (a failed write is owed)
        self._writer = None if path is None else OffLoopWriter(path, _UNSAVED)

    def note(self, job_id: str, project_id: str, issuer: str, until: float, *, save: bool = True) -> None:
        """A credential was issued to `job_id`, valid until `until`. The service persists it (`persist()`)
        before the credential is returned, so a crash right after cannot make it forget to ask about the job."""
        known = self._jobs.get(job_id)
        if known is not None and known.until >= until:
            if save and self._dirty:  # nothing new, but a write is owed
                self._save()
            return
        self._jobs[job_id] = LiveJob(job_id, project_id, issuer, max(until, known.until if known else until))
        self._prune_expired()
        self._changed(save)

    def forget(self, job_id: str, *, save: bool = True) -> None:
        """The job is revoked: the deny list guards it from now on, nothing more to ask GitLab."""
        if self._jobs.pop(job_id, None) is not None:
            self._changed(save)

    async def persist(self) -> None:
        """Write the jobs if they changed since the last successful write, in a worker thread."""
        if self._writer is None or not self._dirty:
            return
        self._dirty = False
        if not await self._writer.write(self._document()):
            self._dirty = True

    def _changed(self, save: bool) -> None:
        self._dirty = True
        if save:
            self._save()

    def until(self, job_id: str) -> float | None:
        job = self._jobs.get(job_id)
        return None if job is None or job.until <= self.clock() else job.until

    def jobs(self) -> list[LiveJob]:
        """The jobs whose credentials are still valid, the latest-expiring first."""
        now = self.clock()
        return sorted((j for j in self._jobs.values() if j.until > now), key=lambda j: (-j.until, j.job_id))

    def prune(self, *, save: bool = True) -> None:
        if self._prune_expired():
            self._changed(save)

    def _prune_expired(self) -> bool:
        now = self.clock()
        expired = [job for job, entry in self._jobs.items() if entry.until <= now]
        for job in expired:
            del self._jobs[job]
        return bool(expired)

    def _load(self) -> dict[str, LiveJob]:
        if self.path is None:
            return {}
        document = read_json(self.path)
        if document is None:
            return {}
        entries = document.get("jobs") if isinstance(document, dict) else None
        if not isinstance(entries, dict):
            raise malformed(self.path, 'expected an object with a "jobs" object (job id -> job)')
        return {str(job): self._entry(str(job), entry) for job, entry in entries.items()}

    def _entry(self, job_id: str, entry: Any) -> LiveJob:
        assert self.path is not None
        try:
            project, issuer, until = entry["project_id"], entry["issuer"], entry["until"]
            if not (isinstance(project, str) and isinstance(issuer, str)) or isinstance(until, bool):
                raise TypeError
            return LiveJob(job_id, project, issuer, float(until))
        except (KeyError, TypeError, ValueError):
            raise malformed(self.path, f"jobs.{job_id}: expected project_id, issuer (strings) and until") from None

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            atomic_write_json(self.path, self._document())
        except StateFileError as error:
            report_write_failure(self.path, error, _UNSAVED)
        else:
            self._dirty = False

    def _document(self) -> dict[str, Any]:
        jobs = {
            j.job_id: {"project_id": j.project_id, "issuer": j.issuer, "until": j.until} for j in self._jobs.values()
        }
        return {"version": 1, "jobs": jobs}
