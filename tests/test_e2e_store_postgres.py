"""`controlplane serve --store postgres`, end to end: the DSN from an environment variable, a job's token
exchanged at the control plane's own port, and the replay bound kept in PostgreSQL, where another replica
would read it (docs/shared-state.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import psycopg
import pytest

from controlplane.credentials.exchange_store import DB_NAME
from controlplane.store.dsn import redacted
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import deliver, push_hook
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import LOOPBACK, free_port, poll_until
from tests.support.stack import PolicyInputs, Served, exchange_answers, serve_stack

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
        assert built.controlplane.status()["credentials"]["store"] == {"kind": "postgres", "dsn": redacted(pg_dsn)}
        token = built.subject(601)
        statuses = [built.exchange(token).status for _ in range(4)]
        assert statuses == [200, 200, 200, 400]  # three exchanges per subject token, the fourth refused
        with psycopg.connect(pg_dsn) as db:
            uses = db.execute("SELECT uses FROM replay ORDER BY uses DESC").fetchall()
            credentials = db.execute("SELECT job_id FROM job_credentials WHERE job_id = '601'").fetchall()
        assert uses[0] == (3,) and credentials == [("601",)], (uses, credentials)
        assert not (built.controlplane.state_dir / DB_NAME).exists()
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
            serve_args=("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"),
            env={"CP_STORE_DSN": pg_dsn},
        ) as built:
            status = built.controlplane.status()
            assert status["gitlab"][0]["role"] == "leader" and status["store"]["changes"]["connected"]
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
            shared = built.controlplane.status()["store"]
            assert shared["pins"] == {"kind": "postgres", "unwritten": 0, "last_error": None}
            assert shared["webhook_deliveries"] == {"kind": "postgres", "memory_fallbacks": 0, "last_error": None}
