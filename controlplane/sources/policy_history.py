"""The policy's versions from a local git checkout: which commits changed it in a time window, and each one's tree.

`controlplane report` names the policy versions in force and who changed them. A version in force is a state
of the branch the control plane follows, so the history is read along first parents (`--first-parent`): on a
merge-request workflow each merge into the default branch is one version (its author is whoever made the merge
commit; the merged commits were never in force on their own). Only commits touching the policy directory
count (`-- .`, run in it), so a policy kept in a subdirectory of a bigger repository works.

Times are committer times (when the commit entered the branch's history, as `git log --since` filters),
Unix seconds. git is run with a timeout and no pager; its output is read as UTF-8 with replacements. Fields and
commits are separated by NUL (`-z`, `%x00`), the one byte git never prints inside a name or a subject (it stops
at it): a committer who puts any other separator in a message or a name cannot shift the fields, and a line
that does not parse is an error, never a commit silently left out of the report.

The same history can come from GitLab (`gitlab_history`) when the policy lives in a project `serve
--policy-project` watches: the commits API on the default branch (`first_parent`, `since`, `until`), and each
commit's tree through `PolicyRepo.read_tree`, the reader serve itself uses; no clone.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from controlplane.sources.gitlab_repo import GitLabClient

GIT_TIMEOUT = 60.0
MAX_GIT_COMMITS = 100_000  # policy commits read from a local branch at most (metadata only)
MAX_API_COMMITS = 10_000  # commits listed from GitLab's branch at most (metadata only: a page is 100)
MAX_NAME_CHARS = 256  # a name or an email as the report shows it, at most (git truncates, ending it with "..")
MAX_SUBJECT_CHARS = 1000  # a commit's subject, at most: a message of megabytes is the committer's, not ours
_FIELDS = (
    "%H",
    f"%<({MAX_NAME_CHARS},trunc)%an",
    f"%<({MAX_NAME_CHARS},trunc)%ae",
    f"%<({MAX_NAME_CHARS},trunc)%cn",
    "%ct",
    f"%<({MAX_SUBJECT_CHARS},trunc)%s",
)
_FORMAT = "%x00".join(_FIELDS)
_TIMES = "%H%x00%ct"  # the whole branch is listed with these only: what `select` needs


class GitError(Exception):
    """git failed or the directory is not in a git work tree; the message is git's last line."""


class TreeUnreadable(Exception):
    """One commit's policy tree cannot be read as a directory (the policy directory does not exist in it, or its
    archive holds a link or path leading out of the tree): that version did not load, the others still can."""


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
    out_of_order: tuple[str, ...] = ()  # shas dated before the commit they follow on the branch (`select`)


def _git(directory: Path, *args: str) -> str:
    return _run(["git", "--no-pager", "-C", str(directory), *args], "git").decode(errors="replace")


