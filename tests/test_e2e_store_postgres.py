"""`controlplane serve --store postgres`, end to end: the DSN from an environment variable, a job's token
exchanged at the control plane's own port, and the replay bound kept in PostgreSQL, where another replica
would read it (docs/shared-state.md)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest

from controlplane.audit.store import DB_NAME as AUDIT_DB
from controlplane.credentials.exchange_store import DB_NAME
from controlplane.store.dsn import redacted
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.postgres import Gate, PostgresServer
from tests.support.stack import EnvoySpec, PolicyInputs, Served, exchange_answers, serve_exchange_stack, serve_stack

pytestmark = pytest.mark.e2e


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer", ["reports-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


@dataclass
class DirectExchange(Served):
    exchange_host: ClassVar[str | None] = None  # no Envoy: the exchange's own port


def test_serve_keeps_the_replay_bound_in_postgresql(tmp_path: Path, pg_dsn: str) -> None:
    with serve_stack(
        tmp_path,
        policy,
        kind=DirectExchange,
        envoy=None,
        ready=exchange_answers,
        serve_args=("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"),
        env={"CP_STORE_DSN": pg_dsn},
    ) as built:
        status = built.controlplane.status()
        assert status["credentials"]["store"] == {"kind": "postgres", "dsn": redacted(pg_dsn)}
        audit = status["audit"]  # the trail shares the pool: in PostgreSQL too, nothing buffered or dropped
        assert (audit["kind"], audit["dsn"], audit["healthy"], audit["buffered"], audit["dropped"]) == (
            "postgres", redacted(pg_dsn), True, 0, 0,
        )  # fmt: skip
        token = built.subject(601)
        statuses = [built.exchange(token).status for _ in range(4)]
        assert statuses == [200, 200, 200, 400]  # three exchanges per subject token, the fourth refused
        with psycopg.connect(pg_dsn) as db:
            uses = db.execute("SELECT uses FROM replay ORDER BY uses DESC").fetchall()
            credentials = db.execute("SELECT job_id FROM job_credentials WHERE job_id = '601'").fetchall()
        assert uses[0] == (3,) and credentials == [("601",)], (uses, credentials)
        assert not (built.controlplane.state_dir / DB_NAME).exists()
        assert not (built.controlplane.state_dir / AUDIT_DB).exists()
    assert "eyJ" not in (tmp_path / "controlplane.log").read_text(), "a token was logged"


def test_serve_refuses_to_start_when_postgresql_is_unreachable(tmp_path: Path) -> None:
    """Fail closed at start, as with an unreadable state file: exit 3, one line naming the DSN without its
    password."""
    dsn = f"postgresql://cp:s3cret@{LOOPBACK}:{free_port()}/cp"
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--policy", str(tmp_path), "--state-dir", str(tmp_path / "s"),
         "--admin-address", f"{LOOPBACK}:{free_port()}", "--exchange-address", f"{LOOPBACK}:{free_port()}",
         "--xds-address", f"{LOOPBACK}:{free_port()}", "--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"],
        env={**os.environ, "CP_STORE_DSN": dsn}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    refused = [line for line in result.stderr.splitlines() if "refusing to start" in line]
    assert len(refused) == 1 and "PostgreSQL exchange state at" in refused[0] and "port=" in refused[0], refused
    assert "s3cret" not in result.stderr


class GateThread:
    """A `Gate` in front of the test's PostgreSQL, on an event loop of its own thread, so a sync e2e test can
    cut it and restore it while `serve` (another process) writes through it."""

    def __init__(self, port: int) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pg-gate", daemon=True)
        self._thread.start()
        self.gate = Gate(port)
        self.restore()

    def restore(self) -> None:
        asyncio.run_coroutine_threadsafe(self.gate.restore(), self.loop).result(10)

    def cut(self) -> None:
        self.loop.call_soon_threadsafe(self.gate.cut)

    def stop(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def audit_rows(dsn: str, job: int) -> list[dict[str, Any]]:
    """What `controlplane audit --store postgres` prints for a job, as an operator would run it."""
    out = subprocess.run(
        [sys.executable, "-m", "controlplane", "audit", "--job", str(job), "--json", "--limit", "1000",
         "--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"],
        env={**os.environ, "CP_STORE_DSN": dsn}, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return list(json.loads(out.stdout))


def test_the_audit_trail_survives_postgresql_going_away_under_traffic(
    tmp_path: Path, postgres: PostgresServer, pg_dsn: str
) -> None:
    """Real Envoy → ALS → serve's PostgreSQL trail; PostgreSQL cut mid-traffic: requests keep being served, the
    records wait in serve's buffer (`/status`), and after the restore every one of them is in the table."""
    gate = GateThread(postgres.port)
    try:
        with serve_exchange_stack(
            tmp_path,
            policy,
            kind=Served,
            envoy=EnvoySpec("audit-pg-1", "audit-pg-envoy", flush_logs=True),
            serve_args=("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"),
            env={"CP_STORE_DSN": gate.gate.dsn(pg_dsn)},
        ) as built:
            credential = built.credential(701)  # issued while PostgreSQL answers: the exchange needs it
            before = [f"/before/{i}" for i in range(5)]
            assert [built.call("reports.local", credential, path=p) for p in before] == [200] * 5
            poll_until(lambda: len(audit_rows(pg_dsn, 701)) >= 5, 20, interval=0.3, message="records written")

            gate.cut()
            away = [f"/away/{i}" for i in range(20)]
            assert [built.call("reports.local", credential, path=p) for p in away] == [200] * 20  # still served
            status = poll_until(
                lambda: (
                    s if (s := built.controlplane.status()["audit"])["healthy"] is False and s["buffered"] else None
                ),
                30,
                message="serve reports its trail unhealthy, records buffered",
            )
            assert status["dropped"] == 0 and status["oldest_buffered_seconds"] > 0

            gate.restore()
            poll_until(lambda: built.controlplane.status()["audit"]["buffered"] == 0, 60, message="buffer written")
            rows = audit_rows(pg_dsn, 701)
            assert sorted(r["path"] for r in rows) == sorted(before + away)  # none lost (none twice either, here)
            assert built.controlplane.status()["audit"]["healthy"] is True
            assert 'reason="buffer_full"' not in built.controlplane.metrics()
    finally:
        gate.stop()
