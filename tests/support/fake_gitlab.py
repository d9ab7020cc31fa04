"""A fake GitLab: OIDC discovery, the JWKS at GitLab's paths, GitLab-shaped CI ID tokens, and the v4 REST API.

It lives under tests/ only (it is not part of the ``controlplane`` package) because ``serve`` must never
trust it. Fidelity matters more than brevity here: the claim types are exactly GitLab's (every id and boolean
is a JSON string, ``runner_id`` is an int), because Envoy's RBAC ``string_match`` silently fails on any other
type, and a fake that got this wrong would let a broken policy compiler pass its tests.

The REST API answers with the JSON shapes, pagination headers (``X-Total``, ``X-Page``, ``X-Next-Page``,
``X-Per-Page``, ``Link``) and errors python-gitlab expects, so the production GitLab source is tested exactly as it
runs against a real GitLab: groups and their descendants, projects (by id, by url-encoded path, and by the old path
of a renamed project, as GitLab's redirect routes do), branches, tags, protections, environments, the repository
tree and raw files, commits, commit statuses, and merge requests with their notes. Test controls are plain
methods (``add_project``, ``rename_project``, ``protect_branch``, ``commit``, ``add_merge_request``, ``fail_next``,
``set_down``, ``rate_limit_next``...), and every API request is logged by endpoint template
(``api_calls("/projects/:id/repository/branches")``).
"""

from __future__ import annotations

import calendar
import contextlib
import email.utils
import hashlib
import itertools
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode

from .backends import Request, Response, json_response
from .fake_oidc import OMIT, OidcIssuer, SigningKey, apply_raw, decode_unverified
from .gitlab_hooks import ZERO_SHA, HookTarget, deliver, project_system_hook, push_hook
from .ports import LOOPBACK

__all__ = ["OMIT", "ApiCall", "FakeGitLab", "SigningKey", "decode_unverified"]

_ids = itertools.count(1000)

API = "/api/v4"
MAX_PER_PAGE = 100  # GitLab's limit
DEFAULT_PER_PAGE = 20  # GitLab's default when the client sends no per_page
MR_STATES = frozenset({"opened", "closed", "merged", "locked"})
MAX_NOTE_CHARS = 1_000_000  # GitLab's limit on a note's body
BOT_USER = "controlplane-bot"  # the user the API token belongs to (commit statuses and notes are theirs)
STATUS_STATES = frozenset({"pending", "running", "success", "failed", "canceled", "skipped"})
# Every status GitLab's Jobs API reports (doc/api/jobs.md); the last four mean the job is over.
JOB_STATUSES = frozenset(
    {"created", "waiting_for_resource", "preparing", "pending", "running", "manual", "scheduled", "canceling",
     "success", "failed", "canceled", "skipped"}
)  # fmt: skip
FINISHED_JOB_STATUSES = frozenset({"success", "failed", "canceled", "skipped"})
_TRUE = frozenset({"true", "1", "yes", "t"})

Files = Mapping[str, "str | bytes | None"]


# --- the data GitLab holds


@dataclass
class _Commit:
    sha: str
    parent: str | None
    tree: dict[str, bytes]  # path -> content: every file of the repository at this commit
    message: str
    created_at: str
    author: str = "Platform Engineer"  # author and committer (commit(author=...)); e-mail derived from it


@dataclass
class _Group:
    id: int
    path: str  # full path, e.g. acme/platform
    parent_id: int | None
    created_at: str


@dataclass
class _Environment:
    id: int
    tier: str


@dataclass
class _Project:
    id: int
    path: str  # full path (path_with_namespace)
    namespace_id: int
    default_branch: str | None
    created_at: str
    archived: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> sha
    tags: dict[str, str] = field(default_factory=dict)  # name -> sha
    protected_branches: list[str] = field(default_factory=list)  # names or wildcard patterns
    protected_tags: list[str] = field(default_factory=list)
    environments: dict[str, _Environment] = field(default_factory=dict)
    protected_environments: set[str] = field(default_factory=set)
    environments_enabled: bool = True  # the project's Environments feature (Settings > Visibility)
    ci_config_path: str | None = None  # Settings > CI/CD > General pipelines; None: `.gitlab-ci.yml`
    commits: dict[str, _Commit] = field(default_factory=dict)
    statuses: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # sha -> posted statuses, in order


@dataclass
class _Job:
    id: int
    project_id: int
    name: str
    stage: str
    ref: str
    status: str
    pipeline_id: int
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None


@dataclass
class _Note:
    id: int
    body: str
    author: str  # username; the API token's user is BOT_USER
    created_at: str
    updated_at: str
    system: bool = False


@dataclass
class _MergeRequest:
    id: int
    iid: int
    project_id: int
    title: str
    source_branch: str
    target_branch: str
    state: str  # opened, closed, merged, locked
    created_at: str
    updated_at: str
    notes: list[_Note] = field(default_factory=list)


class _BadParameter(Exception):
    """A missing or invalid parameter: GitLab answers 400 with ``{"error": ...}``."""


@dataclass(frozen=True)
class ApiCall:
    """One REST request as the fake saw it: ``endpoint`` is the template (``/projects/:id``), ``path`` the raw URL
    path (ids and encoded paths included)."""

    method: str
    endpoint: str
    path: str
    query: Mapping[str, list[str]]
    status: int
    at: float


class ApiError(Exception):
    """Raised by a handler to answer with GitLab's error JSON (``{"message": ...}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _parse_iso(value: str) -> float:
    return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%S.000Z")))


def _git_blob_id(data: bytes) -> str:
    """The git object id GitLab reports for a blob (``id`` in tree entries)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def _ref_matches(pattern: str, name: str) -> bool:
    """GitLab's protected-ref wildcard (``RefMatcher``): ``*`` is any run of characters, ``/`` included.

    Written independently of the production matcher on purpose: the fake is the oracle it is tested against.
    """
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, name, re.DOTALL) is not None


def _flag(request: Request, name: str) -> bool | None:
    """A Grape boolean query parameter (python-gitlab sends ``True``, curl users ``true``)."""
    values = request.query.get(name)
    return None if not values else values[0].strip().lower() in _TRUE


def _param(request: Request, name: str) -> str | None:
    values = request.query.get(name)
    return values[0] if values else None


def _email(name: str) -> str:
    return name.lower().replace(" ", ".") + "@example.com"


