"""How the control plane talks to a GitLab API: the token, the errors, and the HTTP session every request
python-gitlab makes goes through (`GitLabTransport`).

Robustness lives in that one session: a client-side token bucket (`rate_limit.py`) bounds the request rate, 429
answers are obeyed (Retry-After), transient failures (5xx, connection errors) are retried with exponential
backoff and jitter (`controlplane.retry`), and each request is counted by endpoint template. When retries run
out it raises `GitLabUnavailable`, which the watcher answers by keeping its last good inventory. python-gitlab's
own retry loop is left off, so retries never multiply and every one is bounded.

The API token is only ever a header: never in an exception message, a log line, a repr or argv.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from controlplane.retry import Backoff, RetryPolicy, retry_after_seconds
from controlplane.sources.gitlab_metrics import (
    GITLAB_RATE_LIMIT_WAIT_SECONDS,
    GITLAB_RATE_LIMIT_WAITS,
    GITLAB_REQUEST_DURATION,
    GITLAB_REQUESTS,
)
from controlplane.sources.rate_limit import TokenBucket

log = logging.getLogger("controlplane.gitlab")

__all__ = [
    "API_PREFIX",
    "BACKOFF",
    "JOB_ENDPOINT",
    "GitLabRefused",
    "GitLabTokenError",
    "GitLabTransport",
    "GitLabUnavailable",
    "endpoint_template",
    "token_from",
]

# 5xx GitLab (and Cloudflare in front of gitlab.com) answers while it is restarting or overloaded.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504, *range(520, 531)})
# A Retry-After longer than this is treated as an outage: the caller keeps its last good data and comes back later
# instead of blocking a reconcile for an hour.
MAX_RETRY_AFTER_SECONDS = 60.0
API_PREFIX = "/api/v4"
# 0.1 s, 0.2 s, 0.4 s... up to 5 s, jittered: a few seconds in all before an outage is declared.
BACKOFF = Backoff(base_seconds=0.1, cap_seconds=5.0)


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
# --- endpoint labels

# The template of a job status read, which takes its own share of the rate bound (`rate_limit.split_rate`).
JOB_ENDPOINT = "/projects/:id/jobs/:id"

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
        if self.retry.exhausted(attempt):
            raise GitLabUnavailable(f"GitLab unavailable: {what}: {outcome} after {attempt + 1} attempts")
        wait = self.retry.backoff.delay(attempt)
        log.info("GitLab %s: %s; retry %d/%d in %.2fs", what, outcome, attempt + 1, self.retry.max_retries, wait)
        return wait

    def _rate_limit_wait(self, what: str, response: requests.Response, attempt: int) -> float:
        hinted = retry_after_seconds(response.headers, time.time())
        wait = self.retry.backoff.delay(attempt) if hinted is None else hinted
        if self.retry.exhausted(attempt) or wait > MAX_RETRY_AFTER_SECONDS:
            raise GitLabUnavailable(
                f"GitLab rate limit: {what}: HTTP 429 (Retry-After {wait:.0f}s) after {attempt + 1} attempts"
            )
        GITLAB_RATE_LIMIT_WAITS.inc()
        GITLAB_RATE_LIMIT_WAIT_SECONDS.inc(wait)
        log.info("GitLab %s: rate limited (429); waiting %.2fs as asked", what, wait)
        return wait
