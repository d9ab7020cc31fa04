"""The exchange store in PostgreSQL (issue 12): one replay bound and one job ledger for every replica.

Why: with SQLite each replica counts subject-token uses and finished jobs alone, so N replicas allow N times
the bound, and a job finished on one is still served by another. Here every replica shares the same three
tables (migration 1, controlplane/store/migrations.py) through a bounded async pool (`StorePool`), so a call
never blocks the event loop and always returns or fails within the pool's timeouts.

Atomicity across replicas (docs/shared-state.md):
- `claim` is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE uses < limit RETURNING`: the conflicting row is
  locked by the statement itself, so check and increment cannot interleave. An expired row counts as absent
  (its count restarts), so correctness never waits for pruning.
- `finish` and `issued` each run in one transaction that first takes the job's advisory lock
  (`EXCHANGE_JOB_LOCK`, `hashtext(job_id)`): per job they serialise, so a credential is either recorded
  before the job's end (and `finish` returns its expiry) or refused. Under READ COMMITTED each later statement
  sees what the other committed. Different jobs never wait on each other (a hash collision only serialises).

Expired rows are deleted in bounded batches (`prune_batch` per table, `FOR UPDATE SKIP LOCKED`, in a short
transaction of their own so no write holds those row locks), at most once per `prune_interval` per store.
Every failure (PostgreSQL away or slow, a statement error, a closed pool) raises `ExchangeStoreError`: the
exchange then answers 503 and never grants. Messages carry the redacted DSN only, never a password.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager

import psycopg

from controlplane.credentials.exchange_store import ExchangeStoreError, FinishedJob, LiveJob
from controlplane.store.migrations import EXCHANGE_JOB_LOCK, MigrationError, migrate
from controlplane.store.pool import StorePool, StoreUnavailable, failure_reason

Connection = psycopg.AsyncConnection[tuple[object, ...]]

_CLAIM = """
INSERT INTO replay AS r (subject, uses, expires_at) VALUES (%(subject)s, 1, %(expires_at)s)
ON CONFLICT (subject) DO UPDATE SET
    uses = CASE WHEN r.expires_at <= %(now)s THEN 1 ELSE r.uses + 1 END,
    expires_at = CASE WHEN r.expires_at <= %(now)s THEN excluded.expires_at
                      ELSE greatest(r.expires_at, excluded.expires_at) END
WHERE r.expires_at <= %(now)s OR r.uses < %(limit)s
RETURNING uses
"""
_LOCK_JOB = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
_FINISH = """
INSERT INTO finished_jobs AS f (job_id, keep_until, project_id, finished_at) VALUES (%s, %s, %s, %s)
ON CONFLICT (job_id) DO UPDATE SET keep_until = greatest(f.keep_until, excluded.keep_until),
    project_id = coalesce(excluded.project_id, f.project_id),
    finished_at = greatest(f.finished_at, excluded.finished_at)
