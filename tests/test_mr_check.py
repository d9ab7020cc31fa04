"""The merge-request component, run as GitLab would run it: its YAML checked, its inputs substituted, its script
lines run by bash with an MR pipeline's predefined variables, in a real git checkout of a policy repository with
a base and a head commit, against the fake GitLab.

What a reviewer sees is checked in GitLab's documented shapes: the code-quality report (a JSON array of issues
with description, check_name, fingerprint, severity, location.path and location.lines.begin) names the file from
the repository root and the error's line; the MR note carries the access diff and is updated, not duplicated, by
the next push; the job's exit status is the policy's verdict.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controlplane.cli.merge_request import MARKER, codequality_report
from controlplane.model.errors import PolicyError
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_repo import GRANT, REPORTS_READ, commit, git, init_main, live_issuer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "templates" / "policy-check.yml"
EXAMPLE = ROOT / "examples" / "quickstart"
INPUT = re.compile(r"\$\[\[\s*inputs\.([A-Za-z0-9_-]+)\s*\]\]")
IMAGE = "controlplane-ci:test"
PROJECT_ID = 4242

# GitLab's code-quality report: what its documentation requires of each issue.
CODEQUALITY_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["description", "check_name", "fingerprint", "severity", "location"],
        "properties": {
            "description": {"type": "string", "minLength": 1},
            "check_name": {"type": "string", "minLength": 1},
            "fingerprint": {"type": "string", "minLength": 1},
            "severity": {"enum": ["info", "minor", "major", "critical", "blocker"]},
            "location": {
                "type": "object",
                "required": ["path", "lines"],
                "properties": {
                    "path": {"type": "string", "pattern": r"^[^/]"},  # relative to the repository root
                    "lines": {
                        "type": "object",
                        "required": ["begin"],
                        "properties": {"begin": {"type": "integer", "minimum": 1}},
                    },
                },
            },
        },
    },
}

BROKEN = """kind: Binding
name: broken
issuer: gitlab
roles: [no-such-role]
subjects:
  - project: acme/web/frontend
"""


def _documents() -> tuple[dict[str, Any], dict[str, Any]]:
    spec, jobs = yaml.safe_load_all(TEMPLATE.read_text())
    return spec, jobs


def test_the_template_declares_its_inputs_and_runs_on_merge_request_pipelines_only() -> None:
    spec, jobs = _documents()
    inputs = spec["spec"]["inputs"]
    used = set(INPUT.findall(TEMPLATE.read_text().split("\n---\n", 1)[1]))
    assert used == set(inputs), "every interpolated input is declared, every declared input is used"
    assert "default" not in inputs["image"]  # the one input a team must give
    assert {k: v.get("default") for k, v in inputs.items() if k != "image"} == {
        "stage": "test",
        "policy_dir": ".",
        "note": True,
        "token_variable": "CONTROLPLANE_MR_TOKEN",
        "git_depth": "0",
    }
    assert inputs["note"]["type"] == "boolean"
    (job,) = jobs.values()
    assert job["rules"] == [
        {"if": '$CI_PIPELINE_SOURCE == "merge_request_event"'},
        {"if": '$CI_COMMIT_BRANCH == $CI_DEFAULT_BRANCH && $CI_PIPELINE_SOURCE == "push"'},
    ]
    assert job["artifacts"]["reports"]["codequality"] == "gl-code-quality-report.json"
    assert job["artifacts"]["paths"] == ["controlplane-access-diff.md"]
    assert job["artifacts"]["when"] == "always"
    assert job["image"]["entrypoint"] == [""]
    assert sum("controlplane " in line for line in job["script"]) == 1  # one controlplane subcommand
    assert not re.search(r"\$\[\[(?!\s*inputs\.)", TEMPLATE.read_text()), "only inputs are interpolated"


# -- running the job


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A policy repository: the quickstart policy under policy/ on main (the MR's diff base), branch `change`."""
    repo = tmp_path / "policy-repo"
    shutil.copytree(EXAMPLE, repo / "policy")
    (repo / "README.md").write_text("# policy\n")
    init_main(repo, branch="change")
    return repo


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    """`controlplane` on PATH, running this worktree's code (as the component's image provides it)."""
    path = tmp_path / "bin"
    path.mkdir()
    wrapper = path / "controlplane"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m controlplane "$@"\n')
    wrapper.chmod(0o755)
    return path


