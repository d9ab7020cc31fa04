"""What the control plane learns from GitLab, shared by replicas through PostgreSQL (issue 12 items 2 and 4):
remembered project ids (pins), webhook idempotency keys, and the GitLab inventory as last read by the leader.

One suite over both implementations where there are two (the file/memory one of `--store file`, and the
PostgreSQL one); real PostgreSQL (`pg_dsn`: a fresh database per test) and the fake GitLab (a real HTTP server
that counts the requests it serves).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from controlplane.model.inventory import Environment, Group, Inventory, Project, Ref
from controlplane.model.policy import GitLabApi
from controlplane.runtime.gitlab_link import GitLabLink
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.sources.deliveries_pg import PostgresDeliveryKeys
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_events import ProjectEvent, PushEvent
from controlplane.sources.inventory_table import (
    RESYNC_TOPIC,
    TOPIC,
    InventoryTable,
    content_hash,
    document,
    from_document,
)
from controlplane.sources.pins import PinStore
from controlplane.sources.pins_pg import TOPIC as PINS_TOPIC
from controlplane.sources.pins_pg import PostgresPinStore
from controlplane.sources.webhooks import DeliveryKeys, MemoryDeliveryKeys, WebhookReceiver
from controlplane.store.changes import ChangeFeed
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import PoolSettings, StorePool
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import HookTarget, deliver, push_hook
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.postgres import Gate, PostgresServer

DEADLINE = 10.0
FAST = PoolSettings(min_size=1, max_size=4, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=2.0)


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def opened(dsn: str, *, migrated: bool = True) -> AsyncIterator[StorePool]:
    pool = StorePool(StoreDsn(dsn, "test"), FAST)
    await pool.open()
    try:
        if migrated:
            async with pool.connection() as conn:
                await migrate(conn)
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def feeding(pool: StorePool, subscriptions: dict[str, Callable[[str], Awaitable[None]]]) -> AsyncIterator[None]:
    feed = ChangeFeed(pool, check_every=0.2)
    for topic, subscriber in subscriptions.items():
        feed.subscribe(topic, subscriber)
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    await asyncio.wait_for(feed.listening(), DEADLINE)
    try:
        yield
    finally:
        stop.set()
        await task


# --- pins: one suite over the file and the table ------------------------------------------------------------


class PinsUnderTest:
    """Opens a pin store of either kind, the same way twice (a restart, or a second replica)."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None, stack: AsyncExitStack) -> None:
        self.kind, self.tmp_path, self.dsn, self.stack = kind, tmp_path, dsn, stack

    async def open(self) -> PinStore | PostgresPinStore:
        if self.kind == "file":
            store = PinStore(self.tmp_path / "pins.json")
            store.load()
            return store
        assert self.dsn is not None
        pool = await self.stack.enter_async_context(opened(self.dsn))
        pg = PostgresPinStore(pool)
        await pg.open()
        return pg

    async def saved(self, store: PinStore | PostgresPinStore) -> None:
        """What `save` recorded is durable (the table's writer runs in `run()`; flushed here directly)."""
        if isinstance(store, PostgresPinStore):
            await store.flush()


@pytest.fixture(params=["file", "postgres"])
async def pins(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PinsUnderTest]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else None
    async with AsyncExitStack() as stack:
        yield PinsUnderTest(request.param, tmp_path, dsn, stack)


async def test_pins_survive_a_restart_and_merge(pins: PinsUnderTest) -> None:
    store = await pins.open()
    assert store.load() == {}
    store.save({"gitlab": {"acme/app": 42}})
    store.save({"gitlab": {"acme/other": 43}, "other": {"x/y": 7}})
    assert store.current == {"gitlab": {"acme/app": 42, "acme/other": 43}, "other": {"x/y": 7}}
    await pins.saved(store)
    again = await pins.open()
    assert again.load() == {"gitlab": {"acme/app": 42, "acme/other": 43}, "other": {"x/y": 7}}


async def test_a_path_keeps_its_first_meaning(pins: PinsUnderTest) -> None:
    """Saving never forgets a pin; in the table a path once pinned keeps its id, whatever a later save says."""
    store = await pins.open()
    store.save({"gitlab": {"acme/app": 42}})
    await pins.saved(store)
    store.save({"gitlab": {"acme/new": 44}})
    await pins.saved(store)
    assert (await pins.open()).load()["gitlab"].keys() == {"acme/app", "acme/new"}


# --- pins across replicas -----------------------------------------------------------------------------------


