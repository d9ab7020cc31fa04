"""The inventory watcher: last good data kept on outages, stale data withdrawn, webhooks re-read one project."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import replace

from controlplane.model.inventory import Group, Inventory, Project
from controlplane.sources.gitlab_watch import InventoryWatcher, Scope
from controlplane.telemetry.metrics import REGISTRY
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


def _reconciles(source: FakeSource) -> int:
    return sum(c.startswith("inventory") for c in source.calls)


async def test_webhooks_every_two_seconds_never_hold_back_the_full_reconcile() -> None:
    """A busy GitLab sends a push every 2 s; the full re-read (the only one that sees protection changes, which
    have no webhook) must still come every `reconcile` of the clock, not only once the pushes stop."""
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes, reconcile_seconds=10)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await eventually(lambda: _reconciles(source) == 1, "first reconcile", timeout=5)
    for push in range(1, 16):  # 30 s of simulated time, a push every 2 s
        source.now += 2
        w.request_project(42)
        await eventually(lambda n=push: source.calls.count("project 42") + _reconciles(source) > n, "push read")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert _reconciles(source) >= 4  # at 0 s, then at 10, 20 and 30 s despite the pushes


async def test_a_refused_read_backs_off_instead_of_looping() -> None:
    """A permanent 4xx must not turn the watcher into a loop at the client's full rate bound: it is retried
    after an exponential, capped backoff (webhooks do not cut it short), and reported meanwhile."""
    source, changes = FakeSource(), Changes()
    source.down = True
    w = watcher(source, changes, reconcile_seconds=300)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    status = await eventually(lambda: s if (s := w.status())["retry_in_seconds"] else None, "backing off", timeout=2)
    assert len(source.calls) == 1 and status["consecutive_failures"] == 1 and "down" in str(status["last_error"])
    assert 1.0 <= float(status["retry_in_seconds"]) <= 2.0  # type: ignore[arg-type]
    w.request_project(42)  # a webhook during the backoff waits for it
    await eventually(lambda: w.status()["retry_in_seconds"], "still backing off")
    assert len(source.calls) == 1
    source.now += 2.5
    w.request_project(42)
    await eventually(lambda: w.status()["consecutive_failures"] == 2, "second attempt after the backoff")
    assert len(source.calls) == 2 and 2.0 <= float(w.status()["retry_in_seconds"]) <= 4.0  # type: ignore[arg-type]
    source.down = False
    source.now += 5
    w.request_project(42)
    await eventually(lambda: w.status()["consecutive_failures"] == 0 and changes.count == 1, "recovered")
    stop.set()
    await asyncio.wait_for(task, 5)


def test_backoff_is_exponential_and_capped() -> None:
    w = watcher(FakeSource(), Changes(), reconcile_seconds=60)
    # Failure n is retry n - 1: retry numbers count from 0 (controlplane.retry).
    ceilings = [max(w.backoff.delay(failures - 1) for _ in range(50)) for failures in range(1, 12)]
    assert ceilings[0] <= 2 and 2 < ceilings[1] <= 4 and 4 < ceilings[2] <= 8
    assert all(c <= 60 for c in ceilings) and ceilings[-1] > 30


def _stale_gauge() -> float | None:
    return REGISTRY.get_sample_value("controlplane_gitlab_inventory_stale", {"issuer": "gitlab"})


async def test_the_stale_gauge_follows_the_withdrawal() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes, max_staleness_seconds=60)
    assert _stale_gauge() == 1  # never read: nothing granted
    await w._sync_once()
    assert _stale_gauge() == 0
    source.down, source.now = True, source.now + 61
    w.request_full()
    await w._sync_once()
    assert _stale_gauge() == 1 and w.status()["stale"] is True
    source.down = False
    await w._sync_once()
    assert _stale_gauge() == 0


async def test_widen_reads_only_what_the_watched_set_lacks_before_a_new_policy_is_judged() -> None:
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes)
    await w._sync_once()
    source.projects[7] = Project(7, "acme/new", 10)
    source.calls.clear()
    assert await w.widen(Scope(projects=frozenset({"acme/app"}))) is None
    assert source.calls == []  # already held: no request
    assert await w.widen(Scope(projects=frozenset({"acme/app", "acme/new"}))) is None
    assert len(source.calls) == 1 and w.inventory.project_by_path("acme/new") is not None
    assert changes.count == 1  # the compile that judges the new policy reads it; the one in service is not redone
    source.down = True
    problem = await w.widen(Scope(projects=frozenset({"acme/other"})))
    assert problem is not None and "could not read what the policy adds" in problem and "down" in problem


async def test_data_turning_stale_during_a_wait_is_reported_even_when_the_next_read_fails() -> None:
    """The withdrawal must not depend on the next read succeeding: staleness is compared with what was last
    reported, not with the start of the pass (the data had already turned stale while the loop waited)."""
    source, changes = FakeSource(), Changes()
    w = watcher(source, changes, reconcile_seconds=3600, max_staleness_seconds=60)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await eventually(lambda: changes.count == 1, "first reconcile")
    source.down, source.now = True, source.now + 61
    w.request_project(42)
    await eventually(lambda: changes.count == 2, "stale reported")
    assert w.inventory.stale
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_gitlab_answering_again_after_an_outage_is_reported_once() -> None:
    """What GitLab said while unreachable (Job Hooks) was missed: the job recovery sweep hangs on this."""
    source, changes = FakeSource(), Changes()
    back: list[str] = []
    w = InventoryWatcher(
        "gitlab",
        source,  # type: ignore[arg-type]
        on_change=changes,
        clock=lambda: source.now,
        reconcile_seconds=10,
        on_reachable=lambda: back.append("gitlab"),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await eventually(lambda: changes.count == 1, "first reconcile", timeout=5)
        assert back == []  # a first success is not a recovery
        source.down = True
        source.now += 11
        w.request_full()
        await eventually(lambda: w.last_error is not None, "outage seen", timeout=5)
        source.down = False
        source.now += 11  # past the backoff
        w.request_full()
        await eventually(lambda: back == ["gitlab"], "recovery reported", timeout=5)
        calls = len(source.calls)
        for _ in range(3):
            source.now += 11
            w.request_full()
            await eventually(lambda n=calls: len(source.calls) > n, "another reconcile", timeout=5)
            calls = len(source.calls)
        assert back == ["gitlab"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_staleness_is_reported_before_a_read_that_hangs() -> None:
    """Bindings were withdrawn only once the next read returned: against a GitLab that hangs (timeouts and
    retries), exchanges were granted for seconds after the data had turned stale."""
    import threading

    release = threading.Event()

    class HangingSource(FakeSource):
        def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
            if self.down:
                release.wait(10)
            return super().fetch_inventory(groups=groups, projects=projects)

    source, changes = HangingSource(), Changes()
    w = watcher(source, changes, reconcile_seconds=3600, max_staleness_seconds=60)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    try:
        await eventually(lambda: changes.count == 1, "first reconcile")
        source.down, source.now = True, source.now + 61
        w.request_full()
        await eventually(lambda: changes.count == 2, "stale reported while the read still hangs", timeout=3)
        assert w.inventory.stale and not release.is_set()
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 15)
