"""The exchange's store, against its interfaces (`ReplayCounter`, `JobLedger`): every implementation runs the
same tests: memory, SQLite and PostgreSQL (issue 12, on the session's real server). Then what only PostgreSQL
promises (claims and finish/issued atomic across replicas, bounded pruning, fail closed), and what only the
SQLite file promises: durability across processes, atomicity under concurrent writers, mode 0600, fail closed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.credentials import exchange_store
from controlplane.credentials.exchange_store import (
    ExchangeStoreError,
    FinishedJob,
    JobLedger,
    LiveJob,
    MemoryExchangeStore,
    ReplayCounter,
    SqliteExchangeStore,
)
from controlplane.credentials.exchange_store_pg import PostgresExchangeStore
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import PoolSettings, StorePool

GITLAB = "https://gitlab.example.com"
OTHER = "https://gitlab.other.example"


async def issued(
    store: JobLedger, job_id: str, expires_at: float, project_id: str = "42", issuer: str = GITLAB
) -> bool:
    return await store.issued(job_id, expires_at, project_id=project_id, issuer=issuer)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


Store = MemoryExchangeStore | SqliteExchangeStore | PostgresExchangeStore
STORES = ("memory", "postgres", "sqlite")


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def open_postgres(dsn: str, clock: Clock, settings: PoolSettings | None = None) -> PostgresExchangeStore:
    store = PostgresExchangeStore(StorePool(StoreDsn(dsn, "test"), settings), clock=clock)
    await store.open()
    return store


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> AsyncIterator[Store]:
    """Each implementation in turn; PostgreSQL's on a fresh database of the session's real server."""
    made: Store
    if request.param == "memory":
        made = MemoryExchangeStore(clock=clock)
    elif request.param == "sqlite":
        made = SqliteExchangeStore(tmp_path / "exchange.sqlite3", clock=clock)
    else:
        made = await open_postgres(request.getfixturevalue("pg_dsn"), clock)
    yield made
    if isinstance(made, SqliteExchangeStore):
        made.close()
    elif isinstance(made, PostgresExchangeStore):
        await made.close()


def test_stores_implement_both_interfaces(store: Store) -> None:
    counter: ReplayCounter = store  # mypy checks the assignment: the protocol's methods and signatures
    ledger: JobLedger = store
    assert callable(counter.claim) and callable(ledger.issued)


async def test_claim_counts_up_to_the_limit_per_subject(store: Store, clock: Clock) -> None:
    expires = clock.now + 300
    assert [await store.claim("a", expires, 3) for _ in range(4)] == [True, True, True, False]
    assert await store.claim("b", expires, 3)  # another subject has its own count
    assert not await store.claim("c", expires, 0)


async def test_a_claim_is_forgotten_once_its_subject_token_expired(store: Store, clock: Clock) -> None:
    assert await store.claim("a", clock.now + 100, 1) and not await store.claim("a", clock.now + 100, 1)
    clock.now += 100
    assert await store.claim("a", clock.now + 100, 1)


async def test_finished_jobs_are_remembered_until_keep_until(store: Store, clock: Clock) -> None:
    assert not await store.is_finished("7")
    await store.finish("7", clock.now + 50)
    await store.finish("7", clock.now + 10)  # an earlier end never shortens the record
    assert await store.is_finished("7") and not await store.is_finished("8")
    clock.now += 50
    assert not await store.is_finished("7")


async def test_the_ledger_keeps_the_latest_credential_expiry_of_a_job(store: Store, clock: Clock) -> None:
    assert await store.credentials_until("7") is None
    assert await issued(store, "7", clock.now + 200) and await issued(store, "7", clock.now + 100)
    assert await store.credentials_until("7") == clock.now + 200 and await store.credentials_until("8") is None
    clock.now += 200
    assert await store.credentials_until("7") is None


async def test_finishing_a_job_answers_how_long_it_must_be_denied_and_stops_issuing(store: Store, clock: Clock) -> None:
    """One step each, so a replica issuing while another records the end cannot slip a credential between."""
    assert await issued(store, "7", clock.now + 300)
    assert await store.finish("7", clock.now + 1000) == clock.now + 300
    assert not await issued(store, "7", clock.now + 600)  # refused, and not recorded
    assert await store.credentials_until("7") == clock.now + 300
    assert await store.finish("8", clock.now + 1000) is None  # a job that never exchanged


async def test_the_ledger_lists_the_jobs_holding_unexpired_credentials_latest_first_and_bounded(
    store: Store, clock: Clock
) -> None:
    """What the recovery sweep asks GitLab about after a restart: which job, of which project, on which GitLab."""
    assert await store.jobs_with_credentials(10) == []
    assert await issued(store, "7", clock.now + 200)
    assert await issued(store, "8", clock.now + 100, project_id="43", issuer=OTHER)
    assert await issued(store, "9", clock.now + 300)
    assert await issued(store, "7", clock.now + 50)  # an earlier credential never shortens the record
    assert await store.jobs_with_credentials(10) == [
        LiveJob("9", "42", GITLAB, clock.now + 300),
        LiveJob("7", "42", GITLAB, clock.now + 200),
        LiveJob("8", "43", OTHER, clock.now + 100),
    ]
    assert [job.job_id for job in await store.jobs_with_credentials(2)] == ["9", "7"]
    assert await store.jobs_with_credentials(0) == []
    clock.now += 150
    assert [job.job_id for job in await store.jobs_with_credentials(10)] == ["9", "7"]


async def test_a_finished_job_stays_listed_while_its_credentials_live_and_a_refused_one_is_not_added(
    store: Store, clock: Clock
) -> None:
    """Listed until its credentials expire: if the deny list entry was lost in a crash after `finish`, the sweep
    still asks GitLab about the job (it skips jobs already on the deny list itself)."""
    assert await issued(store, "7", clock.now + 300)
    await store.finish("7", clock.now + 1000)
    await store.finish("8", clock.now + 1000)
    assert not await issued(store, "8", clock.now + 300)
    assert [job.job_id for job in await store.jobs_with_credentials(10)] == ["7"]


async def test_a_job_without_a_project_id_is_recorded_for_revocation(store: Store, clock: Clock) -> None:
    """GitLab always sets `project_id`; a token without one still gets its credential's expiry recorded."""
    assert await store.issued("7", clock.now + 300, project_id=None, issuer=GITLAB)
    assert await store.finish("7", clock.now + 1000) == clock.now + 300
    assert await store.jobs_with_credentials(10) == [LiveJob("7", None, GITLAB, clock.now + 300)]


