"""The GitLab webhook receiver, on a real loopback server, driven with GitLab's real headers and payload shapes.

Payloads follow GitLab's documented samples (webhook_events.md, system_hooks.md), trimmed of fields no re-sync
reads but keeping the shape around the ones it does. The receiver awaits its callback before answering, so when
a response arrives the callback has run: no test waits on a sleep.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controlplane.sources.gitlab_events import (
    GitLabEvent,
    GroupEvent,
    JobEvent,
    MergeRequestEvent,
    PipelineEvent,
    ProjectEvent,
    PushEvent,
    parse_event,
)
from controlplane.sources.webhooks import WEBHOOK_LAST_EVENT, WebhookReceiver, WebhookSecretError, secrets_from
from controlplane.telemetry.metrics import REGISTRY

SECRET = b"s3cr3t-webhook-token-7d1f0c2e"
NEXT_SECRET = b"rotated-webhook-token-0a9b8c7d6e5f"
BODY_MARKER = "payload-marker-that-must-never-be-logged"

# --- GitLab's payloads ------------------------------------------------------------------------------

PROJECT_15: dict[str, Any] = {
    "id": 15,
    "name": "Diaspora",
    "web_url": "http://example.com/mike/diaspora",
    "namespace": "Mike",
    "visibility_level": 0,
    "path_with_namespace": "mike/diaspora",
    "default_branch": "master",
}

PUSH: dict[str, Any] = {
    "object_kind": "push",
    "event_name": "push",
    "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
    "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "ref": "refs/heads/master",
    "ref_protected": True,
    "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "user_id": 4,
    "user_name": "John Smith",
    "user_username": "jsmith",
    "user_email": "john@example.com",
    "project_id": 15,
    "project": PROJECT_15,
    "repository": {"name": "Diaspora", "homepage": "http://example.com/mike/diaspora", "visibility_level": 0},
    "commits": [
        {
            "id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "message": f"fixed readme {BODY_MARKER}",
            "title": "fixed readme",
            "timestamp": "2012-01-03T23:36:29+02:00",
            "author": {"name": "GitLab dev user", "email": "gitlabdev@example.com"},
            "added": ["CHANGELOG"],
            "modified": ["app/controller/application.rb"],
            "removed": [],
        }
    ],
    "total_commits_count": 4,
}

TAG_PUSH: dict[str, Any] = {
    "object_kind": "tag_push",
    "event_name": "tag_push",
    "before": "0000000000000000000000000000000000000000",
    "after": "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
    "ref": "refs/tags/v1.0.0",
    "ref_protected": True,
    "checkout_sha": "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
    "user_id": 1,
    "user_name": "John Smith",
    "project_id": 1,
    "project": {"id": 1, "name": "Example", "path_with_namespace": "jsmith/example", "default_branch": "master"},
    "commits": [],
    "total_commits_count": 0,
}

BRANCH_DELETED: dict[str, Any] = {
    **PUSH,
    "after": "0" * 40,
    "checkout_sha": None,
    "commits": [],
    "total_commits_count": 0,
}

MERGE_REQUEST: dict[str, Any] = {
    "object_kind": "merge_request",
    "event_type": "merge_request",
    "user": {"id": 1, "name": "Administrator", "username": "root"},
    "project": {"id": 1, "name": "Gitlab Test", "path_with_namespace": "gitlabhq/gitlab-test"},
    "object_attributes": {
        "id": 99,
        "iid": 1,
        "target_branch": "master",
        "source_branch": "ms-viewport",
        "source_project_id": 14,
        "target_project_id": 1,
        "state": "merged",
        "merge_status": "can_be_merged",
        "detailed_merge_status": "mergeable",
        "last_commit": {"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "title": "Update file README.md"},
        "action": "merge",
    },
    "labels": [],
    "changes": {},
}

JOB: dict[str, Any] = {
    "object_kind": "build",
    "ref": "gitlab-script-trigger",
    "tag": False,
    "before_sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
    "sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
    "build_id": 1977,
    "build_name": "test",
    "build_stage": "test",
    "build_status": "success",
    "build_created_at": "2021-02-23T02:41:37.886Z",
    "build_started_at": "2021-02-23T02:42:10.000Z",
    "build_finished_at": "2021-02-23T02:43:01.000Z",
    "build_duration": 51.0,
    "build_allow_failure": False,
    "build_failure_reason": "unknown_failure",
    "retries_count": 0,
    "pipeline_id": 2366,
    "project_id": 380,
    "project_name": "gitlab-org/gitlab-test",
    "user": {"id": 3, "name": "User"},
    "commit": {"id": 2366, "sha": "2293ada6b400935a1378653304eaf6221e0fdb8f", "status": "running"},
    "project": {"id": 380, "name": "Gitlab Test", "path_with_namespace": "gitlab-org/gitlab-test"},
    "runner": {"active": True, "runner_type": "project_type", "is_shared": False, "id": 380987, "tags": ["linux"]},
    "environment": None,
}

PIPELINE: dict[str, Any] = {
    "object_kind": "pipeline",
    "object_attributes": {
        "id": 31,
        "iid": 3,
        "name": "Pipeline for branch: master",
        "ref": "master",
        "tag": False,
        "sha": "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
        "before_sha": "bcbb5ec396a2c0f828686f14fac9b80b780504f2",
        "source": "push",
        "status": "success",
        "stages": ["build", "test", "deploy"],
        "created_at": "2016-08-12 15:23:28 UTC",
        "finished_at": "2016-08-12 15:26:29 UTC",
        "duration": 63,
        "variables": [{"key": "NESTOR_PROD_ENVIRONMENT", "value": "us-west-1"}],
    },
    "merge_request": None,
    "user": {"id": 1, "name": "Administrator", "username": "root"},
    "project": {"id": 1, "name": "Gitlab Test", "path_with_namespace": "gitlab-org/gitlab-test"},
    "commit": {"id": "bcbb5ec396a2c0f828686f14fac9b80b780504f2", "message": "test\n"},
    "builds": [{"id": 380, "stage": "deploy", "name": "production", "status": "skipped", "environment": None}],
}


def _project_hook(event_name: str, path: str, **extra: object) -> dict[str, Any]:
    """A system hook (and group `Project Hook`) project payload, as ProjectBuilder builds it."""
    return {
        "event_name": event_name,
        "created_at": "2012-07-21T07:30:58Z",
        "updated_at": "2012-07-21T07:38:22Z",
        "name": "Underscore",
        "path": path.rsplit("/", 1)[1],
        "path_with_namespace": path,
        "project_id": 73,
        "owner_name": "John Smith",
        "owner_email": "johnsmith@example.com",
        "owners": [{"name": "John", "email": "user1@example.com"}],
        "project_namespace_id": 23,
        "project_visibility": "internal",
        **extra,
    }


PROJECT_CREATE = _project_hook("project_create", "jsmith/underscore")
PROJECT_DESTROY = _project_hook("project_destroy", "jsmith/underscore")
PROJECT_RENAME = _project_hook("project_rename", "jsmith/underscore", old_path_with_namespace="jsmith/overscore")
PROJECT_TRANSFER = _project_hook("project_transfer", "scores/underscore", old_path_with_namespace="jsmith/underscore")
PROJECT_UPDATE = _project_hook("project_update", "jsmith/underscore")  # what archiving a project sends
REPOSITORY_UPDATE: dict[str, Any] = {
    "event_name": "repository_update",
    "user_id": 1,
    "user_name": "John Smith",
    "project_id": 1,
    "project": {"id": 1, "name": "Example", "path_with_namespace": "jsmith/example", "default_branch": "master"},
    "changes": [{"before": "8205ea8d", "after": "4045ea7a", "ref": "refs/heads/master"}],
    "refs": ["refs/heads/master", "refs/heads/a", "refs/heads/b", "refs/heads/c"],
}
GROUP_RENAME: dict[str, Any] = {
    "event_name": "group_rename",
    "created_at": "2017-10-30T15:09:00Z",
    "updated_at": "2017-11-01T10:23:52Z",
    "name": "Better Name",
    "path": "better-name",
    "full_path": "parent-group/better-name",
    "group_id": 64,
    "old_path": "old-name",
    "old_full_path": "parent-group/old-name",
}
GROUP_DESTROY: dict[str, Any] = {
    "event_name": "group_destroy",
    "created_at": "2012-07-21T07:30:54Z",
    "updated_at": "2012-07-21T07:38:22Z",
    "name": "StoreCloud",
    "path": "storecloud",
    "full_path": "storecloud",
    "group_id": 78,
}
SUBGROUP_CREATE: dict[str, Any] = {
    "created_at": "2021-01-20T09:40:12Z",
    "updated_at": "2021-01-20T09:40:12Z",
    "event_name": "subgroup_create",
    "name": "subgroup1",
    "path": "subgroup1",
    "full_path": "group1/subgroup1",
    "group_id": 10,
    "parent_group_id": 7,
    "parent_name": "group1",
    "parent_path": "group1",
    "parent_full_path": "group1",
}
ISSUE: dict[str, Any] = {
    "object_kind": "issue",
    "event_type": "issue",
    "project": {"id": 1, "path_with_namespace": "gitlabhq/gitlab-test"},
    "object_attributes": {"id": 301, "iid": 23, "action": "open"},
}

# (X-Gitlab-Event, payload, the event the callback must receive; idempotency_key is filled in per request)
EVENT_CASES: list[tuple[str, dict[str, Any], GitLabEvent]] = [
    (
        "Push Hook",
        PUSH,
        PushEvent(
            project_id=15,
            project_path="mike/diaspora",
            ref="refs/heads/master",
            before="95790bf891e76fee5e1747ab589903a6a1f80f22",
            after="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            is_tag=False,
        ),
    ),
    (
        "Tag Push Hook",
        TAG_PUSH,
        PushEvent(
            project_id=1,
            project_path="jsmith/example",
            ref="refs/tags/v1.0.0",
            before="0" * 40,
            after="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
            is_tag=True,
        ),
    ),
    (
        "System Hook",  # system hooks deliver pushes too, under their own header
        PUSH,
        PushEvent(
            project_id=15,
            project_path="mike/diaspora",
            ref="refs/heads/master",
            before="95790bf891e76fee5e1747ab589903a6a1f80f22",
            after="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            is_tag=False,
        ),
    ),
    (
        "Merge Request Hook",
        MERGE_REQUEST,
        MergeRequestEvent(
            project_id=1,
            target_project_id=1,
            source_project_id=14,
            action="merge",
            project_path="gitlabhq/gitlab-test",
        ),
    ),
    (
        "Job Hook",
        JOB,
        JobEvent(project_id=380, job_id=1977, pipeline_id=2366, status="success", ref="gitlab-script-trigger"),
    ),
    ("Pipeline Hook", PIPELINE, PipelineEvent(project_id=1, pipeline_id=31, status="success", ref="master")),
    *[
        (
            "System Hook",
            payload,
            ProjectEvent(
                project_id=73,
                path_with_namespace=str(payload["path_with_namespace"]),
                old_path_with_namespace=payload.get("old_path_with_namespace"),
                event_name=str(payload["event_name"]),
            ),
        )
        for payload in (PROJECT_CREATE, PROJECT_DESTROY, PROJECT_RENAME, PROJECT_TRANSFER, PROJECT_UPDATE)
    ],
    (
        "Project Hook",  # a group webhook's project event
        PROJECT_CREATE,
        ProjectEvent(
            project_id=73,
            path_with_namespace="jsmith/underscore",
            old_path_with_namespace=None,
            event_name="project_create",
        ),
    ),
    (
        "System Hook",
        REPOSITORY_UPDATE,
        ProjectEvent(
            project_id=1,
            path_with_namespace="jsmith/example",
            old_path_with_namespace=None,
            event_name="repository_update",
        ),
    ),
    (
        "System Hook",
        GROUP_RENAME,
        GroupEvent(
            group_id=64,
            full_path="parent-group/better-name",
            old_full_path="parent-group/old-name",
            event_name="group_rename",
        ),
    ),
    (
        "System Hook",
        GROUP_DESTROY,
        GroupEvent(group_id=78, full_path="storecloud", old_full_path=None, event_name="group_destroy"),
    ),
    (
        "Subgroup Hook",
        SUBGROUP_CREATE,
        GroupEvent(group_id=10, full_path="group1/subgroup1", old_full_path=None, event_name="subgroup_create"),
    ),
]


# --- harness -----------------------------------------------------------------------------------------


def gitlab_headers(event: str, *, token: bytes | str | None = SECRET, key: str | None = None) -> dict[str, str]:
    """The headers GitLab's WebHookService sends with every delivery."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/18.9.0",
        "X-Gitlab-Event": event,
        "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "Idempotency-Key": key or str(uuid.uuid4()),
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token.decode() if isinstance(token, bytes) else token
    return headers


