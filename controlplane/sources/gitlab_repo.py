"""The policy repository on GitLab: read the tree at a commit through the API, post the verdict back on it.

Platform engineers commit policy to a GitLab project, so that is where they must see whether it was accepted: a
commit status named `controlplane` on the very commit that was read. Reading goes through the repository tree and
raw-file APIs (no git binary, no clone, no credentials on disk) and keeps the same file rules as a local policy
directory, so one tree loads to the same `Policy` whether it comes from a checkout or from GitLab.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

import gitlab
from gitlab.exceptions import GitlabGetError

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.sources.policy_dir import (
    DEFAULT_LIMITS,
    POLICY_SUFFIXES,
    READ_CHUNK,
    ReadLimits,
    _is_policy_file,
    file_too_large,
    too_many_files,
    tree_too_large,
)

__all__ = ["STATUS_NAME", "GitLabClient", "PolicyRepo", "PolicyRepoError", "StatusState", "truncate_description"]

STATUS_NAME = "controlplane"
MAX_DESCRIPTION = 255  # GitLab's limit on a commit status description
SYMLINK_MODE = "120000"  # a symlink's raw content is its target path, not the file it points to

StatusState = Literal["pending", "success", "failed"]


class GitLabClient(Protocol):
    """What `PolicyRepo` needs from a client: python-gitlab, and errors turned into `GitLabUnavailable`.

    `GitLabSource` is one, so the policy repository shares the inventory's rate bound, retries and metrics.
    """

    @property
    def gl(self) -> gitlab.Gitlab: ...

    def errors_as_unavailable(self) -> AbstractContextManager[None]: ...


class PolicyRepoError(Exception):
    """The policy project cannot serve a policy: it does not exist, or has no default branch or no commit."""


class PolicyRepo:
    """One GitLab project whose default branch holds a policy tree."""

    def __init__(self, source: GitLabClient, project: str | int, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.source = source
        self.project = project
        self.limits = limits
        self._user_id: int | None = None  # the token's user (`GET /user`), asked once
        self._blobs: dict[str, bytes] = {}  # blob id -> content: a file unchanged between commits is read once

    def __repr__(self) -> str:
        return f"PolicyRepo({self.project!r})"

    def head(self) -> tuple[str, str]:
        """(default branch, the sha of its head commit): what to read and where to post the verdict."""
        with self.source.errors_as_unavailable():
            attrs = self._get(self.source.gl.projects, self.project, "project").attributes
            branch = attrs.get("default_branch")
            if not branch:
                raise PolicyRepoError(f"GitLab project {self.project} has no default branch (empty repository?)")
            commit = self._get(self._handle().commits, branch, f"branch {branch}")
        return str(branch), str(commit.id)

    @property
    def last_tree_bytes(self) -> int:
        """The size of the tree read last (its distinct files): what a policy of this project weighs now."""
        return sum(len(blob) for blob in self._blobs.values())

    def read_tree(self, sha: str, limits: ReadLimits | None = None) -> dict[str, str]:
        """{path: text} of every policy file in the tree at `sha`, recursively, in sorted order.

        Same rules as a directory (`policy_dir`): YAML only; hidden files and directories, editor leftovers,
        symlinks and submodules skipped; the same size bounds. Raises `PolicyInvalid` naming each file that is
        not UTF-8 or too large, or the commit when it holds no policy file, as `read_policy_dir` does.
        `limits`: tighter bounds than the project's for this one read (a merge request's head).
        """
        limits = limits or self.limits
        with self.source.errors_as_unavailable():
            project = self._handle()
            entries = sorted(
                (entry["path"], entry["id"])
                for entry in project.repository_tree(ref=sha, recursive=True, iterator=True)
                if _is_policy_blob(entry)
            )
            if len(entries) > limits.max_files:  # each file is a request: none is made for such a tree
                where = f"{self.project}@{sha[:12]}"
                raise PolicyInvalid([PolicyError(where, 0, "", too_many_files(len(entries), limits.max_files))])
            blobs: dict[str, bytes] = {}
            total = 0
            # Read in order, and no further than the tree's bound (a tree of a thousand files of the file bound
            # would otherwise be held whole before being refused); a blob repeated in the tree is read once.
            for path, blob in entries:
                if blob not in blobs:
                    blobs[blob] = self._blob(project, path, blob, sha)
                total += len(blobs[blob])
                if total > limits.max_tree_bytes:
                    break
        self._blobs = blobs  # bounded: only the blobs of the last tree read are kept
        texts: dict[str, str] = {}
        errors: list[PolicyError] = []
        total = 0
        for path, blob in entries:
            if blob not in blobs:  # not read: the bound was passed before it (on a file also too large itself)
                errors.append(PolicyError(path, 1, "", tree_too_large(total, limits.max_tree_bytes)))
                break
            size = len(blobs[blob])
            total += size
            if size > limits.max_file_bytes:
                errors.append(PolicyError(path, 1, "", file_too_large(size, limits.max_file_bytes)))
                continue
            if total > limits.max_tree_bytes:
                errors.append(PolicyError(path, 1, "", tree_too_large(total, limits.max_tree_bytes)))
                break
            try:
                texts[path] = blobs[blob].decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(PolicyError(path, 1, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        if errors:
            raise PolicyInvalid(errors)
        if not texts:
            where = f"{self.project}@{sha[:12]}"
            suffixes = ", ".join("*" + s for s in POLICY_SUFFIXES)
            raise PolicyInvalid([PolicyError(where, 0, "", f"no policy files ({suffixes}) in {where}")])
        return texts

    def has_status(self, sha: str) -> bool:
        """Whether the latest `controlplane` status on `sha` is this token's own: one small request, so a verdict
        posted before a restart, or by the previous leader, is not judged and posted again. One posted by anyone
        else (a developer's token can post any name) does not count: the verdict is still ours to give."""
        with self.source.errors_as_unavailable():
            found = self._handle().commits.get(sha, lazy=True).statuses.list(name=STATUS_NAME, per_page=1, page=1)
            if not found:
                return False
            if self._user_id is None:
                self.source.gl.auth()  # `GET /user`
                user = self.source.gl.user
                self._user_id = int(user.id) if user is not None else -1
        author = found[0].attributes.get("author") or {}
        return bool(author.get("id") == self._user_id)

    def post_status(self, sha: str, state: StatusState, description: str, target_url: str | None = None) -> None:
        """A commit status named `controlplane` on `sha`: what the policy repository's users see on the commit."""
        data: dict[str, Any] = {
            "state": state,
            "name": STATUS_NAME,
            "description": truncate_description(description),
        }
        if target_url:
            data["target_url"] = target_url
        with self.source.errors_as_unavailable():
            self._handle().commits.get(sha, lazy=True).statuses.create(data)

    # -- helpers

    def _handle(self) -> Any:
        """A lazy project object: sub-resource calls without fetching the project first."""
        return self.source.gl.projects.get(self.project, lazy=True)

    def _get(self, manager: Any, ref: str | int, what: str) -> Any:
        try:
            return manager.get(ref)
        except GitlabGetError as exc:
            if exc.response_code == 404:
                raise PolicyRepoError(f"GitLab project {self.project}: {what} not found") from exc
            raise

    def _blob(self, project: Any, path: str, blob: str, sha: str) -> bytes:
        cached = self._blobs.get(blob)
        if cached is not None:
            return cached
        # Streamed, and stopped past the bound: a huge blob committed to the policy project costs at most the bound
        # (plus a chunk) of memory; read_tree then reports it as too large.
        chunks = project.files.raw(file_path=path, ref=sha, streamed=True, iterator=True, chunk_size=READ_CHUNK)
        content = bytearray()
        for chunk in chunks:
            content += chunk
            if len(content) > self.limits.max_file_bytes:
                break
        return bytes(content)


def truncate_description(description: str) -> str:
    """At most 255 characters, GitLab's limit; a cut one ends with an ellipsis so readers know there is more."""
    if len(description) <= MAX_DESCRIPTION:
        return description
    return description[: MAX_DESCRIPTION - 1] + "…"


def _is_policy_blob(entry: dict[str, Any]) -> bool:
    """A regular file that a policy directory walk would read (hidden directories are pruned there too)."""
    if entry.get("type") != "blob" or entry.get("mode") == SYMLINK_MODE:
        return False
    *directories, name = str(entry["path"]).split("/")
    return not any(d.startswith(".") for d in directories) and _is_policy_file(name)
