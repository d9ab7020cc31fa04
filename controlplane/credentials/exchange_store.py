"""What the token exchange must remember beyond one process's life: subject-token uses and job state.

Why a store: the replay bound ("a subject token is exchanged at most N times") and "a finished job gets no
credential" are only as strong as the memory behind them. In memory, a crash or a restart forgets both, and
two replicas each allow N. The ledger is also the control plane's one record of which jobs hold live
credentials, of which project and GitLab: the recovery sweep asks GitLab about them after a missed Job Hook.
So the exchange talks to two small interfaces, `ReplayCounter` and `JobLedger`,
and the control plane gives it `SqliteExchangeStore` (one file in the state directory); a shared database
(PostgreSQL, issue 12) only has to implement the same few methods. `MemoryExchangeStore` serves tests and a
`TokenExchange` used alone.

Every method either does what it says, durably, or raises `ExchangeStoreError`; the exchange then refuses
(503): a store it cannot read or write never grants.

The methods are `async` (docs/shared-state.md): the PostgreSQL store (exchange_store_pg.py) is a network round
trip away and must not block the event loop; memory and SQLite implement the same coroutines without awaiting
anything, so each of their calls still runs as one uninterrupted step on the loop, exactly as before.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from controlplane.statefile import StateFileError, create_database, make_private

log = logging.getLogger("controlplane.credentials")

DB_NAME = "exchange.sqlite3"
# 2: job_credentials.subject_expires_at; 3: finished_jobs.project_id and finished_at (an older file is upgraded in
# place at open, one version at a time)
SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS replay (
    subject TEXT PRIMARY KEY,
    uses INTEGER NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS replay_expiry ON replay (expires_at);
CREATE TABLE IF NOT EXISTS finished_jobs (
    job_id TEXT PRIMARY KEY,
    keep_until REAL NOT NULL,
    project_id TEXT,
    finished_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS finished_jobs_expiry ON finished_jobs (keep_until);
CREATE TABLE IF NOT EXISTS job_credentials (
    job_id TEXT PRIMARY KEY,
    project_id TEXT,
    issuer TEXT NOT NULL,
    expires_at REAL NOT NULL,
    subject_expires_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS job_credentials_expiry ON job_credentials (expires_at);
"""
# A row lives until its credentials and the subject token they were exchanged for have both expired; writes sweep
# by it, so it is indexed (the expression must be spelled exactly so for SQLite to use the index).
_HELD = "max(expires_at, coalesce(subject_expires_at, 0))"
_HELD_INDEX = f"CREATE INDEX IF NOT EXISTS job_credentials_held ON job_credentials ({_HELD})"
_SCHEMA += _HELD_INDEX + ";\n"
# When each job's end was recorded, so a policy change can re-judge the jobs that ended within the deny window
# (`finished_projects`, then `finished_since` for the projects it now covers) after a restart too.
_FINISHED_AT_INDEX = "CREATE INDEX IF NOT EXISTS finished_jobs_project ON finished_jobs (project_id, finished_at)"
_SCHEMA += _FINISHED_AT_INDEX + ";\n"
_FINISHED = "SELECT 1 FROM finished_jobs WHERE job_id = ? AND keep_until > ?"
_FINISH = (
    "INSERT INTO finished_jobs (job_id, keep_until, project_id, finished_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (job_id) DO UPDATE SET keep_until = max(keep_until, excluded.keep_until), "
    "project_id = coalesce(excluded.project_id, project_id), "
    "finished_at = coalesce(max(finished_at, excluded.finished_at), finished_at, excluded.finished_at)"
)
_FINISHED_PROJECTS = "SELECT DISTINCT project_id FROM finished_jobs WHERE finished_at > ? AND keep_until > ?"
_FINISHED_SINCE = (
    "SELECT job_id, project_id, finished_at FROM finished_jobs WHERE finished_at > ? AND keep_until > ? "
    "AND ({projects}) ORDER BY finished_at DESC, job_id LIMIT ?"
)
_PROJECTS_PER_QUERY = 500  # SQLite's bound on a statement's parameters is 32,766; a short IN list is also fast
_CREDENTIALS_UNTIL = "SELECT expires_at FROM job_credentials WHERE job_id = ? AND expires_at > ?"
_HELD_UNTIL = f"SELECT {_HELD} FROM job_credentials WHERE job_id = ? AND {_HELD} > ?"
_UPGRADE_FROM_1 = "ALTER TABLE job_credentials ADD COLUMN subject_expires_at REAL"
_UPGRADE_FROM_2 = (
    "ALTER TABLE finished_jobs ADD COLUMN project_id TEXT; ALTER TABLE finished_jobs ADD COLUMN finished_at REAL"
)
_LIVE_JOBS = (
    "SELECT job_id, project_id, issuer, expires_at FROM job_credentials WHERE expires_at > ? "
    "ORDER BY expires_at DESC, job_id LIMIT ?"
)
_SHAPE = (
    "SELECT job_id, project_id, issuer, expires_at, subject_expires_at FROM job_credentials LIMIT 0",
    "SELECT subject, uses, expires_at FROM replay LIMIT 0",
    "SELECT job_id, keep_until, project_id, finished_at FROM finished_jobs LIMIT 0",
)
_TABLES = (("replay", "expires_at"), ("finished_jobs", "keep_until"), ("job_credentials", _HELD))