@dataclass
class Recorder:
    """The receiver's callback: records events; can be made to fail or to block until released."""

    events: list[GitLabEvent] = field(default_factory=list)
    fail: bool = False
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, event: GitLabEvent) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("re-sync queue unavailable")
        self.events.append(event)


@dataclass
class Hook:
    url: str
    port: int
    session: aiohttp.ClientSession
    recorder: Recorder
    receiver: WebhookReceiver

    async def post(
        self, payload: object, headers: dict[str, str], *, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(payload).encode()
        async with self.session.post(self.url, data=data, headers=headers) as response:
            return response.status, await response.json(content_type=None)

    async def send(self, event: str, payload: object, **kw: Any) -> tuple[int, dict[str, Any]]:
        return await self.post(payload, gitlab_headers(event, **kw))


Factory = Callable[..., Awaitable[Hook]]


@pytest.fixture
async def make_hook() -> AsyncIterator[Factory]:
    """Starts receivers on 127.0.0.1:0 (kwargs go to WebhookReceiver) and stops every one of them."""
    started: list[tuple[WebhookReceiver, aiohttp.ClientSession]] = []

    async def make(**kw: Any) -> Hook:
        recorder = kw.pop("recorder", None) or Recorder()
        kw.setdefault("secrets", [SECRET])
        receiver = WebhookReceiver(on_event=recorder, **kw)
        port = await receiver.start("127.0.0.1", 0)
        session = aiohttp.ClientSession()
        started.append((receiver, session))
        return Hook(f"http://127.0.0.1:{port}/webhooks/gitlab", port, session, recorder, receiver)

    yield make
    for receiver, session in started:
        await session.close()
        await receiver.stop()


@pytest.fixture
async def hook(make_hook: Factory) -> Hook:
    return await make_hook()


def count(event: str, result: str) -> float:
    labels = {"event": event, "result": result}
    return REGISTRY.get_sample_value("controlplane_webhook_events_total", labels) or 0.0


async def raw_request(port: int, request: bytes) -> bytes:
    """Sends bytes as they are (what aiohttp's client refuses to send) and returns the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()


# --- parsing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "payload", "expected"), EVENT_CASES, ids=lambda v: v if isinstance(v, str) else "")
async def test_each_event_type_is_parsed_into_its_typed_event(
    hook: Hook, header: str, payload: dict[str, Any], expected: GitLabEvent
) -> None:
    key = str(uuid.uuid4())
    before = count(expected.kind, "accepted")
    status, body = await hook.send(header, payload, key=key)
    assert (status, body) == (200, {"accepted": True, "kind": expected.kind})
    assert hook.recorder.events == [expected.__class__(**{**vars(expected), "idempotency_key": key})]
    assert count(expected.kind, "accepted") == before + 1


def test_events_are_frozen_and_say_what_a_resync_needs() -> None:
    push = parse_event(BRANCH_DELETED, "k")
    assert isinstance(push, PushEvent) and push.deleted and push.kind == "push" and push.idempotency_key == "k"
    with pytest.raises(AttributeError):
        push.ref = "refs/heads/other"  # type: ignore[misc]
    tag = parse_event(TAG_PUSH)
    assert isinstance(tag, PushEvent) and tag.kind == "tag_push" and not tag.deleted and tag.idempotency_key is None


def test_merge_request_without_action_is_still_an_event() -> None:
    payload = copy.deepcopy(MERGE_REQUEST)
    del payload["object_attributes"]["action"]
    event = parse_event(payload)
    assert isinstance(event, MergeRequestEvent) and event.action is None


async def test_unknown_event_types_are_accepted_and_ignored(hook: Hook) -> None:
    before = count("other", "ignored")
    assert await hook.send("Issue Hook", ISSUE) == (202, {"ignored": True})
    assert await hook.send("System Hook", {"event_name": "user_create", "user_id": 41}) == (202, {"ignored": True})
    assert hook.recorder.events == []
    assert count("other", "ignored") == before + 1


# --- authentication ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        None,  # no X-Gitlab-Token at all
        "",
        SECRET[:-1] + b"X",  # same length, last byte differs
        SECRET + b"-and-more",  # a forged token of a different length
        b"x",
        NEXT_SECRET,  # a secret this receiver is not configured with
    ],
    ids=["missing", "empty", "same-length", "longer", "short", "other-secret"],
)
async def test_missing_or_unknown_token_is_401_and_no_callback(hook: Hook, token: bytes | str | None) -> None:
    before = count("push", "unauthorized")
    assert await hook.send("Push Hook", PUSH, token=token) == (401, {"error": "unauthorized"})
    assert hook.recorder.events == []
    assert count("push", "unauthorized") == before + 1


async def test_unauthenticated_requests_are_rejected_before_anything_else(hook: Hook) -> None:
    """Without the secret a sender learns nothing: not the size limit, not JSON errors, not the event kinds."""
    headers = gitlab_headers("Push Hook", token="wrong")
    assert (await hook.post(None, headers, raw=b"{not json"))[0] == 401
    assert (await hook.post(None, {**headers, "Content-Type": "text/plain"}, raw=b"x"))[0] == 401
    status = await raw_request(
        hook.port,
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nX-Gitlab-Token: \xff\xfe\r\nContent-Length: 99999999\r\n\r\n",
    )
    assert status.startswith(b"HTTP/1.1 401")
    assert hook.recorder.events == []


async def test_two_secrets_are_accepted_during_a_rotation(make_hook: Factory) -> None:
    hook = await make_hook(secrets=[SECRET, NEXT_SECRET])
    assert (await hook.send("Push Hook", PUSH, token=SECRET))[0] == 200
    assert (await hook.send("Push Hook", PUSH, token=NEXT_SECRET))[0] == 200
    assert (await hook.send("Push Hook", PUSH, token=b"neither"))[0] == 401
    assert len(hook.recorder.events) == 2


def test_a_receiver_without_secrets_refuses_to_exist() -> None:
    with pytest.raises(WebhookSecretError):
        WebhookReceiver(secrets=[], on_event=Recorder())
    with pytest.raises(WebhookSecretError):
        WebhookReceiver(secrets=[b""], on_event=Recorder())


# --- de-duplication ------------------------------------------------------------------------------------


async def test_a_replay_by_idempotency_key_is_acknowledged_without_a_second_callback(hook: Hook) -> None:
    key = str(uuid.uuid4())
    before = count("push", "duplicate")
    assert (await hook.send("Push Hook", PUSH, key=key))[0] == 200
    # A re-send: same Idempotency-Key, fresh X-Gitlab-Webhook-UUID and X-Gitlab-Event-UUID.
    assert await hook.send("Push Hook", PUSH, key=key) == (200, {"duplicate": True})
    assert len(hook.recorder.events) == 1
    assert count("push", "duplicate") == before + 1


async def test_deliveries_sharing_an_event_uuid_are_not_duplicates(hook: Hook) -> None:
    """X-Gitlab-Event-UUID is GitLab's recursion-detection id, shared across hooks: never a dedup key."""
    headers = gitlab_headers("Push Hook")
    assert (await hook.post(PUSH, headers))[0] == 200
    assert (await hook.post(PUSH, {**headers, "Idempotency-Key": str(uuid.uuid4())}))[0] == 200
    assert len(hook.recorder.events) == 2


async def test_keys_are_forgotten_after_the_ttl_and_beyond_the_size(make_hook: Factory) -> None:
    now = [1000.0]
    hook = await make_hook(dedup_ttl=60, dedup_size=2, clock=lambda: now[0])
    assert (await hook.send("Push Hook", PUSH, key="a"))[1] == {"accepted": True, "kind": "push"}
    now[0] += 59
    assert (await hook.send("Push Hook", PUSH, key="a"))[1] == {"duplicate": True}
    now[0] += 2
    assert (await hook.send("Push Hook", PUSH, key="a"))[1]["accepted"]  # past the TTL: a new delivery
    assert (await hook.send("Push Hook", PUSH, key="b"))[1]["accepted"]
    assert (await hook.send("Push Hook", PUSH, key="c"))[1]["accepted"]  # evicts "a", the oldest
    assert (await hook.send("Push Hook", PUSH, key="a"))[1]["accepted"]
    assert len(hook.recorder.events) == 5


async def test_a_concurrent_replay_while_the_first_is_handled_is_a_duplicate(make_hook: Factory) -> None:
    recorder = Recorder(gate=asyncio.Event())
    hook = await make_hook(recorder=recorder)
    headers = gitlab_headers("Job Hook")
    first = asyncio.create_task(hook.post(JOB, headers))
    await recorder.entered.wait()
    assert await hook.post(JOB, headers) == (200, {"duplicate": True})
    assert recorder.gate is not None
    recorder.gate.set()
    assert (await first)[0] == 200
    assert len(recorder.events) == 1


async def test_deliveries_without_idempotency_key_are_processed_each_time(hook: Hook) -> None:
    """GitLab versions before Idempotency-Key: nothing to de-duplicate on, and a re-read is harmless."""
    headers = gitlab_headers("Push Hook")
    del headers["Idempotency-Key"]
    assert (await hook.post(PUSH, headers))[0] == 200
    assert (await hook.post(PUSH, headers))[0] == 200
    assert [e.idempotency_key for e in hook.recorder.events] == [None, None]


# --- bounded, well-formed bodies -------------------------------------------------------------------------


async def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(make_hook: Factory) -> None:
    hook = await make_hook(max_body_bytes=1024)
    before = count("push", "too_large")
    head = "".join(f"{k}: {v}\r\n" for k, v in gitlab_headers("Push Hook").items())
    # Only the headers are sent: the answer must come without waiting for 10 MB that never arrive.
    status = await raw_request(
        hook.port, f"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 10000000\r\n\r\n".encode()
    )
    assert status.startswith(b"HTTP/1.1 413")
    assert count("push", "too_large") == before + 1
    assert hook.recorder.events == []


async def test_a_streamed_body_over_the_limit_is_413(make_hook: Factory) -> None:
    hook = await make_hook(max_body_bytes=1024)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"object_kind": "push", "pad": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    async with hook.session.post(hook.url, data=chunks(), headers=gitlab_headers("Push Hook")) as response:
        assert response.status == 413
    assert hook.recorder.events == []


async def test_a_body_at_the_limit_is_read(make_hook: Factory) -> None:
    body = json.dumps(PUSH).encode()
    hook = await make_hook(max_body_bytes=len(body))
    assert (await hook.post(None, gitlab_headers("Push Hook"), raw=body))[0] == 200


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[" * 100_000, b'"a string"', b"[1, 2]", b"\xff\xfe{}", b""],
    ids=["syntax", "deeply-nested", "not-an-object", "a-list", "not-utf8", "empty"],
)
async def test_malformed_json_is_400(hook: Hook, raw: bytes) -> None:
    before = count("push", "malformed")
    status, body = await hook.post(None, gitlab_headers("Push Hook"), raw=raw)
    assert status == 400 and "error" in body
    assert count("push", "malformed") == before + 1
    assert hook.recorder.events == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({**PUSH, "project_id": "15"}, "project_id"),
        ({**PUSH, "project_id": True}, "project_id"),
        ({**PUSH, "project": None}, "project.path_with_namespace"),
        ({**JOB, "build_id": -1}, "build_id"),
        ({**PIPELINE, "object_attributes": {"id": 31}}, "object_attributes.status"),
        ({**GROUP_RENAME, "old_full_path": 7}, "old_full_path"),
    ],
)
async def test_a_known_event_missing_what_a_resync_needs_is_400_naming_the_field(
    hook: Hook, payload: dict[str, Any], field: str
) -> None:
    status, body = await hook.send("System Hook", payload)
    assert status == 400 and field in body["error"]
    assert hook.recorder.events == []


