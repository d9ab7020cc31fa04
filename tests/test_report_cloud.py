"""`controlplane report` and the cloud: who requests reached AWS and Google Cloud as, from the trail's
`cloud_identity` (docs/cloud-audit.md), aggregated by the database per identity and backend and per project and
job, in JSON, CSV and HTML (a hostile stored value stays text); a store written before the column existed
gives empty tables, not an error. PostgreSQL gives the same rows: tests/test_report.py's PostgreSQL test.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controlplane.audit.store import DB_NAME, AuditRecord, AuditStore, open_readonly
from controlplane.audit.usage import summarise
from controlplane.cli.main import main
from tests.support.report_data import (
    DAY,
    MALICIOUS_IDENTITY,
    READ_ROLE,
    READ_ROLE_V2,
    Fixture,
    fill_postgres,
    fixture,
)

NOW = 1_790_000_000.0
WINDOW = ("--since", "2026-08-22T14:13:20Z", "--until", "2026-09-21T14:13:20Z")  # [NOW - 30 days, NOW)
PROJECT = "acme/platform/deployer"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return fixture(tmp_path_factory.mktemp("report-cloud"), NOW)


def _report(data: Fixture, out: Path, *extra: str) -> None:
    argv = ["report", *WINDOW, "--policy-repo", str(data.repo), "--state-dir", str(data.state_dir)]
    assert main([*argv, "--out", str(out), *extra]) == 0


def _rows(report: dict[str, Any], section: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = report["sections"][section]["rows"]
    return found


def test_cloud_identities_per_identity_and_per_job(data: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    _report(data, out)
    report = json.loads(out.read_text())
    identities = [
        (r["cloud_identity"], r["backend"], r["requests"], r["jobs"], r["first"], r["last"])
        for r in _rows(report, "cloud_identities")
    ]
    assert identities == [  # the 45-day-old request as READ_ROLE is outside the window; denials have none
        (READ_ROLE, "reports-api", 20, 1, "2026-09-18T14:13:20Z", "2026-09-19T09:13:20Z"),
        (READ_ROLE_V2, "reports-api", 10, 1, "2026-09-19T10:13:20Z", "2026-09-19T19:13:20Z"),
        (MALICIOUS_IDENTITY, "deploy-api", 1, 1, "2026-09-19T14:13:20Z", "2026-09-19T14:13:20Z"),
    ]
    per_job = [(r["project_path"], r["job_id"], r["cloud_identity"], r["requests"]) for r in _rows(report, "cloud_use")]
    assert per_job == [
        (PROJECT, "70001", READ_ROLE, 20),
        (PROJECT, "70001", READ_ROLE_V2, 10),
        (PROJECT, "70002", MALICIOUS_IDENTITY, 1),
    ]
    section = report["sections"]["cloud_identities"]
    assert section["columns"] == ["cloud_identity", "backend", "requests", "jobs", "first", "last"]
    assert section["more"] == 0 and any("docs/cloud-audit.md" in line for line in section["about"])
    assert any("IAM policies" in note for note in report["not_recorded"])


def test_csv_and_html_carry_the_cloud_tables(data: Fixture, tmp_path: Path) -> None:
    _report(data, tmp_path / "csv", "--format", "csv")
    table = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "cloud_identities.csv").read_text())))
    assert [(r["cloud_identity"], r["requests"], r["jobs"]) for r in table][:2] == [
        (READ_ROLE, "20", "1"),
        (READ_ROLE_V2, "10", "1"),
    ]
    assert table[0]["first"] == "2026-09-18T14:13:20Z"
    per_job = list(csv.DictReader(io.StringIO((tmp_path / "csv" / "cloud_use.csv").read_text())))
    assert [r["job_id"] for r in per_job] == ["70001", "70001", "70002"]
    page_path = tmp_path / "r.html"
    _report(data, page_path, "--format", "html")
    page = page_path.read_text()
    assert 'id="table-cloud_identities"' in page and 'id="table-cloud_use"' in page
    assert "<script>alert(3)" not in page and "&lt;script&gt;alert(3)&lt;/script&gt;" in page


def test_the_cloud_tables_are_groups_counting_distinct_jobs_and_capped(tmp_path: Path) -> None:
    store = AuditStore(tmp_path / DB_NAME, retention=None)
    base = AuditRecord(NOW - DAY, "gw", "n", "s3", "GET", "/a", 200, "allowed", project_path="p")
    for i in range(12):  # jobs 0..3, each three requests as role A; job 0 once more as role B
        assert store.submit(replace(base, time=NOW - DAY + i, job_id=str(i % 4), cloud_identity="role-a"))
    assert store.submit(replace(base, job_id="0", cloud_identity="role-b"))
    assert store.submit(replace(base, job_id="9", status=403, decision="denied"))  # denied: no identity
    assert store.flush(30)
    store.close(30)
    statements: list[str] = []
    conn = open_readonly(tmp_path / DB_NAME)
    conn.set_trace_callback(statements.append)
    usage = summarise(conn, 0.0, NOW, cap=1)
    conn.close()
    cloud = [s for s in statements if "cloud_identity IS NOT NULL" in s]
    assert len(cloud) == 2 and all("GROUP BY" in s for s in cloud)  # aggregated by the database
    table = usage.tables["cloud_identities"]
    assert table.total == 2 and [(r["cloud_identity"], r["requests"], r["jobs"]) for r in table.rows] == [
        ("role-a", 12, 4)
    ]
    assert usage.tables["cloud_use"].total == 5  # (job, identity): 0a 0b 1a 2a 3a


def test_a_store_older_than_the_column_gives_empty_tables(data: Fixture, tmp_path: Path) -> None:
    old_state = tmp_path / "state"
    shutil.copytree(data.state_dir, old_state)
    conn = sqlite3.connect(old_state / DB_NAME)
    conn.execute("ALTER TABLE audit DROP COLUMN cloud_identity")  # as schema 3 wrote it
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    out = tmp_path / "r.json"
    argv = ["report", *WINDOW, "--policy-repo", str(data.repo), "--state-dir", str(old_state), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert _rows(report, "cloud_identities") == [] and _rows(report, "cloud_use") == []
    assert report["summary"]["requests"] == 40 and len(_rows(report, "jobs")) == 5


def test_a_postgres_trail_not_yet_migrated_gives_empty_tables(
    data: Fixture, pg_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PostgreSQL before migration 10 (the column dropped again, as an older serve left it): the report reads,
    it never migrates, so the cloud tables are empty and the rest is there."""
    import psycopg

    fill_postgres(pg_dsn, NOW)
    monkeypatch.setenv("CONTROLPLANE_TEST_REPORT_DSN", pg_dsn)
    pg = ("--store", "postgres", "--store-dsn-env", "CONTROLPLANE_TEST_REPORT_DSN")
    _report(data, tmp_path / "before.json", *pg)
    before = json.loads((tmp_path / "before.json").read_text())
    assert [r["requests"] for r in _rows(before, "cloud_identities")] == [20, 10, 1]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit DROP COLUMN cloud_identity")
    _report(data, tmp_path / "after.json", *pg)
    after = json.loads((tmp_path / "after.json").read_text())
    assert _rows(after, "cloud_identities") == [] and _rows(after, "cloud_use") == []
    assert after["summary"]["requests"] == 40 and _rows(after, "jobs") == _rows(before, "jobs")


def test_who_could_reach_what_names_the_identity_each_grant_is_sent_as(data: Fixture, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    policy = Path(__file__).resolve().parent.parent / "examples" / "aws-s3"
    argv = ["report", "--since", "1d", "--policy", str(policy), "--no-audit", "--state-dir", str(data.state_dir)]
    assert main([*argv, "--out", str(out)]) == 0
    access = _rows(json.loads(out.read_text()), "access")
    sent_as = {r["grant"]: r["cloud_identity"] for r in access}
    assert sent_as == {
        "main-writes-artifacts/artifacts-read": "arn:aws:iam::123456789012:role/ci-artifacts-deploy",
        "main-writes-artifacts/artifacts-write": "arn:aws:iam::123456789012:role/ci-artifacts-deploy",
        "mr-pipelines-read-artifacts/artifacts-read": "arn:aws:iam::123456789012:role/ci-artifacts-read",
    }
    _report(data, tmp_path / "q.json")  # the quickstart history: no cloud backend, so no identity
    assert all(r["cloud_identity"] is None for r in _rows(json.loads((tmp_path / "q.json").read_text()), "access"))