class ExchangeStoreError(Exception):
    """The store could not answer or record durably; the message names the file, never a token."""


@dataclass(frozen=True)
class LiveJob:
    """A job holding credentials that have not expired, and where to ask whether it has finished."""

    job_id: str
    project_id: str | None  # None only for a subject token without `project_id` (GitLab always sets it)
    issuer: str  # the GitLab issuer URL of the job's ID token (its `iss`)
    expires_at: float  # when its last credential expires (Unix time)


@dataclass(frozen=True)
class FinishedJob:
    """A job whose end the ledger recorded: which project (None: unknown) and when (Unix time)."""

    job_id: str
    project_id: str | None
    finished_at: float


class ReplayCounter(Protocol):
    async def claim(self, subject: str, expires_at: float, limit: int) -> bool:
        """Count one use of `subject` if it has been used fewer than `limit` times; True when counted.

        Atomic (check and increment in one step, across every process sharing the store). The record may be
        forgotten once `expires_at` has passed: the subject token is useless by then.
        """
        ...


class JobLedger(Protocol):
    """Finished jobs, and until when each job holds credentials.

    `finish` and `issued` are each one atomic step, so two replicas cannot interleave "the job finished, how
    long must its credentials be denied?" with "no, it has not finished, here is a credential".
    """

    async def finish(
        self, job_id: str, keep_until: float, *, project_id: str | None = None, finished_at: float | None = None
    ) -> float | None:
        """GitLab reported the job finished: `is_finished` answers True until `keep_until`, and `issued`
        refuses. Returns, as of that moment, until when anything the ledger knows of the job may still pass a
        gateway: the latest of `credentials_until(job_id)` and the `subject_expires_at` recorded by `issued`
        (None: nothing unexpired). `project_id` and `finished_at` (the hook's time) are kept with the record for
        `finished_since`; a repeated hook keeps the latest time and any project already known."""
        ...

    async def is_finished(self, job_id: str) -> bool: ...

    async def finished_projects(self, since: float) -> set[str | None]:
        """The projects (None: unknown) of the jobs recorded finished (with a `finished_at`) after `since` and still
        kept: a policy change judges these (a few hundred, not tens of thousands of jobs) before reading jobs."""
        ...

    async def finished_since(self, since: float, limit: int, projects: Collection[str | None]) -> list[FinishedJob]:
        """At most `limit` jobs of `projects` recorded finished (with a `finished_at`) after `since` and still kept,
        the latest first: what a policy change that newly covers those projects lists, durably and on every replica
        (docs/revocation-coverage.md)."""
        ...

    async def issued(
        self,
        job_id: str,
        expires_at: float,
        *,
        project_id: str | None,
        issuer: str,
        subject_expires_at: float | None = None,
    ) -> bool:
        """Record that a credential of this job (of `project_id`, its ID token from GitLab `issuer`) lives until
        `expires_at`, exchanged for an ID token valid until `subject_expires_at` (its `exp` with the issuer's
        clock skew; the ledger keeps the latest of each), unless the job has finished: then record nothing and
        return False (issue nothing)."""
        ...

    async def credentials_until(self, job_id: str) -> float | None:
        """When the job's last unexpired credential expires; None when it holds none."""
        ...

    async def jobs_with_credentials(self, limit: int) -> list[LiveJob]:
        """At most `limit` jobs holding unexpired credentials, the latest-expiring first, finished ones included
        (the caller skips those already denied)."""
        ...