async def test_finishing_a_job_answers_until_its_exchanged_subject_token_expires_too(
    store: Store, clock: Clock
) -> None:
    """The ID token a credential was exchanged for may outlive the credential: the job stays denied until both
    expired (a raw use of that token at a backend accepting raw tokens), the latest token's `exp` kept."""
    assert await store.issued("7", clock.now + 300, project_id="42", issuer=GITLAB, subject_expires_at=clock.now + 900)
    assert await store.issued("7", clock.now + 200, project_id="42", issuer=GITLAB, subject_expires_at=clock.now + 600)
    assert await store.issued("7", clock.now + 100, project_id="42", issuer=GITLAB)  # unknown never shortens it
    assert await store.credentials_until("7") == clock.now + 300  # credentials alone, as before
    clock.now += 400  # the credentials have expired, the token not: the ledger still knows it
    assert await store.credentials_until("7") is None
    assert await store.claim("other", clock.now + 10, 1)  # a write: expired rows are swept (SQLite, PostgreSQL)
    if isinstance(store, PostgresExchangeStore):
        await store.prune()
    assert await store.finish("7", clock.now + 1000) == clock.now + 500
    clock.now += 500
    assert await store.finish("7", clock.now + 1000) is None


async def test_a_credential_without_a_subject_expiry_answers_its_own(store: Store, clock: Clock) -> None:
    """Rows written before subject expiries were recorded (or without one) count their credentials alone."""
    assert await issued(store, "7", clock.now + 300)
    clock.now += 300
    if isinstance(store, PostgresExchangeStore):
        await store.prune()
    assert await store.finish("7", clock.now + 1000) is None


