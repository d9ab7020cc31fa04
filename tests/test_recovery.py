"""Missed Job Hooks: the jobs that could still use access are asked about in GitLab, finished ones revoked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path

from controlplane.credentials.exchange_store import ExchangeStoreError, LiveJob, MemoryExchangeStore
from controlplane.credentials.recovery import Candidate, JobRecovery, StatusReader, candidates
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.model.inventory import Inventory
from controlplane.runtime.gitlab_link import GitLabLink
from controlplane.sources.gitlab_client import GitLabRefused, GitLabUnavailable
from controlplane.store.pool import StoreUnavailable
from controlplane.telemetry.metrics import REGISTRY
from tests.compiled import policy_of
from tests.support.policy_parts import TWO_GITLABS
from tests.support.ports import eventually

GITLAB = "https://gitlab.example.com"
OTHER = "https://gitlab.other.example"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class GitLab:
    """Job statuses by (project, job); `down` makes every read fail as the transport does after its retries."""

    def __init__(self, jobs: dict[tuple[str, str], str] | None = None) -> None:
        self.jobs = dict(jobs or {})
        self.down = False
        self.refused: set[str] = set()
        self.asked: list[tuple[str, str]] = []

    def status(self, project_id: str, job_id: str) -> str | None:
        self.asked.append((project_id, job_id))
        if self.down:
            raise GitLabUnavailable("GitLab unavailable: GET /projects/:id/jobs/:id: HTTP 503 after 6 attempts")
        if project_id in self.refused:
            raise GitLabRefused("GitLab answered HTTP 403: 403 Forbidden")
        return self.jobs.get((project_id, job_id))


class Revoker:
    def __init__(self) -> None:
        self.revoked: dict[str, str] = {}

    async def __call__(self, job: str, status: str) -> bool:
        first = job not in self.revoked
        self.revoked[job] = status
        return first


def recovery(
    gitlab: GitLab,
    revoker: Revoker,
    *,
    live: Iterable[LiveJob] | Callable[[int], Awaitable[list[LiveJob]]] = (),
    seen: Iterable[tuple[str, str, str | None, float]] = (),
    readers: dict[str | None, StatusReader] | None = None,
    **kw: float,
) -> JobRecovery:
    readers = readers if readers is not None else {GITLAB: gitlab.status, None: gitlab.status}

    def revoked() -> Collection[str]:
        return set(revoker.revoked)

    async def fixed(limit: int) -> list[LiveJob]:
        return list(live)[:limit]  # type: ignore[arg-type]

    listed = live if callable(live) else fixed
    return JobRecovery(
        live=listed,
        seen=lambda since, limit: list(seen),
        revoked=revoked,
        reader_for=readers.get,
        revoke=revoker,
        lookback=3600,
        **kw,  # type: ignore[arg-type]
    )


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_candidates_live_credentials_first_then_recent_gateway_jobs_each_once_none_revoked() -> None:
    live = [LiveJob("1", "42", GITLAB, 2000.0), LiveJob("2", "42", GITLAB, 1900.0), LiveJob("5", None, GITLAB, 1800.0)]
    seen = [("3", "43", GITLAB, 999.0), ("1", "42", CREDENTIAL_ISSUER, 998.0), ("4", "44", CREDENTIAL_ISSUER, 997.0)]
    assert candidates(live, seen, revoked={"2"}, limit=10) == [
        Candidate("1", "42", GITLAB),
        Candidate("3", "43", GITLAB),
        Candidate("4", "44", None),  # a credential's record names our issuer, not the job's GitLab
    ]  # job 5 has no project to ask about
    assert len(candidates(live, seen, revoked=set(), limit=2)) == 2


async def test_a_sweep_revokes_finished_jobs_and_leaves_the_others() -> None:
    gitlab = GitLab({("42", "1"): "success", ("42", "2"): "running", ("43", "3"): "canceled", ("44", "5"): "manual"})
    revoker = Revoker()
    before = metric("controlplane_job_recovery_revocations_total")
    sweep = recovery(
        gitlab,
        revoker,
        live=[LiveJob("1", "42", GITLAB, 2000.0), LiveJob("2", "42", GITLAB, 2000.0)],
        seen=[("3", "43", CREDENTIAL_ISSUER, 999.0), ("4", "44", GITLAB, 998.0), ("5", "44", GITLAB, 997.0)],
    )
    result = await sweep.sweep("start")
    assert revoker.revoked == {"1": "success", "3": "canceled"}
    assert result.complete and result.asked == 5 and sorted(result.revoked) == ["1", "3"]
    assert metric("controlplane_job_recovery_revocations_total") == before + 2
    gitlab.asked.clear()
    await sweep.sweep("periodic")
    assert sorted(gitlab.asked) == [("42", "2"), ("44", "4"), ("44", "5")]  # revoked jobs are not asked again


async def test_a_job_of_a_gitlab_not_read_through_its_api_is_counted_not_asked() -> None:
    gitlab, revoker = GitLab({("42", "1"): "success"}), Revoker()
    before = metric("controlplane_job_recovery_checks_total", result="no_gitlab")
    sweep = recovery(gitlab, revoker, seen=[("1", "42", OTHER, 999.0)])
    result = await sweep.sweep("start")
    assert result.asked == 0 and revoker.revoked == {} and result.complete
    assert metric("controlplane_job_recovery_checks_total", result="no_gitlab") == before + 1


async def test_an_unreachable_gitlab_makes_the_sweep_incomplete_without_asking_about_every_job() -> None:
    gitlab, revoker = GitLab({("42", str(j)): "success" for j in range(50)}), Revoker()
    gitlab.down = True
    sweep = recovery(gitlab, revoker, live=[LiveJob(str(j), "42", GITLAB, 2000.0) for j in range(50)])
    result = await sweep.sweep("start")
    assert not result.complete and len(gitlab.asked) == 1 and revoker.revoked == {}


async def test_a_refused_project_does_not_stop_the_others() -> None:
    gitlab, revoker = GitLab({("42", "1"): "failed", ("43", "2"): "failed"}), Revoker()
    gitlab.refused.add("42")
    sweep = recovery(gitlab, revoker, seen=[("1", "42", GITLAB, 999.0), ("2", "43", GITLAB, 998.0)])
    result = await sweep.sweep("start")
    assert revoker.revoked == {"2": "failed"} and not result.complete


async def test_run_sweeps_at_start_retries_an_incomplete_sweep_and_wakes_on_request() -> None:
    gitlab, revoker = GitLab({("42", "1"): "running"}), Revoker()
    gitlab.down = True
    sweep = recovery(gitlab, revoker, live=[LiveJob("1", "42", GITLAB, 2000.0)], interval=3600, retry=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(sweep.run(stop))
    try:
        await eventually(lambda: len(gitlab.asked) >= 1, "start sweep", timeout=5)
        gitlab.down = False
        await eventually(lambda: sweep.last is not None and sweep.last.complete, "retried after 0.05s", timeout=5)
        asked = len(gitlab.asked)
        gitlab.jobs[("42", "1")] = "success"  # its Job Hook is lost; GitLab was down, then answers again
        sweep.request("gitlab reachable again")
        await eventually(lambda: revoker.revoked == {"1": "success"}, "revoked on request", timeout=5)
        assert len(gitlab.asked) == asked + 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_run_sweeps_periodically() -> None:
    gitlab, revoker = GitLab({("42", "1"): "running"}), Revoker()
    sweep = recovery(gitlab, revoker, live=[LiveJob("1", "42", GITLAB, 2000.0)], interval=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(sweep.run(stop))
    try:
        await eventually(lambda: len(gitlab.asked) >= 3, "three sweeps", timeout=5)
        gitlab.jobs[("42", "1")] = "skipped"
        await eventually(lambda: revoker.revoked == {"1": "skipped"}, "periodic sweep revoked", timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


# --- the jobs holding live credentials: the exchange's ledger


async def test_jobs_holding_credentials_are_read_from_the_ledger_past_the_revoked_ones() -> None:
    """The ledger keeps a revoked job until its credentials expire; those must not use up a sweep's bound."""
    clock = Clock()
    ledger = MemoryExchangeStore(clock=clock)
    for job, until in (("1", 2000.0), ("2", 1900.0), ("3", 1800.0)):
        assert await ledger.issued(job, until, project_id="42", issuer=GITLAB)
    gitlab, revoker = GitLab({("42", "3"): "failed"}), Revoker()
    revoker.revoked = {"1": "success", "2": "success"}
    sweep = recovery(gitlab, revoker, live=ledger.jobs_with_credentials, max_jobs=1)
    result = await sweep.sweep("start")
    assert gitlab.asked == [("42", "3")] and result.revoked == ["3"]


