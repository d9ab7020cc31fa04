"""The deny list in PostgreSQL (issue 12): one list for every replica, and a notification when it grows.

The `revocations` table (its migration in controlplane/store/migrations.py) holds job_id -> denied_until and
the `seq` of the write that last raised it. Readers ask `WHERE seq > last_seen`, which is only sound if a
number is never committed after a larger one became visible: so every write first takes one advisory lock
(`REVOCATION_LOCK`, held to the end of its transaction) and draws its numbers under it. Writes are rare (a job
ends), so serialising them costs nothing that matters; reads never take the lock.

A write announces itself (`publish("revocations", <its seq>)`) in the same transaction, so the notification
goes out only if, and after, the rows are committed; replicas then read `changes(last_seen)`.

The store does not own the pool: it shares the one `serve` opened (and migrated) for the exchange store.

Rows are read as another writer may have left them (a buggy replica, a manual UPDATE): a `denied_until` that is
not a number (NaN) denies its job until the row is changed (fail closed); a job id no GitLab job can have (over
`MAX_JOB_ID` characters, or with control characters) is left out, because it would be compiled into every
Envoy's routes (one 100 MB id would make every Envoy refuse the configuration, and with it every later
revocation). Either is counted, logged naming the table and the job (shortened), and shown in `status()`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager

import psycopg

from controlplane.credentials.revocation_store import RevocationStoreError
from controlplane.store.changes import publish
from controlplane.store.migrations import REVOCATION_LOCK, MigrationError, migrate
from controlplane.store.pool import StorePool, StoreUnavailable, failure_reason
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.revocations")

Connection = psycopg.AsyncConnection[tuple[object, ...]]

TOPIC = "revocations"  # the change feed's topic; the payload is the writer's highest seq (a hint only)
MAX_JOB_ID = 64  # characters; GitLab's job ids are decimal integers

_LOCK = "SELECT pg_advisory_xact_lock(%s)"
_SAVE = """
INSERT INTO revocations AS r (job_id, denied_until, seq)
SELECT job_id, denied_until, nextval('revocations_seq')
FROM unnest(%s::text[], %s::double precision[]) AS t(job_id, denied_until)
ON CONFLICT (job_id) DO UPDATE SET denied_until = excluded.denied_until, seq = excluded.seq
WHERE r.denied_until < excluded.denied_until
RETURNING seq
"""
# One statement, so the cursor and the rows come from one snapshot.
_CHANGES = """
WITH top AS (SELECT coalesce(max(seq), 0) AS seq FROM revocations)
SELECT top.seq, r.job_id, r.denied_until
FROM top LEFT JOIN revocations r ON r.seq > %(since)s AND r.denied_until > %(now)s
"""
_PRUNE = """
DELETE FROM revocations WHERE job_id IN (
    SELECT job_id FROM revocations WHERE denied_until <= %s ORDER BY denied_until LIMIT %s FOR UPDATE SKIP LOCKED
)
"""


class PostgresRevocationStore:
    """`RevocationStore` on the shared database: `await open()` (migrates; a no-op when done), then the calls.
    Every failure, PostgreSQL's or the pool's, raises RevocationStoreError naming the redacted DSN."""

    def __init__(self, pool: StorePool, *, clock: Callable[[], float] = time.time, prune_batch: int = 1000) -> None:
        self._pool = pool
        self._clock = clock
        self._prune_batch = prune_batch
        self._where = f"PostgreSQL deny list at {pool.dsn.redacted()}"
        self._refused = 0  # rows left out or taken as "denied until changed" (see the module docstring)
        self._refused_log = RateLimitedLog(log, burst=5, interval=60.0)

    async def open(self) -> None:
        try:
            async with self._pool.connection() as conn:
                await migrate(conn)
        except (StoreUnavailable, MigrationError, psycopg.Error) as error:
            raise RevocationStoreError(f"{self._where}: cannot open: {failure_reason(error)}") from None

    async def close(self) -> None:
        return None  # the pool is its opener's to close

    async def changes(self, since: int) -> tuple[dict[str, float], int]:
        async with self._transaction("read") as conn:
            cursor = await conn.execute(_CHANGES, {"since": since, "now": self._clock()})
            rows = await cursor.fetchall()
        top = max([since, *(_int(row[0]) for row in rows)])
        entries: dict[str, float] = {}
        for _, job, until in rows:
            if job is not None and (entry := self._entry(str(job), _float(until))) is not None:
                entries[entry[0]] = entry[1]
        return entries, top

    def _entry(self, job: str, until: float) -> tuple[str, float] | None:
        if len(job) > MAX_JOB_ID or not job.isprintable():
            self._refuse("job id %r... (%d characters) is no GitLab job's: row left out", job[:32], len(job))
            return None
        if math.isnan(until):
            self._refuse("job %s: denied_until is NaN: denied until the row is changed", job)
            return job, math.inf
        return job, until

    def _refuse(self, message: str, *args: object) -> None:
        self._refused += 1
        self._refused_log.log(logging.ERROR, "revocations table: " + message, *args, key="refused")

    async def save(self, entries: Mapping[str, float]) -> None:
        now = self._clock()
        jobs = sorted(job for job, until in entries.items() if until > now)
        if not jobs:
            return
        async with self._transaction("write") as conn:
            await conn.execute(_LOCK, (REVOCATION_LOCK,))
            cursor = await conn.execute(_SAVE, (jobs, [entries[job] for job in jobs]))
            written = [_int(row[0]) for row in await cursor.fetchall()]
            if written:
                await publish(conn, TOPIC, str(max(written)))

    async def prune(self) -> int:
        async with self._transaction("prune") as conn:
            cursor = await conn.execute(_PRUNE, (self._clock(), self._prune_batch))
            return max(cursor.rowcount, 0)

    def status(self) -> dict[str, object]:
        return {"kind": "postgres", "dsn": self._pool.dsn.redacted(), "refused_rows": self._refused}

    def _transaction(self, what: str) -> AbstractAsyncContextManager[Connection]:
        return self._pool.transaction(lambda why: RevocationStoreError(f"{self._where}: cannot {what} it: {why}"))


def _float(value: object) -> float:
    if not isinstance(value, int | float):
        raise RevocationStoreError(f"unexpected value in the deny list: {type(value).__name__}")
    return float(value)


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise RevocationStoreError(f"unexpected sequence number in the deny list: {type(value).__name__}")
    return value