async def test_finished_jobs_keep_their_project_and_end_for_a_later_policy_change(store: Store, clock: Clock) -> None:
    """What `CredentialService.policy_changed` re-judges after a restart or on another replica: the projects of the
    jobs ended after `since`, then the jobs of the projects asked for, the latest first, bounded; a repeated hook
    keeps the latest end and a project already known; a record past `keep_until` is gone (the ledger stays as
    small as what may still matter)."""
    start = clock.now
    await store.finish("7", start + 100, project_id="42", finished_at=start)
    await store.finish("8", start + 500, project_id=None, finished_at=start + 10)  # unknown project (the sweep)
    await store.finish("5", start + 500, project_id="44", finished_at=start + 5)
    await store.finish("9", start + 500)  # no end time (a caller that does not re-judge): never listed here
    await store.finish("6", start + 500, project_id="43", finished_at=start - 50)  # ended before `since`
    clock.now += 20
    assert await store.finished_projects(start - 1) == {"42", "44", None}
    assert await store.finished_since(start - 1, 10, ["42", None, "43"]) == [
        FinishedJob("8", None, start + 10),
        FinishedJob("7", "42", start),
    ]
    assert await store.finished_since(start - 1, 10, ["44"]) == [FinishedJob("5", "44", start + 5)]
    assert await store.finished_since(start - 1, 1, ["42", None]) == [FinishedJob("8", None, start + 10)]
    assert await store.finished_since(start - 1, 0, ["42"]) == []
    assert await store.finished_since(start - 1, 10, []) == []
    await store.finish("7", start + 100, finished_at=start + 15)  # the hook again: later end, project kept
    assert await store.finished_since(start + 12, 10, ["42", "44", None]) == [FinishedJob("7", "42", start + 15)]
    clock.now = start + 100  # 7's record has ended
    assert await store.finished_projects(start - 1) == {"44", None}


async def test_the_sqlite_store_asks_for_many_projects_in_bounded_statements(tmp_path: Path, clock: Clock) -> None:
    store = SqliteExchangeStore(tmp_path / "exchange.sqlite3", clock=clock)
    try:
        for n in range(1200):
            await store.finish(str(n), clock.now + 100, project_id=str(n), finished_at=clock.now - n)
        asked = [str(n) for n in range(0, 1200, 2)] + [None]
        assert [end.job_id for end in await store.finished_since(clock.now - 1000, 3, asked)] == ["0", "2", "4"]
        assert len(await store.finished_since(clock.now - 2000, 10_000, asked)) == 600
    finally:
        store.close()


async def test_the_memory_store_is_bounded_and_fails_closed(clock: Clock) -> None:
    store = MemoryExchangeStore(capacity=1, clock=clock)
    assert await store.claim("a", clock.now + 10, 3)
    with pytest.raises(ExchangeStoreError):
        await store.claim("b", clock.now + 10, 3)
    clock.now += 10
    assert await store.claim("b", clock.now + 10, 3)


# --- SQLite only ------------------------------------------------------------------------------------------------


