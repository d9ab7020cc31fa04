"""Webhook idempotency keys in PostgreSQL: a delivery retried to ANOTHER replica is still applied once.

GitLab re-sends a delivery it thinks failed (a timeout, a 5xx) with the same `Idempotency-Key`, and behind one
address the retry may reach another replica. One statement decides "first time" for the whole fleet:
`INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at <= now RETURNING`: a row comes back only when the key
was absent or expired; the conflicting row is locked by the statement, so two replicas cannot both win.
Expired rows count as absent, so correctness never waits for pruning, which deletes a bounded batch at most
once per `prune_interval`.

PostgreSQL away: the keys fall back to this process's memory (every key is also remembered there), and the
fallback is counted and shown in `status()`. Safe because deliveries only ever ask to *look again*: a
re-sync re-reads GitLab, a job-end revocation revokes a job that is already revoked. Applying one twice costs
an extra read, never a wrong grant (webhooks.py: a webhook is never trusted for facts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg
from prometheus_client import Counter

from controlplane.sources.webhooks import _SeenKeys
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.webhooks")

FALLBACKS = Counter(
    "controlplane_webhook_dedup_fallbacks_total",
    "Webhook deliveries de-duplicated in this process's memory only, because PostgreSQL did not answer.",
    registry=REGISTRY,
)

_FIRST = """
INSERT INTO webhook_deliveries AS d (key, expires_at) VALUES (%(key)s, %(expires_at)s)
ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE d.expires_at <= %(now)s
RETURNING 1
"""
_FORGET = "DELETE FROM webhook_deliveries WHERE key = %s"
_PRUNE = """
DELETE FROM webhook_deliveries WHERE key IN (
    SELECT key FROM webhook_deliveries WHERE expires_at <= %s LIMIT %s FOR UPDATE SKIP LOCKED
)
"""


class PostgresDeliveryKeys:
    def __init__(
        self,
        pool: StorePool,
        *,
        ttl: float = 3600,
        local_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        prune_batch: int = 1000,
        prune_interval: float = 60.0,
    ) -> None:
        self._pool = pool
        self._ttl = ttl
        self._clock = clock
        self._local = _SeenKeys(local_size, ttl, clock)
        self._prune_batch = prune_batch
        self._prune_interval = prune_interval
        self._next_prune = float("-inf")
        self._fallbacks = 0
        self.last_error: str | None = None
        self._warn = RateLimitedLog(log, burst=3, interval=60.0, clock=clock)

    async def first(self, key: str) -> bool:
        if not self._local.add(key):
            return False  # a retry to this very replica: no round trip
        now = self._clock()
        try:
            await self._prune(now)
            async with self._pool.connection() as conn:
                cursor = await conn.execute(_FIRST, {"key": key, "expires_at": now + self._ttl, "now": now})
                won = await cursor.fetchone() is not None
        except (StoreUnavailable, psycopg.Error) as error:
            self._fallbacks += 1
            FALLBACKS.inc()
            self.last_error = str(error) if isinstance(error, StoreUnavailable) else type(error).__name__
            self._warn.log(logging.WARNING, "webhook de-duplication in memory only: %s", self.last_error)
            return True  # remembered locally above; applying it twice is harmless (module docstring)
        self.last_error = None
        return won

    async def forget(self, key: str) -> None:
        """The callback failed: a re-send must be processed, here or on another replica."""
        self._local.forget(key)
        try:
            async with self._pool.connection() as conn:
                await conn.execute(_FORGET, (key,))
        except (StoreUnavailable, psycopg.Error) as error:  # the key then blocks re-sends until its expiry
            log.warning("webhook key not forgotten in PostgreSQL (a re-send may be taken as a duplicate): %s", error)

    async def _prune(self, now: float) -> None:
        if now < self._next_prune:
            return
        self._next_prune = now + self._prune_interval
        async with self._pool.connection() as conn:
            await conn.execute(_PRUNE, (now, self._prune_batch))

    def status(self) -> dict[str, object]:
        return {"kind": "postgres", "memory_fallbacks": self._fallbacks, "last_error": self.last_error}
