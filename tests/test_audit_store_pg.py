"""The audit trail in PostgreSQL: the query side parametrised over SQLite and PostgreSQL (same answers, same
`controlplane audit` output), then what only PostgreSQL has: the in-memory buffer while it is away (a TCP
`Gate` cut and restored), its bounds, and retention by the leader in bounded batches."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from controlplane.audit.metrics import AUDIT_BUFFERED, AUDIT_RECORDS_DROPPED
from controlplane.audit.store import REDACTED, AuditRecord, AuditStore, AuditTrail
from controlplane.audit.store_pg import RECORD_OVERHEAD_BYTES, PostgresAuditStore, query_records, record_bytes
from controlplane.cli.audit import add_audit_arguments, run_audit
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import MIGRATIONS, migrate, schema_version
from controlplane.store.pool import PoolSettings, StorePool
from tests.support.postgres import Gate, PostgresServer

GITLAB = "https://gitlab.example"
DSN_ENV = "CONTROLPLANE_TEST_AUDIT_DSN"
FAST = PoolSettings(min_size=1, max_size=2, connect_timeout=1.0, acquire_timeout=0.5, statement_timeout=2.0)
_T = TypeVar("_T")


def record(**overrides: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "time": 1_700_000_000.0,
        "gateway": "ci-gateway",
        "node": "gw-1",
        "backend": "reports",
        "method": "GET",
        "path": "/reports",
        "status": 200,
        "decision": "allowed",
        "policy": "deployer-reads-reports/reports-read",
        "project_id": "42",
        "project_path": "acme/deployer",
        "pipeline_id": "900",
        "job_id": "7",
        "ref": "main",
        "user": "ci-user",
        "issuer": GITLAB,
        "ref_type": "branch",
        "ref_protected": "true",
        "pipeline_source": "push",
    }
    return AuditRecord(**{**values, **overrides})


class LoopThread:
    """An event loop of its own in a thread: the PostgreSQL store's writer runs there, while the test calls
    the sync side (submit, flush, reads) from this thread, as the ALS receiver and the recovery sweep do."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Trail:
    store: AuditTrail
    cli_args: tuple[str, ...]  # how `controlplane audit` finds this store


@pytest.fixture(params=["file", "postgres"])
def trail(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Trail]:
    if request.param == "file":
        sqlite = AuditStore(tmp_path / "state" / "audit.sqlite3", retention=None)
        yield Trail(sqlite, ("--db", str(sqlite.path)))
        sqlite.close(10)
        return
    dsn: str = request.getfixturevalue("pg_dsn")
    monkeypatch.setenv(DSN_ENV, dsn)
    loop = LoopThread()
    shared = PostgresAuditStore(StorePool(StoreDsn(dsn, "test"), FAST), retention=None)
    loop.run(shared.open())
    try:
        yield Trail(shared, ("--store", "postgres", "--store-dsn-env", DSN_ENV))
    finally:
        loop.run(shared.close())
        loop.run(shared._pool.close())
        loop.stop()


def write(store: AuditTrail, *records: AuditRecord) -> None:
    assert all(store.submit(r) for r in records)
    assert store.flush(10)


def cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_audit_arguments(parser)
    return parser.parse_args(list(argv))


# --- the query side, one suite for both stores -------------------------------------------------------


def test_query_filters_by_job_project_and_time_newest_last(trail: Trail) -> None:
    store = trail.store
    write(
        store,
        record(time=100.0, job_id="1", path="/a"),
        record(time=200.0, job_id="2", project_id="43", project_path="acme/other", path="/b"),
        record(time=300.0, job_id="1", path="/c"),
    )
    assert [r["path"] for r in store.query(job="1")] == ["/a", "/c"]
    assert [r["path"] for r in store.query(project="acme/other")] == ["/b"]
    assert [r["path"] for r in store.query(project="42")] == ["/a", "/c"]  # digits: a project id
    assert [r["path"] for r in store.query(since=150.0)] == ["/b", "/c"]
    assert [r["path"] for r in store.query(job="1", since=150.0)] == ["/c"]
    assert [r["path"] for r in store.query(since=0.0, limit=2)] == ["/b", "/c"]  # the most recent two
    assert store.query(job="nope") == []
    first = store.query(job="2")[0]
    assert first["id"] > 0 and first["status"] == 200 and first["credential_jti"] is None
    assert isinstance(first["time"], float) and first["time"] == 200.0


