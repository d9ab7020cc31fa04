"""Who hears of what at run time: GitLab's webhook events and reachability, inventory and policy changes.

These are decisions (a webhook event goes to the inventory watchers *and* the credential service; a GitLab
that answers again closes the missed-hooks gap *and* starts a revocation sweep; a new policy in service moves
the key relay and the inventory watchers with it), so they live here, in one place a reader can check, and
`serve` only connects the parts to this router.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controlplane.credentials.recovery import JobRecovery
    from controlplane.credentials.service import CredentialService
    from controlplane.runtime.gitlab_link import GitLabLink
    from controlplane.runtime.keyrelay import KeyRelay
    from controlplane.runtime.policy_service import PolicyService
    from controlplane.sources.gitlab_events import GitLabEvent

log = logging.getLogger("controlplane")

POLICY_TOPIC = "policy-commit"  # the change feed's topic for "re-read the policy project's head"


class EventRouter:
    """Turns each event into calls on the parts that must hear of it; owns no state but a pending push."""

    def __init__(
        self,
        *,
        policy: PolicyService,
        gitlab: GitLabLink,
        keys: KeyRelay,
        credentials: CredentialService | None,
        recovery: JobRecovery | None,
        is_leader: Callable[[], bool] = lambda: True,
        announce_policy: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`announce_policy` (replicas sharing a store) tells every replica to re-read the policy project: a push
        webhook reaches one replica, and only the leader polls GitLab (`is_leader`)."""
        self.policy = policy
        self.gitlab = gitlab
        self.keys = keys
        self.credentials = credentials
        self.recovery = recovery
        self.is_leader = is_leader
        self.announce_policy = announce_policy
        self._policy_push = asyncio.Event()  # set by a push webhook to the policy project, or another replica
        self._announcing: set[asyncio.Task[None]] = set()

    async def webhook(self, event: GitLabEvent) -> None:
        await self.gitlab.on_event(event)
        if self.credentials is not None:
            await self.credentials.on_event(event)

    def gitlab_reachable(self, issuer: str) -> None:
        if self.credentials is not None:
            self.credentials.job_hooks_arrive(issuer)
        if self.recovery is not None:
            self.recovery.request(f"gitlab {issuer} reachable again")

    async def inventory_changed(self) -> None:
        await self.policy.recompile("GitLab inventory changed")
        # Paths resolved for the first time are now pinned to ids: watch those ids too, so a project renamed
        # (or a path taken over by another project) is still read by id.
        current = self.policy.current
        if current is not None:
            self.gitlab.follow(current, self.policy.pins)

    async def policy_files_changed(self, changed: set[str]) -> None:
        log.info("policy change: %s", ", ".join(sorted(changed)) or "(directory)")
        await self.policy.reload_off_loop()
        await self.follow_issuers()

    async def follow_issuers(self, wait: float = 0.0) -> None:
        """Relay the keys and watch the GitLab inventories of the policy in service (a rejected change keeps
        the old ones)."""
        current = self.policy.current
        if current is not None:
            self.gitlab.follow(current, self.policy.pins)
            await self.keys.update(current.issuers, wait=wait)

    async def policy_pushed(self) -> None:
        """A webhook only wakes the policy project's loop: the reload reads GitLab and may judge new subjects
        there, longer than a webhook delivery may wait for its answer. Pushes during a reload make one more.
        The other replicas are told too, without the webhook's answer waiting on the store."""
        self._policy_push.set()
        self._announce()

    async def policy_noticed(self, _payload: str = "") -> None:
        """Another replica heard of a new policy commit (a push webhook, or the leader's poll); also after the
        change feed reconnects, when such a notice may have been missed: re-read the head."""
        self._policy_push.set()

    async def poll_policy_project(self, every: float, ready: asyncio.Event, stopping: asyncio.Event) -> None:
        """The policy project's head is re-read on a push and now and then: a push webhook that never arrived
        is caught. Sharing a store, only the leader reads it now and then, and tells the others when it found a
        new commit; every replica re-reads it on a push, wherever the webhook arrived."""
        ready.set()
        while not stopping.is_set():
            pushed = asyncio.ensure_future(self._policy_push.wait())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({pushed, stop}, timeout=every, return_when=asyncio.FIRST_COMPLETED)
            woken = pushed.done() and not pushed.cancelled()
            for waiter in (pushed, stop):
                waiter.cancel()
            if stopping.is_set():
                return
            self._policy_push.clear()
            polling = not woken
            if polling and not self.is_leader():
                continue  # followers do not poll GitLab: the leader's notice wakes them
            if await self.policy.reload_off_loop():
                await self.follow_issuers()
                if polling:
                    self._announce()

    def _announce(self) -> None:
        if self.announce_policy is None:
            return
        task = asyncio.ensure_future(self._announced(self.announce_policy))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    @staticmethod
    async def _announced(announce: Callable[[], Awaitable[None]]) -> None:
        try:
            await announce()
        except Exception as error:  # the store away: the others re-read at their feed's reconnect
            log.warning("could not tell the other replicas of a policy commit: %s", error)
