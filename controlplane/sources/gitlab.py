"""The GitLab inventory source: projects, groups, refs and environments as GitLab reports them now.

A token's claims are a snapshot taken when the job started; access must follow GitLab as it is. This module reads
the live state through python-gitlab and turns it into the frozen `Inventory` the compiler resolves against.

Robustness lives in one place, the HTTP session python-gitlab sends every request through (`GitLabTransport`):
a client-side token bucket bounds the request rate, 429 answers are obeyed (Retry-After), transient failures
(5xx, connection errors) are retried with exponential backoff and jitter, and each request is counted by endpoint
template. When retries run out it raises `GitLabUnavailable`, which the watcher answers by keeping its last good
inventory. python-gitlab's own retry loop is left off, so retries never multiply and every one is bounded.

The API token is only ever a header: never in an exception message, a log line, a repr or argv.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import gitlab
import requests
from gitlab.base import RESTObject
from gitlab.exceptions import GitlabAuthenticationError, GitlabError, GitlabGetError, GitlabListError
from gitlab.mixins import GetMixin, ListMixin

from controlplane.model.inventory import Environment, Group, Inventory, Project, Ref
from controlplane.sources.gitlab_metrics import (
    GITLAB_RATE_LIMIT_WAIT_SECONDS,
    GITLAB_RATE_LIMIT_WAITS,
    GITLAB_REQUEST_DURATION,
    GITLAB_REQUESTS,
)

log = logging.getLogger("controlplane.gitlab")

__all__ = [
    "GitLabRefused",
    "GitLabSource",
    "GitLabTokenError",
    "GitLabTransport",
    "GitLabUnavailable",
    "RetryPolicy",
    "TokenBucket",
    "endpoint_template",
    "tag_is_protected",
    "token_from",
]

# 5xx GitLab (and Cloudflare in front of gitlab.com) answers while it is restarting or overloaded.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504, *range(520, 531)})
# A Retry-After longer than this is treated as an outage: the caller keeps its last good data and comes back later
# instead of blocking a reconcile for an hour.
MAX_RETRY_AFTER_SECONDS = 60.0
API_PREFIX = "/api/v4"


class GitLabUnavailable(Exception):
    """GitLab could not answer (unreachable, 5xx or rate limited after every retry): keep the last good data."""


class GitLabRefused(GitLabUnavailable):
    """GitLab answered, but not with the data (401 token revoked, 403, an unexpected 4xx).

    A subclass of `GitLabUnavailable` so every caller that keeps its last good inventory on an outage also keeps
    it when the token expires, while the message tells the two apart.
    """


class GitLabTokenError(ValueError):
    """The API token is not where the configuration says. The message names the place, never the value."""


def token_from(env: str | None, file: str | None) -> str:
    """The GitLab API token from an environment variable or a file (env first), stripped of surrounding space.

    Never from argv (visible to every user in `ps`). Raises `GitLabTokenError` naming the variable or the file.
    """
    if env is None and file is None:
        raise GitLabTokenError("no GitLab API token configured: set token_env or token_file")
    problems: list[str] = []
    if env is not None:
        value = os.environ.get(env)
        if value and value.strip():
            return value.strip()
        problems.append(f"environment variable {env} is {'empty' if value is not None else 'not set'}")
    if file is not None:
        try:
            value = _read_token_file(file)
        except OSError as exc:
            problems.append(f"token file {file} cannot be read: {exc.strerror or type(exc).__name__}")
        else:
            if value:
                return value
            problems.append(f"token file {file} is empty")
    raise GitLabTokenError("no GitLab API token: " + "; ".join(problems))


def _read_token_file(file: str) -> str:
    with open(file, encoding="utf-8") as handle:
        return handle.read().strip()


# --- the rate bound


class TokenBucket:
    """At most `burst` requests at once, then `rate` per second, shared by every thread using the client.

    A reservation bucket: each caller takes a token (the balance may go negative) and sleeps off its own debt
    outside the lock, so concurrent callers are served in arrival order and none spins.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._last = clock()

    def acquire(self) -> float:
        """Take one token, waiting if needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# Job status reads (revocation of jobs whose webhook was missed) get this share of `requests_per_second`, the
# inventory the rest: a burst of jobs seen at the gateways after a restart never delays the re-read a webhook
# asked for, and the bound on GitLab as a whole is unchanged.
JOB_ENDPOINT = "/projects/:id/jobs/:id"
JOB_SHARE = 0.25


def _shares(rate: float) -> tuple[TokenBucket, TokenBucket]:
    inventory, jobs = rate * (1 - JOB_SHARE), rate * JOB_SHARE
    return TokenBucket(inventory, burst=max(1, int(inventory))), TokenBucket(jobs, burst=max(1, int(jobs)))


# --- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits between half and all of min(cap, base * 2**n).

    The jitter spreads the retries of several control planes (or threads) hitting a recovering GitLab at once.
    """

    max_retries: int = 5
    base_seconds: float = 0.1
    cap_seconds: float = 5.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0**attempt)
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """GitLab's wait hint on a 429: `Retry-After` (seconds or an HTTP date), else `RateLimit-Reset` (unix time)."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - now)
            except (TypeError, ValueError):
                pass
    reset = headers.get("RateLimit-Reset")
    if reset:
        try:
            return max(0.0, float(reset) - now)
        except ValueError:
            pass
    return None


# --- endpoint labels

# Collections whose next path segment is a value (an id, a url-encoded path, a sha, a name), and its placeholder.
_VALUE_AFTER = {
    "groups": ":id",
    "projects": ":id",
    "users": ":id",
    "hooks": ":id",
    "environments": ":id",
    "jobs": ":id",
    "pipelines": ":id",
    "merge_requests": ":iid",
    "files": ":path",
    "commits": ":sha",
    "statuses": ":sha",
    "blobs": ":sha",
    "branches": ":name",
    "tags": ":name",
    "protected_branches": ":name",
    "protected_tags": ":name",
    "protected_environments": ":name",
}
_WORDS = frozenset(
    {
        *_VALUE_AFTER,
        "repository",
        "tree",
        "raw",
        "descendant_groups",
        "subgroups",
        "deployments",
        "members",
        "version",
        "metadata",
        "user",
    }
)


def endpoint_template(path: str, prefix: str = API_PREFIX) -> str:
    """`/api/v4/projects/acme%2Fapp/repository/branches` -> `/projects/:id/repository/branches`.

    A segment is kept only when it is a known resource word in a word position; anything else becomes a
    placeholder, so no id, path, branch or file name can ever reach a metric label.
    """
    if not path.startswith(prefix + "/"):
        return "other"
    out: list[str] = []
    previous = ""
    for segment in path[len(prefix) + 1 :].split("/"):
        if previous in _VALUE_AFTER:
            out.append(_VALUE_AFTER[previous])
            previous = ""
        elif segment in _WORDS:
            out.append(segment)
            previous = segment
        else:
            out.append(":param")
            previous = ""
    return "/" + "/".join(out)


# --- the HTTP session python-gitlab uses


class GitLabTransport(requests.Session):
    """Every request python-gitlab makes passes through `send`: rate bound, retries and metrics in one place.

    Answers it gives back are final: 2xx, or a 4xx python-gitlab turns into its own error (a 404 means "absent").
    429 and transient failures are retried here and end in `GitLabUnavailable` when retries run out.
    """

    def __init__(
        self, *, api_prefix: str, bucket: TokenBucket, retry: RetryPolicy, job_bucket: TokenBucket | None = None
    ) -> None:
        # trust_env stays on: operators reach GitLab through HTTPS_PROXY / NO_PROXY and custom CAs through
        # REQUESTS_CA_BUNDLE; .netrc never applies, python-gitlab always sends its own PRIVATE-TOKEN auth.
        super().__init__()
        self.api_prefix = api_prefix
        self.bucket = bucket
        self.job_bucket = job_bucket or bucket  # job status reads (JOB_ENDPOINT) take their own share
        self.retry = retry

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        endpoint = endpoint_template(urlsplit(request.url or "").path, self.api_prefix)
        what = f"{request.method} {endpoint}"
        bucket = self.job_bucket if endpoint == JOB_ENDPOINT else self.bucket
        attempt = 0
        while True:
            bucket.acquire()
            response, outcome = self._send_once(request, endpoint, **kwargs)
            wait = self._retry_wait(what, response, outcome, attempt)
            if wait is None:
                assert response is not None  # _retry_wait raises on a final failure
                return response
            if response is not None:
                response.close()
            attempt += 1
            time.sleep(wait)

    def _send_once(
        self, request: requests.PreparedRequest, endpoint: str, **kwargs: Any
    ) -> tuple[requests.Response | None, str]:
        """One HTTP exchange, measured: the response (None if there was none) and what happened, for messages."""
        started = time.perf_counter()
        try:
            response = super().send(request, **kwargs)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            GITLAB_REQUESTS.labels(endpoint, "error").inc()
            return None, type(exc).__name__
        finally:
            GITLAB_REQUEST_DURATION.labels(endpoint).observe(time.perf_counter() - started)
        GITLAB_REQUESTS.labels(endpoint, str(response.status_code)).inc()
        return response, f"HTTP {response.status_code}"

    def _retry_wait(self, what: str, response: requests.Response | None, outcome: str, attempt: int) -> float | None:
        """Seconds to wait before retrying; None when the response is final. Raises when retries run out."""
        if response is not None and response.status_code == 429:
            return self._rate_limit_wait(what, response, attempt)
        if response is not None and response.status_code not in TRANSIENT_STATUSES:
            return None
        if attempt >= self.retry.max_retries:
            raise GitLabUnavailable(f"GitLab unavailable: {what}: {outcome} after {attempt + 1} attempts")
        wait = self.retry.backoff(attempt)
        log.info("GitLab %s: %s; retry %d/%d in %.2fs", what, outcome, attempt + 1, self.retry.max_retries, wait)
        return wait

    def _rate_limit_wait(self, what: str, response: requests.Response, attempt: int) -> float:
        hinted = retry_after_seconds(response.headers, time.time())
        wait = self.retry.backoff(attempt) if hinted is None else hinted
        if attempt >= self.retry.max_retries or wait > MAX_RETRY_AFTER_SECONDS:
            raise GitLabUnavailable(
                f"GitLab rate limit: {what}: HTTP 429 (Retry-After {wait:.0f}s) after {attempt + 1} attempts"
            )
        GITLAB_RATE_LIMIT_WAITS.inc()
        GITLAB_RATE_LIMIT_WAIT_SECONDS.inc(wait)
        log.info("GitLab %s: rate limited (429); waiting %.2fs as asked", what, wait)
        return wait


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
        requests_per_second: float = 10.0,
        max_retries: int = 5,
        timeout: float = 10.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.bucket, self.job_bucket = _shares(requests_per_second)
        self.transport = GitLabTransport(
            api_prefix=urlsplit(self.api_url).path + API_PREFIX,
            bucket=self.bucket,
            job_bucket=self.job_bucket,
            retry=RetryPolicy(max_retries=max_retries),
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
            message = str(exc.error_message)[:200]
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
            archived=bool(attrs.get("archived", False)),
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
