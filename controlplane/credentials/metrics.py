"""Metrics of the credentials service, on the control plane's registry.

The gauges read live state at scrape time (`set_function`) rather than being pushed: "active credentials"
and "key age" change with the clock alone, and a pushed value would be stale between exchanges.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from prometheus_client import Counter, Gauge

from controlplane.telemetry.metrics import REGISTRY

RESULTS: Final = (
    "granted",
    "invalid_request",
    "invalid_grant",
    "invalid_target",
    "invalid_scope",
    "replayed",
    "job_finished",
    "unavailable",
)

EXCHANGES = Counter(
    "controlplane_credential_exchanges_total",
    "Token exchanges by result: granted, or the refusal (replayed = subject token used too often; "
    "job_finished = GitLab reported the job finished; unavailable = no policy or key loaded yet, or the "
    "exchange state cannot be read or written).",
    ["result"],
    registry=REGISTRY,
)
ACTIVE = Gauge(
    "controlplane_credentials_active",
    "Credentials issued by this process and not yet expired.",
    registry=REGISTRY,
)
KEY_AGE = Gauge(
    "controlplane_signing_key_age_seconds",
    "Seconds since the current signing key started signing.",
    registry=REGISTRY,
)
KEYS_PUBLISHED = Gauge(
    "controlplane_signing_keys_published",
    "Signing keys in the JWKS pushed to Envoy: the signing key, the next one, and retired keys whose "
    "credentials may still be alive.",
    registry=REGISTRY,
)

JOB_CHECKS = Counter(
    "controlplane_exchange_job_checks_total",
    "Exchanges that asked GitLab about a job first (its token predates a gap in webhook delivery), by answer: "
    "not_finished (granted), finished (refused), not_found and error (refused, 503), no_gitlab (no API for the "
    "issuer: granted unchecked).",
    ["result"],
    registry=REGISTRY,
)

for _result in RESULTS:
    EXCHANGES.labels(_result)  # every series exists from the start, so rate() sees the first refusal


def count_exchange(result: str) -> None:
    EXCHANGES.labels(result).inc()


def count_job_check(result: str) -> None:
    JOB_CHECKS.labels(result).inc()


def track_active_credentials(read: Callable[[], int]) -> None:
    ACTIVE.set_function(read)


def track_signing_keys(age: Callable[[], float], published: Callable[[], int]) -> None:
    KEY_AGE.set_function(age)
    KEYS_PUBLISHED.set_function(published)


GATEWAY_JOB_CHECKS = Counter(
    "controlplane_gateway_job_checks_total",
    "Jobs whose raw ID token got through a gateway although it predates a gap in webhook delivery, asked about "
    "at GitLab, by answer: finished (revoked), not_finished, not_found, error (asked again later), no_gitlab "
    "(no API for the issuer), dropped (too many checks waiting: left to the periodic sweep).",
    ["result"],
    registry=REGISTRY,
)


def count_gateway_job_check(result: str) -> None:
    GATEWAY_JOB_CHECKS.labels(result).inc()


# Why a finished job went on the deny list (docs/revocation-coverage.md), or `not_listed`: nothing of it can pass.
FINISHED_JOB_REASONS: Final = ("credentials", "seen", "covered", "seen_after_finish", "not_listed")
FINISHED_JOBS = Counter(
    "controlplane_finished_jobs_total",
    "Finished jobs by what listed them on the deny list: credentials (it exchanged), seen (a gateway let its raw "
    "ID token through), covered (a backend accepting raw ID tokens covers it), seen_after_finish (first seen after "
    "its Job Hook, listed then), or not_listed (none of these: it costs the fleet nothing).",
    ["reason"],
    registry=REGISTRY,
)
for _reason in FINISHED_JOB_REASONS:
    FINISHED_JOBS.labels(reason=_reason)


def count_finished_job(reason: str) -> None:
    FINISHED_JOBS.labels(reason=reason).inc()
