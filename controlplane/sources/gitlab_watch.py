"""Keeps one GitLab issuer's inventory current: a periodic full reconcile plus targeted re-syncs.

Webhooks say quickly what changed (a push, a rename, an archive), but not everything: protected-branch
changes have no event, pushes of more than three refs send none, and failing hooks get disabled. So a full
reconcile runs every `reconcile_seconds` regardless, and each webhook only triggers a re-read of what it names.

When GitLab is unreachable the last good inventory stays in force and is retried with backoff; past
`max_staleness_seconds` (if set) it is marked stale, which withdraws every binding that depends on it.
Until the first successful read the inventory is stale too: nothing is granted on data never seen.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import Gauge, Histogram

from controlplane.admin.metrics import REGISTRY
from controlplane.model.inventory import Group, Inventory, Project

log = logging.getLogger("controlplane.gitlab")

INVENTORY_AGE = Gauge(
    "controlplane_gitlab_inventory_age_seconds",
    "Seconds since the issuer's inventory was last read from GitLab (-1 before the first read).",
    ["issuer"],
    registry=REGISTRY,
)
INVENTORY_STALE = Gauge(
    "controlplane_gitlab_inventory_stale",
    "1 while the inventory is older than max_staleness (its bindings are withdrawn), else 0.",
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


class InventoryWatcher:
    def __init__(
        self,
        issuer: str,
        source: InventorySource,
        *,
        on_change: Callable[[], Awaitable[object]],
        reconcile_seconds: float = 300.0,
        max_staleness_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        on_reachable: Callable[[], None] | None = None,
    ) -> None:
        self.issuer = issuer
        self.on_reachable = on_reachable  # GitLab answers again after failures: what it said meanwhile was missed
        self.source = source
        self.on_change = on_change
        self.reconcile_seconds = reconcile_seconds
        self.max_staleness_seconds = max_staleness_seconds
        self.clock = clock
        self.scope = Scope()
        self.last_error: str | None = None
        self._inventory: Inventory | None = None
        self._view: tuple[Inventory | None, bool, Inventory] | None = None
        self._wake = asyncio.Event()
        self._full = True
        self._projects_due: set[int | str] = set()
        self._lock = asyncio.Lock()
        self.settled = asyncio.Event()  # set once the first read has succeeded or failed
        INVENTORY_AGE.labels(issuer).set_function(self._age)

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
        }

    # -- what makes it re-read

    def set_scope(self, scope: Scope) -> None:
        """A policy change may name new groups or projects: read them now."""
        if scope != self.scope:
            self.scope = scope
            self.request_full()

    def request_full(self) -> None:
        self._full = True
        self._wake.set()

    def request_project(self, project: int | str) -> None:
        self._projects_due.add(project)
        self._wake.set()

    # -- the loop

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            was_stale = self.is_stale()
            ok, changed = await self._sync()
            if ok and failures and self.on_reachable is not None:
                self.on_reachable()
            failures = 0 if ok else failures + 1
            if changed or was_stale != self.is_stale():
                await self.on_change()
            self.settled.set()
            await self._wait(stop, self._next_delay(failures))

    def _next_delay(self, failures: int) -> float:
        if failures:
            backoff = min(self.reconcile_seconds, 2.0 ** min(failures, 8))
            return backoff * random.uniform(0.5, 1.0)
        delay = self.reconcile_seconds
        if self.max_staleness_seconds is not None and self._inventory and self._inventory.fetched_at:
            # Wake exactly when the data turns stale, so bindings are withdrawn on time.
            turns_stale = self._inventory.fetched_at + self.max_staleness_seconds - self.clock()
            if turns_stale > 0:
                delay = min(delay, turns_stale + 0.01)
        return delay

    async def _wait(self, stop: asyncio.Event, delay: float) -> None:
        self._wake.clear()
        if self._full or self._projects_due:
            return
        waits = {asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not self._wake.is_set() and not stop.is_set():
            self._full = True  # the periodic reconcile

    async def _sync_once(self) -> bool:
        """One reconcile or re-sync, telling `on_change` when the inventory changed; False when GitLab failed."""
        ok, changed = await self._sync()
        if changed:
            await self.on_change()
        return ok

    async def _sync(self) -> tuple[bool, bool]:
        async with self._lock:
            try:
                if self._full or self._inventory is None:
                    changed = await self._reconcile()
                else:
                    changed = await self._resync_projects()
            except Exception as error:  # GitLabUnavailable, or anything else: never fail open
                self.last_error = str(error)[:500]
                log.warning("GitLab %s: keeping the last good inventory: %s", self.issuer, self.last_error)
                return False, False
        self.last_error = None
        return True, changed

    async def _reconcile(self) -> bool:
        self._full = False
        self._projects_due.clear()
        started = time.perf_counter()
        try:
            fresh = await asyncio.to_thread(
                self.source.fetch_inventory,
                groups=sorted(self.scope.groups, key=str),
                projects=sorted(self.scope.projects, key=str),
            )
        except Exception:
            RECONCILE_DURATION.labels(self.issuer, "error").observe(time.perf_counter() - started)
            self._full = True
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


def _content(inventory: Inventory) -> tuple[tuple[Project, ...], tuple[Group, ...]]:
    return inventory.projects, inventory.groups
