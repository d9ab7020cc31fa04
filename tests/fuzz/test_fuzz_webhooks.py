"""Fuzzing the GitLab webhook receiver: the body parser against an independent reading of the payload contract,
and the HTTP endpoint (headers and bodies as raw bytes) against the answers its contract promises."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from controlplane.sources.gitlab_events import (
    GitLabEvent,
    Malformed,
    parse_event,
)
from controlplane.sources.webhooks import PATH, WebhookReceiver
from tests.fuzz.figures import count
from tests.fuzz.http_harness import LoopThread, request, serve
from tests.fuzz.webhook_contract import CONTRACT, PAYLOADS, check_parse, expected_event

SECRET = "s3cret-webhook-token"
MAX_BODY = 8192

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
edge_values = st.sampled_from([0, -1, 1, True, False, 42.0, "42", "", None, [], {}, 2**63, 10**30, "\x00", "é"])


def _paths(value: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*prefix, key))
            out.extend(_paths(item, (*prefix, key)))
    return out


@st.composite
def payloads(draw: st.DrawFn) -> Any:
    """A GitLab payload with a few fields changed, dropped or added; sometimes any JSON value at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    payload = json.loads(json.dumps(draw(st.sampled_from(PAYLOADS))))
    for _ in range(draw(st.integers(0, 3))):
        paths = _paths(payload)
        path = draw(st.sampled_from(paths)) if paths else ("object_kind",)
        parent = payload
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "drop", "add", "kind"]))
        if action == "replace":
            parent[path[-1]] = draw(edge_values | json_values)
        elif action == "drop":
            parent.pop(path[-1], None)
        elif action == "add":
            parent[draw(st.text(max_size=10))] = draw(json_values)
        else:
            payload[draw(st.sampled_from(["object_kind", "event_name"]))] = draw(
                st.sampled_from(sorted(CONTRACT)) | st.text(max_size=10) | edge_values
            )
    return payload


@given(payload=payloads())
@example(
    payload={
        "object_kind": "build",
        "project_id": True,
        "build_id": 1,
        "pipeline_id": 1,
        "build_status": "s",
        "ref": "r",
    }
)
def test_webhook_body_gives_the_contracted_event_or_a_clear_rejection(payload: Any) -> None:
    count("webhook: parse_event")
    check_parse(payload)


