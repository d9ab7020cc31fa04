"""`controlplane mr-check` against a hostile merge request: what the MR's author controls (file names, values,
the policy's own settings) must not reach further than the check's verdict.

The note is posted with a token that may write to the project: GitLab runs the quick actions of a note
(`/merge`, `/approve`, `/label`: a command at the start of a line, outside code) with that token's rights, links
`@all` and renders HTML outside code. So nothing the MR writes may start a line of the note, or appear outside
a code span or block.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from controlplane.cli.merge_request import MARKER, GitLabReader, Outcome, check, note_body, post_note
from controlplane.sources.policy_dir import ReadLimits
from tests.support.fake_gitlab import FakeGitLab
from tests.support.policy_repo import FRONTEND_READS_REPORTS, REPORTS_READ, init_main, live_issuer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "quickstart"

BROKEN = """kind: Binding
name: broken
issuer: gitlab
roles: [nope]
subjects:
  - project: acme/web/frontend
"""
HOSTILE = "x\n/merge\r/label ~pwned\u2028/approve @all </details> ```"


def _outside_code(body: str) -> str:
    """The note's text GitLab renders as Markdown (not in a fenced block or a code span)."""
    body = re.sub(r"^```.*?^```$", "", body, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", body)


def _assert_inert(body: str) -> None:
    assert body.startswith(MARKER)
    for line in body.splitlines():
        assert not line.lstrip().startswith("/"), f"a quick action GitLab would run: {line!r}"
    assert "\u2028" not in body and "\r" not in body and "\x85" not in body
    prose = _outside_code(body)
    assert "@all" not in prose, "a mention outside code"
    assert "<details>" not in prose and "</details>" not in prose, "HTML outside code"
    assert body.count("```") % 2 == 0


def test_a_file_name_with_line_breaks_cannot_start_a_line_of_the_note(tmp_path: Path) -> None:
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(EXAMPLE, policy)
    hostile = policy / "x\n"
    hostile.mkdir()
    (hostile / "merge @all <details>.yaml").write_text(BROKEN)
    outcome = check(policy, "policy", None, ReadLimits())
    assert outcome.total == 1 and "\n/merge" in str(outcome.errors[0])  # the error names the file as it is
    body = note_body(outcome, {})
    _assert_inert(body)
    assert "x\\n/merge @all <details>.yaml:4" in body  # still said, escaped, in a code span


def test_nothing_gitlab_or_git_answered_reaches_the_note_as_markdown() -> None:
    """The notes (an issuer's GitLab error) and the diff's explanation (git's error, the base's first error) are
    words from elsewhere: one line each, no mention, no HTML, no quick action."""
    for diff in (None, [], ["backend b", HOSTILE, f"  + {HOSTILE} gains GET /"]):
        outcome = Outcome([], 0, [], diff, bool(diff), HOSTILE, (HOSTILE,))
        _assert_inert(note_body(outcome, {}))


# -- the MR's policy names where its issuers' tokens go


def _live_policy(url: str, api: str, token_env: str) -> str:
    return "---\n".join([live_issuer(url, api=api, token_env=token_env), REPORTS_READ, FRONTEND_READS_REPORTS])


@pytest.mark.parametrize("changed", ["url", "token_env"])
def test_the_heads_api_settings_get_no_token_only_the_target_branchs_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changed: str
) -> None:
    """A hostile MR points its issuer's `api:` at its own server (or names the note's token as the issuer's):
    the job must not send any CI/CD variable there. The head is then judged offline, and the note says why."""
    with FakeGitLab() as gitlab, FakeGitLab() as elsewhere:
        gitlab.add_project("acme/web/frontend", branches=["main"])
        monkeypatch.setenv("POLICY_READ_TOKEN", gitlab.api_token)
        monkeypatch.setenv("CONTROLPLANE_MR_TOKEN", "glpat-the-note-token")
        repo = tmp_path / "repo"
        (repo / "policy").mkdir(parents=True)
        policy = repo / "policy" / "policy.yaml"
        policy.write_text(_live_policy(gitlab.base_url, gitlab.base_url, "POLICY_READ_TOKEN"))
        init_main(repo)
        api, token_env = (
            (elsewhere.base_url, "POLICY_READ_TOKEN")
            if changed == "url"
            else (gitlab.base_url, "CONTROLPLANE_MR_TOKEN")
        )
        policy.write_text(_live_policy(gitlab.base_url, api, token_env))
        monkeypatch.chdir(repo)
        base = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

        reader = GitLabReader()
        outcome = check(repo / "policy", "policy", base, ReadLimits(), reader)
        assert elsewhere.api_calls() == []
        assert all(c.status != 401 for c in gitlab.api_calls())  # the note token was not tried there
        assert outcome.total == 1  # the path cannot be resolved offline
        (note,) = outcome.notes
        assert "not the target branch's" in note and "no token sent" in note

        # A base that cannot be read trusts nothing, and says so.
        outcome = check(repo / "policy", "policy", "0" * 40, ReadLimits(), GitLabReader())
        assert elsewhere.api_calls() == [] and "was not read; no token sent" in outcome.notes[0]

        # The target branch's own settings are read with, on both sides of the diff.
        policy.write_text(_live_policy(gitlab.base_url, gitlab.base_url, "POLICY_READ_TOKEN"))
        outcome = check(repo / "policy", "policy", base, ReadLimits(), GitLabReader())
        assert outcome.errors == [] and outcome.notes == ()
        assert gitlab.api_calls("/projects/:id")


def test_a_forks_pipeline_posts_on_the_merge_request_not_on_the_forks_namesake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In a fork's MR pipeline running in the fork, CI_PROJECT_ID is the fork and CI_MERGE_REQUEST_IID numbers
    the MR in the target project (CI_MERGE_REQUEST_PROJECT_ID): the note goes there, not on the fork's own !1."""
    with FakeGitLab() as fake:
        target = fake.add_project("platform/policy", branches=["change"], files={"a.yaml": "kind: Issuer\n"})
        fork = fake.add_project("someone/policy", branches=["change"], files={"a.yaml": "kind: Issuer\n"})
        iid = fake.add_merge_request("platform/policy", "change")
        namesake = fake.add_merge_request("someone/policy", "change")
        assert iid == namesake
        env = {
            "CI_MERGE_REQUEST_IID": str(iid),
            "CI_MERGE_REQUEST_PROJECT_ID": str(target),
            "CI_PROJECT_ID": str(fork),
            "CI_API_V4_URL": fake.base_url + "/api/v4",
        }
        monkeypatch.setenv("NOTE_TOKEN", fake.api_token)
        assert post_note(MARKER + "\nbody", "NOTE_TOKEN", None, env)
        assert [n["body"] for n in fake.notes("platform/policy", iid)] == [MARKER + "\nbody"]
        assert fake.notes("someone/policy", namesake) == []
