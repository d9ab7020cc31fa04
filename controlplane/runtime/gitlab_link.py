"""Follows the GitLab instances the policy names, and the policy project if the policy lives on GitLab.

One inventory watcher per GitLab issuer that has an `api:` block; the groups and projects it reads are the
ones the policy names (plus the issuer's configured groups, plus every project id a path was pinned to, so a
renamed project is still read by id while its old path shows who owns that path now). Webhook events become
targeted re-syncs of what they name; a push to the policy project's default branch becomes a policy reload.

With a shared store (`share`, an `InventoryTable`) only the leader (`is_leader`) runs the watchers and reads
GitLab; it writes each inventory it reads to the table. Followers run no watcher: they mirror the table (at
start, on each change notification, after each reconnect of the change feed) and hand the policy service the
inventories exactly as the leader's watchers would (the same `on_inventory_change`, the same staleness
arithmetic from the same read time), so every replica compiles the same inputs. A webhook that reaches a
follower becomes a re-sync request the leader hears (`InventoryTable.request_resync`). Without a share (`--store
file`) the process is always the leader, as before. Per-request reads (`job_status_reader`) stay on every
replica: the sources exist on followers too, they only never read inventory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.inventory import Group, Inventory, Project
from controlplane.model.policy import GitLabApi, Issuer, IssuerKind, Policy
from controlplane.retry import Backoff
from controlplane.runtime.supervisor import Spawn
from controlplane.sources.gitlab import GitLabSource
from controlplane.sources.gitlab_client import token_from
from controlplane.sources.gitlab_events import (
    GitLabEvent,
    GroupEvent,
    MergeRequestEvent,
    PipelineEvent,
    ProjectEvent,
    PushEvent,
)
from controlplane.sources.gitlab_watch import InventorySource, InventoryWatcher, Scope
from controlplane.sources.inventory_table import InventoryTable, content_hash
from controlplane.store.pool import StoreUnavailable

log = logging.getLogger("controlplane.gitlab")

SourceFactory = Callable[[GitLabApi], InventorySource]

# How long a policy waits for GitLab to read the projects and groups it adds before it is judged.
NEW_SUBJECTS_TIMEOUT = 60.0
# How long a follower waits for the leader to share what a new policy names before judging it.
FOLLOWER_WIDEN_WAIT = 15.0
SHARE_RETRY = Backoff(0.5, 10.0)


@runtime_checkable
class JobStatusSource(Protocol):
    """A source that can also say whether a CI job finished (`GitLabSource`)."""

    def fetch_job_status(self, project_id: str, job_id: str) -> str | None: ...


def gitlab_source(api: GitLabApi) -> GitLabSource:
    """The production source: the token is read from the environment or a file, never from the policy."""
    return GitLabSource(api.url, token_from(api.token_env, api.token_file), requests_per_second=api.requests_per_second)


@dataclass
class _Source:
    api: GitLabApi
    issuer_url: str  # the tokens' `iss`
    source: InventorySource


@dataclass
class _Watch:
    watcher: InventoryWatcher
    task: asyncio.Task[None]


@dataclass
class _Mirror:
    """A follower's copy of one issuer's row: judged stale by the same rule as the leader's watcher."""

    content_hash: str
    base: Inventory  # as read by the leader; fetched_at is its read time
    view: Inventory | None = None  # the last one handed out (same object while unchanged: the memo stays warm)

    def inventory(self, max_staleness: float | None, now: float) -> Inventory:
        read_at = self.base.fetched_at
        stale = read_at is None or (max_staleness is not None and now - read_at > max_staleness)
        if self.view is None or self.view.fetched_at != self.base.fetched_at or self.view.stale != stale:
            self.view = replace(self.base, stale=stale)
        return self.view


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
        share: InventoryTable | None = None,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
        follower_widen_wait: float = FOLLOWER_WIDEN_WAIT,
    ) -> None:
        self.on_inventory_change = on_inventory_change
        self.on_reachable = on_reachable  # an issuer's GitLab answers again after an outage (its name)
        self.on_policy_push = on_policy_push
        # Set by serve when it posts statuses on merge requests' heads: told of the policy project's other activity.
        self.on_merge_request: Callable[[], None] | None = None
        self.policy_project = policy_project
        self.source_factory = source_factory
        self.share = share
        self.clock = clock
        self.follower_widen_wait = follower_widen_wait
        self._spawn = spawn  # a watcher that dies stops the process (supervisor.py); one unwatched is cancelled
        self._leading = share is None or is_leader()
        self._sources: dict[str, _Source] = {}  # the GitLab issuers of the policy in service
        self._watches: dict[str, _Watch] = {}  # the leader's
        self._mirrors: dict[str, _Mirror] = {}  # the followers'
        self._followed: tuple[Policy, Mapping[str, Mapping[str, int]]] | None = None
        self._told: dict[str, tuple[str | None, bool]] = {}  # follower: (hash, stale) last told per issuer
        self._written: dict[str, Inventory] = {}  # leader: the inventory object last written per issuer
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()  # the share loop: something to write, re-read or tell
        self._mirrored = asyncio.Event()  # follower: the table was read once
        self._mirror_changed = asyncio.Event()
        self._reread_due = True
        self._share_failures = 0
        self.share_error: str | None = None
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # where the watchers run

    @property
    def leading(self) -> bool:
        return self._leading

    def inventories(self) -> dict[str, Inventory]:
        if self._leading:
            return {name: w.watcher.inventory for name, w in self._watches.items()}
        now = self.clock()
        return {
            name: m.inventory(self._sources[name].api.max_staleness_seconds, now)
            for name, m in self._mirrors.items()
            if name in self._sources
        }

    def follow(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> None:
        """Follow exactly the GitLab issuers of the policy in service, each over what the policy names: the
        leader watches them, a follower mirrors their rows."""
        self._loop = asyncio.get_running_loop()
        self._followed = (policy, pins)
        wanted = {i.name: i for i in policy.issuers if i.kind is IssuerKind.GITLAB and i.api is not None}
        for name in sorted(set(self._sources) - set(wanted)):
            self._drop(name)
        for name, issuer in sorted(wanted.items()):
            assert issuer.api is not None
            source = self._sources.get(name)
            if source is not None and (source.api != issuer.api or source.issuer_url != issuer.url):
                self._drop(name)
                source = None
            if source is None:
                source = self._sources[name] = _Source(issuer.api, issuer.url, self.source_factory(issuer.api))
                self._told[name] = (None, True)  # the service starts with "never read"
            if self._leading:
                watch = self._watches.get(name) or self._watch(name, source)
                watch.watcher.set_scope(_scope(policy, issuer, pins.get(name, {})))
        self._wake.set()  # a follower tells the service about issuers it now follows

    async def widen(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> str | None:
        """Read from each watched GitLab what `policy` names beyond the watched set (see `InventoryWatcher.widen`).

        Issuers the policy adds, or whose `api:` it changes, get their watcher once it is accepted: until their
        first read their bindings are withdrawn, never judged. Returns why GitLab could not be read, if so.
        A follower reads nothing: it waits (bounded) until the leader's rows hold what the policy names.
        """
        if not self._leading:
            await self._await_shared(policy, pins)
            return None
        problems = []
        for name, watch in sorted(self._watches.items()):
            api = self._sources[name].api
            issuer = next((i for i in policy.issuers if i.name == name and i.api == api), None)
            if issuer is not None:
                problem = await watch.watcher.widen(_scope(policy, issuer, pins.get(name, {})))
                problems.extend([problem] if problem else [])
        return "; ".join(problems) or None

    async def _await_shared(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> None:
        deadline = time.monotonic() + self.follower_widen_wait
        while True:
            self._mirror_changed.clear()
            unread = self._unshared(policy, pins)
            left = deadline - time.monotonic()
            if not unread or left <= 0:
                if unread:
                    log.warning("the leader has not shared %s yet: judging the policy without them", unread)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._mirror_changed.wait(), left)

    def _unshared(self, policy: Policy, pins: Mapping[str, Mapping[str, int]]) -> list[str]:
        """What `policy` names that no mirrored row holds (issuers never read are judged stale, not missing)."""
        unread = []
        for name, mirror in sorted(self._mirrors.items()):
            issuer = next((i for i in policy.issuers if i.name == name and i.api is not None), None)
            if issuer is None:
                continue
            scope = _scope(policy, issuer, pins.get(name, {}))
            have = mirror.base
            unread += [f"{name}:{g}" for g in scope.groups if not any(g in (x.id, x.path) for x in have.groups)]
            unread += [f"{name}:{p}" for p in scope.projects if not any(p in (x.id, x.path) for x in have.projects)]
        return unread

    def inventories_for(
        self, policy: Policy, pins: Mapping[str, Mapping[str, int]], max_unwatched: int | None = None
    ) -> dict[str, Inventory]:
        """Read-only, blocking (a worker thread): the inventories in use, plus what `policy` names beyond them read
        from GitLab now, without widening any watch. How a candidate that is never served (a merge request's
        head) is judged against GitLab as it is; raises `GitLabUnavailable` when GitLab cannot be read, and
        `PolicyInvalid` (nothing read) when `policy` names more than `max_unwatched` projects and groups beyond
        the watches: whoever writes the candidate (anyone opening an MR) chooses what serve reads, with the
        budget the watches share."""
        out = self.inventories()
        unwatched: dict[str, tuple[_Source, list[str | int], list[str | int]]] = {}
        for name, inventory in out.items():
            source = self._sources.get(name)
            issuer = next((i for i in policy.issuers if source and i.name == name and i.api == source.api), None)
            if source is None or issuer is None or inventory.stale:
                continue
            scope = _scope(policy, issuer, pins.get(name, {}))
            groups = [g for g in scope.groups if not any(g in (x.id, x.path) for x in inventory.groups)]
            projects = [p for p in scope.projects if not any(p in (x.id, x.path) for x in inventory.projects)]
            if groups or projects:
                unwatched[name] = (source, groups, projects)
        count = sum(len(groups) + len(projects) for _, groups, projects in unwatched.values())
        if max_unwatched is not None and count > max_unwatched:
            message = (
                f"names {count} projects and groups no served policy watches: more than the {max_unwatched} read "
                "for a policy that is not served (propose fewer at a time)"
            )
            raise PolicyInvalid([PolicyError(".", 0, "", message)])
        for name, (source, groups, projects) in unwatched.items():
            inventory = out[name]
            extra = source.source.fetch_inventory(groups=groups, projects=projects)
            out[name] = replace(
                inventory,
                projects=tuple(sorted({p.id: p for p in (*inventory.projects, *extra.projects)}.values(), key=_id)),
                groups=tuple(sorted({g.id: g for g in (*inventory.groups, *extra.groups)}.values(), key=_id)),
            )
        return out

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

    def _watch(self, name: str, source: _Source) -> _Watch:
        api = source.api
        watcher = InventoryWatcher(
            name,
            source.source,
            on_change=functools.partial(self._changed, name),
            reconcile_seconds=api.reconcile_seconds,
            max_staleness_seconds=api.max_staleness_seconds,
            clock=self.clock,
            on_reachable=None if self.on_reachable is None else functools.partial(self.on_reachable, name),
            on_read=None if self.share is None else functools.partial(self._read_done, name),
        )
        mirror = self._mirrors.get(name)
        if mirror is not None:  # leadership moved here: carry on from what the previous leader read
            watcher.seed(mirror.base)
        task = self._spawn(watcher.run(self._stop), name=f"gitlab-watch-{name}")
        watch = _Watch(watcher, task)
        self._watches[name] = watch
        log.info("watching GitLab %s for issuer %s", api.url, name)
        return watch

    def _drop(self, name: str) -> None:
        self._sources.pop(name, None)
        self._mirrors.pop(name, None)
        self._told.pop(name, None)
        if name in self._watches:
            self._unwatch(name)

    def _unwatch(self, name: str) -> None:
        watch = self._watches.pop(name)
        watch.task.cancel()
        watch.watcher.close()

    # -- sharing through the store (leader writes, followers mirror)

    async def _changed(self, name: str) -> None:
        self._read_done(name)
        await self.on_inventory_change()

    def _read_done(self, name: str) -> None:
        if self.share is not None:
            self._dirty.add(name)
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """With a share: the leader writes what its watchers read; a follower re-reads the table when told and
        tells the policy service when an inventory changed or turned stale. Retries (backoff) while PostgreSQL
        is away; never raises StoreUnavailable."""
        if self.share is None:
            return
        while not stop.is_set():
            self._wake.clear()
            try:
                if self._leading:
                    await self._write_dirty()
                else:
                    if self._reread_due:
                        await self._reread()
                    await self._tell()
                self._share_failures, self.share_error = 0, None
                timeout = None if self._leading else self._next_stale_in()
            except StoreUnavailable as error:
                self._share_failures += 1
                self.share_error = str(error)
                log.warning("GitLab inventories not shared (retrying): %s", error)
                timeout = SHARE_RETRY.delay(self._share_failures - 1)
            await _wait(stop, self._wake, timeout)

    async def _write_dirty(self) -> None:
        assert self.share is not None
        for name in sorted(self._dirty):
            self._dirty.discard(name)  # before the write: a read made while it runs marks it again
            watch = self._watches.get(name)
            read = watch.watcher.last_read if watch is not None else None
            if read is not None and read is not self._written.get(name):
                try:
                    await self.share.write(name, read)
                except StoreUnavailable:
                    self._dirty.add(name)  # retried after the backoff
                    raise
                self._written[name] = read

    async def _reread(self) -> None:
        assert self.share is not None
        self._reread_due = False  # before the read: a notification that arrives while it runs asks again
        try:
            rows = await self.share.read({n: m.content_hash for n, m in self._mirrors.items()})
        except StoreUnavailable:
            self._reread_due = True
            raise
        for name, row in rows.items():
            mirror = self._mirrors.get(name)
            if row.inventory is not None:
                self._mirrors[name] = _Mirror(row.content_hash, row.inventory)
            elif mirror is not None and mirror.base.fetched_at != row.read_at:
                mirror.base = replace(mirror.base, fetched_at=row.read_at)
        self._mirrored.set()
        self._mirror_changed.set()

    async def _tell(self) -> None:
        """on_inventory_change when a followed issuer's content or staleness changed (as a watcher would)."""
        current = {name: self._state(name) for name in self._sources}
        if any(self._told.get(name) != state for name, state in current.items()):
            self._told.update(current)
            await self.on_inventory_change()

    def _state(self, name: str) -> tuple[str | None, bool]:
        """What the policy service was told of a followed issuer: its content (hash) and staleness."""
        mirror = self._mirrors.get(name)
        if mirror is None:
            return (None, True)
        limit = self._sources[name].api.max_staleness_seconds
        return (mirror.content_hash, mirror.inventory(limit, self.clock()).stale)

    def _next_stale_in(self) -> float | None:
        """Seconds until a mirrored inventory turns stale (then bindings are withdrawn, on time)."""
        now, delays = self.clock(), []
        for name, mirror in self._mirrors.items():
            source = self._sources.get(name)
            limit = None if source is None else source.api.max_staleness_seconds
            if limit is not None and mirror.base.fetched_at is not None:
                left = mirror.base.fetched_at + limit - now
                if left > 0:
                    delays.append(left + 0.01)
        return min(delays, default=None)

    async def on_shared(self, payload: str) -> None:
        """Change-feed subscriber of `gitlab-inventory`: the leader wrote a row (or the feed reconnected)."""
        if not self._leading:
            self._reread_due = True
            self._wake.set()

    async def on_resync_request(self, payload: str) -> None:
        """Change-feed subscriber of `gitlab-resync`: a follower received a webhook. Only the leader acts; a
        reconnect (empty payload) may have lost requests, so it re-reads everything."""
        if not self._leading:
            return
        kind, _, project = payload.partition(":")
        if kind in ("project", "rename") and project.isdigit():
            self._resync_project(int(project), even_unknown=kind == "rename")
        else:
            self._resync_all()

    async def on_leadership(self, leading: bool) -> None:
        """Leadership moved: a new leader starts the watchers (seeded with the table's inventories, so nothing
        is withdrawn meanwhile); a former leader stops them and mirrors the table."""
        if self.share is None or leading == self._leading:
            return
        self._leading = leading
        log.info("GitLab inventories: %s", "leader, reading GitLab" if leading else "follower, reading the store")
        if leading:
            followed = self._followed
            if followed is not None:
                self.follow(*followed)
            return
        # What it read last stands until the table is re-read: a compile meanwhile withdraws nothing.
        self._mirrors = {
            name: _Mirror(content_hash(read), replace(read, stale=False))
            for name, w in self._watches.items()
            if (read := w.watcher.last_read) is not None
        }
        tasks = [w.task for w in self._watches.values()]
        for name in list(self._watches):
            self._unwatch(name)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._written.clear()
        self._dirty.clear()
        self._told = {name: self._state(name) for name in self._sources}
        self._reread_due = True
        self._wake.set()

    # -- webhooks

    async def on_event(self, event: GitLabEvent) -> None:
        """Route a webhook event to the re-sync it calls for (see the module docstring); on a follower the
        re-sync is asked of the leader (StoreUnavailable: GitLab is answered 500 and re-sends)."""
        if isinstance(event, PushEvent):
            if self._is_policy_push(event) and self.on_policy_push is not None:
                await self.on_policy_push()
            if self._is_policy_project(event.project_id, event.project_path) and self.on_merge_request is not None:
                self.on_merge_request()  # maybe a merge request's new head
            await self._resync_project_anywhere(event.project_id)
        elif isinstance(event, MergeRequestEvent):
            if self._is_policy_project(event.project_id, event.project_path) and self.on_merge_request is not None:
                self.on_merge_request()
        elif isinstance(event, ProjectEvent):
            if event.event_name in ("project_create", "project_transfer"):
                await self._resync_all_anywhere()  # may enter or leave a watched group
            else:
                await self._resync_project_anywhere(event.project_id, even_unknown=event.event_name == "project_rename")
        elif isinstance(event, GroupEvent):
            await self._resync_all_anywhere()
        elif isinstance(event, PipelineEvent):
            await self._resync_project_anywhere(event.project_id)  # deployments create environments

    async def _resync_project_anywhere(self, project_id: int, *, even_unknown: bool = False) -> None:
        if self._leading or self.share is None:
            self._resync_project(project_id, even_unknown=even_unknown)
        else:
            await self.share.request_resync(f"{'rename' if even_unknown else 'project'}:{project_id}")

    async def _resync_all_anywhere(self) -> None:
        if self._leading or self.share is None:
            self._resync_all()
        else:
            await self.share.request_resync("all")

    def _is_policy_project(self, project_id: int, project_path: str | None) -> bool:
        target = self.policy_project
        return target is not None and target.project in (project_id, project_path, str(project_id))

    def _is_policy_push(self, event: PushEvent) -> bool:
        target = self.policy_project
        if target is None or event.is_tag:
            return False
        named = self._is_policy_project(event.project_id, event.project_path)
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
        """How to ask GitLab for a job's status: through the client of the followed issuer whose tokens carry
        `issuer_url` (its rate bound and retries), or, when the issuer is not known, of the only one followed.
        None when no such GitLab is read through its API (an `inventory:` file cannot tell). On every replica,
        leader or not: one job's status is a per-request read."""
        if issuer_url is None:
            sources = list(self._sources.values()) if len(self._sources) == 1 else []
        else:
            sources = [s for s in self._sources.values() if s.issuer_url == issuer_url]
        source = sources[0].source if sources else None
        return source.fetch_job_status if isinstance(source, JobStatusSource) else None

    async def settled(self, timeout: float) -> None:
        """Wait (bounded) until every watcher has tried GitLab once (a follower: until the table was read), so a
        restarted control plane does not push withdrawn access to Envoys that hold good config while the first
        inventory is being read."""
        if self._leading:
            waits = [w.watcher.settled.wait() for w in self._watches.values()]
        else:
            waits = [self._mirrored.wait()] if self._sources else []
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
            except TimeoutError:
                log.warning("GitLab not read within %.0fs of start: its bindings stay withdrawn until it is", timeout)

    def status(self) -> list[dict[str, object]]:
        if self._leading:
            return [self._role(w.watcher.status()) for _, w in sorted(self._watches.items())]
        now = self.clock()
        out: list[dict[str, object]] = []
        for name, source in sorted(self._sources.items()):
            mirror = self._mirrors.get(name)
            fetched = mirror.base.fetched_at if mirror is not None else None
            out.append(
                self._role(
                    {
                        "issuer": name,
                        "fetched_at": fetched,
                        "age_seconds": None if fetched is None else round(now - fetched, 3),
                        "stale": mirror is None or mirror.inventory(source.api.max_staleness_seconds, now).stale,
                        "projects": len(mirror.base.projects) if mirror is not None else 0,
                        "last_error": self.share_error or (self.share.refused.get(name) if self.share else None),
                    }
                )
            )
        return out

    def _role(self, entry: dict[str, object]) -> dict[str, object]:
        if self.share is not None:  # `--store file` keeps its status as it was
            entry["role"] = "leader" if self._leading else "follower"
            entry["share_error"] = self.share_error
        return entry

    async def stop(self) -> None:
        self._stop.set()
        tasks = [w.task for w in self._watches.values()]
        for watch in self._watches.values():
            watch.task.cancel()
            watch.watcher.close()
        self._watches.clear()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait(stop: asyncio.Event, wake: asyncio.Event, timeout: float | None) -> None:
    waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def policy_scope(policy: Policy, issuer: Issuer) -> Scope:
    """What `policy` names of `issuer`'s GitLab (and its configured groups): what a one-off read must cover."""
    return _scope(policy, issuer, {})


def _id(item: Project | Group) -> int:
    return item.id


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
