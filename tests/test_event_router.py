"""Who hears of what (controlplane/runtime/event_router.py), with stand-ins for the parts that listen."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from controlplane.runtime.event_router import EventRouter
from controlplane.sources.gitlab_events import PushEvent


class Heard:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def recorder(self, name: str) -> Any:
        async def record(*args: object) -> None:
            self.calls.append((name, args[0] if args else None))

        return record

    def note(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, args[0] if args else None))


def _router(heard: Heard, *, credentials: bool = True) -> EventRouter:
    gitlab = SimpleNamespace(on_event=heard.recorder("gitlab"), follow=heard.note("follow"))
    creds = SimpleNamespace(
        on_event=heard.recorder("credentials"),
        job_hooks_arrive=heard.note("gap ended"),
    )
    recovery = SimpleNamespace(request=heard.note("sweep"))
    policy = SimpleNamespace(recompile=heard.recorder("recompile"), current=None, pins={})
    return EventRouter(
        policy=policy,  # type: ignore[arg-type]
        gitlab=gitlab,  # type: ignore[arg-type]
        keys=SimpleNamespace(),  # type: ignore[arg-type]
        credentials=creds if credentials else None,  # type: ignore[arg-type]
        recovery=recovery,  # type: ignore[arg-type]
    )


def _push() -> PushEvent:
    return PushEvent(
        project_id=7, project_path="acme/app", ref="refs/heads/main", before="0" * 40, after="1" * 40, is_tag=False
    )


async def test_a_webhook_event_reaches_the_inventory_watchers_then_the_credential_service() -> None:
    heard = Heard()
    event = _push()
    await _router(heard).webhook(event)
    assert heard.calls == [("gitlab", event), ("credentials", event)]


async def test_without_credentials_only_the_watchers_hear_of_it() -> None:
    heard = Heard()
    await _router(heard, credentials=False).webhook(_push())
    assert [name for name, _ in heard.calls] == ["gitlab"]


async def test_a_gitlab_reachable_again_closes_the_missed_hooks_gap_and_starts_a_sweep() -> None:
    heard = Heard()
    _router(heard).gitlab_reachable("gitlab")
    assert heard.calls == [("gap ended", "gitlab"), ("sweep", "gitlab gitlab reachable again")]


async def test_an_inventory_change_recompiles_and_with_no_policy_in_service_follows_nothing() -> None:
    heard = Heard()
    await _router(heard).inventory_changed()
    assert heard.calls == [("recompile", "GitLab inventory changed")]


async def test_a_policy_push_wakes_the_project_poll_once() -> None:
    heard = Heard()
    router = _router(heard)
    reloads: list[bool] = []

    async def reload() -> bool:
        reloads.append(True)
        return False

    router.policy.reload_off_loop = reload  # type: ignore[method-assign]
    stopping, ready = asyncio.Event(), asyncio.Event()
    poll = asyncio.create_task(router.poll_policy_project(3600, ready, stopping))
    await ready.wait()
    await router.policy_pushed()
    for _ in range(100):
        if reloads:
            break
        await asyncio.sleep(0.01)
    stopping.set()
    await asyncio.wait_for(poll, 5)
    assert reloads == [True]


class Replica:
    """A router on a replica sharing a store: its reloads (each says whether the policy changed) and its notices
    to the other replicas, counted."""

    def __init__(self, *, leader: bool, changes: bool, announce_fails: bool = False) -> None:
        self.leader, self.reloads, self.announced = leader, 0, 0
        self.router = _router(Heard())
        self.router.is_leader = lambda: self.leader
        self.router.announce_policy = self._announce
        self.changes, self.announce_fails = changes, announce_fails

        async def reload() -> bool:
            self.reloads += 1
            return self.changes

        async def follow(wait: float = 0.0) -> None:
            pass

        self.router.policy.reload_off_loop = reload  # type: ignore[method-assign]
        self.router.follow_issuers = follow  # type: ignore[method-assign]

    async def _announce(self) -> None:
        self.announced += 1
        if self.announce_fails:
            raise ConnectionError("store away")


async def _until(condition: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def _polling(replica: Replica, every: float) -> tuple[asyncio.Task[None], asyncio.Event]:
    stopping, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(replica.router.poll_policy_project(every, ready, stopping))
    await ready.wait()
    return task, stopping


async def test_a_follower_never_polls_gitlab_but_rereads_on_the_leaders_notice() -> None:
    follower = Replica(leader=False, changes=True)
    task, stopping = await _polling(follower, every=0.01)
    await asyncio.sleep(0.2)  # twenty poll periods: none of them reads GitLab
    assert follower.reloads == 0
    await follower.router.policy_noticed("")
    await _until(lambda: follower.reloads == 1)
    stopping.set()
    await asyncio.wait_for(task, 5)
    assert follower.announced == 0  # a change it read because it was told is not announced again


async def test_the_leader_polls_and_tells_the_others_of_a_new_commit() -> None:
    leader = Replica(leader=True, changes=True)
    task, stopping = await _polling(leader, every=0.01)
    await _until(lambda: leader.reloads >= 2 and leader.announced >= 2)
    stopping.set()
    await asyncio.wait_for(task, 5)
    unchanged = Replica(leader=True, changes=False)
    task, stopping = await _polling(unchanged, every=0.01)
    await _until(lambda: unchanged.reloads >= 3)
    stopping.set()
    await asyncio.wait_for(task, 5)
    assert unchanged.announced == 0  # nothing new: nothing to tell


async def test_a_push_webhook_at_any_replica_is_told_to_all_and_a_store_away_is_survived() -> None:
    follower = Replica(leader=False, changes=False, announce_fails=True)
    task, stopping = await _polling(follower, every=3600)
    await follower.router.policy_pushed()
    await _until(lambda: follower.reloads == 1 and follower.announced == 1)
    await follower.router.policy_pushed()  # the failed notice did not end the loop
    await _until(lambda: follower.reloads == 2)
    stopping.set()
    await asyncio.wait_for(task, 5)
