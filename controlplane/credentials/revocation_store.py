"""Where the deny list of finished jobs is kept: one small async interface, a file and a PostgreSQL implementation.

Why an interface: a replica enforces the deny list from memory (`Revocations`, read on every compile and every
gateway check), but what it holds must outlive the process and, with several replicas, be the same everywhere.
The state directory's file does the first for one process; the PostgreSQL table (revocation_store_pg.py) does
both, and tells the other replicas (a change notification, controlplane/store/changes.py). `Revocations` only
talks to this interface, so the two behave alike and one test suite (tests/test_revocation_store.py) holds
both to it.

Every write is a merge: a job is denied until the latest time anyone asked for, never shortened. Reads are
incremental: each write takes the next number of a sequence, so a reader asks for what came after the last
number it saw (`changes(since)`) and `changes(0)` is everything. Expired entries are never returned, so
correctness never waits for `prune()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from controlplane.statefile import OffLoopWriter, malformed, read_json

REVOCATIONS_FILE = "revoked-jobs.json"  # its name in the state directory
_UNSAVED = "the deny list is enforced from memory, not yet on disk"


class RevocationStoreError(Exception):
    """The store could not be read or written; the message names it (a redacted DSN, a path), never a secret."""


class RevocationStore(Protocol):
    async def open(self) -> None:
        """Ready for use; an unreadable store raises (StateFileError or RevocationStoreError): fail closed."""

    async def close(self) -> None: ...

    async def changes(self, since: int) -> tuple[dict[str, float], int]:
        """The entries still in force written after cursor `since` (0: all of them), and the cursor to pass next."""

    async def save(self, entries: Mapping[str, float]) -> None:
        """Deny each job until at least its time, durably (and announced to other replicas), or raise
        RevocationStoreError."""

    async def prune(self) -> int:
        """Forget expired entries; how many. Raises RevocationStoreError when it could not."""

    def status(self) -> dict[str, object]: ...


class FileRevocationStore:
    """Today's `revoked-jobs.json` in the state directory (format `{"version": 1, "revoked": {job: until}}`),
    written whole and atomically in a worker thread. Sequence numbers live in memory only: with one process per
    state directory nobody else writes the file. `path=None` keeps the list in memory (tests, `validate`)."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._until: dict[str, float] = {}
        self._seq: dict[str, int] = {}
        self._top = 0
        self._loaded = False
        self._writer = None if path is None else OffLoopWriter(path, _UNSAVED)

    def read(self) -> dict[str, float]:
        """The persisted list, read now (a local file: synchronous, so a constructor can fail closed). {} only
        when there is none yet; a file that cannot be read raises `StateFileError`: starting with an empty list
        would hand access back to every finished job."""
        if not self._loaded:
            self._until = self._read_file()
            self._top = 1 if self._until else 0
            self._seq = dict.fromkeys(self._until, self._top)
            self._loaded = True
        return dict(self._until)

    async def open(self) -> None:
        self.read()

    async def close(self) -> None:
        return None

    async def changes(self, since: int) -> tuple[dict[str, float], int]:
        now = self.clock()
        fresh = {job: until for job, until in self._until.items() if self._seq[job] > since and until > now}
        return fresh, max(self._top, since)

    async def save(self, entries: Mapping[str, float]) -> None:
        self.read()
        now = self.clock()
        changed = {job: until for job, until in entries.items() if max(self._until.get(job, 0.0), now) < until}
        if changed:
            self._top += 1
            for job, until in changed.items():
                self._until[job] = until
                self._seq[job] = self._top
        await self._write()

    async def prune(self) -> int:
        now = self.clock()
        expired = [job for job, until in self._until.items() if until <= now]
        for job in expired:
            del self._until[job]
            del self._seq[job]
        if expired:
            await self._write()
        return len(expired)

    def status(self) -> dict[str, object]:
        return {"kind": "file", "path": None if self.path is None else str(self.path)}

    async def _write(self) -> None:
        """The whole list; a failure was reported by the writer (log, metric) and is raised for the caller's
        outbox, which retries it."""
        if self._writer is not None and not await self._writer.write({"version": 1, "revoked": dict(self._until)}):
            raise RevocationStoreError(f"{self.path}: the deny list could not be written")

    def _read_file(self) -> dict[str, float]:
        if self.path is None:
            return {}
        document = read_json(self.path)
        if document is None:
            return {}
        revoked = document.get("revoked") if isinstance(document, dict) else None
        if not isinstance(revoked, dict):
            raise malformed(self.path, 'expected an object with a "revoked" object (job id -> Unix time)')
        try:
            return {str(job): float(until) for job, until in revoked.items()}
        except (TypeError, ValueError):
            raise malformed(self.path, "a revocation's time is not a number") from None
