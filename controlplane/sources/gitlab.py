"""The GitLab inventory source: projects, groups, refs and environments as GitLab reports them now.

A token's claims are a snapshot taken when the job started; access must follow GitLab as it is. This module reads
the live state through python-gitlab and turns it into the frozen `Inventory` the compiler resolves against.
Every request goes through `GitLabTransport` (`gitlab_client.py`: rate bound, retries, metrics), so this module
only says what to read and what the answers mean.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import gitlab
import requests
from gitlab.base import RESTObject
from gitlab.exceptions import GitlabAuthenticationError, GitlabError, GitlabGetError, GitlabListError
from gitlab.mixins import GetMixin, ListMixin

from controlplane.model.inventory import DEFAULT_ARCHIVED, Environment, Group, Inventory, Project, Ref
from controlplane.model.policy import DEFAULT_REQUESTS_PER_SECOND
from controlplane.retry import RetryPolicy
from controlplane.sources.gitlab_client import API_PREFIX, BACKOFF, GitLabRefused, GitLabTransport, GitLabUnavailable
from controlplane.sources.rate_limit import split_rate

log = logging.getLogger("controlplane.gitlab")

__all__ = ["GitLabSource", "tag_is_protected"]


# --- the source


@dataclass(frozen=True)
class _GroupTree:
    groups: list[Group]
    projects: list[Project]


class GitLabSource:
    """Reads groups, projects, refs and environments from one GitLab instance (a `read_api` token is enough)."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        requests_per_second: float = DEFAULT_REQUESTS_PER_SECOND,
        max_retries: int = 5,
        timeout: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.bucket, self.job_bucket = split_rate(requests_per_second)
        self.transport = GitLabTransport(
            api_prefix=urlsplit(self.api_url).path + API_PREFIX,
            bucket=self.bucket,
            job_bucket=self.job_bucket,
            retry=RetryPolicy(max_retries=max_retries, backoff=BACKOFF),
        )
        self._gl = gitlab.Gitlab(
            self.api_url,
            private_token=token,
            timeout=timeout,
            per_page=100,  # GitLab's maximum: fewest requests per list
            retry_transient_errors=False,  # the transport retries, with jitter and a bound
            session=self.transport,
        )
        self._protected_environments_unavailable = False
        self._environments_refused: set[str] = set()  # projects already logged as answering 403 on /environments

    def __repr__(self) -> str:
        return f"GitLabSource({self.api_url!r})"

    @property
    def gl(self) -> gitlab.Gitlab:
        """The python-gitlab client (for `PolicyRepo`); its requests share this source's rate bound and retries."""
        return self._gl

    @contextmanager
    def errors_as_unavailable(self) -> Iterator[None]:
        """Turns whatever python-gitlab or requests raise into `GitLabUnavailable`, with a message safe to log."""
        try:
            yield
        except GitLabUnavailable:
            raise
        except GitlabAuthenticationError as exc:
            raise GitLabRefused(f"GitLab refused the API token (HTTP {exc.response_code})") from exc
        except GitlabError as exc:
            # The answer's body is GitLab's (or whatever answers at its URL): it may echo the token or carry
            # terminal escapes, and this message reaches logs and stderr.
            message = str(exc.error_message)[:200]
            token = self._gl.private_token
            message = message.replace(token, "[token]") if token else message
            message = "".join(c if c.isprintable() else "?" for c in message)
            raise GitLabRefused(f"GitLab answered HTTP {exc.response_code}: {message}") from exc
        except requests.RequestException as exc:
            raise GitLabUnavailable(f"GitLab request failed: {type(exc).__name__}") from exc

    # -- public reads

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        """Every named group with its subgroups and their projects, plus the named projects.

        Groups and projects that do not exist are simply absent: what that means is the compiler's decision.
        """
        found_groups: dict[int, Group] = {}
        found_projects: dict[int, Project] = {}
        with self.errors_as_unavailable():
            for group_ref in groups:
                if _known(group_ref, found_groups.values()):
                    continue
                tree = self._group_tree(group_ref)
                found_groups.update((g.id, g) for g in tree.groups)
                found_projects.update((p.id, p) for p in tree.projects)
            for project_ref in projects:
                if _known(project_ref, found_projects.values()):
                    continue
                project = self._project(project_ref)
                if project is not None:
                    found_projects[project.id] = project
        return Inventory(
            projects=tuple(sorted(found_projects.values(), key=lambda p: p.id)),
            groups=tuple(sorted(found_groups.values(), key=lambda g: g.id)),
            fetched_at=time.time(),
        )

    def fetch_project(self, project: str | int) -> Project | None:
        """One project as GitLab has it now (a targeted re-sync after a webhook); None if it does not exist."""
        with self.errors_as_unavailable():
            return self._project(project)

    def fetch_group_tree(self, group: str | int) -> tuple[list[Group], list[Project]]:
        """A group, its descendant groups and every project under them; ([], []) if it does not exist."""
        with self.errors_as_unavailable():
            tree = self._group_tree(group)
        return tree.groups, tree.projects

    def fetch_job_status(self, project_id: int | str, job_id: int | str) -> str | None:
        """The job's status as GitLab reports it now (`running`, `success`...); None when GitLab does not know
        the job, or not under that project (404). A token without access to the project also gets a 404."""
        with self.errors_as_unavailable():
            project = self._gl.projects.get(project_id, lazy=True)
            job = _get_or_none(project.jobs, job_id)
        return None if job is None else str(job.attributes.get("status"))

    # -- reading

    def _group_tree(self, ref: str | int) -> _GroupTree:
        group = _get_or_none(self._gl.groups, ref, with_projects=False)
        if group is None:
            return _GroupTree([], [])
        groups = [_group_from(group.attributes)]
        groups.extend(_group_from(g.attributes) for g in _each(group.descendant_groups))
        projects = [
            self._project_from(p.attributes) for p in _each(group.projects, include_subgroups=True, with_shared=False)
        ]
        return _GroupTree(groups, projects)

    def _project(self, ref: str | int) -> Project | None:
        found = _get_or_none(self._gl.projects, ref)
        return None if found is None else self._project_from(found.attributes)

    def _project_from(self, attrs: Mapping[str, Any]) -> Project:
        project_id = int(attrs["id"])
        handle = self._gl.projects.get(project_id, lazy=True)
        return Project(
            id=project_id,
            path=str(attrs["path_with_namespace"]),
            namespace_id=int(attrs["namespace"]["id"]),
            archived=bool(attrs.get("archived", DEFAULT_ARCHIVED)),
            default_branch=attrs.get("default_branch") or None,
            refs=self._refs(handle),
            environments=self._environments(handle, str(attrs["path_with_namespace"])),
        )

    def _refs(self, project: Any) -> tuple[Ref, ...]:
        """Branches carry GitLab's own `protected` verdict; tags are matched against /protected_tags here.

        A project without a repository (disabled, or not created yet) has no refs: nothing can be protected.
        """
        refs = [Ref(b.name, "branch", bool(b.protected)) for b in _each(project.branches, missing_ok=True)]
        tags = [t.name for t in _each(project.tags, missing_ok=True)]
        if tags:  # protected_tags is only worth a request when there is a tag to judge
            patterns = [p.name for p in _each(project.protectedtags, missing_ok=True)]
            refs.extend(Ref(name, "tag", tag_is_protected(name, patterns)) for name in tags)
        return tuple(sorted(refs, key=lambda r: (r.type, r.name)))

    def _environments(self, project: Any, path: str) -> tuple[Environment, ...]:
        """A project that turned its Environments feature off answers 403 here: it has none (so nothing that
        asks for an environment is granted on it), and the rest of the inventory is read as usual."""
        try:
            found = [(str(e.name), str(getattr(e, "tier", None) or "other")) for e in _each(project.environments)]
        except GitlabListError as exc:
            if exc.response_code not in (403, 404):
                raise
            self._note_no_environments(path, exc.response_code)
            return ()
        self._environments_refused.discard(path)
        if not found:
            return ()
        protected = self._protected_environment_names(project)
        return tuple(Environment(name, tier, name in protected) for name, tier in sorted(found))

    def _note_no_environments(self, path: str, status: int) -> None:
        """Once per project (until it answers again), not on every reconcile: a log line, not a flood."""
        if path in self._environments_refused:
            return
        self._environments_refused.add(path)
        log.info(
            "GitLab %s: project %s answered HTTP %d on /environments (the feature is off, or hidden from the "
            "token): it counts as having no environment",
            self.api_url,
            path,
            status,
        )

    def _protected_environment_names(self, project: Any) -> frozenset[str]:
        """Protected environments are a Premium API: where it answers 403/404, nothing counts as protected."""
        try:
            return frozenset(str(p.name) for p in _each(project.protected_environments))
        except GitlabListError as exc:
            if exc.response_code not in (403, 404):
                raise
            if not self._protected_environments_unavailable:
                self._protected_environments_unavailable = True
                log.info(
                    "GitLab %s: protected environments API answered HTTP %d (a Premium feature): "
                    "every environment counts as unprotected",
                    self.api_url,
                    exc.response_code,
                )
            return frozenset()


