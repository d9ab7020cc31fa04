"""controlplane/store against a real PostgreSQL 18 (tests/support/postgres.py): migrations that apply once
however many replicas start together, a downgrade refused, a pool that reports a dead server within its bound,
and DSN sources that never put a password on a command line or in a log."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

from controlplane.store import dsn as store_dsn
from controlplane.store.dsn import DsnError, StoreDsn
from controlplane.store.migrations import MIGRATIONS, Migration, MigrationError, SchemaTooNew, migrate, schema_version
from controlplane.store.pool import PoolSettings, StorePool, StoreUnavailable
from tests.support.postgres import running_server

ALL = [m.version for m in MIGRATIONS]  # what a fresh database gets: tests do not hard-code how many there are
FAST = PoolSettings(min_size=1, max_size=4, connect_timeout=1.0, acquire_timeout=0.5, statement_timeout=0.2)
ALL = [m.version for m in MIGRATIONS]  # every migration this release knows, applied by one starter


async def _migrate_once(dsn: str, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await migrate(conn, migrations)


ALL = [m.version for m in MIGRATIONS]


def _ledger(dsn: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as db:
        return db.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()


async def test_migrations_from_five_concurrent_starters_apply_once(pg_dsn: str) -> None:
    results = await asyncio.gather(*(_migrate_once(pg_dsn) for _ in range(5)))
    assert sorted(results) == [[], [], [], [], ALL]  # exactly one starter applied the migrations
    assert _ledger(pg_dsn) == [(m.version, m.name) for m in MIGRATIONS]
    with psycopg.connect(pg_dsn) as db:
        tables = {row[0] for row in db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables >= {"schema_migrations", "replay", "finished_jobs", "job_credentials", "audit"}


async def test_rerunning_is_a_no_op(pg_dsn: str) -> None:
    assert await _migrate_once(pg_dsn) == ALL
    with psycopg.connect(pg_dsn) as db:
        db.execute("INSERT INTO replay VALUES ('s', 1, 10.0)")
    assert await _migrate_once(pg_dsn) == []
    with psycopg.connect(pg_dsn) as db:
        assert db.execute("SELECT subject, uses FROM replay").fetchall() == [("s", 1)]
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        assert await schema_version(conn) == len(MIGRATIONS)


def test_migrations_from_two_processes_apply_once(pg_dsn: str) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        import psycopg
        from controlplane.store.migrations import migrate

        async def main():
            async with await psycopg.AsyncConnection.connect(sys.argv[1]) as conn:
                print(await migrate(conn))

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    children = [
        subprocess.Popen([sys.executable, "-c", script, pg_dsn], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = sorted(child.communicate(timeout=30)[0].strip() for child in children)
    assert [child.returncode for child in children] == [0, 0]
    assert outputs == [str(ALL), "[]"]
    assert _ledger(pg_dsn) == [(m.version, m.name) for m in MIGRATIONS]


async def test_a_newer_database_is_refused(pg_dsn: str) -> None:
    future = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "from a newer release", "CREATE TABLE later (x int)"))
    assert await _migrate_once(pg_dsn, future) == [*ALL, len(ALL) + 1]
    with pytest.raises(SchemaTooNew, match=rf"version {len(ALL) + 1}, newer than this release knows \({len(ALL)}\)"):
        await _migrate_once(pg_dsn)


async def test_a_failing_migration_leaves_nothing_applied(pg_dsn: str) -> None:
    broken = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "broken", "CREATE TABLE replay (x int)"))
    with pytest.raises(psycopg.errors.DuplicateTable):
        await _migrate_once(pg_dsn, broken)
    async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
        assert await schema_version(conn) == 0  # migration 1 rolled back with it: one transaction


async def test_a_renamed_or_misnumbered_migration_is_refused(pg_dsn: str) -> None:
    await _migrate_once(pg_dsn)
    renamed = (Migration(1, "something else", MIGRATIONS[0].sql), *MIGRATIONS[1:])
    with pytest.raises(MigrationError, match="belongs to another build"):
        await _migrate_once(pg_dsn, renamed)
    with pytest.raises(MigrationError, match=r"numbered 1\.\.n"):
        await _migrate_once(pg_dsn, (Migration(len(ALL) + 1, "gap", "SELECT 1"),))


async def test_pool_connections_carry_name_and_statement_timeout(pg_dsn: str) -> None:
    pool = StorePool(StoreDsn(pg_dsn, "test"), FAST)
    await pool.open()
    try:
        async with pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT current_setting('application_name'), current_setting('statement_timeout')"
            )
            assert await cursor.fetchone() == ("controlplane", "200ms")
        with pytest.raises(StoreUnavailable):  # the server cancels a statement past the timeout
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_sleep(2)")
    finally:
        await pool.close()


async def test_pool_reports_a_stopped_server_within_its_bound(caplog: pytest.LogCaptureFixture) -> None:
    with running_server() as server:  # a server of its own: this test stops it
        dsn = StoreDsn(server.admin_dsn + " password=hunter2", "test")
        pool = StorePool(dsn, FAST)
        await pool.open()
        try:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            server.stop()
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as raised:
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            assert time.monotonic() - started < FAST.acquire_timeout + FAST.connect_timeout + 1
            assert "hunter2" not in str(raised.value)
        finally:
            await pool.close()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable"):  # nothing listening any more: open() is bounded too
        await StorePool(dsn, FAST).open()
    assert time.monotonic() - started < FAST.connect_timeout + 1
    assert "hunter2" not in caplog.text  # psycopg_pool's own connection warnings included


def test_a_password_on_the_command_line_is_refused() -> None:
    for value in (
        "postgres://cp:hunter2@db.internal/cp",
        "postgresql://cp@db.internal/cp?password=hunter2",
        "host=db.internal user=cp password=hunter2",
    ):
        with pytest.raises(DsnError) as raised:
            store_dsn.from_argument(value)
        message = str(raised.value)
        assert message.startswith("--store-dsn:")
        assert "--store-dsn-env" in message and "--store-dsn-file" in message
        assert "hunter2" not in message
    assert store_dsn.from_argument("postgres://cp@db.internal:5432/cp").source == "--store-dsn"


def test_an_invalid_dsn_is_not_echoed() -> None:
    for value in ("mysql://cp:hunter2@db/cp", "host='hunter2", ""):
        with pytest.raises(DsnError) as raised:
            store_dsn.from_argument(value)
        assert "hunter2" not in str(raised.value)


def test_env_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_STORE_DSN", "postgres://cp:hunter2@db/cp")
    got = store_dsn.resolve(store=None, dsn_env="CP_STORE_DSN", dsn_file=None)
    assert got.dsn == "postgres://cp:hunter2@db/cp" and got.source == "$CP_STORE_DSN"
    with pytest.raises(DsnError, match="CP_MISSING is not set"):
        store_dsn.from_env("CP_MISSING", {})
    with pytest.raises(DsnError, match="exactly once"):
        store_dsn.resolve(store="postgres://db/cp", dsn_env="CP_STORE_DSN", dsn_file=None)
    with pytest.raises(DsnError, match="exactly once"):
        store_dsn.resolve(store=None, dsn_env=None, dsn_file=None)


def test_file_source_is_read_strictly(tmp_path: Path) -> None:
    path = tmp_path / "dsn"
    path.write_text("postgres://cp:hunter2@db/cp\n")
    got = store_dsn.resolve(store=None, dsn_env=None, dsn_file=path)
    assert got.dsn == "postgres://cp:hunter2@db/cp"  # one trailing newline stripped
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(DsnError, match="symbolic link"):
        store_dsn.from_file(link)
    path.write_text("postgres://db/cp\npostgres://other/cp\n")
    with pytest.raises(DsnError, match="more than one line"):
        store_dsn.from_file(path)
    path.write_text("x" * (store_dsn.MAX_DSN_FILE_BYTES + 1))
    with pytest.raises(DsnError, match="larger than"):
        store_dsn.from_file(path)
    with pytest.raises(DsnError, match="cannot read"):
        store_dsn.from_file(tmp_path / "absent")
    with pytest.raises(DsnError, match="not a regular file"):
        store_dsn.from_file(tmp_path)


def test_a_named_pipe_at_the_dsn_path_is_refused_at_once(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer: a named pipe at --store-dsn-file (or --store-key-file) hung
    the start for good. It is refused as not a regular file, without opening it."""
    fifo = tmp_path / "dsn"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(store_dsn.from_file(fifo))
        except DsnError as error:
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)  # on the old code it never returns: fails below, no hang
    reader.start()
    reader.join(10)
    assert outcome, "reading a named pipe as the DSN file did not return"
    assert isinstance(outcome[0], DsnError) and "not a regular file (a named pipe)" in str(outcome[0])


