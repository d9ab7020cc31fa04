"""Change fan-out between replicas: PostgreSQL LISTEN/NOTIFY on one channel, one topic per kind of shared state.

Why NOTIFY: it is delivered to every listening session within milliseconds of the writer's COMMIT, and only if
it commits, so "a job revoked through replica A is denied on replica B within 1 s" costs one round trip, no
polling and nothing to run beside PostgreSQL. Its one weakness is that a session that is not connected misses
what was sent meanwhile. So a notification only says *what kind* of thing changed (a topic, and a small
payload such as a sequence number), never the change itself: subscribers re-read their table, and after every
(re)connect each subscriber is told "re-read everything" (an empty payload). Lost, merged or duplicated
notifications then cost latency, never correctness, and a replica also receives its own (harmless: it
re-reads what it wrote).

A slow subscriber does not hold up the others: each has its own queue and task. A queue that grows past
`MAX_PENDING` is collapsed into one "re-read everything" (bounded memory whatever the write rate).

Any session on the database may NOTIFY the channel, with any topic and payload at any rate, so nothing here
trusts one: a payload queued twice is queued once, a subscriber whose payloads are only hints (`coalesce`) has
at most one queued, each subscriber is called at most every `MIN_INTERVAL` (a flood costs PostgreSQL a bounded
number of re-reads), and topics nobody subscribed to are counted under one label (bounded metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psycopg
from prometheus_client import Counter, Gauge

from controlplane.retry import Backoff
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.store")

CHANNEL = "controlplane_changes"
RESYNC = ""  # the payload that means "re-read everything": sent to every subscriber after each (re)connect
MAX_PENDING = 1_000  # notifications queued for one subscriber before they collapse into one RESYNC
MAX_PAYLOAD = 7_000  # PostgreSQL refuses a payload of 8000 bytes or more; the topic and ':' fit beside this
CHECK_EVERY = 2.0  # seconds: how often an idle listening session is checked to be alive
RECONNECT = Backoff(0.2, 2.0)  # jittered: replicas coming back to a restarted server do not arrive at once
MIN_INTERVAL = 0.05  # seconds between two calls of one subscriber: at most 20 re-reads a second under a flood
OTHER_TOPIC = "other"  # the metric label of a topic no subscriber asked for (another session's NOTIFY)

Subscriber = Callable[[str], Awaitable[None]]

NOTIFICATIONS = Counter(
    "controlplane_store_notifications_total",
    "Change notifications received from other replicas (and this one) by topic.",
    ["topic"],
    registry=REGISTRY,
)
FEED_CONNECTED = Gauge(
    "controlplane_store_feed_connected", "1 while the change feed listens on PostgreSQL, else 0.", registry=REGISTRY
)
FEED_RECONNECTS = Counter(
    "controlplane_store_feed_reconnects_total",
    "Times the change feed (re)connected; each one makes every subscriber re-read its state.",
    registry=REGISTRY,
)


class PayloadTooLarge(ValueError):
    """A notification payload PostgreSQL would refuse; payloads name a change, they never carry it."""


async def publish(conn: psycopg.AsyncConnection[tuple[object, ...]], topic: str, payload: str = "") -> None:
    """Announce a change of `topic` inside the caller's transaction: delivered only if that commits, after it."""
    if ":" in topic or not topic:
        raise ValueError(f"a topic is a non-empty name without ':', got {topic!r}")
    if len(payload.encode()) > MAX_PAYLOAD:
        raise PayloadTooLarge(f"payload of {topic!r} is {len(payload.encode())} bytes; send an id, not the data")
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{topic}:{payload}"))


@dataclass
class _Subscription:
    topic: str
    on_change: Subscriber
    coalesce: bool = False  # payloads are hints only ("re-read"): one queued stands for any number
    pending: dict[str, None] = field(default_factory=dict)  # ordered, and a payload queued twice is queued once
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    failures: int = 0

    def put(self, payload: str) -> None:
        if payload == RESYNC or len(self.pending) >= MAX_PENDING:
            self.pending = {RESYNC: None}  # everything is re-read anyway: what was queued is covered
        elif RESYNC not in self.pending:  # a re-read still to come covers this change too
            if self.coalesce:
                self.pending = {payload: None}
            else:
                self.pending[payload] = None
        self.wake.set()

    async def deliver(self, stop: asyncio.Event, min_interval: float) -> None:
        last = -math.inf
        while not stop.is_set():
            await self.wake.wait()
            wait = last + min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # a burst: what arrives meanwhile joins this batch
            self.wake.clear()
            batch, self.pending = list(self.pending), {}
            last = time.monotonic()
            for payload in batch:
                try:
                    await self.on_change(payload)
                except Exception:  # one subscriber's bug must not end the feed for the others
                    self.failures += 1
                    log.exception("change subscriber for %r failed; it re-reads at the next change", self.topic)


