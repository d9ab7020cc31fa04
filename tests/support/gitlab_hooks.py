"""Webhook deliveries as GitLab makes them: the same headers, the same payload shapes, a real HTTP POST.

Used by the fake GitLab (it delivers a hook when a test archives, renames or pushes) and by tests that
forge or replay deliveries on purpose.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .backends import HttpResponse, http_request

ZERO_SHA = "0" * 40
GITLAB_VERSION = "18.6.0"


@dataclass
class HookTarget:
    """A registered webhook: where GitLab posts, and the secret token it sends in `X-Gitlab-Token`."""

    url: str
    secret: str
    webhook_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))
    deliveries: list[tuple[str, int]] = field(default_factory=list)  # (event header, status)


def deliver(
    target: HookTarget,
    event_header: str,
    payload: Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
    token: str | None = None,
    instance: str = "https://gitlab.example.com",
) -> HttpResponse:
    """POST one delivery. `token` overrides the target's secret (to forge); a fixed key replays."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"GitLab/{GITLAB_VERSION}",
        "X-Gitlab-Event": event_header,
        "X-Gitlab-Token": target.secret if token is None else token,
        "X-Gitlab-Instance": instance,
        "X-Gitlab-Webhook-UUID": target.webhook_uuid,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
    }
    response = http_request(target.url, method="POST", headers=headers, body=json.dumps(payload).encode())
    target.deliveries.append((event_header, response.status))
    return response


def push_hook(project_id: int, path: str, ref: str, before: str, after: str) -> dict[str, Any]:
    return {
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": after,
        "ref": ref,
        "checkout_sha": after if after != ZERO_SHA else None,
        "project_id": project_id,
        "project": {"id": project_id, "path_with_namespace": path, "default_branch": "main"},
        "commits": [],
        "total_commits_count": 0,
    }


def project_system_hook(event_name: str, project_id: int, path: str, old_path: str | None = None) -> dict[str, Any]:
    """System hook project_* events; archiving a project sends `project_update`."""
    name = path.rsplit("/", 1)[-1]
    payload: dict[str, Any] = {
        "event_name": event_name,
        "created_at": "2026-11-25T10:00:00Z",
        "updated_at": "2026-11-25T10:00:00Z",
        "name": name,
        "path": name,
        "path_with_namespace": path,
        "project_id": project_id,
        "project_namespace_id": project_id + 10_000,
        "owner_name": "Administrator",
        "owner_email": "admin@example.com",
        "owners": [],
        "project_visibility": "private",
    }
    if old_path is not None:
        payload["old_path_with_namespace"] = old_path
    return payload
