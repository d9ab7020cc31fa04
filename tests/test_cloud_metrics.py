"""The one metric family of cloud credentials (controlplane/cloud/metrics.py), as both providers' refreshers
feed it: results mapped onto one vocabulary, the valid-seconds gauge reading 0 when nothing is held, an expiry
counted once, and a stopped refresher's series dropped unless another one took its backend over."""

from __future__ import annotations

import pytest

from controlplane.cloud import metrics
from controlplane.cloud.aws import AwsCredential, Refresher, StsError
from controlplane.cloud.gcp import (
    METRIC_RESULT,
    REFRESH_RESULTS,
    CloudCredential,
    GcpCredentialRefresher,
    GcpExchangeError,
    GcpSettings,
)
from controlplane.telemetry.metrics import REGISTRY
from tests.support.clock import Clock

PROVIDER = "projects/123456/locations/global/workloadIdentityPools/ci-pool/providers/controlplane"
SA = "reader@acme.iam.gserviceaccount.com"


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def count(name: str, **labels: str) -> float:
    return sample(name, **labels) or 0.0


def test_every_gcp_reason_maps_onto_the_shared_vocabulary() -> None:
    assert set(METRIC_RESULT) == set(REFRESH_RESULTS)
    assert set(METRIC_RESULT.values()) <= set(metrics.RESULTS)


def test_an_unknown_result_is_a_bug_not_a_series() -> None:
    with pytest.raises(ValueError, match="unknown refresh result"):
        metrics.count_refresh("aws", "x", "throttled")


class OneShot:
    """An AWS source answering a credential of `lifetime` seconds, or raising `error`."""

    def __init__(self, clock: Clock, error: Exception | None = None) -> None:
        self.clock, self.error = clock, error

    def fetch(self) -> AwsCredential:
        if self.error is not None:
            raise self.error
        now = self.clock()
        return AwsCredential("ASIAM", "secret", "token", now + 3600, "arn:aws:iam::1:role/r", now)


def test_aws_valid_seconds_expiry_and_results() -> None:
    clock = Clock(1000.0)
    arn = "arn:aws:iam::111122223333:role/metrics"
    refresher = Refresher(arn, OneShot(clock), clock=clock, sample=lambda: 0.0)
    gauge = {"provider": "aws", "backend": arn}
    assert sample("controlplane_cloud_credential_valid_seconds", **gauge) == 0.0, "nothing held: fails closed"
    refresher.poll()
    assert sample("controlplane_cloud_credential_valid_seconds", **gauge) == 3540.0  # 1 h less the 60 s skew
    expired = count("controlplane_cloud_credentials_expired_total", **gauge)
    refresher._source = OneShot(clock, StsError("Throttling", arn, refused=False))
    clock.now = 1000.0 + 3540
    refresher.poll()
    refresher.poll()
    assert sample("controlplane_cloud_credential_valid_seconds", **gauge) == 0.0
    assert count("controlplane_cloud_credentials_expired_total", **gauge) == expired + 1, "counted once"

    errors = count("controlplane_cloud_credential_refreshes_total", provider="aws", backend=arn, result="error")
    refresher._source = OneShot(clock, RuntimeError("bug"))
    clock.now += 3600
    refresher.poll()
    assert count("controlplane_cloud_credential_refreshes_total", provider="aws", backend=arn, result="error") == (
        errors + 1
    )
    refresher.stop()
    assert sample("controlplane_cloud_credential_valid_seconds", **gauge) is None, "a stopped refresher's series goes"


def test_a_replaced_refresher_stopping_late_keeps_its_successors_series() -> None:
    clock = Clock(0.0)
    old = Refresher("arn:aws:iam::1:role/same", OneShot(clock), clock=clock)
    new = Refresher("arn:aws:iam::1:role/same", OneShot(clock), clock=clock)
    new.poll()
    old.stop()
    labels = {"provider": "aws", "backend": "arn:aws:iam::1:role/same"}
    assert (sample("controlplane_cloud_credential_valid_seconds", **labels) or 0.0) > 0
    new.stop()
    assert sample("controlplane_cloud_credential_valid_seconds", **labels) is None


async def test_gcp_results_and_an_expiry_counted_once() -> None:
    clock = Clock(5000.0)
    answers: list[CloudCredential | Exception] = [CloudCredential("t", expires_at=5000.0 + 3600, issued_at=5000.0)]

    async def fetch(_settings: GcpSettings, _now: float) -> CloudCredential:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    settings = GcpSettings("metrics-gcs", PROVIDER, SA)
    refresher = GcpCredentialRefresher(settings, fetch, clock=clock)
    labels = {"provider": "gcp", "backend": "metrics-gcs"}
    expired = count("controlplane_cloud_credentials_expired_total", **labels)
    refused = count("controlplane_cloud_credential_refreshes_total", **labels, result="refused")
    assert await refresher.refresh_once()
    refresher.settle()
    answers.append(GcpExchangeError("iam_refused", "no"))
    assert not await refresher.refresh_once()
    assert count("controlplane_cloud_credential_refreshes_total", **labels, result="refused") == refused + 1
    clock.now = 5000.0 + 3590
    refresher.settle()
    refresher.settle()
    assert count("controlplane_cloud_credentials_expired_total", **labels) == expired + 1
    assert sample("controlplane_cloud_credential_valid_seconds", **labels) == 0.0
    refresher.stop()
    assert sample("controlplane_cloud_credential_valid_seconds", **labels) is None