class ExchangeStore(ReplayCounter, JobLedger, Protocol):
    """What the credential service is given (cli/serve.py picks it: SQLite in the state directory, or the shared
    PostgreSQL of exchange_store_pg.py); its owner opens and closes it."""

    def status(self) -> dict[str, str]:
        """Which store this is and where, for /status: never a password."""
        ...


class MemoryExchangeStore:
    """Both interfaces in this process's memory: forgotten on restart, per process, so for tests only.

    Bounded: when `capacity` subject tokens are tracked, a new one is refused rather than an old record
    evicted, which would reopen a replay window.
    """

    def __init__(self, *, capacity: int = 100_000, clock: Callable[[], float] = time.time) -> None:
        self._capacity = capacity
        self._clock = clock
        self._uses: dict[str, int] = {}
        self._expiry: list[tuple[float, str]] = []
        self._finished: dict[str, float] = {}
        self._ends: dict[str, FinishedJob] = {}
        self._credentials: dict[str, LiveJob] = {}
        self._subjects: dict[str, float] = {}

    async def claim(self, subject: str, expires_at: float, limit: int) -> bool:
        self._prune(self._clock())
        uses = self._uses.get(subject, 0)
        if uses >= limit:
            return False
        if not uses:
            if len(self._uses) >= self._capacity:
                raise ExchangeStoreError("too many subject tokens in flight")
            heapq.heappush(self._expiry, (expires_at, subject))
        self._uses[subject] = uses + 1
        return True

    async def finish(
        self, job_id: str, keep_until: float, *, project_id: str | None = None, finished_at: float | None = None
    ) -> float | None:
        self._finished[job_id] = max(keep_until, self._finished.get(job_id, 0.0))
        known = self._ends.get(job_id)
        if known is not None:
            project_id = known.project_id if project_id is None else project_id
            finished_at = known.finished_at if finished_at is None else max(finished_at, known.finished_at)
        if finished_at is not None:
            self._ends[job_id] = FinishedJob(job_id, project_id, finished_at)
        held = max(await self.credentials_until(job_id) or 0.0, self._subjects.get(job_id, 0.0))
        return held if held > self._clock() else None

    async def is_finished(self, job_id: str) -> bool:
        return self._finished.get(job_id, 0.0) > self._clock()

    async def finished_projects(self, since: float) -> set[str | None]:
        return {end.project_id for end in self._ended_since(since)}

    async def finished_since(self, since: float, limit: int, projects: Collection[str | None]) -> list[FinishedJob]:
        chosen = set(projects)
        kept = (end for end in self._ended_since(since) if end.project_id in chosen)
        return heapq.nsmallest(max(limit, 0), kept, key=lambda end: (-end.finished_at, end.job_id))

    def _ended_since(self, since: float) -> Iterator[FinishedJob]:
        now = self._clock()
        return (e for e in self._ends.values() if e.finished_at > since and self._finished.get(e.job_id, 0.0) > now)

    async def issued(
        self,
        job_id: str,
        expires_at: float,
        *,
        project_id: str | None,
        issuer: str,
        subject_expires_at: float | None = None,
    ) -> bool:
        if await self.is_finished(job_id):
            return False
        if subject_expires_at is not None:
            self._subjects[job_id] = max(subject_expires_at, self._subjects.get(job_id, 0.0))
        known = self._credentials.get(job_id)
        latest = max(expires_at, known.expires_at) if known is not None else expires_at
        self._credentials[job_id] = LiveJob(job_id, project_id, issuer, latest)
        return True

    async def credentials_until(self, job_id: str) -> float | None:
        job = self._credentials.get(job_id)
        return job.expires_at if job is not None and job.expires_at > self._clock() else None

    async def jobs_with_credentials(self, limit: int) -> list[LiveJob]:
        now = self._clock()
        live = (job for job in self._credentials.values() if job.expires_at > now)
        return heapq.nsmallest(max(limit, 0), live, key=lambda job: (-job.expires_at, job.job_id))

    def status(self) -> dict[str, str]:
        return {"kind": "memory"}

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, subject = heapq.heappop(self._expiry)
            self._uses.pop(subject, None)


