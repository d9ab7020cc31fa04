"""The one retry policy (`controlplane.retry`): each caller's delays, caps and jitter, as each had them."""

from __future__ import annotations

import pytest

from controlplane.credentials.recovery import DEFAULT_INTERVAL, DEFAULT_RETRY
from controlplane.retry import Backoff, RetryPolicy, retry_after_seconds
from controlplane.sources import jwks
from controlplane.sources.gitlab_client import BACKOFF as GITLAB_BACKOFF
from controlplane.sources.gitlab_watch import inventory_backoff


def test_without_jitter_the_delay_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_seconds=0.2, cap_seconds=2.0, jitter=False)
    assert [backoff.delay(n) for n in range(6)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0, 2.0])


def test_with_jitter_each_delay_is_between_half_and_all_of_its_ceiling() -> None:
    backoff = Backoff(base_seconds=0.1, cap_seconds=5.0)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]):
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # spread, not one value


def test_a_very_long_run_of_failures_stays_at_the_cap_and_never_overflows() -> None:
    assert Backoff(base_seconds=1.0, cap_seconds=256.0, jitter=False).delay(10**6) == 256.0
    assert Backoff(base_seconds=15.0, cap_seconds=300.0, jitter=False).delay(5000) == 300.0


def test_the_policy_is_exhausted_after_max_retries_retries() -> None:
    policy = RetryPolicy(max_retries=3, backoff=GITLAB_BACKOFF)
    assert [policy.exhausted(n) for n in range(5)] == [False, False, False, True, True]
    assert RetryPolicy(max_retries=0, backoff=GITLAB_BACKOFF).exhausted(0)


def test_gitlab_requests_back_off_from_100_ms_to_5_s_with_jitter() -> None:
    assert Backoff(base_seconds=0.1, cap_seconds=5.0, jitter=True) == GITLAB_BACKOFF


def test_jwks_fetches_back_off_exactly_from_200_ms_to_2_s() -> None:
    assert [jwks.BACKOFF.delay(n) for n in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.6, 2.0])


def test_a_jwks_fetch_waits_as_the_issuer_asks_up_to_5_s() -> None:
    retry = RetryPolicy(max_retries=3, backoff=jwks.BACKOFF)
    assert jwks.retry_delay(retry, 0, None) == pytest.approx(0.2)
    assert jwks.retry_delay(retry, 2, 0.1) == pytest.approx(0.8)  # the backoff when longer than the hint
    assert jwks.retry_delay(retry, 0, 3.0) == 3.0
    assert jwks.retry_delay(retry, 0, 3600.0) == 5.0
    hinted = retry_after_seconds({"Retry-After": "Thu, 01 Jan 1970 00:00:44 GMT"}, now=40)
    assert jwks.retry_delay(retry, 0, hinted) == 4.0


@pytest.mark.parametrize("reconcile_seconds", [10.0, 60.0, 300.0, 3600.0])
def test_the_inventory_watcher_backs_off_as_before(reconcile_seconds: float) -> None:
    """Was: ceiling = min(reconcile_seconds, 2 ** min(failures, 8)), times uniform(0.5, 1); now retry
    `failures - 1` (from 0, as the other callers count) of the watcher's own backoff."""
    backoff = inventory_backoff(reconcile_seconds)
    for failures in range(1, 40):
        ceiling = min(reconcile_seconds, 2.0 ** min(failures, 8))
        assert all(ceiling / 2 <= backoff.delay(failures - 1) <= ceiling for _ in range(20))
    exact = Backoff(base_seconds=backoff.base_seconds, cap_seconds=backoff.cap_seconds, jitter=False)
    assert [exact.delay(failures - 1) for failures in range(1, 40)] == [
        min(reconcile_seconds, 2.0 ** min(failures, 8)) for failures in range(1, 40)
    ]


def test_job_recovery_retries_an_incomplete_sweep_as_before() -> None:
    """Was: min(interval, retry * 2 ** (failures - 1)), exact."""
    backoff = Backoff(base_seconds=DEFAULT_RETRY, cap_seconds=DEFAULT_INTERVAL, jitter=False)
    for failures in range(1, 60):
        assert backoff.delay(failures - 1) == min(DEFAULT_INTERVAL, DEFAULT_RETRY * 2 ** (failures - 1))


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds({"Retry-After": "7"}, now=0) == 7
    assert retry_after_seconds({"Retry-After": "1.5"}, now=0) == 1.5
    assert retry_after_seconds({"Retry-After": "Thu, 01 Jan 1970 00:01:40 GMT"}, now=40) == 60
    assert retry_after_seconds({"RateLimit-Reset": "130"}, now=100) == 30
    assert retry_after_seconds({}, now=0) is None


def test_retry_after_never_negative_and_unreadable_falls_through() -> None:
    assert retry_after_seconds({"Retry-After": "-3"}, now=0) == 0.0
    assert retry_after_seconds({"Retry-After": "Thu, 01 Jan 1970 00:00:10 GMT"}, now=40) == 0.0
    assert retry_after_seconds({"RateLimit-Reset": "90"}, now=100) == 0.0
    assert retry_after_seconds({"Retry-After": "soon", "RateLimit-Reset": "130"}, now=100) == 30
    assert retry_after_seconds({"Retry-After": "soon", "RateLimit-Reset": "later"}, now=100) is None
    assert retry_after_seconds({"Retry-After": "5", "RateLimit-Reset": "130"}, now=100) == 5  # Retry-After first


@pytest.mark.parametrize(("min_interval", "refresh_interval"), [(1.0, 30.0), (0.05, 3600.0), (5.0, 5.0)])
def test_a_failing_jwks_relay_comes_back_sooner_as_before(min_interval: float, refresh_interval: float) -> None:
    """Was: min(refresh_interval, min_interval * 2 ** (failures - 1)), exact."""
    backoff = Backoff(base_seconds=min_interval, cap_seconds=refresh_interval, jitter=False)
    for failures in range(1, 60):
        assert backoff.delay(failures - 1) == min(refresh_interval, min_interval * 2 ** (failures - 1))
