"""Follows the GitLab instances the policy names, and the policy project if the policy lives on GitLab.

One inventory watcher per GitLab issuer that has an `api:` block; the groups and projects it reads are the
ones the policy names (plus the issuer's configured groups, plus every project id a path was pinned to, so a
renamed project is still read by id while its old path shows who owns that path now). Webhook events become
targeted re-syncs of what they name; a push to the policy project's default branch becomes a policy reload.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from controlplane.model.inventory import Inventory
from controlplane.model.policy import GitLabApi, Issuer, IssuerKind, Policy
from controlplane.runtime.supervisor import Spawn
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import token_from
from controlplane.sources.gitlab_events import GitLabEvent, GroupEvent, PipelineEvent, ProjectEvent, PushEvent
from controlplane.sources.gitlab_watch import InventorySource, InventoryWatcher, Scope

log = logging.getLogger("controlplane.gitlab")

SourceFactory = Callable[[GitLabApi], InventorySource]

# How long a policy waits for GitLab to read the projects and groups it adds before it is judged.
NEW_SUBJECTS_TIMEOUT = 60.0


@runtime_checkable
class JobStatusSource(Protocol):
    """A source that can also say whether a CI job finished (`GitLabSource`)."""

    def fetch_job_status(self, project_id: str, job_id: str) -> str | None: ...


def gitlab_source(api: GitLabApi) -> GitLabSource:
    """The production source: the token is read from the environment or a file, never from the policy."""
    return GitLabSource(api.url, token_from(api.token_env, api.token_file), requests_per_second=api.requests_per_second)


@dataclass
class _Watch:
    api: GitLabApi
    issuer_url: str  # the tokens' `iss`
    watcher: InventoryWatcher
    task: asyncio.Task[None]


@dataclass(frozen=True)
class PolicyProject:
    """Where the policy lives on GitLab: pushes to its default branch reload the policy."""

    project: str | int
    default_branch: str | None = None


class GitLabLink:
    def __init__(
        self,
        *,
        on_inventory_change: Callable[[], Awaitable[object]],
        spawn: Spawn,
        on_policy_push: Callable[[], Awaitable[object]] | None = None,
        policy_project: PolicyProject | None = None,
        source_factory: SourceFactory = gitlab_source,
        on_reachable: Callable[[str], None] | None = None,
    ) -> None:
        self.on_inventory_change = on_inventory_change
        self.on_reachable = on_reachable  # an issuer's GitLab answers again after an outage (its name)
        self.on_policy_push = on_policy_push
        self.policy_project = policy_project
        self.source_factory = source_factory
        self._spawn = spawn  # a watcher that dies stops the process (supervisor.py); one unwatched is cancelled
        self._watches: dict[str, _Watch] = {}
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # where the watchers run

    def inventories(self) -> dict[str, Inventory]:
        return {name: w.watcher.inventory for name, w in self._watches.items()}

    def follow(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> None:
        """Watch exactly the GitLab issuers of the policy in service, each over what the policy names."""
        self._loop = asyncio.get_running_loop()
        wanted = {i.name: i for i in policy.issuers if i.kind is IssuerKind.GITLAB and i.api is not None}
        for name in sorted(set(self._watches) - set(wanted)):
            self._unwatch(name)
        for name, issuer in sorted(wanted.items()):
            assert issuer.api is not None
            watch = self._watches.get(name)
            if watch is not None and (watch.api != issuer.api or watch.issuer_url != issuer.url):
                self._unwatch(name)
                watch = None
            if watch is None:
                watch = self._watch(issuer, issuer.api)
            watch.watcher.set_scope(_scope(policy, issuer, pins.get(name, {})))

    async def widen(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> str | None:
        """Read from each watched GitLab what `policy` names beyond the watched set (see `InventoryWatcher.widen`).

        Issuers the policy adds, or whose `api:` it changes, get their watcher once it is accepted: until their
        first read their bindings are withdrawn, never judged. Returns why GitLab could not be read, if so.
        """
        problems = []
        for name, watch in sorted(self._watches.items()):
            issuer = next((i for i in policy.issuers if i.name == name and i.api == watch.api), None)
            if issuer is not None:
                problem = await watch.watcher.widen(_scope(policy, issuer, pins.get(name, {})))
                problems.extend([problem] if problem else [])
        return "; ".join(problems) or None

    def read_new_subjects(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> str | None:
        """`widen`, from the policy service's worker thread: run on the watchers' loop, waited for here (bounded).

        On the loop's own thread (a synchronous reload) it cannot be waited for, and nothing is read.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or _on_loop_thread():
            return None
        future = asyncio.run_coroutine_threadsafe(self.widen(policy, pins), loop)
        try:
            return future.result(timeout=NEW_SUBJECTS_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return (
                f"GitLab reads did not finish within {NEW_SUBJECTS_TIMEOUT:.0f}s (a long reconcile may be running) "
                "while reading what the policy adds"
            )

    def _watch(self, issuer: Issuer, api: GitLabApi) -> _Watch:
        watcher = InventoryWatcher(
            issuer.name,
            self.source_factory(api),
            on_change=self.on_inventory_change,
            reconcile_seconds=api.reconcile_seconds,
            max_staleness_seconds=api.max_staleness_seconds,
            on_reachable=None if self.on_reachable is None else functools.partial(self.on_reachable, issuer.name),
        )
        task = self._spawn(watcher.run(self._stop), name=f"gitlab-watch-{issuer.name}")
        watch = _Watch(api, issuer.url, watcher, task)
        self._watches[issuer.name] = watch
        log.info("watching GitLab %s for issuer %s", api.url, issuer.name)
        return watch

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name)
        watch.task.cancel()
        watch.watcher.close()

    async def on_event(self, event: GitLabEvent) -> None:
        """Route a webhook event to the re-sync it calls for (see the module docstring)."""
        if isinstance(event, PushEvent):
            if self._is_policy_push(event) and self.on_policy_push is not None:
                await self.on_policy_push()
            self._resync_project(event.project_id)
        elif isinstance(event, ProjectEvent):
            if event.event_name in ("project_create", "project_transfer"):
                self._resync_all()  # may enter or leave a watched group
            else:
                self._resync_project(event.project_id, even_unknown=event.event_name == "project_rename")
        elif isinstance(event, GroupEvent):
            self._resync_all()
        elif isinstance(event, PipelineEvent):
            self._resync_project(event.project_id)  # deployments create environments

    def _is_policy_push(self, event: PushEvent) -> bool:
        target = self.policy_project
        if target is None or event.is_tag:
            return False
        named = target.project in (event.project_id, event.project_path, str(event.project_id))
        branch = target.default_branch
        return named and (branch is None or event.ref == f"refs/heads/{branch}")

    def _resync_project(self, project_id: int, *, even_unknown: bool = False) -> None:
        for watch in self._watches.values():
            known = any(p.id == project_id for p in watch.watcher.inventory.projects)
            if known or even_unknown or project_id in watch.watcher.scope.projects:
                watch.watcher.request_project(project_id)

    def _resync_all(self) -> None:
        for watch in self._watches.values():
            watch.watcher.request_full()

    def job_status_reader(self, issuer_url: str | None) -> Callable[[str, str], str | None] | None:
        """How to ask GitLab for a job's status: through the client of the watched issuer whose tokens carry
        `issuer_url` (its rate bound and retries), or, when the issuer is not known, of the only one watched.
        None when no such GitLab is read through its API (an `inventory:` file cannot tell)."""
        if issuer_url is None:
            watches = list(self._watches.values()) if len(self._watches) == 1 else []
        else:
            watches = [w for w in self._watches.values() if w.issuer_url == issuer_url]
        source = watches[0].watcher.source if watches else None
        return source.fetch_job_status if isinstance(source, JobStatusSource) else None

    async def settled(self, timeout: float) -> None:
        """Wait (bounded) until every watcher has tried GitLab once, so a restarted control plane does not
        push withdrawn access to Envoys that hold good config while the first inventory is being read."""
        waits = [w.watcher.settled.wait() for w in self._watches.values()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
            except TimeoutError:
                log.warning("GitLab not read within %.0fs of start: its bindings stay withdrawn until it is", timeout)

    def status(self) -> list[dict[str, object]]:
        return [w.watcher.status() for _, w in sorted(self._watches.items())]

    async def stop(self) -> None:
        self._stop.set()
        tasks = [w.task for w in self._watches.values()]
        for watch in self._watches.values():
            watch.task.cancel()
            watch.watcher.close()
        self._watches.clear()
        await asyncio.gather(*tasks, return_exceptions=True)


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _scope(policy: Policy, issuer: Issuer, pins: Mapping[str, int]) -> Scope:
    assert issuer.api is not None
    groups: set[str | int] = set(issuer.api.groups)
    projects: set[str | int] = set(pins.values())
    for binding in policy.bindings:
        if binding.issuer != issuer.name:
            continue
        for subject in binding.subjects:
            groups.update(subject.groups)
            projects.update(subject.projects)  # paths too: a path taken over by another project must be seen
    return Scope(frozenset(groups), frozenset(projects))
