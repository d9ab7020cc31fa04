"""Metrics of the GitLab API client, on the control plane's registry.

Endpoint labels are templates (`/projects/:id/repository/branches`), never ids or paths: label values must stay
few (every distinct value is a time series kept forever) and project paths are not something to export.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from controlplane.telemetry.metrics import REGISTRY

GITLAB_REQUESTS = Counter(
    "controlplane_gitlab_requests_total",
    "HTTP requests sent to the GitLab API, by endpoint template and status (`error`: no HTTP answer).",
    ["endpoint", "status"],
    registry=REGISTRY,
)
GITLAB_REQUEST_DURATION = Histogram(
    "controlplane_gitlab_request_duration_seconds",
    "Time of one HTTP request to the GitLab API (each retry counts on its own).",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
GITLAB_RATE_LIMIT_WAITS = Counter(
    "controlplane_gitlab_rate_limit_waits_total",
    "Times GitLab answered 429 and the client waited (Retry-After) before retrying.",
    registry=REGISTRY,
)
GITLAB_RATE_LIMIT_WAIT_SECONDS = Counter(
    "controlplane_gitlab_rate_limit_wait_seconds_total",
    "Seconds spent waiting on GitLab's 429 Retry-After.",
    registry=REGISTRY,
)
