"""Jobs that finished while their Job Hook was missed are found by asking GitLab, and revoked as the hook would.

GitLab sends a Job Hook once and never retries it. A control plane that was down, or a webhook path that was
broken, misses it, and the job's credentials (and ID tokens) keep working until they expire. So the control
plane asks GitLab itself (`GET /projects/:id/jobs/:job_id`) about the jobs that could still use access:

- jobs holding live exchanged credentials (the exchange's ledger, `JobLedger.jobs_with_credentials`, which
  survives restarts and names each job's project and GitLab), first;
- jobs seen at a gateway within `lookback` (the audit trail), most recent first, which covers raw ID tokens.

Jobs already on the deny list are not asked about. A job GitLab reports in a finished status (`success`,
`failed`, `canceled`, `skipped`) is revoked exactly as a Job Hook would revoke it; a running one is asked about
again at the next sweep; one GitLab does not know (404: deleted, or the token cannot see its project) is left
alone and counted, since revoking on a guess could cut off running jobs the token cannot read.

When a sweep runs (a "gap in webhook delivery" cannot be observed directly, so every moment one may have ended
is covered):

- at start, once GitLab's issuers are followed (the control plane itself was the gap);
- when GitLab answers again after it was unreachable (`request`, from the inventory watchers);
- every `interval` seconds (default 300), a low-rate sweep for gaps nothing else reveals (a hook that was
  disabled, a proxy in between dropping deliveries);
- a sweep GitLab could not finish is retried after `retry` seconds, doubling up to `interval`.

Each sweep asks about at most `max_jobs` jobs, one request at a time, through the issuer's GitLab client, so it
shares that client's rate bound (`requests_per_second`) and retry policy with the inventory reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

from controlplane.credentials.exchange_store import ExchangeStoreError, LiveJob
from controlplane.credentials.revocations import TERMINAL_JOB_STATUSES
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.retry import Backoff
from controlplane.sources.gitlab_client import GitLabRefused, GitLabUnavailable
from controlplane.store.pool import StoreUnavailable
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.credentials.recovery")

DEFAULT_INTERVAL = 300.0
DEFAULT_RETRY = 15.0
DEFAULT_MAX_JOBS = 1000

SWEEPS = Counter(
    "controlplane_job_recovery_sweeps_total",
    "Sweeps asking GitLab about jobs whose Job Hook may have been missed, by reason and result.",
    ["reason", "result"],
    registry=REGISTRY,
)
CHECKS = Counter(
    "controlplane_job_recovery_checks_total",
    "Jobs asked about, by answer: not_finished, finished, not_found (404), no_gitlab (no API for its issuer), error.",
    ["result"],
    registry=REGISTRY,
)
REVOKED = Counter(
    "controlplane_job_recovery_revocations_total",
    "Jobs revoked because GitLab reported them finished and no Job Hook had said so.",
    registry=REGISTRY,
)
LAST_SWEEP = Gauge(
    "controlplane_job_recovery_last_sweep_timestamp_seconds",
    "When the last complete sweep ended.",
    registry=REGISTRY,
)

# (project_id, job_id) -> the job's status, None when GitLab does not know it; blocking; raises GitLabUnavailable.
StatusReader = Callable[[str, str], "str | None"]


@dataclass(frozen=True)
class Candidate:
    job_id: str
    project_id: str
    issuer: str | None  # the GitLab issuer URL; None: not known (a credential seen at a gateway)


@dataclass
class SweepResult:
    asked: int = 0
    finished: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    complete: bool = True


def candidates(
    live: Iterable[LiveJob],
    seen: Iterable[tuple[str, str, str | None, float]],
    revoked: Collection[str],
    limit: int,
) -> list[Candidate]:
    """Live-credential jobs first, then jobs seen at a gateway by recency; each job once, none already revoked.
    A job without a project (its token had no `project_id`) cannot be asked about."""
    out: dict[str, Candidate] = {}
    for job in live:
        if job.project_id is not None and job.job_id not in revoked and job.job_id not in out:
            out[job.job_id] = Candidate(job.job_id, job.project_id, job.issuer)
    for job_id, project_id, issuer, _last in seen:
        if job_id not in revoked and job_id not in out:
            out[job_id] = Candidate(job_id, project_id, None if issuer in (None, CREDENTIAL_ISSUER) else issuer)
    return list(out.values())[:limit]


class JobRecovery:
    def __init__(
        self,
        *,
        live: Callable[[int], Awaitable[Iterable[LiveJob]]],
        seen: Callable[[float, int], list[tuple[str, str, str | None, float]]],
        revoked: Callable[[], Collection[str]],
        reader_for: Callable[[str | None], StatusReader | None],
        revoke: Callable[[str, str], Awaitable[bool]],
        lookback: float,
        interval: float = DEFAULT_INTERVAL,
        retry: float = DEFAULT_RETRY,
        max_jobs: int = DEFAULT_MAX_JOBS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._live = live
        self._seen = seen
        self._revoked = revoked
        self._reader_for = reader_for
        self._revoke = revoke
        self.lookback = lookback
        self.interval = interval
        self.retry = retry
        self._backoff = Backoff(base_seconds=retry, cap_seconds=interval, jitter=False)
        self.max_jobs = max_jobs
        self._clock = clock
        self._wake = asyncio.Event()
        self._reasons: list[str] = []
        self.last: SweepResult | None = None

    def request(self, reason: str) -> None:
        """Sweep as soon as possible (e.g. GitLab answers again after an outage)."""
        self._reasons.append(reason)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep at start, then on request, periodically, and again sooner after an incomplete sweep."""
        reason, failures = "start", 0
        while not stop.is_set():
            result = await self._sweep_safely(reason, stop)
            failures = 0 if result.complete else failures + 1
            delay = self._backoff.delay(failures - 1) if failures else self.interval
            reason = await self._wait(stop, delay)

    async def _wait(self, stop: asyncio.Event, delay: float) -> str:
        if not self._reasons:
            self._wake.clear()
            waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
            _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
        reasons, self._reasons = self._reasons, []
        return reasons[0] if reasons else "periodic"

    async def _sweep_safely(self, reason: str, stop: asyncio.Event) -> SweepResult:
        try:
            return await self.sweep(reason, stop)
        except Exception:  # a bug here must not stop revocation by webhook, nor later sweeps
            log.exception("job recovery sweep (%s) failed", reason)
            SWEEPS.labels(reason, "error").inc()
            return SweepResult(complete=False)

    async def sweep(self, reason: str, stop: asyncio.Event | None = None) -> SweepResult:
        """Ask GitLab about every candidate job; revoke the finished ones. Returns what happened."""
        result = SweepResult()
        seen = await self._seen_jobs(self._clock() - self.lookback, result)
        revoked = frozenset(self._revoked())
        jobs = candidates(await self._live_jobs(len(revoked), result), seen, revoked, self.max_jobs)
        unreachable: set[StatusReader] = set()
        for job in jobs:
            if stop is not None and stop.is_set():
                result.complete = False
                break
            reader = self._reader_for(job.issuer)
            if reader is None:
                CHECKS.labels("no_gitlab").inc()
                continue
            if reader in unreachable:
                continue
            status = await self._status(reader, job, result, unreachable)
            if status is not None and status in TERMINAL_JOB_STATUSES:
                result.finished.append(job.job_id)
                if await self._revoke(job.job_id, status):
                    result.revoked.append(job.job_id)
                    REVOKED.inc()
                    log.warning(
                        "job %s (project %s) is %s in GitLab but no Job Hook said so: revoked (%s sweep)",
                        job.job_id,
                        job.project_id,
                        status,
                        reason,
                    )
        SWEEPS.labels(reason, "complete" if result.complete else "incomplete").inc()
        if result.complete:
            LAST_SWEEP.set(self._clock())
        log.info(
            "job recovery (%s): asked GitLab about %d job(s), %d finished, %d revoked%s",
            reason,
            result.asked,
            len(result.finished),
            len(result.revoked),
            "" if result.complete else "; incomplete, retried",
        )
        self.last = result
        return result

    async def _seen_jobs(self, since: float, result: SweepResult) -> list[tuple[str, str, str | None, float]]:
        """The audit trail's recent jobs. Unreadable (its PostgreSQL away): the jobs holding credentials are
        still asked about, and the sweep, incomplete, is retried sooner."""
        try:
            return await asyncio.to_thread(self._seen, since, self.max_jobs)
        except StoreUnavailable as error:
            log.error("job recovery: %s; jobs seen at gateways are asked about at the next sweep", error)
            result.complete = False
            return []

    async def _live_jobs(self, revoked: int, result: SweepResult) -> list[LiveJob]:
        """The ledger keeps a revoked job until its credentials expire, so up to `revoked` more are read: they
        must not crowd the others out of the bound. Unreadable: the gateway's jobs are still asked about."""
        try:
            return list(await self._live(self.max_jobs + revoked))
        except ExchangeStoreError as error:
            log.error("job recovery: %s; jobs holding credentials are asked about at the next sweep", error)
            result.complete = False
            return []

    async def _status(
        self, reader: StatusReader, job: Candidate, result: SweepResult, unreachable: set[StatusReader]
    ) -> str | None:
        result.asked += 1
        try:
            status = await asyncio.to_thread(reader, job.project_id, job.job_id)
        except GitLabRefused as refused:  # this project (403), or the token: the other jobs may still be answered
            CHECKS.labels("error").inc()
            log.warning("job recovery: GitLab refused job %s of project %s: %s", job.job_id, job.project_id, refused)
            result.complete = False
            return None
        except GitLabUnavailable as error:  # every retry spent: the rest of this GitLab waits for the next sweep
            CHECKS.labels("error").inc()
            log.warning("job recovery: GitLab unavailable (%s); retrying later", error)
            unreachable.add(reader)
            result.complete = False
            return None
        if status is None:
            CHECKS.labels("not_found").inc()
        else:
            CHECKS.labels("finished" if status in TERMINAL_JOB_STATUSES else "not_finished").inc()
        return status
