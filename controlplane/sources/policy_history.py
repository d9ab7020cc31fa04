"""The policy's versions from a local git checkout: which commits changed it in a time window, and each one's tree.

`controlplane report` names the policy versions in force and who changed them. A version in force is a state
of the branch the control plane follows, so the history is read along first parents (`--first-parent`): on a
merge-request workflow each merge into the default branch is one version (its author is whoever made the merge
commit; the merged commits were never in force on their own). Only commits touching the policy directory
count (`-- .`, run in it), so a policy kept in a subdirectory of a bigger repository works.

Times are committer times (when the commit entered the branch's history, as `git log --since` filters),
Unix seconds. git is run with a timeout and no pager; its output is read as UTF-8 with replacements.

The same history can come from GitLab (`gitlab_history`) when the policy lives in a project `serve
--policy-project` watches: the commits API on the default branch (`first_parent`, `since`, `until`), and each
commit's tree through `PolicyRepo.read_tree`, the reader serve itself uses; no clone.
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
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from controlplane.sources.gitlab_repo import GitLabClient

GIT_TIMEOUT = 60.0
MAX_API_COMMITS = 10_000  # commits listed from GitLab for one window at most (metadata only: a page is 100)
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
    commits: tuple[Commit, ...]  # in the window, oldest first, at most `limit`: the newest ones
    more: int  # earlier commits in the window left out (the newest are kept: the last is in force at the end)


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
    return History(start, tuple(window[-limit:]), max(0, len(window) - limit))


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


def _api_commit(entry: dict[str, Any]) -> Commit:
    """A commit as GitLab's commits API gives it (`committed_date` ISO 8601 with an offset)."""
    when = datetime.fromisoformat(str(entry["committed_date"]).replace("Z", "+00:00")).timestamp()
    return Commit(
        str(entry["id"]),
        str(entry.get("author_name") or ""),
        str(entry.get("author_email") or ""),
        str(entry.get("committer_name") or ""),
        when,
        str(entry.get("title") or ""),
    )


def gitlab_history(client: GitLabClient, project: str | int, since: float, until: float, limit: int) -> History:
    """`history` from a GitLab project's default branch, through its commits API. GitLab's errors are raised as
    the client raises them (`GitLabUnavailable`); a project without a default branch is a `GitError`."""
    with client.errors_as_unavailable():
        handle = client.gl.projects.get(project)
        branch = handle.attributes.get("default_branch")
        if not branch:
            raise GitError(f"GitLab project {project} has no default branch (empty repository?)")
        common = {"ref_name": branch, "first_parent": True}
        window: list[Commit] = []
        listed = handle.commits.list(since=_iso(since), until=_iso(until), iterator=True, per_page=100, **common)
        for entry in listed:
            window.append(_api_commit(entry.attributes))
            if len(window) >= MAX_API_COMMITS:
                break
        before = handle.commits.list(until=_iso(since), per_page=1, page=1, get_all=False, **common)
        start = next((c for c in (_api_commit(e.attributes) for e in before) if c.time < since), None)
    window = [c for c in reversed(window) if since <= c.time < until]  # the branch's order, oldest first
    return History(start, tuple(window[-limit:]), max(0, len(window) - limit))
