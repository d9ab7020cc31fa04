"""The leader lease against a real PostgreSQL: one leader among many, failover after kill -9 within the stated
bound, a leader cut off steps down before anyone else takes over, a clean stop hands over at once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import psycopg
import pytest

from controlplane.retry import Backoff
from controlplane.store.dsn import StoreDsn
from controlplane.store.leader import LeaderLease, LeaseSettings, StaticLeader
from tests.support.postgres import Gate, PostgresServer

FAST = Backoff(0.05, 0.5)
SLACK = 1.0  # round trips, a busy 2-core test machine


def lease(dsn: str, replica_id: str, settings: LeaseSettings | None = None) -> LeaderLease:
    return LeaderLease(StoreDsn(dsn, "test"), replica_id=replica_id, backoff=FAST, settings=settings)


@asynccontextmanager
async def running(*leases: LeaderLease) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(one.run(stop)) for one in leases]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> float:
    """Poll until `condition` holds; returns the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline
    return time.monotonic()


def test_settings_refuse_a_step_down_slower_than_the_server_notices() -> None:
    with pytest.raises(ValueError, match="step-down bound"):
        LeaseSettings(check_every=5, check_timeout=4)
    bounds = LeaseSettings().bounds()
    assert bounds["step_down"] < bounds["server_detection"]
    assert bounds["failover_process_death"] == 3.0 and bounds["failover_partition"] == 11.0


async def test_static_leader_always_leads() -> None:
    static = StaticLeader()
    stop = asyncio.Event()
    stop.set()
    await static.run(stop)
    assert static.is_leader() and static.status() == {"leader": True, "kind": "static"}


async def test_many_contenders_one_leader(pg_dsn: str) -> None:
    leases = [lease(pg_dsn, f"r{n}") for n in range(6)]
    async with running(*leases):
        await until(lambda: any(one.is_leader() for one in leases))
        for _ in range(20):  # and it stays exactly one, while the others keep trying
            assert sum(one.is_leader() for one in leases) == 1
            await asyncio.sleep(0.1)  # sampling interval
        leader = next(one for one in leases if one.is_leader())
        await until(lambda: all(one.status()["holder"] == leader.replica_id for one in leases))
        assert leader.status()["keepalive"] == {"idle": "5", "interval": "1", "count": "3"}  # server-side too
        with psycopg.connect(pg_dsn) as db:
            names = db.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchall()
        assert names == [("controlplane",)]


async def test_clean_stop_hands_over_at_once(pg_dsn: str) -> None:
    first, second = lease(pg_dsn, "first"), lease(pg_dsn, "second")
    changes: list[tuple[str, bool, float]] = []

    def record(name: str) -> Callable[[bool], asyncio.Future[None]]:
        async def on_change(leader: bool) -> None:
            changes.append((name, leader, time.monotonic()))

        return on_change  # type: ignore[return-value]

    first.subscribe(record("first"))
    second.subscribe(record("second"))
    async with running(first) as stop_first:
        await until(first.is_leader)
        async with running(second):
            await until(lambda: second.status()["holder"] == "first")
            stop_first.set()
            stopped = time.monotonic()
            taken = await until(second.is_leader)
            # no takeover delay after a clean release: within one retry
            assert taken - stopped < second.settings.retry_every + SLACK
            print(f"\nclean handover: {taken - stopped:.2f}s")
    assert [(name, leader) for name, leader, _ in changes] == [
        ("first", True),
        ("first", False),
        ("second", True),
        ("second", False),
    ]
    assert changes[1][2] <= changes[2][2]  # stepped down before the other took over


