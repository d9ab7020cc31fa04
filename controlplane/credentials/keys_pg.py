"""Signing keys shared by replicas in PostgreSQL: every replica signs with, and publishes, the same keys.

Why this shape (docs/shared-state.md, "Signing keys in PostgreSQL"):
- `SigningKeys` stays pure and synchronous (signing and the JWKS are read on hot paths, from memory); the
  store is async (`PostgresKeyStore.load()` / `update()` on the pool), and `SharedKeys` is the one place that
  awaits it and hands what it read to `SigningKeys.adopt()`.
- Every change of the set is one transaction under `pg_advisory_xact_lock(SIGNING_KEYS_LOCK, 0)` that reads the
  rows, asks a pure function what they should become, writes that, and publishes a change notification, which
  PostgreSQL delivers only if the transaction commits. Replicas starting on an empty database therefore create
  exactly one first key (the others find it under the lock), and a rotation is planned from what the database
  holds, not from a replica's possibly stale view.
- Only the first key may be created by any replica; later changes (the successor, retirements) are the
  leader's (`is_leader`). Followers re-read on a notification, after a feed reconnect (the feed's resync), and
  whenever their own view says a change is due, polling every `retry_interval` until they see it: a follower
  whose notification is late still learns the successor within `retry_interval`, well inside `publish_lead`,
  so it neither signs with a key others do not publish nor misses one they sign with.
- PostgreSQL away: the keys in memory keep signing; a rotation due meanwhile is postponed (the current key
  keeps signing: the successor still gets its full `publish_lead` once written) and retried every
  `retry_interval`; reported in `status()`.
Private keys are sealed (key_cipher.py) before they reach the database and opened when read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence

import psycopg

from controlplane.credentials.key_cipher import KeyCipher, SealError
from controlplane.credentials.keys import KeyStoreError, SigningKeys, StoredKey, first_key, load_private_key
from controlplane.store.changes import publish
from controlplane.store.migrations import SIGNING_KEYS_LOCK
from controlplane.store.pool import StorePool, StoreUnavailable
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.credentials.keys")

TOPIC = "signing-keys"  # change-feed topic; the payload is the newest kid (public), never key material

_LOCK = "SELECT pg_advisory_xact_lock(%s, 0)"
_SELECT = "SELECT kid, sealed_private_key, created_at, not_before, retire_after FROM signing_keys ORDER BY not_before"
_DELETE_OTHERS = "DELETE FROM signing_keys WHERE NOT (kid = ANY(%s))"
_UPSERT = """
INSERT INTO signing_keys (kid, sealed_private_key, created_at, not_before, retire_after) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (kid) DO UPDATE SET sealed_private_key = excluded.sealed_private_key, created_at = excluded.created_at,
    not_before = excluded.not_before, retire_after = excluded.retire_after
