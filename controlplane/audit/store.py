"""The audit store: an append-only SQLite table of requests, written off the event loop, read by anyone.

Durability. The database runs in WAL mode with `synchronous=FULL`: every commit fsyncs the WAL, so a
record the store has reported committed (`flush()` returned True; the ALS stream it came on was answered)
survives a control-plane crash *and* a power loss. `NORMAL` would only survive a process crash, which is
not enough for an audit trail. The price of FULL is one fsync per commit; the writer commits in batches
(everything queued, up to `batch_size`), so under load it is one fsync per batch, not per request.

Never blocking Envoy. `submit` is a non-blocking put on a bounded queue that one writer thread drains; when
the queue is full a record is dropped and counted (`controlplane_audit_records_dropped_total{gateway,reason}`)
rather than slowing the ALS stream, and through it the proxy. A graceful `close()` drains the queue first.

Fair to every sender. The queue is one FIFO per sender (a key the caller chooses: als.py gives each access-log
stream its own, or each mTLS certificate): one sender may hold at most `sender_queue_size` records, and when
the whole queue is full a new record displaces the oldest record of the sender holding the most (longest-queue
drop), so a flooding sender loses its own records and never another's. The writer takes its batches
round-robin across senders, so a backlog from one never delays the others. Drops are counted per bounded
label (a gateway group); the sender that dropped the most is named in a log line at most every 10 s.

Never storing a token. Records hold a fixed set of short fields (never a whole JWT payload or a header);
every text field is cut to a bounded length, anything shaped like a JWT or a GitLab token is replaced by
`[redacted]`, and paths lose their query string here too, whatever the sender did.

Append-only. There is no update API and a trigger refuses UPDATE; the only deletion is the retention sweep,
which removes whole rows older than `retention`. Ids are AUTOINCREMENT, so they are never reused.

Reading. `query_records` takes a read-only connection (`open_readonly`, a `mode=ro` URI) so the CLI can
query a live store from another process; WAL lets it read while the writer commits.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

from controlplane.audit.metrics import (
    AUDIT_RECORDS_DROPPED,
    AUDIT_RECORDS_WRITTEN,
    AUDIT_WRITE_DURATION,
    UNKNOWN_LABEL,
)
from controlplane.statefile import (
    StateFileError,
    create_database,
    default_state_dir,
    ensure_state_dir,
    fsync_directory,
    make_private,
)

log = logging.getLogger("controlplane.audit")

DB_NAME = "audit.sqlite3"
DEFAULT_RETENTION = 30 * 86_400.0  # seconds; serve's `--audit-retention` (README: 30 days)
DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_SENDER_QUEUE_SIZE = 2_500  # a quarter: one sender's backlog leaves room for the others
DEFAULT_BATCH_SIZE = 500
DEFAULT_PRUNE_INTERVAL = 300.0
DEFAULT_QUERY_LIMIT = 100
DROP_REPORT_INTERVAL = 10.0  # seconds between two log lines naming the sender that dropped the most
MAX_TALLIED_SENDERS = 1024  # senders whose drops are told apart between two such lines
_SHOWN_SENDER_CHARS = 300

MAX_PATH_CHARS = 2048
MAX_FIELD_CHARS = 256
REDACTED = "[redacted]"
# A JWT (three base64url parts, header starting `{"`) or a GitLab token (glpat-, gldt-, glcbt-, glrt-...).
_SECRET = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*|\bgl[a-z]{2,6}-[A-Za-z0-9_.-]{16,}")

SCHEMA_VERSION = 4
# Columns added after version 1, with their types: added in place to an older file (existing rows get NULL).
# Version 2: the attested sender and Envoy's own start time. Version 3: the token claims `controlplane suggest`
# pins subjects on (a row recorded before has NULL there, which the assistant reads as "not recorded").
# Version 4: the cloud identity (AWS role ARN, Google service account) a request was sent upstream as.
_ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("peer", "TEXT"),
    ("identity", "TEXT"),
    ("reported_time", "REAL"),
    ("ref_type", "TEXT"),
    ("ref_protected", "TEXT"),
    ("pipeline_source", "TEXT"),
    ("environment", "TEXT"),
    ("cloud_identity", "TEXT"),
)
# Claims GitLab keeps to a few short words (`branch`, `true`, `merge_request_event`): cut shorter than the rest.
MAX_SHORT_CHARS = 64
SHORT_FIELDS = frozenset({"ref_type", "ref_protected", "pipeline_source"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    gateway TEXT NOT NULL,
    node TEXT NOT NULL,
    backend TEXT,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('allowed', 'denied')),
    details TEXT,
    policy TEXT,
    project_id TEXT,
    project_path TEXT,
    pipeline_id TEXT,
    job_id TEXT,
    ref TEXT,
    user TEXT,
    credential_jti TEXT,
    issuer TEXT,
    peer TEXT,
    identity TEXT,
    reported_time REAL,
    ref_type TEXT,
    ref_protected TEXT,
    pipeline_source TEXT,
    environment TEXT,
    cloud_identity TEXT
);
CREATE INDEX IF NOT EXISTS audit_job ON audit (job_id, time);
CREATE INDEX IF NOT EXISTS audit_project ON audit (project_path, time);
CREATE INDEX IF NOT EXISTS audit_project_id ON audit (project_id, time);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
"""


