"""The GitLab webhook payload contract, read independently of the parser: sample payloads, the fields each event
kind must carry, and `check_parse`, which holds the parser to it. Shared by the Hypothesis suite and the atheris
target, so both fuzzers judge the parser by one contract.
"""

from __future__ import annotations

from typing import Any

from controlplane.sources.gitlab_events import (
    GitLabEvent,
    GroupEvent,
    JobEvent,
    Malformed,
    MergeRequestEvent,
    PipelineEvent,
    ProjectEvent,
    PushEvent,
    parse_event,
)

PAYLOADS: list[dict[str, Any]] = [
    {
        "object_kind": "push",
        "project_id": 42,
        "project": {"path_with_namespace": "acme/app"},
        "ref": "refs/heads/main",
        "before": "0" * 40,
        "after": "a" * 40,
    },
    {
        "object_kind": "tag_push",
        "event_name": "tag_push",
        "project_id": 42,
        "project": {"path_with_namespace": "acme/app"},
        "ref": "refs/tags/v1",
        "before": "b" * 40,
        "after": "0" * 40,
    },
    {
        "object_kind": "merge_request",
        "project": {"id": 42},
        "object_attributes": {"target_project_id": 42, "source_project_id": 43, "action": "open"},
    },
    {
        "object_kind": "build",
        "project_id": 42,
        "build_id": 7,
        "pipeline_id": 9,
        "build_status": "success",
        "ref": "main",
    },
    {
        "object_kind": "pipeline",
        "project": {"id": 42},
        "object_attributes": {"id": 9, "status": "failed", "ref": "main"},
    },
    {
        "event_name": "project_rename",
        "project_id": 42,
        "path_with_namespace": "acme/b",
        "old_path_with_namespace": "acme/a",
    },
    {"event_name": "repository_update", "project_id": 42, "project": {"path_with_namespace": "acme/app"}},
    {"event_name": "subgroup_create", "group_id": 5, "full_path": "acme/sub", "old_full_path": None},
    {"object_kind": "note", "project_id": 42},
]

ID, TEXT, OPTIONAL_TEXT = "id", "text", "optional text"
# The contract, written independently of the parser: per event name, the fields a re-sync needs.
CONTRACT: dict[str, tuple[type[Any], list[tuple[str, str, str]]]] = {
    "push": (
        PushEvent,
        [
            ("project_id", "project_id", ID),
            ("project_path", "project.path_with_namespace", TEXT),
            ("ref", "ref", TEXT),
            ("before", "before", TEXT),
            ("after", "after", TEXT),
        ],
    ),
    "merge_request": (
        MergeRequestEvent,
        [
            ("project_id", "project.id", ID),
            ("target_project_id", "object_attributes.target_project_id", ID),
            ("source_project_id", "object_attributes.source_project_id", ID),
            ("action", "object_attributes.action", OPTIONAL_TEXT),
        ],
    ),
    "build": (
        JobEvent,
        [
            ("project_id", "project_id", ID),
            ("job_id", "build_id", ID),
            ("pipeline_id", "pipeline_id", ID),
            ("status", "build_status", TEXT),
            ("ref", "ref", TEXT),
        ],
    ),
    "pipeline": (
        PipelineEvent,
        [
            ("project_id", "project.id", ID),
            ("pipeline_id", "object_attributes.id", ID),
            ("status", "object_attributes.status", TEXT),
            ("ref", "object_attributes.ref", TEXT),
        ],
    ),
}
CONTRACT["tag_push"] = CONTRACT["push"]
_PROJECT = [("project_id", "project_id", ID), ("old_path_with_namespace", "old_path_with_namespace", OPTIONAL_TEXT)]
for _name in ("project_create", "project_destroy", "project_rename", "project_transfer", "project_update"):
    CONTRACT[_name] = (ProjectEvent, [*_PROJECT, ("path_with_namespace", "path_with_namespace", TEXT)])
CONTRACT["repository_update"] = (
    ProjectEvent,
    [*_PROJECT, ("path_with_namespace", "project.path_with_namespace", TEXT)],
)
for _name in ("group_create", "group_destroy", "group_rename", "subgroup_create", "subgroup_destroy"):
    CONTRACT[_name] = (
        GroupEvent,
        [
            ("group_id", "group_id", ID),
            ("full_path", "full_path", OPTIONAL_TEXT),
            ("old_full_path", "old_full_path", OPTIONAL_TEXT),
        ],
    )

_MISSING = object()


def _get(payload: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(payload, dict) or part not in payload:
            return _MISSING
        payload = payload[part]
    return payload


def _valid(value: Any, rule: str) -> bool:
    if rule == ID:
        return type(value) is int and value > 0
    if rule == TEXT:
        return isinstance(value, str) and value != ""
    return value is _MISSING or value is None or (isinstance(value, str) and value != "")


def expected_event(payload: Any) -> tuple[type[Any], dict[str, Any]] | type[Malformed] | None:
    """What the parser must return for `payload`: (event type, fields), None (ignored) or Malformed."""
    if not isinstance(payload, dict):
        return Malformed
    kind, name = payload.get("object_kind"), payload.get("event_name")
    chosen = kind if isinstance(kind, str) else name if isinstance(name, str) else None
    if chosen not in CONTRACT:
        return None
    event_type, fields = CONTRACT[chosen]
    values = {attribute: _get(payload, path) for attribute, path, _ in fields}
    if not all(_valid(values[attribute], rule) for attribute, _, rule in fields):
        return Malformed
    return event_type, {k: (None if v is _MISSING else v) for k, v in values.items()}


def check_parse(payload: Any) -> GitLabEvent | None:
    """Parse and compare with the contract; return the event (or None when ignored)."""
    expected = expected_event(payload)
    try:
        event = parse_event(payload, "key-1")
    except Malformed as malformed:
        assert expected is Malformed, f"rejected a payload the contract accepts ({malformed}): expected {expected}"
        assert str(malformed), "a rejection must say why"
        return None
    if expected is None:
        assert event is None, f"parsed an event the contract ignores: {event}"
        return None
    assert expected is not Malformed, f"accepted a payload the contract rejects: {event}"
    assert isinstance(expected, tuple)
    event_type, fields = expected
    assert type(event) is event_type
    for attribute, value in fields.items():
        assert getattr(event, attribute) == value, attribute
    assert event.idempotency_key == "key-1"
    return event
