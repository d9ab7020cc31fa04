"""One refresh schedule for every cloud's short-lived credentials (AWS role sessions, Google Cloud tokens), and
the one loop that applies it. docs/cloud-refresh.md has the numbers and why.

The schedule is pure: functions of a `RefreshState`, a `RefreshPolicy`, the clock reading and a random sample in
[0, 1) handed in, so it is tested without I/O or time (tests/test_cloud_refresh.py, with property-based tests).
It is generic over any `Expiring` credential: the providers differ in how they obtain one, not in when.

- **Refresh** at `refresh_fraction` of the credential's usable life, earlier by up to `jitter_fraction` of it
  (control planes sharing a role or an account do not call the cloud in step), never later than `min_margin`
  before it stops being usable; but never before `floor_fraction` of its usable life, so a credential shorter
  than the margin is not refreshed in a loop (the margin then shrinks to what the floor leaves).
- **Use** a credential until `expiry_skew` before it expires (a request sent in its last moments must not reach
  the cloud after it); the skew is at most `skew_fraction` of the credential's life, so a short one stays usable
  for most of its life.
- **On failure** keep the credential held and retry after `retry_base * 2**n` seconds (n failures so far, at
  most `retry_cap`), drawn between half of that and all of it; never later than the moment the held credential
  stops being usable, so a long backoff cannot eat its last chance.
- **After that** nothing is usable: `usable()` is None and the caller fails closed (nothing signed, nothing
  injected) until a refresh succeeds. A success resets the failure count.

`Refresher` ties the schedule to a clock, the shared metrics (cloud/metrics.py), logs and a change listener. Its
callers fetch however they need to: `poll_blocking(fetch)` for a blocking fetch (AWS's botocore, on a thread started by
`start_thread`), `poll_async(fetch)` / `run_async(fetch)` for a coroutine (Google's aiohttp, on the event loop).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from controlplane.cloud import metrics

log = logging.getLogger("controlplane.cloud.refresh")

_MAX_EXPONENT = 62  # 2**62 seconds: every sane cap has long been reached; no float overflow


class Expiring(Protocol):
    """Any credential the schedule can plan for: when it was received (the control plane's clock) and when it
    expires."""

    @property
    def expires_at(self) -> float: ...

    @property
    def issued_at(self) -> float: ...


C = TypeVar("C", bound=Expiring)


@dataclass(frozen=True)
class RefreshPolicy:
    """The schedule's numbers; the defaults serve both providers (docs/cloud-refresh.md says why)."""

    refresh_fraction: float = 0.5
    jitter_fraction: float = 0.1
    floor_fraction: float = 0.25
    min_margin: float = 300.0
    expiry_skew: float = 60.0
    skew_fraction: float = 0.1
    retry_base: float = 1.0
    retry_cap: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.refresh_fraction < 1:
            raise ValueError("refresh_fraction must be in (0, 1)")
        if not 0 <= self.jitter_fraction <= self.refresh_fraction - self.floor_fraction:
            raise ValueError("jitter_fraction must be in [0, refresh_fraction - floor_fraction]")
        if not 0 < self.floor_fraction < 1 or not 0 <= self.skew_fraction < 1:
            raise ValueError("floor_fraction must be in (0, 1) and skew_fraction in [0, 1)")
        if self.min_margin < 0 or self.expiry_skew < 0:
            raise ValueError("min_margin and expiry_skew must not be negative")
        if not 0 < self.retry_base <= self.retry_cap:
            raise ValueError("retry_base must be positive and at most retry_cap")


DEFAULT_POLICY = RefreshPolicy()


class Phase(enum.Enum):
    EMPTY = "empty"  # no credential yet: nothing to send
    FRESH = "fresh"  # usable, refresh not yet due
    DUE = "due"  # usable, a refresh is due or failing
    EXPIRED = "expired"  # the last credential is past use: fail closed


@dataclass(frozen=True)
class RefreshState(Generic[C]):
    """What a refresher holds: the last good credential, the failures since, when to try next, and the last
    failure's description (no secret: the caller's error message)."""

    credential: C | None = None
    failures: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None


# -- pure decisions


def initial_state(now: float) -> RefreshState[C]:
    """Nothing held, first attempt at once."""
    return RefreshState(None, 0, now)


def _life(credential: Expiring) -> float:
    return max(0.0, credential.expires_at - credential.issued_at)


def skew(credential: Expiring, policy: RefreshPolicy) -> float:
    """How long before its expiry a credential stops being used: `expiry_skew`, at most `skew_fraction` of its
    life."""
    return min(policy.expiry_skew, _life(credential) * policy.skew_fraction)


def usable_until(credential: Expiring, policy: RefreshPolicy) -> float:
    return credential.expires_at - skew(credential, policy)


def refresh_at(credential: Expiring, policy: RefreshPolicy, sample: float) -> float:
    """When to replace `credential`; `sample` in [0, 1) draws the jitter."""
    end = usable_until(credential, policy)
    window = max(0.0, end - credential.issued_at)
    planned = credential.issued_at + window * (policy.refresh_fraction - policy.jitter_fraction * sample)
    floor = credential.issued_at + window * policy.floor_fraction
    return max(floor, min(planned, end - policy.min_margin))


def retry_delay(failures: int, policy: RefreshPolicy, sample: float) -> float:
    """The wait after the (failures+1)-th failure in a row: exponential, capped, jittered down to half."""
    ceiling = min(policy.retry_cap, policy.retry_base * 2.0 ** min(failures, _MAX_EXPONENT))
    return ceiling * (0.5 + 0.5 * sample)


def on_success(credential: C, policy: RefreshPolicy, sample: float) -> RefreshState[C]:
    return RefreshState(credential, 0, refresh_at(credential, policy, sample))


def on_failure(
    state: RefreshState[C], now: float, policy: RefreshPolicy, sample: float, error: str | None = None
) -> RefreshState[C]:
    """Back off; the credential held is kept. With one still usable, the next attempt never waits past the moment
    it stops being usable."""
    next_attempt = now + retry_delay(state.failures, policy, sample)
    if state.credential is not None:
        end = usable_until(state.credential, policy)
        if now < end:
            next_attempt = min(next_attempt, end)
    return replace(state, failures=state.failures + 1, next_attempt_at=next_attempt, last_error=error)


def phase(state: RefreshState[C], now: float, policy: RefreshPolicy) -> Phase:
    if state.credential is None:
        return Phase.EMPTY
    if now >= usable_until(state.credential, policy):
        return Phase.EXPIRED
    return Phase.DUE if now >= state.next_attempt_at else Phase.FRESH


def usable(state: RefreshState[C], now: float, policy: RefreshPolicy) -> C | None:
    """The credential to send now, or None (fail closed)."""
    return state.credential if phase(state, now, policy) in (Phase.FRESH, Phase.DUE) else None


def attempt_due(state: RefreshState[C], now: float) -> bool:
    return now >= state.next_attempt_at


def valid_seconds(state: RefreshState[C], now: float, policy: RefreshPolicy) -> float:
    """How long the credential held stays usable; 0: none (the gauge's reading)."""
    credential = usable(state, now, policy)
    return 0.0 if credential is None else max(0.0, usable_until(credential, policy) - now)


def wake_at(state: RefreshState[C], now: float, policy: RefreshPolicy) -> float:
    """The next moment something changes: a refresh is due, or the held credential must be withdrawn."""
    credential = usable(state, now, policy)
    if credential is None:
        return state.next_attempt_at
    return min(state.next_attempt_at, usable_until(credential, policy))


# -- the loop


@dataclass(frozen=True)
class Failure:
    """A failed attempt as the metrics and the log see it: a `metrics.RESULTS` label and a message with no
    secret in it."""

    result: str
    message: str


class DeadOnArrival(Exception):
    """The cloud answered with a credential already past use by this control plane's clock."""

    def __init__(self, remaining: float) -> None:
        super().__init__(remaining)
        self.remaining = remaining


def _dead_on_arrival(caught: Exception) -> Failure | None:
    if not isinstance(caught, DeadOnArrival):
        return None
    return Failure(
        "malformed",
        f"the credential received expires {caught.remaining:.1f}s from now, inside its skew or already past: "
        "clocks out of step, or a fetch slower than the credential's life; kept what was held",
    )


class Refresher(Generic[C]):
    """Keeps one backend's credential fresh. `current()` is what the caller sends with; `on_change` hears every
    change of it (a new credential, or None once the last one is past use: the caller withdraws it).

    `classify` turns a fetch's exception into a `Failure`; an exception it does not know is counted as `error`
    without its text, which may hold data. `describe` says what a new credential is in the log (never a secret).
    """

    def __init__(
        self,
        provider: str,
        backend: str,
        *,
        classify: Callable[[Exception], Failure | None],
        describe: Callable[[C], str],
        policy: RefreshPolicy | None = None,
        clock: Callable[[], float] = time.time,
        sample: Callable[[], float] = random.random,
        on_change: Callable[[C | None], object] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.provider = provider
        self.backend = backend
        self.policy = policy or DEFAULT_POLICY
        self._classify = classify
        self._describe = describe
        self._clock = clock
        self._sample = sample
        self._on_change = on_change
        self._log = logger
        self._polling = threading.Lock()
        self.state: RefreshState[C] = initial_state(clock())
        self._announced: C | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.track_valid_seconds(provider, backend, self, self.valid_seconds)

    def current(self) -> C | None:
        """The credential to send with now, or None: fail closed."""
        return usable(self.state, self._clock(), self.policy)

    def valid_seconds(self) -> float:
        return valid_seconds(self.state, self._clock(), self.policy)

    def due(self) -> bool:
        return attempt_due(self.state, self._clock())

    def wake_at(self) -> float:
        return wake_at(self.state, self._clock(), self.policy)

    # -- one attempt, told by the driver

    def succeeded(self, credential: C) -> None:
        self.state = on_success(credential, self.policy, self._sample())
        metrics.count_refresh(self.provider, self.backend, "ok")
        remaining = credential.expires_at - self._clock()
        self._log.info(
            "%s credentials for backend %s refreshed: %s, expire in %.0fs",
            self.provider.upper(),
            self.backend,
            self._describe(credential),
            remaining,
        )

    def failed(self, caught: Exception) -> None:
        failure = (
            _dead_on_arrival(caught)
            or self._classify(caught)
            or Failure("error", f"unexpected {type(caught).__name__}")
        )
        now = self._clock()
        state = self.state = on_failure(self.state, now, self.policy, self._sample(), failure.message)
        metrics.count_refresh(self.provider, self.backend, failure.result)
        held = usable(state, now, self.policy)
        self._log.warning(
            "%s credentials for backend %s: refresh failed (%s, attempt %d; %s; next in %.1fs): %s",
            self.provider.upper(),
            self.backend,
            failure.result,
            state.failures,
            "keeping the last one" if held is not None else "none held: failing closed",
            state.next_attempt_at - now,
            failure.message,
        )

    def settle(self) -> float:
        """Tell the listener when `current()` changed (a new credential, or none once the last one is past use,
        counted as expired once); return when to come back."""
        current = self.current()
        if current is not self._announced:
            held_one, self._announced = self._announced is not None, current
            if current is None and held_one:
                metrics.EXPIRED.labels(self.provider, self.backend).inc()
                self._log.error(
                    "%s credentials for backend %s expired with no fresh ones: failing closed",
                    self.provider.upper(),
                    self.backend,
                )
            self._notify(current)
        return self.wake_at()

    def _notify(self, credential: C | None) -> None:
        """A failing listener is logged, not raised: the loop must outlive it, and the credential stays available
        through `current()`."""
        if self._on_change is None:
            return
        try:
            self._on_change(credential)
        except Exception:
            self._log.exception("the listener of backend %s's %s credentials failed", self.backend, self.provider)

    def _received(self, credential: C) -> None:
        """A credential already past use when it arrives (the cloud's clock behind ours, ours jumped forward, a
        fetch slower than the credential's life) is a failure: taken as a success, its refresh would be due at
        once (a loop calling the cloud without pause) and it would replace one still usable."""
        now = self._clock()
        if now >= usable_until(credential, self.policy):
            self.failed(DeadOnArrival(credential.expires_at - now))
        else:
            self.succeeded(credential)

    # -- drivers: a blocking fetch (a thread) or a coroutine (an event loop)

    def poll_blocking(self, fetch: Callable[[], C]) -> float:
        """Refresh if due (blocking), then settle. Returns when to call again. One round at a time: a caller
        polling by hand (tests, `AwsSigners.poll`) never overlaps the thread's round."""
        with self._polling:
            if self.due():
                try:
                    credential = fetch()
                except Exception as caught:  # a bug must not end the loop: retried like an outage
                    self.failed(caught)
                else:
                    self._received(credential)
            return self.settle()

    async def poll_async(self, fetch: Callable[[], Awaitable[C]]) -> float:
        if self.due():
            try:
                credential = await fetch()
            except Exception as caught:  # as in poll; cancellation (BaseException) still ends the task
                self.failed(caught)
            else:
                self._received(credential)
        return self.settle()

    async def run_async(
        self, fetch: Callable[[], Awaitable[C]], sleep: Callable[[float], Awaitable[object]] = asyncio.sleep
    ) -> None:
        """On an event loop, until cancelled."""
        while True:
            wake = await self.poll_async(fetch)
            await sleep(max(0.0, wake - self._clock()))

    def start_thread(self, fetch: Callable[[], C], name: str) -> None:
        """On a thread of its own, until `stop()`."""

        def loop() -> None:
            while not self._stop.is_set():
                wake = self.poll_blocking(fetch)
                delay = wake - self._clock()
                self._stop.wait(max(0.0, delay) if math.isfinite(delay) else 60.0)

        self._thread = threading.Thread(target=loop, name=name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread (if any) and drops the backend's gauge: a backend out of the policy has no series."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        metrics.forget(self.provider, self.backend, self)
