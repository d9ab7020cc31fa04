"""Attacks on per-binding AWS roles and the shared refresh schedule (issue 16 point 2), each a regression test of
what was found broken or checked to hold: docs/aws-role-attacks.md has the inputs, what was observed and why."""

from __future__ import annotations

from controlplane.cloud.aws import AwsCredential, Refresher, StsError
from tests.support.clock import Clock
from tests.test_cloud_aws import Scripted, cred

# -- the schedule: a credential that is already past use when it arrives


def test_a_credential_dead_on_arrival_is_a_failure_not_a_hot_loop() -> None:
    """STS's clock behind ours (or ours jumped forward, or a fetch slower than a 1 s lifetime): the answer expires
    before it is received. Before: taken as a success whose refresh is due at once, so the thread called STS
    back-to-back without pause (and every call was one more STS request), and the role stayed at 503."""
    clock = Clock(1000.0)
    source = Scripted(clock)
    source.script = [cred(issued=1000.0, lifetime=-5.0, key=f"ASIADEAD{n}") for n in range(100)]
    refresher = Refresher("dead-on-arrival", source, clock=clock, sample=lambda: 0.0)
    wakes = [refresher.poll() for _ in range(20)]  # the clock does not move: what a spinning thread would do
    assert source.calls == 1, "STS called again with no backoff"
    assert refresher.current() is None and refresher.state.failures == 1
    assert wakes[-1] > clock.now


def test_a_dead_answer_does_not_replace_the_credential_held() -> None:
    """A refresh answered with an expired session keeps the usable one (as a failure does) and backs off, instead
    of dropping the role to 503 and retrying in a loop."""
    clock = Clock(1000.0)
    source = Scripted(clock)
    refresher = Refresher("dead-refresh", source, clock=clock, sample=lambda: 0.0)
    refresher.poll()
    held = refresher.current()
    assert held is not None
    clock.now = 2770.0  # the refresh is due
    dead = AwsCredential("ASIADEAD", "s", "t", 2769.0, "arn:aws:iam::1:role/r", 2770.0)
    source.script = [dead, dead, StsError("Throttling", "r", refused=False)]
    wake = refresher.poll()
    assert refresher.current() is held
    assert wake > clock.now and refresher.state.failures == 1
    refresher.poll()
    assert source.calls == 2  # backing off, not spinning