@dataclass(frozen=True)
class AuditRecord:
    """One request as the audit trail keeps it. Claim fields are None when the request carried no valid token.

    `time` is when the control plane received the entry (Unix seconds; a sender cannot choose it);
    `reported_time` the request's start as Envoy reported it, informational only and clamped to a window
    around `time`. `gateway` and `node` are the sender's attested xDS identity, `peer` its address (host) and
    `identity` its mTLS client certificate's (None in plain text). `details` is Envoy's reason for the status
    (which filter said no, and why); `policy` the RBAC effective policy id (`<binding>/<role>`);
    `credential_jti` is set only for the control plane's own exchanged credentials. `ref_type`,
    `ref_protected` (`"true"`/`"false"`, as GitLab writes it), `pipeline_source` and `environment` are the
    token's claims (schema version 3; None in rows recorded before, and `environment` for a job without one).
    `cloud_identity` (schema version 4) is the AWS role ARN or Google service account the request was sent
    upstream as: set only for an allowed request that reached an `aws:` or `gcp:` backend (audit/als.py).
    """

    time: float
    gateway: str
    node: str
    backend: str | None
    method: str
    path: str
    status: int
    decision: str
    details: str | None = None
    policy: str | None = None
    project_id: str | None = None
    project_path: str | None = None
    pipeline_id: str | None = None
    job_id: str | None = None
    ref: str | None = None
    user: str | None = None
    credential_jti: str | None = None
    issuer: str | None = None
    peer: str | None = None
    identity: str | None = None
    reported_time: float | None = None
    ref_type: str | None = None
    ref_protected: str | None = None
    pipeline_source: str | None = None
    environment: str | None = None
    cloud_identity: str | None = None


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))
SeenJob = tuple[str, str, str | None, float]  # (job_id, project_id, issuer, last seen): see `recent_jobs`


class AuditTrail(Protocol):
    """What the ALS receiver, the recovery sweep and /status need of an audit store, whichever it is: this
    module's SQLite `AuditStore` or store_pg.py's `PostgresAuditStore`. `submit` never blocks (it is called on
    the event loop for every access-log entry); `flush` and the reads block, and are called from worker threads.
    Opening and closing differ (a file, or a pool on the event loop) and are left to their owner (cli/serve.py)."""

    def submit(self, record: AuditRecord, *, sender: str = "", label: str = UNKNOWN_LABEL) -> bool: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def query(
        self,
        job: str | None = None,
        project: str | None = None,
        since: float | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]: ...

    def recent_jobs(self, since: float, limit: int = 1000) -> list[SeenJob]: ...

    def status(self) -> dict[str, object]: ...


_INSERT = f"INSERT INTO audit ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


def strip_query(path: str) -> str:
    """`/a/b?token=x#frag` → `/a/b`: queries and fragments may carry secrets and never enter the trail."""
    return path.split("?", 1)[0].split("#", 1)[0]


def _safe_text(value: str, limit: int) -> str:
    return _SECRET.sub(REDACTED, value[:limit])


def sanitize(record: AuditRecord) -> AuditRecord:
    """The record as it may be stored: path without query, bounded fields, token-shaped text redacted."""
    changes: dict[str, Any] = {"path": _safe_text(strip_query(record.path), MAX_PATH_CHARS)}
    for field in fields(AuditRecord):
        value = getattr(record, field.name)
        if field.name != "path" and isinstance(value, str):
            changes[field.name] = _safe_text(value, MAX_SHORT_CHARS if field.name in SHORT_FIELDS else MAX_FIELD_CHARS)
    return replace(record, **changes)


def default_db_path() -> Path:
    """`<state dir>/audit.sqlite3`, the state dir being $CONTROLPLANE_STATE_DIR or `.controlplane`."""
    return default_state_dir() / DB_NAME