async def test_the_sqlite_file_is_0600_in_wal_mode_with_full_sync(tmp_path: Path, clock: Clock) -> None:
    store = SqliteExchangeStore(tmp_path / "state" / "exchange.sqlite3", clock=clock)
    await store.claim("a", clock.now + 10, 3)
    for name in ("exchange.sqlite3", "exchange.sqlite3-wal"):
        assert stat.S_IMODE((tmp_path / "state" / name).stat().st_mode) == 0o600, name
    with sqlite3.connect(tmp_path / "state" / "exchange.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


async def test_a_second_store_on_the_same_file_shares_every_record(tmp_path: Path, clock: Clock) -> None:
    """Two replicas on one state directory, or a process and its restart."""
    path = tmp_path / "exchange.sqlite3"
    one, two = SqliteExchangeStore(path, clock=clock), SqliteExchangeStore(path, clock=clock)
    assert await one.claim("a", clock.now + 10, 2) and await two.claim("a", clock.now + 10, 2)
    assert not await one.claim("a", clock.now + 10, 2) and not await two.claim("a", clock.now + 10, 2)
    assert await issued(one, "9", clock.now + 5)
    assert await two.finish("9", clock.now + 10) == clock.now + 5
    assert await one.is_finished("9") and not await issued(one, "9", clock.now + 8)
    assert await two.jobs_with_credentials(10) == [LiveJob("9", "42", GITLAB, clock.now + 5)]
    one.close()
    two.close()


def _claim_many(path: str, subject: str, times: int, out: multiprocessing.Queue[int]) -> None:
    store = SqliteExchangeStore(Path(path), busy_timeout=30.0)
    out.put(asyncio.run(_claims(store, subject, times)))
    store.close()


async def _claims(store: SqliteExchangeStore, subject: str, times: int) -> int:
    return sum([await store.claim(subject, 4e9, 3) for _ in range(times)])


def test_concurrent_processes_never_exceed_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "exchange.sqlite3")
    SqliteExchangeStore(Path(path)).close()
    context = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = context.Queue()
    workers = [context.Process(target=_claim_many, args=(path, "shared", 20, out)) for _ in range(4)]
    for worker in workers:
        worker.start()
    counted = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(60)
    assert sum(counted) == 3, counted


def test_a_file_that_is_not_the_database_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "exchange.sqlite3"
    path.write_bytes(b"this is not a database, it is a damaged file" * 100)
    with pytest.raises(ExchangeStoreError, match=r"exchange\.sqlite3"):
        SqliteExchangeStore(path)


def test_an_empty_file_is_refused_not_taken_for_a_new_database(tmp_path: Path, clock: Clock) -> None:
    """A 0-byte file (a crash between creating it and writing the schema, or a truncation) used to start a fresh
    ledger: a used-up subject token was granted again and a finished job's token too."""
    path = tmp_path / "exchange.sqlite3"
    path.write_bytes(b"")
    with pytest.raises(ExchangeStoreError, match=r"exchange\.sqlite3.*not an exchange state database"):
        SqliteExchangeStore(path, clock=clock)
    assert path.read_bytes() == b""