"""
# The jobs a policy change re-judges (migration 8); greatest() above ignores a NULL, as the SQLite store's does.
_FINISHED_PROJECTS = "SELECT DISTINCT project_id FROM finished_jobs WHERE finished_at > %s AND keep_until > %s"
_FINISHED_SINCE = """
SELECT job_id, project_id, finished_at FROM finished_jobs WHERE finished_at > %s AND keep_until > %s
AND (project_id = ANY(%s) OR (%s AND project_id IS NULL))
ORDER BY finished_at DESC, job_id LIMIT %s
"""
_FINISHED = "SELECT 1 FROM finished_jobs WHERE job_id = %s AND keep_until > %s"
_ISSUED = """
INSERT INTO job_credentials AS c (job_id, project_id, issuer, expires_at, subject_expires_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (job_id) DO UPDATE SET project_id = excluded.project_id, issuer = excluded.issuer,
    expires_at = greatest(c.expires_at, excluded.expires_at),
    subject_expires_at = greatest(c.subject_expires_at, excluded.subject_expires_at)
"""
_CREDENTIALS_UNTIL = "SELECT expires_at FROM job_credentials WHERE job_id = %s AND expires_at > %s"
# A row lives until its credentials and the subject token they were exchanged for have both expired (migration 7).
_HELD = "greatest(expires_at, subject_expires_at)"  # greatest() ignores a NULL
_HELD_UNTIL = f"SELECT {_HELD} FROM job_credentials WHERE job_id = %s AND {_HELD} > %s"
_LIVE_JOBS = (
    "SELECT job_id, project_id, issuer, expires_at FROM job_credentials WHERE expires_at > %s "
    "ORDER BY expires_at DESC, job_id LIMIT %s"
)
# (table, key, expiry column): the names are constants of this module, never input.
_TABLES = (
    ("replay", "subject", "expires_at"),
    ("finished_jobs", "job_id", "keep_until"),
    ("job_credentials", "job_id", _HELD),
)


class PostgresExchangeStore:
    """`ReplayCounter` and `JobLedger` on a shared PostgreSQL: `await open()` (connects and migrates), then the
    seven coroutines, then `await close()`. The store owns the pool it is given."""

    def __init__(
        self,
        pool: StorePool,
        *,
        clock: Callable[[], float] = time.time,
        prune_batch: int = 500,
        prune_interval: float = 1.0,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._prune_batch = prune_batch
        self._prune_interval = prune_interval
        self._next_prune = float("-inf")
        self._where = f"PostgreSQL exchange state at {pool.dsn.redacted()}"

    async def open(self) -> None:
        """Connect and bring the schema to this release's version (safe from several replicas at once)."""
        try:
            await self._pool.open()
            async with self._pool.connection() as conn:
                await migrate(conn)
        except (StoreUnavailable, MigrationError, psycopg.Error) as error:
            await self._pool.close()
            raise ExchangeStoreError(f"{self._where}: cannot open: {failure_reason(error)}") from None

    async def close(self) -> None:
        await self._pool.close()

    @property
    def pool(self) -> StorePool:
        """The one pool of this replica, shared with the other stores (opened and closed by this one)."""
        return self._pool

    def status(self) -> dict[str, str]:
        return {"kind": "postgres", "dsn": self._pool.dsn.redacted()}

    async def claim(self, subject: str, expires_at: float, limit: int) -> bool:
        if limit < 1:
            return False
        await self._prune_if_due()
        params = {"subject": subject, "expires_at": expires_at, "now": self._clock(), "limit": limit}
        async with self._transaction("write") as conn:
            cursor = await conn.execute(_CLAIM, params)
            return await cursor.fetchone() is not None

    async def finish(
        self, job_id: str, keep_until: float, *, project_id: str | None = None, finished_at: float | None = None
    ) -> float | None:
        await self._prune_if_due()
        async with self._transaction("write") as conn:
            await conn.execute(_LOCK_JOB, (EXCHANGE_JOB_LOCK, job_id))
            await conn.execute(_FINISH, (job_id, keep_until, project_id, finished_at))
            cursor = await conn.execute(_HELD_UNTIL, (job_id, self._clock()))
            row = await cursor.fetchone()
        return None if row is None else _float(row[0])

    async def is_finished(self, job_id: str) -> bool:
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_FINISHED, (job_id, self._clock()))
            return await cursor.fetchone() is not None

    async def finished_projects(self, since: float) -> set[str | None]:
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_FINISHED_PROJECTS, (since, self._clock()))
            rows = await cursor.fetchall()
        return {None if project is None else str(project) for (project,) in rows}

    async def finished_since(self, since: float, limit: int, projects: Collection[str | None]) -> list[FinishedJob]:
        if limit < 1 or not projects:
            return []
        named = [str(project) for project in projects if project is not None]
        params = (since, self._clock(), named, None in projects, limit)
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_FINISHED_SINCE, params)
            rows = await cursor.fetchall()
        return [
            FinishedJob(str(job), None if project is None else str(project), _float(at)) for job, project, at in rows
        ]

    async def issued(
        self,
        job_id: str,
        expires_at: float,
        *,
        project_id: str | None,
        issuer: str,
        subject_expires_at: float | None = None,
    ) -> bool:
        await self._prune_if_due()
        async with self._transaction("write") as conn:
            await conn.execute(_LOCK_JOB, (EXCHANGE_JOB_LOCK, job_id))
            cursor = await conn.execute(_FINISHED, (job_id, self._clock()))
            if await cursor.fetchone() is not None:
                return False
            await conn.execute(_ISSUED, (job_id, project_id, issuer, expires_at, subject_expires_at))
        return True

    async def credentials_until(self, job_id: str) -> float | None:
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_CREDENTIALS_UNTIL, (job_id, self._clock()))
            row = await cursor.fetchone()
        return None if row is None else _float(row[0])

    async def jobs_with_credentials(self, limit: int) -> list[LiveJob]:
        if limit < 1:
            return []
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_LIVE_JOBS, (self._clock(), limit))
            rows = await cursor.fetchall()
        return [
            LiveJob(str(job), None if project is None else str(project), str(issuer), _float(expires_at))
            for job, project, issuer, expires_at in rows
        ]

    async def prune(self) -> int:
        """Delete at most `prune_batch` expired rows per table; the number deleted. Rows locked by a running
        write are skipped (the next prune gets them), so pruning never waits on, or deadlocks with, a write."""
        deleted = 0
        now = self._clock()
        async with self._transaction("prune") as conn:
            for table, key, column in _TABLES:
                cursor = await conn.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} WHERE {column} <= %s "
                    f"ORDER BY {column} LIMIT %s FOR UPDATE SKIP LOCKED)",
                    (now, self._prune_batch),
                )
                deleted += max(cursor.rowcount, 0)
        return deleted

    async def _prune_if_due(self) -> None:
        """Writes prune, as SQLite's do, but at most once per interval: a round trip per write would double the
        cost of an exchange. Bounded per call, so a large backlog is worked off over several writes."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + self._prune_interval
        await self.prune()

    def _transaction(self, what: str) -> AbstractAsyncContextManager[Connection]:
        """One transaction on a pooled connection; any failure, PostgreSQL's or the pool's, is ExchangeStoreError."""
        return self._pool.transaction(
            lambda why: ExchangeStoreError(f"{self._where}: cannot {what} the exchange state: {why}")
        )


def _float(value: object) -> float:
    if not isinstance(value, int | float):
        raise ExchangeStoreError(f"unexpected value in the exchange state: {type(value).__name__}")
    return float(value)