class ChangeFeed:
    """One LISTEN session per replica, dispatching notifications to per-topic subscribers."""

    def __init__(
        self,
        pool: StorePool,
        *,
        backoff: Backoff = RECONNECT,
        check_every: float = CHECK_EVERY,
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.backoff = backoff
        self.check_every = check_every
        self.min_interval = min_interval
        self.clock = clock
        self._subscriptions: list[_Subscription] = []
        self._connected = False
        self._down_since: float | None = None  # counted from `run()`: the start proved the store reachable
        self._connects = 0
        self._last_event: float | None = None
        self._last_error: str | None = None
        self._listening = asyncio.Event()

    def subscribe(self, topic: str, on_change: Subscriber, *, coalesce: bool = False) -> None:
        """`on_change(payload)` for each notification of `topic`, in order (a payload still queued is not queued
        again), and `on_change("")` after every (re)connect. `coalesce`: the subscriber re-reads whatever the
        payload, so only the latest one queued is kept. Subscribe before `run()`."""
        self._subscriptions.append(_Subscription(topic, on_change, coalesce))

    async def listening(self) -> None:
        """Returns once the feed listens (tests and start-up ordering: nothing committed after this is missed)."""
        await self._listening.wait()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen until `stop`; reconnect with backoff whenever the session is lost. Never raises
        StoreUnavailable: an unreachable store is reported in `status()` and metrics."""
        workers = [
            asyncio.create_task(s.deliver(stop, self.min_interval), name=f"change feed {s.topic}")
            for s in self._subscriptions
        ]
        self._down_since = self.clock()
        attempt = 0
        try:
            while not stop.is_set():
                try:
                    await self._listen(stop)
                    attempt = 0
                except (StoreUnavailable, psycopg.Error, OSError) as error:
                    # StoreUnavailable's message names the redacted DSN; a driver's might quote more
                    self._last_error = str(error) if isinstance(error, StoreUnavailable) else type(error).__name__
                    if self._connected:
                        log.warning("change feed lost PostgreSQL (%s); reconnecting", self._last_error)
                    self._set_connected(False)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.backoff.delay(attempt))
                    attempt += 1
        finally:
            self._set_connected(False)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _listen(self, stop: asyncio.Event) -> None:
        conn = await self.pool.dedicated()
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._connects += 1
            FEED_RECONNECTS.inc()
            self._set_connected(True)
            self._last_error = None
            for subscription in self._subscriptions:
                subscription.put(RESYNC)  # what was sent while we did not listen is lost: re-read it all
            self._listening.set()
            while not stop.is_set():
                async for notify in conn.notifies(timeout=self.check_every):
                    self._dispatch(notify.payload)
                    if stop.is_set():
                        break
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=self.check_every)  # still there?
        except TimeoutError:
            raise StoreUnavailable("the listening session did not answer") from None
        finally:
            self._listening.clear()
            with contextlib.suppress(Exception):
                await conn.close()

    def _dispatch(self, message: str) -> None:
        topic, _, payload = message.partition(":")
        self._last_event = self.clock()
        known = False
        for subscription in self._subscriptions:
            if subscription.topic == topic:
                subscription.put(payload)
                known = True
        NOTIFICATIONS.labels(topic if known else OTHER_TOPIC).inc()

    def _set_connected(self, connected: bool) -> None:
        if connected:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = self.clock()
        self._connected = connected
        FEED_CONNECTED.set(1 if connected else 0)

    def unreachable_for(self) -> float:
        """Seconds since the listening session was lost (0 while connected): the replica's view of the shared
        state is at most this stale, which is what readiness and alerts judge."""
        return 0.0 if self._down_since is None else self.clock() - self._down_since

    def status(self) -> dict[str, object]:
        return {
            "connected": self._connected,
            "connects": self._connects,
            "unreachable_seconds": round(self.unreachable_for(), 3),
            "last_event_age_seconds": None if self._last_event is None else round(self.clock() - self._last_event, 3),
            "last_error": self._last_error,
            "topics": sorted({s.topic for s in self._subscriptions}),
            "subscriber_failures": sum(s.failures for s in self._subscriptions),
        }