class Receiver:
    def __init__(self) -> None:
        self.loop = LoopThread()
        self.events: list[GitLabEvent] = []
        self.receiver = WebhookReceiver(secrets=[SECRET.encode()], on_event=self._on_event, max_body_bytes=MAX_BODY)
        self.port = serve(self.loop, lambda: self.receiver.start())

    async def _on_event(self, event: GitLabEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.loop.run(self.receiver.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.close()


header_bytes = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)
JSON_TYPES = [b"application/json", b"application/json; charset=utf-8", b"application/JSON"]
OTHER_TYPES = [b"text/plain", b"application/x-www-form-urlencoded", b"application/jsonx", b"json"]


@st.composite
def deliveries(draw: st.DrawFn) -> dict[str, Any]:
    payload = draw(payloads())
    body_kind = draw(st.sampled_from(["json", "json", "json", "bytes", "huge", "deep"]))
    body = {
        "json": lambda: json.dumps(payload).encode(),
        "bytes": lambda: draw(st.binary(max_size=200)),
        "huge": lambda: b'{"object_kind": "push", "x": "' + b"a" * draw(st.integers(MAX_BODY, 4 * MAX_BODY)) + b'"}',
        "deep": lambda: b"[" * draw(st.integers(100, MAX_BODY - 10)),
    }[body_kind]()
    token = draw(st.sampled_from(["right", "right", "right", "wrong", "missing", "odd"]))
    return {
        "payload": payload if body_kind == "json" else None,
        "body": body,
        "token": token,
        "token_value": {"right": SECRET.encode(), "wrong": b"s3cret", "odd": draw(header_bytes)}.get(token),
        "content_type": draw(st.sampled_from([*JSON_TYPES, *JSON_TYPES, *OTHER_TYPES, None])),
        "key": draw(st.sampled_from([None, "uuid", "long", "odd"])),
        "event_header": draw(st.sampled_from([b"Push Hook", b"System Hook", b"Nope"]) | header_bytes),
        "chunked": draw(st.booleans()),
        "junk": draw(
            st.lists(
                st.tuples(st.sampled_from([b"X-Junk", b"X-Gitlab-Instance", b"X-Gitlab-Token"]), header_bytes),
                max_size=2,
            )
        ),
    }


@given(delivery=deliveries())
def test_webhook_endpoint_answers_as_its_contract_says(receiver: Receiver, delivery: dict[str, Any]) -> None:
    """401 without the secret (nothing read); 413/415/400 for a bad body; 200 with the event handed on, 202 when no
    re-sync is needed; never 500, and the callback sees exactly the events that were answered 200."""
    count("webhook: HTTP endpoint")
    headers = [(b"X-Gitlab-Event", delivery["event_header"])]
    if delivery["token_value"] is not None:
        headers.append((b"X-Gitlab-Token", delivery["token_value"]))
    if delivery["content_type"] is not None:
        headers.append((b"Content-Type", delivery["content_type"]))
    unique = str(uuid.uuid4())
    key = {"uuid": unique, "long": "k" * 201, "odd": f"é\t{unique}", None: None}[delivery["key"]]
    if key is not None:
        headers.append((b"Idempotency-Key", key.encode()))
    junk = delivery["junk"]
    headers += junk
    before = len(receiver.events)
    answer = request(receiver.port, "POST", PATH.encode(), headers, delivery["body"], chunked=delivery["chunked"])
    assert answer.status != 500, answer.body[:200]
    handed_on = receiver.events[before:]
    assert len(handed_on) == (1 if answer.status == 200 else 0), (answer.status, handed_on)
    if answer.head.startswith(b"HTTP/1.0 400"):
        return  # aiohttp's HTTP parser refused the request (a control character in a header) before any handler
    presented = [value for name, value in headers if name == b"X-Gitlab-Token"]
    authenticated = bool(presented) and presented[0] == SECRET.encode()  # the first one counts, as in aiohttp
    if not authenticated:
        assert answer.status in (400, 401), answer.status  # 400: a header aiohttp itself refuses
        return
    if delivery["key"] == "long":
        assert answer.status == 400
        return
    if delivery["content_type"] not in JSON_TYPES:
        assert answer.status == 415, answer.status
        return
    if len(delivery["body"]) > MAX_BODY:
        assert answer.status == 413
        return
    try:
        payload = json.loads(delivery["body"])
    except (ValueError, RecursionError):
        assert answer.status == 400
        return
    expected = expected_event(payload)
    if expected is Malformed:
        assert answer.status == 400
    elif expected is None:
        assert answer.status == 202
    else:
        assert answer.status == 200, answer.body[:200]
        assert handed_on[0] == parse_event(payload, handed_on[0].idempotency_key)
        assert json.loads(answer.body) == {"accepted": True, "kind": handed_on[0].kind}
        if key is not None:  # GitLab re-sends with the same Idempotency-Key: answered, not handed on again
            again = request(receiver.port, "POST", PATH.encode(), headers, delivery["body"])
            assert (again.status, json.loads(again.body)) == (200, {"duplicate": True})
            assert len(receiver.events) == before + 1


def test_receiver_loop_is_still_serving_after_the_fuzz(receiver: Receiver) -> None:
    answer = request(receiver.port, "POST", PATH.encode(), [(b"X-Gitlab-Token", SECRET.encode())], b"")
    assert answer.status == 415
    assert not asyncio.iscoroutinefunction(check_parse)