class SqliteExchangeStore:
    """Both interfaces in one SQLite file: survives kill -9 and power loss, shared by processes on one host.

    WAL with `synchronous=FULL`: a use the exchange counted (and answered with a credential) is on disk before
    the credential leaves, so no crash hands out a 4th. Each write is one short `BEGIN IMMEDIATE` transaction,
    so the check and the increment cannot interleave with another process's. Expired rows are deleted by the
    writes themselves (indexed by expiry), so the file stays as small as what is still alive. Mode 0600: the
    file holds job ids and token ids, not tokens, but nobody else needs them.

    The methods are coroutines over a synchronous sqlite3 connection, on the loop as before the interface went
    async: a local write and one fsync (0.4 ms median, docs/token-exchange.md) cost less than a thread hop, and
    a call that never suspends cannot interleave with another exchange of this process.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._clock = clock
        try:
            self._db = _open(path, busy_timeout)
        except StateFileError as error:
            raise ExchangeStoreError(str(error)) from None
        except (OSError, sqlite3.Error) as error:
            raise ExchangeStoreError(f"{path}: cannot open the exchange state database: {error}") from None

    async def claim(self, subject: str, expires_at: float, limit: int) -> bool:
        if limit < 1:
            return False
        with self._write() as db:
            counted = db.execute(
                "INSERT INTO replay (subject, uses, expires_at) VALUES (?, 1, ?) "
                "ON CONFLICT (subject) DO UPDATE SET uses = uses + 1, "
                "expires_at = max(expires_at, excluded.expires_at) WHERE uses < ?",
                (subject, expires_at, limit),
            ).rowcount
        return counted == 1

    async def finish(
        self, job_id: str, keep_until: float, *, project_id: str | None = None, finished_at: float | None = None
    ) -> float | None:
        with self._write() as db:
            db.execute(_FINISH, (job_id, keep_until, project_id, finished_at))
            row = db.execute(_HELD_UNTIL, (job_id, self._clock())).fetchone()
        return None if row is None else float(row[0])

    async def is_finished(self, job_id: str) -> bool:
        return self._read(_FINISHED, job_id) is not None

    async def finished_projects(self, since: float) -> set[str | None]:
        rows = self._rows(_FINISHED_PROJECTS, (since, self._clock()))
        return {None if project is None else str(project) for (project,) in rows}

    async def finished_since(self, since: float, limit: int, projects: Collection[str | None]) -> list[FinishedJob]:
        """One indexed query per `_PROJECTS_PER_QUERY` projects (the unknown one with the first), merged: each is
        bounded by `limit` already."""
        named = sorted(str(project) for project in projects if project is not None)
        chunks = [named[i : i + _PROJECTS_PER_QUERY] for i in range(0, len(named), _PROJECTS_PER_QUERY)] or [[]]
        found: list[FinishedJob] = []
        for n, chunk in enumerate(chunks):
            where = [f"project_id IN ({', '.join('?' * len(chunk))})"] if chunk else []
            where += ["project_id IS NULL"] if n == 0 and None in projects else []
            if where:
                query = _FINISHED_SINCE.format(projects=" OR ".join(where))
                rows = self._rows(query, (since, self._clock(), *chunk, max(limit, 0)))
                found += (FinishedJob(str(job), None if p is None else str(p), float(at)) for job, p, at in rows)
        return heapq.nsmallest(max(limit, 0), found, key=lambda end: (-end.finished_at, end.job_id))

    def _rows(self, query: str, params: tuple[object, ...]) -> list[Any]:
        try:
            return list(self._db.execute(query, params).fetchall())
        except sqlite3.Error as error:
            raise ExchangeStoreError(f"{self.path}: cannot read the exchange state: {error}") from None

    async def issued(
        self,
        job_id: str,
        expires_at: float,
        *,
        project_id: str | None,
        issuer: str,
        subject_expires_at: float | None = None,
    ) -> bool:
        with self._write() as db:
            if db.execute(_FINISHED, (job_id, self._clock())).fetchone() is not None:
                return False
            db.execute(
                "INSERT INTO job_credentials (job_id, project_id, issuer, expires_at, subject_expires_at) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (job_id) DO UPDATE SET project_id = excluded.project_id, issuer = excluded.issuer, "
                "expires_at = max(expires_at, excluded.expires_at), subject_expires_at = "
                "max(coalesce(subject_expires_at, 0), coalesce(excluded.subject_expires_at, 0))",
                (job_id, project_id, issuer, expires_at, subject_expires_at),
            )
        return True

    async def credentials_until(self, job_id: str) -> float | None:
        return self._read(_CREDENTIALS_UNTIL, job_id)

    async def jobs_with_credentials(self, limit: int) -> list[LiveJob]:
        try:
            rows = self._db.execute(_LIVE_JOBS, (self._clock(), max(limit, 0))).fetchall()
        except sqlite3.Error as error:
            raise ExchangeStoreError(f"{self.path}: cannot read the exchange state: {error}") from None
        return [
            LiveJob(str(job), None if project is None else str(project), str(issuer), float(expires_at))
            for job, project, issuer, expires_at in rows
        ]

    def status(self) -> dict[str, str]:
        return {"kind": "file", "path": str(self.path)}

    def close(self) -> None:
        self._db.close()

    def _read(self, query: str, job_id: str) -> float | None:
        try:
            row = self._db.execute(query, (job_id, self._clock())).fetchone()
        except sqlite3.Error as error:
            raise ExchangeStoreError(f"{self.path}: cannot read the exchange state: {error}") from None
        return None if row is None else float(row[0])

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction (the write lock is taken before the read), expired rows swept first."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise ExchangeStoreError(f"{self.path}: cannot write the exchange state: {error}") from None
        try:
            now = self._clock()
            for table, column in _TABLES:
                db.execute(f"DELETE FROM {table} WHERE {column} <= ?", (now,))
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise ExchangeStoreError(f"{self.path}: cannot write the exchange state: {error}") from None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """Created whole (schema and version, under a temporary name, then linked into place) and 0600 (its -wal and
    -shm files copy the mode). A file that exists must be our database at our schema version: a 0-byte, foreign
    or damaged file is an error, since starting empty would forget every use count and finished job."""
    create_database(path, _initialise)
    make_private(path)
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            raise sqlite3.DatabaseError("not an exchange state database (empty or foreign: no schema version)")
        if version == 1:  # a file of the release before subject expiries were kept: one column more
            version = _upgrade(db, 1, f"{_UPGRADE_FROM_1}; {_HELD_INDEX}")
        if version == 2:  # a file of the release before finished jobs kept their project and end time
            version = _upgrade(db, 2, f"{_UPGRADE_FROM_2}; {_FINISHED_AT_INDEX}")
        if version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}, this release reads {SCHEMA_VERSION}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"journal_mode is {mode}, not wal")
        db.execute("PRAGMA synchronous=FULL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")
        for query in _SHAPE:  # every table and column read: an older or foreign file would 503 each exchange
            db.execute(query).fetchall()
    except BaseException:
        db.close()
        raise
    return db


def _upgrade(db: sqlite3.Connection, version: int, script: str) -> int:
    """Bring a file at `version` to the next one in one transaction, and return the version it is at. The version
    is read again under the write lock: another process opening the same file at the same moment has upgraded it
    already (its ALTERs done again would fail)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] == version:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return found


def _initialise(db: sqlite3.Connection) -> None:
    db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
