"""`controlplane report` against a hostile or unusual policy repository, state and audit trail.

Each test is an attack that once broke the report (a commit hidden from the auditor, the whole report refused,
a figure wrong) or a check that an attack holds; the fixtures are real git repositories and a real audit store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from controlplane.audit.report import OUT_OF_ORDER
from controlplane.audit.store import DB_NAME, AuditRecord, AuditStore, open_readonly
from controlplane.audit.usage import summarise
from controlplane.cli.main import main
from controlplane.sources.policy_history import Commit, History, select, tree_at
from tests.support.report_data import EXAMPLE

HOUR = 3600


class Repo:
    """A git repository whose policy is in `sub/policy`, committed with chosen names and committer times."""

    def __init__(self, root: Path, now: float) -> None:
        self.top = root / "repo"
        self.policy = self.top / "sub" / "policy"
        self.now = now
        shutil.copytree(EXAMPLE, self.policy)
        (self.top / "sub" / "README").write_text("not policy\n")
        self.git("init", "-q", "-b", "main")
        self.git("add", "-A")
        self.commit("base", at=now - 5 * HOUR)

    def git(self, *args: str, author: str = "Alice", at: float | None = None) -> str:
        when = f"@{int(self.now if at is None else at)} +0000"
        env = {
            **os.environ,
            "GIT_AUTHOR_NAME": author,
            "GIT_AUTHOR_EMAIL": "a@example.com",
            "GIT_COMMITTER_NAME": "Merge Bot",
            "GIT_COMMITTER_EMAIL": "bot@example.com",
            "GIT_AUTHOR_DATE": when,
            "GIT_COMMITTER_DATE": when,
        }
        done = subprocess.run(["git", *args], cwd=self.top, env=env, check=True, capture_output=True, timeout=60)
        return done.stdout.decode().strip()

    def commit(self, message: str, *, author: str = "Alice", at: float | None = None) -> str:
        self.git("add", "-A", at=at)
        self.git("commit", "-q", "--allow-empty", "-m", message, author=author, at=at)
        return self.git("rev-parse", "HEAD")

    def widen(self) -> None:
        roles = self.policy / "roles.yaml"
        roles.write_text(roles.read_text().replace("methods: [GET, HEAD]", "methods: [GET, HEAD, DELETE]"))


def report(repo: Repo, tmp_path: Path, *window: str) -> dict[str, Any]:
    out = tmp_path / "report.json"
    argv = ["report", *(window or ("--since", "1d")), "--policy-repo", str(repo.policy), "--no-audit"]
    assert main([*argv, "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def versions(document: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = document["sections"]["policy_versions"]["rows"]
    return found


def test_a_separator_in_a_commit_message_or_name_does_not_hide_the_commit(tmp_path: Path) -> None:
    """git log's fields were split on \\x1f and a line that did not split in six was dropped: a committer who
    put that byte in a subject (or an author name) vanished from the report, and access at the end was the
    older version's."""
    repo = Repo(tmp_path, time.time())
    repo.widen()
    widened = repo.commit("widen\x1fnothing to see", at=repo.now - 2 * HOUR)
    (repo.policy / "bindings.yaml").write_text((repo.policy / "bindings.yaml").read_text() + "# note\n")
    noted = repo.commit("note", author="Ev\x1fil", at=repo.now - HOUR)
    document = report(repo, tmp_path)
    rows = versions(document)
    assert [r["commit"] for r in rows[1:]] == [widened, noted]
    assert rows[1]["message"] == "widen\x1fnothing to see" and rows[2]["author"] == "Ev\x1fil <a@example.com>"
    assert rows[1]["access_changes"][0].endswith("gains DELETE /** (via deployer-reads-reports/reports-read)")
    reports = [r for r in document["sections"]["access"]["rows"] if r["backend"] == "reports-api"]
    assert reports[0]["allows"] == ["GET, HEAD, DELETE /**"]  # the hidden commit's access, in force at the end


