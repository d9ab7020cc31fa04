"""What GitLab knows about projects and groups: the map from human paths to immutable ids.

Issue 2 reads it from a file; issue 3 fills it from the live GitLab API. The compiler only looks it up.
"""

from __future__ import annotations

from dataclasses import dataclass

# Written once: a project an inventory file does not mark archived is live, as GitLab's API reports it.
DEFAULT_ARCHIVED = False


@dataclass(frozen=True)
class Ref:
    """A branch or tag as GitLab reports it now; `protected` is GitLab's current verdict, not a token's claim."""

    name: str
    type: str  # "branch" | "tag"
    protected: bool


@dataclass(frozen=True)
class Environment:
    name: str
    tier: str  # production | staging | testing | development | other
    protected: bool


@dataclass(frozen=True)
class Project:
    id: int
    path: str
    namespace_id: int
    archived: bool = DEFAULT_ARCHIVED
    default_branch: str | None = None
    # None = not known (an inventory file): no ref or environment checks. A tuple = what GitLab has now.
    refs: tuple[Ref, ...] | None = None
    environments: tuple[Environment, ...] | None = None


@dataclass(frozen=True)
class Group:
    id: int
    path: str
    parent_id: int | None = None


@dataclass(frozen=True)
class Inventory:
    projects: tuple[Project, ...] = ()
    groups: tuple[Group, ...] = ()
    # Unix time the data was read from GitLab (None for a file).
    fetched_at: float | None = None
    # Set by the service when the data is older than the issuer's max staleness: every binding that
    # depends on it is withdrawn (fail closed) until GitLab answers again.
    stale: bool = False

    @property
    def live(self) -> bool:
        """Read from GitLab (refs, protections, archived state are current), not from a file."""
        return self.fetched_at is not None

    def project_by_path(self, path: str) -> Project | None:
        return next((p for p in self.projects if p.path == path), None)

    def project_by_id(self, project_id: int) -> Project | None:
        return next((p for p in self.projects if p.id == project_id), None)

    def group_by_path(self, path: str) -> Group | None:
        return next((g for g in self.groups if g.path == path), None)

    def group_by_id(self, group_id: int) -> Group | None:
        return next((g for g in self.groups if g.id == group_id), None)

    def group_and_descendant_ids(self, group_id: int) -> tuple[int, ...]:
        """A token's namespace_id is the project's immediate parent, so a group pin must list every subgroup."""
        found = [group_id]
        frontier = [group_id]
        while frontier:
            parent = frontier.pop()
            children = [g.id for g in self.groups if g.parent_id == parent]
            found.extend(children)
            frontier.extend(children)
        return tuple(sorted(set(found)))