def test_redaction_never_shows_a_password() -> None:
    for value in (
        "postgres://cp:hunter2@db:5433/cp?sslmode=require",
        "postgres://cp@db/cp?password=hunter2",
        "postgres://cp:hunter2@db/cp?password=hunter2&sslpassword=hunter2",
        "host=db user=cp password=hunter2",
        "host='hunter2",  # unparseable: not shown at all
    ):
        shown = store_dsn.redacted(value)
        assert "hunter2" not in shown, shown
        dsn = StoreDsn(value, "test")
        assert "hunter2" not in repr(dsn) and "hunter2" not in str(dsn)
    assert store_dsn.redacted("postgres://cp:hunter2@db:5433/cp") == (
        "user=cp dbname=cp host=db port=5433 password=redacted"
    )


async def test_a_restarted_server_keeps_its_data_and_the_pool_comes_back() -> None:
    """The test server's own restart (shut_down, start_again on the same port) as the outage tests use it."""
    settings = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=1.0, statement_timeout=1.0)
    with running_server() as server:
        pool = StorePool(StoreDsn(server.admin_dsn, "test"), settings)
        await pool.open()
        try:
            async with pool.connection() as conn:
                await conn.execute("CREATE TABLE kept (n int)")
                await conn.execute("INSERT INTO kept VALUES (7)")
            server.shut_down()
            with pytest.raises(StoreUnavailable):
                async with pool.connection() as conn:
                    await conn.execute("SELECT 1")
            server.start_again()
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with pool.connection() as conn:
                        row = await (await conn.execute("SELECT n FROM kept")).fetchone()
                    break
                except StoreUnavailable:
                    assert time.monotonic() < deadline, "the pool never came back"
                    await asyncio.sleep(0.05)
            assert row == (7,)
        finally:
            await pool.close()
