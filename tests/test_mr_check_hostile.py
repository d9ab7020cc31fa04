"""`controlplane mr-check` against a hostile merge request: what the MR's author controls (file names, values,
the policy's own settings) must not reach further than the check's verdict.

The note is posted with a token that may write to the project: GitLab runs the quick actions of a note
(`/merge`, `/approve`, `/label`: a command at the start of a line, outside code) with that token's rights, links
`@all` and renders HTML outside code. So nothing the MR writes may start a line of the note, or appear outside
a code span or block.
"""

from __future__ import annotations

import re
from pathlib import Path

from controlplane.cli.merge_request import MARKER, Outcome, check, note_body
from controlplane.sources.policy_dir import ReadLimits

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