async def test_a_ledger_that_cannot_be_read_leaves_the_gateway_jobs_asked_and_the_sweep_retried() -> None:
    async def broken(limit: int) -> list[LiveJob]:
        raise ExchangeStoreError("exchange.sqlite3: cannot read the exchange state: disk I/O error")

    gitlab, revoker = GitLab({("42", "1"): "success"}), Revoker()
    sweep = recovery(gitlab, revoker, live=broken, seen=[("1", "42", GITLAB, 999.0)])
    result = await sweep.sweep("start")
    assert revoker.revoked == {"1": "success"} and not result.complete


# --- which GitLab is asked


class JobSource:
    def __init__(self, name: str) -> None:
        self.name = name

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        return Inventory(fetched_at=1.0)

    def fetch_project(self, project: str | int) -> None:
        return None

    def fetch_job_status(self, project_id: str, job_id: str) -> str | None:
        return f"{self.name}:{project_id}/{job_id}"


async def test_a_job_is_asked_of_the_gitlab_its_token_came_from() -> None:
    async def changed() -> None:
        return None

    link = GitLabLink(
        on_inventory_change=changed, spawn=asyncio.create_task, source_factory=lambda api: JobSource(api.url)
    )
    policy = policy_of(issuers=TWO_GITLABS)
    link.follow(policy, {})
    try:
        main = link.job_status_reader("https://gitlab.example.com")
        other = link.job_status_reader("https://gitlab.other.example")
        assert main is not None and main("42", "7") == "https://gitlab.example.com:42/7"
        assert other is not None and other("42", "7") == "https://gitlab.other.example:42/7"
        assert link.job_status_reader("https://gitlab.unknown.example") is None  # not read through an API
        assert link.job_status_reader(None) is None  # a credential's job, with two GitLabs: not guessed
    finally:
        await link.stop()