@pytest.fixture
def fake() -> Iterator[FakeGitLab]:
    with FakeGitLab() as server:
        server.add_project(
            "platform/policy", id=PROJECT_ID, branches=["change"], files={"policy/issuer.yaml": "kind: Issuer\n"}
        )
        yield server


def _job(inputs: Mapping[str, object]) -> dict[str, Any]:
    """The job as GitLab expands it: declared defaults, then the given inputs, interpolated into the text."""
    spec, _ = _documents()
    values = {k: v.get("default") for k, v in spec["spec"]["inputs"].items()}
    values.update(inputs)
    body = TEMPLATE.read_text().split("\n---\n", 1)[1]

    def value(match: re.Match[str]) -> str:
        got = values[match.group(1)]
        return str(got).lower() if isinstance(got, bool) else str(got)

    (job,) = yaml.safe_load(INPUT.sub(value, body)).values()
    assert isinstance(job, dict)
    return job


def _run(
    repo: Path,
    bin_dir: Path,
    fake: FakeGitLab,
    *,
    iid: int,
    token: bool = True,
    extra: Mapping[str, str] | None = None,
    **inputs: object,
) -> subprocess.CompletedProcess[str]:
    """The job's script in one bash, errexit on as GitLab's runner runs it, with the MR pipeline's variables."""
    job = _job({"image": IMAGE, "policy_dir": "policy", **inputs})
    head = git(repo, "rev-parse", "HEAD")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(repo.parent),
        "CI": "true",
        "GITLAB_CI": "true",
        "CI_PIPELINE_SOURCE": "merge_request_event",
        "CI_MERGE_REQUEST_IID": str(iid),
        "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "main",
        "CI_MERGE_REQUEST_SOURCE_BRANCH_NAME": "change",
        "CI_PROJECT_ID": str(PROJECT_ID),
        "CI_PROJECT_DIR": str(repo),
        "CI_SERVER_URL": fake.base_url,
        "CI_API_V4_URL": fake.base_url + "/api/v4",
        "CI_COMMIT_SHA": head,
        "CI_COMMIT_SHORT_SHA": head[:8],
        "CI_PIPELINE_URL": f"{fake.base_url}/platform/policy/-/pipelines/7",
        "CI_JOB_TOKEN": "job-token-that-cannot-write-notes",
        **{k: str(v) for k, v in job["variables"].items()},
    }
    if token:
        env["CONTROLPLANE_MR_TOKEN"] = fake.api_token
    env.update(extra or {})
    if "CI_MERGE_REQUEST_DIFF_BASE_SHA" not in env:  # where the target branch was when the MR branched off
        env["CI_MERGE_REQUEST_DIFF_BASE_SHA"] = git(repo, "merge-base", "main", "HEAD")
    script = "set -eo pipefail\n" + "\n".join(job["script"])
    return subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def _report(repo: Path) -> list[dict[str, Any]]:
    report = json.loads((repo / "gl-code-quality-report.json").read_text())
    jsonschema.validate(report, CODEQUALITY_SCHEMA)
    assert isinstance(report, list)
    return report


def test_a_clean_merge_request_passes_and_its_note_shows_the_access_diff_updated_on_each_push(
    repo: Path, bin_dir: Path, fake: FakeGitLab
) -> None:
    iid = fake.add_merge_request("platform/policy", "change")
    commit(repo, "frontend reads reports", {"policy/grant.yaml": GRANT})

    first = _run(repo, bin_dir, fake, iid=iid)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _report(repo) == []
    (note,) = fake.notes("platform/policy", iid)
    assert note["body"].startswith(MARKER)
    assert "**Valid policy.**" in note["body"]
    assert "```diff" in note["body"]
    assert "backend reports-api" in note["body"]
    gain = next(line for line in note["body"].splitlines() if line.startswith("+ "))
    assert "project_id = 43 and ref_protected = true" in gain and "gains GET, HEAD /**" in gain
    assert (repo / "controlplane-access-diff.md").read_text() == note["body"]
    assert "note" in first.stdout and "created" in first.stdout
    assert fake.api_token not in first.stdout + first.stderr

    # The next push: the same note is updated, nothing added; a reviewer's note is left alone.
    fake.add_note("platform/policy", iid, "why does frontend need this?")
    commit(repo, "not after all", {"policy/grant.yaml": None})
    second = _run(repo, bin_dir, fake, iid=iid)
    assert second.returncode == 0, second.stdout + second.stderr
    notes = fake.notes("platform/policy", iid)
    assert [n["id"] for n in notes] == [note["id"], notes[1]["id"]]
    assert notes[1]["body"] == "why does frontend need this?"
    assert notes[0]["body"].startswith(MARKER) and "None: access unchanged" in notes[0]["body"]
    assert "updated" in second.stdout
    assert len(fake.api_calls("/projects/:id/merge_requests/:iid/notes", method="POST")) == 1
    assert len(fake.api_calls("/projects/:id/merge_requests/:iid/notes/:note_id", method="PUT")) == 1