async def test_leader_killed_follower_takes_over_within_the_bound(pg_dsn: str) -> None:
    """The leader in a process of its own, SIGKILLed: the server sees its socket close and frees the lock; the
    follower takes it within retry_every and acts after the takeover delay (the holder left its row)."""
    env = {**os.environ, "CP_STORE_DSN": pg_dsn, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.leader_process", "doomed"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.strip() == "leader"
        follower = lease(pg_dsn, "survivor")
        async with running(follower):
            await until(lambda: follower.status()["holder"] == "doomed")
            assert not follower.is_leader()
            process.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            took = await until(follower.is_leader) - killed
        bound = follower.settings.bounds()["failover_process_death"]
        print(f"\nfailover after SIGKILL: {took:.2f}s (bound {bound:g}s + round trips)")
        assert follower.settings.takeover_delay <= took < bound + SLACK
    finally:
        process.kill()
        process.wait(10)


async def test_cut_off_leader_steps_down_before_anyone_takes_over(postgres: PostgresServer) -> None:
    """The leader reaches PostgreSQL through a gate that is cut (the server sees the close and frees the lock at
    once): the leader steps down within its bound, and the follower acts only after that."""
    with postgres.database() as dsn:
        gate = Gate(postgres.port)
        await gate.restore()
        leader, follower = lease(gate.dsn(dsn), "cut"), lease(dsn, "direct")
        times: dict[str, float] = {}

        async def stepped_down(leading: bool) -> None:
            if not leading:
                times.setdefault("stepped_down", time.monotonic())

        async def took_over(leading: bool) -> None:
            if leading:
                times.setdefault("took_over", time.monotonic())

        leader.subscribe(stepped_down)
        follower.subscribe(took_over)
        async with running(leader):
            await until(leader.is_leader)  # first, alone: the follower would win a race through no relay
            async with running(follower):
                await until(lambda: follower.status()["holder"] == "cut")
                gate.cut()
                cut = time.monotonic()
                await until(lambda: "took_over" in times and "stepped_down" in times)
                assert not leader.is_leader()
        gate.cut()
        down, over = times["stepped_down"] - cut, times["took_over"] - cut
        print(f"\ncut off: old leader stepped down after {down:.2f}s, the other took over after {over:.2f}s")
        assert down <= leader.settings.step_down_bound + SLACK
        assert times["stepped_down"] < times["took_over"]
        assert over >= follower.settings.takeover_delay


async def test_unreachable_store_is_no_leader_and_no_exception(postgres: PostgresServer) -> None:
    with postgres.database() as dsn:
        gate = Gate(postgres.port)
        await gate.restore()
        gate.cut()  # nothing listens there now
        alone = lease(gate.dsn(dsn), "alone")
        async with running(alone):
            await until(lambda: alone.status()["last_error"] is not None)
            assert not alone.is_leader() and not alone.status()["connected"]
            await gate.restore()  # same port
            await until(alone.is_leader)
        gate.cut()


async def test_leadership_expires_with_the_step_down_bound_even_if_no_check_runs() -> None:
    """A stalled loop cannot stretch the lease: is_leader() compares with the deadline the last check set."""
    now = [100.0]
    stalled = LeaderLease(StoreDsn("host=unused", "test"), replica_id="x", backoff=FAST, monotonic=lambda: now[0])
    await stalled._become_leader(sent=100.0)
    assert stalled.is_leader()
    now[0] = 100.0 + stalled.settings.step_down_bound - 0.01
    assert stalled.is_leader()
    now[0] = 100.0 + stalled.settings.step_down_bound
    assert not stalled.is_leader()


def test_replica_flags_need_the_postgres_store() -> None:
    from controlplane.cli.options import StoreOptions
    from controlplane.store.dsn import DsnError

    with pytest.raises(DsnError, match="--replica-id and --leader-retry need --store postgres"):
        StoreOptions(replica_id="a").resolve_dsn()
    with pytest.raises(ValueError, match="--leader-retry"):
        StoreOptions(kind="postgres", leader_retry=0)


async def test_a_leader_whose_server_stops_answering_steps_down_and_keeps_the_lock_from_others(pg_dsn: str) -> None:
    """The leader's own backend frozen (SIGSTOP): its checks time out, it steps down within its bound; the
    server still holds the lock for the frozen session, so nobody else leads until that session ends."""
    hung, other = lease(pg_dsn, "hung"), lease(pg_dsn, "other")
    async with running(hung):
        await until(hung.is_leader)
        async with running(other):
            await until(lambda: other.status()["holder"] == "hung")
            with psycopg.connect(pg_dsn) as db:
                row = db.execute("SELECT pid FROM leader_holder").fetchone()
            assert row is not None
            os.kill(row[0], signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                down = await until(lambda: not hung.is_leader()) - frozen
                print(f"\nfrozen backend: the leader stepped down after {down:.2f}s")
                assert down <= hung.settings.step_down_bound + 0.2
                assert not other.is_leader()
            finally:
                os.kill(row[0], signal.SIGCONT)  # it reads the closed socket and ends: the lock is freed
            await until(lambda: hung.is_leader() or other.is_leader())  # either may win it now (reconnected)
            assert hung.is_leader() != other.is_leader()