def test_the_sweep_looks_back_as_long_as_a_raw_token_or_a_credential_could_be_used(tmp_path: Path) -> None:
    from dataclasses import replace

    from controlplane.credentials.service import CredentialOptions, CredentialService

    options = CredentialOptions(
        ("127.0.0.1", 0),
        ("127.0.0.1", 0),
        tmp_path,
        max_credential_ttl=3_600.0,
        deny_id_tokens_for=7_200.0,
        job_sweep_interval=42.0,
    )
    assert options.recovery_lookback == 7_200.0
    assert replace(options, deny_id_tokens_for=0.0).recovery_lookback == 3_600.0

    async def unchanged() -> None:
        return None

    service = CredentialService(
        options,
        issuer_keys=lambda issuer: None,
        policy=lambda: None,
        on_change=unchanged,
        store=MemoryExchangeStore(),
    )
    sweep = service.job_recovery(seen=lambda since, limit: [], reader_for=lambda issuer: None)
    assert (sweep.lookback, sweep.interval) == (7_200.0, 42.0)


async def test_an_audit_trail_that_cannot_be_read_leaves_the_live_jobs_asked_and_the_sweep_retried() -> None:
    """`seen` is the audit trail, in PostgreSQL with `--store postgres`: away, the sweep goes on without it."""

    def away(since: float, limit: int) -> list[tuple[str, str, str | None, float]]:
        raise StoreUnavailable("PostgreSQL at host=db unavailable: no connection within 5s")

    gitlab, revoker = GitLab({("42", "1"): "success"}), Revoker()
    sweep = recovery(gitlab, revoker, live=[LiveJob("1", "42", GITLAB, 2000.0)])
    sweep._seen = away
    result = await sweep.sweep("start")
    assert revoker.revoked == {"1": "success"} and not result.complete
