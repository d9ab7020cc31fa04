"""The audit trail in PostgreSQL (issue 12): one trail for a fleet of replicas, read by `controlplane audit`.

Why: a fleet's trail does not fit one pod's disk, and an auditor asks one place, not each replica's file. The
table is migration 2 (controlplane/store/migrations.py): AuditRecord's columns, as in audit.sqlite3, with the
same indexes (by job, by project path or id, by time) and the same append-only trigger.

Never waiting on the database. `submit` only appends to an in-memory buffer (a lock held for a deque append);
one writer task on the event loop takes batches from its head and writes each with one COPY (measured faster
than a multi-row INSERT: benchmarks/audit_writes.py). A batch leaves the buffer only once committed, so records
are written in the order received, and a batch that failed for want of PostgreSQL is written again, whole, on
reconnect. (A connection lost between COMMIT and its acknowledgement can therefore write a batch twice: the
trail is at-least-once across an outage, never lossy within the bound.)

PostgreSQL away. The buffer is bounded twice, by records (`buffer_records`) and by bytes (`buffer_bytes`, each
record's text counted, plus a fixed overhead); one sender may hold at most a quarter of the records, so a
flooding stream cannot push the gateways' records out. A record past a bound is dropped and counted
(`controlplane_audit_records_dropped_total{reason="buffer_full"}`, a log line at most every 10 s, and
`/status`); the ALS stream never waits. The writer retries every `retry_interval` seconds; `status()` says
whether the store is healthy, how many records are buffered, the oldest one's age and how many were dropped.

Retention by one replica: the sweep runs only while `is_leader()` (the lead wires the fleet's leader; alone,
always), deletes in batches of `prune_batch` rows, each its own short transaction (the table is append-only:
no write ever waits on those rows), under a transaction-level advisory lock so two sweeps never overlap.

Sync callers. The ALS stream's `flush` and the recovery sweep's `recent_jobs` are called from worker threads
(`asyncio.to_thread`), as for SQLite: `flush` waits on a condition the writer signals, and the reads run on the
store's event loop (`run_coroutine_threadsafe`); called on that loop itself, they raise rather than deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import astuple, dataclass, fields
from typing import Any, Literal, TypeVar

import psycopg
from psycopg.rows import dict_row

from controlplane.audit.metrics import (
    AUDIT_BUFFERED,
    AUDIT_RECORDS_DROPPED,
    AUDIT_RECORDS_WRITTEN,
    AUDIT_WRITE_DURATION,
    UNKNOWN_LABEL,
)
from controlplane.audit.store import (
    COLUMNS,
    DEFAULT_BATCH_SIZE,
    DEFAULT_PRUNE_INTERVAL,
    DEFAULT_QUERY_LIMIT,
    DEFAULT_RETENTION,
    DROP_REPORT_INTERVAL,
    AuditRecord,
    SeenJob,
    record_filter,
    sanitize,
    selected_columns,
)
from controlplane.store.migrations import AUDIT_PRUNE_LOCK, migrate
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.audit")

DEFAULT_BUFFER_RECORDS = 100_000  # about a minute and a half of a 1,000 requests/s fleet's trail
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024
RECORD_OVERHEAD_BYTES = 256  # a record's object and tuple, beyond its text: what the byte bound counts per record
DEFAULT_PRUNE_BATCH = 5_000
DEFAULT_RETRY_INTERVAL = 1.0
DEFAULT_CLOSE_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # a sync read from a worker thread waits at most this long for the loop's answer

Connection = psycopg.AsyncConnection[tuple[object, ...]]
InsertMethod = Literal["copy", "values"]
_T = TypeVar("_T")


def _quote(column: str) -> str:
    return f'"{column}"'


_QUOTED = ", ".join(_quote(column) for column in COLUMNS)
_COPY = f"COPY audit ({_QUOTED}) FROM STDIN"
_ROW_PLACEHOLDER = f"({', '.join('%s' for _ in COLUMNS)})"
_PRUNE = "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE time < %s ORDER BY time LIMIT %s)"
_TEXT_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name not in ("time", "status", "reported_time"))


def record_bytes(record: AuditRecord) -> int:
    """What a buffered record is counted as against the byte bound: its text plus a fixed overhead."""
    return RECORD_OVERHEAD_BYTES + sum(len(value) for name in _TEXT_FIELDS if (value := getattr(record, name)))


@dataclass
class _Buffered:
    record: AuditRecord
    sender: str
    label: str
    size: int
    received: float  # monotonic: for the oldest record's age


class PostgresAuditStore:
    """`await open()` (connects, migrates, starts the writer on this loop), then `submit`/`flush`/reads from
    any thread, then `await close()`. The pool may be shared: this store never closes it."""

    def __init__(
        self,
        pool: StorePool,
        *,
        retention: float | None = DEFAULT_RETENTION,
        buffer_records: int = DEFAULT_BUFFER_RECORDS,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        sender_records: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        insert: InsertMethod = "copy",
        prune_interval: float = DEFAULT_PRUNE_INTERVAL,
        prune_batch: int = DEFAULT_PRUNE_BATCH,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`sender_records` (default a quarter of `buffer_records`, at least 1) bounds one sender's share."""
        self._pool = pool
        self.retention = retention
        self.buffer_records = max(1, buffer_records)
        self.buffer_bytes = max(RECORD_OVERHEAD_BYTES, buffer_bytes)
        self._sender_records = max(1, sender_records or self.buffer_records // 4)
        self._batch_size = max(1, batch_size)
        self._insert = insert
        self._prune_interval = prune_interval
        self._prune_batch = max(1, prune_batch)
        self._retry_interval = retry_interval
        self._is_leader = is_leader
        self._clock = clock
        self._where = f"PostgreSQL audit trail at {pool.dsn.redacted()}"
        self._progress = threading.Condition()  # guards everything below; flush() waits on it
        self._buffer: deque[_Buffered] = deque()
        self._bytes = 0
        self._held: dict[str, int] = {}  # sender -> records it holds in the buffer
        self._accepted = 0
        self._settled = 0  # of the accepted, committed or given up on
        self._dropped = 0  # refused for want of room, since the start
        self._healthy = False
        self._last_error: str | None = None
        self._closed = False
        self._written = 0
        self._pruned = 0
        self._drop_log = RateLimitedLog(log, burst=1, interval=DROP_REPORT_INTERVAL)
        self._error_log = RateLimitedLog(log, burst=1, interval=DROP_REPORT_INTERVAL)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- life

    async def open(self) -> None:
        """Connect and migrate (StoreUnavailable or MigrationError when it cannot), then start the writer."""
        await self._pool.open()
        async with self._pool.connection() as conn:
            await migrate(conn)
        self._healthy = True
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._run(), name="audit writer (PostgreSQL)")
        AUDIT_BUFFERED.set_function(lambda: len(self._buffer))  # read at scrape time: nothing on the hot path

    async def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Refuse new records, write what is buffered (for at most `timeout`: PostgreSQL may be away), stop."""
        with self._progress:
            self._closed = True
            target = self._accepted
        self._nudge()
        deadline = time.monotonic() + timeout
        while self._writer is not None and not self._writer.done() and time.monotonic() < deadline:
            with self._progress:
                if self._settled >= target:
                    break
            await asyncio.sleep(0.02)
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        with self._progress:
            lost = list(self._buffer)
            self._buffer.clear()
            self._settled += len(lost)
            self._progress.notify_all()
        for item in lost:
            _dropped(item.label, "closed")
        if lost:
            log.error("%s: %d buffered audit record(s) not written at shutdown", self._where, len(lost))

    # -- writing

    def submit(self, record: AuditRecord, *, sender: str = "", label: str = UNKNOWN_LABEL) -> bool:
        """Buffer a record without ever blocking; False (and counted) when closed or past a bound."""
        size = record_bytes(record)
        with self._progress:
            reason = self._refusal(sender, size)
            if reason is None:
                self._buffer.append(_Buffered(record, sender, label, size, time.monotonic()))
                self._bytes += size
                self._held[sender] = self._held.get(sender, 0) + 1
                self._accepted += 1
            elif reason == "buffer_full":
                self._dropped += 1
            buffered = len(self._buffer)
        if reason is not None:
            _dropped(label, reason)
            if reason == "buffer_full":
                self._drop_log.log(
                    logging.WARNING,
                    "%s: audit buffer full (%d records, bounds %d records / %d bytes): dropping records of %s",
                    self._where,
                    buffered,
                    self.buffer_records,
                    self.buffer_bytes,
                    sender[:300] or "an unnamed sender",
                )
            return False
        self._nudge()
        return True

    def _refusal(self, sender: str, size: int) -> str | None:
        """Why a record cannot be buffered now, or None. Caller holds the lock."""
        if self._closed:
            return "closed"
        if (
            len(self._buffer) >= self.buffer_records
            or self._bytes + size > self.buffer_bytes
            or self._held.get(sender, 0) >= self._sender_records
        ):
            return "buffer_full"
        return None

    def _nudge(self) -> None:
        """Wake the writer, from its loop or from any other thread."""
        loop, wake = self._loop, self._wake
        if loop is None or wake is None or wake.is_set():
            return
        if _on_loop(loop):
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to wake
                loop.call_soon_threadsafe(wake.set)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (from a worker thread) until every record submitted before this call is committed. False on
        timeout, or at once while PostgreSQL is away (the records stay buffered, and are written on reconnect)."""
        with self._progress:
            target = self._accepted
            self._progress.wait_for(lambda: self._settled >= target or not self._healthy, timeout)
            return self._settled >= target

    async def _run(self) -> None:
        assert self._wake is not None
        next_prune = time.monotonic()
        while True:
            batch = self._head()
            if batch:
                if not await self._write(batch):
                    await asyncio.sleep(self._retry_interval)
                    continue
            elif self._closed:
                return
            if time.monotonic() >= next_prune:
                await self._prune_quietly()
                next_prune = time.monotonic() + self._prune_interval
            if not batch:
                self._wake.clear()
                if not self._buffer and not self._closed:
                    timeout = max(0.0, next_prune - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)

    def _head(self) -> list[_Buffered]:
        with self._progress:
            return [self._buffer[i] for i in range(min(self._batch_size, len(self._buffer)))]

    async def _write(self, batch: list[_Buffered]) -> bool:
        """Write the buffer's head; True when it left the buffer (committed, or refused by the database for
        its content: retrying would never succeed), False when PostgreSQL is away (kept, retried)."""
        started = time.perf_counter()
        try:
            # Sanitising is regular expressions over every field, tens of ms per batch: off the event loop, so
            # the xDS streams sharing it wait at most a GIL switch interval, never a whole batch.
            rows = await asyncio.to_thread(_encode, batch)
            async with self._pool.connection() as conn, conn.transaction():
                await self._insert_rows(conn, rows)
        except (StoreUnavailable, psycopg.OperationalError) as error:
            self._set_health(False, str(error).splitlines()[0] if str(error) else type(error).__name__)
            return False
        except psycopg.Error as error:  # a record the database refuses: counted as lost, the writer goes on
            for item in batch:
                _dropped(item.label, "write_failed")
            log.error("%s: could not write %d record(s): %s", self._where, len(batch), type(error).__name__)
        except Exception:  # a bug: the records stay buffered and are retried, the writer never dies
            self._set_health(False, "internal error (logged)")
            self._error_log.log(logging.ERROR, "%s: audit writer failed", self._where, exc_info=True)
            return False
        else:
            AUDIT_RECORDS_WRITTEN.inc(len(batch))
            AUDIT_WRITE_DURATION.observe(time.perf_counter() - started)
            self._written += len(batch)
        self._set_health(True, None)
        self._pop(len(batch))
        return True

    async def _insert_rows(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        cursor = conn.cursor()
        if self._insert == "copy":  # psycopg formats each row in C: measured faster than building the text here
            async with cursor.copy(_COPY) as copy:
                for row in rows:
                    await copy.write_row(row)
            return
        values = ", ".join(_ROW_PLACEHOLDER for _ in rows)
        await cursor.execute(
            f"INSERT INTO audit ({_QUOTED}) VALUES {values}".encode(), [v for row in rows for v in row]
        )

    def _pop(self, count: int) -> None:
        with self._progress:
            for _ in range(count):
                item = self._buffer.popleft()
                self._bytes -= item.size
                left = self._held[item.sender] - 1
                if left:
                    self._held[item.sender] = left
                else:
                    del self._held[item.sender]
            self._settled += count
            self._progress.notify_all()

    def _set_health(self, healthy: bool, error: str | None) -> None:
        with self._progress:
            was = self._healthy
            self._healthy, self._last_error = healthy, error
            self._progress.notify_all()  # flush() returns at once while away
        if was and not healthy:
            log.warning("%s unavailable (%s): buffering audit records (at most %d)", self._where, error,
                        self.buffer_records)  # fmt: skip
        elif healthy and not was:
            log.info("%s reachable again: writing the buffered audit records", self._where)
        elif not healthy:
            self._error_log.log(logging.WARNING, "%s still unavailable: %s", self._where, error)

    # -- retention

    async def prune(self) -> int:
        """Delete records older than the retention, `prune_batch` at a time, each batch its own transaction;
        only on the leader, and one sweep at a time across replicas. The number deleted."""
        if self.retention is None or not self._is_leader():
            return 0
        cutoff = self._clock() - self.retention
        deleted = 0
        while True:
            async with self._pool.connection() as conn, conn.transaction():
                cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s, 0)", (AUDIT_PRUNE_LOCK,))
                row = await cursor.fetchone()
                if row is None or not row[0]:
                    break  # another replica is sweeping
                cursor = await conn.execute(_PRUNE, (cutoff, self._prune_batch))
                count = max(cursor.rowcount, 0)
            deleted += count
            if count < self._prune_batch or not self._is_leader():
                break
            await asyncio.sleep(0)  # other tasks run between two batches
        if deleted:
            self._pruned += deleted
            log.info("audit retention: deleted %d record(s) older than %.0fs", deleted, self.retention)
        return deleted

    async def _prune_quietly(self) -> None:
        try:
            await self.prune()
        except (StoreUnavailable, psycopg.Error) as error:
            self._error_log.log(logging.WARNING, "%s: retention sweep failed: %s", self._where, type(error).__name__)

    # -- reading

    async def query_async(
        self,
        job: str | None = None,
        project: str | None = None,
        since: float | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            return await query_records(conn, job=job, project=project, since=since, limit=limit)

    async def recent_jobs_async(self, since: float, limit: int = 1000) -> list[SeenJob]:
        async with self._pool.connection() as conn:
            return await recent_jobs(conn, since, limit)

    def query(
        self,
        job: str | None = None,
        project: str | None = None,
        since: float | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """See `query_records`; from a worker thread (never the store's loop)."""
        return self._from_thread(self.query_async(job, project, since, limit))

    def recent_jobs(self, since: float, limit: int = 1000) -> list[SeenJob]:
        """See `recent_jobs`; from a worker thread, as the recovery sweep calls it (StoreUnavailable when away)."""
        return self._from_thread(self.recent_jobs_async(since, limit))

    def _from_thread(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None or _on_loop(loop):
            coroutine.close()
            raise RuntimeError("PostgresAuditStore: sync reads are for worker threads, after open()")
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(READ_TIMEOUT)

    def status(self) -> dict[str, object]:
        """For /status: where, whether writes succeed, what waits in memory, what was lost for want of room."""
        with self._progress:
            oldest = time.monotonic() - self._buffer[0].received if self._buffer else None
            return {
                "kind": "postgres",
                "dsn": self._pool.dsn.redacted(),
                "healthy": self._healthy,
                "last_error": self._last_error,
                "buffered": len(self._buffer),
                "buffered_bytes": self._bytes,
                "oldest_buffered_seconds": None if oldest is None else round(oldest, 3),
                "buffer_bounds": {"records": self.buffer_records, "bytes": self.buffer_bytes},
                "dropped": self._dropped,
                "written": self._written,
                "pruned": self._pruned,
            }


async def query_records(
    conn: Connection,
    *,
    job: str | None = None,
    project: str | None = None,
    since: float | None = None,
    limit: int = DEFAULT_QUERY_LIMIT,
) -> list[dict[str, Any]]:
    """audit/store.py's `query_records` against PostgreSQL: the same filters, order and keys (NULL for a column
    a database not yet migrated lacks: the CLI reads, it never migrates)."""
    clause, params = record_filter(job, project, since, "%s")
    present = await conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'audit'::regclass AND attnum > 0 AND NOT attisdropped"
    )
    columns = selected_columns((str(row[0]) for row in await present.fetchall()), _quote)
    sql = f"SELECT id, {columns} FROM audit {clause} ORDER BY time DESC, id DESC LIMIT %s"
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(sql.encode(), (*params, max(0, limit)))
        rows = await cursor.fetchall()
    return [{key: row[key] for key in ("id", *COLUMNS)} for row in reversed(rows)]


async def recent_jobs(conn: Connection, since: float, limit: int) -> list[SeenJob]:
    """audit/store.py's `recent_jobs` against PostgreSQL."""
    cursor = await conn.execute(
        "SELECT job_id, project_id, issuer, MAX(time) AS last FROM audit"
        " WHERE time >= %s AND job_id IS NOT NULL AND project_id IS NOT NULL"
        " GROUP BY job_id, project_id, issuer ORDER BY last DESC LIMIT %s",
        (since, max(0, limit)),
    )
    rows = await cursor.fetchall()
    return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2]), float(str(r[3]))) for r in rows]


def _encode(batch: list[_Buffered]) -> list[tuple[Any, ...]]:
    """The batch sanitised, as parameter rows. In a worker thread. NUL, which no PostgreSQL text can hold (and
    which would fail the whole batch), is removed."""
    return [tuple(map(_without_nul, astuple(sanitize(item.record)))) for item in batch]


def _without_nul(value: object) -> object:
    return value.replace("\x00", "") if isinstance(value, str) and "\x00" in value else value


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _dropped(label: str, reason: str) -> None:
    AUDIT_RECORDS_DROPPED.labels(gateway=label, reason=reason).inc()