def test_records_are_sanitized_before_they_are_stored(trail: Trail) -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    write(trail.store, record(path=f"/x/{token}?token=secret", details=f"glpat-{'a' * 20}", job_id="9"))
    (stored,) = trail.store.query(job="9")
    assert stored["path"] == f"/x/{REDACTED}" and stored["details"] == REDACTED


def test_the_ref_and_pipeline_claims_round_trip(trail: Trail) -> None:
    write(
        trail.store,
        record(job_id="c", ref_type="tag", ref_protected="false", pipeline_source="web", environment="review/x"),
        record(job_id="n", ref_type=None, ref_protected=None, pipeline_source=None),  # as before the claims were kept
    )
    (claimed,) = trail.store.query(job="c")
    assert [claimed[k] for k in ("ref_type", "ref_protected", "pipeline_source", "environment")] == [
        "tag",
        "false",
        "web",
        "review/x",
    ]
    (none,) = trail.store.query(job="n")
    assert [none[k] for k in ("ref_type", "ref_protected", "pipeline_source", "environment")] == [None] * 4


def test_recent_jobs_are_each_job_once_most_recent_first(trail: Trail) -> None:
    write(
        trail.store,
        record(time=100.0, job_id="1"),
        record(time=300.0, job_id="1"),
        record(time=200.0, job_id="2", project_id="43", issuer=CREDENTIAL_ISSUER),
        record(time=250.0, job_id=None),
        record(time=50.0, job_id="3"),
    )
    assert trail.store.recent_jobs(since=90.0) == [("1", "42", GITLAB, 300.0), ("2", "43", CREDENTIAL_ISSUER, 200.0)]
    assert trail.store.recent_jobs(since=0.0, limit=1) == [("1", "42", GITLAB, 300.0)]


def test_cli_prints_the_same_table_and_json(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    write(trail.store, record(time=1_700_000_000.5, job_id="5", path="/t"), record(time=1_700_000_100.0, job_id="6"))
    assert run_audit(cli("--job", "5", *trail.cli_args)) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "TIME", "GATEWAY", "METHOD", "PATH", "STATUS", "DECISION", "POLICY", "CLOUD_IDENTITY", "PROJECT", "PIPELINE",
        "JOB", "REF", "PROTECTED", "SOURCE", "ENVIRONMENT", "USER"
    ]  # fmt: skip
    assert row.split() == [
        "2023-11-14T22:13:20.500Z", "ci-gateway", "GET", "/t", "200", "allowed",
        "deployer-reads-reports/reports-read", "-", "acme/deployer", "900", "5", "main", "true", "push", "-",
        "ci-user",
    ]  # fmt: skip
    assert run_audit(cli("--project", "acme/deployer", "--json", "--limit", "1", *trail.cli_args)) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["job_id"] == "6" and only["time"] == "2023-11-14T22:15:00.000Z"
    assert set(only) == {"id", *(f for f in record().__dataclass_fields__)}


# --- PostgreSQL only: the CLI's errors --------------------------------------------------------------


