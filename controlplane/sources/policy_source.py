"""Where a policy tree comes from: a directory, or a project on GitLab (sources/gitlab_policy.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controlplane.sources.policy_dir import DEFAULT_LIMITS, ReadLimits, read_policy_dir


@dataclass(frozen=True)
class PolicyFiles:
    """A policy tree as read: file texts, where they came from, and the revision (a commit) if any."""

    files: Mapping[str, str]
    origin: str
    revision: str | None = None


class PolicySource(Protocol):
    """Where the policy comes from: a directory, or a project on GitLab."""

    description: str

    def read(self) -> PolicyFiles: ...

    def report(self, files: PolicyFiles, accepted: bool, summary: str) -> None:
        """Tell the source's users the verdict (a GitLab commit status); a directory has nobody to tell."""


class DirectorySource:
    def __init__(self, root: Path, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.root = root
        self.limits = limits
        self.description = str(root)

    def read(self) -> PolicyFiles:
        return PolicyFiles(read_policy_dir(self.root, self.limits), str(self.root))

    def report(self, files: PolicyFiles, accepted: bool, summary: str) -> None:
        return None