async def test_the_content_type_must_be_json(hook: Hook) -> None:
    headers = {**gitlab_headers("Push Hook"), "Content-Type": "application/x-www-form-urlencoded"}
    assert (await hook.post(PUSH, headers))[0] == 415
    assert (await hook.post(PUSH, {**headers, "Content-Type": "application/json; charset=utf-8"}))[0] == 200


async def test_garbage_never_crashes_the_receiver(hook: Hook) -> None:
    requests = [
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /webhooks/gitlab HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /webhooks/gitlab HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02 garbage\r\n\r\n",
    ]
    for request in requests:
        status = await raw_request(hook.port, request)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", status), status
    assert (await hook.send("Push Hook", PUSH))[0] == 200


# --- callback failures -------------------------------------------------------------------------------------


async def test_a_failing_callback_is_500_and_the_next_event_is_fine(
    hook: Hook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = str(uuid.uuid4())
    before = count("push", "failed")
    hook.recorder.fail = True
    assert await hook.send("Push Hook", PUSH, key=key) == (500, {"error": "event not handled"})
    assert count("push", "failed") == before + 1
    assert "re-sync queue unavailable" in caplog.text and BODY_MARKER not in caplog.text
    hook.recorder.fail = False
    assert (await hook.send("Job Hook", JOB))[0] == 200
    # GitLab's "Resend request" keeps the Idempotency-Key: the failed event is processed, not a duplicate.
    assert (await hook.send("Push Hook", PUSH, key=key))[1]["accepted"]
    assert [e.kind for e in hook.recorder.events] == ["job", "push"]


async def test_a_callback_that_does_the_resync_itself_times_out_as_500(make_hook: Factory) -> None:
    recorder = Recorder(gate=asyncio.Event())  # never released: a callback that never returns
    hook = await make_hook(recorder=recorder, callback_timeout=0.05)
    assert (await hook.send("Push Hook", PUSH))[0] == 500
    recorder.gate = None
    assert (await hook.send("Push Hook", PUSH))[0] == 200


# --- secrets -------------------------------------------------------------------------------------------------


async def test_secrets_and_bodies_never_reach_the_logs(make_hook: Factory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hook = await make_hook(secrets=[SECRET, NEXT_SECRET])
    presented = "attacker-guess-0123456789"
    await hook.send("Push Hook", PUSH)
    await hook.send("Push Hook", PUSH, token=NEXT_SECRET)
    await hook.send("Push Hook", PUSH, token=presented)
    await hook.post(None, gitlab_headers("Push Hook"), raw=f'{{"oops": "{BODY_MARKER}"'.encode())
    hook.recorder.fail = True
    await hook.send("Push Hook", PUSH)
    assert caplog.records, "the receiver logs what it does"
    for forbidden in (SECRET.decode(), NEXT_SECRET.decode(), presented, BODY_MARKER):
        assert forbidden not in caplog.text


def test_secrets_from_env_and_file_one_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_WEBHOOK_SECRET", f"  {SECRET.decode()}\n")
    file = tmp_path / "webhook-secrets"
    file.write_bytes(NEXT_SECRET + b"\r\n\n" + SECRET + b"\n")
    file.chmod(0o600)
    assert secrets_from("CP_WEBHOOK_SECRET", None) == [SECRET]
    assert secrets_from(None, str(file)) == [NEXT_SECRET, SECRET]
    assert secrets_from("CP_WEBHOOK_SECRET", str(file)) == [SECRET, NEXT_SECRET]


def test_secrets_from_reports_problems_without_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("CP_WEBHOOK_SECRET", raising=False)
    with pytest.raises(WebhookSecretError, match="required"):
        secrets_from(None, None)
    with pytest.raises(WebhookSecretError, match="CP_WEBHOOK_SECRET is not set"):
        secrets_from("CP_WEBHOOK_SECRET", None)
    with pytest.raises(WebhookSecretError, match="cannot read"):
        secrets_from(None, str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("\n  \n")
    with pytest.raises(WebhookSecretError, match="holds no secret"):
        secrets_from(None, str(empty))
    shared = tmp_path / "shared"
    shared.write_bytes(SECRET + b"\n")
    os.chmod(shared, 0o644)
    assert secrets_from(None, str(shared)) == [SECRET]
    assert "readable by other users" in caplog.text and SECRET.decode() not in caplog.text


# --- embedding and metrics -----------------------------------------------------------------------------------


async def test_routes_mount_in_another_aiohttp_app() -> None:
    """The admin server and the receiver can share one app and one loop."""
    recorder = Recorder()
    app = web.Application()
    app.add_routes(WebhookReceiver(secrets=[SECRET], on_event=recorder).routes())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/webhooks/gitlab"
            async with session.post(url, data=json.dumps(PIPELINE), headers=gitlab_headers("Pipeline Hook")) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
    assert [e.kind for e in recorder.events] == ["pipeline"]


async def test_the_last_event_time_moves_on_authenticated_deliveries_only(hook: Hook) -> None:
    def last() -> float:
        return REGISTRY.get_sample_value("controlplane_webhook_last_event_timestamp_seconds") or 0.0

    WEBHOOK_LAST_EVENT.set(0)
    await hook.send("Push Hook", PUSH, token="wrong")
    assert last() == 0.0
    await hook.send("Issue Hook", ISSUE)
    assert last() > 0.0


async def test_stop_is_idempotent_and_start_twice_is_an_error(make_hook: Factory) -> None:
    hook = await make_hook()
    with pytest.raises(RuntimeError):
        await hook.receiver.start("127.0.0.1", 0)
    await hook.receiver.stop()
    await hook.receiver.stop()