def test_a_commit_removing_the_policy_directory_is_a_version_that_did_not_load(tmp_path: Path) -> None:
    """`git archive sha:sub/policy/` failed for a commit without the directory and the whole report exited 1:
    one push (a rename, or a hostile removal) denied the auditor any report for the window."""
    repo = Repo(tmp_path, time.time())
    saved = tmp_path / "saved"
    shutil.copytree(repo.policy, saved)
    shutil.rmtree(repo.policy)
    removed = repo.commit("remove the policy", at=repo.now - 2 * HOUR)
    shutil.copytree(saved, repo.policy)
    repo.widen()
    restored = repo.commit("restore it, wider", at=repo.now - HOUR)
    document = report(repo, tmp_path)
    rows = versions(document)
    assert [r["commit"] for r in rows[1:]] == [removed, restored]
    # the invalid version was never in force (serve keeps the one before): counted apart
    summary = document["summary"]
    assert (summary["policy_versions_in_force"], summary["policy_versions_invalid"]) == (2, 1)
    assert rows[1]["access_changes"] == [
        f"did not load: the policy directory sub/policy/ does not exist in commit {removed[:12]}"
    ]
    assert [r["in_force"] for r in rows] == ["from this commit", "never: did not load", "from this commit"]
    assert rows[2]["access_changes"][0].startswith("+ reports-api: ")  # compared with the last that loaded


def test_symlinks_out_of_the_tree_make_that_version_invalid_not_the_report_crash(tmp_path: Path) -> None:
    """tarfile's data filter raised on a link out of the extraction directory, uncaught: a traceback, exit 1.
    Now the link is made as git stores it (never followed) and the policy reader refuses it by name, as serve
    reading the checkout would; a non-policy link out (a README) is ignored, as serve ignores it."""
    repo = Repo(tmp_path, time.time())
    (repo.policy / "README.md").symlink_to("../README")
    docs = repo.commit("a README linked from above", at=repo.now - 3 * HOUR)
    (repo.policy / "stolen.yaml").symlink_to("/etc/passwd")
    (repo.policy / "etc").symlink_to("../../../../../../etc")
    hostile = repo.commit("links out", at=repo.now - 2 * HOUR)
    rows = versions(report(repo, tmp_path))
    assert [r["commit"] for r in rows[1:]] == [docs, hostile]
    assert rows[1]["access_changes"] == ["access unchanged"]
    (why,) = rows[2]["access_changes"]
    assert why.startswith("did not load: 2 error(s)") and "etc:1: a symlink to a directory" in why


def test_a_huge_file_in_the_policy_tree_is_refused_by_size_without_being_held(tmp_path: Path) -> None:
    """The archive was read whole into memory, and git holds a blob whole to archive it: a push of a 400 MB
    file cost the report 850 MB of RSS. Now a file over the limit is left out of the archive and made sparse."""
    repo = Repo(tmp_path, time.time())
    (repo.policy / "big.yaml").write_bytes(b"# " + b"x" * (5 * 1024 * 1024) + b"\n")
    (repo.policy / "big.bin").write_bytes(b"\0" * (5 * 1024 * 1024))
    big = repo.commit("big files", at=repo.now - HOUR)
    rows = versions(report(repo, tmp_path))
    assert rows[-1]["commit"] == big
    assert rows[-1]["access_changes"][0].startswith("did not load: 1 error(s), first: big.yaml:1: file is larger")
    with tree_at(repo.policy, big, 4 * 1024 * 1024) as tree:
        for name in ("big.yaml", "big.bin"):
            found = (tree / name).stat()
            assert found.st_size >= 5 * 1024 * 1024 and found.st_blocks * 512 < 1024 * 1024  # sparse: not extracted
        assert (tree / "roles.yaml").read_text() == (repo.policy / "roles.yaml").read_text()


