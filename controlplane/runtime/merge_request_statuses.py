"""The `controlplane` commit status on the heads of open merge requests into the watched policy branch.

The default branch's head gets its status when serve reads it (sources/gitlab_policy.py). A reviewer needs the
verdict before the merge, on the MR's head, so the leader also lists the open merge requests targeting that
branch and judges each head (runtime/policy_check.py) against GitLab as it is now: read-only, in its own
resolution and compile, never published, never served. `success` says the policy is valid (and not served until
merged); `failed` names the first error and its file:line.

Bounded: at most `max_requests` heads judged per round (the most recently updated without a verdict, looked for in
at most `MAX_PAGES` API pages), each head judged once (a bounded memory of the shas seen, oldest forgotten
first), one round every `every` seconds; a head weighs at most half again the served policy (or 1 MiB), and names
at most `MAX_UNWATCHED` projects and groups beyond the watches. A GitLab error ends the round: the next waits
longer (exponential backoff up to `BACKOFF.cap_seconds`), and is counted. Only the leader posts, as for the
default branch. Merge requests from forks are left out: their commits live in the fork, where this token may not
read or post.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prometheus_client import Counter

from controlplane.model.errors import PolicyInvalid
from controlplane.model.policy import Policy
from controlplane.retry import Backoff
from controlplane.runtime.policy_check import LiveInputs, check_policy_files, first_error_line
from controlplane.sources.gitlab_client import GitLabRefused, GitLabUnavailable
from controlplane.sources.gitlab_repo import PolicyRepo, PolicyRepoError, StatusState
from controlplane.sources.policy_dir import ReadLimits
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.policy")

MR_STATUSES = Counter(
    "controlplane_merge_request_statuses_total",
    "Commit statuses posted on merge-request heads (`success`, `failed`), and rounds ended by a GitLab error "
    "(`error`).",
    ["result"],
    registry=REGISTRY,
)
DEFAULT_MAX_REQUESTS = 20
MAX_PAGES = 5  # pages of `max_requests` open MRs looked through per round for heads without a verdict
HEAD_FLOOR_BYTES = 1024 * 1024  # a head may always weigh this much (a new policy project's first MRs)
HEAD_GROWTH = 1.5  # or this many times the served tree
MAX_UNWATCHED = 20  # projects and groups a head may name beyond serve's watches: each is read for it
BACKOFF = Backoff(base_seconds=5.0, cap_seconds=600.0)


class MergeRequestStatuses:
    """Judges the heads of open merge requests into the policy project's default branch, and posts the verdict."""

    def __init__(
        self,
        repo: PolicyRepo,
        *,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        is_leader: Callable[[], bool] = lambda: True,
        backoff: Backoff = BACKOFF,
        live: Callable[[Policy], LiveInputs] | None = None,
        served_bytes: Callable[[], int] | None = None,
    ) -> None:
        """`repo`: its own `PolicyRepo` (sharing the client, its rate bound and retries), so the trees read here
        never replace the blobs the served policy's reader keeps. `live`: GitLab's state now for a head's `api:`
        issuers (called in the worker thread; serve reads what a head names beyond its watches, read-only); without
        it a head is judged as `validate --offline` judges it. `served_bytes`: the size of the served tree; a head
        may weigh at most `HEAD_GROWTH` times it (at least `HEAD_FLOOR_BYTES`), within `repo`'s own bounds."""
        self.served_bytes = served_bytes
        self.live = live
        self.repo = repo
        self.max_requests = max_requests
        self.is_leader = is_leader
        self.backoff = backoff
        self._judged: OrderedDict[str, None] = OrderedDict()  # shas whose status is posted, oldest first
        self._remember = (MAX_PAGES + 1) * max_requests  # every head a round looks at, and those it posts on
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Run a round now (a merge-request webhook, a test) instead of at the end of the wait."""
        self._wake.set()

    def check_once(self) -> int:
        """One round (blocking: run it in a thread). Returns the statuses posted; raises `GitLabUnavailable`."""
        posted = 0
        for request, sha in self._unjudged():
            if not self.is_leader():  # leadership lost during the round (judging takes a while): the new leader posts
                break
            try:
                judged_before = self.repo.has_status(sha)  # before a restart, or by the previous leader
                if not judged_before:
                    self._post(request, sha)
            except GitLabRefused as error:  # this one MR (a vanished commit...): the others still get theirs
                MR_STATUSES.labels("error").inc()
                log.warning("merge-request statuses: !%s: %s", request.attributes.get("iid"), error)
                continue
            self._judged[sha] = None
            while len(self._judged) > self._remember:
                self._judged.popitem(last=False)
            posted += 0 if judged_before else 1
        return posted

    def _unjudged(self) -> list[tuple[Any, str]]:
        """Up to `max_requests` open MRs whose head has no verdict yet, most recently updated first, looked for
        in at most `MAX_PAGES` pages of `max_requests`: the MRs updated most recently (a few busy ones, or many
        opened at once) do not keep an older MR from ever getting its verdict. The heads seen keep their place
        in the memory, so an open MR's verdict is not forgotten and posted again."""
        branch, served = self.repo.head()
        project = self.repo.source.gl.projects.get(self.repo.project, lazy=True)
        found: list[tuple[Any, str]] = []
        for page in range(1, MAX_PAGES + 1):
            with self.repo.source.errors_as_unavailable():
                requests = project.mergerequests.list(
                    state="opened",
                    target_branch=branch,
                    order_by="updated_at",
                    sort="desc",
                    per_page=self.max_requests,
                    page=page,
                )
            for request in requests[: self.max_requests]:
                sha = request.attributes.get("sha")
                if not sha or _from_fork(request) or sha == served:
                    continue  # the branch's own head: its status is the served verdict's, posted by the reader
                if str(sha) in self._judged:
                    self._judged.move_to_end(str(sha))
                elif len(found) < self.max_requests:
                    found.append((request, str(sha)))
            if len(found) >= self.max_requests or len(requests) < self.max_requests:
                break
        return found

    def _post(self, request: Any, sha: str) -> None:
        iid = request.attributes.get("iid")
        state: StatusState
        try:
            texts = self.repo.read_tree(sha, self._head_limits())
            check_policy_files(texts, self.live)
        except PolicyInvalid as invalid:
            state, description = "failed", first_error_line(invalid.errors, invalid.total)
        except GitLabUnavailable:
            raise
        except Exception as error:  # a bug judging it: failed, one line, as validate reports it
            state, description = "failed", f"internal error: {type(error).__name__}: {error}"
        else:
            state, description = "success", f"policy valid (merge request !{iid}; served once merged)"
        self.repo.post_status(sha, state, description)
        MR_STATUSES.labels(state).inc()
        log.info("posted %s status on %s@%s (merge request !%s)", state, self.repo.project, sha[:12], iid)

    def _head_limits(self) -> ReadLimits:
        """A head is anyone's: parsing and compiling it costs the leader ~60 times its size in memory and seconds
        of CPU per MiB (measured: 28 MiB of bindings, 1.75 GB and 143 s), in the process that serves Envoy. So a
        head may weigh no more than the served policy grown by half again and a floor, not the full tree bound."""
        limits = self.repo.limits
        if self.served_bytes is None:
            return limits
        cap = max(HEAD_FLOOR_BYTES, int(HEAD_GROWTH * self.served_bytes()))
        return replace(limits, max_tree_bytes=min(limits.max_tree_bytes, cap))

    async def run(self, every: float, stopping: asyncio.Event) -> None:
        """Rounds until `stopping`; never raises (a GitLab outage waits and retries, counted)."""
        failures = 0
        while not stopping.is_set():
            wait = every
            self._wake.clear()  # a wake from now on (during the round too) starts the next round at once
            if self.is_leader():
                try:
                    await asyncio.to_thread(self.check_once)
                    failures = 0
                except (GitLabUnavailable, PolicyRepoError) as error:
                    MR_STATUSES.labels("error").inc()
                    wait = max(every, self.backoff.delay(failures))
                    failures += 1
                    log.warning("merge-request statuses: %s; next round in %.0f s", error, wait)
            await self._sleep(wait, stopping)

    async def _sleep(self, seconds: float, stopping: asyncio.Event) -> None:
        woken = asyncio.ensure_future(self._wake.wait())
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({woken, stop}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (woken, stop):
            waiter.cancel()


def _from_fork(request: Any) -> bool:
    """A fork's commits are not in the policy project: neither its tree nor a status on it can be reached here."""
    attributes = request.attributes
    return bool(attributes.get("source_project_id") != attributes.get("target_project_id"))