def test_a_broken_merge_request_fails_with_its_errors_at_their_file_and_line(
    repo: Path, bin_dir: Path, fake: FakeGitLab
) -> None:
    iid = fake.add_merge_request("platform/policy", "change")
    commit(repo, "broken", {"policy/broken.yaml": BROKEN})

    done = _run(repo, bin_dir, fake, iid=iid)
    assert done.returncode == 1, done.stdout + done.stderr
    (issue,) = _report(repo)
    assert issue["location"] == {"path": "policy/broken.yaml", "lines": {"begin": 4}}
    assert issue["description"] == "roles[0]: no Role named 'no-such-role'"
    assert (issue["severity"], issue["check_name"]) == ("major", "controlplane/policy-error")
    (note,) = fake.notes("platform/policy", iid)
    assert "Invalid policy: 1 error(s)" in note["body"]
    assert "broken.yaml:4: roles[0]: no Role named 'no-such-role'" in note["body"]

    # Fixing something above it moves the error down a line: the same issue for GitLab (same fingerprint).
    commit(repo, "comment", {"policy/broken.yaml": "# still broken\n" + BROKEN})
    assert _run(repo, bin_dir, fake, iid=iid).returncode == 1
    (moved,) = _report(repo)
    assert moved["location"]["lines"]["begin"] == 5
    assert moved["fingerprint"] == issue["fingerprint"]
    assert len(fake.notes("platform/policy", iid)) == 1