def test_cli_with_an_unreachable_or_missing_postgres(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(DSN_ENV, pg_dsn)  # a database never migrated: no audit table
    assert run_audit(cli("--job", "1", "--store", "postgres", "--store-dsn-env", DSN_ENV)) == 1
    assert "cannot read the trail at" in capsys.readouterr().err
    monkeypatch.setenv(DSN_ENV, "host=127.0.0.1 port=1 dbname=x user=u password=hunter2 connect_timeout=2")
    assert run_audit(cli("--job", "1", "--store", "postgres", "--store-dsn-env", DSN_ENV)) == 1
    assert "hunter2" not in capsys.readouterr().err
    assert run_audit(cli("--job", "1", "--store", "postgres")) == 2  # no DSN source
    assert run_audit(cli("--job", "1", "--store-dsn-env", DSN_ENV)) == 2  # a DSN without --store postgres


# --- PostgreSQL only: the buffer while it is away ---------------------------------------------------


def _dropped(reason: str = "buffer_full") -> float:
    value = AUDIT_RECORDS_DROPPED.labels(gateway="gw", reason=reason)._value.get()
    return float(value)


async def _gated_store(postgres: PostgresServer, pg_dsn: str, **options: Any) -> tuple[Gate, PostgresAuditStore]:
    gate = Gate(postgres.port)
    await gate.restore()
    store = PostgresAuditStore(
        StorePool(StoreDsn(gate.dsn(pg_dsn), "test"), FAST), retention=None, retry_interval=0.05, **options
    )
    await store.open()
    return gate, store


def _rows(pg_dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(pg_dsn) as db:
        return [(str(p), str(n)) for p, n in db.execute("SELECT path, node FROM audit ORDER BY id")]


async def _until(predicate: Any, what: str, deadline: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not predicate():
        assert loop.time() < end, what
        await asyncio.sleep(0.02)


async def test_records_sent_while_postgres_is_away_are_written_in_order_on_reconnect(
    postgres: PostgresServer, pg_dsn: str
) -> None:
    gate, store = await _gated_store(postgres, pg_dsn, buffer_records=1000)
    dropped = _dropped()
    try:
        assert store.submit(record(path="/before"), label="gw") and await asyncio.to_thread(store.flush, 10)
        gate.cut()
        for i in range(300):  # from 3 senders, within the bound (and each sender's quarter)
            assert store.submit(record(path=f"/away/{i}", node=f"gw-{i % 3}"), sender=f"s{i % 3}", label="gw")
        await _until(lambda: store.status()["healthy"] is False, "the writer noticed PostgreSQL is away")
        assert await asyncio.to_thread(store.flush, 5) is False  # at once: the records are buffered, not durable
        status = store.status()
        assert status["buffered"] == 300 and status["dropped"] == 0
        assert AUDIT_BUFFERED.collect()[0].samples[0].value == 300  # the gauge an operator alerts on
        assert isinstance(status["oldest_buffered_seconds"], float) and status["oldest_buffered_seconds"] > 0
        assert status["last_error"] and "password" not in str(status)
        await gate.restore()
        await _until(lambda: store.status()["buffered"] == 0, "the buffer written on reconnect")
        assert await asyncio.to_thread(store.flush, 10)
        assert store.status()["healthy"] is True
        rows = _rows(pg_dsn)
        assert [path for path, _ in rows] == ["/before", *(f"/away/{i}" for i in range(300))]  # none lost, in order
        assert _dropped() == dropped
    finally:
        await store.close()
        await store._pool.close()
        gate.cut()


async def test_past_the_bound_exactly_the_excess_is_dropped_and_counted(postgres: PostgresServer, pg_dsn: str) -> None:
    gate, store = await _gated_store(postgres, pg_dsn, buffer_records=40, sender_records=40)
    dropped = _dropped()
    try:
        gate.cut()  # no await until every record is submitted: the writer cannot have taken any of them out
        accepted = [store.submit(record(path=f"/r/{i}"), sender="one", label="gw") for i in range(55)]
        assert accepted == [True] * 40 + [False] * 15  # never blocking: refused at once
        assert store.status()["dropped"] == 15 and store.status()["buffered"] == 40
        assert _dropped() - dropped == 15
        await _until(lambda: store.status()["healthy"] is False, "the writer tried, and kept the records")
        assert store.status()["buffered"] == 40
        await gate.restore()
        await _until(lambda: store.status()["buffered"] == 0, "the buffer written on reconnect")
        assert [path for path, _ in _rows(pg_dsn)] == [f"/r/{i}" for i in range(40)]
    finally:
        await store.close()
        await store._pool.close()
        gate.cut()


async def test_the_byte_bound_and_one_senders_share(postgres: PostgresServer, pg_dsn: str) -> None:
    size = record_bytes(record(path="/b/00"))
    assert size > RECORD_OVERHEAD_BYTES
    gate, store = await _gated_store(postgres, pg_dsn, buffer_records=1000, buffer_bytes=size * 10 + 1)
    try:
        gate.cut()
        accepted = [store.submit(record(path=f"/b/{i:02}"), sender=f"s{i}", label="gw") for i in range(12)]
        assert accepted == [True] * 10 + [False] * 2
        assert store.status()["buffered_bytes"] == size * 10
    finally:
        await store.close(timeout=0.2)  # PostgreSQL still away: the rest is counted as lost at shutdown
        await store._pool.close()
    shares = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "t"), FAST), buffer_records=8)  # a quarter each: 2
    assert [shares.submit(record(), sender="flood") for _ in range(3)] == [True, True, False]
    assert shares.submit(record(), sender="gateway")


