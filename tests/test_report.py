"""`controlplane report`: compliance evidence from a real audit store, a real git history and the state files.

Every section is checked against what the fixture (tests/support/report_data.py) put in: versions and their
authors, the access change each commit made (from resolved.diff), who can reach what at the end, per-job use,
denials and their reasons, revocations, key rotations; the three outputs agree; the window's rows are
aggregated by the database, not loaded; hostile audit values stay text in HTML and inert in CSV.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import subprocess
import time
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from controlplane.audit.report import Inputs, build
from controlplane.audit.store import DB_NAME, AuditRecord, AuditStore, open_readonly
from controlplane.audit.usage import summarise
from controlplane.cli import report as report_cli
from controlplane.cli.main import main
from controlplane.credentials.keys import KEYS_FILE
from controlplane.credentials.revocation_store import REVOCATIONS_FILE
from controlplane.sources.policy_dir import ReadLimits
from tests.support.report_data import (
    DAY,
    EXAMPLE,
    MALICIOUS_DETAILS,
    MALICIOUS_PATH,
    REVOKED_JOB,
    Fixture,
    audit_records,
    fill_postgres,
    fixture,
)

NOW = 1_790_000_000.0  # 2026-09-21
WINDOW = ("--since", "2026-08-22T14:13:20Z", "--until", "2026-09-21T14:13:20Z")  # [NOW - 30 days, NOW)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return fixture(tmp_path_factory.mktemp("report"), NOW)


def run(data: Fixture, *extra: str) -> int:
    return main(["report", *WINDOW, "--policy-repo", str(data.repo), "--state-dir", str(data.state_dir), *extra])


def json_report(data: Fixture, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    assert run(data, "--out", str(out), *extra) == 0
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = report["sections"][section]["rows"]
    return found


def test_policy_versions_name_the_commits_authors_and_access_changes(data: Fixture, tmp_path: Path) -> None:
    report = json_report(data, tmp_path)
    versions = rows(report, "policy_versions")
    first, second, third = data.commits
    assert [v["commit"] for v in versions] == [first, second, third]  # the README-only commit is not a version
    assert [v["in_force"] for v in versions] == ["at window start", "from this commit", "from this commit"]
    assert versions[0]["author"] == "Alice Admin <alice.admin@example.com>" and versions[0]["committer"] == "Merge Bot"
    assert versions[0]["time"] == "2026-08-12T14:13:20Z"  # 40 days before NOW
    assert versions[2]["message"] == "drop deployer-deploys"
    (gain,) = versions[1]["access_changes"]
    assert gain.startswith("+ reports-api: ") and "project_id = 42" in gain
    assert gain.endswith("gains DELETE /** (via deployer-reads-reports/reports-read)")
    losses = versions[2]["access_changes"]
    assert [line.split(" loses ")[1] for line in losses] == [
        "GET /deployments/* (via deployer-deploys/deploy-trigger)",
        "POST /deployments/** (via deployer-deploys/deploy-trigger)",
    ]
    changes = report["policy_changes"]  # the same changes, as resolved.diff documents them
    assert [(c["from"], c["to"]) for c in changes] == [(first, second), (second, third)]
    assert changes[1]["diff"]["backends"][0]["name"] == "deploy-api"
    assert report["summary"]["policy_versions_in_force"] == 3


def test_access_at_the_end_is_worded_from_the_resolved_policy(data: Fixture, tmp_path: Path) -> None:
    access = rows(json_report(data, tmp_path), "access")
    assert [(r["backend"], r["grant"], r["mode"], r["allows"]) for r in access] == [
        ("reports-api", "deployer-reads-reports/reports-read", "enforce", ["GET, HEAD, DELETE /**"])
    ]
    assert access[0]["gateways"] == "ci-gateway"
    assert "project_id = 42 and ref_protected = true" in access[0]["subject"]


def test_json_has_the_access_table_under_each_version(data: Fixture, tmp_path: Path) -> None:
    by_version = json_report(data, tmp_path)["access_by_version"]
    assert [v["commit"] for v in by_version] == list(data.commits)
    grants = [sorted((r["grant"], tuple(r["allows"])) for r in v["rows"]) for v in by_version]
    assert grants[0] == [
        ("deployer-deploys/deploy-trigger", ("POST /deployments/**", "GET /deployments/*")),
        ("deployer-reads-reports/reports-read", ("GET, HEAD /**",)),
    ]
    assert grants[1][1] == ("deployer-reads-reports/reports-read", ("GET, HEAD, DELETE /**",))
    assert grants[2] == [("deployer-reads-reports/reports-read", ("GET, HEAD, DELETE /**",))]


def test_a_policy_at_the_root_of_its_repository_and_an_invalid_version(tmp_path: Path) -> None:
    repo = tmp_path / "policy"
    shutil.copytree(EXAMPLE, repo)
    git = ["git", "-c", "user.name=Root", "-c", "user.email=root@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True, timeout=60)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "root policy"], cwd=repo, check=True, timeout=60)
    (repo / "roles.yaml").write_text("kind: Role\nname: broken\n")
    subprocess.run([*git, "commit", "-q", "-am", "break it"], cwd=repo, check=True, timeout=60)
    out = tmp_path / "r.json"
    assert main(["report", "--since", "1h", "--policy-repo", str(repo), "--no-audit", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    first, broken = rows(report, "policy_versions")
    assert first["message"] == "root policy"
    assert first["access_changes"] == ["first version read: compared with nothing"]
    (why,) = broken["access_changes"]
    assert why.startswith("did not load: ") and "error(s)" in why
    assert len(rows(report, "access")) == 2  # the last version that loaded: serve keeps serving it too


def test_use_per_project_and_job_denials_and_totals(data: Fixture, tmp_path: Path) -> None:
    report = json_report(data, tmp_path)
    summary = report["summary"]
    in_window = [r for r in audit_records(NOW) if r.time >= NOW - 30 * DAY]
    assert summary["requests"] == len(in_window) == 40  # the 45-day-old record is outside
    assert (summary["allowed"], summary["denied"], summary["jobs_seen"]) == (31, 9, 4)
    jobs = {r["job_id"]: r for r in rows(report, "jobs")}
    assert set(jobs) == {None, "70001", "70002", "70003", REVOKED_JOB}
    assert (jobs["70001"]["requests"], jobs["70001"]["allowed"], jobs["70001"]["denied"]) == (30, 30, 0)
    assert jobs["70001"]["first"] == "2026-09-18T14:13:20Z" and jobs["70001"]["last"] == "2026-09-19T19:13:20Z"
    assert jobs[None]["project_path"] is None  # no token: counted, never attributed
    used = [(r["job_id"], r["method"], r["path"], r["requests"]) for r in rows(report, "usage")]
    assert ("70001", "GET", "/reports/0", 10) in used and ("70002", "POST", "/deployments/run", 1) in used
    denials = {(r["job_id"], r["path"]): r for r in rows(report, "denials")}
    delete = denials[("70002", "/reports/1")]
    assert (delete["method"], delete["status"], delete["requests"]) == ("DELETE", 403, 4)
    assert delete["details"] == "rbac_access_denied_matched_policy[none]"
    assert denials[("70003", MALICIOUS_PATH)]["details"] == MALICIOUS_DETAILS
    assert denials[(REVOKED_JOB, "/reports/0")]["policy"] == "revoked-jobs"


def test_revocations_and_signing_key_rotations(data: Fixture, tmp_path: Path) -> None:
    report = json_report(data, tmp_path)
    (revoked,) = rows(report, "revocations")
    assert revoked["job_id"] == REVOKED_JOB and revoked["in_deny_list"] == "yes"
    assert (revoked["refused_requests"], revoked["denied_until"]) == (3, "2026-09-21T15:13:20Z")
    keys = rows(report, "signing_keys")
    assert [(k["kid"], k["in_window"]) for k in keys] == [("k-old", "yes"), ("k-new", "yes")]
    assert keys[0]["retired_after"] == "2026-09-19T15:13:20Z" and keys[1]["retired_after"] is None
    assert "NOT A KEY" not in json.dumps(report)  # the private part never reaches the report
    assert any("revoked" in note for note in report["not_recorded"])


def test_the_window_is_aggregated_by_the_database_and_capped(data: Fixture, tmp_path: Path) -> None:
    statements: list[str] = []
    conn = open_readonly(data.state_dir / DB_NAME)
    conn.set_trace_callback(statements.append)
    usage = summarise(conn, NOW - 30 * DAY, NOW, cap=2)
    conn.close()
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert selects and all("GROUP BY" in s or "COUNT(*)" in s for s in selects)  # never a row-by-row read
    assert len(usage.tables["usage"].rows) == 2 and usage.tables["usage"].total == 8
    report = json_report(data, tmp_path, "--max-rows", "2")
    assert len(rows(report, "usage")) == 2 and report["sections"]["usage"]["more"] == 6
    one = json_report(data, tmp_path, "--max-rows", "1")
    assert len(rows(one, "policy_versions")) == 1 and one["sections"]["policy_versions"]["more"] == 2
    html_out = tmp_path / "capped.html"
    assert run(data, "--max-rows", "2", "--format", "html", "--out", str(html_out)) == 0
    assert "6 more not shown" in html_out.read_text()


def test_a_versions_access_changes_are_capped_too(tmp_path: Path) -> None:
    narrower = tmp_path / "narrower"
    shutil.copytree(EXAMPLE, narrower)
    (narrower / "bindings.yaml").unlink()  # three lines lost: reports GET+HEAD, deploy GET and POST
    limits = ReadLimits(max_file_bytes=1 << 20, max_tree_bytes=1 << 22)
    versions = tuple(report_cli._load(tree, limits, None, in_force_at_start=False) for tree in (EXAMPLE, narrower))
    inputs = Inputs(0.0, 1.0, 1.0, versions, 0, "test", None, "none", None, None, "none", cap=2)
    (_, second) = next(s for s in build(inputs).sections if s.key == "policy_versions").rows
    assert [line.split(":")[0] for line in second["access_changes"][:2]] == ["- deploy-api", "- deploy-api"]
    assert second["access_changes"][2:] == ["1 more change(s) not shown (controlplane diff lists them all)"]


def test_a_large_window_costs_groups_not_rows(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / DB_NAME, retention=None, queue_size=10_000, sender_queue_size=10_000)
    base = AuditRecord(NOW, "gw", "n", "api", "GET", "/same", 200, "allowed", job_id="1", project_path="p")
    for i in range(5000):
        assert store.submit(replace(base, time=NOW - i))
    assert store.flush(30)
    store.close(30)
    conn = open_readonly(tmp_path / DB_NAME)
    usage = summarise(conn, 0.0, NOW + 1, cap=100)
    conn.close()
    assert usage.totals["requests"] == 5000
    assert [(r["path"], r["requests"]) for r in usage.tables["usage"].rows] == [("/same", 5000)]


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_one_self_contained_page_and_hostile_values_stay_text(data: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert run(data, "--format", "html", "--out", str(out)) == 0
    page = out.read_text()
    parsed = _Markup()
    parsed.feed(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags and "b" not in parsed.tags
    assert {"style", "table", "thead", "tbody"} <= set(parsed.tags)
    text = "".join(parsed.text)
    assert MALICIOUS_PATH in text and MALICIOUS_DETAILS in text and "allow DELETE <script>x</script>" in text
    for external in ("http://", "https://", "src=", "href=", "@import", "url("):
        assert external not in page.replace(MALICIOUS_PATH, "").split("<body>")[0]  # nothing fetched
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_csv_is_one_file_per_table_with_formulas_defused(data: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    assert run(data, "--format", "csv", "--out", str(out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "access.csv", "cloud_identities.csv", "cloud_use.csv", "denials.csv", "index.csv", "jobs.csv",
            "not_recorded.csv", "policy_versions.csv", "revocations.csv", "signing_keys.csv", "summary.csv",
            "usage.csv",
        ]
    )  # fmt: skip
    jobs = list(csv.DictReader(io.StringIO((out / "jobs.csv").read_text())))
    assert {r["job_id"] for r in jobs} == {"", "70001", "70002", "70003", REVOKED_JOB}
    index = {r["section"]: r for r in csv.DictReader(io.StringIO((out / "index.csv").read_text()))}
    assert index["usage"]["more"] == "0" and index["usage"]["rows"] == "8"
    versions = list(csv.DictReader(io.StringIO((out / "policy_versions.csv").read_text())))
    assert versions[2]["access_changes"].startswith("'- deploy-api: ")  # a leading `-` is no formula


def test_directory_policy_and_no_audit(data: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = ["report", "--since", "1d", "--policy", str(data.repo), "--no-audit", "--state-dir", str(data.state_dir)]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "jobs" not in report["sections"] and len(rows(report, "access")) == 1
    assert rows(report, "policy_versions")[0]["commit"] == ""


def test_usage_and_unreadable_sources(data: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--since", "soon"]) == 2
    assert main(["report", "--since", "1d", "--format", "csv"]) == 2
    assert main(["report", "--since", "1d", "--until", "2d"]) == 2  # until before since
    assert "--out DIRECTORY" in capsys.readouterr().err
    assert main(["report", "--since", "1d", "--state-dir", str(tmp_path / "none")]) == 1
    assert "no audit store here" in capsys.readouterr().err
    assert main(["report", "--since", "1d", "--no-audit", "--policy-repo", str(tmp_path)]) == 1
    assert "not a git repository" in capsys.readouterr().err


def test_state_file_names_are_the_credentials_layers() -> None:
    assert (report_cli.KEYS_FILE, report_cli.REVOCATIONS_FILE) == (KEYS_FILE, REVOCATIONS_FILE)


def test_postgres_trail_gives_the_same_aggregates(data: Fixture, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fill_postgres(pg_dsn, NOW)
    monkeypatch.setenv("CONTROLPLANE_TEST_REPORT_DSN", pg_dsn)
    file_report = json.loads(_stdout(lambda: run(data)))
    pg_report = json.loads(
        _stdout(lambda: run(data, "--store", "postgres", "--store-dsn-env", "CONTROLPLANE_TEST_REPORT_DSN"))
    )
    for section in ("jobs", "usage", "denials", "cloud_identities", "cloud_use"):
        assert rows(pg_report, section) == rows(file_report, section), section
    assert len(rows(pg_report, "cloud_identities")) == 3
    assert pg_report["summary"]["requests"] == file_report["summary"]["requests"] == 40
    assert rows(pg_report, "revocations")[0]["refused_requests"] == 3


def _stdout(call: Any) -> str:
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert call() == 0
    return buffer.getvalue()


def test_sqlite_reader_never_writes(data: Fixture) -> None:
    conn = open_readonly(data.state_dir / DB_NAME)
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM audit")
    conn.close()
    assert time.time() > 0


def test_versions_from_the_gitlab_project_serve_watches(tmp_path: Path) -> None:
    from tests.support.fake_gitlab import FakeGitLab

    files = {path.name: path.read_text() for path in sorted(EXAMPLE.iterdir())}
    token = tmp_path / "token"
    with FakeGitLab() as fake:
        token.write_text(fake.api_token + "\n")
        fake.add_project("platform/policy", files=files)
        wider = files["roles.yaml"].replace("methods: [GET, HEAD]", "methods: [GET, HEAD, DELETE]")
        sha = fake.commit("platform/policy", {"roles.yaml": wider}, author="Bob Builder", message="allow DELETE")
        broken = fake.commit("platform/policy", {"roles.yaml": "kind: Role\n"}, author="Eve", message="oops")
        out = tmp_path / "r.json"
        argv = ["report", "--since", "1h", "--no-audit", "--out", str(out), "--policy-project", "platform/policy"]
        argv += ["--gitlab-url", fake.api_url, "--gitlab-token-file", str(token)]
        assert main(argv) == 0
        assert main([*argv[:-4], "--gitlab-token-file", str(token)]) == 2  # no --gitlab-url
    report = json.loads(out.read_text())
    initial, widened, invalid = rows(report, "policy_versions")
    assert (widened["commit"], widened["author"], widened["message"]) == (
        sha,
        "Bob Builder <bob.builder@example.com>",
        "allow DELETE",
    )
    assert initial["message"] == "Initial commit" and invalid["commit"] == broken
    (gain,) = widened["access_changes"]
    assert gain.endswith("gains DELETE /** (via deployer-reads-reports/reports-read)")
    assert invalid["access_changes"][0].startswith("did not load: ")
    assert "platform/policy" in report["summary"]["policy_read_from"]


def test_past_max_versions_the_newest_are_kept_and_the_rest_counted(data: Fixture, tmp_path: Path) -> None:
    report = json_report(data, tmp_path, "--max-versions", "1")
    versions = rows(report, "policy_versions")
    assert [v["commit"] for v in versions] == [data.commits[0], data.commits[2]]  # start, then the newest
    assert report["sections"]["policy_versions"]["more"] == 1
    assert "1 earlier commit(s)" in report["sections"]["policy_versions"]["about"][2]
    assert len(versions[1]["access_changes"]) == 3  # DELETE gained (the skipped commit) and the two losses
    assert rows(report, "access")[0]["allows"] == ["GET, HEAD, DELETE /**"]  # the version in force at the end
