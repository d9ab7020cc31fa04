"""The policy's versions from a local git checkout: which commits changed it in a time window, and each one's tree.

`controlplane report` names the policy versions in force and who changed them. A version in force is a state
of the branch the control plane follows, so the history is read along first parents (`--first-parent`): on a
merge-request workflow each merge into the default branch is one version (its author is whoever made the merge
commit; the merged commits were never in force on their own). Only commits touching the policy directory
count (`-- .`, run in it), so a policy kept in a subdirectory of a bigger repository works.

Times are committer times (when the commit entered the branch's history, as `git log --since` filters),
Unix seconds. git is run with a timeout and no pager; its output is read as UTF-8 with replacements.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

GIT_TIMEOUT = 60.0
_SEPARATOR = "\x1f"
_FORMAT = _SEPARATOR.join(("%H", "%an", "%ae", "%cn", "%ct", "%s"))


class GitError(Exception):
    """git failed or the directory is not in a git work tree; the message is git's last line."""


class Commit(NamedTuple):
    sha: str
    author: str
    email: str
    committer: str
    time: float  # committer time
    subject: str  # the message's first line


class History(NamedTuple):
    in_force_at_start: Commit | None  # the last commit before the window (None: the policy did not exist yet)
    commits: tuple[Commit, ...]  # in the window, oldest first, at most `limit`
    more: int  # commits in the window left out (the oldest are kept: versions are compared in order)


def _git(directory: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "--no-pager", "-C", str(directory), *args],
            capture_output=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GitError(f"git: {error}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(lines[-1] if lines else f"git exited {done.returncode}")
    return done.stdout.decode(errors="replace")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _parse(text: str) -> list[Commit]:
    commits = []
    for line in text.splitlines():
        parts = line.split(_SEPARATOR)
        if len(parts) == 6:
            sha, author, email, committer, when, subject = parts
            commits.append(Commit(sha, author, email, committer, float(when), subject))
    return commits


def history(directory: Path, since: float, until: float, limit: int) -> History:
    """The commits touching `directory` on HEAD's first-parent line, committed in `[since, until)`."""
    base = ("log", "--first-parent", f"--format={_FORMAT}")
    window = _parse(_git(directory, *base, f"--since={_iso(since)}", f"--until={_iso(until)}", "HEAD", "--", "."))
    window = [c for c in window if since <= c.time < until]  # git's date filters are inclusive and heuristic
    window.reverse()
    before = _parse(_git(directory, *base, "-n", "1", f"--until={_iso(since)}", "HEAD", "--", "."))
    start = next((c for c in before if c.time < since), None)
    return History(start, tuple(window[:limit]), max(0, len(window) - limit))


@contextmanager
def tree_at(directory: Path, sha: str) -> Iterator[Path]:
    """The policy directory as it was at commit `sha`, extracted into a temporary directory.

    Run from the repository's top with the directory's path in it: run inside a subdirectory, `git archive`
    takes only the part of the tree under that subdirectory's name (its own relative paths apply twice)."""
    top = _git(directory, "rev-parse", "--show-toplevel").strip()
    prefix = _git(directory, "rev-parse", "--show-prefix").strip()
    treeish = f"{sha}:{prefix}" if prefix else f"{sha}^{{tree}}"
    try:
        done = subprocess.run(
            ["git", "-C", top, "archive", "--format=tar", treeish],
            capture_output=True,
            timeout=GIT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GitError(f"git archive: {error}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(lines[-1] if lines else "git archive failed")
    with tempfile.TemporaryDirectory(prefix="controlplane-report-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
            archive.extractall(tmp, filter="data")
        yield Path(tmp)
