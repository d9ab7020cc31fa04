"""The remembered project ids (pins) in PostgreSQL: one record for every replica.

Why shared: a pin is what stops a re-used path from gaining the old project's access. If each replica kept
its own, a replica started after the re-use would pin the path to the NEW project and grant what the others
refuse, and replicas would compile different resources from the same policy.

How, with the interface the compiler calls synchronously from the policy service's worker thread:
- `current` is the table as last read, plus the pins this replica resolved and has not written yet; the
  table wins a disagreement (another replica pinned that path first).
- `save` only records new pins in memory and wakes `run()`, which writes them on the event loop:
  `INSERT ... ON CONFLICT DO NOTHING`, one row per path, so concurrent writers never lose each other's pins
  (nothing overwrites the set) and the first meaning of a path wins everywhere. The write notifies the other
  replicas (topic `pins`), which re-read the table; so does every (re)connect of the change feed.
- A pin that changed what `current` says (another replica's, or a conflict lost) calls `on_change`: the
  policy service recompiles with it, as it would after resolving it itself.
- PostgreSQL away: unwritten pins stay in memory (they are what this replica compiles with) and are written
  once it answers, with a growing backoff; `status()` says how many wait. At start the table must be read
  (`open`), as the pins file must: starting without the pins could rebind a re-used path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

import psycopg

from controlplane.retry import Backoff
from controlplane.sources.pins import Pins
from controlplane.store.changes import publish
from controlplane.store.pool import StorePool, StoreUnavailable

log = logging.getLogger("controlplane.pins")

TOPIC = "pins"
_INSERT = (
    "INSERT INTO pins (issuer, path, project_id, pinned_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (issuer, path) DO NOTHING"
)
_READ = "SELECT issuer, path, project_id FROM pins"
RETRY = Backoff(0.5, 10.0)


class PostgresPinStore:
    def __init__(
        self,
        pool: StorePool,
        *,
        on_change: Callable[[], Awaitable[object]] | None = None,
        clock: Callable[[], float] = time.time,
        retry: Backoff = RETRY,
    ) -> None:
        self._pool = pool
        self.on_change = on_change  # set by serve once the policy service exists
        self._clock = clock
        self._retry = retry
        self._lock = threading.Lock()  # `save` runs in the compile thread, the rest on the loop
        self._table: Pins = {}
        self._unwritten: Pins = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failures = 0
        self.last_error: str | None = None

    async def open(self) -> None:
        """Read the table (StoreUnavailable if PostgreSQL does not answer: the start must stop)."""
        self._loop = asyncio.get_running_loop()
        await self.reread(tell=False)  # read by the policy service when it is built (`load`)

    def load(self) -> Pins:
        return self.current

    @property
    def current(self) -> Pins:
        with self._lock:
            return _merged(self._unwritten, self._table)

    def save(self, pins: Mapping[str, Mapping[str, int]]) -> None:
        """Remember pins not yet known; written by `run()` (never blocks the compile on the network)."""
        new = False
        with self._lock:
            for issuer, paths in pins.items():
                for path, project_id in paths.items():
                    known = self._table.get(issuer, {}).get(path)
                    if known is None and self._unwritten.get(issuer, {}).get(path) != project_id:
                        self._unwritten.setdefault(issuer, {})[path] = project_id
                        new = True
        if new and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Write what `save` recorded, retrying with a backoff while PostgreSQL is away, until `stop`."""
        self._loop = asyncio.get_running_loop()
        while not stop.is_set():
            self._wake.clear()  # before reading what is pending: a pin saved after this wakes the next wait
            if self._pending():
                try:
                    await self.flush()
                except StoreUnavailable as error:
                    self._failures += 1
                    self.last_error = str(error)
                    log.warning("pins not written yet (%d kept in memory): %s", self._pending(), error)
                    await _wait(stop, None, self._retry.delay(self._failures - 1))
                    continue
            await _wait(stop, self._wake, None)

    async def flush(self) -> None:
        """Write the unwritten pins now (first meaning wins), notify the replicas, then re-read the table."""
        with self._lock:
            rows = [(i, p, pid) for i, paths in self._unwritten.items() for p, pid in paths.items()]
        if rows:
            now = self._clock()
            try:
                async with self._pool.connection() as conn, conn.transaction():
                    async with conn.cursor() as cursor:
                        await cursor.executemany(_INSERT, [(*row, now) for row in rows])
                    await publish(conn, TOPIC)
            except psycopg.Error as error:
                raise StoreUnavailable(f"pins: {type(error).__name__}") from None
        self._failures, self.last_error = 0, None
        await self.reread()

    async def on_notify(self, payload: str) -> None:
        """A change-feed subscriber: another replica wrote pins (or the feed reconnected)."""
        try:
            await self.reread()
        except StoreUnavailable as error:
            log.warning("pins not re-read (the next notification or reconnect re-reads them): %s", error)

    async def reread(self, *, tell: bool = True) -> None:
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_READ)
                table: Pins = {}
                for issuer, path, project_id in await cursor.fetchall():
                    table.setdefault(str(issuer), {})[str(path)] = int(str(project_id))
        except psycopg.Error as error:
            raise StoreUnavailable(f"pins: {type(error).__name__}") from None
        with self._lock:
            before = _merged(self._unwritten, self._table)
            self._table = table
            for issuer, paths in list(self._unwritten.items()):  # written (by us or first by another replica)
                for path in [p for p in paths if p in table.get(issuer, {})]:
                    del paths[path]
                if not paths:
                    del self._unwritten[issuer]
            after = _merged(self._unwritten, self._table)
        if tell and after != before and self.on_change is not None:
            await self.on_change()

    def _pending(self) -> int:
        with self._lock:
            return sum(len(paths) for paths in self._unwritten.values())

    def status(self) -> dict[str, object]:
        return {"kind": "postgres", "unwritten": self._pending(), "last_error": self.last_error}


def _merged(unwritten: Pins, table: Pins) -> Pins:
    merged = {issuer: dict(paths) for issuer, paths in unwritten.items()}
    for issuer, paths in table.items():
        merged.setdefault(issuer, {}).update(paths)
    return merged


async def _wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout: float | None) -> None:
    waits = {asyncio.ensure_future(event.wait()) for event in (stop, wake) if event is not None}
    with contextlib.suppress(TimeoutError):
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await asyncio.gather(*waits, return_exceptions=True)
