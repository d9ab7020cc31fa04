"""A state directory and a policy repository with history, for `controlplane report`'s tests.

The audit store is a real one (AuditStore, its writer thread, its sanitising), filled with two jobs' traffic,
denials, a revoked job's refused requests and a record whose path and details carry markup; the policy
repository is a git repository whose commits change access (quickstart, then a widened role, then a removed
binding), with their own authors and commit times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

from controlplane.audit.store import DB_NAME, AuditRecord, AuditStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
DAY = 86_400.0
MALICIOUS_PATH = "/reports/<script>alert(1)</script><img src=x onerror=alert(2)>"
MALICIOUS_DETAILS = "rbac_access_denied_matched_policy[none]<b>bold</b>"
REVOKED_JOB = "70009"
# Cloud identities the trail recorded (audit/als.py looks them up from the policy; here simply stored): job 70001's
# role changed mid-window, and one value carries markup, as a hostile store value would.
READ_ROLE = "arn:aws:iam::123456789012:role/ci-reports-read"
READ_ROLE_V2 = "arn:aws:iam::123456789012:role/ci-reports-read-v2"
MALICIOUS_IDENTITY = "deployer@acme.iam.gserviceaccount.com<script>alert(3)</script>"


class Fixture(NamedTuple):
    state_dir: Path
    repo: Path
    now: float
    commits: tuple[str, ...]  # oldest first: before the window, in it, in it


def _git(repo: Path, when: float, author: str, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": author,
        "GIT_AUTHOR_EMAIL": f"{author.lower().replace(' ', '.')}@example.com",
        "GIT_COMMITTER_NAME": "Merge Bot",
        "GIT_COMMITTER_EMAIL": "bot@example.com",
        "GIT_AUTHOR_DATE": f"@{int(when)} +0000",
        "GIT_COMMITTER_DATE": f"@{int(when)} +0000",
    }
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, timeout=60)
    return done.stdout.decode().strip()


def policy_repo(root: Path, now: float) -> tuple[Path, tuple[str, ...]]:
    """A checkout whose policy is in `policy/`: three commits, 40, 20 and 5 days before `now`."""
    repo = root / "repo"
    policy = repo / "policy"
    shutil.copytree(EXAMPLE, policy)
    (repo / "README").write_text("not policy\n")
    _git(repo, now, "Init", "init", "-q", "-b", "main")
    _git(repo, now - 40 * DAY, "Alice Admin", "add", "-A")
    _git(repo, now - 40 * DAY, "Alice Admin", "commit", "-q", "-m", "quickstart policy")
    first = _git(repo, now, "x", "rev-parse", "HEAD")
    roles = policy / "roles.yaml"
    roles.write_text(roles.read_text().replace("methods: [GET, HEAD]", "methods: [GET, HEAD, DELETE]"))
    _git(repo, now - 20 * DAY, "Bob <b>Builder</b>", "commit", "-q", "-am", "reports: allow DELETE <script>x</script>")
    second = _git(repo, now, "x", "rev-parse", "HEAD")
    (repo / "README").write_text("still not policy\n")
    _git(repo, now - 10 * DAY, "Carol", "commit", "-q", "-am", "readme only")
    bindings = policy / "bindings.yaml"
    bindings.write_text(bindings.read_text().split("---")[0])
    _git(repo, now - 5 * DAY, "Dave", "commit", "-q", "-am", "drop deployer-deploys")
    third = _git(repo, now, "x", "rev-parse", "HEAD")
    return policy, (first, second, third)


def _record(when: float, job: str, method: str, path: str, decision: str, **extra: str | int | None) -> AuditRecord:
    fields: dict[str, object] = {
        "time": when,
        "gateway": "ci-gateway",
        "node": "envoy-1",
        "backend": "reports-api",
        "method": method,
        "path": path,
        "status": 200 if decision == "allowed" else 403,
        "decision": decision,
        "policy": "deployer-reads-reports/reports-read" if decision == "allowed" else None,
        "project_id": "42",
        "project_path": "acme/platform/deployer",
        "pipeline_id": "8" + job,
        "job_id": job,
        "ref": "main",
        "user": "alice",
        **extra,
    }
    return AuditRecord(**fields)  # type: ignore[arg-type]


def audit_records(now: float) -> list[AuditRecord]:
    records = []
    for i in range(30):  # job 70001: 30 GETs over two days, in the window, as one role then (last 10) another
        role = READ_ROLE if i < 20 else READ_ROLE_V2
        records.append(
            _record(now - 3 * DAY + i * 3600, "70001", "GET", f"/reports/{i % 3}", "allowed", cloud_identity=role)
        )
    records.append(
        _record(
            now - 2 * DAY,
            "70002",
            "POST",
            "/deployments/run",
            "allowed",
            backend="deploy-api",
            cloud_identity=MALICIOUS_IDENTITY,
        )
    )
    for i in range(4):  # job 70002 denied: no matching policy
        records.append(
            _record(
                now - 2 * DAY + i,
                "70002",
                "DELETE",
                "/reports/1",
                "denied",
                details="rbac_access_denied_matched_policy[none]",
            )
        )
    records.append(_record(now - DAY, "70003", "GET", MALICIOUS_PATH, "denied", details=MALICIOUS_DETAILS))
    for i in range(3):  # a revoked job keeps trying
        records.append(
            _record(
                now - DAY + i,
                REVOKED_JOB,
                "GET",
                "/reports/0",
                "denied",
                policy="revoked-jobs",
                details="rbac_access_denied_matched_policy[revoked-jobs]",
            )
        )
    records.append(  # no token at all: no project, no job
        _record(
            now - DAY,
            "x",
            "GET",
            "/",
            "denied",
            project_id=None,
            project_path=None,
            job_id=None,
            user=None,
            pipeline_id=None,
            ref=None,
        )
    )
    records.append(  # before the window
        _record(now - 45 * DAY, "60000", "GET", "/reports/old", "allowed", cloud_identity=READ_ROLE)
    )
    return records


def state_dir(root: Path, now: float) -> Path:
    state = root / "state"
    store = AuditStore(state / DB_NAME, retention=None)
    try:
        for record in audit_records(now):
            assert store.submit(record)
        assert store.flush(30.0)
    finally:
        store.close(30.0)
    (state / "revoked-jobs.json").write_text(json.dumps({"version": 1, "revoked": {REVOKED_JOB: now + 3600}}))
    keys = [
        {"kid": "k-old", "private_pem": "NOT A KEY", "created_at": now - 9 * DAY, "not_before": now - 9 * DAY,
         "retire_after": now - 2 * DAY + 3600},
        {"kid": "k-new", "private_pem": "NOT A KEY", "created_at": now - 2 * DAY - 10, "not_before": now - 2 * DAY,
         "retire_after": None},
    ]  # fmt: skip
    (state / "signing-keys.json").write_text(json.dumps({"version": 1, "keys": keys}))
    for name in ("revoked-jobs.json", "signing-keys.json"):
        (state / name).chmod(0o600)  # as serve writes them (a wider mode is warned about)
    return state


def fixture(root: Path, now: float) -> Fixture:
    repo, commits = policy_repo(root, now)
    return Fixture(state_dir(root, now), repo, now, commits)


def fill_postgres(dsn: str, now: float) -> None:
    """The same audit records (`audit_records`) in a PostgreSQL trail, through the real store."""
    import asyncio

    from controlplane.audit.store_pg import PostgresAuditStore
    from controlplane.store.dsn import StoreDsn
    from controlplane.store.pool import PoolSettings, StorePool

    async def fill() -> None:
        pool = StorePool(StoreDsn(dsn, "test"), PoolSettings(min_size=1, max_size=2))
        store = PostgresAuditStore(pool, retention=None)
        await store.open()
        try:
            for record in audit_records(now):
                assert store.submit(record)
            assert await asyncio.to_thread(store.flush, 30.0)
        finally:
            await store.close()
            await pool.close()

    asyncio.run(fill())
