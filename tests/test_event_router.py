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