async def test_a_pin_written_by_one_replica_reaches_the_others(pg_dsn: str) -> None:
    async with opened(pg_dsn) as pool_a, opened(pg_dsn) as pool_b:
        a, b = PostgresPinStore(pool_a), PostgresPinStore(pool_b)
        heard: list[str] = []

        async def recompile() -> None:
            heard.append("b")

        b.on_change = recompile
        await a.open()
        await b.open()
        stop = asyncio.Event()
        writers = [asyncio.create_task(store.run(stop)) for store in (a, b)]
        try:
            async with feeding(pool_b, {PINS_TOPIC: b.on_notify}):
                a.save({"gitlab": {"acme/app": 42}})  # as the compiler does, without awaiting anything
                await until(lambda: b.current == {"gitlab": {"acme/app": 42}}, "replica B sees A's pin")
                assert heard, "B's policy service was not told to recompile"
        finally:
            stop.set()
            await asyncio.gather(*writers)


async def test_concurrent_writers_never_lose_a_pin_and_agree_on_a_conflict(pg_dsn: str) -> None:
    """Twenty replicas pin different paths at once, and two pin the same path to different projects: every pin
    is kept, and both end up with the first writer's id."""
    async with AsyncExitStack() as stack:
        pools = [await stack.enter_async_context(opened(pg_dsn)) for _ in range(4)]
        stores = [PostgresPinStore(pools[i % 4]) for i in range(20)]
        for store in stores:
            await store.open()
        for i, store in enumerate(stores):
            store.save({"gitlab": {f"acme/p{i}": 100 + i, "acme/contested": 1 + i}})
        await asyncio.gather(*(store.flush() for store in stores))
        for store in stores:
            await store.reread()
        expected = {f"acme/p{i}": 100 + i for i in range(20)}
        contested = {store.current["gitlab"].pop("acme/contested") for store in stores}
        assert len(contested) == 1, f"replicas disagree on the contested path: {contested}"
        assert all(store.current["gitlab"] == {**expected, "acme/contested": contested.pop()} for store in stores[:1])
        assert all({k: v for k, v in s.current["gitlab"].items() if k != "acme/contested"} == expected for s in stores)


async def test_pins_saved_while_postgresql_is_away_are_kept_and_written_on_its_return(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    gate = Gate(postgres.port)
    await gate.restore()
    async with opened(gate.dsn(pg_dsn)) as pool:
        store = PostgresPinStore(pool)
        await store.open()
        stop = asyncio.Event()
        writer = asyncio.create_task(store.run(stop))
        try:
            gate.cut()
            store.save({"gitlab": {"acme/app": 42}})
            assert store.current == {"gitlab": {"acme/app": 42}}  # compiled with, meanwhile
            await until(lambda: store.status()["last_error"] is not None, "the failed write is reported")
            assert store.status()["unwritten"] == 1
            await gate.restore()
            await until(lambda: store.status()["unwritten"] == 0, "written once PostgreSQL answers")
        finally:
            stop.set()
            await writer
    async with opened(pg_dsn) as direct:
        fresh = PostgresPinStore(direct)
        await fresh.open()
        assert fresh.current == {"gitlab": {"acme/app": 42}}


# --- webhook idempotency keys: one suite over memory and the table ------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "postgres"])
async def make_keys(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[Clock], Awaitable[DeliveryKeys]]]:
    async with AsyncExitStack() as stack:

        async def make(clock: Clock) -> DeliveryKeys:
            if request.param == "memory":
                return MemoryDeliveryKeys(100, 60.0, clock)
            pool = await stack.enter_async_context(opened(request.getfixturevalue("pg_dsn")))
            return PostgresDeliveryKeys(pool, ttl=60.0, clock=clock)

        yield make


async def test_a_key_is_first_once_until_it_expires_or_is_forgotten(
    make_keys: Callable[[Clock], Awaitable[DeliveryKeys]],
) -> None:
    clock = Clock()
    keys = await make_keys(clock)
    assert await keys.first("k1")
    assert not await keys.first("k1")
    await keys.forget("k1")  # its callback failed: a re-send is processed
    assert await keys.first("k1")
    clock.now += 61
    assert await keys.first("k1")  # expired
    assert not await keys.first("k1")