def test_a_dangling_symlink_is_refused_not_followed(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "exchange.sqlite3"
    path.symlink_to(tmp_path / "gone.sqlite3")
    with pytest.raises(ExchangeStoreError, match=r"exchange\.sqlite3: is a symbolic link"):
        SqliteExchangeStore(path, clock=clock)
    assert not (tmp_path / "gone.sqlite3").exists()


def test_a_new_database_appears_only_whole(tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while the schema is written leaves no file under the database's name (nor a temporary one)."""
    path = tmp_path / "exchange.sqlite3"

    def crash(db: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(exchange_store, "_initialise", crash)
    with pytest.raises(ExchangeStoreError, match=r"exchange\.sqlite3"):
        SqliteExchangeStore(path, clock=clock)
    assert list(tmp_path.iterdir()) == []


def test_a_job_credentials_table_without_the_job_columns_fails_at_open(tmp_path: Path) -> None:
    """A file written by a build from before `project_id` and `issuer` were recorded is refused at start, not
    answered with a 503 on every exchange."""
    path = tmp_path / "exchange.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE job_credentials (job_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE finished_jobs (job_id TEXT PRIMARY KEY, keep_until REAL NOT NULL) WITHOUT ROWID")
        db.execute("PRAGMA user_version = 1")  # what that build wrote: the columns came without a version bump
    with pytest.raises(ExchangeStoreError, match=r"exchange\.sqlite3.*project_id"):
        SqliteExchangeStore(path)


# The schemas earlier releases wrote, as they were (a released schema never changes).
_VERSION_1 = """
CREATE TABLE replay (subject TEXT PRIMARY KEY, uses INTEGER NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX replay_expiry ON replay (expires_at);
CREATE TABLE finished_jobs (job_id TEXT PRIMARY KEY, keep_until REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX finished_jobs_expiry ON finished_jobs (keep_until);
CREATE TABLE job_credentials (
    job_id TEXT PRIMARY KEY, project_id TEXT, issuer TEXT NOT NULL, expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX job_credentials_expiry ON job_credentials (expires_at);
"""
_VERSION_2 = (
    _VERSION_1.replace("expires_at REAL NOT NULL\n)", "expires_at REAL NOT NULL, subject_expires_at REAL\n)")
    + "CREATE INDEX job_credentials_held ON job_credentials (max(expires_at, coalesce(subject_expires_at, 0)));"
)


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_file_is_upgraded_in_place_and_keeps_its_records(
    tmp_path: Path, clock: Clock, version: int
) -> None:
    """Version 1 (before subject expiries were kept) and 2 (before finished jobs kept their project and end): their
    finished jobs and credentials stay, and the new columns are added (a restart must never forget a finished
    job)."""
    path = tmp_path / "exchange.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_1 if version == 1 else _VERSION_2)
        db.execute("INSERT INTO finished_jobs VALUES ('7', ?)", (clock.now + 100,))
        db.execute(
            "INSERT INTO job_credentials (job_id, project_id, issuer, expires_at) VALUES ('8', '42', ?, ?)",
            (GITLAB, clock.now + 100),
        )
        db.execute(f"PRAGMA user_version = {version}")
    store = SqliteExchangeStore(path, clock=clock)
    try:
        assert await store.is_finished("7") and await store.credentials_until("8") == clock.now + 100
        assert await store.issued(
            "8", clock.now + 50, project_id="42", issuer=GITLAB, subject_expires_at=clock.now + 700
        )
        assert await store.finish("8", clock.now + 1000, project_id="42", finished_at=clock.now) == clock.now + 700
        assert await store.finished_since(clock.now - 1, 10, ["42"]) == [FinishedJob("8", "42", clock.now)]  # 7: no end
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == exchange_store.SCHEMA_VERSION == 3
        plan = db.execute("EXPLAIN QUERY PLAN DELETE FROM job_credentials WHERE " + exchange_store._HELD + " <= 1")
        assert "job_credentials_held" in str(plan.fetchall())  # the sweep uses the index
        plan = db.execute("EXPLAIN QUERY PLAN " + exchange_store._FINISHED_PROJECTS, (0, 0))
        assert "finished_jobs_project" in str(plan.fetchall())  # not the table: one short index entry a job
        query = exchange_store._FINISHED_SINCE.format(projects="project_id IN (?)")
        plan = db.execute("EXPLAIN QUERY PLAN " + query, (0, 0, "42", 1))
        assert "finished_jobs_project" in str(plan.fetchall())


def test_a_version_2_file_upgraded_by_another_process_meanwhile_is_not_upgraded_twice(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas on one host start together on an older file: the second to take the write lock finds the
    version moved on and adds nothing (adding the columns again would fail its start)."""
    path = tmp_path / "exchange.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(_VERSION_2)
        db.execute("PRAGMA user_version = 2")
    upgrade = exchange_store._upgrade
    others: list[None] = []

    def after_the_other(db: sqlite3.Connection, version: int, script: str) -> int:
        if not others:  # the other process, in between our read of the version and our lock
            others.append(None)
            SqliteExchangeStore(path, clock=clock).close()
        return upgrade(db, version, script)

    monkeypatch.setattr(exchange_store, "_upgrade", after_the_other)
    SqliteExchangeStore(path, clock=clock).close()
    with sqlite3.connect(path) as db:
        assert others and db.execute("PRAGMA user_version").fetchone()[0] == 3


def test_a_newer_schema_is_refused_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "exchange.sqlite3"
    SqliteExchangeStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ExchangeStoreError, match="schema version 99"):
        SqliteExchangeStore(path)


async def test_a_write_that_cannot_take_the_lock_raises_instead_of_granting(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "exchange.sqlite3"
    store = SqliteExchangeStore(path, clock=clock, busy_timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ExchangeStoreError, match="cannot write"):
            await store.claim("a", clock.now + 10, 3)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await store.claim("a", clock.now + 10, 3)
    store.close()


# --- PostgreSQL only --------------------------------------------------------------------------------------------

REPLICA = PoolSettings(min_size=2, max_size=8, connect_timeout=5.0, acquire_timeout=10.0, statement_timeout=5.0)


async def test_claims_spread_over_two_replicas_never_exceed_the_limit(pg_dsn: str, clock: Clock) -> None:
    """Two stores, two pools, one database: 60 concurrent claims of one subject, alternating, grant exactly 3."""
    one = await open_postgres(pg_dsn, clock, REPLICA)
    two = await open_postgres(pg_dsn, clock, REPLICA)
    try:
        for subject in ("shared-1", "shared-2", "shared-3"):
            claims = [(one, two)[i % 2].claim(subject, clock.now + 300, 3) for i in range(60)]
            counted = await asyncio.gather(*claims)
            assert sum(counted) == 3, counted
    finally:
        await one.close()
        await two.close()


async def test_finish_and_issued_racing_on_two_replicas_never_leave_a_credential_after_the_end(
    pg_dsn: str, clock: Clock
) -> None:
    """For 100 jobs, `issued` on one replica races `finish` on the other: either the credential was recorded
    first (and `finish` answers its expiry, so the denial covers it) or it was refused; never recorded unseen."""
    one = await open_postgres(pg_dsn, clock, REPLICA)
    two = await open_postgres(pg_dsn, clock, REPLICA)
    try:
        jobs = [str(9000 + n) for n in range(100)]
        expiry = clock.now + 300

        async def race(job: str, n: int) -> tuple[bool, float | None]:
            issuer_side, finisher = (one, two) if n % 2 else (two, one)
            granted, until = await asyncio.gather(
                issued(issuer_side, job, expiry), finisher.finish(job, clock.now + 1000)
            )
            return granted, until

        outcomes = await asyncio.gather(*(race(job, n) for n, job in enumerate(jobs)))
        for job, (granted, until) in zip(jobs, outcomes, strict=True):
            assert until == (expiry if granted else None), (job, granted, until)
            assert await one.credentials_until(job) == until
            assert not await issued(two, job, expiry)  # finished: refused from now on, on either replica
        both = sum(granted for granted, _ in outcomes)
        print(f"finish/issued races: {both} issued before the end, {len(jobs) - both} refused after it")
    finally:
        await one.close()
        await two.close()


async def test_expired_rows_are_pruned_in_bounded_batches(pg_dsn: str, clock: Clock) -> None:
    store = PostgresExchangeStore(StorePool(StoreDsn(pg_dsn, "test")), clock=clock, prune_batch=4)
    await store.open()
    try:
        for n in range(10):
            assert await store.claim(f"s{n}", clock.now + 10, 3)
        clock.now += 10
        assert await store.prune() == 4 and await store.prune() == 4 and await store.prune() == 2
        assert await store.prune() == 0
        assert await store.claim("s0", clock.now + 10, 1)  # forgotten: counted afresh
    finally:
        await store.close()


async def test_postgres_failures_raise_exchange_store_errors_without_the_password(pg_dsn: str, clock: Clock) -> None:
    store = await open_postgres(pg_dsn, clock)
    await store.close()  # every call now fails
    for call in (store.claim("a", clock.now + 10, 3), store.is_finished("7"), store.jobs_with_credentials(5)):
        with pytest.raises(ExchangeStoreError, match="PostgreSQL exchange state"):
            await call
    fast = PoolSettings(connect_timeout=1.0, acquire_timeout=0.5, statement_timeout=0.5)
    away = PostgresExchangeStore(StorePool(StoreDsn("host=127.0.0.1 port=1 password=hunter2", "test"), fast))
    with pytest.raises(ExchangeStoreError, match="cannot open") as raised:
        await away.open()
    assert "hunter2" not in str(raised.value)
