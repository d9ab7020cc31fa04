"""The gateway's trigger of job checks (credentials/gateway_checks.py, issue 10 point 13): a raw ID token minted
before a gap in webhook delivery and let through by a gateway gets its job asked about at GitLab at once; tokens
minted after the gap cost nothing; one check per job; bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from controlplane.credentials.exchange import ExchangeIssuer, ExchangePolicy, JobToVerify, MissedHooks
from controlplane.credentials.gateway_checks import GatewayJobChecks
from controlplane.telemetry.metrics import REGISTRY
from tests.support.ports import eventually

GITLAB = "https://gitlab.example"
GAP_END = 1_000.0
SKEW = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = GAP_END + 100.0

    def __call__(self) -> float:
        return self.now


class Checker:
    """Stands for `CredentialService.check_job`: records what is asked, answers when released."""

    def __init__(self, answer: str = "finished") -> None:
        self.asked: list[JobToVerify] = []
        self.answer = answer
        self.release = asyncio.Event()

    async def __call__(self, job: JobToVerify) -> str:
        self.asked.append(job)
        await self.release.wait()
        return self.answer


def checks(
    checker: Callable[[JobToVerify], Awaitable[str]],
    clock: Clock,
    *,
    revoked: Callable[[str], bool] = lambda _: False,
    hooks: MissedHooks | None = None,
    **kw: int,
) -> GatewayJobChecks:
    if hooks is None:
        hooks = MissedHooks(clock)
        hooks.gap_ended(at=GAP_END)
    policy = ExchangePolicy((ExchangeIssuer("gitlab", GITLAB, frozenset(), SKEW),), ())
    return GatewayJobChecks(
        policy=lambda: policy, missed_hooks=hooks, revoked=revoked, check=checker, clock=clock, **kw
    )


def seen(trigger: GatewayJobChecks, job: str, *, iat: float = GAP_END - 600, issuer: str = GITLAB) -> None:
    trigger(job_id=job, project_id="42", issuer=issuer, issued_at=iat, expires_at=iat + 3600)


def sample(result: str) -> float:
    return REGISTRY.get_sample_value("controlplane_gateway_job_checks_total", {"result": result}) or 0.0


async def test_a_token_minted_before_the_gap_is_checked_at_once() -> None:
    clock, checker = Clock(), Checker()
    trigger = checks(checker, clock)
    finished = sample("finished")
    seen(trigger, "7")
    await eventually(lambda: checker.asked, "check started")
    assert checker.asked == [JobToVerify("7", "42", "gitlab", GITLAB, GAP_END - 600 + 3600 + SKEW)]
    checker.release.set()
    await eventually(lambda: trigger.pending == 0, "check done")
    assert sample("finished") == finished + 1


async def test_a_token_minted_after_the_gap_or_of_another_issuer_costs_nothing() -> None:
    clock, checker = Clock(), Checker()
    trigger = checks(checker, clock)
    seen(trigger, "8", iat=GAP_END + SKEW)  # stamped after the gap even by a GitLab clock SKEW ahead
    seen(trigger, "9", issuer="https://other.example")  # not an issuer of the policy (or our own credentials)
    assert trigger.pending == 0
    seen(trigger, "10", iat=GAP_END + SKEW - 1)  # within the skew: may predate the gap
    assert trigger.pending == 1


async def test_duplicate_entries_of_a_job_make_one_check() -> None:
    clock, checker = Clock(), Checker("not_finished")
    trigger = checks(checker, clock)
    for _ in range(50):
        seen(trigger, "11")
    await eventually(lambda: checker.asked, "check started")
    checker.release.set()
    await eventually(lambda: trigger.pending == 0, "check done")
    for _ in range(50):
        seen(trigger, "11")  # not settled as verified here (the stand-in records nothing): backing off
    assert trigger.pending == 0 and len(checker.asked) == 1
    clock.now += 61.0
    seen(trigger, "11")
    await eventually(lambda: len(checker.asked) == 2, "asked again after the back-off")


async def test_a_job_verified_since_the_gap_or_already_revoked_is_not_checked() -> None:
    clock, checker = Clock(), Checker()
    hooks = MissedHooks(clock)
    hooks.gap_ended(at=GAP_END)
    hooks.verified("12", asked_at=GAP_END + 1, until=clock.now + 3600)
    trigger = checks(checker, clock, revoked=lambda job: job == "13", hooks=hooks)
    seen(trigger, "12")
    seen(trigger, "13")
    assert trigger.pending == 0


async def test_waiting_checks_are_bounded_and_the_rest_dropped_and_counted() -> None:
    clock, checker = Clock(), Checker()
    trigger = checks(checker, clock, max_pending=3)
    dropped = sample("dropped")
    for job in range(10):
        seen(trigger, str(job))
    assert trigger.pending == 3
    assert sample("dropped") == dropped + 7
    await trigger.close()
    seen(trigger, "99")  # closed: nothing new is started
    assert trigger.pending == 0


async def test_a_failing_check_is_counted_as_an_error() -> None:
    clock = Clock()

    async def broken(job: JobToVerify) -> str:
        raise RuntimeError("bug")

    errors = sample("error")
    trigger = checks(broken, clock)
    seen(trigger, "14")
    await eventually(lambda: trigger.pending == 0, "check done")
    assert sample("error") == errors + 1