@pytest.mark.parametrize("shared", [True, False], ids=["table", "memory-each"])
async def test_a_delivery_retried_to_another_replica_is_applied_once(pg_dsn: str, shared: bool) -> None:
    """Two replicas, each its own receiver and pool; GitLab sends one delivery to both (a retry behind a load
    balancer), twice each: the callback runs once in all. With each replica's memory only (what the table
    replaces) it runs once per replica: the failure this table exists for."""
    applied: list[str] = []

    async def on_event(event: object) -> None:
        applied.append(type(event).__name__)

    async with opened(pg_dsn) as pool_a, opened(pg_dsn) as pool_b:
        receivers = [
            WebhookReceiver(secrets=[b"s3cret"], on_event=on_event, seen=PostgresDeliveryKeys(pool) if shared else None)
            for pool in (pool_a, pool_b)
        ]
        ports = [await r.start() for r in receivers]
        try:
            payload = push_hook(7, "acme/app", "refs/heads/main", "0" * 40, "1" * 40)
            statuses = []
            for port in [*ports, *ports]:
                target = HookTarget(f"http://127.0.0.1:{port}/webhooks/gitlab", "s3cret")
                response = await asyncio.to_thread(deliver, target, "Push Hook", payload, idempotency_key="one-key")
                statuses.append((response.status, response.json()))
        finally:
            for r in receivers:
                await r.stop()
    assert applied == ["PushEvent"] * (1 if shared else 2)
    assert [s for s, _ in statuses] == [200, 200, 200, 200]
    assert sum(1 for _, body in statuses if body.get("duplicate")) == (3 if shared else 2)


async def test_without_postgresql_keys_fall_back_to_memory_and_say_so(postgres: PostgresServer, pg_dsn: str) -> None:
    gate = Gate(postgres.port)
    await gate.restore()
    async with opened(gate.dsn(pg_dsn)) as pool:
        keys = PostgresDeliveryKeys(pool)
        assert await keys.first("before")
        gate.cut()
        started = time.monotonic()
        assert await keys.first("during")  # applied: a re-read asked twice is harmless
        assert not await keys.first("during")  # a retry to this replica is still caught, in memory
        assert not await keys.first("before")
        assert time.monotonic() - started < 2 * (FAST.acquire_timeout + FAST.connect_timeout) + 1
        status = keys.status()
        assert status["memory_fallbacks"] == 1 and "unavailable" in str(status["last_error"])
        assert "password" not in str(status["last_error"]) or "redacted" in str(status["last_error"])


# --- the inventory: serialisation ---------------------------------------------------------------------------


def test_an_inventory_round_trips_to_equal_values() -> None:
    inventory = Inventory(
        projects=(
            Project(
                5,
                "acme/app",
                3,
                archived=True,
                default_branch="main",
                refs=(Ref("main", "branch", True), Ref("v1", "tag", False)),
                environments=(Environment("prod", "production", True),),
            ),
            Project(6, "acme/lib", 3),
        ),
        groups=(Group(3, "acme"), Group(4, "acme/sub", 3)),
        fetched_at=1234.5,
    )
    import json

    back = from_document(json.loads(json.dumps(document(inventory))), 1234.5)
    assert back == inventory
    assert content_hash(back) == content_hash(inventory)
    assert content_hash(inventory) != content_hash(Inventory(projects=inventory.projects[:1]))


# --- the inventory: leader reads GitLab, followers read the table --------------------------------------------

API = "api:\n  token_env: GITLAB_TOKEN\n  reconcile: 1h"


def write_policy(directory: Path, gitlab: FakeGitLab, subjects: Iterable[str] = ("acme/app",), api: str = API) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(
        documents(
            issuer(gitlab.issuer, extra=api),
            backend("reports-api", 18080),
            role("reports-read", "reports-api"),
            *(binding(f"b{i}", ["reports-read"], f"{{project: {s}}}") for i, s in enumerate(subjects)),
            gateway(18443, ["reports-api"]),
        )
    )
    return directory


class CountingSource:
    """The production source, counting the inventory reads it makes (the fake GitLab counts requests too)."""

    def __init__(self, inner: GitLabSource) -> None:
        self.inner = inner
        self.inventory_reads = 0

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        self.inventory_reads += 1
        return self.inner.fetch_inventory(groups=groups, projects=projects)

    def fetch_project(self, project: str | int) -> Project | None:
        self.inventory_reads += 1
        return self.inner.fetch_project(project)

    def fetch_job_status(self, project_id: str, job_id: str) -> str | None:
        return self.inner.fetch_job_status(project_id, job_id)


