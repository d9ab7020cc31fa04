"""`controlplane suggest` as a command, without Envoy: the GitLab CI reader against the fake GitLab (what it reads,
its bounds, 404s), the command on an audit store written by the real store (text and JSON, the tree it writes,
the usage and input errors), and that it never prints the GitLab token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.assistant.ci_config import load_ci_config
from controlplane.audit.store import DB_NAME, AuditRecord, AuditStore, open_readonly, query_records
from controlplane.audit.store_pg import PostgresAuditStore
from controlplane.cli.main import main
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_ci import ci_project
from controlplane.store.dsn import StoreDsn
from controlplane.store.pool import PoolSettings, StorePool
from tests.support.fake_gitlab import FakeGitLab

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
TOKEN_ENV = "SUGGEST_CLI_GITLAB_TOKEN"
CI = """\
include: ci/reports.yml
"""
REPORTS_CI = """\
read:
  id_tokens: {R: {aud: https://reports.local}}
  rules:
    - if: $CI_COMMIT_REF_PROTECTED == "true"
"""


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as gitlab:
        yield gitlab


def test_ci_reader_reads_the_default_branch_bounded(fake: FakeGitLab) -> None:
    fake.add_project(
        "acme/platform/deployer",
        id=42,
        default_branch="trunk",
        branches=["feature"],
        protected=["trunk"],
        tags=["v1"],
        protected_tags=["v*"],
        files={".gitlab-ci.yml": CI, "ci/reports.yml": REPORTS_CI, "big.yml": "x" * 5000},
    )
    fake.commit(42, {".gitlab-ci.yml": "changed: {script: [x]}\n"}, branch="feature")
    source = GitLabSource(fake.api_url, fake.api_token, requests_per_second=1000, max_retries=1)
    project = ci_project(source, "acme/platform/deployer")
    assert project is not None
    assert (project.id, project.path, project.default_branch) == (42, "acme/platform/deployer", "trunk")
    assert project.protected == {"trunk": True, "feature": False, "v1": True}
    assert project.read("missing.yml") is None
    project.max_file_bytes = 100
    big = project.read("big.yml")
    assert big is not None and len(big) == 101  # cut one byte past the bound: the parser says "too large"
    cut = load_ci_config(project.path, project.read, default_branch="trunk", max_file_bytes=100)
    assert cut.jobs == () and "ci/reports.yml: larger than 100 bytes: not parsed" in cut.notes
    project.max_file_bytes = 1024
    config = load_ci_config(project.path, project.read, default_branch=project.default_branch)
    assert config.files == (".gitlab-ci.yml", "ci/reports.yml")  # the default branch, not `feature`
    assert [j.name for j in config.jobs] == ["read"] and config.jobs[0].always_protected
    assert ci_project(source, "acme/nothing") is None
    reads = fake.api_calls("/projects/:id/repository/files/:path/raw")
    assert reads and all(call.method == "GET" for call in reads)


def _store(state: Path, issuer: str) -> None:
    store = AuditStore(state / DB_NAME, retention=None)
    now = time.time()
    common = {"gateway": "ci-gateway", "node": "n1", "issuer": issuer, "project_id": "42"}
    common |= {"project_path": "acme/platform/deployer", "ref": "main", "status": 200, "decision": "allowed"}
    common |= {"ref_type": "branch", "ref_protected": "true", "pipeline_source": "push"}  # audit schema 3's claims
    rows = [
        AuditRecord(time=now - 60, backend="reports-api", method="GET", path=f"/reports/{n}", job_id=str(7000 + n),
                    policy="deployer-reads-reports/reports-read", **common)
        for n in range(3)
    ]  # fmt: skip
    denied = {**common, "status": 403, "decision": "denied"}
    rows.append(AuditRecord(time=now - 30, backend="deploy-api", method="DELETE", path="/deployments/x",
                            job_id="7009", **denied))  # fmt: skip
    for row in rows:
        assert store.submit(row)
    assert store.flush(10)
    store.close(10)


def test_command_on_a_real_store_text_json_and_tree(
    fake: FakeGitLab, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _store(tmp_path, "http://127.0.0.1:8090")  # the quickstart issuer's url
    fake.add_project("acme/platform/deployer", id=42, files={".gitlab-ci.yml": REPORTS_CI})
    monkeypatch.setenv(TOKEN_ENV, fake.api_token)
    common = [str(EXAMPLE), "--state-dir", str(tmp_path), "--gitlab-url", fake.base_url]
    common += ["--gitlab-token-env", TOKEN_ENV]
    assert main(["suggest", *common, "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "p42-reports-api: acme/platform/deployer on reports-api: 3 request(s) by 3 job(s)" in text
    assert "GET /reports/*" in text and "subject: project=42, ref_protected=true" in text
    assert "[unmatched-binding] deployer-deploys" in text
    assert "acme/platform/deployer deploy-api DELETE /deployments/x: 1 request(s) by 1 job(s) (7009)" in text
    assert fake.api_token not in text
    # bindings.yaml and roles.yaml held only replaced documents: gone from the tree
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "backends.yaml", "gateway.yaml", "inventory.yaml", "issuer.yaml", "suggested.yaml",
    ]  # fmt: skip
    assert main(["validate", str(tmp_path / "out"), "--offline"]) == 0
    capsys.readouterr()

    assert main(["suggest", *common, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in document["suggestions"]] == ["p42-reports-api"]
    assert document["yaml"].count("kind: Role") == 1 and "+++ b/suggested.yaml" in document["diff"]


def test_usage_and_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "exists").mkdir()
    assert main(["suggest", str(EXAMPLE), "--no-gitlab", "--out", str(tmp_path / "exists")]) == 2
    assert main(["suggest", str(EXAMPLE), "--no-gitlab", "--since", "yesterday"]) == 2
    assert main(["suggest", str(EXAMPLE), "--no-gitlab", "--db", str(tmp_path / "none.sqlite3")]) == 1
    assert "cannot read" in capsys.readouterr().err
    _store(tmp_path, "http://127.0.0.1:8090")
    # GitLab asked for but no token where the flags say: one line naming the variable, exit 1
    code = main(["suggest", str(EXAMPLE), "--state-dir", str(tmp_path), "--gitlab-token-env", "NO_SUCH_VARIABLE_X"])
    assert code == 1 and "NO_SUCH_VARIABLE_X" in capsys.readouterr().err


def test_the_shared_postgres_trail_gives_the_same_suggestion(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--store postgres --store-dsn-env VAR` reads serve's shared trail (one read-only session): the same records
    written there and to a file give byte-identical output."""
    _store(tmp_path, "http://127.0.0.1:8090")
    file_args = ["suggest", str(EXAMPLE), "--no-gitlab", "--state-dir", str(tmp_path), "--format", "json"]
    assert main(file_args) == 0
    from_file = capsys.readouterr().out

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    shared = PostgresAuditStore(StorePool(StoreDsn(pg_dsn, "test"), PoolSettings(min_size=1, max_size=2)))
    try:
        run(shared.open())
        conn = open_readonly(tmp_path / DB_NAME)
        rows = query_records(conn, since=0.0, limit=100)
        conn.close()
        columns = AuditRecord.__dataclass_fields__
        assert all(shared.submit(AuditRecord(**{k: v for k, v in r.items() if k in columns})) for r in rows)
        assert shared.flush(10)
    finally:
        run(shared.close())
        run(shared._pool.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    monkeypatch.setenv("SUGGEST_CLI_DSN", pg_dsn)
    pg_args = ["suggest", str(EXAMPLE), "--no-gitlab", "--store", "postgres", "--store-dsn-env", "SUGGEST_CLI_DSN"]
    assert main([*pg_args, "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["suggestions"] and out == from_file
    (subject,) = [s["subject"] for s in json.loads(out)["suggestions"]]
    pins = {c["key"]: (c["value"], c["why"].partition(":")[0]) for c in subject}  # read from the trail, no GitLab
    assert pins["ref_protected"] == (True, "every request observed")
    assert pins["pipeline_source"] == (["push"], "observed only (no CI job asking for this audience was read)")
