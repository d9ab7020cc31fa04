"""`controlplane serve --store postgres`, end to end: the DSN from an environment variable, a job's token
exchanged at the control plane's own port, and the replay bound kept in PostgreSQL, where another replica
would read it (docs/shared-state.md)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jwt
import psycopg
import pytest

from controlplane.audit.store import DB_NAME as AUDIT_DB
from controlplane.credentials.exchange_store import DB_NAME
from controlplane.credentials.key_cipher import parse_keks
from controlplane.credentials.keys_pg import PostgresKeyStore, SharedKeys
from controlplane.store.dsn import StoreDsn, redacted
from controlplane.store.migrations import migrate
from controlplane.store.pool import StorePool
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import deliver, push_hook
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.postgres import Gate, PostgresServer
from tests.support.replicas import exchanged_reports, replicated
from tests.support.stack import (
    EnvoySpec,
    PolicyInputs,
    Served,
    exchange_answers,
    serve_exchange_stack,
    serve_stack,
)

pytestmark = pytest.mark.e2e

SHARED = ("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN", "--store-key-env", "CP_STORE_KEY")
KEK = base64.b64encode(bytes(range(32))).decode()


policy = exchanged_reports


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
        serve_args=SHARED,
        env={"CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK},
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
         "--xds-address", f"{LOOPBACK}:{free_port()}", *SHARED],
        env={**os.environ, "CP_STORE_DSN": dsn, "CP_STORE_KEY": KEK}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    refused = [line for line in result.stderr.splitlines() if "refusing to start" in line]
    assert len(refused) == 1 and "PostgreSQL" in refused[0] and "port=" in refused[0], refused
    assert "s3cret" not in result.stderr


API = "api:\n  token_env: GITLAB_TOKEN\n  reconcile: 1h"


def gitlab_policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra=API),
        backend("reports-api", given.ports["reports"]),
        role("reports-read", "reports-api"),
        binding("app", ["reports-read"], "{project: acme/app}"),
        gateway(given.listen_port, ["reports-api"]),
    )


def _inventory_read(built: Served) -> bool:
    entries = built.controlplane.status()["gitlab"]
    return bool(entries) and entries[0]["projects"] == 1 and not entries[0]["stale"]


def test_serve_shares_what_it_learns_from_gitlab_in_postgresql(tmp_path: Path, pg_dsn: str) -> None:
    """The inventory as read, the project id its path resolved to, and a webhook delivery's key land in the
    tables other replicas read (docs/shared-state.md, "GitLab state across replicas")."""
    with FakeGitLab() as gitlab:
        project_id = gitlab.add_project("acme/app", branches=["main"], protected=["main"])
        with serve_stack(
            tmp_path,
            gitlab_policy,
            kind=Served,
            envoy=None,
            ready=_inventory_read,
            gitlab=gitlab,
            webhook=True,
            gitlab_token=True,
            serve_args=SHARED,
            env={"CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK},
        ) as built:
            status = built.controlplane.status()
            assert status["gitlab"][0]["role"] == "leader" and status["change_feed"]["connected"]
            payload = push_hook(project_id, "acme/app", "refs/heads/main", "0" * 40, "1" * 40)
            assert [deliver(built.hook, "Push Hook", payload, idempotency_key="k-1").json() for _ in range(2)] == [
                {"accepted": True, "kind": "push"},
                {"duplicate": True},
            ]
            with psycopg.connect(pg_dsn) as db:
                poll_until(
                    lambda: db.execute("SELECT path, project_id FROM pins").fetchall() == [("acme/app", project_id)],
                    10,
                    message="the pin in the table",
                )
                rows = db.execute("SELECT issuer, document, read_at FROM gitlab_inventories").fetchall()
                keys = db.execute("SELECT key FROM webhook_deliveries").fetchall()
            assert len(rows) == 1 and rows[0][0] == "gitlab" and rows[0][2] is not None
            assert [p["path"] for p in rows[0][1]["projects"]] == ["acme/app"]
            assert keys == [("k-1",)]
            assert not (built.controlplane.state_dir / "pins.json").exists()
            shared = built.controlplane.status()["shared_inputs"]
            assert shared["pins"] == {"kind": "postgres", "unwritten": 0, "last_error": None}
            assert shared["webhook_deliveries"] == {"kind": "postgres", "memory_fallbacks": 0, "last_error": None}


def test_two_replicas_sign_with_and_publish_the_same_keys(tmp_path: Path, pg_dsn: str) -> None:
    """Two `serve --store postgres` on one database (started together, each creating the first key if none):
    one key set, sealed in the database, a credential exchanged at either signed by a key both publish."""
    env = {"CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK}
    for replica in ("a", "b"):
        (tmp_path / replica).mkdir()
    with (
        serve_stack(tmp_path / "a", policy, kind=DirectExchange, envoy=None, ready=exchange_answers,
                    serve_args=SHARED, env=env) as a,
        serve_stack(tmp_path / "b", policy, kind=DirectExchange, envoy=None, ready=exchange_answers,
                    serve_args=SHARED, env=env) as b,
    ):  # fmt: skip
        kids_a = a.controlplane.status()["credentials"]["published_kids"]
        kids_b = b.controlplane.status()["credentials"]["published_kids"]
        assert kids_a == kids_b and len(kids_a) == 1, (kids_a, kids_b)
        assert b.controlplane.status()["credentials"]["signing_keys"]["kind"] == "postgres"
        for replica in (a, b):
            answer = replica.exchange(replica.subject(701))
            assert answer.status == 200
            assert jwt.get_unverified_header(json.loads(answer.body)["access_token"])["kid"] in kids_b
        with psycopg.connect(pg_dsn) as db:
            sealed = db.execute("SELECT kid, sealed_private_key FROM signing_keys").fetchall()
        assert [kid for kid, _ in sealed] == kids_a and b"PRIVATE KEY" not in sealed[0][1]
        assert not (a.controlplane.state_dir / "signing-keys.json").exists()
    for replica in ("a", "b"):
        assert "PRIVATE KEY" not in (tmp_path / replica / "controlplane.log").read_text()


def test_a_credential_from_one_replica_opens_the_envoy_of_another_across_rotations(tmp_path: Path, pg_dsn: str) -> None:
    """Replica B signs, replica A's Envoy verifies: B's credentials pass A's gateway while the shared keys rotate
    every 3 s, and A publishes each new key before B signs with it. Both replicas lead here (the real election is
    wired at merge), yet each period rotates once: the change is planned from the rows under the lock."""
    env = {"CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK}
    rotating = (*SHARED, "--key-rotation", "3")
    for replica in ("a", "b"):
        (tmp_path / replica).mkdir()
    with (
        serve_stack(tmp_path / "a", policy, kind=Served, envoy=EnvoySpec("replica-a", "replica-a-envoy"),
                    ready=exchange_answers, serve_args=rotating, env=env) as a,
        serve_stack(tmp_path / "b", policy, kind=DirectExchange, envoy=None, ready=exchange_answers,
                    serve_args=rotating, env=env) as b,
    ):  # fmt: skip
        statuses: list[int] = []
        kids: set[str] = set()
        deadline = time.monotonic() + 10
        job = 800
        while time.monotonic() < deadline:
            job += 1
            credential = b.credential(job)
            kids.add(jwt.get_unverified_header(credential)["kid"])
            statuses.append(a.call("reports.local", credential))
        assert len(kids) >= 3, kids  # several rotations happened
        assert statuses and set(statuses) == {200}, [s for s in statuses if s != 200]
        with psycopg.connect(pg_dsn) as db:
            stored = db.execute("SELECT kid, not_before FROM signing_keys ORDER BY not_before").fetchall()
        assert kids <= {kid for kid, _ in stored}
        starts = [float(str(not_before)) for _, not_before in stored]
        assert all(later - earlier >= 3 for earlier, later in itertools.pairwise(starts)), starts


def test_three_replicas_started_together_compile_the_same_versions(tmp_path: Path, pg_dsn: str) -> None:
    """Three replicas started at once on an empty database: one first key between them, and, routing the
    exchange to one public address as a fleet does, byte-identical snapshots (the same version per gateway
    group), so an Envoy moving between replicas gets nothing re-sent."""
    public = ("--exchange-public-address", f"{LOOPBACK}:{free_port()}")
    with replicated(tmp_path, policy, pg_dsn, serve_args=public) as fleet:
        statuses = [replica.status() for replica in fleet]
        kids = [s["credentials"]["published_kids"] for s in statuses]
        assert kids[0] == kids[1] == kids[2] and len(kids[0]) == 1, kids
        versions = [s["policy"]["snapshot_versions"] for s in statuses]
        assert versions[0] and versions[0] == versions[1] == versions[2], versions
        with psycopg.connect(pg_dsn) as db:
            assert db.execute("SELECT kid FROM signing_keys").fetchall() == [(kids[0][0],)]


def test_serve_refuses_keys_it_cannot_open_and_a_missing_kek(tmp_path: Path, pg_dsn: str) -> None:
    """Keys sealed under another KEK: exit 3 naming the kid and the KEK id, never a KEK. No KEK at all: exit 2."""
    other = base64.b64encode(b"another KEK, not this replica's!").decode()

    def serve(*extra: str, kek: str | None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CP_STORE_DSN": pg_dsn} | ({"CP_STORE_KEY": kek} if kek else {})
        return subprocess.run(
            [sys.executable, "-m", "controlplane", "serve", "--policy", str(tmp_path), "--state-dir",
             str(tmp_path / "s"), "--admin-address", f"{LOOPBACK}:{free_port()}", "--exchange-address",
             f"{LOOPBACK}:{free_port()}", "--xds-address", f"{LOOPBACK}:{free_port()}", *extra],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    async def sealed_under_other() -> None:
        pool = StorePool(StoreDsn(pg_dsn, "test"))
        await pool.open()
        try:
            async with pool.connection() as conn:
                await migrate(conn)
            await SharedKeys.open(
                PostgresKeyStore(pool, parse_keks(other, "t")), rotate_every=100, max_credential_ttl=10, publish_lead=1
            )
        finally:
            await pool.close()

    asyncio.run(sealed_under_other())
    refused = serve(*SHARED, kek=KEK)
    assert refused.returncode == 3, refused.stderr
    line = next(line for line in refused.stderr.splitlines() if "refusing to start" in line)
    assert "signing keys in PostgreSQL" in line and "does not hold" in line, line
    assert KEK not in refused.stderr and other not in refused.stderr
    missing = serve("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN", kek=None)
    assert missing.returncode == 2 and "--store-key-env NAME or --store-key-file PATH" in missing.stderr


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
            serve_args=SHARED,
            env={"CP_STORE_DSN": gate.gate.dsn(pg_dsn), "CP_STORE_KEY": KEK},
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


def test_validate_reads_the_shared_store_and_prints_the_versions_served(tmp_path: Path, pg_dsn: str) -> None:
    """`validate --store postgres` with serve's flags reads the shared keys, deny list and pins (never writing):
    the versions it prints are the ones served, before and after a job is revoked through the shared store."""
    with serve_exchange_stack(
        tmp_path,
        policy,
        kind=DirectExchange,
        envoy=EnvoySpec("validate-pg", "validate-pg-envoy"),
        serve_args=SHARED,
        env={"CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK},
    ) as built:
        cp = built.controlplane

        def validated(*, note: bool = False) -> dict[str, str]:
            result = subprocess.run(
                [sys.executable, "-m", "controlplane", "validate", str(built.policy), "--state-dir", str(cp.state_dir),
                 "--exchange-address", f"{LOOPBACK}:{cp.exchange_port}", *SHARED],
                env={**os.environ, "CP_STORE_DSN": pg_dsn, "CP_STORE_KEY": KEK},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert ("note:" in result.stdout) == note and ("recent list" in result.stdout) == note, result.stdout
            return dict(re.findall(r"^  gateway (\S+): version (\S+)$", result.stdout, re.MULTILINE))

        assert validated() == cp.status()["policy"]["snapshot_versions"]
        assert built.exchange(built.subject(611)).status == 200
        before = cp.status()["policy"]["snapshot_versions"]
        built.job_finished(611)
        poll_until(lambda: cp.status()["policy"]["snapshot_versions"] != before, 10, message="revoked")
        # 611 sits in serve's recent list until its next seal; validate places it as a serve starting now does.
        expected = validated(note=True)
        assert expected != before
        cp.restart()
        poll_until(lambda: cp.status()["policy"]["snapshot_versions"] == expected, 30, message="restarted, sealed")
        with psycopg.connect(pg_dsn) as db:  # nothing written by validate: one key, as serve made it
            assert db.execute("SELECT count(*) FROM signing_keys").fetchone() == (1,)