# --- helpers


def tag_is_protected(name: str, patterns: Iterable[str]) -> bool:
    """GitLab's protected-ref wildcard: `*` matches any run of characters, `/` included (`RefMatcher`)."""
    return any(_wildcard(pattern).fullmatch(name) for pattern in patterns)


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _known(ref: str | int, found: Iterable[Group | Project]) -> bool:
    """Already read through another group: named again by id or by its current path."""
    return any(item.id == ref or item.path == ref for item in found)


def _get_or_none(manager: GetMixin[Any], ref: str | int, **kwargs: Any) -> RESTObject | None:
    try:
        found: RESTObject = manager.get(ref, **kwargs)
    except GitlabGetError as exc:
        if exc.response_code == 404:
            return None
        raise
    return found


def _each(manager: ListMixin[Any], *, missing_ok: bool = False, **filters: Any) -> Iterator[Any]:
    """Lazily, page by page (never the whole list in one go); `missing_ok`: a 403/404 list is an empty one."""
    try:
        pages = manager.list(iterator=True, **filters)
    except GitlabListError as exc:
        if missing_ok and exc.response_code in (403, 404):
            return
        raise
    yield from pages


def _group_from(attrs: Mapping[str, Any]) -> Group:
    parent = attrs.get("parent_id")
    return Group(id=int(attrs["id"]), path=str(attrs["full_path"]), parent_id=None if parent is None else int(parent))
