"""Hostile or corrupt rows in the shared tables, and a hostile session on the change feed (issue 12).

Another writer to the database (a buggy older replica, an operator's manual UPDATE, a compromised user) can put
anything the schema allows into the shared tables, and any session can NOTIFY the feed's channel. Each test
writes such a thing with plain SQL and checks the replica's reader neither crashes nor fails open, keeps what
it had for the bad row only, stays bounded, and says which table and key it refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import psycopg
import pytest

from controlplane.credentials.key_cipher import parse_keks
from controlplane.credentials.keys import KeyStoreError
from controlplane.credentials.keys_pg import PostgresKeyStore, SharedKeys
from controlplane.credentials.revocation_store_pg import PostgresRevocationStore
from controlplane.credentials.revocations import Revocations
from controlplane.model.inventory import Group, Inventory, Project
from controlplane.sources import inventory_table
from controlplane.sources.gitlab_watch import MAX_PROJECTS_DUE, MIN_FULL_GAP, InventoryWatcher
from controlplane.sources.inventory_table import InventoryTable, content_hash
from controlplane.store.changes import CHANNEL, NOTIFICATIONS, RESYNC, ChangeFeed
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import PoolSettings, StorePool, StoreUnavailable
from controlplane.store.replicas import ReplicaInfo, ReplicaRegistry
from tests.support.clock import Clock
from tests.support.postgres import Gate, PostgresServer

KEK = base64.b64encode(b"k" * 32).decode()
ROTATE, TTL, LEAD = 100.0, 30.0, 10.0
FAST = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=2.0)


@asynccontextmanager
async def opened(dsn: str) -> AsyncIterator[StorePool]:
    pool = StorePool(StoreDsn(dsn, "test"), FAST)
    await pool.open()
    try:
        async with pool.connection() as conn:
            await migrate(conn)
        yield pool
    finally:
        await pool.close()


async def open_keys(pool: StorePool, clock: Clock) -> SharedKeys:
    store = PostgresKeyStore(pool, parse_keks(KEK, "test KEK"))
    return await SharedKeys.open(store, rotate_every=ROTATE, max_credential_ttl=TTL, publish_lead=LEAD, clock=clock)


def kids(keys: SharedKeys) -> list[str]:
    return [k["kid"] for k in json.loads(keys.keys.published_jwks())["keys"]]


async def rows(pool: StorePool) -> list[tuple[object, ...]]:
    async with pool.connection() as conn:
        cursor = await conn.execute("SELECT kid, sealed_private_key FROM signing_keys ORDER BY not_before")
        return await cursor.fetchall()


class CountingGitLab:
    """A GitLab that answers at once and counts what it is asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        self.calls.append("inventory")
        return Inventory((Project(42, "acme/app", 10),), (Group(10, "acme"),), fetched_at=time.time())

    def fetch_project(self, project: str | int) -> Project | None:
        self.calls.append(f"project {project}")
        return None


async def nothing() -> None:
    return None


def sql(dsn: str, statement: str, params: tuple[object, ...] = ()) -> None:
    """What another writer does: plain SQL on its own session."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


# --- revocations ---------------------------------------------------------------------------------------------


async def test_corrupt_revocation_rows_never_drop_the_deny_list_nor_open_it(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows another writer put in `revocations`: a NaN time (before: silently not denied, fail open), an infinite
    one, a job id of 200 kB (about the most the primary key index takes, compressed) and one with a control
    character (before: both compiled into every Envoy's routes), an expired one. Every good row is still denied,
    on start and on refresh; the bad ones are said and counted."""
    now = time.time()
    async with opened(pg_dsn) as pool:
        store = PostgresRevocationStore(pool)
        await store.open()
        writer = Revocations(PostgresRevocationStore(pool))
        await writer.open()
        assert writer.revoke("100", now + 600) and await writer.persist()
        rows = [
            ("101", "NaN"),
            ("102", "Infinity"),
            ("7" * 200_000, str(now + 600)),
            ("103\u0007bell", str(now + 600)),
            ("104", "-1e308"),
        ]
        for job, until in rows:
            sql(
                pg_dsn,
                "INSERT INTO revocations VALUES (%s, %s::double precision, nextval('revocations_seq'))",
                (job.replace("\\u0007", "\x07"), until),
            )
        reader = Revocations(store)
        with caplog.at_level(logging.ERROR, "controlplane.revocations"):
            await reader.open()
        assert reader.active() == ("100", "101", "102")
        assert reader.is_revoked("101") and reader.next_expiry() is not None
        assert not math.isnan(reader.next_expiry() or 0.0)
        assert reader.status()["revocations_store"]["refused_rows"] == 3  # type: ignore[index]
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "revocations table" in logged and "job 101" in logged and "200000 characters" in logged
        assert len(logged) < 10_000  # the long id is never logged whole
        assert writer.revoke("105", now + 600) and await writer.persist()
        assert await reader.refresh("1") and "105" in reader.active()  # later writes still arrive


