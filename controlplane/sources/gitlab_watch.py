"""Keeps one GitLab issuer's inventory current: a periodic full reconcile plus targeted re-syncs.

Webhooks say quickly what changed (a push, a rename, an archive), but not everything: protected-branch
changes have no event, pushes of more than three refs send none, and failing hooks get disabled. So a full
reconcile runs every `reconcile_seconds` regardless, and each webhook only triggers a re-read of what it names.
"Regardless" is a deadline on the clock, not a quiet period: a busy GitLab sends a webhook every few seconds,
and a timer restarted by each one would never fire.

When GitLab is unreachable, or refuses a read, the last good inventory stays in force and the read is retried
after an exponential backoff (capped at `reconcile_seconds`; webhooks do not cut it short, so a permanent error
can never become a loop at the client's rate bound). Past `max_staleness_seconds` (if set) the inventory is
marked stale, which withdraws every binding that depends on it. Until the first successful read it is stale
too: nothing is granted on data never seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from controlplane.model.inventory import Group, Inventory, Project
from controlplane.model.policy import DEFAULT_RECONCILE_SECONDS
from controlplane.retry import Backoff
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.gitlab")

# Full reconciles asked for by events start at most this often: a flood of them (webhooks, or the re-sync requests
# any database session can NOTIFY) then costs GitLab one full read per interval, never back-to-back reads.
MIN_FULL_GAP = 2.0
# Projects waiting for a re-read, at most; past it one full reconcile covers them (memory bounded whatever asks).
MAX_PROJECTS_DUE = 100

INVENTORY_AGE = Gauge(
    "controlplane_gitlab_inventory_age_seconds",
    "Seconds since the issuer's inventory was last read from GitLab (-1 before the first read).",
    ["issuer"],
    registry=REGISTRY,
)
INVENTORY_STALE = Gauge(
    "controlplane_gitlab_inventory_stale",
    "1 while the issuer's bindings are withdrawn: inventory older than max_staleness, or never read; else 0.",
    ["issuer"],
    registry=REGISTRY,
)
READ_FAILURES = Gauge(
    "controlplane_gitlab_consecutive_failures",
    "Reads of GitLab that failed in a row (0 after a good one); each is retried after a growing backoff.",
    ["issuer"],
    registry=REGISTRY,
)
READ_ERRORS = Counter(
    "controlplane_gitlab_read_failures_total",
    "Reconciles and re-syncs that failed (GitLab unreachable, or refusing): the last good inventory stayed.",
    ["issuer"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "controlplane_gitlab_reconcile_duration_seconds",
    "Time of a full inventory reconcile against the GitLab API.",
    ["issuer", "result"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)


class InventorySource(Protocol):
    """What the watcher needs from GitLab (implemented by sources.gitlab.GitLabSource)."""

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory: ...

    def fetch_project(self, project: str | int) -> Project | None: ...


@dataclass(frozen=True)
class Scope:
    """The groups and projects the policy names (plus the issuer's configured top-level groups)."""

    groups: frozenset[str | int] = frozenset()
    projects: frozenset[str | int] = frozenset()


def inventory_backoff(reconcile_seconds: float) -> Backoff:
    """Failure n (retry n - 1, counted from 0 as everywhere) waits up to min(reconcile, 2**n s): 1-2 s after the
    first, doubling, capped at `reconcile_seconds` (and 256 s); jittered so several control planes do not come
    back to a recovering GitLab at once."""
    return Backoff(base_seconds=2.0, cap_seconds=min(reconcile_seconds, 256.0))


class InventoryWatcher:
    def __init__(
        self,
        issuer: str,
        source: InventorySource,
        *,
        on_change: Callable[[], Awaitable[object]],
        reconcile_seconds: float = DEFAULT_RECONCILE_SECONDS,
        max_staleness_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        on_reachable: Callable[[], None] | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.issuer = issuer
        self.on_read = on_read  # after every good read, changed or not (the leader shares each with followers)
        self.on_reachable = on_reachable  # GitLab answers again after failures: what it said meanwhile was missed
        self.source = source
        self.on_change = on_change
        self.reconcile_seconds = reconcile_seconds
        self.backoff = inventory_backoff(reconcile_seconds)
        self.max_staleness_seconds = max_staleness_seconds
        self.clock = clock
        self.scope = Scope()
        self.last_error: str | None = None
        self._inventory: Inventory | None = None
        self._view: tuple[Inventory | None, bool, Inventory] | None = None
        self._wake = asyncio.Event()
        self._full = True  # a full reconcile was asked for (scope change, group event, failed read)
        self._full_due = -math.inf  # clock time of the next periodic full reconcile
        self._full_at = -math.inf  # clock time the last full reconcile started
        self._projects_due: set[int | str] = set()
        self._failures = 0
        self._retry_at = -math.inf  # after a failure, no read before this clock time
        self._told_stale = True  # the staleness `on_change` last reported (the service starts with "never read")
        self._lock = asyncio.Lock()
        self.settled = asyncio.Event()  # set once the first read has succeeded or failed
        INVENTORY_AGE.labels(issuer).set_function(self._age)
        INVENTORY_STALE.labels(issuer).set_function(lambda: float(self.is_stale()))
        READ_FAILURES.labels(issuer).set(0)

    def close(self) -> None:
        """No longer watched: its series leave /metrics (their functions would keep this watcher alive)."""
        for gauge in (INVENTORY_AGE, INVENTORY_STALE, READ_FAILURES):
            with contextlib.suppress(KeyError):  # never labelled
                gauge.remove(self.issuer)

    def seed(self, inventory: Inventory) -> None:
        """Start from an inventory read before (by the previous leader), not from "never read": a replica that
        becomes leader keeps the bindings its followers' compile had until its own first read replaces it."""
        if self._inventory is None:
            self._inventory = replace(inventory, stale=False)
            self._told_stale = self.is_stale()

    @property
    def last_read(self) -> Inventory | None:
        """The last good inventory as read (not marked stale): what the leader shares."""
        return self._inventory

    # -- what the compiler gets

    @property
    def inventory(self) -> Inventory:
        """The last good inventory, marked stale when too old (or never read): fail closed, never open.

        The same object is returned until the data or its staleness changes, so the compiler's memo,
        which keys on identity, stays warm.
        """
        stale = self.is_stale()
        if self._view is None or self._view[0] is not self._inventory or self._view[1] != stale:
            base = self._inventory or Inventory()
            self._view = (self._inventory, stale, replace(base, stale=stale))
        return self._view[2]

    def is_stale(self) -> bool:
        if self._inventory is None or self._inventory.fetched_at is None:
            return True
        limit = self.max_staleness_seconds
        return limit is not None and self.clock() - self._inventory.fetched_at > limit

    def _age(self) -> float:
        if self._inventory is None or self._inventory.fetched_at is None:
            return -1.0
        return self.clock() - self._inventory.fetched_at

    def status(self) -> dict[str, object]:
        fetched = self._inventory.fetched_at if self._inventory else None
        return {
            "issuer": self.issuer,
            "fetched_at": fetched,
            "age_seconds": None if fetched is None else round(self.clock() - fetched, 3),
            "stale": self.is_stale(),
            "projects": len(self._inventory.projects) if self._inventory else 0,
            "last_error": self.last_error,
            "consecutive_failures": self._failures,
            "retry_in_seconds": round(max(0.0, self._retry_at - self.clock()), 3) if self._failures else None,
        }

    # -- what makes it re-read

    def set_scope(self, scope: Scope) -> None:
        """A policy change may name new groups or projects: read them now."""
        if scope != self.scope:
            self.scope = scope
            self._full_at = -math.inf  # the policy's own change is read at once, never paced
            self.request_full()

    async def widen(self, scope: Scope) -> str | None:
        """A new policy names groups or projects outside the watched set: read them now, before it is judged,
        so a project GitLab has is never reported missing because nobody had asked for it yet.

        What the inventory already holds (a project of a watched group) costs no request. The scope stays
        widened: the policy, once accepted, narrows it again (`set_scope`). Returns why GitLab could not be read.
        """
        if scope.groups <= self.scope.groups and scope.projects <= self.scope.projects:
            return None  # nothing new (every reload of an unchanged policy): never wait for a running reconcile
        async with self._lock:
            groups = scope.groups - self.scope.groups
            projects = scope.projects - self.scope.projects
            if not groups and not projects:
                return None
            self.scope = Scope(self.scope.groups | groups, self.scope.projects | projects)
            if self._inventory is None:
                return None  # never read: stale, nothing is judged against it; the first read covers these
            have = self._inventory
            unread_groups = [ref for ref in groups if not any(ref in (g.id, g.path) for g in have.groups)]
            unread_projects = [ref for ref in projects if not any(ref in (p.id, p.path) for p in have.projects)]
            if not unread_groups and not unread_projects:
                return None
            try:
                extra = await asyncio.to_thread(
                    self.source.fetch_inventory,
                    groups=sorted(unread_groups, key=str),
                    projects=sorted(unread_projects, key=str),
                )
            except Exception as error:
                return f"GitLab {self.issuer}: could not read what the policy adds: {str(error)[:300]}"
            self._inventory = _merged(have, extra)  # fetched_at stays: only a full reconcile vouches for all
            if self.on_read is not None:
                self.on_read()
            log.info("GitLab %s: read %d project(s) a new policy names", self.issuer, len(extra.projects))
            return None

    def request_full(self) -> None:
        self._full = True
        self._wake.set()

    def request_project(self, project: int | str) -> None:
        if len(self._projects_due) >= MAX_PROJECTS_DUE and project not in self._projects_due:
            self.request_full()
            return
        self._projects_due.add(project)
        self._wake.set()

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._step()
            self.settled.set()
            await self._wait(stop)

    async def _step(self) -> None:
        """Read what is due now, then tell `on_change` if the data or its staleness changed.

        Staleness is also told before the read: against a GitLab that hangs, the read may take its timeouts and
        retries, and bindings must be withdrawn the moment the data turns stale, not when GitLab answers."""
        await self._tell(changed=False)
        changed = False
        if self.clock() >= self._retry_at and self._due():
            _, changed = await self._sync(paced=True)
        await self._tell(changed)

    async def _tell(self, changed: bool) -> None:
        stale = self.is_stale()
        if changed or stale != self._told_stale:
            self._told_stale = stale
            await self.on_change()

    def _due(self) -> bool:
        return bool(self._projects_due or self._full_ready(paced=True))

    def _full_ready(self, *, paced: bool) -> bool:
        """A full reconcile is due: never read, the periodic one, or one asked for (`paced`: not sooner than
        MIN_FULL_GAP after the last one started)."""
        now = self.clock()
        asked = self._full and (not paced or now >= self._full_at + MIN_FULL_GAP)
        return asked or self._inventory is None or now >= self._full_due

    def _next_delay(self) -> float:
        """Seconds until something is due: the retry after a failure, else a pending request (now) or the
        periodic reconcile; and never later than the moment the data turns stale, so bindings are withdrawn
        on time."""
        now = self.clock()
        if self._failures:
            delay = self._retry_at - now
        elif self._projects_due:
            return 0.0
        elif self._full:
            delay = min(self._full_at + MIN_FULL_GAP, self._full_due) - now
        else:
            delay = self._full_due - now
        if self.max_staleness_seconds is not None and self._inventory and self._inventory.fetched_at:
            turns_stale = self._inventory.fetched_at + self.max_staleness_seconds - now
            if turns_stale > 0:
                delay = min(delay, turns_stale + 0.01)
        return max(0.0, delay)

    async def _wait(self, stop: asyncio.Event) -> None:
        self._wake.clear()  # before the delay is computed: a request made after this wakes the wait
        delay = self._next_delay()
        if delay <= 0:
            return
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _sync_once(self) -> bool:
        """One reconcile or re-sync now (backoff or not), telling `on_change` when the inventory changed; False
        when GitLab failed."""
        ok, changed = await self._sync()
        if changed:
            await self.on_change()
        return ok

    async def _sync(self, *, paced: bool = False) -> tuple[bool, bool]:
        async with self._lock:
            try:
                if self._full_ready(paced=paced):
                    changed = await self._reconcile()
                else:
                    changed = await self._resync_projects()
            except Exception as error:  # GitLabUnavailable, GitLabRefused, or anything else: never fail open
                self._failed(error)
                return False, False
        self.last_error = None
        if self.on_read is not None:
            self.on_read()
        if self._failures and self.on_reachable is not None:
            self.on_reachable()
        self._failures = 0
        self._retry_at = -math.inf
        READ_FAILURES.labels(self.issuer).set(0)
        return True, changed

    def _failed(self, error: Exception) -> None:
        """Keep the last good inventory and come back after the backoff, with a full read (it covers whatever
        re-sync was pending). One log line per attempt: the backoff bounds their rate."""
        self._full = True
        self._failures += 1
        backoff = self.backoff.delay(self._failures - 1)  # retry numbers count from 0, as in retry.py
        self._retry_at = self.clock() + backoff
        self.last_error = str(error)[:500]
        READ_FAILURES.labels(self.issuer).set(self._failures)
        READ_ERRORS.labels(self.issuer).inc()
        log.warning(
            "GitLab %s: keeping the last good inventory (failure %d, retry in %.1fs): %s",
            self.issuer,
            self._failures,
            backoff,
            self.last_error,
        )

    async def _reconcile(self) -> bool:
        self._full = False
        self._projects_due.clear()
        self._full_due = self.clock() + self.reconcile_seconds  # from its start: a deadline, whatever comes
        self._full_at = self.clock()
        started = time.perf_counter()
        try:
            fresh = await asyncio.to_thread(
                self.source.fetch_inventory,
                groups=sorted(self.scope.groups, key=str),
                projects=sorted(self.scope.projects, key=str),
            )
        except Exception:
            RECONCILE_DURATION.labels(self.issuer, "error").observe(time.perf_counter() - started)
            raise
        RECONCILE_DURATION.labels(self.issuer, "ok").observe(time.perf_counter() - started)
        changed = self._inventory is None or _content(self._inventory) != _content(fresh)
        self._inventory = fresh
        log.info(
            "GitLab %s: reconciled %d projects%s", self.issuer, len(fresh.projects), "" if changed else " (no change)"
        )
        return changed

    async def _resync_projects(self) -> bool:
        due, self._projects_due = self._projects_due, set()
        assert self._inventory is not None
        projects = {p.id: p for p in self._inventory.projects}
        changed = False
        for ref in sorted(due, key=str):
            fresh = await asyncio.to_thread(self.source.fetch_project, ref)
            old = (
                projects.get(ref)
                if isinstance(ref, int)
                else next((p for p in projects.values() if p.path == ref), None)
            )
            if fresh is None and old is not None:
                del projects[old.id]
                changed = True
            elif fresh is not None and projects.get(fresh.id) != fresh:
                projects[fresh.id] = fresh
                changed = True
        if changed:
            # fetched_at stays: only a full reconcile vouches for everything (protections have no webhook).
            self._inventory = replace(self._inventory, projects=tuple(sorted(projects.values(), key=lambda p: p.id)))
        return changed


def _merged(base: Inventory, extra: Inventory) -> Inventory:
    projects = {p.id: p for p in base.projects} | {p.id: p for p in extra.projects}
    groups = {g.id: g for g in base.groups} | {g.id: g for g in extra.groups}
    return replace(
        base,
        projects=tuple(sorted(projects.values(), key=lambda p: p.id)),
        groups=tuple(sorted(groups.values(), key=lambda g: g.id)),
    )


def _content(inventory: Inventory) -> tuple[tuple[Project, ...], tuple[Group, ...]]:
    return inventory.projects, inventory.groups
