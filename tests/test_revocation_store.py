"""The deny list's store, against its interface (`RevocationStore`): the state directory's file and PostgreSQL run
the same tests. Then what only PostgreSQL promises (another replica sees a revocation, with a notification; the
sequence never skips a committed write), and `Revocations` on PostgreSQL: loaded at start, refreshed from another
replica, and its outbox while PostgreSQL is away (nothing lost, nothing waits, bounded and reported).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest

from controlplane.credentials.exchange_store import MemoryExchangeStore
from controlplane.credentials.revocation_store import FileRevocationStore, RevocationStore, RevocationStoreError
from controlplane.credentials.revocation_store_pg import TOPIC, PostgresRevocationStore
from controlplane.credentials.revocations import EXPIRY_QUANTUM, Revocations
from controlplane.credentials.service import CredentialOptions, CredentialService
from controlplane.retry import Backoff
from controlplane.store.changes import CHANNEL, RESYNC, ChangeFeed
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import PoolSettings, StorePool
from controlplane.telemetry.metrics import REGISTRY
from tests.support.ports import LOOPBACK
from tests.support.postgres import Gate, PostgresServer, running_server

FAST = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=1.0)
DEADLINE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Store = FileRevocationStore | PostgresRevocationStore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@asynccontextmanager
async def postgres_store(
    dsn: str, clock: Callable[[], float], settings: PoolSettings | None = None
) -> AsyncIterator[PostgresRevocationStore]:
    pool = StorePool(StoreDsn(dsn, "test"), settings)
    await pool.open()
    try:
        store = PostgresRevocationStore(pool, clock=clock)
        await store.open()
        yield store
    finally:
        await pool.close()


@pytest.fixture(params=("file", "postgres"))
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    if request.param == "file":
        made = FileRevocationStore(tmp_path / "revoked-jobs.json", clock=clock)
        await made.open()
        yield made
        return
    async with postgres_store(request.getfixturevalue("pg_dsn"), clock) as pg:
        yield pg


def test_stores_implement_the_interface(store: Store) -> None:
    typed: RevocationStore = store  # mypy checks the protocol
    assert typed.status()["kind"] in ("file", "postgres")


async def test_saved_entries_are_read_back_and_never_shortened(store: Store, clock: Clock) -> None:
    assert await store.changes(0) == ({}, 0)
    await store.save({"7": clock.now + 100, "8": clock.now + 50})
    await store.save({"7": clock.now + 10})  # an earlier time never shortens an entry
    entries, _ = await store.changes(0)
    assert entries == {"7": clock.now + 100, "8": clock.now + 50}


async def test_changes_since_a_cursor_are_only_the_later_writes(store: Store, clock: Clock) -> None:
    await store.save({"7": clock.now + 100})
    _, cursor = await store.changes(0)
    assert await store.changes(cursor) == ({}, cursor)
    await store.save({"8": clock.now + 100})
    await store.save({"7": clock.now + 200})  # raised: it is a change again
    entries, later = await store.changes(cursor)
    assert entries == {"8": clock.now + 100, "7": clock.now + 200} and later > cursor
    await store.save({"7": clock.now + 150})  # not raised: nothing new
    assert (await store.changes(later))[0] == {}


async def test_expired_entries_are_never_returned_and_pruned(store: Store, clock: Clock) -> None:
    await store.save({"7": clock.now + 100, "8": clock.now + 50, "old": clock.now - 1})
    clock.now += 50
    assert (await store.changes(0))[0] == {"7": clock.now + 50}
    assert await store.prune() == 1 and await store.prune() == 0
    clock.now += 50
    assert await store.changes(0) == ({}, (await store.changes(0))[1])
    assert await store.prune() == 1


async def test_a_store_reopened_holds_what_was_saved(store: Store, clock: Clock, tmp_path: Path) -> None:
    await store.save({"7": clock.now + 100})
    if isinstance(store, FileRevocationStore):
        again: RevocationStore = FileRevocationStore(store.path, clock=clock)
        await again.open()
        assert (await again.changes(0))[0] == {"7": clock.now + 100}
    else:
        async with postgres_store(store._pool.dsn.dsn, clock) as other:
            assert (await other.changes(0))[0] == {"7": clock.now + 100}


# PostgreSQL only: what replicas share.


async def test_a_write_is_announced_once_committed_with_its_sequence_number(pg_dsn: str, clock: Clock) -> None:
    listener = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        await listener.execute(f"LISTEN {CHANNEL}")
        async with postgres_store(pg_dsn, clock) as store:
            await store.save({"7": clock.now + 100})
            await store.save({"7": clock.now + 50})  # changes nothing: announces nothing
            await store.save({"8": clock.now + 100})
            _, top = await store.changes(0)
        got = [n.payload async for n in listener.notifies(timeout=1.0, stop_after=3)]
    finally:
        await listener.close()
    assert got[:2] == ["revocations:1", f"revocations:{top}"] and len(got) == 2


async def test_concurrent_writers_never_commit_a_number_below_one_a_reader_has_seen(pg_dsn: str, clock: Clock) -> None:
    """Readers follow `seq > last_seen`; with writers on several connections, a reader polling all along must
    still end up with every job."""
    async with postgres_store(pg_dsn, clock, PoolSettings(max_size=8)) as store:
        seen: dict[str, float] = {}
        cursor = 0
        done = asyncio.Event()

        async def read() -> None:
            nonlocal cursor
            while not done.is_set():
                entries, cursor = await store.changes(cursor)
                seen.update(entries)
                await asyncio.sleep(0)

        reader = asyncio.create_task(read())
        await asyncio.gather(*(store.save({str(job): clock.now + 100}) for job in range(200)))
        done.set()
        await reader
        entries, cursor = await store.changes(cursor)
        seen.update(entries)
    assert len(seen) == 200


async def test_an_unreachable_store_raises_within_the_pool_bound(postgres: PostgresServer, pg_dsn: str) -> None:
    gate = Gate(postgres.port)
    await gate.restore()
    async with postgres_store(gate.dsn(pg_dsn), Clock(), FAST) as store:
        gate.cut()
        started = time.monotonic()
        with pytest.raises(RevocationStoreError, match=r"deny list at .*port=.*unavailable") as raised:
            await store.save({"7": Clock().now + 100})
        assert time.monotonic() - started < 5.0
        assert "password" not in str(raised.value)


# `Revocations` on PostgreSQL: this replica's view.


async def test_another_replica_takes_in_a_revocation_on_refresh(pg_dsn: str, clock: Clock) -> None:
    async with postgres_store(pg_dsn, clock) as a_store, postgres_store(pg_dsn, clock) as b_store:
        a, b = Revocations(a_store, clock=clock), Revocations(b_store, clock=clock)
        await a.open()
        await b.open()
        assert a.revoke("7", clock.now + 100) and await a.persist()
        assert not b.is_revoked("7")
        assert await b.refresh("1") and b.active() == ("7",)
        assert not await b.refresh("1")  # nothing new: no recompile
        assert a.revoke("8", clock.now + 100) and await a.persist()
        assert await b.refresh(RESYNC) and b.active() == ("7", "8")
        c = Revocations(PostgresRevocationStore(a_store._pool, clock=clock), clock=clock)
        await c.open()  # a replica starting later loads the whole list
        assert c.active() == ("7", "8")


async def test_nothing_revoked_is_lost_while_postgres_is_away(
    postgres: PostgresServer, pg_dsn: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut: the revocation is in force here at once, waits in the outbox (reported), is written on the first
    attempt after PostgreSQL is back, and another store instance then reads it."""
    gate = Gate(postgres.port)
    await gate.restore()
    async with postgres_store(gate.dsn(pg_dsn), clock, FAST) as through_gate:
        deny = Revocations(through_gate, clock=clock, retry=Backoff(1.0, 4.0, jitter=False))
        await deny.open()
        gate.cut()
        assert deny.revoke("7", clock.now + 100)
        assert deny.is_revoked("7") and deny.active() == ("7",)  # enforced before any write
        assert not await deny.persist()
        status = deny.status()["revocations_store"]
        assert isinstance(status, dict)
        assert status["pending"] == 1 and status["healthy"] is False and "unavailable" in str(status["last_error"])
        assert REGISTRY.get_sample_value("controlplane_revocations_pending") == 1
        assert deny.retry_at() == clock.now + 1.0
        assert not await deny.persist()  # within the backoff: not tried again (no wait on a dead store)
        await gate.restore()
        clock.now += 1.0
        assert await deny.persist()
        status = deny.status()["revocations_store"]
        assert isinstance(status, dict) and status["pending"] == 0 and status["healthy"] is True
    async with postgres_store(pg_dsn, clock) as other:
        assert (await other.changes(0))[0] == {"7": clock.now + 99}
    assert "enforced by this replica meanwhile" in caplog.text


