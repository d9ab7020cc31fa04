"""GitLab webhook events: the typed "look again" triggers a delivery carries, and how a body becomes one.

Apart from the receiver (`webhooks.py`) because the layers that act on events (the link to the inventory
watcher, the job-state revocations, the entry point) need only these types, not aiohttp and the HTTP handling.
Only the few fields a re-sync needs are kept; `parse_event` rejects a body that claims a known event but lacks
one (`Malformed`, answered 400 by the receiver) and ignores kinds no re-sync needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

_ZERO_SHA: Final = frozenset("0")


@dataclass(frozen=True, kw_only=True)
class _Event:
    """What every event carries: the delivery's `Idempotency-Key` (None from GitLab versions without it)."""

    idempotency_key: str | None = None

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PushEvent(_Event):
    """A branch or tag was pushed, created or deleted (`Push Hook`, `Tag Push Hook`, or a system hook push).

    `ref` is the full ref as GitLab sends it (`refs/heads/main`, `refs/tags/v1`); `before`/`after` are commit
    SHAs, all zeros for a created/deleted ref.
    """

    project_id: int
    project_path: str
    ref: str
    before: str
    after: str
    is_tag: bool

    @property
    def kind(self) -> str:
        return "tag_push" if self.is_tag else "push"

    @property
    def deleted(self) -> bool:
        """The ref no longer exists: access bound to it must go on the next snapshot."""
        return set(self.after) <= _ZERO_SHA


@dataclass(frozen=True, kw_only=True)
class MergeRequestEvent(_Event):
    """A merge request changed; `source_project_id` differs from `target_project_id` for forks."""

    project_id: int
    target_project_id: int
    source_project_id: int
    action: str | None  # open, close, reopen, update, approved, merge...; absent on some triggers
    project_path: str | None = None  # `project.path_with_namespace`: a policy project may be configured by path

    @property
    def kind(self) -> str:
        return "merge_request"


@dataclass(frozen=True, kw_only=True)
class JobEvent(_Event):
    """A job's status changed (`Job Hook`, `object_kind: build`)."""

    project_id: int
    job_id: int
    pipeline_id: int
    status: str
    ref: str

    @property
    def kind(self) -> str:
        return "job"


@dataclass(frozen=True, kw_only=True)
class PipelineEvent(_Event):
    """A pipeline's status changed."""

    project_id: int
    pipeline_id: int
    status: str
    ref: str

    @property
    def kind(self) -> str:
        return "pipeline"


@dataclass(frozen=True, kw_only=True)
class ProjectEvent(_Event):
    """A project was created, destroyed, renamed, transferred or updated (archiving sends `project_update`).

    System hooks and group `Project Hook`s; also `repository_update` (a system hook sent for pushes of several
    refs, which the push hook skips past `push_event_hooks_limit`). `old_path_with_namespace` is set for
    renames and transfers.
    """

    project_id: int
    path_with_namespace: str
    old_path_with_namespace: str | None
    event_name: str

    @property
    def kind(self) -> str:
        return "project"


@dataclass(frozen=True, kw_only=True)
class GroupEvent(_Event):
    """A group or subgroup was created, destroyed or renamed (system hooks, group `Subgroup Hook`s).

    `full_path` is None only from old GitLab versions that sent `path` alone; `old_full_path` is set on renames.
    """

    group_id: int
    full_path: str | None
    old_full_path: str | None
    event_name: str

    @property
    def kind(self) -> str:
        return "group"


GitLabEvent: TypeAlias = PushEvent | MergeRequestEvent | JobEvent | PipelineEvent | ProjectEvent | GroupEvent

PROJECT_EVENT_NAMES: Final = frozenset(
    {"project_create", "project_destroy", "project_rename", "project_transfer", "project_update", "repository_update"}
)
GROUP_EVENT_NAMES: Final = frozenset(
    {"group_create", "group_destroy", "group_rename", "subgroup_create", "subgroup_destroy"}
)


class Malformed(ValueError):
    """A delivery that claims a known event but lacks a field a re-sync needs (answered 400)."""


def _field(payload: Mapping[str, Any], path: str) -> object:
    value: object = payload
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _id(payload: Mapping[str, Any], path: str) -> int:
    value = _field(payload, path)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise Malformed(f"{path} must be a positive integer")


