"""Jobs seen at a gateway with a raw ID token minted before a gap in webhook delivery: ask GitLab at once.

On a backend that accepts raw GitLab ID tokens, Envoy decides alone: a job that finished while its Job Hook was
missed (the control plane was down) and that no sweep knew keeps passing until the periodic sweep. Envoy cannot
ask GitLab, but the control plane hears of every request through the access-log service, a fraction of a second
later. So the first request of such a job (its token's `iat` before the end of the latest gap, plus the issuer's
clock skew, as `MissedHooks` judges exchanges) starts a check through the exchange's own path
(`CredentialService.check_job`: one GitLab request per job however many callers wait, the issuer's client and its
rate bound, `revoke_finished` when the job is over). A token minted after the gap costs a dictionary lookup.

Bounded whatever a gateway reports: at most `max_pending` checks wait at once (more are dropped and counted;
the job was recorded in the audit trail, so the periodic sweep asks about it), one per job, and a job whose check
did not settle it (GitLab unreachable, 404, still running while a gap is open) is not asked again from here for
`retry_after` seconds (at most `max_backoff` such jobs remembered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from controlplane.credentials import metrics
from controlplane.credentials.exchange import ExchangePolicy, JobToVerify, MissedHooks

log = logging.getLogger("controlplane.credentials")

MAX_PENDING = 1_000
RETRY_AFTER = 60.0
MAX_BACKOFF = 10_000


class GatewayJobChecks:
    """`JobSeen` for the audit receiver (`controlplane.audit.als`): call it on the event loop; it only enqueues."""

    def __init__(
        self,
        *,
        policy: Callable[[], ExchangePolicy | None],
        missed_hooks: MissedHooks,
        revoked: Callable[[str], bool],
        check: Callable[[JobToVerify], Awaitable[str]],
        clock: Callable[[], float] = time.time,
        max_pending: int = MAX_PENDING,
        retry_after: float = RETRY_AFTER,
        max_backoff: int = MAX_BACKOFF,
    ) -> None:
        """`check` asks GitLab and acts on the answer, returning its metric label (`CredentialService.check_job`)."""
        self._policy = policy
        self._missed_hooks = missed_hooks
        self._revoked = revoked
        self._check = check
        self._clock = clock
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.max_backoff = max_backoff
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._retry_at: OrderedDict[str, float] = OrderedDict()
        self._closed = False

    def __call__(
        self, *, job_id: str, project_id: str | None, issuer: str, issued_at: float, expires_at: float | None
    ) -> None:
        if self._closed or job_id in self._pending or project_id is None:
            return
        policy = self._policy()
        found = None if policy is None else policy.issuer_by_url(issuer)
        if found is None or not self._missed_hooks.needs_check(job_id, found.name, issued_at, found.clock_skew):
            return
        now = self._clock()
        if self._backing_off(job_id, now) or self._revoked(job_id):
            return
        if len(self._pending) >= self.max_pending:
            metrics.count_gateway_job_check("dropped")
            return
        until = (now + self.retry_after if expires_at is None else expires_at) + found.clock_skew
        job = JobToVerify(job_id, project_id, found.name, found.url, until)
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._pending[job_id] = task
        task.add_done_callback(lambda _: self._pending.pop(job_id, None))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """Cancel the checks still waiting and take no more (their jobs are asked about by the next start's sweep)."""
        self._closed = True
        tasks = tuple(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: JobToVerify) -> None:
        try:
            result = await self._check(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("checking job %s seen at a gateway failed", job.job_id)
            result = "error"
        metrics.count_gateway_job_check(result)
        if result != "finished":
            self._retry_at[job.job_id] = self._clock() + self.retry_after
            self._retry_at.move_to_end(job.job_id)
            while len(self._retry_at) > self.max_backoff:
                self._retry_at.popitem(last=False)

    def _backing_off(self, job_id: str, now: float) -> bool:
        retry_at = self._retry_at.get(job_id)
        if retry_at is None:
            return False
        if retry_at <= now:
            del self._retry_at[job_id]
            return False
        return True
