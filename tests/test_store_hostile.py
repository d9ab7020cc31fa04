"""Hostile or corrupt rows in the shared tables, and a hostile session on the change feed (issue 12).

Another writer to the database (a buggy older replica, an operator's manual UPDATE, a compromised user) can put
anything the schema allows into the shared tables, and any session can NOTIFY the feed's channel. Each test
writes such a thing with plain SQL and checks the replica's reader neither crashes nor fails open, keeps what
it had for the bad row only, stays bounded, and says which table and key it refused.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest

from controlplane.model.inventory import Group, Inventory, Project
from controlplane.sources import inventory_table
from controlplane.sources.inventory_table import InventoryTable, content_hash
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import migrate
from controlplane.store.pool import PoolSettings, StorePool

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


def sql(dsn: str, statement: str, params: tuple[object, ...] = ()) -> None:
    """What another writer does: plain SQL on its own session."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)  # type: ignore[arg-type]


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
