"""The replica registry against a real PostgreSQL: rows upserted by heartbeats, read back by every replica,
stale after three missed beats, marked stopped, pruned by the leader after an hour, summaries bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.store.replicas import MAX_FLEET_BYTES, PRUNE_AFTER, ReplicaInfo, ReplicaRegistry, bounded
from tests.support.clock import Clock
from tests.support.postgres import Gate, PostgresServer


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[StorePool]:
    opened = StorePool(StoreDsn(pg_dsn, "test"))
    await opened.open()
    async with opened.connection() as conn:
        await migrate(conn)
    yield opened
    await opened.close()


def fleet_of(*nodes: str, group: str = "edge") -> dict[str, Any]:
    return {
        "summary": {"connected": len(nodes), "by_group": {group: len(nodes)}},
        "proxies": [{"node": node, "group": group, "acked": {"LDS": "v1"}} for node in nodes],
        "versions": {group: "v1"},
    }


def registry(pool: StorePool, name: str, clock: Clock, fleet: dict[str, Any], **kwargs: Any) -> ReplicaRegistry:
    info = ReplicaInfo(name, f"{name}.host", f"{name}:18000", f"{name}:9902", "1.2.3", clock())
    return ReplicaRegistry(pool, info, fleet=lambda: fleet, clock=clock, **kwargs)


async def test_replicas_see_each_other_and_the_whole_fleet(pool: StorePool) -> None:
    clock = Clock(1000.0)
    a = registry(pool, "a", clock, fleet_of("gw-1", "gw-2"), is_leader=lambda: True)
    b = registry(pool, "b", clock, fleet_of("gw-3"), is_leader=lambda: False)
    await a.beat()
    await b.beat()
    await a.beat()
    listed = {row["replica"]: row for row in a.list()}
    assert set(listed) == {"a", "b"}
    assert listed["a"]["this"] and not listed["b"]["this"]
    assert listed["a"]["leader"] and not listed["b"]["leader"]
    assert listed["b"]["xds_address"] == "b:18000" and listed["b"]["proxies"] == 1
    assert listed["b"]["versions"] == {"edge": "v1"} and listed["b"]["state"] == "up"
    whole = a.whole_fleet()
    assert whole["connected"] == 3 and whole["by_group"] == {"edge": 3} and whole["not_listed"] == 0
    assert [(p["replica"], p["node"]) for p in whole["proxies"]] == [("a", "gw-1"), ("a", "gw-2"), ("b", "gw-3")]


async def test_stale_after_three_missed_beats_stopped_and_pruned(pool: StorePool) -> None:
    clock = Clock(1000.0)
    a = registry(pool, "a", clock, fleet_of(), heartbeat_every=5.0, is_leader=lambda: True)
    b = registry(pool, "b", clock, fleet_of(), heartbeat_every=5.0, is_leader=lambda: False)
    await b.beat()
    clock.now += 15.0  # three beats missed exactly: not yet stale
    await a.beat()
    assert {row["replica"]: row["state"] for row in a.list()} == {"a": "up", "b": "up"}
    clock.now += 0.5
    assert {row["replica"]: row["state"] for row in a.list()} == {"a": "up", "b": "stale"}
    await b.stop()
    await a.beat()
    assert {row["replica"]: row["state"] for row in a.list()}["b"] == "stopped"
    assert [row["replica"] for row in a.whole_fleet()["replicas"]] == ["a"]
    clock.now += PRUNE_AFTER
    await b.beat()  # a follower does not prune, and a beat brings a stopped replica back
    assert a.pruned == 0 and b.pruned == 0
    clock.now += PRUNE_AFTER + 1
    await a.beat()  # the leader prunes what has not beaten for an hour
    assert a.pruned == 1 and [row["replica"] for row in a.list()] == ["a"]


def test_summaries_are_bounded() -> None:
    many = fleet_of(*(f"gw-{n:05d}-{'x' * 200}" for n in range(1000)))
    published = bounded(many)
    assert "proxies" not in published and published["proxies_dropped"] == 1000
    assert published["summary"]["connected"] == 1000
    small = fleet_of("gw-1")
    assert bounded(small) == small
    huge = {"summary": {"connected": 5, "groups": {f"g{n}": "x" * 100 for n in range(2000)}}, "proxies": []}
    assert bounded(huge) == {"summary": {"connected": 5}, "proxies_dropped": 0, "truncated": True}
    assert len(str(bounded(many))) < MAX_FLEET_BYTES


async def test_store_away_keeps_the_last_view(postgres: PostgresServer) -> None:
    with postgres.database() as dsn:
        gate = Gate(postgres.port)
        await gate.restore()
        pool = StorePool(StoreDsn(gate.dsn(dsn), "test"))
        await pool.open()
        try:
            async with pool.connection() as conn:
                await migrate(conn)
            clock = Clock(1000.0)
            a = registry(pool, "a", clock, fleet_of("gw-1"), heartbeat_every=0.05)
            await a.beat()
            gate.cut()
            with pytest.raises(StoreUnavailable):
                await a.beat()
            stop = asyncio.Event()
            task = asyncio.create_task(a.run(stop))
            deadline = asyncio.get_running_loop().time() + 15
            while a.status()["last_error"] is None:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)  # poll interval
            assert [row["replica"] for row in a.list()] == ["a"]  # the last view, still served
            stop.set()
            await asyncio.wait_for(task, 15)
        finally:
            gate.cut()
            await pool.close()
