"""controlplane/cloud/refresh.py: the one refresh schedule of AWS and Google Cloud credentials, by table and by
property (hypothesis): never refreshes after the margin, never uses an expired credential, bounded backoff, a
success always resets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controlplane.cloud.refresh import (
    DEFAULT_POLICY,
    Phase,
    RefreshPolicy,
    RefreshState,
    attempt_due,
    initial_state,
    on_failure,
    on_success,
    phase,
    refresh_at,
    skew,
    usable,
    usable_until,
    valid_seconds,
    wake_at,
)

POLICY = DEFAULT_POLICY  # refresh at 40-50 % of the usable life, >= 300 s before its end (floor 25 %); skew 60 s


@dataclass(frozen=True)
class Cred:
    expires_at: float
    issued_at: float
    name: str = "c"


def cred(issued: float = 1000.0, lifetime: float = 3600.0, name: str = "c") -> Cred:
    return Cred(issued + lifetime, issued, name)


# -- by table


@pytest.mark.parametrize(
    ("lifetime", "sample", "expected_offset"),
    [
        (3600, 0.0, 1770),  # half the usable life (3600 - 60 s of skew)
        (3600, 0.999999, 1416.000354),  # minus up to 10 % of it
        (900, 0.0, 420),  # AWS's shortest session: still half (840 - 300 s of margin is later)
        (43200, 0.0, 21570),  # Google's longest token
        (400, 0.0, 90),  # the margin pulls it to the floor: a quarter of the usable 360 s
        (40, 0.5, 9),  # a 40 s token: skew 4 s (10 % of its life), refreshed after a quarter of 36 s
        (0, 0.5, 0),
    ],
)
def test_refresh_at(lifetime: float, sample: float, expected_offset: float) -> None:
    assert refresh_at(cred(lifetime=lifetime), POLICY, sample) == pytest.approx(1000 + expected_offset)


def test_the_skew_is_60_s_or_a_tenth_of_a_short_life() -> None:
    assert skew(cred(lifetime=3600), POLICY) == 60
    assert skew(cred(lifetime=900), POLICY) == 60
    assert skew(cred(lifetime=300), POLICY) == 30
    assert skew(cred(lifetime=10), POLICY) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"refresh_fraction": 0},
        {"refresh_fraction": 1},
        {"jitter_fraction": 0.3},  # would reach below the floor
        {"jitter_fraction": -0.1},
        {"floor_fraction": 0},
        {"skew_fraction": 1},
        {"min_margin": -1},
        {"expiry_skew": -1},
        {"retry_base": 0},
        {"retry_base": 10, "retry_cap": 5},
    ],
)
def test_an_impossible_policy_is_refused(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RefreshPolicy(**fields)


def test_phases_across_a_credentials_life() -> None:
    state: RefreshState[Cred] = initial_state(1000)
    assert (
        phase(state, 1000, POLICY) is Phase.EMPTY and attempt_due(state, 1000) and usable(state, 1000, POLICY) is None
    )
    credential = cred()
    state = on_success(credential, POLICY, 0.0)
    assert state == RefreshState(credential, 0, 2770)
    expectations = [
        (1000, Phase.FRESH, credential),
        (2769.9, Phase.FRESH, credential),
        (2770, Phase.DUE, credential),
        (4539.9, Phase.DUE, credential),
        (4540, Phase.EXPIRED, None),  # 60 s of skew before the expiration at 4600
        (4600, Phase.EXPIRED, None),
    ]
    for now, expected_phase, expected_credential in expectations:
        assert phase(state, now, POLICY) is expected_phase, now
        assert usable(state, now, POLICY) == expected_credential, now
    assert valid_seconds(state, 4000, POLICY) == 540 and valid_seconds(state, 4540, POLICY) == 0


def test_failures_back_off_exponentially_up_to_the_cap_and_keep_the_credential() -> None:
    credential = cred(lifetime=86400)
    state = on_success(credential, POLICY, 0.0)
    now, delays = state.next_attempt_at, []
    for _ in range(9):
        state = on_failure(state, now, POLICY, 0.999999, "STS answered 503")
        delays.append(round(state.next_attempt_at - now, 3))
        now = state.next_attempt_at
        assert state.credential is credential
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert state.failures == 9 and state.last_error == "STS answered 503"
    recovered = on_success(cred(name="new"), POLICY, 0.0)
    assert recovered.failures == 0 and recovered.last_error is None


def test_backoff_jitter_draws_between_half_and_all_of_the_delay() -> None:
    state: RefreshState[Cred] = initial_state(0)
    assert on_failure(state, 0, POLICY, 0.0).next_attempt_at == 0.5
    assert on_failure(state, 0, POLICY, 0.5).next_attempt_at == 0.75
    many: RefreshState[Cred] = RefreshState(failures=10_000)
    assert on_failure(many, 0.0, POLICY, 0.999999).next_attempt_at == pytest.approx(60)  # no overflow


def test_a_retry_never_waits_past_the_end_of_the_credential_it_holds() -> None:
    policy = RefreshPolicy(retry_base=600, retry_cap=600)
    credential = cred(lifetime=3600)  # usable until 4540
    state = on_failure(on_success(credential, policy, 0.0), 4400, policy, 0.999)
    assert state.next_attempt_at == usable_until(credential, policy)
    after = on_failure(state, 4540, policy, 0.999)  # already past use: plain backoff, nothing to protect
    assert after.next_attempt_at == pytest.approx(4540 + 600 * 0.9995)


def test_wake_at_is_the_next_refresh_or_the_withdrawal_whichever_first() -> None:
    credential = cred(0, 3600)
    state = on_success(credential, POLICY, 0.0)
    assert wake_at(state, 0.0, POLICY) == 1770  # the refresh comes first
    failing = RefreshState(credential, 3, 5000.0)
    assert wake_at(failing, 3000.0, POLICY) == 3540  # the withdrawal comes first
    assert wake_at(failing, 3540.0, POLICY) == 5000  # already withdrawn: only the retry is left


# -- by property

policies = st.builds(
    RefreshPolicy,
    refresh_fraction=st.floats(0.3, 0.9),
    jitter_fraction=st.floats(0.0, 0.05),
    floor_fraction=st.floats(0.05, 0.25),
    min_margin=st.floats(0, 900),
    expiry_skew=st.floats(0, 120),
    skew_fraction=st.floats(0, 0.5),
    retry_base=st.floats(0.1, 10),
    retry_cap=st.floats(10, 600),
)
lives = st.one_of(st.floats(0, 120), st.floats(0, 86400 * 2))  # short ones too: test-sized and odd
advances = st.one_of(st.floats(0, 30), st.floats(0, 7200))
samples = st.floats(0, 1, exclude_max=True)


@given(policy=policies, life=lives, sample=samples)
def test_never_refreshes_after_the_margin_nor_in_a_loop(policy: RefreshPolicy, life: float, sample: float) -> None:
    """The refresh comes at least `min_margin` before the credential stops being usable, unless the credential is
    too short for it: then after the floor (never at once, never in a loop) and still before its end."""
    credential = cred(lifetime=life)
    end = usable_until(credential, policy)
    window = end - credential.issued_at
    at = refresh_at(credential, policy, sample)
    assert at <= end - min(policy.min_margin, (1 - policy.floor_fraction) * window) + 1e-6
    assert at >= credential.issued_at + policy.floor_fraction * window - 1e-6
    if window > 1e-3:
        assert credential.issued_at < at < end


@given(
    policy=policies,
    steps=st.lists(st.tuples(advances, st.booleans(), lives, samples), min_size=1, max_size=40),
)
def test_a_credential_is_never_used_past_its_end_and_backoff_is_bounded(
    policy: RefreshPolicy, steps: list[tuple[float, bool, float, float]]
) -> None:
    """Any sequence of successes and failures, at any times: what `usable` hands out is the last credential
    obtained and is never within the skew of its expiry; each failure's wait is positive, at most the cap, and
    never past the end of a credential still usable; each success resets the count."""
    now = 0.0
    state: RefreshState[Cred] = initial_state(now)
    last: Cred | None = None
    for n, (advance, succeeds, life, sample) in enumerate(steps):
        now += advance
        if succeeds:
            last = cred(now, life, name=str(n))
            state = on_success(last, policy, sample)
            assert state.failures == 0 and state.last_error is None and state.credential is last
            assert state.next_attempt_at == refresh_at(last, policy, sample)
        else:
            before = state
            state = on_failure(state, now, policy, sample, "down")
            wait = state.next_attempt_at - now
            held = usable(before, now, policy)
            assert state.failures == before.failures + 1 and state.credential is before.credential
            assert 0 < wait <= policy.retry_cap * (1 + 1e-9)  # now + delay, rounded
            if held is not None:
                assert state.next_attempt_at <= usable_until(held, policy)
        for probe in (now, now + advance / 2, state.next_attempt_at):
            handed = usable(state, probe, policy)
            if handed is not None:
                assert handed is last
                assert probe < handed.expires_at - skew(handed, policy) <= handed.expires_at
                assert valid_seconds(state, probe, policy) > 0
            else:
                assert valid_seconds(state, probe, policy) == 0


@given(
    policy=policies,
    life=lives,
    sample=samples,
    elapsed=st.floats(0, 1, exclude_max=True),
    failures=st.integers(0, 100),
)
def test_a_retry_comes_before_the_held_credential_stops_being_usable(
    policy: RefreshPolicy, life: float, sample: float, elapsed: float, failures: int
) -> None:
    """However many failures came before, the next attempt is due no later than the end of the credential held,
    so the last chance to replace it before failing closed is never skipped."""
    credential = cred(lifetime=life)
    end = usable_until(credential, policy)
    now = credential.issued_at + elapsed * (end - credential.issued_at)
    state = RefreshState(credential, failures, now)
    after = on_failure(state, now, policy, sample)
    if now < end:
        assert now < after.next_attempt_at <= end
    else:
        assert after.next_attempt_at > now
    assert after.next_attempt_at - now <= policy.retry_cap * (1 + 1e-9)  # now + delay, rounded