def _run(argv: list[str], what: str, stdout: int | IO[bytes] = subprocess.PIPE) -> bytes:
    """Run git to its end within GIT_TIMEOUT; a failure is a GitError naming git's last line of stderr."""
    try:
        done = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise GitError(f"{what}: {error}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise GitError(lines[-1] if lines else f"{what} exited {done.returncode}")
    return done.stdout or b""


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _records(text: str, width: int) -> list[list[str]]:
    """`git log -z` output with `width` fields a commit: NUL between fields and between commits."""
    fields = text.split("\0")
    if fields and fields[-1] == "":
        fields.pop()
    if len(fields) % width:
        raise GitError(f"git log printed {len(fields)} fields, not a multiple of {width}")
    return [fields[at : at + width] for at in range(0, len(fields), width)]


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GitError(f"git log printed a commit time that is not a number: {text!r}") from None


def _parse(text: str) -> list[Commit]:
    """`git log -z --format=_FORMAT`'s output (the padding `trunc` adds to short fields removed)."""
    return [
        Commit(
            sha.strip("\n"),
            author.rstrip(" "),
            email.rstrip(" "),
            committer.rstrip(" "),
            _time(when),
            subject.rstrip(" "),
        )
        for sha, author, email, committer, when, subject in _records(text, len(_FIELDS))
    ]


def history(directory: Path, since: float, until: float, limit: int, now: float | None = None) -> History:
    """The commits touching `directory` on HEAD's first-parent line, committed in `[since, until)`.

    Read without git's date filters (`--since` stops its walk at the first commit dated before the window, so a
    commit dated into the past hid every older one in the window), newest first, then chosen by `select`."""
    branch = _git(
        directory, "log", "-z", "--first-parent", f"--format={_TIMES}", f"-n{MAX_GIT_COMMITS}", "HEAD", "--", "."
    )
    listed = [Commit(sha.strip("\n"), "", "", "", _time(when), "") for sha, when in _records(branch, 2)]
    found = select(listed, since, until, limit, now)
    _refuse_cut(found, len(listed), MAX_GIT_COMMITS)
    if found.in_force_at_start is None and _git(directory, "rev-parse", "--is-shallow-repository").strip() == "true":
        # the cut would pass for the policy's beginning: the first version "compared with nothing", its changes lost
        raise GitError(
            "a shallow clone, its history cut after the window opened: the version in force then is unknown "
            "(git fetch --unshallow, or --shallow-since before the window, first)"
        )
    chosen = [c.sha for c in (found.in_force_at_start, *found.commits) if c is not None]
    if not chosen:
        return found
    full = {
        c.sha: c for c in _parse(_git(directory, "log", "-z", "--no-walk=unsorted", f"--format={_FORMAT}", *chosen))
    }
    start = found.in_force_at_start
    return found._replace(
        in_force_at_start=None if start is None else full[start.sha], commits=tuple(full[c.sha] for c in found.commits)
    )


def _refuse_cut(found: History, listed: int, bound: int) -> None:
    """A listing stopped at its bound with no version before the window: the version in force at the start is
    past the bound, and the first one listed would be 'compared with nothing' as if the policy began there."""
    if found.in_force_at_start is None and listed >= bound:
        raise GitError(f"the branch has more than {bound} policy commits after the window opened: narrow --since")


def select(listed: list[Commit], since: float, until: float, limit: int, now: float | None = None) -> History:
    """The window's versions from a branch's policy commits, newest first, the branch read at `now`.

    A commit's time is what its committer's git wrote, not when it was pushed: the branch's order is the truth.
    So every commit between the newest and the oldest one dated in the window is in it, whatever its own date
    (it entered the branch between two that are in the window), and so are the commits after the newest that
    are dated before the window's end; the version in force at the start is the one just before the oldest.
    When the window reaches `now` (the default `--until`), every commit after that start is in it: the branch
    was read then, so its head was in force, whatever date it claims (one dated 2099 was left out, and the
    access at the end was the version before it). A commit dated before the one it follows, or after `now`
    (from the start to the head) is listed in `out_of_order`: a wrong clock, or a date chosen to mislead."""
    inside = [at for at, commit in enumerate(listed) if since <= commit.time < until]
    if inside:
        start_at = inside[-1] + 1
        newest = inside[0]
        while newest > 0 and listed[newest - 1].time < until:  # after one in the window, dated before its end
            newest -= 1
    else:
        start_at = next((at for at, commit in enumerate(listed) if commit.time < since), len(listed))
        newest = start_at  # nothing dated in the window: none in it (but see `now`)
    if now is not None and until >= now:
        newest = 0
    window = listed[newest:start_at]
    start = listed[start_at] if start_at < len(listed) else None
    scope = listed[: start_at + 2]  # the start too: dated before the commit it follows
    before: list[Commit | None] = [*scope[1:], None]  # each one's predecessor on the branch (the oldest: none)
    out_of_order = tuple(
        newer.sha
        for newer, older in zip(scope, before, strict=False)
        if (older is not None and newer.time < older.time) or (now is not None and newer.time > now)
    )
    window.reverse()
    return History(start, tuple(window[-limit:]), max(0, len(window) - limit), out_of_order)


@contextmanager
def tree_at(directory: Path, sha: str, max_file_bytes: int | None = None) -> Iterator[Path]:
    """The policy directory as it was at commit `sha`, extracted into a temporary directory.

    Run from the repository's top with the directory's path in it: run inside a subdirectory, `git archive`
    takes only the part of the tree under that subdirectory's name (its own relative paths apply twice).

    The commit is the policy repository's, so anyone who can push to it shapes the archive: it is streamed to
    a temporary file (never held in memory), a file over `max_file_bytes` is left out of it (git would hold it
    in memory to write it) and made as a sparse file of its size (the policy reader refuses it by its size,
    as it would in a checkout), and a
    symbolic link is recreated as git stores it, never followed here (the reader refuses a policy file that
    links out of the tree, by name, as `serve` reading that checkout would). A path leading out of the
    directory, or a policy directory this commit does not have (removed, renamed), is `TreeUnreadable`."""
    top = _git(directory, "rev-parse", "--show-toplevel").strip()
    prefix = _git(directory, "rev-parse", "--show-prefix").strip()
    treeish = f"{sha}:{prefix}" if prefix else f"{sha}^{{tree}}"
    try:
        _git(Path(top), "cat-file", "-e", treeish)
    except GitError:
        raise TreeUnreadable(f"the policy directory {prefix or '.'} does not exist in commit {sha[:12]}") from None
    large = {} if max_file_bytes is None else _large_blobs(Path(top), treeish, max_file_bytes)
    excluded = [f":(exclude,literal){path}" for path in large]
    with tempfile.TemporaryDirectory(prefix="controlplane-report-") as tmp:
        archive_path = Path(tmp, "tree.tar")
        root = Path(tmp, "tree")
        root.mkdir()
        with archive_path.open("wb") as sink:
            argv = [*_archive(top, Path(tmp, "no-attributes")), "--format=tar", treeish, "--", ".", *excluded]
            _run(argv, "git archive", stdout=sink)
        with tarfile.open(archive_path) as archive:
            _extract(archive, root)
        archive_path.unlink()
        for path, size in large.items():
            _sparse(root, path, size)
        yield root


def _archive(top: str, empty: Path) -> list[str]:
    """`git archive` blind to the `.gitattributes` the commit holds: in the tree, `export-ignore` leaves a file
    out of the archive and `export-subst` rewrites one, so a committer could hide a binding from the report
    that a checkout (serve's policy) has. With `--worktree-attributes` git reads attributes from the work tree
    instead of the tree, and the work tree given is an empty directory; no user-wide attributes file either."""
    empty.mkdir(exist_ok=True)
    return ["git", "-C", top, "-c", "core.attributesFile=", f"--work-tree={empty}", "archive", "--worktree-attributes"]


def _large_blobs(top: Path, treeish: str, limit: int) -> dict[str, int]:
    """{path: size} of the files in the tree larger than `limit` (`git ls-tree -l`: sizes without reading)."""
    large = {}
    for entry in _git(top, "ls-tree", "-r", "-l", "-z", treeish).split("\0"):
        meta, _, path = entry.partition("\t")
        fields = meta.split()
        if len(fields) == 4 and fields[1] == "blob" and fields[3].isdigit() and int(fields[3]) > limit:
            large[path] = int(fields[3])
    return large


def _extract(archive: tarfile.TarFile, root: Path) -> None:
    for member in archive:
        try:
            checked = tarfile.data_filter(member, str(root))
        except (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError):
            _link_as_stored(member, root)  # a link out of the tree: its own path checked, then made as stored
            continue
        except tarfile.FilterError as error:
            raise TreeUnreadable(f"the commit's tree holds a path the report does not extract: {error}") from None
        archive.extract(checked, root, filter="fully_trusted", set_attrs=False)


def _sparse(root: Path, path: str, size: int) -> None:
    """A file left out of the archive for its size, made as a sparse file of that size: no disk, no memory,
    and the policy reader still refuses it by its size, naming it."""
    placeholder = tarfile.TarInfo(path)
    placeholder.size = size
    try:
        tarfile.data_filter(placeholder, str(root))
    except tarfile.FilterError as error:
        raise TreeUnreadable(f"the commit's tree holds a path the report does not extract: {error}") from None
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as sparse:
        sparse.truncate(size)


def _link_as_stored(member: tarfile.TarInfo, root: Path) -> None:
    """A symbolic link pointing out of the tree, created where the archive puts it (that place checked)."""
    try:
        tarfile.data_filter(member.replace(linkname=".", deep=False), str(root))
    except tarfile.FilterError as error:
        raise TreeUnreadable(f"the commit's tree holds a path the report does not extract: {error}") from None
    link = root / member.name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(member.linkname, link)


def _cut(text: str, limit: int) -> str:
    """As git's `%<(N,trunc)` cuts a local commit's fields: N characters at most, the last two `..`."""
    return text if len(text) <= limit else text[: limit - 2] + ".."


def _api_commit(entry: dict[str, Any]) -> Commit:
    """A commit as GitLab's commits API gives it (`committed_date` ISO 8601 with an offset)."""
    when = datetime.fromisoformat(str(entry["committed_date"]).replace("Z", "+00:00")).timestamp()
    return Commit(
        str(entry["id"]),
        _cut(str(entry.get("author_name") or ""), MAX_NAME_CHARS),
        _cut(str(entry.get("author_email") or ""), MAX_NAME_CHARS),
        _cut(str(entry.get("committer_name") or ""), MAX_NAME_CHARS),
        when,
        _cut(str(entry.get("title") or ""), MAX_SUBJECT_CHARS),
    )


def gitlab_history(
    client: GitLabClient, project: str | int, since: float, until: float, limit: int, now: float | None = None
) -> History:
    """`history` from a GitLab project's default branch, through its commits API (first parents, newest first,
    without GitLab's date filters, which are git's: chosen by `select`, at most MAX_API_COMMITS). GitLab's
    errors are raised as the client raises them (`GitLabUnavailable`); no default branch is a `GitError`."""
    with client.errors_as_unavailable():
        handle = client.gl.projects.get(project)
        branch = handle.attributes.get("default_branch")
        if not branch:
            raise GitError(f"GitLab project {project} has no default branch (empty repository?)")
        listed: list[Commit] = []
        for entry in handle.commits.list(ref_name=branch, first_parent=True, iterator=True, per_page=100):
            listed.append(_api_commit(entry.attributes))
            if len(listed) >= MAX_API_COMMITS:
                break
    found = select(listed, since, until, limit, now)
    _refuse_cut(found, len(listed), MAX_API_COMMITS)
    return found