def test_without_a_token_the_note_is_skipped_and_the_artifacts_still_written(
    repo: Path, bin_dir: Path, fake: FakeGitLab
) -> None:
    iid = fake.add_merge_request("platform/policy", "change")
    done = _run(repo, bin_dir, fake, iid=iid, token=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MR note skipped" in done.stdout and "CONTROLPLANE_MR_TOKEN" in done.stdout
    assert "job-token-that-cannot-write-notes" not in done.stdout + done.stderr
    assert fake.notes("platform/policy", iid) == []
    assert (repo / "controlplane-access-diff.md").read_text().startswith(MARKER)
    assert _report(repo) == []


def test_the_note_input_turns_the_note_off(repo: Path, bin_dir: Path, fake: FakeGitLab) -> None:
    iid = fake.add_merge_request("platform/policy", "change")
    done = _run(repo, bin_dir, fake, iid=iid, note=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MR note off" in done.stdout
    assert fake.notes("platform/policy", iid) == []


def test_a_gitlab_failure_on_the_note_is_reported_and_leaves_the_verdict_alone(
    repo: Path, bin_dir: Path, fake: FakeGitLab
) -> None:
    iid = fake.add_merge_request("platform/policy", "change")
    commit(repo, "broken", {"policy/broken.yaml": BROKEN})
    fake.set_down()
    done = _run(repo, bin_dir, fake, iid=iid)
    assert done.returncode == 1  # the policy's verdict, not the note's
    assert "MR note not posted" in done.stdout
    fake.set_down(False)
    assert len(_report(repo)) == 1


def test_fingerprints_are_unique_for_the_same_problem_twice_in_a_file() -> None:
    errors = [PolicyError("a.yaml", 3, "x", "bad"), PolicyError("a.yaml", 9, "x", "bad")]
    report = codequality_report(errors, [PolicyError("b.yaml", 1, "", "odd")], "policy")
    assert len({i["fingerprint"] for i in report}) == 3
    assert [i["location"]["path"] for i in report] == ["policy/a.yaml", "policy/a.yaml", "policy/b.yaml"]
    assert report[2]["severity"] == "minor"
    root = codequality_report([PolicyError("/abs/policy", 0, "", "no policy files")], [], "policy")
    assert root[0]["location"] == {"path": "policy", "lines": {"begin": 1}}
    jsonschema.validate(report + root, CODEQUALITY_SCHEMA)


def test_a_token_in_a_file_variable_is_read_from_the_file(repo: Path, bin_dir: Path, fake: FakeGitLab) -> None:
    """A CI/CD variable of type File holds the path of a file with the value: the token is read from it."""
    iid = fake.add_merge_request("platform/policy", "change")
    token_file = repo.parent / "token"
    token_file.write_text(fake.api_token + "\n")
    done = _run(
        repo,
        bin_dir,
        fake,
        iid=iid,
        token=False,
        token_variable="MR_TOKEN_FILE",
        extra={"MR_TOKEN_FILE": str(token_file)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "created" in done.stdout
    assert len(fake.notes("platform/policy", iid)) == 1
    assert fake.api_token not in done.stdout + done.stderr


def test_a_policy_at_the_repository_root_and_one_outside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane.cli.main import main

    shutil.copytree(EXAMPLE, tmp_path / "repo")
    (tmp_path / "repo" / "broken.yaml").write_text(BROKEN)
    monkeypatch.chdir(tmp_path / "repo")
    for name in ("CI_MERGE_REQUEST_IID", "CI_MERGE_REQUEST_DIFF_BASE_SHA"):
        monkeypatch.delenv(name, raising=False)
    assert main(["mr-check", ".", "--no-note"]) == 1
    (issue,) = json.loads((tmp_path / "repo" / "gl-code-quality-report.json").read_text())
    assert issue["location"] == {"path": "broken.yaml", "lines": {"begin": 4}}
    assert (
        "no access diff: the head's policy is invalid"
        in (tmp_path / "repo" / "controlplane-access-diff.md").read_text()
    )
    assert main(["mr-check", "../elsewhere", "--no-note"]) == 2


def test_on_the_default_branch_it_validates_only(repo: Path, bin_dir: Path, fake: FakeGitLab) -> None:
    """The default branch's pipeline (no MR, no diff base): the report GitLab compares MRs with, and the verdict."""
    git(repo, "checkout", "-q", "main")
    done = _run(
        repo,
        bin_dir,
        fake,
        iid=0,
        extra={"CI_PIPELINE_SOURCE": "push", "CI_MERGE_REQUEST_IID": "", "CI_MERGE_REQUEST_DIFF_BASE_SHA": ""},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not a merge-request pipeline" in done.stdout
    assert "no access diff: no base revision" in done.stdout
    assert _report(repo) == []
    assert fake.api_calls("/projects/:id/merge_requests/:iid/notes") == []


@pytest.mark.parametrize("by_sha", [True, False], ids=["sha-served", "sha-refused"])
def test_a_shallow_clone_fetches_the_diff_base(
    repo: Path, bin_dir: Path, fake: FakeGitLab, tmp_path: Path, by_sha: bool
) -> None:
    """GIT_DEPTH=1: the checkout holds the head alone; the script fetches the base commit by its sha or, from a
    server that refuses unadvertised shas, the target branch, and the access diff is computed."""
    iid = fake.add_merge_request("platform/policy", "change")
    commit(repo, "frontend reads reports", {"policy/grant.yaml": GRANT})
    base = git(repo, "merge-base", "main", "HEAD")
    git(repo, "checkout", "-q", "main")  # the target branch moves on: the base is no branch's tip any more
    (repo / "README.md").write_text("# policy, elsewhere\n")
    git(repo, "commit", "-q", "-am", "meanwhile on main")
    git(repo, "checkout", "-q", "change")
    clone = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth=1", "--branch", "change", f"file://{repo}", str(clone))
    if not by_sha:  # git's protocol v2 serves any reachable sha; v0 without allowAnySHA1InWant refuses it
        git(repo, "config", "uploadpack.allowAnySHA1InWant", "false")
        git(clone, "config", "protocol.version", "0")
        with pytest.raises(subprocess.CalledProcessError):
            git(clone, "fetch", "-q", "--depth=1", "origin", base)
    with pytest.raises(subprocess.CalledProcessError):
        git(clone, "cat-file", "-e", f"{base}^{{commit}}")
    done = _run(clone, bin_dir, fake, iid=iid, git_depth="1", extra={"CI_MERGE_REQUEST_DIFF_BASE_SHA": base})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "access changes against" in done.stdout and "not fetched" not in done.stdout
    (note,) = fake.notes("platform/policy", iid)
    assert "gains GET, HEAD /**" in note["body"]


def test_a_merged_results_pipeline_diffs_against_the_target_branchs_head(
    repo: Path, bin_dir: Path, fake: FakeGitLab
) -> None:
    """The checkout is the MR merged into the target's head: what the target gained meanwhile is not the MR's."""
    iid = fake.add_merge_request("platform/policy", "change")
    commit(repo, "frontend reads reports", {"policy/grant.yaml": GRANT})
    base = git(repo, "merge-base", "main", "HEAD")
    git(repo, "checkout", "-q", "main")
    other = GRANT.replace("frontend-reads-reports", "deployer-reads-too").replace(
        "acme/web/frontend", "acme/platform/deployer"
    )
    (repo / "policy" / "meanwhile.yaml").write_text(other.replace("ref_protected: true", "ref_protected: false"))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "meanwhile on main")
    target = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach", "main")
    git(repo, "merge", "-q", "--no-edit", "change")  # the merged result GitLab builds
    done = _run(
        repo,
        bin_dir,
        fake,
        iid=iid,
        extra={"CI_MERGE_REQUEST_DIFF_BASE_SHA": base, "CI_MERGE_REQUEST_TARGET_BRANCH_SHA": target},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (note,) = fake.notes("platform/policy", iid)
    gains = [line for line in note["body"].splitlines() if line.startswith("+ ")]
    assert len(gains) == 1 and "project_id = 43" in gains[0], note["body"]  # the frontend's, not main's own


def test_nothing_the_policy_writes_can_end_the_notes_code_block() -> None:
    from controlplane.cli.merge_request import Outcome, note_body

    outcome = Outcome([], 0, [], ["backend b", "  + claim x = ```evil gains GET /"], True, "access changes against abc")
    body = note_body(outcome, {})
    assert body.count("```") == 2  # the fence opened and the one closed
    assert "+ claim x = '''evil gains GET /" in body


GATEWAY = """kind: Gateway
name: gw
listen: {address: 127.0.0.1, port: 10000}
backends: [reports-api]
"""


@pytest.mark.parametrize("token", [True, False], ids=["read-token", "no-read-token"])
def test_an_api_issuers_paths_are_resolved_through_gitlab_when_its_token_is_in_the_job(
    tmp_path: Path, bin_dir: Path, fake: FakeGitLab, token: bool
) -> None:
    """Paths under an `api:` issuer need GitLab: read with the issuer's own token variable when the job has it;
    without it the issuer is judged offline (paths are errors there) and the note says why."""
    frontend = fake.add_project("acme/web/frontend", branches=["main"], protected=["main"])
    repo = tmp_path / "live-repo"
    (repo / "policy").mkdir(parents=True)
    (repo / "policy" / "policy.yaml").write_text("---\n".join([live_issuer(fake.base_url), REPORTS_READ, GATEWAY]))
    init_main(repo, branch="change")
    commit(repo, "frontend reads reports", {"policy/grant.yaml": GRANT})
    iid = fake.add_merge_request("platform/policy", "change")
    extra = {"POLICY_READ_TOKEN": fake.api_token} if token else {}
    done = _run(repo, bin_dir, fake, iid=iid, extra=extra)
    (note,) = fake.notes("platform/policy", iid)
    if token:
        assert done.returncode == 0, done.stdout + done.stderr
        gain = next(line for line in note["body"].splitlines() if line.startswith("+ "))
        assert f"project_id = {frontend}" in gain and "gains GET /**" in gain
        assert fake.api_calls("/projects/:id/repository/branches")  # the refs and protections, read live
    else:
        assert done.returncode == 1
        assert "judged without GitLab" in done.stdout and "POLICY_READ_TOKEN" in note["body"]
        (issue,) = _report(repo)
        assert issue["location"]["path"] == "policy/grant.yaml"
    assert fake.api_token not in done.stdout + done.stderr