# --- gitlab_inventories ---------------------------------------------------------------------------------------

GOOD = Inventory(projects=(Project(5, "acme/app", 3),), groups=(Group(3, "acme"),), fetched_at=1000.0)
OTHER = Inventory(projects=(Project(6, "beta/lib", 4),), groups=(Group(4, "beta"),), fetched_at=1000.0)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("""UPDATE gitlab_inventories SET document = '{"projects": [{"id": "x"}]}', content_hash = 'h'""", "malformed"),
        ("""UPDATE gitlab_inventories SET document = '[1, 2]', content_hash = 'h'""", "malformed"),
        ("""UPDATE gitlab_inventories SET document = '{"projects": "abc"}', content_hash = 'h'""", "malformed"),
        ("UPDATE gitlab_inventories SET read_at = 'NaN'", "read_at"),
        ("UPDATE gitlab_inventories SET read_at = 'Infinity'", "read_at"),
        # a manual edit that left the hash alone: the document is no longer what the leader read
        (
            """UPDATE gitlab_inventories SET document = jsonb_set(document, '{projects,0,id}', '99')""",
            "content_hash",
        ),
    ],
)
async def test_a_corrupt_inventory_row_is_refused_alone_and_said(
    pg_dsn: str, tamper: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: a malformed document raised KeyError/TypeError/AttributeError out of `read()` (ending the
    follower's share loop: no inventory update ever again), and a NaN or infinite `read_at` made the mirror
    never stale (bindings never withdrawn: fail open)."""
    async with opened(pg_dsn) as pool:
        leader, follower = InventoryTable(pool, clock=lambda: 1000.0), InventoryTable(pool, clock=lambda: 1000.0)
        await leader.write("gitlab.example", GOOD)
        await leader.write("other.example", OTHER)
        assert (await follower.read())["gitlab.example"].inventory == GOOD
        sql(pg_dsn, tamper + " WHERE issuer = 'gitlab.example'")
        with caplog.at_level(logging.ERROR, "controlplane.gitlab"):
            rows = await follower.read({"other.example": content_hash(OTHER)})
            await follower.read({"other.example": content_hash(OTHER)})
        assert "gitlab.example" not in rows  # the reader keeps its last good copy, stale on time
        assert set(rows) == {"other.example"}  # every other row is still read
        assert reason in follower.refused["gitlab.example"]
        logged = [r.getMessage() for r in caplog.records if "gitlab_inventories" in r.getMessage()]
        assert len(logged) == 1 and "'gitlab.example'" in logged[0]  # once per reason, naming table and key
        await leader.write("gitlab.example", OTHER)  # the leader's next good write is taken again
        assert (await follower.read())["gitlab.example"].inventory == OTHER
        assert follower.refused == {}


async def test_an_oversized_inventory_document_is_never_fetched(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size is judged by PostgreSQL: a bloated row costs the reader nothing (before: any size was parsed)."""
    monkeypatch.setattr(inventory_table, "MAX_DOCUMENT_BYTES", 64 * 1024)
    async with opened(pg_dsn) as pool:
        table = InventoryTable(pool, clock=lambda: 1000.0)
        await table.write("gitlab.example", GOOD)
        big = Inventory(projects=tuple(Project(i, f"acme/p{i}", 3) for i in range(1, 3000)), fetched_at=1000.0)
        await table.write("big.example", big)
        rows = await table.read()
        assert set(rows) == {"gitlab.example"}
        assert "over the 65536 bytes bound" in table.refused["big.example"]


# --- the change feed ------------------------------------------------------------------------------------------


async def test_a_notify_flood_with_spoofed_topics_and_payloads_stays_bounded(pg_dsn: str) -> None:
    """Any session can NOTIFY the channel. 3,000 notifications of made-up topics and 3,000 distinct payloads on a
    subscribed topic: the metric gains one label, not 3,000 (before: one series per made-up topic, forever), and a
    subscriber that re-reads whatever the payload is called a few times, not 3,000 (before: once each, one
    PostgreSQL read apiece)."""
    calls: list[str] = []
    done = asyncio.Event()

    async def reread(payload: str) -> None:
        calls.append(payload)
        if payload == "last":
            done.set()
        await asyncio.sleep(0.01)  # a re-read takes a moment

    async with opened(pg_dsn) as pool:
        feed = ChangeFeed(pool, check_every=0.5)
        feed.subscribe("revocations", reread, coalesce=True)
        stop = asyncio.Event()
        task = asyncio.create_task(feed.run(stop))
        try:
            await asyncio.wait_for(feed.listening(), 10)
            before = {s.labels["topic"] for m in NOTIFICATIONS.collect() for s in m.samples}
            started = time.monotonic()
            with psycopg.connect(pg_dsn, autocommit=True) as hostile:
                hostile.execute(
                    "SELECT pg_notify(%s, 'spoof' || n || ':' || n) FROM generate_series(1, 3000) n", (CHANNEL,)
                )
                hostile.execute("SELECT pg_notify(%s, 'revocations:' || n) FROM generate_series(1, 3000) n", (CHANNEL,))
                hostile.execute("NOTIFY controlplane_changes, 'revocations:last'")
            await asyncio.wait_for(done.wait(), 10)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    after = {s.labels["topic"] for m in NOTIFICATIONS.collect() for s in m.samples}
    assert after - before <= {"other", "revocations"}
    assert calls[0] == RESYNC
    assert len(calls) <= 2 + elapsed / feed.min_interval, (len(calls), elapsed)


async def test_a_resync_request_flood_reads_gitlab_at_a_bounded_rate() -> None:
    """`gitlab-resync` is a NOTIFY any session can send ("all", "rename:<any id>"); the leader's watcher is then
    asked for full reads and unknown projects without end. Before: a full reconcile back-to-back for as long as
    the flood lasted, and one queued project per distinct id (unbounded)."""
    source = CountingGitLab()
    watcher = InventoryWatcher("gitlab", source, on_change=nothing, clock=time.time)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        await asyncio.wait_for(watcher.settled.wait(), 10)
        started = time.monotonic()
        for n in range(3000):
            watcher.request_full()
            watcher.request_project(1_000_000 + n)
            assert len(watcher._projects_due) <= MAX_PROJECTS_DUE
            if n % 10 == 0:
                await asyncio.sleep(0.003)  # a flood spread over a second or so, as notifications arrive
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    full_reads = sum(call.startswith("inventory") for call in source.calls)
    assert full_reads <= 2 + elapsed / MIN_FULL_GAP, (full_reads, elapsed)
    # One project's re-read is one request: their rate is the GitLab client's token bucket (rate_limit.py).


# --- signing_keys ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["not_before", "retire_after", "created_at"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
async def test_a_signing_key_with_a_non_finite_time_is_refused_and_the_held_keys_kept(
    pg_dsn: str, column: str, value: str
) -> None:
    """The seal covers the key, not its times. Before: a NaN `not_before` was taken (sorting undefined, the
    leader's rotation never due again, `next_change_at` NaN: the run loop spinning every 50 ms)."""
    clock = Clock(1_000_000.0)
    async with opened(pg_dsn) as pool:
        keys = await open_keys(pool, clock)
        before = kids(keys)
        sql(pg_dsn, f"UPDATE signing_keys SET {column} = %s::double precision", (value,))
        follower = PostgresKeyStore(pool, parse_keks(KEK, "test KEK"))
        with pytest.raises(KeyStoreError, match=f"key {before[0]}: a time is not a finite number.*{column}"):
            await follower.load()
        clock.now += 1_000  # a rotation is due: the leader must neither adopt nor overwrite the row
        await keys.on_notification("")
        assert not await keys.step(is_leader=True)
        assert kids(keys) == before and keys.status()["last_error"]


# --- a server that accepts and never answers ------------------------------------------------------------------


async def test_a_server_that_never_answers_is_unavailable_within_the_bound(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    """A hung PostgreSQL (or a relay in front of it) that keeps the connection open and answers nothing: the
    server-side statement_timeout never fires and the kernel answers TCP keepalives. Before: the call waited
    forever, holding its pooled connection (the exchange request, the audit writer or a feed subscriber stuck
    with it)."""
    gate = Gate(postgres.port)
    await gate.restore()
    settings = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=1.0)
    pool = StorePool(StoreDsn(gate.dsn(pg_dsn), "test"), settings)
    await pool.open()
    try:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
        gate.silent = True
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no answer within 4s|no connection"):

            async def one() -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")

            await asyncio.wait_for(one(), 60)
        assert time.monotonic() - started < settings.work_timeout + 12  # psycopg's cancel attempt: up to 10 s
    finally:
        gate.silent = False
        gate.cut()
        await asyncio.wait_for(pool.close(), 30)


# --- replicas -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    [
        "'[1, 2, 3]'",
        """'{"summary": "x", "proxies": 5}'""",
        """'{"summary": {"connected": "many", "by_group": {"edge": "x"}}}'""",
        """'{"proxies": [1, "two"], "versions": []}'""",
        # 10 MB of proxies: never fetched whole (PostgreSQL replaces it), whatever the writer meant
        """jsonb_build_object('proxies', (SELECT jsonb_agg(jsonb_build_object('node', repeat('n', 100)))
                                          FROM generate_series(1, 100000)))""",
    ],
)
async def test_a_hostile_replica_row_leaves_status_and_the_fleet_answering(pg_dsn: str, hostile: str) -> None:
    """Before: a `fleet` not of the published shape raised in `list()` / `whole_fleet()`, i.e. in every
    `/status` and `status --fleet`; and every replica fetched any size of it at every heartbeat."""
    clock = Clock(1000.0)
    async with opened(pg_dsn) as pool:
        fleet = {"summary": {"connected": 1, "by_group": {"edge": 1}}, "proxies": [{"node": "gw-1", "group": "edge"}]}
        info = ReplicaInfo("a", "a.host", "a:18000", "a:9902", "1.2.3", clock())
        a = ReplicaRegistry(pool, info, fleet=lambda: fleet, clock=clock)
        await a.beat()
        sql(
            pg_dsn,
            "INSERT INTO replicas SELECT 'evil', host, xds_address, admin_address, version, started_at, last_seen, "
            f"heartbeat_every, NULL, false, {hostile} FROM replicas WHERE replica_id = 'a'",
        )
        await a.beat()
        listed = {row["replica"]: row for row in a.list(with_fleet=True)}
        assert set(listed) == {"a", "evil"} and "invalid" in listed["evil"]["fleet"]
        assert len(str(listed["evil"]["fleet"])) < 100
        whole = a.whole_fleet()
        assert whole["connected"] == 1 and [p["node"] for p in whole["proxies"]] == ["gw-1"]
        assert a.status()["replicas"]


# --- two leaders at once --------------------------------------------------------------------------------------


async def test_two_replicas_that_both_believe_they_lead_rotate_the_keys_once(pg_dsn: str) -> None:
    """A lease lost but not yet noticed (pg_terminate_backend of the leader's session) leaves two leaders for up
    to `step_down_bound`. Key rotation is the duty whose double action would hurt most (two successors: replicas
    signing with different keys); it plans from the rows it reads under SIGNING_KEYS_LOCK, so it acts once."""
    clock = Clock(1_000_000.0)
    async with opened(pg_dsn) as pool:
        replicas = [await open_keys(pool, clock) for _ in range(4)]
        first = kids(replicas[0])
        clock.now += ROTATE  # a successor is due
        await asyncio.gather(*(keys.step(is_leader=True) for keys in replicas))
        await asyncio.gather(*(keys.step(is_leader=True) for keys in replicas))  # and again: nothing more
        stored = await rows(pool)
        assert len(stored) == 2 and first[0] in [kid for kid, _ in stored]
        for keys in replicas:
            await keys.on_notification("")
            await keys.step(is_leader=False)
        assert len({tuple(kids(keys)) for keys in replicas}) == 1