def _connect_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)  # explicit transactions
    _check_schema(conn)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode (journal_mode={mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    _migrate(conn)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return conn


def _check_schema(conn: sqlite3.Connection) -> None:
    """The file must be an audit store this release reads: `create_database` only ever links a complete one into
    place, so an empty or schema-less file is damage (or someone else's), never a new store."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit'").fetchone()
    if table is None:
        raise sqlite3.DatabaseError("not an audit store (empty or foreign: no audit table)")
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version}, this release reads up to {SCHEMA_VERSION}")


def _initialise(conn: sqlite3.Connection) -> None:
    conn.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring an older file's table up to `_SCHEMA` (ADD COLUMN only: rows are never rewritten)."""
    present = {str(row[1]) for row in conn.execute("PRAGMA table_info(audit)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE audit ADD COLUMN {name} {kind}")


def _open_private_writer(path: Path) -> sqlite3.Connection:
    """The writer connection on a file only this user can read (SQLite gives its WAL and shared-memory files the
    database's mode). A file that is not a usable database raises `StateFileError` naming it: an audit trail
    silently started afresh, or a crash with a bare SQLite message, would both hide the damage."""
    ensure_state_dir(path.parent)
    create_database(path, _initialise)
    make_private(path)
    for companion in ("-wal", "-shm"):
        make_private(path.with_name(path.name + companion))
    try:
        conn = _connect_writer(path)
    except sqlite3.Error as error:
        raise StateFileError(f"{path}: not a usable audit store ({error}): restore it or move it away") from None
    _fsync_parent(path)
    return conn


def _fsync_parent(path: Path) -> None:
    try:
        fsync_directory(path.parent)
    except OSError as error:
        log.warning("audit store %s: cannot fsync its directory: %s", path, error.strerror)


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection (works while `serve` writes, and can never modify the trail)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no audit store here")
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.row_factory = sqlite3.Row
    return conn


def record_filter(job: str | None, project: str | None, since: float | None, placeholder: str) -> tuple[str, list[Any]]:
    """The WHERE clause of `audit`'s filters and its parameters, in the driver's `placeholder` (SQLite's `?`,
    psycopg's `%s`), so both stores answer a query alike. `project` is a path or, if all digits, an id."""
    where: list[str] = []
    params: list[Any] = []
    if job is not None:
        where.append(f"job_id = {placeholder}")
        params.append(job)
    if project is not None:
        where.append(f"{'project_id' if project.isdigit() else 'project_path'} = {placeholder}")
        params.append(project)
    if since is not None:
        where.append(f"time >= {placeholder}")
        params.append(since)
    return (f"WHERE {' AND '.join(where)}" if where else ""), params


def selected_columns(present: Iterable[str], quote: Callable[[str], str]) -> str:
    """The SELECT list of every record column, NULL for a column the table does not have yet: a reader (the CLI,
    `suggest`, read-only) may be newer than the `serve` still writing an older file or database, and it never
    migrates; such a row simply has not recorded that field."""
    have = set(present)
    return ", ".join(quote(c) if c in have else f"NULL AS {quote(c)}" for c in COLUMNS)


def query_records(
    conn: sqlite3.Connection,
    *,
    job: str | None = None,
    project: str | None = None,
    since: float | None = None,
    limit: int = DEFAULT_QUERY_LIMIT,
) -> list[dict[str, Any]]:
    """The most recent `limit` records matching every filter given, oldest first.

    `project` is a path (`acme/app`) or, if all digits, a project id.
    """
    clause, params = record_filter(job, project, since, "?")
    present = {str(row[1]) for row in conn.execute("PRAGMA table_info(audit)")}
    sql = f"SELECT id, {selected_columns(present, str)} FROM audit {clause} ORDER BY time DESC, id DESC LIMIT ?"
    rows = conn.execute(sql, (*params, max(0, limit))).fetchall()
    return [{key: row[key] for key in ("id", *COLUMNS)} for row in reversed(rows)]


def recent_jobs(conn: sqlite3.Connection, since: float, limit: int) -> list[SeenJob]:
    """(job_id, project_id, issuer, last seen) of the jobs seen at a gateway since `since`, most recent first,
    at most `limit`: the jobs whose finish the control plane may have missed (see credentials/recovery.py)."""
    rows = conn.execute(
        "SELECT job_id, project_id, issuer, MAX(time) AS last FROM audit"
        " WHERE time >= ? AND job_id IS NOT NULL AND project_id IS NOT NULL"
        " GROUP BY job_id, project_id, issuer ORDER BY last DESC LIMIT ?",
        (since, max(0, limit)),
    ).fetchall()
    return [(str(r[0]), str(r[1]), None if r[2] is None else str(r[2]), float(r[3])) for r in rows]


class AuditStore:
    """The append-only store and its writer thread. Thread-safe; `submit` may be called from the event loop."""

    def __init__(
        self,
        path: Path,
        *,
        retention: float | None = DEFAULT_RETENTION,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        sender_queue_size: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        prune_interval: float = DEFAULT_PRUNE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Opens (creating if needed) the database and starts the writer; `retention` None keeps everything.

        `sender_queue_size` (default: a quarter of `queue_size`, at least 1) bounds one sender's share."""
        self.path = path
        self.retention = retention
        self._batch_size = batch_size
        self._prune_interval = prune_interval
        self._clock = clock
        self._conn = _open_private_writer(path)
        self._conn_lock = threading.Lock()  # the writer thread and prune() share the connection
        self._queue_size = max(1, queue_size)
        self._sender_queue_size = max(1, sender_queue_size or queue_size // 4)
        self._pending: dict[str, deque[tuple[AuditRecord, str]]] = {}  # sender -> (record, label), oldest first
        self._queued = 0
        self._progress = threading.Condition()  # guards the queue and the counters; the writer waits on it
        self._accepted = 0  # records queued so far
        self._settled = 0  # of those, committed or given up on
        self._closed = False
        self._drops: dict[str, int] = {}  # queue_full drops by sender since the last report
        self._drops_untallied = 0  # of those, from senders past MAX_TALLIED_SENDERS
        self._drops_since = time.monotonic()
        self._next_drop_report = 0.0  # monotonic; the first drop is reported at once
        self.prune()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    # -- writing

    def submit(self, record: AuditRecord, *, sender: str = "", label: str = UNKNOWN_LABEL) -> bool:
        """Queue a record without ever blocking; False (and counted as dropped) when closed or when this sender
        already holds its share or the most of a full queue.

        `sender` keys the fairness and names the sender in the drop report (als.py: an access-log stream or a
        certificate), `label` is the bounded `gateway` label its drops are counted under (a policy group)."""
        with self._progress:
            accepted = self._enqueue(record, sender, label)
            report = self._due_drop_report()
        if report is not None:
            log.warning(*report)
        return accepted

    def _enqueue(self, record: AuditRecord, sender: str, label: str) -> bool:
        """`submit` under the lock."""
        if self._closed:
            _dropped(label, "closed")
            return False
        own = self._pending.get(sender)
        held = len(own) if own is not None else 0
        if held >= self._sender_queue_size or (self._queued >= self._queue_size and not self._displace(held)):
            self._queue_full(sender, label)
            return False
        if own is None:
            own = self._pending[sender] = deque()
        own.append((record, label))
        self._queued += 1
        self._accepted += 1
        self._progress.notify_all()
        return True

    def _displace(self, held: int) -> bool:
        """Make room in a full queue by dropping the oldest record of the sender holding the most, if that
        sender holds more than the newcomer would (then a flood displaces only itself). Caller holds the lock."""
        victim = max(self._pending, key=lambda key: len(self._pending[key]))
        records = self._pending[victim]
        if len(records) <= held + 1:
            return False
        _, label = records.popleft()
        self._queue_full(victim, label)
        self._queued -= 1
        self._settled += 1
        return True

    def _queue_full(self, sender: str, label: str) -> None:
        """Count a record dropped for want of room: by label for metrics, by sender for the report."""
        _dropped(label, "queue_full")
        if sender in self._drops or len(self._drops) < MAX_TALLIED_SENDERS:
            self._drops[sender] = self._drops.get(sender, 0) + 1
        else:
            self._drops_untallied += 1

    def _due_drop_report(self, *, force: bool = False) -> tuple[Any, ...] | None:
        """The log line (format and arguments) naming the sender that dropped the most since the last one, if
        one is due; metric labels are groups, so this line is what tells which stream flooded. Lock held."""
        now = time.monotonic()
        if not self._drops or (now < self._next_drop_report and not force):
            return None
        heaviest = max(self._drops, key=self._drops.__getitem__)
        total = sum(self._drops.values()) + self._drops_untallied
        report = (
            "audit queue full: %d record(s) dropped from %d sender(s) in %.0fs, the most (%d) from %s",
            total,
            len(self._drops) + (1 if self._drops_untallied else 0),
            now - self._drops_since,
            self._drops[heaviest],
            heaviest[:_SHOWN_SENDER_CHARS],
        )
        self._drops, self._drops_untallied, self._drops_since = {}, 0, now
        self._next_drop_report = now + DROP_REPORT_INTERVAL
        return report

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before this call is committed (or failed). False on timeout."""
        with self._progress:
            target = self._accepted
            return self._progress.wait_for(lambda: self._settled >= target, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new records, commit everything queued, stop the writer and close the database."""
        with self._progress:
            if self._closed:
                return
            self._closed = True
            self._progress.notify_all()  # the writer drains what is queued, then stops
            report = self._due_drop_report(force=True)  # drops not yet reported
        if report is not None:
            log.warning(*report)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("audit writer did not finish within %.1fs; queued records may be lost", timeout or 0.0)
            return
        with self._conn_lock:
            self._conn.close()

    def prune(self) -> int:
        """Delete records older than the retention; returns how many. Also run by the writer periodically."""
        if self.retention is None:
            return 0
        cutoff = self._clock() - self.retention
        with self._conn_lock:
            deleted = self._conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,)).rowcount
        if deleted:
            log.info("audit retention: deleted %d record(s) older than %.0fs", deleted, self.retention)
        return int(deleted)

    def _run(self) -> None:
        next_prune = time.monotonic() + self._prune_interval
        while True:
            batch, stop = self._take(max(0.0, next_prune - time.monotonic()))
            if batch:
                self._write(batch)
            if time.monotonic() >= next_prune:
                self._prune_quietly()
                next_prune = time.monotonic() + self._prune_interval
            if stop:
                return

    def _take(self, timeout: float) -> tuple[list[tuple[AuditRecord, str]], bool]:
        """Up to a batch, one record per sender in turn (waiting up to `timeout` for the first); and whether
        the writer may stop (closed and nothing left)."""
        with self._progress:
            self._progress.wait_for(lambda: self._queued > 0 or self._closed, timeout)
            batch: list[tuple[AuditRecord, str]] = []
            while self._pending and len(batch) < self._batch_size:
                for sender in tuple(self._pending):
                    records = self._pending[sender]
                    batch.append(records.popleft())
                    if not records:
                        del self._pending[sender]
                    if len(batch) >= self._batch_size:
                        break
            self._queued -= len(batch)
            return batch, self._closed and not self._queued

    def _write(self, labelled: list[tuple[AuditRecord, str]]) -> None:
        batch = [record for record, _ in labelled]
        started = time.perf_counter()
        try:
            with self._conn_lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(_INSERT, _rows(batch))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
        except Exception as error:  # disk full, I/O error, or a bug: count the loss, keep the writer alive
            for _, label in labelled:
                _dropped(label, "write_failed")
            log.error("audit store %s: could not write %d record(s): %s", self.path, len(batch), error)
        else:
            AUDIT_RECORDS_WRITTEN.inc(len(batch))
            AUDIT_WRITE_DURATION.observe(time.perf_counter() - started)
        finally:
            with self._progress:
                self._settled += len(batch)
                self._progress.notify_all()

    def _prune_quietly(self) -> None:
        try:
            self.prune()
        except sqlite3.Error as error:
            log.error("audit store %s: retention sweep failed: %s", self.path, error)

    # -- reading

    def query(
        self,
        job: str | None = None,
        project: str | None = None,
        since: float | None = None,
        limit: int = DEFAULT_QUERY_LIMIT,
    ) -> list[dict[str, Any]]:
        """See `query_records`; reads through its own read-only connection, never waiting for the writer."""
        conn = open_readonly(self.path)
        try:
            return query_records(conn, job=job, project=project, since=since, limit=limit)
        finally:
            conn.close()

    def recent_jobs(self, since: float, limit: int = 1000) -> list[SeenJob]:
        """See the module-level `recent_jobs`; a read-only connection, never waiting for the writer."""
        conn = open_readonly(self.path)
        try:
            return recent_jobs(conn, since, limit)
        finally:
            conn.close()

    def status(self) -> dict[str, object]:
        """For /status: the file, and what waits in the writer's queue."""
        with self._progress:
            return {"kind": "file", "path": str(self.path), "queued": self._queued}


def _dropped(label: str, reason: str) -> None:
    AUDIT_RECORDS_DROPPED.labels(gateway=label, reason=reason).inc()


def _rows(batch: Iterable[AuditRecord]) -> Iterable[tuple[Any, ...]]:
    return (astuple(sanitize(record)) for record in batch)