# --- PostgreSQL only: insert methods, append-only, retention ----------------------------------------


@pytest.mark.parametrize("insert", ["copy", "values"])
async def test_both_insert_methods_write_every_column(pg_dsn: str, insert: str) -> None:
    store = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "t"), FAST), retention=None, insert=insert)  # type: ignore[arg-type]
    await store.open()
    try:
        full = record(details="rbac_access_denied", credential_jti="j1", peer="10.0.0.1", identity="spiffe://gw",
                      reported_time=1_699_999_999.25, backend=None, user="o'brien \\ \t tab \\N \n\r é",
                      ref="\\t")  # fmt: skip
        for i in range(3):
            store.submit(replace(full, path=f"/{i}"))
        assert await asyncio.to_thread(store.flush, 10)
        rows = await store.query_async(job="7")
        assert [r["path"] for r in rows] == ["/0", "/1", "/2"]
        assert {k: v for k, v in rows[0].items() if k != "id"} == {**full.__dict__, "path": "/0"}
        store.submit(replace(full, path="/nul\x00/x", job_id="8"))  # PostgreSQL text cannot hold NUL
        assert await asyncio.to_thread(store.flush, 10)
        assert [r["path"] for r in await store.query_async(job="8")] == ["/nul/x"]
    finally:
        await store.close()
        await store._pool.close()


async def test_the_table_is_append_only(pg_dsn: str) -> None:
    store = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "t"), FAST), retention=None)
    await store.open()
    try:
        store.submit(record())
        assert await asyncio.to_thread(store.flush, 10)
        with psycopg.connect(pg_dsn) as db, pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            db.execute("UPDATE audit SET decision = 'denied'")
    finally:
        await store.close()
        await store._pool.close()