class Replica:
    """One control plane's GitLab side in-process: a GitLab link, a pin store and a policy service on one pool."""

    def __init__(self, pool: StorePool, policy: Path, leader: bool) -> None:
        self.sources: list[CountingSource] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.pins = PostgresPinStore(pool, on_change=self._pins_changed)
        self.link = GitLabLink(
            on_inventory_change=self._changed,
            spawn=self._spawn,
            source_factory=self._source,
            share=InventoryTable(pool),
            is_leader=lambda: leader,
        )
        self.pool = pool
        self.policy_dir = policy
        self.service: PolicyService | None = None

    def _spawn(self, loop: Any, /, *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(loop, name=name)
        self.tasks.append(task)
        return task

    def _source(self, api: GitLabApi) -> CountingSource:
        source = CountingSource(GitLabSource(api.url, "unused"))
        source.inner = GitLabSource(api.url, _token())
        self.sources.append(source)
        return source

    @property
    def inventory_reads(self) -> int:
        return sum(s.inventory_reads for s in self.sources)

    async def _changed(self) -> None:
        assert self.service is not None
        await self.service.recompile("GitLab inventory changed")
        if self.service.current is not None:
            self.link.follow(self.service.current, self.service.pins)

    async def _pins_changed(self) -> None:
        assert self.service is not None
        await self.service.recompile("pins changed")

    async def start(self) -> None:
        await self.pins.open()
        self.service = PolicyService(
            self.policy_dir,
            SnapshotCache(),
            inventories=self.link.inventories,
            pin_store=self.pins,
            prepare=lambda candidate: self.link.read_new_subjects(candidate, self.service.pins if self.service else {}),
        )
        self._spawn(self.link.run(self.stop), name="share")
        self._spawn(self.pins.run(self.stop), name="pins")
        self.feed = ChangeFeed(self.pool, check_every=0.2)
        self.feed.subscribe(TOPIC, self.link.on_shared)
        self.feed.subscribe(RESYNC_TOPIC, self.link.on_resync_request)
        self.feed.subscribe(PINS_TOPIC, self.pins.on_notify)
        self._spawn(self.feed.run(self.stop), name="feed")
        await asyncio.wait_for(self.feed.listening(), DEADLINE)
        await self.service.reload_off_loop()
        assert self.service.current is not None
        self.link.follow(self.service.current, self.service.pins)

    @property
    def versions(self) -> dict[str, str]:
        assert self.service is not None
        return dict(self.service.state.versions)

    def inventory(self) -> Inventory | None:
        return self.link.inventories().get("gitlab")

    async def close(self) -> None:
        self.stop.set()
        await self.link.stop()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _token() -> str:
    import os

    return os.environ["GITLAB_TOKEN"]


@pytest.fixture
def gitlab(monkeypatch: pytest.MonkeyPatch) -> Iterable[FakeGitLab]:
    with FakeGitLab() as fake:
        monkeypatch.setenv("GITLAB_TOKEN", fake.api_token)
        fake.add_group("acme")
        fake.add_project("acme/app", branches=["main"], protected=["main"])
        yield fake


@asynccontextmanager
async def replicas(pg_dsn: str, policy: Path, roles: Iterable[bool]) -> AsyncIterator[list[Replica]]:
    async with AsyncExitStack() as stack:
        started: list[Replica] = []
        for leader in roles:
            pool = await stack.enter_async_context(opened(pg_dsn))
            replica = Replica(pool, policy, leader)
            stack.push_async_callback(replica.close)
            await replica.start()
            started.append(replica)
        yield started


def _has_live(replica: Replica, path: str = "acme/app") -> bool:
    inventory = replica.inventory()
    return inventory is not None and not inventory.stale and inventory.project_by_path(path) is not None


async def test_a_follower_reads_nothing_from_gitlab_and_compiles_what_the_leader_compiles(
    pg_dsn: str, gitlab: FakeGitLab, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy", gitlab)
    async with replicas(pg_dsn, policy, [True, False, False]) as (leader, *followers):
        await until(lambda: _has_live(leader), "the leader read GitLab")
        for follower in followers:
            await until(lambda f=follower: f.versions == leader.versions and _has_live(f), "followers converge")
            await until(lambda f=follower: f.inventory() == leader.inventory(), "the same inventory, read time too")
            await until(lambda f=follower: f.pins.current == leader.pins.current, "the same pins")
            assert "acme/app" in leader.pins.current["gitlab"]
        served = len(gitlab.api_calls())
        assert leader.inventory_reads > 0 and served > 0
        assert [f.inventory_reads for f in followers] == [0, 0], "a follower asked GitLab for inventory"
        # a change in GitLab, told by a webhook to a FOLLOWER: the leader re-reads, every replica recompiles
        before = dict(leader.versions)
        gitlab.archive_project("acme/app")
        event = ProjectEvent(
            project_id=gitlab_project_id(gitlab), path_with_namespace="acme/app", old_path_with_namespace=None,
            event_name="project_update",
        )  # fmt: skip
        sent = time.monotonic()
        await followers[0].link.on_event(event)
        await until(lambda: leader.versions != before, "the leader re-synced on the follower's request")
        for follower in followers:
            await until(lambda f=follower: f.versions == leader.versions, "followers recompile with the change")
        print(f"webhook at a follower -> every replica recompiled: {time.monotonic() - sent:.3f}s")
        assert [f.inventory_reads for f in followers] == [0, 0]
        assert all(c.method == "GET" for c in gitlab.api_calls())


def gitlab_project_id(gitlab: FakeGitLab) -> int:
    project = gitlab._find_project("acme/app")
    assert project is not None
    return int(project.id)


async def test_a_follower_started_after_the_leader_loads_the_table_before_serving(
    pg_dsn: str, gitlab: FakeGitLab, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy", gitlab)
    async with replicas(pg_dsn, policy, [True]) as (leader,):
        await until(lambda: _has_live(leader), "the leader read GitLab")
        async with replicas(pg_dsn, policy, [False]) as (follower,):
            await follower.link.settled(DEADLINE)
            await until(lambda: follower.versions == leader.versions, "the late follower compiles the same")
            assert follower.inventory_reads == 0


async def test_a_new_leader_carries_on_from_the_table_then_reads_gitlab(
    pg_dsn: str, gitlab: FakeGitLab, tmp_path: Path
) -> None:
    policy = write_policy(tmp_path / "policy", gitlab)
    async with replicas(pg_dsn, policy, [True, False]) as (leader, follower):
        await until(lambda: _has_live(follower) and follower.versions == leader.versions, "follower in step")
        served = dict(follower.versions)
        await leader.link.on_leadership(False)  # the lease moved
        assert not leader.link.leading and _has_live(leader)  # its last read stands until the table is re-read
        await follower.link.on_leadership(True)
        assert follower.link.leading and follower.versions == served  # seeded: nothing withdrawn meanwhile
        assert _has_live(follower)
        await until(lambda: follower.inventory_reads > 0, "the new leader reads GitLab itself")
        reads = leader.inventory_reads
        gitlab.archive_project("acme/app")
        push = PushEvent(
            project_id=gitlab_project_id(gitlab), project_path="acme/app", ref="refs/heads/main",
            before="0" * 40, after="1" * 40, is_tag=False,
        )  # fmt: skip
        await leader.link.on_event(push)  # the former leader forwards it
        await until(lambda: leader.versions == follower.versions != served, "both recompile after the new read")
        assert leader.inventory_reads == reads, "the former leader still reads GitLab"


async def test_file_store_link_needs_no_table(gitlab: FakeGitLab, tmp_path: Path) -> None:
    """Without a share the link is always the leader and writes nothing: `--store file` as before."""
    tasks: list[asyncio.Task[None]] = []

    def spawn(loop: Any, /, *, name: str) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(loop, name=name))
        return tasks[-1]

    changes: list[int] = []

    async def changed() -> None:
        changes.append(1)

    link = GitLabLink(on_inventory_change=changed, spawn=spawn, is_leader=lambda: False)
    assert link.leading
    service = PolicyService(write_policy(tmp_path / "p", gitlab), SnapshotCache(), inventories=link.inventories)
    await service.reload_off_loop()
    assert service.current is not None
    link.follow(service.current, service.pins)
    await link.settled(DEADLINE)
    assert "gitlab" in link.inventories() and "role" not in link.status()[0]
    await link.stop()


async def test_a_follower_withdraws_on_time_when_the_leader_stops_reading(
    pg_dsn: str, gitlab: FakeGitLab, tmp_path: Path
) -> None:
    """Staleness is judged from the leader's read time on every replica: a leader that stops reading (dead, no
    successor yet) leaves followers failing closed after `max_staleness`, as its own watcher would have."""
    api = "api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s\n  max_staleness: 10s"
    policy = write_policy(tmp_path / "policy", gitlab, api=api)
    async with replicas(pg_dsn, policy, [False]) as (follower,):
        async with replicas(pg_dsn, policy, [True]) as (leader,):
            await until(lambda: _has_live(follower) and follower.versions == leader.versions, "follower in step")
            served = dict(follower.versions)
        inventory = follower.inventory()
        assert inventory is not None and inventory.fetched_at is not None
        await until(lambda: follower.versions != served, "bindings withdrawn", timeout=15.0)
        assert follower.inventory() is not None and follower.inventory().stale  # type: ignore[union-attr]
        assert time.time() - inventory.fetched_at >= 10.0
        assert follower.inventory_reads == 0
