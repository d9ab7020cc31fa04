"""The change feed between replicas (controlplane/store/changes.py) against a real PostgreSQL: what commits is
delivered, what rolls back is not, a lost session is followed by "re-read everything", and one subscriber can
neither block nor break the others."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest

from controlplane.store.changes import MAX_PENDING, RESYNC, ChangeFeed, PayloadTooLarge, _Subscription, publish
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import PoolSettings, StorePool
from tests.support.postgres import Gate, PostgresServer

DEADLINE = 10.0
FAST = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=1.0)


class Inbox:
    """What one subscriber received, awaitable until a condition holds (polled against a deadline)."""

    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.changed = asyncio.Event()

    async def __call__(self, payload: str) -> None:
        self.payloads.append(payload)
        self.changed.set()

    async def until(self, condition: Callable[[list[str]], bool], timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.payloads):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not received in {timeout}s: {self.payloads}")
            self.changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


@asynccontextmanager
async def running(feed: ChangeFeed) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(feed.run(stop))
    try:
        await asyncio.wait_for(feed.listening(), DEADLINE)
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


@asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[StorePool]:
    pool = StorePool(StoreDsn(dsn, "test"), FAST)
    await pool.open()
    try:
        yield pool
    finally:
        await pool.close()


async def write(pool: StorePool, topic: str, payload: str, *, commit: bool = True) -> None:
    async with pool.connection() as conn:
        if commit:
            async with conn.transaction():
                await publish(conn, topic, payload)
        else:
            try:
                async with conn.transaction():
                    await publish(conn, topic, payload)
                    raise _RolledBack
            except _RolledBack:
                pass


class _RolledBack(Exception):
    pass


async def test_a_committed_change_reaches_its_topics_subscribers_only(pg_dsn: str) -> None:
    async with opened(pg_dsn) as pool:
        feed = ChangeFeed(pool)
        revocations, keys = Inbox(), Inbox()
        feed.subscribe("revocations", revocations)
        feed.subscribe("keys", keys)
        async with running(feed):
            await revocations.until(lambda got: got == [RESYNC])  # the first connect: read everything
            await write(pool, "revocations", "17")
            await write(pool, "revocations", "18", commit=False)
            await write(pool, "revocations", "19")
            await revocations.until(lambda got: got[-1:] == ["19"])
            assert revocations.payloads == [RESYNC, "17", "19"]  # in order; the rolled-back one never
            assert keys.payloads == [RESYNC]
            assert feed.status()["connected"] is True


async def test_another_replica_hears_within_milliseconds(pg_dsn: str) -> None:
    """Two pools and feeds on one database stand for two replicas: the figure the 1 s revocation bound needs."""
    async with opened(pg_dsn) as writer, opened(pg_dsn) as reader:
        feed = ChangeFeed(reader)
        inbox = Inbox()
        feed.subscribe("revocations", inbox)
        async with running(feed):
            await inbox.until(lambda got: got == [RESYNC])
            latencies = []
            for n in range(20):
                started = time.perf_counter()
                await write(writer, "revocations", str(n))
                await inbox.until(lambda got, n=n: got[-1:] == [str(n)])  # type: ignore[misc]
                latencies.append(time.perf_counter() - started)
            median = statistics.median(latencies)
            print(f"commit+notify -> other replica: median {median * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
            assert max(latencies) < 1.0


async def test_a_lost_session_is_followed_by_a_full_reread(postgres: PostgresServer, pg_dsn: str) -> None:
    """What was published while the listener was cut off is never delivered; "re-read everything" stands in."""
    gate = Gate(postgres.port)
    await gate.restore()
    async with opened(pg_dsn) as writer, opened(gate.dsn(pg_dsn)) as through_gate:
        feed = ChangeFeed(through_gate, check_every=0.2)
        inbox = Inbox()
        feed.subscribe("pins", inbox)
        async with running(feed):
            await inbox.until(lambda got: got == [RESYNC])
            gate.cut()
            await write(writer, "pins", "lost")
            deadline = time.monotonic() + DEADLINE
            while feed.status()["connected"]:
                assert time.monotonic() < deadline, "the cut session was never noticed"
                await asyncio.sleep(0.05)
            assert feed.unreachable_for() > 0
            await gate.restore()
            await inbox.until(lambda got: got.count(RESYNC) == 2)
            assert feed.unreachable_for() == 0
            assert "lost" not in inbox.payloads
            await write(writer, "pins", "after")
            await inbox.until(lambda got: got[-1:] == ["after"])
            status = feed.status()
            assert status["connected"] is True and status["connects"] == 2


async def test_an_unreachable_store_is_reported_not_raised(postgres: PostgresServer, pg_dsn: str) -> None:
    gate = Gate(postgres.port)
    await gate.restore()
    async with opened(gate.dsn(pg_dsn)) as pool:
        gate.cut()
        feed = ChangeFeed(pool)
        feed.subscribe("keys", Inbox())
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        deadline = time.monotonic() + DEADLINE
        while feed.status()["last_error"] is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert feed.status()["connected"] is False
        assert "password" not in str(feed.status()["last_error"])
        stop.set()
        await asyncio.wait_for(task, DEADLINE)  # stops while still unreachable, without raising


async def test_a_failing_or_slow_subscriber_does_not_hold_up_the_others(pg_dsn: str) -> None:
    async with opened(pg_dsn) as pool:
        feed = ChangeFeed(pool)
        release = asyncio.Event()
        calls: list[str] = []

        async def stuck(payload: str) -> None:
            calls.append(payload)
            await release.wait()

        async def broken(payload: str) -> None:
            raise RuntimeError("a subscriber's bug")

        fine = Inbox()
        feed.subscribe("keys", stuck)
        feed.subscribe("keys", broken)
        feed.subscribe("keys", fine)
        async with running(feed):
            await write(pool, "keys", "1")
            await write(pool, "keys", "2")
            await fine.until(lambda got: got[-2:] == ["1", "2"])
            assert calls == [RESYNC]  # still in its first call
            assert feed.status()["subscriber_failures"] >= 3
            release.set()


def test_a_backlog_collapses_into_one_reread() -> None:
    async def ignore(payload: str) -> None:
        pass

    subscription = _Subscription("revocations", ignore)
    for n in range(MAX_PENDING + 5):
        subscription.put(str(n))
    assert list(subscription.pending) == [RESYNC]  # past the bound: one re-read, which also covers what follows
    fresh = _Subscription("revocations", ignore)
    fresh.put("1")
    fresh.put(RESYNC)
    fresh.put("2")
    assert list(fresh.pending) == [RESYNC]


async def test_payloads_and_topics_are_checked_before_reaching_postgres(pg_dsn: str) -> None:
    async with opened(pg_dsn) as pool, pool.connection() as conn:
        with pytest.raises(PayloadTooLarge):
            await publish(conn, "keys", "x" * 8_000)
        for topic in ("", "a:b"):
            with pytest.raises(ValueError, match="topic"):
                await publish(conn, topic)