async def test_a_full_outbox_drops_the_soonest_expiring_entry_and_says_so(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    class Down(FileRevocationStore):
        async def save(self, entries: object) -> None:  # type: ignore[override]
            raise RevocationStoreError("down")

    deny = Revocations(Down(None, clock=clock), clock=clock, outbox_limit=2)
    await deny.open()
    before = REGISTRY.get_sample_value("controlplane_revocations_unshared_total") or 0.0
    for job, ttl in (("a", 300), ("b", 100), ("c", 200)):
        deny.revoke(job, clock.now + ttl)
    assert deny.active() == ("a", "b", "c")  # all enforced here
    status = deny.status()["revocations_store"]
    assert isinstance(status, dict) and status["pending"] == 2 and status["unshared"] == 1
    assert REGISTRY.get_sample_value("controlplane_revocations_unshared_total") == before + 1
    assert "outbox full (2): job b" in caplog.text


async def test_pruning_the_shared_list_is_the_leaders_alone(pg_dsn: str, clock: Clock) -> None:
    async with postgres_store(pg_dsn, clock) as store:
        leading = False
        deny = Revocations(store, clock=clock, is_leader=lambda: leading)
        await deny.open()
        deny.revoke("7", clock.now + 10)
        await deny.persist()
        clock.now += 10 + EXPIRY_QUANTUM  # past the next quantum boundary after its expiry
        assert deny.prune() and deny.active() == ()
        await deny.persist()
        assert await _rows(store) == 1  # a follower leaves the row (readers ignore it anyway)
        leading = True
        await deny.persist()
        assert await _rows(store) == 0


async def test_an_unreachable_store_at_start_fails_the_open(postgres: PostgresServer, pg_dsn: str) -> None:
    gate = Gate(postgres.port)
    await gate.restore()
    async with postgres_store(gate.dsn(pg_dsn), Clock(), FAST) as store:
        gate.cut()
        with pytest.raises(RevocationStoreError):
            await Revocations(store).open()


async def _rows(store: PostgresRevocationStore) -> int:
    async with store._pool.connection() as conn:
        cursor = await conn.execute("SELECT count(*) FROM revocations")
        row = await cursor.fetchone()
    assert row is not None
    return int(str(row[0]))


# The credential service on PostgreSQL: what `serve --store postgres` wires, without Envoy.


class Recompiles:
    def __init__(self, service: Callable[[], CredentialService]) -> None:
        self.service = service
        self.seen: list[tuple[str, ...]] = []

    async def __call__(self) -> None:
        self.seen.append(self.service().inputs().revoked_jobs)


@asynccontextmanager
async def credential_service(
    dsn: str, tmp_path: Path, name: str, settings: PoolSettings | None = None
) -> AsyncIterator[tuple[CredentialService, Recompiles, ChangeFeed]]:
    """A replica's credential service on `dsn`, its change feed running (the subscription `serve` makes)."""
    async with postgres_store(dsn, time.time, settings) as store:
        options = CredentialOptions(listen=(LOOPBACK, 0), public=(LOOPBACK, 0), state_dir=tmp_path / name)
        options.state_dir.mkdir()
        made: list[CredentialService] = []
        recompiles = Recompiles(lambda: made[0])
        service = CredentialService(
            options,
            issuer_keys=lambda _: None,
            policy=lambda: None,
            on_change=recompiles,
            store=MemoryExchangeStore(),
            revocation_store=store,
        )
        made.append(service)
        await service.revocations.open()
        feed = ChangeFeed(store._pool, check_every=0.2)
        feed.subscribe(TOPIC, service.revocations_changed)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(feed.run(stop)), asyncio.create_task(service.run(stop))]
        try:
            await asyncio.wait_for(feed.listening(), DEADLINE)
            yield service, recompiles, feed
        finally:
            stop.set()
            await asyncio.gather(*tasks)


