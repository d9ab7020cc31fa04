"""The policy tree at the head of a GitLab project's default branch, with the verdict posted back.

Platform engineers commit policy to a GitLab project and look there for the result: each commit the control
plane reads gets a `controlplane` commit status, success with the snapshot version, or failed with the first
errors and their file:line. Files are read through the API at one commit (no git binary, no clone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controlplane.sources.gitlab_repo import PolicyRepo
from controlplane.sources.policy_source import PolicyFiles

log = logging.getLogger("controlplane.policy")


class GitLabPolicySource:
    def __init__(self, repo: PolicyRepo, *, is_leader: Callable[[], bool] = lambda: True) -> None:
        """`is_leader`: of several replicas reading the same commit, only the leader posts its verdict (they
        compile the same inputs, so they reach the same one); a new leader posts it at its next read."""
        self.repo = repo
        self.is_leader = is_leader
        self.description = f"gitlab project {repo.project}"
        self._tree: tuple[str, dict[str, str]] | None = None  # (sha, files): a commit's tree never changes
        self._reported: set[tuple[str, bool]] = set()

    def read(self) -> PolicyFiles:
        _, sha = self.repo.head()
        if self._tree is None or self._tree[0] != sha:
            self._tree = (sha, self.repo.read_tree(sha))
        return PolicyFiles(self._tree[1], self.description, revision=sha)

    def report(self, files: PolicyFiles, accepted: bool, summary: str) -> None:
        """One status per commit and verdict: polling the same head again posts nothing."""
        if files.revision is None or (files.revision, accepted) in self._reported or not self.is_leader():
            return
        self.repo.post_status(files.revision, "success" if accepted else "failed", summary)
        self._reported.add((files.revision, accepted))
        log.info(
            "posted %s status on %s@%s", "success" if accepted else "failed", self.repo.project, files.revision[:12]
        )
