"""The inventory watcher: last good data kept on outages, stale data withdrawn, webhooks re-read one project."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace

from controlplane.model.inventory import Group, Inventory, Project
from controlplane.sources.gitlab_watch import InventoryWatcher, Scope
from tests.support.ports import eventually


class FakeSource:
    def __init__(self) -> None:
        self.projects = {42: Project(42, "acme/app", 10)}
        self.down = False
        self.now = 1000.0
        self.calls: list[str] = []

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        self.calls.append(f"inventory groups={sorted(map(str, groups))}")
        if self.down:
            raise ConnectionError("GitLab is down")
        return Inventory(tuple(self.projects.values()), (Group(10, "acme"),), fetched_at=self.now)

    def fetch_project(self, project: str | int) -> Project | None:
        self.calls.append(f"project {project}")
        if self.down:
            raise ConnectionError("GitLab is down")
        return self.projects.get(int(project))


class Changes:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


def watcher(source: FakeSource, changes: Changes, **kw: float) -> InventoryWatcher:
    return InventoryWatcher("gitlab", source, on_change=changes, clock=lambda: source.now, **kw)  # type: ignore[arg-type]


async def test_never_read_is_stale_and_the_first_reconcile_is_not() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes)
    assert w.inventory.stale and w.is_stale()
    assert await w._sync_once()
    assert not w.inventory.stale and w.inventory.projects[0].id == 42 and changes.count == 1


async def test_outage_keeps_the_last_good_inventory_then_turns_stale() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes, max_staleness_seconds=60)
    await w._sync_once()
    source.down, source.now = True, source.now + 30
    w.request_full()
    assert not await w._sync_once()
    assert w.inventory.projects and not w.inventory.stale and "down" in str(w.last_error)
    source.now += 31
    assert w.inventory.stale and w.status()["stale"] is True


async def test_webhook_resync_reads_only_the_named_project() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes)
    await w._sync_once()
    source.projects[42] = replace(source.projects[42], archived=True)
    source.calls.clear()
    w.request_project(42)
    assert await w._sync_once()
    assert source.calls == ["project 42"] and w.inventory.projects[0].archived and changes.count == 2
    del source.projects[42]
    w.request_project(42)
    await w._sync_once()
    assert w.inventory.projects == ()


async def test_unchanged_reconcile_does_not_recompile() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes)
    await w._sync_once()
    w.request_full()
    await w._sync_once()
    assert changes.count == 1


async def test_run_loop_reconciles_on_scope_change_and_stops() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes, reconcile_seconds=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await eventually(lambda: changes.count == 1, "first reconcile", timeout=5)
    w.set_scope(Scope(groups=frozenset({"acme"})))
    await eventually(lambda: any("acme" in c for c in source.calls), "scope change read", timeout=5)
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_a_reconcile_touching_many_projects_recompiles_once() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes)
    await w._sync_once()
    for pid in range(100, 300):  # 200 projects appear, 1 is archived: one inventory change
        source.projects[pid] = Project(pid, f"acme/p{pid}", 10)
    source.projects[42] = replace(source.projects[42], archived=True)
    w.request_full()
    await w._sync_once()
    assert changes.count == 2 and len(w.inventory.projects) == 201


async def test_a_burst_of_webhooks_is_read_in_one_resync_and_one_recompile() -> None:
    """Fifty job or project hooks arriving while a sync runs: their projects are re-read together."""
    source, changes = FakeSource(), Changes()
    for pid in range(100, 150):
        source.projects[pid] = Project(pid, f"acme/p{pid}", 10)
    w = watcher(source, changes)
    await w._sync_once()
    for pid in range(100, 150):
        source.projects[pid] = replace(source.projects[pid], archived=True)
        w.request_project(pid)
    source.calls.clear()
    await w._sync_once()
    assert changes.count == 2 and len(source.calls) == 50
    assert all(p.archived for p in w.inventory.projects if p.id >= 100)


async def test_gitlab_answering_again_after_an_outage_is_reported_once() -> None:
    """What GitLab said while unreachable (Job Hooks) was missed: the job recovery sweep hangs on this."""
    source, changes = FakeSource(), Changes()
    back: list[str] = []
    w = InventoryWatcher(
        "gitlab",
        source,  # type: ignore[arg-type]
        on_change=changes,
        clock=lambda: source.now,
        reconcile_seconds=0.02,
        on_reachable=lambda: back.append("gitlab"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await eventually(lambda: changes.count == 1, "first reconcile", timeout=5)
        assert back == []  # a first success is not a recovery
        source.down = True
        await eventually(lambda: w.last_error is not None, "outage seen", timeout=5)
        source.down = False
        await eventually(lambda: back == ["gitlab"], "recovery reported", timeout=5)
        calls = len(source.calls)
        await eventually(lambda: len(source.calls) > calls + 2, "more reconciles", timeout=5)
        assert back == ["gitlab"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