async def _until(condition: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < DEADLINE, f"not within {DEADLINE}s: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_job_finished_on_one_replica_recompiles_the_other(pg_dsn: str, tmp_path: Path) -> None:
    async with (
        credential_service(pg_dsn, tmp_path, "a") as (a, a_recompiles, _),
        credential_service(pg_dsn, tmp_path, "b") as (b, b_recompiles, _),
    ):
        assert await a.revoke_finished("7", "success")
        assert a_recompiles.seen == [("7",)]  # this replica's Envoys first, before any write
        await _until(lambda: b_recompiles.seen == [("7",)], "replica B recompiled with job 7 denied")
        assert b.revocations.is_revoked("7") and a_recompiles.seen == [("7",)]  # its own notification: no recompile


async def test_a_revocation_made_while_postgres_is_away_reaches_the_other_replica_once_it_is_back(
    postgres: PostgresServer, pg_dsn: str, tmp_path: Path
) -> None:
    """Replica A loses PostgreSQL, revokes (in force on its Envoys at once: one recompile), reports the pending
    write in /status; PostgreSQL back, `run` writes the outbox and replica B denies the job too."""
    gate = Gate(postgres.port)
    await gate.restore()
    async with (
        credential_service(gate.dsn(pg_dsn), tmp_path, "a", FAST) as (a, a_recompiles, _),
        credential_service(pg_dsn, tmp_path, "b") as (b, b_recompiles, _),
    ):
        gate.cut()
        assert await a.revoke_finished("7", "success")
        assert a_recompiles.seen == [("7",)]
        revocations = a.status()["revocations_store"]
        assert isinstance(revocations, dict) and revocations["pending"] == 1 and not revocations["healthy"]
        assert not b.revocations.is_revoked("7")
        await gate.restore()
        waited = await _until(lambda: b_recompiles.seen == [("7",)], "replica B denied job 7 after the outage")
        revocations = a.status()["revocations_store"]
        assert isinstance(revocations, dict) and revocations["pending"] == 0 and revocations["healthy"]
        print(f"\nwritten and seen by the other replica {waited:.2f}s after PostgreSQL came back")


async def test_no_revocation_is_lost_across_a_postgres_restart(tmp_path: Path) -> None:
    """PostgreSQL itself stopped (fast shutdown) and started again on its data: a job finished meanwhile is denied
    at once, written once the server is back, and read by a replica started afterwards."""
    with running_server() as server:
        async with credential_service(server.admin_dsn, tmp_path, "a", FAST) as (a, recompiles, _):
            server.shut_down()
            assert await a.revoke_finished("7", "success")
            assert recompiles.seen == [("7",)] and a.revocations.is_revoked("7") and _pending(a) == 1
            await asyncio.to_thread(server.start_again)
            waited = await _until(lambda: _pending(a) == 0, "the outbox written after the restart")
        async with credential_service(server.admin_dsn, tmp_path, "b") as (b, _, _):
            assert b.revocations.active() == ("7",)
        print(f"\noutbox written {waited:.2f}s after PostgreSQL accepted connections again")


def _pending(service: CredentialService) -> object:
    revocations = service.status()["revocations_store"]
    assert isinstance(revocations, dict)
    return revocations["pending"]