async def test_retention_runs_on_the_leader_only_in_bounded_batches(pg_dsn: str) -> None:
    now = [10_000.0]
    leader = [False]
    store = PostgresAuditStore(
        StorePool(StoreDsn(pg_dsn, "t"), FAST),
        retention=1000.0,
        prune_batch=3,
        prune_interval=3600.0,
        is_leader=lambda: leader[0],
        clock=lambda: now[0],
    )
    await store.open()
    try:
        for i in range(10):
            store.submit(record(time=100.0 + i, path=f"/old/{i}"))
        store.submit(record(time=9_500.0, path="/new"))
        assert await asyncio.to_thread(store.flush, 10)
        assert await store.prune() == 0  # a follower never deletes
        assert len(_rows(pg_dsn)) == 11
        leader[0] = True
        with psycopg.connect(pg_dsn) as db:
            db.execute("CREATE TABLE deletes (n int)")
            db.execute(
                "CREATE FUNCTION count_delete() RETURNS trigger LANGUAGE plpgsql AS $$"
                " BEGIN INSERT INTO deletes VALUES (1); RETURN NULL; END $$"
            )
            db.execute(
                "CREATE TRIGGER counted AFTER DELETE ON audit FOR EACH STATEMENT EXECUTE FUNCTION count_delete()"
            )
        assert await store.prune() == 10
        assert [path for path, _ in _rows(pg_dsn)] == ["/new"]
        with psycopg.connect(pg_dsn) as db:
            statements = db.execute("SELECT count(*) FROM deletes").fetchone()
        assert statements == (4,)  # 3 + 3 + 3 + 1: four short transactions, never one long one
        assert store.status()["pruned"] == 10
    finally:
        await store.close()
        await store._pool.close()


async def test_a_database_before_migration_10_with_rows_is_read_then_upgraded(pg_dsn: str) -> None:
    """Migration 10 adds `cloud_identity`: read as NULL by the CLI before it, added in place by a replica, old rows
    keep NULL and new ones carry the role they were signed as."""
    role = "arn:aws:iam::123456789012:role/ci-reader"
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await migrate(conn, tuple(m for m in MIGRATIONS if m.version < 10))
        await conn.execute(
            "INSERT INTO audit (time, gateway, node, backend, method, path, status, decision, job_id, environment)"
            " VALUES (5.0, 'g', 'n', 's3', 'GET', '/a', 200, 'allowed', 'old', 'prod')"
        )
        (row,) = await query_records(conn, job="old")
        assert (row["environment"], row["cloud_identity"]) == ("prod", None)
    store = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "t"), FAST), retention=None)
    await store.open()
    try:
        store.submit(record(job_id="new", backend="s3", cloud_identity=role))
        assert await asyncio.to_thread(store.flush, 10)
        (kept,) = await store.query_async(job="old")
        assert (kept["environment"], kept["cloud_identity"]) == ("prod", None)
        (new,) = await store.query_async(job="new")
        assert new["cloud_identity"] == role
    finally:
        await store.close()
        await store._pool.close()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        assert await schema_version(conn) == len(MIGRATIONS) == 10


async def test_a_database_before_migration_9_with_rows_is_read_then_upgraded(pg_dsn: str) -> None:
    """A fleet's trail written by the previous release: the CLI (which never migrates) reads it, the new columns as
    NULL; a replica of this release migrates it in place, old rows kept as they were."""
    claims = ("ref_type", "ref_protected", "pipeline_source", "environment")
    before = tuple(m for m in MIGRATIONS if m.version < 9)
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        await migrate(conn, before)
        await conn.execute(
            "INSERT INTO audit (time, gateway, node, method, path, status, decision, job_id, peer)"
            " VALUES (5.0, 'g', 'n', 'GET', '/a', 200, 'allowed', 'old', '10.0.0.9')"
        )
        (row,) = await query_records(conn, job="old")
        assert (row["path"], row["peer"]) == ("/a", "10.0.0.9") and all(row[c] is None for c in claims)
    store = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "t"), FAST), retention=None)
    await store.open()
    try:
        store.submit(record(job_id="new", environment="production"))
        assert await asyncio.to_thread(store.flush, 10)
        (kept,) = await store.query_async(job="old")
        assert (kept["path"], kept["peer"]) == ("/a", "10.0.0.9") and all(kept[c] is None for c in claims)
        (new,) = await store.query_async(job="new")
        assert [new[c] for c in claims] == ["branch", "true", "push", "production"]
    finally:
        await store.close()
        await store._pool.close()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        assert await schema_version(conn) == len(MIGRATIONS)