"""

Change = Callable[[list[StoredKey]], "list[StoredKey] | None"]


class KeyStoreUnavailable(KeyStoreError):
    """PostgreSQL did not answer; the keys in memory keep working. The message names the redacted DSN only."""


class PostgresKeyStore:
    """The `signing_keys` table (migration 2): `await load()`, `await update(change)`. Uses a pool it does not
    own (opened, migrated and closed by the exchange store)."""

    def __init__(self, pool: StorePool, cipher: KeyCipher) -> None:
        self._pool = pool
        self._cipher = cipher
        self._where = f"signing keys in PostgreSQL at {pool.dsn.redacted()}"

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self._pool.dsn.redacted()!r}, {self._cipher!r})"

    @property
    def kek_id(self) -> str:
        """The id (not the value) of the KEK that seals, for /status."""
        return self._cipher.primary_id.hex()

    async def load(self) -> list[StoredKey]:
        """The stored keys, opened and checked; KeyStoreError (never key material) when one does not open."""
        try:
            async with self._pool.connection() as conn:
                keys, _ = await self._read(conn)
        except (StoreUnavailable, psycopg.Error) as error:
            raise self._unavailable("read", error) from None
        return keys

    async def update(self, change: Change) -> list[StoredKey]:
        """Read the set under the lock, write `change(set)` when it is not None (and re-seal keys sealed with a
        previous KEK), announce it, commit; returns the set now stored."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                await conn.execute(_LOCK, (SIGNING_KEYS_LOCK,))
                current, resealable = await self._read(conn)
                wanted = change(list(current))
                if wanted is None and not resealable:
                    return current
                keys = current if wanted is None else sorted(wanted, key=lambda k: k.not_before)
                await self._write(conn, keys)
                await publish(conn, TOPIC, keys[-1].kid if keys else "")
        except (StoreUnavailable, psycopg.Error) as error:
            raise self._unavailable("write", error) from None
        if resealable and wanted is None:
            log.info("signing keys re-sealed with the current key-encryption key")
        return keys

    async def _read(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> tuple[list[StoredKey], bool]:
        """The keys, and whether any was sealed with a KEK other than the current one."""
        cursor = await conn.execute(_SELECT)
        keys: list[StoredKey] = []
        resealable = False
        for kid, sealed, created_at, not_before, retire_after in await cursor.fetchall():
            shown = str(kid)[:80]  # a kid another writer made huge is never repeated whole
            if not isinstance(sealed, bytes):
                raise KeyStoreError(f"{self._where}: key {shown}: the sealed private key is not bytes")
            times = {"created_at": created_at, "not_before": not_before, "retire_after": retire_after}
            if any(v is not None and not math.isfinite(_float(v)) for v in times.values()):
                # the seal does not cover the times: NaN or an infinity would stall or skew rotation everywhere
                raise KeyStoreError(f"{self._where}: key {shown}: a time is not a finite number: {times}")
            try:
                pem = self._cipher.open(str(kid), sealed)
            except SealError as error:
                raise KeyStoreError(f"{self._where}: {str(error)[:300]}") from None
            key = StoredKey(
                kid=str(kid),
                private_pem=pem,
                created_at=_float(created_at),
                not_before=_float(not_before),
                retire_after=None if retire_after is None else _float(retire_after),
            )
            try:
                load_private_key(key)
            except KeyStoreError as error:
                raise KeyStoreError(f"{self._where}: {error}") from None
            resealable = resealable or self._cipher.sealed_with(sealed) != self._cipher.primary_id
            keys.append(key)
        return keys, resealable

    async def _write(self, conn: psycopg.AsyncConnection[tuple[object, ...]], keys: Sequence[StoredKey]) -> None:
        await conn.execute(_DELETE_OTHERS, ([k.kid for k in keys],))
        for k in keys:
            sealed = self._cipher.seal(k.kid, k.private_pem)
            await conn.execute(_UPSERT, (k.kid, sealed, k.created_at, k.not_before, k.retire_after))

    def _unavailable(self, what: str, error: Exception) -> KeyStoreUnavailable:
        reason = str(error).splitlines()[0] if isinstance(error, StoreUnavailable) else type(error).__name__
        return KeyStoreUnavailable(f"{self._where}: cannot {what}: {reason}")


class SharedKeys:
    """One replica's view of the shared signing keys, kept current: `await open(...)`, then `await step()`
    whenever `wake` is set or `next_step_at()` comes, and `on_notification` subscribed to the change feed."""

    def __init__(self, store: PostgresKeyStore, keys: SigningKeys, *, clock: Callable[[], float]) -> None:
        self.store = store
        self.keys = keys
        self._clock = clock
        self.wake = asyncio.Event()  # set by a notification: step() now
        self.retry_interval = min(1.0, max(0.05, keys.publish_lead / 4))
        self._notified = False
        self._waiting_since: float | None = None  # when the store first failed, or a due change was first unseen
        self._last_read: float | None = None
        self._last_error: str | None = None
        self._leader = False
        self._errors = RateLimitedLog(log, burst=3, interval=60.0)

    @classmethod
    async def open(
        cls,
        store: PostgresKeyStore,
        *,
        rotate_every: float,
        max_credential_ttl: float,
        publish_lead: float,
        clock: Callable[[], float] = time.time,
    ) -> SharedKeys:
        """Read the set, creating the first key when the database has none (exactly one, whoever races); any
        failure (unreachable, a key that does not open) is KeyStoreError: the replica must not start."""
        stored = await store.update(lambda current: None if current else [first_key(clock())])
        keys = SigningKeys(
            None,
            rotate_every=rotate_every,
            max_credential_ttl=max_credential_ttl,
            publish_lead=publish_lead,
            clock=clock,
            adopted=stored,
        )
        shared = cls(store, keys, clock=clock)
        shared._last_read = clock()
        return shared

    async def on_notification(self, payload: str) -> None:
        """Another replica (or this one) changed the set, or the feed reconnected: re-read at the next step."""
        self._notified = True
        self.wake.set()

    async def step(self, is_leader: bool) -> bool:
        """Bring the view up to date; True when the published JWKS changed (the caller recompiles).

        The leader plans the change from the rows under the lock; a follower only reads, when notified or when
        its own view says a change is due. Failures keep the keys in memory and are retried."""
        self._leader = is_leader
        now = self._clock()
        due = self.keys.next_change_at() <= now
        if not (due or self._notified or self._last_error is not None):
            return False
        self._notified = False
        try:
            if is_leader:
                stored = await self.store.update(self.keys.planned)
            else:
                stored = await self.store.load()
            changed = self.keys.adopt(stored)
        except KeyStoreError as error:  # unreachable, or a row that does not open: keep what signs now
            self._failed(now, error)
            return False
        self._last_read = now
        if self._last_error is not None:
            log.info("signing keys read from PostgreSQL again")
        self._last_error = None
        still_due = self.keys.next_change_at() <= now
        self._waiting_since = (self._waiting_since or now) if still_due else None
        return changed

    def _failed(self, now: float, error: KeyStoreError) -> None:
        self._last_error = str(error)
        self._waiting_since = self._waiting_since or now
        level = logging.WARNING if isinstance(error, KeyStoreUnavailable) else logging.ERROR
        self._errors.log(
            level, "%s; the current signing keys stay in use, a due rotation waits (retried)", error, key="store"
        )

    def next_step_at(self) -> float:
        """When `step()` next has something to do: the view's next change, or a retry while one is overdue
        (the store failed, or the leader has not written a change the view says is due)."""
        if self._waiting_since is not None or self._last_error is not None:
            return self._clock() + self.retry_interval
        return self.keys.next_change_at()

    def status(self) -> dict[str, object]:
        now = self._clock()
        return {
            "kind": "postgres",
            "leader": self._leader,
            "kek": self.store.kek_id,
            "last_read_age_seconds": None if self._last_read is None else round(now - self._last_read, 1),
            "change_overdue_seconds": None if self._waiting_since is None else round(now - self._waiting_since, 1),
            "last_error": self._last_error,
        }


def _float(value: object) -> float:
    if not isinstance(value, int | float):
        raise KeyStoreError(f"unexpected value in the signing keys: {type(value).__name__}")
    return float(value)