def _text(payload: Mapping[str, Any], path: str) -> str:
    value = _field(payload, path)
    if isinstance(value, str) and value:
        return value
    raise Malformed(f"{path} must be a non-empty string")


def _optional_text(payload: Mapping[str, Any], path: str) -> str | None:
    value = _field(payload, path)
    if value is None or (isinstance(value, str) and value):
        return value
    raise Malformed(f"{path} must be a non-empty string when present")


def _push(p: Mapping[str, Any], key: str | None, is_tag: bool) -> PushEvent:
    return PushEvent(
        idempotency_key=key,
        project_id=_id(p, "project_id"),
        project_path=_text(p, "project.path_with_namespace"),
        ref=_text(p, "ref"),
        before=_text(p, "before"),
        after=_text(p, "after"),
        is_tag=is_tag,
    )


def _merge_request(p: Mapping[str, Any], key: str | None) -> MergeRequestEvent:
    return MergeRequestEvent(
        idempotency_key=key,
        project_id=_id(p, "project.id"),
        target_project_id=_id(p, "object_attributes.target_project_id"),
        source_project_id=_id(p, "object_attributes.source_project_id"),
        action=_optional_text(p, "object_attributes.action"),
        project_path=_optional_text(p, "project.path_with_namespace"),
    )


def _job(p: Mapping[str, Any], key: str | None) -> JobEvent:
    return JobEvent(
        idempotency_key=key,
        project_id=_id(p, "project_id"),
        job_id=_id(p, "build_id"),
        pipeline_id=_id(p, "pipeline_id"),
        status=_text(p, "build_status"),
        ref=_text(p, "ref"),
    )


def _pipeline(p: Mapping[str, Any], key: str | None) -> PipelineEvent:
    return PipelineEvent(
        idempotency_key=key,
        project_id=_id(p, "project.id"),
        pipeline_id=_id(p, "object_attributes.id"),
        status=_text(p, "object_attributes.status"),
        ref=_text(p, "object_attributes.ref"),
    )


def _project(p: Mapping[str, Any], key: str | None, name: str) -> ProjectEvent:
    # repository_update carries the path only inside `project`, like push events.
    path = "project.path_with_namespace" if name == "repository_update" else "path_with_namespace"
    return ProjectEvent(
        idempotency_key=key,
        project_id=_id(p, "project_id"),
        path_with_namespace=_text(p, path),
        old_path_with_namespace=_optional_text(p, "old_path_with_namespace"),
        event_name=name,
    )


def _group(p: Mapping[str, Any], key: str | None, name: str) -> GroupEvent:
    return GroupEvent(
        idempotency_key=key,
        group_id=_id(p, "group_id"),
        full_path=_optional_text(p, "full_path"),
        old_full_path=_optional_text(p, "old_full_path"),
        event_name=name,
    )


def parse_event(payload: object, idempotency_key: str | None = None) -> GitLabEvent | None:
    """The typed event in a webhook body; None for kinds no re-sync needs; `Malformed` if a field is bad.

    The body decides, not the `X-Gitlab-Event` header: system hooks send every kind under `System Hook`.
    Project and group webhooks name their event in `object_kind`; system hooks, group `Project Hook`s and
    `Subgroup Hook`s in `event_name` (system hook pushes carry both).
    """
    if not isinstance(payload, Mapping):
        raise Malformed("the body must be a JSON object")
    object_kind, event_name = payload.get("object_kind"), payload.get("event_name")
    name = object_kind if isinstance(object_kind, str) else event_name if isinstance(event_name, str) else None
    if name in ("push", "tag_push"):
        return _push(payload, idempotency_key, is_tag=name == "tag_push")
    if name == "merge_request":
        return _merge_request(payload, idempotency_key)
    if name == "build":
        return _job(payload, idempotency_key)
    if name == "pipeline":
        return _pipeline(payload, idempotency_key)
    if name in PROJECT_EVENT_NAMES:
        return _project(payload, idempotency_key, name)
    if name in GROUP_EVENT_NAMES:
        return _group(payload, idempotency_key, name)
    return None