def test_a_commit_at_the_windows_first_second_keeps_the_version_in_force_before_it(tmp_path: Path) -> None:
    """The version in force at the start was asked with git's inclusive --until=since: a commit made at that
    very second was returned, filtered out as in the window, and the start was reported as no version at all,
    so that commit's changes were 'compared with nothing'."""
    now = float(int(time.time()))
    repo = Repo(tmp_path, now)
    since = now - 2 * HOUR
    repo.widen()
    edge = repo.commit("at the first second", at=since)
    window = ("--since", _iso(since), "--until", _iso(now + 1))
    rows = versions(report(repo, tmp_path, *window))
    assert [r["in_force"] for r in rows] == ["at window start", "from this commit"]
    assert rows[1]["commit"] == edge and rows[1]["access_changes"][0].startswith("+ reports-api: ")


def _iso(timestamp: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _store(state: Path, records: list[AuditRecord]) -> None:
    store = AuditStore(state / DB_NAME, retention=None)
    try:
        for record in records:
            assert store.submit(record)
        assert store.flush(30.0)
    finally:
        store.close(30.0)


def _refused(when: float, job: str, project: str, issuer: str) -> AuditRecord:
    return AuditRecord(
        time=when,
        gateway="ci-gateway",
        node="envoy-1",
        backend="reports-api",
        method="GET",
        path="/reports/0",
        status=403,
        decision="denied",
        policy="revoked-jobs",
        details="rbac_access_denied_matched_policy[revoked-jobs]",
        project_id="1",
        project_path=project,
        job_id=job,
        issuer=issuer,
    )


def _usage_report(state: Path, tmp_path: Path, now: float, *extra: str) -> dict[str, Any]:
    out = tmp_path / "usage.json"
    argv = ["report", "--since", _iso(now - 3600), "--until", _iso(now), "--state-dir", str(state), "--out", str(out)]
    assert main([*argv, *extra]) == 0
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def test_a_revoked_jobs_refused_requests_are_summed_over_its_projects(tmp_path: Path) -> None:
    """Refused requests were grouped by (job, project) and the section kept the first group per job: a job id
    seen under two projects (two GitLab issuers both have a job 5) lost the other group's requests."""
    now = float(int(time.time()))
    state = tmp_path / "state"
    records = [_refused(now - 100 - i, "5", "acme/a", "https://gitlab-a.example") for i in range(2)]
    records += [_refused(now - 50 - i, "5", "acme/b", "https://gitlab-b.example") for i in range(3)]
    _store(state, records)
    (row,) = _usage_report(state, tmp_path, now)["sections"]["revocations"]["rows"]
    assert (row["job_id"], row["refused_requests"]) == ("5", 5)
    assert row["project_path"] == "acme/a (and 1 other project(s))"


def test_past_max_rows_revoked_jobs_keep_numeric_order_and_never_a_false_zero(tmp_path: Path) -> None:
    """The database cut the refused jobs in text order ("10" before "9") while the section sorts numerically,
    and a job in the deny list whose refused requests were past the cut showed 0 refused requests."""
    now = float(int(time.time()))
    state = tmp_path / "state"
    _store(state, [_refused(now - 10, job, "acme/a", "https://gitlab.example") for job in ("9", "10", "10", "11")])
    state.joinpath("revoked-jobs.json").write_text(json.dumps({"version": 1, "revoked": {"9": now + 60}}))
    state.joinpath("revoked-jobs.json").chmod(0o600)
    section = _usage_report(state, tmp_path, now, "--max-rows", "1")["sections"]["revocations"]
    (row,) = section["rows"]
    assert (row["job_id"], row["refused_requests"]) == ("9", 1)  # was ("9", 0): its group cut, "10" kept
    assert section["more"] >= 2
    section = _usage_report(state, tmp_path, now, "--max-rows", "2")["sections"]["revocations"]
    assert [(r["job_id"], r["refused_requests"]) for r in section["rows"]] == [("9", 1), ("10", 2)]
    section = _usage_report(state, tmp_path, now, "--max-rows", "3")["sections"]["revocations"]
    assert [(r["job_id"], r["refused_requests"]) for r in section["rows"]] == [("9", 1), ("10", 2), ("11", 1)]


@pytest.mark.parametrize(
    ("name", "document"),
    [
        ("revoked-jobs.json", {"version": 1, "revoked": {"5": "nan"}}),
        ("revoked-jobs.json", {"version": 1, "revoked": {"5": 1e300}}),
        ("revoked-jobs.json", {"version": 1, "revoked": {"5": "-inf"}}),
        ("signing-keys.json", {"version": 1, "keys": [1]}),
        ("signing-keys.json", {"version": 1, "keys": [{"kid": "k", "created_at": "NaN", "not_before": 1}]}),
    ],
)
def test_a_state_file_time_no_date_can_show_is_named_not_a_traceback(
    name: str, document: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """NaN, infinities and out-of-range times passed `float()` and blew up in `datetime.fromtimestamp` while
    writing (a traceback), and a key entry that is not an object raised AttributeError."""
    state = tmp_path / "state"
    state.mkdir()
    (state / name).write_text(json.dumps(document))
    (state / name).chmod(0o600)
    assert main(["report", "--since", "1d", "--no-audit", "--state-dir", str(state)]) == 1
    assert f"controlplane report: {state / name}: malformed" in capsys.readouterr().err


def test_invisible_and_reordering_characters_are_shown_in_html_and_csv(tmp_path: Path) -> None:
    """A branch named "\\u202eniam" was drawn as "main" by the browser and the spreadsheet: a job on any branch
    could pass for one on main in the report. HTML and CSV show such characters as <U+XXXX>; JSON is exact."""
    now = float(int(time.time()))
    state = tmp_path / "state"
    spoof = _refused(now - 10, "7", "acme/a", "https://gitlab.example")
    _store(state, [replace(spoof, ref="\u202eniam", user="ali\u200bce", path="/r/\x1b[2Jx\u2028y")])
    window = ("--since", _iso(now - 3600), "--until", _iso(now), "--state-dir", str(state))
    assert main(["report", *window, "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    assert main(["report", *window, "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    page = tmp_path.joinpath("r.html").read_text()
    for shown in ("&lt;U+202E&gt;niam", "ali&lt;U+200B&gt;ce", "/r/&lt;U+001B&gt;[2Jx&lt;U+2028&gt;y"):
        assert shown in page
    assert not any(char in page for char in "\u202e\u200b\x1b\u2028")
    (job,) = csv.DictReader(io.StringIO(tmp_path.joinpath("csv", "jobs.csv").read_text()))
    assert (job["ref"], job["user"]) == ("<U+202E>niam", "ali<U+200B>ce")
    assert main(["report", *window, "--out", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads(tmp_path.joinpath("r.json").read_text())["sections"]["jobs"]["rows"]
    assert row["ref"] == "\u202eniam"


def test_credentials_in_the_gitlab_url_are_refused_not_written_into_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--gitlab-url https://oauth2:glpat-…@gitlab` was accepted and the report's summary named the source
    with the token in it: a file made to be attached to tickets. Refused as the DSN with a password is."""
    argv = ["report", "--since", "1h", "--no-audit", "--policy-project", "platform/policy", "--gitlab-token-env", "T"]
    assert main([*argv, "--gitlab-url", "https://oauth2:glpat-SECRET@gitlab.example"]) == 2
    err = capsys.readouterr().err
    assert "--gitlab-url: the URL holds credentials" in err and "glpat-SECRET" not in err


@pytest.mark.parametrize(
    ("window", "said"),
    [
        (("--since", "999999999d"), "--since: out of range"),  # was a traceback: year -2735881 is out of range
        (("--since", "1d", "--until", "9999-12-31T23:59:59+00:00"), ""),
        (("--since", "1d", "--until", "9999-12-31T23:59:59-01:00"), "--until: out of range"),
        (("--since", "1969-12-31T00:00:00Z"), "--since: out of range"),
        (("--since", "0d"), "the window is empty"),
        (("--since=-1d",), "--since: expected a duration"),
        (("--since", "1d", "--until", "2d"), "the window is empty"),
        (("--since", "1d", "--until", "soon"), "--until: expected a duration"),
    ],
)
def test_window_arguments_at_their_edges(
    window: tuple[str, ...], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["report", *window, "--no-audit", "--state-dir", str(tmp_path), "--out", str(tmp_path / "r.json")])
    assert (code, said in capsys.readouterr().err) == ((0, True) if not said else (2, True))


def test_a_commit_dated_into_the_past_is_listed_and_flagged_not_hidden(tmp_path: Path) -> None:
    """git log --since stops at the first commit dated before the window: a commit dated 2020 on top of one
    made in the window hid that one, and became the 'version in force at the start' with no access change
    shown, so the DELETE it granted never appeared as a change. Now the branch's order decides."""
    repo = Repo(tmp_path, time.time())
    base = repo.git("rev-parse", "HEAD")
    repo.widen()
    backdated = repo.commit("nothing to see", author="Mallory", at=1_577_836_800)  # 2020-01-01
    (repo.policy / "bindings.yaml").write_text((repo.policy / "bindings.yaml").read_text() + "# later\n")
    later = repo.commit("later", at=repo.now - HOUR)
    rows = versions(report(repo, tmp_path))
    assert [r["commit"] for r in rows] == [base, backdated, later]
    assert rows[1]["in_force"] == f"from this commit; {OUT_OF_ORDER}"
    assert rows[1]["access_changes"][0].endswith("gains DELETE /** (via deployer-reads-reports/reports-read)")
    assert [r["in_force"] for r in rows[::2]] == ["from this commit", "from this commit"]


def test_a_backdated_commit_on_top_is_in_force_at_the_end(tmp_path: Path) -> None:
    repo = Repo(tmp_path, time.time())
    repo.widen()
    head = repo.commit("backdated head", at=1_577_836_800)
    document = report(repo, tmp_path)
    rows = versions(document)
    assert rows[-1]["commit"] == head and rows[-1]["in_force"].endswith(OUT_OF_ORDER)
    reports = [r for r in document["sections"]["access"]["rows"] if r["backend"] == "reports-api"]
    assert reports[0]["allows"] == ["GET, HEAD, DELETE /**"]


def test_select_flags_a_start_dated_before_the_commit_it_follows() -> None:
    """A window in the past: the version 'in force at the start' is dated 2020 but follows a commit dated
    today, so one of the two dates is false; it is flagged (the start was not compared with its parent)."""
    now = 1_800_000_000.0
    good, evil, base = (Commit(sha, "a", "a@x", "c", when, sha) for sha, when in (
        ("good", now - 3600), ("evil", 1_577_836_800.0), ("base", now - 5 * 3600)))  # fmt: skip
    found = select([good, evil, base], now - 10 * 86400, now - 9 * 86400, 50)
    assert (found.in_force_at_start, found.commits, found.out_of_order) == (evil, (), ("evil",))
    found = select([good, evil, base], now - 86400, now, 50)
    assert (found.in_force_at_start, found.commits, found.out_of_order) == (None, (base, evil, good), ("evil",))


def test_a_commit_message_of_megabytes_is_cut_not_copied_into_every_output(tmp_path: Path) -> None:
    """Four 30 MB commit messages made a 120 MB HTML page and 600 MB of RSS: subjects and names are cut by
    git itself (`%<(N,trunc)`), and the whole branch is listed with sha and time only."""
    repo = Repo(tmp_path, time.time())
    repo.widen()
    long = repo.commit("x" * 100_000, author="N" * 5_000, at=repo.now - HOUR)
    (row,) = versions(report(repo, tmp_path))[1:]
    assert row["commit"] == long and row["message"] == "x" * 998 + ".."
    assert row["author"] == "N" * 254 + ".. <a@example.com>" and row["committer"] == "Merge Bot"


def test_claims_alike_from_two_issuers_are_two_jobs(tmp_path: Path) -> None:
    """The jobs table grouped by project, job, pipeline, ref and user only: a token from a second issuer that
    carried the same claims (another GitLab, or an OIDC issuer whose claims its users shape) was counted as
    the GitLab job's own use, with nothing to tell them apart."""
    now = float(int(time.time()))
    state = tmp_path / "state"
    real = replace(_refused(now - 20, "5", "acme/a", "https://gitlab.example"), decision="allowed", status=200)
    _store(state, [real, real, replace(real, issuer="https://idp.example")])
    rows = _usage_report(state, tmp_path, now)["sections"]["jobs"]["rows"]
    assert [(r["issuer"], r["requests"]) for r in rows] == [("https://gitlab.example", 2), ("https://idp.example", 1)]


def test_gitattributes_in_the_commit_cannot_hide_a_file_from_the_report(tmp_path: Path) -> None:
    """`git archive` obeys the archived tree's .gitattributes: `export-ignore` on a new binding left it out of
    the report's copy of the commit ('access unchanged', the binding absent from who could reach what) while a
    checkout, which serve reads, has it; `export-subst` could rewrite a file's text the same way."""
    repo = Repo(tmp_path, time.time())
    (repo.policy / "zz-extra.yaml").write_text(
        "kind: Binding\nname: extra\nissuer: gitlab\nroles: [reports-read]\nsubjects:\n"
        "  - project: acme/platform/deployer\n    ref: $Format:%H$\n"
    )
    (repo.policy / ".gitattributes").write_text(
        "zz-extra.yaml export-ignore export-subst\n.gitattributes export-ignore\n"
    )
    tidy = repo.commit("tidy up", at=repo.now - HOUR)
    document = report(repo, tmp_path)
    (row,) = versions(document)[1:]
    assert row["commit"] == tidy and row["access_changes"][0].startswith("+ reports-api: ")
    grants = {r["grant"]: r["subject"] for r in document["sections"]["access"]["rows"]}
    assert 'ref = "$Format:%H$"' in grants["extra/reports-read"]  # not rewritten to the sha


def test_a_backdated_commit_in_the_gitlab_project_is_listed_and_flagged(tmp_path: Path) -> None:
    """From --policy-project the window was GitLab's `since`/`until` (git's date filters): the commit dated
    2020 was not listed, and its DELETE appeared in no change. Now the branch's order decides there too."""
    from tests.support.fake_gitlab import FakeGitLab

    files = {path.name: path.read_text() for path in sorted(EXAMPLE.iterdir())}
    wider = files["roles.yaml"].replace("methods: [GET, HEAD]", "methods: [GET, HEAD, DELETE]")
    token = tmp_path / "token"
    with FakeGitLab() as fake:
        token.write_text(fake.api_token + "\n")
        fake.add_project("platform/policy", files=files)
        backdated = fake.commit("platform/policy", {"roles.yaml": wider}, author="Mallory", at=1_577_836_800.0)
        later = fake.commit("platform/policy", {"notes.yaml": "# later\n"}, author="Bob", at=time.time() - 60)
        out = tmp_path / "r.json"
        argv = ["report", "--since", "1d", "--no-audit", "--out", str(out), "--policy-project", "platform/policy"]
        assert main([*argv, "--gitlab-url", fake.api_url, "--gitlab-token-file", str(token)]) == 0
    rows = versions(json.loads(out.read_text()))
    assert [r["commit"] for r in rows[1:]] == [backdated, later]
    assert rows[1]["in_force"] == f"from this commit; {OUT_OF_ORDER}"
    assert rows[1]["access_changes"][0].endswith("gains DELETE /** (via deployer-reads-reports/reports-read)")


class _WriterBetweenQueries:
    """A read-only connection whose first query is followed by serve's writer committing one more record."""

    def __init__(self, conn: sqlite3.Connection, db: Path, record: AuditRecord) -> None:
        self.conn, self.db, self.record, self.queries = conn, db, record, 0

    def execute(self, sql: str, *params: Any) -> sqlite3.Cursor:
        cursor = self.conn.execute(sql, *params)
        if sql.startswith("SELECT"):
            self.queries += 1
            if self.queries == 1:
                _store(self.db.parent, [self.record])
        return cursor


def test_totals_and_tables_count_the_same_rows_while_serve_writes(tmp_path: Path) -> None:
    """Each aggregate was its own snapshot: a batch committed between two of them (records received a moment
    before the report started, so inside its window) was in the tables but not in the totals."""
    now = float(int(time.time()))
    state = tmp_path / "state"
    first = replace(_refused(now - 20, "5", "acme/a", "https://gitlab.example"), decision="allowed", status=200)
    _store(state, [first])
    conn = open_readonly(state / DB_NAME)
    try:
        racing = _WriterBetweenQueries(conn, state / DB_NAME, replace(first, time=now - 10))
        usage = summarise(racing, now - 3600, now, 10)  # type: ignore[arg-type]
    finally:
        conn.close()
    assert racing.queries > 1
    assert usage.totals["requests"] == sum(row["requests"] for row in usage.tables["jobs"].rows) == 1


def test_a_shallow_clone_cut_inside_the_window_is_refused_not_reported_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CI checkout is often shallow: the cut looked like the policy's beginning, so the first commit kept was
    'compared with nothing' and the access it granted was in no change. Refused when the cut is in the window;
    a clone deep enough to hold the version in force at the start is read as any other."""
    repo = Repo(tmp_path, time.time())
    repo.widen()
    repo.commit("widen", at=repo.now - HOUR)
    for depth, since, code in (("1", "1d", 1), ("2", "3h", 0)):
        clone = tmp_path / f"clone-{depth}"
        subprocess.run(["git", "clone", "-q", "--depth", depth, repo.top.as_uri(), str(clone)], check=True, timeout=60)
        argv = ["report", "--since", since, "--policy-repo", str(clone / "sub" / "policy"), "--no-audit"]
        assert main([*argv, "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path / "r.json")]) == code
    assert "a shallow clone, its history cut after the window opened" in capsys.readouterr().err


def test_a_link_planted_at_an_output_name_is_replaced_not_written_through(tmp_path: Path) -> None:
    """`--out` wrote with `write_text`, which follows a symbolic link: in a directory others can write (a
    shared /tmp/evidence), a link named access.csv or report.html made the auditor overwrite its target."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "evidence"
    out.mkdir()
    (out / "access.csv").symlink_to(victim)
    (out / "report.html").symlink_to(victim)
    common = ["report", "--since", "1d", "--no-audit", "--state-dir", str(tmp_path / "state")]
    assert main([*common, "--format", "csv", "--out", str(out)]) == 0
    assert main([*common, "--format", "html", "--out", str(out / "report.html")]) == 0
    assert victim.read_text() == "precious\n"
    assert not (out / "access.csv").is_symlink() and not (out / "report.html").is_symlink()
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_the_figures_match_an_independent_count_of_the_audit_rows(tmp_path: Path) -> None:
    """Every figure the audit sections print, recounted row by row from the store with plain SQL."""
    from tests.support.report_data import fixture

    now = 1_790_000_000.0
    data = fixture(tmp_path, now)
    since, until = now - 30 * 86_400, now
    out = tmp_path / "r.json"
    window = ["--since", _iso(since), "--until", _iso(until), "--policy-repo", str(data.repo)]
    assert main(["report", *window, "--state-dir", str(data.state_dir), "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    conn = sqlite3.connect(data.state_dir / DB_NAME)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit WHERE time >= ? AND time < ?", (since, until))]
    conn.close()
    summary = document["summary"]
    assert summary["requests"] == len(rows) == 40
    assert summary["denied"] == sum(r["decision"] == "denied" for r in rows)
    assert summary["jobs_seen"] == len({r["job_id"] for r in rows if r["job_id"] is not None})
    jobs = {
        (r["project_path"], r["job_id"], r["issuer"]): (r["requests"], r["allowed"], r["denied"])
        for r in document["sections"]["jobs"]["rows"]
    }
    for (project, job, issuer), (requests, allowed, denied) in jobs.items():
        mine = [r for r in rows if (r["project_path"], r["job_id"], r["issuer"]) == (project, job, issuer)]
        assert (requests, allowed, denied) == (
            len(mine),
            sum(r["decision"] == "allowed" for r in mine),
            sum(r["decision"] == "denied" for r in mine),
        )
    assert sum(v[0] for v in jobs.values()) == len(rows)
    denials = document["sections"]["denials"]["rows"]
    assert sum(d["requests"] for d in denials) == summary["denied"]
    (revoked,) = document["sections"]["revocations"]["rows"]
    assert revoked["refused_requests"] == sum(
        r["policy"] == "revoked-jobs" and r["job_id"] == revoked["job_id"] for r in rows
    )


def test_a_commit_dated_in_the_future_is_the_version_in_force_at_the_end(tmp_path: Path) -> None:
    """With --until at now (the default), a head dated 2099 was after the window: left out, and *who could
    reach what at the end* was the version before it, while serve applied it. The branch was read now, so its
    head was in force now, whatever date it claims; it is marked."""
    repo = Repo(tmp_path, time.time())
    base = repo.git("rev-parse", "HEAD")
    repo.widen()
    future = repo.commit("from the future", at=4_070_908_800)  # 2099
    document = report(repo, tmp_path, "--since", "1h")
    rows = versions(document)
    assert [(r["commit"], r["in_force"]) for r in rows] == [
        (base, "at window start"),
        (future, f"from this commit; {OUT_OF_ORDER}"),
    ]
    reports = [r for r in document["sections"]["access"]["rows"] if r["backend"] == "reports-api"]
    assert reports[0]["allows"] == ["GET, HEAD, DELETE /**"]
    past = versions(report(repo, tmp_path, "--since", "2h", "--until", "1h"))  # a window before the push
    assert [(r["commit"], r["in_force"]) for r in past] == [(base, "at window start")]


def test_select_of_no_commit() -> None:
    assert select([], 0.0, 1.0, 5, now=1.0) == History(None, (), 0, ())


def test_a_history_past_the_listing_bound_is_refused_not_reported_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The branch is listed up to a bound; past it, with no version before the window listed, the oldest one
    listed passed for the policy's beginning ('compared with nothing')."""
    import controlplane.sources.policy_history as policy_history

    repo = Repo(tmp_path, time.time())
    repo.widen()
    repo.commit("widen", at=repo.now - HOUR)
    monkeypatch.setattr(policy_history, "MAX_GIT_COMMITS", 2)
    argv = ["report", "--since", "1d", "--policy-repo", str(repo.policy), "--no-audit", "--state-dir", str(tmp_path)]
    assert main(argv) == 1
    assert "more than 2 policy commits after the window opened" in capsys.readouterr().err
    assert main([*argv[:2], "2h", *argv[3:], "--out", str(tmp_path / "r.json")]) == 0  # the start is listed


def test_visible_keeps_every_character_a_reader_sees() -> None:
    from controlplane.audit.report_render import visible

    assert visible("Zoë Müller, 日本語, ação, €5\nnext line") == "Zoë Müller, 日本語, ação, €5\nnext line"
    assert visible("a\u202eb\u2066c\u200bd\x00e\ud800f") == "a<U+202E>b<U+2066>c<U+200B>d<U+0000>e<U+D800>f"
