"""One metric family for every cloud's short-lived credentials, so one dashboard row and one set of alerts cover
AWS and Google Cloud alike (docs/metrics.md, docs/alerts.md).

`provider` is `aws` or `gcp`. `backend` is what one refresher serves: a Backend's name for Google Cloud; for AWS
the role ARN, since one refresher serves every backend that names the same role (docs/aws-backends.md).

`result` has one vocabulary for both providers (`RESULTS`); the provider's own error code is in the log line of
the failure, not in a label, so the label stays bounded:
- `ok`: a new credential is held.
- `refused`: the cloud said no (trust policy, audience or subject, permissions, a bad token). Retrying does not
  help until someone changes the cloud's or the policy's configuration.
- `unavailable`: the cloud was unreachable, throttled or failing (5xx); retried with backoff.
- `malformed`: an answer the control plane cannot read.
- `unsigned`: no signing key may sign the control plane's own token yet (the key store is still starting).
- `error`: an unexpected failure in the control plane itself: a bug.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Final

from prometheus_client import Counter, Gauge

from controlplane.telemetry.metrics import REGISTRY

PROVIDERS: Final = ("aws", "gcp")
RESULTS: Final = ("ok", "refused", "unavailable", "malformed", "unsigned", "error")

REFRESHES = Counter(
    "controlplane_cloud_credential_refreshes_total",
    "Attempts to obtain a cloud credential, by provider (aws, gcp), backend (gcp: the Backend; aws: the role ARN) "
    "and result: ok; refused (the cloud said no: configuration); unavailable (unreachable, throttled, failing: "
    "retried); malformed (an unreadable answer); unsigned (no signing key may sign yet); error (a bug).",
    ["provider", "backend", "result"],
    registry=REGISTRY,
)
VALID_SECONDS = Gauge(
    "controlplane_cloud_credential_valid_seconds",
    "Seconds the cloud credential held for a backend stays usable; 0 means none: its requests fail closed.",
    ["provider", "backend"],
    registry=REGISTRY,
)
EXPIRED = Counter(
    "controlplane_cloud_credentials_expired_total",
    "Times a backend's last cloud credential stopped being usable with no fresh one: its requests fail closed "
    "until a refresh succeeds.",
    ["provider", "backend"],
    registry=REGISTRY,
)


def count_refresh(provider: str, backend: str, result: str) -> None:
    """Counts one attempt. An unknown `result` is a bug here, not a new series on a dashboard."""
    if result not in RESULTS:
        raise ValueError(f"unknown refresh result {result!r}; one of {RESULTS}")
    REFRESHES.labels(provider, backend, result).inc()


# Who set each gauge child: a refresher replaced by a new one for the same backend (its settings changed) may
# stop after the new one started, and must not drop the new one's series.
_owners: dict[tuple[str, str], object] = {}
_owners_lock = threading.Lock()


def track_valid_seconds(provider: str, backend: str, owner: object, seconds: Callable[[], float]) -> None:
    """Makes the gauge read `seconds()` at each scrape, on behalf of `owner` (a refresher)."""
    with _owners_lock:
        _owners[(provider, backend)] = owner
        VALID_SECONDS.labels(provider, backend).set_function(seconds)


def forget(provider: str, backend: str, owner: object) -> None:
    """Drops the gauge of `owner`, a refresher that stopped (its backend left the policy): a stale series would
    say 0 and page. Nothing happens if another refresher took the backend over since."""
    with _owners_lock:
        if _owners.get((provider, backend)) is not owner:
            return
        del _owners[(provider, backend)]
        with contextlib.suppress(KeyError):  # never set, or removed already
            VALID_SECONDS.remove(provider, backend)