def _timestamp(iso: str) -> float:
    """An ISO 8601 time as GitLab's API takes it (``Z`` or an offset; fractions allowed); a bad one is a 400."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ApiError(400, "since/until is invalid") from None


def _changed_under(tree: Mapping[str, bytes], before: Mapping[str, bytes], path: str) -> bool:
    prefix = path.strip("/") + "/"
    under = [p for p in {*tree, *before} if p == path.strip("/") or p.startswith(prefix)]
    return any(tree.get(p) != before.get(p) for p in under)


def _int_param(request: Request, name: str, default: int) -> int:
    value = _param(request, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} is invalid") from None


class FakeGitLab(OidcIssuer):
    """GitLab's layout: ``iss`` is the bare base URL, discovery at ``/.well-known/openid-configuration``,
    JWKS at ``/oauth/discovery/keys`` (and the legacy ``/-/jwks``), ``Cache-Control: max-age=86400, public,
    must-revalidate``; the REST API under ``/api/v4``, authenticated by ``PRIVATE-TOKEN: <api_token>``."""

    server_name: ClassVar[str] = "fake-gitlab"
    jwks_cache_control: ClassVar[str] = "max-age=86400, public, must-revalidate"

    def __init__(
        self, *, default_audience: str = "https://backend.example.com", port: int = 0, api_token: str | None = None
    ) -> None:
        self.api_token = api_token or "glpat-" + secrets.token_urlsafe(15)
        """The only token the REST API accepts (a ``read_api`` personal access token, in GitLab's terms)."""
        self.max_per_page = MAX_PER_PAGE
        """Lower it (e.g. to 2) to make a test page through every list."""
        self.premium = True
        """False: ``/protected_environments`` answers 403, as on GitLab Free."""
        self._api_lock = threading.RLock()
        self._groups: dict[int, _Group] = {}
        self._projects: dict[int, _Project] = {}
        self._redirects: dict[str, int] = {}  # lower-cased old project path -> project id
        self._jobs: dict[int, _Job] = {}
        self._group_ids = itertools.count(10)
        self._project_ids = itertools.count(100)
        self._other_ids = itertools.count(1)
        self._api_log: list[ApiCall] = []
        self._failures: list[int] = []
        self._held: dict[str, threading.Event] = {}  # endpoint template -> released
        self._rate_limited = 0
        self._retry_after = 1
        self._down = False
        self._refused_port: int | None = None
        self._hooks: list[HookTarget] = []
        self._merge_requests: dict[int, dict[int, _MergeRequest]] = {}  # project id -> iid -> merge request
        super().__init__(
            issuer_path="", jwks_path="/oauth/discovery/keys", default_audience=default_audience, port=port
        )

    # -- URLs (stable while connections are refused, so a test can bring the same GitLab back)

    @property
    def port(self) -> int:
        return self._refused_port if self._refused_port is not None else super().port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def api_url(self) -> str:
        """What python-gitlab takes as its URL (it appends ``/api/v4``)."""
        return self.base_url

    # -- routes

    def _add_routes(self) -> None:
        super()._add_routes()
        self.router.add("GET", "/-/jwks", self._serve_jwks)
        for method, endpoint, handler in self._api_routes():
            pattern = API + re.sub(r":(\w+)", r"{\1}", endpoint)
            self.router.add(method, pattern, self._api_handler(endpoint, handler))
        self.router.add("*", API + "/{rest:path}", self._api_handler("other", self._not_found))

    def _api_routes(self) -> list[tuple[str, str, Callable[[Request], Response]]]:
        return [
            ("GET", "/groups/:id", self._get_group),
            ("GET", "/groups/:id/descendant_groups", self._list_descendant_groups),
            ("GET", "/groups/:id/subgroups", self._list_subgroups),
            ("GET", "/groups/:id/projects", self._list_group_projects),
            ("GET", "/projects/:id", self._get_project),
            ("GET", "/projects/:id/repository/branches", self._list_branches),
            ("GET", "/projects/:id/repository/branches/:name", self._get_branch),
            ("GET", "/projects/:id/repository/tags", self._list_tags),
            ("GET", "/projects/:id/protected_branches", self._list_protected_branches),
            ("GET", "/projects/:id/protected_tags", self._list_protected_tags),
            ("GET", "/projects/:id/environments", self._list_environments),
            ("GET", "/projects/:id/protected_environments", self._list_protected_environments),
            ("GET", "/projects/:id/repository/tree", self._list_tree),
            ("GET", "/projects/:id/repository/files/:path/raw", self._get_raw_file),
            ("GET", "/projects/:id/repository/commits", self._list_commits),
            ("GET", "/projects/:id/repository/commits/:sha", self._get_commit),
            ("POST", "/projects/:id/statuses/:sha", self._post_status),
            ("GET", "/projects/:id/repository/commits/:sha/statuses", self._list_statuses),
            ("GET", "/user", self._get_current_user),
            ("GET", "/projects/:id/jobs/:job_id", self._get_job),
            *self._merge_request_routes(),
        ]

    def _api_handler(self, endpoint: str, handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """Outage and rate-limit injection, then ``PRIVATE-TOKEN`` auth, then the handler; every request logged."""

        def serve(request: Request) -> Response:
            held = self._held.get(endpoint)
            if held is not None:
                held.wait(30)  # a GitLab slow on this endpoint (bounded: a forgotten release ends the test)
            try:
                response = self._gate(request)
                if response is None:
                    with self._api_lock:
                        response = handler(request)
            except ApiError as exc:
                response = json_response({"message": exc.message}, status=exc.status)
            call = ApiCall(request.method, endpoint, request.path, request.query, response.status, time.monotonic())
            with self._api_lock:
                self._api_log.append(call)
            return response

        return serve

    def _gate(self, request: Request) -> Response | None:
        with self._api_lock:
            if self._down:
                return _service_unavailable(503)
            if self._rate_limited:
                self._rate_limited -= 1
                return _too_many_requests(self._retry_after)
            if self._failures:
                return _service_unavailable(self._failures.pop(0))
        token = request.headers.get("private-token", "")
        if not secrets.compare_digest(token.encode(), self.api_token.encode()):
            return json_response({"message": "401 Unauthorized"}, status=401)
        return None

    def _serve_discovery(self, request: Request) -> Response:
        return _service_unavailable(503) if self._down else super()._serve_discovery(request)

    def _serve_jwks(self, request: Request) -> Response:
        return _service_unavailable(503) if self._down else super()._serve_jwks(request)

    # -- test controls: failures

    def hold(self, endpoint: str) -> None:
        """Requests to ``endpoint`` (a template, e.g. ``/projects/:id/repository/tree``) wait until ``release``:
        a GitLab that answers slowly there."""
        self._held.setdefault(endpoint, threading.Event())

    def release(self, endpoint: str) -> None:
        held = self._held.pop(endpoint, None)
        if held is not None:
            held.set()

    def fail_next(self, n: int, status: int = 503) -> None:
        """The next ``n`` API requests answer ``status`` (a GitLab restart, a 502 from its proxy...)."""
        with self._api_lock:
            self._failures.extend([status] * n)

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        """The next ``n`` API requests answer 429 with ``Retry-After: retry_after`` and GitLab's RateLimit headers."""
        with self._api_lock:
            self._rate_limited = n
            self._retry_after = retry_after

    def set_down(self, down: bool = True, *, refuse: bool = False) -> None:
        """GitLab down: every request (API, discovery, JWKS) answers 503, or with ``refuse=True`` the port stops
        listening (connection refused). ``set_down(False)`` brings it back on the same port."""
        with self._api_lock:
            self._down = down and not refuse
        if down and refuse and self._refused_port is None:
            self._refused_port = self.port
            self._server.fixed_port = self._refused_port
            self._server.stop()
        elif not down and self._refused_port is not None:
            self._server.start()
            self._refused_port = None

    # -- test controls: the request log

    def api_calls(self, endpoint: str | None = None, *, method: str | None = None) -> list[ApiCall]:
        """REST requests served, oldest first; ``endpoint`` is a template such as ``/projects/:id/environments``."""
        with self._api_lock:
            return [
                c
                for c in self._api_log
                if (endpoint is None or c.endpoint == endpoint) and (method is None or c.method == method)
            ]

    def clear_api_calls(self) -> None:
        with self._api_lock:
            self._api_log.clear()

    # -- test controls: groups and projects

    def add_group(self, path: str, *, id: int | None = None) -> int:
        """A group (and any missing parent group); returns its id."""
        with self._api_lock:
            if self._find_group(path) is not None:
                raise ValueError(f"group {path} exists")
            parent, _, _name = path.rpartition("/")
            parent_id = self._ensure_group(parent) if parent else None
            group = _Group(id or next(self._group_ids), path, parent_id, _now_iso())
            self._groups[group.id] = group
            return group.id

    def add_project(
        self,
        path: str,
        *,
        id: int | None = None,
        default_branch: str = "main",
        branches: Iterable[str] | None = None,
        protected: Iterable[str] | None = None,
        tags: Iterable[str] = (),
        protected_tags: Iterable[str] = (),
        environments: Mapping[str, str] | Iterable[str] = (),
        protected_environments: Iterable[str] = (),
        files: Files | None = None,
        archived: bool = False,
        ci_config_path: str | None = None,
    ) -> int:
        """A project with one commit (``files``) that every branch and tag points at; returns its id.

        ``branches`` defaults to the default branch alone and ``protected`` (names or ``*`` patterns) to the
        default branch, as GitLab protects it on creation. ``environments`` maps names to tiers (or lists names;
        the tier is guessed from the name, as GitLab does). Missing groups of the namespace are created. Taking the
        old path of a renamed project ends its redirect, as in GitLab.
        """
        with self._api_lock:
            namespace, _, _name = path.rpartition("/")
            if not namespace:
                raise ValueError("projects live in a group here: use group/project")
            self._check_free(path)
            project = _Project(
                id=id or next(self._project_ids),
                path=path,
                namespace_id=self._ensure_group(namespace),
                default_branch=default_branch,
                created_at=_now_iso(),
                archived=archived,
                protected_branches=list(protected if protected is not None else [default_branch]),
                protected_tags=list(protected_tags),
                ci_config_path=ci_config_path,
            )
            if project.id in self._projects:
                raise ValueError(f"project id {project.id} exists")
            self._redirects.pop(path.lower(), None)
            self._projects[project.id] = project
            root = self._new_commit(project, None, _apply({}, files or {}), "Initial commit")
            for branch in {default_branch, *(branches or ())}:
                project.branches[branch] = root.sha
            project.tags.update(dict.fromkeys(tags, root.sha))
            envs = environments.items() if isinstance(environments, Mapping) else ((e, None) for e in environments)
            for env_name, tier in envs:
                self._add_environment(project, env_name, tier)
            project.protected_environments.update(protected_environments)
            return project.id

    def add_job(
        self,
        project: int | str,
        *,
        id: int | None = None,
        status: str = "running",
        name: str = "deploy",
        stage: str = "deploy",
        ref: str = "main",
        pipeline_id: int | None = None,
    ) -> int:
        """A CI job of ``project`` (mint its ID token with ``mint(job_id=...)``); returns its id."""
        with self._api_lock:
            owner = self._project(project)
            job = _Job(
                id=id if id is not None else next(_ids),
                project_id=owner.id,
                name=name,
                stage=stage,
                ref=ref,
                status="created",
                pipeline_id=pipeline_id if pipeline_id is not None else next(_ids),
                created_at=_now_iso(),
            )
            if job.id in self._jobs:
                raise ValueError(f"job id {job.id} exists")
            self._jobs[job.id] = job
        self.set_job_status(job.id, status)
        return job.id

    def set_job_status(self, job_id: int, status: str) -> None:
        """What GitLab reports for the job from now on. No webhook is sent: this is how a missed Job Hook looks."""
        if status not in JOB_STATUSES:
            raise ValueError(f"unknown job status {status!r}")
        with self._api_lock:
            job = self._jobs[job_id]
            job.status = status
            if status not in ("created", "pending", "waiting_for_resource", "manual", "scheduled"):
                job.started_at = job.started_at or _now_iso()
            if status in FINISHED_JOB_STATUSES:
                job.finished_at = job.finished_at or _now_iso()

    def rename_project(self, project: int | str, new_name: str) -> None:
        """Same namespace, new last path component; the old path keeps answering (GitLab's redirect route)."""
        with self._api_lock:
            p = self._project(project)
            old = p.path
            self._move(p, p.path.rpartition("/")[0] + "/" + new_name)
        self._system_hook("project_rename", p.id, p.path, old)

    def transfer_project(self, project: int | str, namespace: str) -> None:
        """Move to another group (created if missing): a new ``namespace_id``; the old path redirects."""
        with self._api_lock:
            p = self._project(project)
            old = p.path
            self._move(p, namespace + "/" + p.path.rpartition("/")[2])
        self._system_hook("project_transfer", p.id, p.path, old)

    def archive_project(self, project: int | str, archived: bool = True) -> None:
        with self._api_lock:
            p = self._project(project)
            p.archived = archived
        self._system_hook("project_update", p.id, p.path)

    def delete_project(self, project: int | str) -> None:
        """Gone at once (no delayed deletion), with its redirects: its paths answer 404."""
        with self._api_lock:
            p = self._project(project)
            del self._projects[p.id]
            self._redirects = {old: pid for old, pid in self._redirects.items() if pid != p.id}
        self._system_hook("project_destroy", p.id, p.path)

    # -- webhooks: GitLab posts after the change, with its real headers (tests/support/gitlab_hooks.py)

    def add_system_hook(self, url: str, secret: str) -> HookTarget:
        """Register a system hook: project events and pushes are then delivered to ``url`` as they happen.
        Protection changes send nothing, exactly like GitLab (only a reconcile sees them)."""
        target = HookTarget(url, secret)
        self._hooks.append(target)
        return target

    def _system_hook(self, event_name: str, project_id: int, path: str, old_path: str | None = None) -> None:
        for target in list(self._hooks):
            deliver(target, "System Hook", project_system_hook(event_name, project_id, path, old_path))

    def _push_hook(self, project_id: int, path: str, branch: str, before: str, after: str) -> None:
        for target in list(self._hooks):
            deliver(target, "Push Hook", push_hook(project_id, path, f"refs/heads/{branch}", before, after))

    # -- test controls: refs, protections, environments

    def protect_branch(self, project: int | str, pattern: str) -> None:
        """Protect a branch name or wildcard pattern (``release/*``)."""
        with self._api_lock:
            p = self._project(project)
            if pattern not in p.protected_branches:
                p.protected_branches.append(pattern)

    def unprotect_branch(self, project: int | str, pattern: str) -> None:
        with self._api_lock:
            p = self._project(project)
            if pattern in p.protected_branches:
                p.protected_branches.remove(pattern)

    def protect_tag(self, project: int | str, pattern: str) -> None:
        with self._api_lock:
            p = self._project(project)
            if pattern not in p.protected_tags:
                p.protected_tags.append(pattern)

    def unprotect_tag(self, project: int | str, pattern: str) -> None:
        with self._api_lock:
            p = self._project(project)
            if pattern in p.protected_tags:
                p.protected_tags.remove(pattern)

    def add_branch(self, project: int | str, name: str, ref: str | None = None) -> str:
        """A branch at ``ref`` (default: the default branch's head); returns its sha."""
        with self._api_lock:
            p = self._project(project)
            p.branches[name] = self._resolve(p, ref or p.default_branch or "").sha
            return p.branches[name]

    def delete_branch(self, project: int | str, name: str) -> None:
        with self._api_lock:
            p = self._project(project)
            before = p.branches.pop(name)
        self._push_hook(p.id, p.path, name, before, ZERO_SHA)

    def add_tag(self, project: int | str, name: str, ref: str | None = None) -> str:
        with self._api_lock:
            p = self._project(project)
            p.tags[name] = self._resolve(p, ref or p.default_branch or "").sha
            return p.tags[name]

    def delete_tag(self, project: int | str, name: str) -> None:
        with self._api_lock:
            del self._project(project).tags[name]

    def add_environment(
        self, project: int | str, name: str, tier: str | None = None, *, protected: bool = False
    ) -> None:
        with self._api_lock:
            p = self._project(project)
            self._add_environment(p, name, tier)
            if protected:
                p.protected_environments.add(name)

    def set_environments_enabled(self, project: int | str, enabled: bool) -> None:
        """The project's Environments feature on or off; off, ``/environments`` answers 403, as GitLab does."""
        with self._api_lock:
            self._project(project).environments_enabled = enabled

    def protect_environment(self, project: int | str, name: str, protected: bool = True) -> None:
        with self._api_lock:
            p = self._project(project)
            (p.protected_environments.add if protected else p.protected_environments.discard)(name)

    # -- test controls: the repository and commit statuses

    def commit(
        self,
        project: int | str,
        files: Files,
        *,
        branch: str | None = None,
        message: str = "Update policy",
        author: str | None = None,
        at: float | None = None,
    ) -> str:
        """A new commit on ``branch`` (default: the default branch): ``files`` are written over the current tree
        (``None`` deletes a file). ``author`` and ``at`` (Unix time; default now) as its author and commit time.
        Returns the new head sha."""
        with self._api_lock:
            p = self._project(project)
            name = branch or p.default_branch or "main"
            parent = p.commits[p.branches[name]] if name in p.branches else self._resolve(p, p.default_branch or "")
            tree = _apply(parent.tree, files)
            p.branches[name] = sha = self._new_commit(p, parent.sha, tree, message, author=author, at=at).sha
        self._push_hook(p.id, p.path, name, parent.sha, sha)
        return sha

    def head(self, project: int | str, branch: str | None = None) -> str:
        with self._api_lock:
            p = self._project(project)
            return p.branches[branch or p.default_branch or "main"]

    def add_status(self, project: int | str, sha: str, state: str, *, name: str, author: str) -> None:
        """A commit status posted by another user (`author`, not the API token's): a developer's own token, a CI
        job's."""
        with self._api_lock:
            entry = _status_json(next(self._other_ids), sha, None, state, name, {}, self.base_url)
            entry["author"] = _user_json(author, 2, self.base_url)
            self._project(project).statuses.setdefault(sha, []).append(entry)

    def statuses(self, project: int | str, sha: str) -> list[dict[str, Any]]:
        """Commit statuses posted on ``sha``, oldest first, as the API answered them."""
        with self._api_lock:
            return [dict(s) for s in self._project(project).statuses.get(sha, [])]

    # -- lookups (callers hold the lock)

    def _find_project(self, ref: int | str) -> _Project | None:
        """By id, by path (case-insensitive, as GitLab), or by an old path through its redirect route."""
        if isinstance(ref, int) or ref.isdigit():
            return self._projects.get(int(ref))
        wanted = ref.lower()
        found = next((p for p in self._projects.values() if p.path.lower() == wanted), None)
        if found is None and wanted in self._redirects:
            found = self._projects.get(self._redirects[wanted])
        return found

    def _project(self, ref: int | str) -> _Project:
        found = self._find_project(ref)
        if found is None:
            raise ApiError(404, "404 Project Not Found")
        return found

    def _find_group(self, ref: int | str) -> _Group | None:
        if isinstance(ref, int) or ref.isdigit():
            return self._groups.get(int(ref))
        return next((g for g in self._groups.values() if g.path.lower() == ref.lower()), None)

    def _group(self, ref: int | str) -> _Group:
        found = self._find_group(ref)
        if found is None:
            raise ApiError(404, "404 Group Not Found")
        return found

    def _ensure_group(self, path: str) -> int:
        group = self._find_group(path)
        return group.id if group is not None else self.add_group(path)

    def _check_free(self, path: str) -> None:
        wanted = path.lower()
        if any(p.path.lower() == wanted for p in self._projects.values()) or self._find_group(path):
            raise ValueError(f"path {path} is taken")

    def _move(self, project: _Project, new_path: str) -> None:
        self._check_free(new_path)
        self._redirects[project.path.lower()] = project.id
        self._redirects.pop(new_path.lower(), None)
        project.namespace_id = self._ensure_group(new_path.rpartition("/")[0])
        project.path = new_path

    def _add_environment(self, project: _Project, name: str, tier: str | None) -> None:
        project.environments[name] = _Environment(next(self._other_ids), tier or _tier(name))

    def _resolve(self, project: _Project, ref: str) -> _Commit:
        """A branch, a tag, a full sha or a sha prefix of 7+ characters, as GitLab resolves a ``ref``."""
        sha = project.branches.get(ref) or project.tags.get(ref)
        if sha is None and len(ref) >= 7:
            sha = next((s for s in project.commits if s.startswith(ref)), None)
        if sha is None:
            raise ApiError(404, "404 Commit Not Found")
        return project.commits[sha]

    def _new_commit(
        self,
        project: _Project,
        parent: str | None,
        tree: dict[str, bytes],
        message: str,
        *,
        author: str | None = None,
        at: float | None = None,
    ) -> _Commit:
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(f"{project.id}\0{parent}\0{message}\0{next(self._other_ids)}".encode())
        for path in sorted(tree):
            digest.update(path.encode() + b"\0" + tree[path])
        created = _now_iso() if at is None else time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(at))
        commit = _Commit(digest.hexdigest(), parent, tree, message, created, author or _Commit.author)
        project.commits[commit.sha] = commit
        return commit

    # -- JSON shapes (GitLab's v4 entities, the fields python-gitlab and the control plane read and a few more)

    def _group_json(self, group: _Group) -> dict[str, Any]:
        name = group.path.rpartition("/")[2]
        return {
            "id": group.id,
            "web_url": f"{self.base_url}/groups/{group.path}",
            "name": name,
            "path": name,
            "description": "",
            "visibility": "private",
            "share_with_group_lock": False,
            "require_two_factor_authentication": False,
            "project_creation_level": "developer",
            "subgroup_creation_level": "maintainer",
            "lfs_enabled": True,
            "default_branch": None,
            "avatar_url": None,
            "request_access_enabled": True,
            "full_name": " / ".join(group.path.split("/")),
            "full_path": group.path,
            "created_at": group.created_at,
            "parent_id": group.parent_id,
            "organization_id": 1,
            "marked_for_deletion_on": None,
        }

    def _namespace_json(self, group: _Group) -> dict[str, Any]:
        name = group.path.rpartition("/")[2]
        return {
            "id": group.id,
            "name": name,
            "path": name,
            "kind": "group",
            "full_path": group.path,
            "parent_id": group.parent_id,
            "avatar_url": None,
            "web_url": f"{self.base_url}/groups/{group.path}",
        }

    def _project_json(self, project: _Project) -> dict[str, Any]:
        name = project.path.rpartition("/")[2]
        namespace = self._groups[project.namespace_id]
        web = f"{self.base_url}/{project.path}"
        return {
            "id": project.id,
            "description": None,
            "name": name,
            "name_with_namespace": " / ".join(project.path.split("/")),
            "path": name,
            "path_with_namespace": project.path,
            "created_at": project.created_at,
            "default_branch": project.default_branch,
            "ci_config_path": project.ci_config_path,
            "tag_list": [],
            "topics": [],
            "ssh_url_to_repo": f"git@{LOOPBACK}:{project.path}.git",
            "http_url_to_repo": f"{web}.git",
            "web_url": web,
            "readme_url": None,
            "forks_count": 0,
            "avatar_url": None,
            "star_count": 0,
            "last_activity_at": project.created_at,
            "namespace": self._namespace_json(namespace),
            "visibility": "private",
            "archived": project.archived,
            "empty_repo": not project.branches,
            "environments_access_level": "enabled" if project.environments_enabled else "disabled",
            "marked_for_deletion_at": None,
            "marked_for_deletion_on": None,
            "_links": {
                "self": f"{self.base_url}{API}/projects/{project.id}",
                "repo_branches": f"{self.base_url}{API}/projects/{project.id}/repository/branches",
            },
        }

    def _commit_json(self, project: _Project, commit: _Commit) -> dict[str, Any]:
        return {
            "id": commit.sha,
            "short_id": commit.sha[:8],
            "created_at": commit.created_at,
            "parent_ids": [commit.parent] if commit.parent else [],
            "title": commit.message.splitlines()[0] if commit.message else "",
            "message": commit.message,
            "author_name": commit.author,
            "author_email": _email(commit.author),
            "authored_date": commit.created_at,
            "committer_name": commit.author,
            "committer_email": _email(commit.author),
            "committed_date": commit.created_at,
            "trailers": {},
            "extended_trailers": {},
            "web_url": f"{self.base_url}/{project.path}/-/commit/{commit.sha}",
        }

    def _branch_json(self, project: _Project, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "merged": False,
            "protected": any(_ref_matches(p, name) for p in project.protected_branches),
            "default": name == project.default_branch,
            "developers_can_push": False,
            "developers_can_merge": False,
            "can_push": True,
            "web_url": f"{self.base_url}/{project.path}/-/tree/{name}",
            "commit": self._commit_json(project, project.commits[project.branches[name]]),
        }

    def _job_json(self, project: _Project, job: _Job) -> dict[str, Any]:
        """GitLab's "Get a single job" answer (doc/api/jobs.md), with the fields a control plane could read."""
        sha = project.branches.get(job.ref) or next(iter(project.commits))
        duration = None
        if job.started_at and job.finished_at:
            duration = max(0.0, _parse_iso(job.finished_at) - _parse_iso(job.started_at))
        return {
            "id": job.id,
            "name": job.name,
            "stage": job.stage,
            "status": job.status,
            "ref": job.ref,
            "tag": job.ref in project.tags,
            "coverage": None,
            "allow_failure": False,
            "archived": False,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "erased_at": None,
            "duration": duration,
            "queued_duration": 0.0 if job.started_at else None,
            "failure_reason": "script_failure" if job.status == "failed" else None,
            "artifacts_expire_at": None,
            "tag_list": [],
            "web_url": f"{self.base_url}/{project.path}/-/jobs/{job.id}",
            "commit": self._commit_json(project, project.commits[sha]),
            "pipeline": {
                "id": job.pipeline_id,
                "project_id": project.id,
                "ref": job.ref,
                "sha": sha,
                "status": job.status,
            },
            "project": {"ci_job_token_scope_enabled": False},
            "artifacts": [],
            "runner": None,
            "user": {"id": 1, "username": "ci-user", "name": "CI User", "state": "active"},
        }

    def _tag_json(self, project: _Project, name: str) -> dict[str, Any]:
        sha = project.tags[name]
        return {
            "name": name,
            "message": None,
            "target": sha,
            "commit": self._commit_json(project, project.commits[sha]),
            "release": None,
            "protected": any(_ref_matches(p, name) for p in project.protected_tags),
            "created_at": None,
        }

    # -- handlers (called with the lock held)

    def _not_found(self, _request: Request) -> Response:
        raise ApiError(404, "404 Not Found")

    def _get_group(self, request: Request) -> Response:
        return json_response(self._group_json(self._group(request.params["id"])))

    def _descendants(self, group: _Group) -> list[_Group]:
        prefix = group.path.lower() + "/"
        return sorted((g for g in self._groups.values() if g.path.lower().startswith(prefix)), key=lambda g: g.path)

    def _list_descendant_groups(self, request: Request) -> Response:
        group = self._group(request.params["id"])
        return self._page(request, [self._group_json(g) for g in self._descendants(group)])

    def _list_subgroups(self, request: Request) -> Response:
        group = self._group(request.params["id"])
        children = [g for g in self._descendants(group) if g.parent_id == group.id]
        return self._page(request, [self._group_json(g) for g in children])

    def _list_group_projects(self, request: Request) -> Response:
        """Newest first, as GitLab; ``include_subgroups`` and ``archived`` filter like GitLab's."""
        group = self._group(request.params["id"])
        namespaces = {group.id}
        if _flag(request, "include_subgroups"):
            namespaces.update(g.id for g in self._descendants(group))
        archived = _flag(request, "archived")
        found = [
            p
            for p in sorted(self._projects.values(), key=lambda p: p.id, reverse=True)
            if p.namespace_id in namespaces and (archived is None or p.archived == archived)
        ]
        return self._page(request, [self._project_json(p) for p in found])

    def _get_project(self, request: Request) -> Response:
        return json_response(self._project_json(self._project(request.params["id"])))

    def _get_job(self, request: Request) -> Response:
        """A job is found only under its own project (GitLab scopes job ids by the project in the URL)."""
        project = self._project(request.params["id"])
        job_id = request.params["job_id"]
        job = self._jobs.get(int(job_id)) if job_id.isdigit() else None
        if job is None or job.project_id != project.id:
            raise ApiError(404, "404 Not found")
        return json_response(self._job_json(project, job))

    def _list_branches(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        return self._page(request, [self._branch_json(project, name) for name in sorted(project.branches)])

    def _get_branch(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        name = request.params["name"]
        if name not in project.branches:
            raise ApiError(404, "404 Branch Not Found")
        return json_response(self._branch_json(project, name))

    def _list_tags(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        return self._page(request, [self._tag_json(project, name) for name in sorted(project.tags)])

    def _list_protected_branches(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        return self._page(request, [_protected_branch_json(i, n) for i, n in enumerate(project.protected_branches)])

    def _list_protected_tags(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        return self._page(request, [_protected_tag_json(name) for name in project.protected_tags])

    def _list_environments(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        if not project.environments_enabled:
            raise ApiError(403, "403 Forbidden")  # GitLab's answer when the feature is off, whatever the token
        envs = [_environment_json(name, env, project.created_at) for name, env in sorted(project.environments.items())]
        return self._page(request, envs)

    def _list_protected_environments(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        if not self.premium:
            raise ApiError(403, "403 Forbidden")
        names = sorted(n for n in project.protected_environments if n in project.environments)
        return self._page(request, [_protected_environment_json(name) for name in names])

    def _list_tree(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        ref = _param(request, "ref") or project.default_branch or ""
        try:
            commit = self._resolve(project, ref)
        except ApiError:
            raise ApiError(404, "404 Tree Not Found") from None
        base = (_param(request, "path") or "").strip("/")
        entries = _tree_entries(commit, base, recursive=bool(_flag(request, "recursive")))
        return self._page(request, entries)

    def _get_raw_file(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        ref = _param(request, "ref") or project.default_branch or ""
        commit = self._resolve(project, ref)
        path = request.params["path"]
        if path not in commit.tree:
            raise ApiError(404, "404 File Not Found")
        data = commit.tree[path]
        headers = {
            "Content-Type": "text/plain; charset=utf-8",
            "X-Gitlab-Blob-Id": _git_blob_id(data),
            "X-Gitlab-Commit-Id": commit.sha,
            "X-Gitlab-File-Path": path,
            "X-Gitlab-Ref": ref,
            "X-Gitlab-Size": str(len(data)),
        }
        return Response(200, data, headers)

    def _list_commits(self, request: Request) -> Response:
        """GitLab's commit list: from ``ref_name`` (default: the default branch) back along parents, newest first;
        ``since``/``until`` (ISO 8601, inclusive) on the commit date; ``path``: only commits changing a file under
        it. The fake's history is linear, so ``first_parent`` changes nothing."""
        project = self._project(request.params["id"])
        commit: _Commit | None = self._resolve(project, _param(request, "ref_name") or project.default_branch or "")
        since, until, path = _param(request, "since"), _param(request, "until"), _param(request, "path")
        items = []
        while commit is not None:
            parent = project.commits[commit.parent] if commit.parent else None
            when = _timestamp(commit.created_at)
            changed = path is None or _changed_under(commit.tree, parent.tree if parent else {}, path)
            if (
                changed
                and (since is None or when >= _timestamp(since))
                and (until is None or when <= _timestamp(until))
            ):
                items.append(self._commit_json(project, commit))
            commit = parent
        return self._page(request, items)

    def _get_commit(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        commit = self._resolve(project, request.params["sha"])
        body = self._commit_json(project, commit)
        body.update({"stats": {"additions": 0, "deletions": 0, "total": 0}, "status": None, "project_id": project.id})
        return json_response(body)

    def _get_current_user(self, request: Request) -> Response:
        """`GET /user`: the API token's user."""
        return json_response(_user_json(BOT_USER, 1, self.base_url))

    def _list_statuses(self, request: Request) -> Response:
        """A commit's statuses, newest first: by default only the latest of each name (and ref), every one with
        `all=true`; `name` and `ref` filter. Paginated as every list."""
        project = self._project(request.params["id"])
        commit = self._resolve(project, request.params["sha"])
        name, ref = request.query.get("name", [None])[0], request.query.get("ref", [None])[0]
        every = request.query.get("all", ["false"])[0] in ("true", "1")
        found, seen = [], set()
        for status in reversed(project.statuses.get(commit.sha, [])):
            if (name is not None and status["name"] != name) or (ref is not None and status["ref"] != ref):
                continue
            if not every and (status["name"], status["ref"]) in seen:
                continue
            seen.add((status["name"], status["ref"]))
            found.append(status)
        return self._page(request, found)

    def _post_status(self, request: Request) -> Response:
        """GitLab's rules: a known state, a commit that exists, and no repeat of a pending/running state."""
        project = self._project(request.params["id"])
        commit = self._resolve(project, request.params["sha"])
        data = _form(request)
        state = str(data.get("state", ""))
        if state not in STATUS_STATES:
            return json_response({"error": "state does not have a valid value"}, status=400)
        description = data.get("description")
        if description is not None and len(str(description)) > 255:
            # GitLab's column is a string(255); enforced so a client that forgets to truncate fails its tests
            raise ApiError(400, "description is too long (maximum is 255 characters)")
        name = str(data.get("name") or data.get("context") or "default")
        posted = project.statuses.setdefault(commit.sha, [])
        previous = next((s for s in reversed(posted) if s["name"] == name), None)
        if previous is not None and previous["status"] in ("pending", "running") and state in ("pending", "running"):
            # GitLab moves the live (pending/running) status by an event: `enqueue` to pending, `run` to running;
            # pending again, or running again, is no transition it knows.
            event = "enqueue" if state == "pending" else "run"
            if state == "pending" or previous["status"] == "running":
                raise ApiError(400, f"Cannot transition status via :{event} from :{previous['status']}")
        ref = data.get("ref") or next((b for b, sha in sorted(project.branches.items()) if sha == commit.sha), None)
        entry = _status_json(next(self._other_ids), commit.sha, ref, state, name, data, self.base_url)
        posted.append(entry)
        return json_response(entry, status=201)

    def _page(self, request: Request, items: Sequence[Any]) -> Response:
        """GitLab's offset pagination: ``page``/``per_page`` in, ``X-*`` headers and an RFC 8288 ``Link`` out."""
        per_page = min(max(_int_param(request, "per_page", DEFAULT_PER_PAGE), 1), MAX_PER_PAGE, self.max_per_page)
        page = max(_int_param(request, "page", 1), 1)
        pages = max(1, math.ceil(len(items) / per_page))
        headers = {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Total": str(len(items)),
            "X-Total-Pages": str(pages),
            "X-Next-Page": str(page + 1) if page < pages else "",
            "X-Prev-Page": str(page - 1) if page > 1 else "",
            "Link": self._links(request, page, pages, per_page),
        }
        return json_response(list(items[(page - 1) * per_page : page * per_page]), headers=headers)

    def _links(self, request: Request, page: int, pages: int, per_page: int) -> str:
        host = request.headers.get("host") or f"{LOOPBACK}:{self.port}"

        def url(target: int) -> str:
            query = {k: v for k, v in request.query.items() if k not in ("page", "per_page")}
            query.update({"page": [str(target)], "per_page": [str(per_page)]})
            return f"http://{host}{request.path}?{urlencode(query, doseq=True)}"

        rels = [("next", page + 1)] if page < pages else []
        rels += [("prev", page - 1)] if page > 1 else []
        rels += [("first", 1), ("last", pages)]
        return ", ".join(f'<{url(target)}>; rel="{rel}"' for rel, target in rels)

    # -- merge requests and their notes (GitLab's doc/api/merge_requests.md and doc/api/notes.md)

    def add_merge_request(
        self, project: int | str, source_branch: str, *, target_branch: str | None = None, title: str = "Change policy"
    ) -> int:
        """An open merge request from ``source_branch`` (which must exist) into ``target_branch`` (default: the
        default branch); returns its iid. Its ``sha`` is the source branch's head, read at each answer."""
        with self._api_lock:
            p = self._project(project)
            if source_branch not in p.branches:
                raise ValueError(f"no branch {source_branch}")
            requests = self._merge_requests.setdefault(p.id, {})
            iid = max(requests, default=0) + 1
            now = _now_iso()
            target = target_branch or p.default_branch or "main"
            requests[iid] = _MergeRequest(next(_ids), iid, p.id, title, source_branch, target, "opened", now, now)
            payload = self._merge_request_hook(p, requests[iid], "open")
        for hook in list(self._hooks):
            deliver(hook, "Merge Request Hook", payload)
        return iid

    @contextlib.contextmanager
    def hooks_lost(self) -> Iterator[None]:
        """Webhook deliveries made meanwhile are lost (GitLab gave up on them): nothing reaches the hooks."""
        hooks, self._hooks = self._hooks, []
        try:
            yield
        finally:
            self._hooks = hooks + self._hooks

    def set_merge_request_state(self, project: int | str, iid: int, state: str) -> None:
        if state not in MR_STATES:
            raise ValueError(f"unknown merge request state {state!r}")
        with self._api_lock:
            mr = self._merge_request(self._project(project), iid)
            mr.state, mr.updated_at = state, _now_iso()

    def add_note(self, project: int | str, iid: int, body: str, *, author: str = "reviewer") -> int:
        """A note written by someone else (by default not the token's user); returns its id."""
        with self._api_lock:
            mr = self._merge_request(self._project(project), iid)
            now = _now_iso()
            mr.notes.append(_Note(next(self._other_ids), body, author, now, now))
            return mr.notes[-1].id

    def notes(self, project: int | str, iid: int) -> list[dict[str, Any]]:
        """The merge request's notes, oldest first, as the API answers them."""
        with self._api_lock:
            p = self._project(project)
            mr = self._merge_request(p, iid)
            return [self._note_json(p, mr, n) for n in mr.notes]

    def _merge_request_hook(self, project: _Project, mr: _MergeRequest, action: str) -> dict[str, Any]:
        """GitLab's merge request event (project webhooks and system hooks send the same): the fields a receiver
        reads, and a few more."""
        attributes = {k: v for k, v in self._mr_json(project, mr).items() if k not in ("author", "references")}
        return {
            "object_kind": "merge_request",
            "event_type": "merge_request",
            "user": _user_json("developer", 2, self.base_url),
            "project": {
                "id": project.id,
                "path_with_namespace": project.path,
                "default_branch": project.default_branch,
            },
            "object_attributes": {**attributes, "action": action, "last_commit": {"id": attributes["sha"]}},
            "repository": {"name": project.path.rsplit("/", 1)[-1]},
        }

    def _merge_request_routes(self) -> list[tuple[str, str, Callable[[Request], Response]]]:
        return [
            ("GET", "/projects/:id/merge_requests", self._list_merge_requests),
            ("GET", "/projects/:id/merge_requests/:iid", self._get_merge_request),
            ("GET", "/projects/:id/merge_requests/:iid/notes", self._list_notes),
            ("POST", "/projects/:id/merge_requests/:iid/notes", self._create_note),
            ("GET", "/projects/:id/merge_requests/:iid/notes/:note_id", self._get_note),
            ("PUT", "/projects/:id/merge_requests/:iid/notes/:note_id", self._update_note),
        ]

    def _merge_request(self, project: _Project, iid: int | str) -> _MergeRequest:
        try:
            return self._merge_requests.get(project.id, {})[int(iid)]
        except (KeyError, ValueError):
            raise ApiError(404, "404 Not found") from None

    def _mr_json(self, project: _Project, mr: _MergeRequest) -> dict[str, Any]:
        sha = project.branches.get(mr.source_branch)
        base = project.branches.get(mr.target_branch)
        return {
            "id": mr.id,
            "iid": mr.iid,
            "project_id": project.id,
            "title": mr.title,
            "description": "",
            "state": mr.state,
            "created_at": mr.created_at,
            "updated_at": mr.updated_at,
            "merged_at": None,
            "closed_at": None,
            "target_branch": mr.target_branch,
            "source_branch": mr.source_branch,
            "source_project_id": project.id,
            "target_project_id": project.id,
            "draft": False,
            "work_in_progress": False,
            "sha": sha,
            "merge_commit_sha": None,
            "squash_commit_sha": None,
            "user_notes_count": sum(1 for n in mr.notes if not n.system),
            "author": _user_json("developer", 2, self.base_url),
            "references": {"short": f"!{mr.iid}", "full": f"{project.path}!{mr.iid}"},
            "web_url": f"{self.base_url}/{project.path}/-/merge_requests/{mr.iid}",
            "diff_refs": {"base_sha": base, "head_sha": sha, "start_sha": base},
        }

    def _note_json(self, project: _Project, mr: _MergeRequest, note: _Note) -> dict[str, Any]:
        return {
            "id": note.id,
            "type": None,
            "body": note.body,
            "attachment": None,
            "author": _user_json(note.author, 1 if note.author == BOT_USER else 2, self.base_url),
            "created_at": note.created_at,
            "updated_at": note.updated_at,
            "system": note.system,
            "noteable_id": mr.id,
            "noteable_type": "MergeRequest",
            "project_id": project.id,
            "noteable_iid": mr.iid,
            "resolvable": False,
            "confidential": False,
            "internal": False,
            "commands_changes": {},
        }

    def _list_merge_requests(self, request: Request) -> Response:
        """Filters ``state`` (``all`` or one state), ``target_branch``, ``source_branch``; ``order_by``
        ``created_at`` (default) or ``updated_at``; ``sort`` ``desc`` (default) or ``asc``."""
        project = self._project(request.params["id"])
        state = _param(request, "state") or "all"
        if state != "all" and state not in MR_STATES:
            return json_response({"error": "state does not have a valid value"}, status=400)
        order = _param(request, "order_by") or "created_at"
        if order not in ("created_at", "updated_at"):
            return json_response({"error": "order_by does not have a valid value"}, status=400)
        wanted = [
            mr
            for mr in self._merge_requests.get(project.id, {}).values()
            if state in ("all", mr.state)
            and _param(request, "target_branch") in (None, mr.target_branch)
            and _param(request, "source_branch") in (None, mr.source_branch)
        ]
        wanted.sort(key=lambda mr: (getattr(mr, order), mr.id), reverse=(_param(request, "sort") or "desc") == "desc")
        return self._page(request, [self._mr_json(project, mr) for mr in wanted])

    def _get_merge_request(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        return json_response(self._mr_json(project, self._merge_request(project, request.params["iid"])))

    def _list_notes(self, request: Request) -> Response:
        """``sort`` ``desc`` (default) or ``asc``, ``order_by`` ``created_at`` (default) or ``updated_at``."""
        project = self._project(request.params["id"])
        mr = self._merge_request(project, request.params["iid"])
        order = _param(request, "order_by") or "created_at"
        notes = sorted(mr.notes, key=lambda n: (getattr(n, order), n.id), reverse=_param(request, "sort") != "asc")
        return self._page(request, [self._note_json(project, mr, n) for n in notes])

    def _find_note(self, request: Request) -> tuple[_Project, _MergeRequest, _Note]:
        project = self._project(request.params["id"])
        mr = self._merge_request(project, request.params["iid"])
        note = next((n for n in mr.notes if str(n.id) == request.params["note_id"]), None)
        if note is None:
            raise ApiError(404, "404 Note Not Found")
        return project, mr, note

    def _get_note(self, request: Request) -> Response:
        return json_response(self._note_json(*self._find_note(request)))

    def _note_body(self, request: Request) -> str:
        body = _form(request).get("body")
        if not body:
            raise _BadParameter("body is missing")
        if len(str(body)) > MAX_NOTE_CHARS:
            raise ApiError(400, f'Note {{:note=>["is too long (maximum is {MAX_NOTE_CHARS} characters)"]}}')
        return str(body)

    def _create_note(self, request: Request) -> Response:
        project = self._project(request.params["id"])
        mr = self._merge_request(project, request.params["iid"])
        try:
            body = self._note_body(request)
        except _BadParameter as missing:
            return json_response({"error": str(missing)}, status=400)
        now = _now_iso()
        mr.notes.append(_Note(next(self._other_ids), body, BOT_USER, now, now))
        return json_response(self._note_json(project, mr, mr.notes[-1]), status=201)

    def _update_note(self, request: Request) -> Response:
        """Only the note's author may change its body (403 otherwise), as GitLab answers."""
        project, mr, note = self._find_note(request)
        if note.author != BOT_USER:
            raise ApiError(403, "403 Forbidden")
        try:
            note.body = self._note_body(request)
        except _BadParameter as missing:
            return json_response({"error": str(missing)}, status=400)
        note.updated_at = _now_iso()
        return json_response(self._note_json(project, mr, note))

    # -- OIDC: discovery and CI ID tokens

    def discovery(self) -> dict[str, Any]:
        base = self.issuer
        return {
            "issuer": base,
            "authorization_endpoint": f"{base}/oauth/authorize",
            "token_endpoint": f"{base}/oauth/token",
            "revocation_endpoint": f"{base}/oauth/revoke",
            "introspection_endpoint": f"{base}/oauth/introspect",
            "userinfo_endpoint": f"{base}/oauth/userinfo",
            "jwks_uri": self.jwks_uri,
            "scopes_supported": ["api", "read_api", "read_user", "openid", "profile", "email"],
            "response_types_supported": ["code"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "grant_types_supported": [
                "authorization_code",
                "password",
                "client_credentials",
                "refresh_token",
            ],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claim_types_supported": ["normal"],
            "claims_supported": [
                "iss",
                "sub",
                "aud",
                "exp",
                "iat",
                "sub_legacy",
                "name",
                "nickname",
                "preferred_username",
                "email",
                "email_verified",
                "website",
                "profile",
                "picture",
                "groups",
                "groups_direct",
                "https://gitlab.org/claims/groups/owner",
                "https://gitlab.org/claims/groups/maintainer",
                "https://gitlab.org/claims/groups/developer",
            ],
            "code_challenge_methods_supported": ["plain", "S256"],
        }

    def mint(
        self,
        *,
        project_id: int | str = 42,
        project_path: str = "acme/deployer",
        namespace_id: int | str = 7,
        namespace_path: str | None = None,
        ref: str = "main",
        ref_type: str = "branch",
        ref_protected: bool = True,
        pipeline_source: str = "push",
        environment: str | None = None,
        environment_protected: bool = False,
        deployment_tier: str | None = None,
        aud: str | Sequence[str] | None = None,
        ttl: int = 300,
        iat: int | None = None,
        exp: int | None = None,
        nbf: int | None = None,
        key: SigningKey | None = None,
        kid: str | None = None,
        user_id: int | str = 1,
        user_login: str = "ci-user",
        user_email: str = "ci-user@example.com",
        user_access_level: str | None = "developer",
        pipeline_id: int | str | None = None,
        job_id: int | str | None = None,
        runner_id: int = 17,
        runner_environment: str = "self-hosted",
        project_visibility: str = "private",
        sha: str | None = None,
        raw: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> str:
        """A signed CI ID token, claim for claim as ``Gitlab::Ci::JwtV2`` builds it.

        ids and booleans are converted to strings here, so callers may pass ``42``/``True``; to send a
        *wrong* type (to prove a matcher rejects it) use ``raw={"project_id": 42}``; ``raw={"exp": OMIT}``
        drops a claim. ``**extra`` adds claims verbatim (``groups_direct=[...]``). ``key=fake.rogue`` signs
        with the unpublished key; ``kid=`` sets the header kid independently of the key.
        """
        issued, not_before, expires = self.times(ttl=ttl, iat=iat, exp=exp, nbf=nbf)
        ns_path = namespace_path if namespace_path is not None else project_path.rpartition("/")[0]
        ref_path = f"refs/heads/{ref}" if ref_type == "branch" else f"refs/tags/{ref}"
        commit = sha or secrets.token_hex(20)
        host = self.base_url.split("://", 1)[1]
        claims: dict[str, Any] = {
            "namespace_id": str(namespace_id),
            "namespace_path": ns_path,
            "project_id": str(project_id),
            "project_path": project_path,
            "user_id": str(user_id),
            "user_login": user_login,
            "user_email": user_email,
            "user_access_level": user_access_level,
            "pipeline_id": str(pipeline_id if pipeline_id is not None else next(_ids)),
            "pipeline_source": pipeline_source,
            "job_id": str(job_id if job_id is not None else next(_ids)),
            "ref": ref,
            "ref_type": ref_type,
            "ref_path": ref_path,
            "ref_protected": _bool(ref_protected),
            "runner_id": int(runner_id),
            "runner_environment": runner_environment,
            "sha": commit,
            "project_visibility": project_visibility,
            "ci_config_ref_uri": f"{host}/{project_path}//.gitlab-ci.yml@{ref_path}",
            "ci_config_sha": commit,
            "job_project_id": str(project_id),
            "job_project_path": project_path,
            "job_namespace_id": str(namespace_id),
            "job_namespace_path": ns_path,
            "jti": self.new_jti(),
            "iss": self.issuer,
            "iat": issued,
            "nbf": not_before,
            "exp": expires,
            "sub": f"project_path:{project_path}:ref_type:{ref_type}:ref:{ref}",
            "aud": self.default_audience if aud is None else (aud if isinstance(aud, str) else list(aud)),
        }
        if environment is not None:
            claims["environment"] = environment
            claims["environment_protected"] = _bool(environment_protected)
            claims["deployment_tier"] = deployment_tier or _tier(environment)
            claims["environment_action"] = "start"
        claims.update(extra)
        return self.sign(apply_raw(claims, raw), key=key, kid=kid)


# --- helpers: requests and answers


def _apply(tree: Mapping[str, bytes], files: Files) -> dict[str, bytes]:
    """``files`` written over ``tree``: text is stored as UTF-8, ``None`` deletes the file."""
    out = dict(tree)
    for path, content in files.items():
        if content is None:
            out.pop(path, None)
        else:
            out[path.strip("/")] = content.encode() if isinstance(content, str) else content
    return out


def _form(request: Request) -> dict[str, Any]:
    """A POST's parameters as Grape merges them: query string, then a JSON or form-encoded body."""
    data: dict[str, Any] = {k: v[0] for k, v in request.query.items() if v}
    content_type = request.headers.get("content-type", "")
    if request.body and "json" in content_type:
        body = request.json()
        if isinstance(body, dict):
            data.update(body)
    elif request.body:
        data.update({k: v[0] for k, v in parse_qs(request.body.decode()).items() if v})
    return data


def _service_unavailable(status: int) -> Response:
    return json_response({"message": f"{status} Service Unavailable"}, status=status)


def _too_many_requests(retry_after: int) -> Response:
    """What GitLab's Rack::Attack throttle answers: plain text, Retry-After and the RateLimit-* headers."""
    reset = time.time() + retry_after
    headers = {
        "Content-Type": "text/plain",
        "Retry-After": str(retry_after),
        "RateLimit-Name": "throttle_authenticated_api",
        "RateLimit-Limit": "60",
        "RateLimit-Observed": "61",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": str(math.ceil(reset)),
        "RateLimit-ResetTime": email.utils.formatdate(reset, usegmt=True),
    }
    return Response(429, b"Retry later\n", headers)


def _access_level() -> dict[str, Any]:
    return {
        "id": 1,
        "access_level": 40,
        "access_level_description": "Maintainers",
        "user_id": None,
        "group_id": None,
        "deploy_key_id": None,
    }


def _protected_branch_json(index: int, name: str) -> dict[str, Any]:
    return {
        "id": index + 1,
        "name": name,
        "push_access_levels": [_access_level()],
        "merge_access_levels": [_access_level()],
        "unprotect_access_levels": [],
        "allow_force_push": False,
        "code_owner_approval_required": False,
        "inherited": False,
    }


def _protected_tag_json(name: str) -> dict[str, Any]:
    return {"name": name, "create_access_levels": [_access_level()]}


def _environment_json(name: str, env: _Environment, created_at: str) -> dict[str, Any]:
    return {
        "id": env.id,
        "name": name,
        "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        "external_url": None,
        "created_at": created_at,
        "updated_at": created_at,
        "tier": env.tier,
        "state": "available",
        "auto_stop_at": None,
        "description": None,
    }


def _protected_environment_json(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "deploy_access_levels": [{**_access_level(), "group_inheritance_type": 0}],
        "required_approval_count": 0,
        "approval_rules": [],
    }


def _tree_entries(commit: _Commit, base: str, *, recursive: bool) -> list[dict[str, Any]]:
    """The entries under ``base`` (directories first, then files, each by path), as ``/repository/tree`` lists."""
    dirs = {"/".join(path.split("/")[:i]) for path in commit.tree for i in range(1, path.count("/") + 1)}
    prefix = base + "/" if base else ""

    def wanted(path: str) -> bool:
        return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

    trees = [
        {
            "id": hashlib.sha1(f"{commit.sha}:{d}".encode(), usedforsecurity=False).hexdigest(),
            "name": d.rpartition("/")[2],
            "type": "tree",
            "path": d,
            "mode": "040000",
        }
        for d in sorted(dirs)
        if wanted(d)
    ]
    blobs = [
        {"id": _git_blob_id(data), "name": path.rpartition("/")[2], "type": "blob", "path": path, "mode": "100644"}
        for path, data in sorted(commit.tree.items())
        if wanted(path)
    ]
    return trees + blobs


def _status_json(
    status_id: int, sha: str, ref: str | None, state: str, name: str, data: Mapping[str, Any], base_url: str
) -> dict[str, Any]:
    now = _now_iso()
    finished = state in ("success", "failed", "canceled", "skipped")
    return {
        "id": status_id,
        "sha": sha,
        "ref": ref,
        "status": state,
        "name": name,
        "target_url": data.get("target_url"),
        "description": data.get("description"),
        "created_at": now,
        "started_at": None if state == "pending" else now,
        "finished_at": now if finished else None,
        "allow_failure": False,
        "coverage": data.get("coverage"),
        "pipeline_id": None,
        "author": {
            "id": 1,
            "username": "controlplane-bot",
            "name": "controlplane bot",
            "state": "active",
            "avatar_url": None,
            "web_url": f"{base_url}/controlplane-bot",
        },
    }


def _user_json(username: str, user_id: int, base_url: str) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": username,
        "name": username.replace("-", " "),
        "state": "active",
        "avatar_url": None,
        "web_url": f"{base_url}/{username}",
    }


def _bool(value: bool | str) -> str:
    """GitLab sends booleans as ``build.protected.to_s``: the strings "true"/"false"."""
    if isinstance(value, str):
        return value
    return "true" if value else "false"


def _tier(environment: str) -> str:
    """GitLab's guess from the environment name, close enough for tests."""
    name = environment.lower()
    for tier, hints in (
        ("production", ("prod", "live")),
        ("staging", ("stag", "model", "pre")),
        ("testing", ("test", "qa")),
        ("development", ("dev", "review", "trunk")),
    ):
        if any(h in name for h in hints):
            return tier
    return "other"
