"""One leader among the replicas, for the duties that must run once per fleet (key rotation, GitLab polling and
reconcile, policy-project commit statuses, retention): a PostgreSQL session advisory lock.

Why an advisory lock: PostgreSQL is already the one thing every replica trusts, the lock needs no table row to
expire and no clock to agree on, and it is released by the server itself when the holder's session ends: at
once when the holder's process dies (its kernel closes the socket), or when the server's TCP keepalives find a
vanished peer. The lock lives on a connection of its own (never the pool's: a pooled connection is reset and
shared, and the lock would go with whoever borrows it), in autocommit, named `controlplane`.

The bounds (LeaseSettings, defaults in brackets):
- A follower tries `pg_try_advisory_lock` every `retry_every` [1 s].
- The leader sends a check every `check_every` [1 s], each with `check_timeout` [1 s]. It is leader only until
  `step_down_bound` = check_every + check_timeout [2 s] after it SENT its last check that succeeded: past that
  `is_leader()` is False even before the check loop notices (a stalled loop cannot stretch the lease).
- The server notices a vanished client at the earliest `server_detection_bound` = keepalive idle + interval *
  count [5 + 1 * 3 = 8 s] after the client's last packet (server-side `tcp_keepalives_*` and `tcp_user_timeout`
  are set for the session), and the lock cannot have been freed before the leader's last successful check
  reached the server. step_down_bound < server_detection_bound, checked at construction.
- The server may also free the lock sooner than that, without the old leader knowing (a proxy or
  pg_terminate_backend closing the server's side only; a TCP relay cut both ways). So a replica that takes the
  lock from a holder that did not release it cleanly (its row in `leader_holder` still names it) waits
  `takeover_delay` = step_down_bound before acting: the old leader has stepped down by then, whatever freed
  the lock. Two leaders never act at once (given monotonic clocks that run at the same rate, which they do to
  far better than the margins here). A clean stop clears the row first, so its successor starts at once.
- Failover: the leader's process dies: within retry_every + takeover_delay + a round trip [about 3 s];
  a network partition: within server_detection_bound + retry_every + takeover_delay [about 11 s].
What "leader" cannot promise: an action started while leader may finish after the step-down (there is no
fencing token); duties ask `is_leader()` before each action, so at most one action per duty overlaps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import conninfo

from controlplane.retry import Backoff
from controlplane.store.dsn import StoreDsn
from controlplane.store.migrations import LEADER_LOCK, MigrationError, migrate
from controlplane.store.pool import APPLICATION_NAME
from controlplane.telemetry.metrics import STORE_LEADER, STORE_LEADER_TRANSITIONS

log = logging.getLogger("controlplane.store")

OnChange = Callable[[bool], Awaitable[None]]
T = TypeVar("T")
RECONNECT = Backoff(0.5, 10.0)  # jittered: replicas that lost PostgreSQL together do not come back in step

# pg_locks shows a bigint advisory key as classid (high 32 bits), objid (low 32 bits), objsubid 1
_CLASSID, _OBJID = LEADER_LOCK >> 32, LEADER_LOCK & 0xFFFFFFFF

_HOLDER = """
SELECT h.replica_id FROM leader_holder h
JOIN pg_locks l ON l.pid = h.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
"""
_CLAIM = """
INSERT INTO leader_holder (singleton, replica_id, pid, since) VALUES (true, %s, pg_backend_pid(), %s)
ON CONFLICT (singleton) DO UPDATE SET replica_id = excluded.replica_id, pid = excluded.pid, since = excluded.since
"""
_RELEASE = "UPDATE leader_holder SET replica_id = NULL, pid = NULL, since = NULL WHERE pid = pg_backend_pid()"


@dataclass(frozen=True)
class LeaseSettings:
    retry_every: float = 1.0
    check_every: float = 1.0
    check_timeout: float = 1.0
    connect_timeout: float = 5.0
    keepalive_idle: int = 5  # seconds without traffic before the first probe (client and server)
    keepalive_interval: int = 1
    keepalive_count: int = 3

    def __post_init__(self) -> None:
        for name in ("retry_every", "check_every", "check_timeout", "connect_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not self.step_down_bound < self.server_detection_bound:
            raise ValueError(
                f"the leader's step-down bound ({self.step_down_bound:g}s) must be shorter than the server's "
                f"dead-client detection ({self.server_detection_bound:g}s)"
            )

    @property
    def step_down_bound(self) -> float:
        """How long after sending its last good check the leader may still call itself leader."""
        return self.check_every + self.check_timeout

    @property
    def server_detection_bound(self) -> float:
        """The earliest the server drops a silent client: keepalive probes, or unacknowledged data."""
        return float(self.keepalive_idle + self.keepalive_interval * self.keepalive_count)

    @property
    def takeover_delay(self) -> float:
        return self.step_down_bound

    def bounds(self) -> dict[str, float]:
        return {
            "retry_every": self.retry_every,
            "step_down": self.step_down_bound,
            "takeover_delay": self.takeover_delay,
            "server_detection": self.server_detection_bound,
            "failover_process_death": self.retry_every + self.takeover_delay,
            "failover_partition": self.server_detection_bound + self.retry_every + self.takeover_delay,
        }


class StaticLeader:
    """`--store file`: one process, always the leader."""

    def is_leader(self) -> bool:
        return True

    def subscribe(self, on_change: OnChange) -> None:
        """Nothing ever changes; the subscriber is never called."""

    async def run(self, stop: asyncio.Event) -> None:
        STORE_LEADER.set(1)
        await stop.wait()

    def status(self) -> dict[str, Any]:
        return {"leader": True, "kind": "static"}


class LeaderLease:
    """`lease.subscribe(...)`, then `await lease.run(stop)` as a background loop; `lease.is_leader()` anywhere."""

    def __init__(
        self,
        dsn: StoreDsn,
        *,
        replica_id: str,
        backoff: Backoff = RECONNECT,
        settings: LeaseSettings | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn = dsn
        self.replica_id = replica_id
        self.settings = settings or LeaseSettings()
        self._backoff = backoff
        self._clock = clock
        self._monotonic = monotonic
        self._subscribers: list[OnChange] = []
        self._leader = False
        self._valid_until = 0.0  # monotonic: past it, not leader, whatever the check loop thinks
        self._since: float | None = None
        self._holder: str | None = None
        self._transitions = 0
        self._connected = False
        self._keepalive: dict[str, str] = {}
        self._last_error: str | None = None

    def is_leader(self) -> bool:
        return self._leader and self._monotonic() < self._valid_until

    def subscribe(self, on_change: OnChange) -> None:
        """`on_change(True)` once this replica leads, `on_change(False)` once it stepped down (is_leader() is
        already False then); awaited in order."""
        self._subscribers.append(on_change)

    def status(self) -> dict[str, Any]:
        leader = self.is_leader()
        return {
            "kind": "postgres",
            "leader": leader,
            "replica": self.replica_id,
            "holder": self.replica_id if leader else self._holder,
            "since": self._since,
            "transitions": self._transitions,
            "connected": self._connected,
            "keepalive": dict(self._keepalive),
            "last_error": self._last_error,
            "bounds": self.settings.bounds(),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Follow, lead, step down, reconnect, until `stop`; then release the lock. Never raises for the store."""
        STORE_LEADER.set(0)
        attempt = 0
        while not stop.is_set():
            try:
                conn = await self._connect()
            except (psycopg.Error, OSError, MigrationError) as error:
                self._failed(error)
                attempt += 1
                if await _stopped(stop, self._backoff.delay(attempt - 1)):
                    break
                continue
            attempt = 0
            try:
                await self._session(conn, stop)
            except (psycopg.Error, OSError, TimeoutError) as error:
                self._failed(error)
            finally:
                await self._step_down()
                self._connected = False
                await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        s = self.settings
        own = conninfo.conninfo_to_dict(self.dsn.dsn).get("options")
        server = (
            f"-c tcp_keepalives_idle={s.keepalive_idle} -c tcp_keepalives_interval={s.keepalive_interval} "
            f"-c tcp_keepalives_count={s.keepalive_count} "
            f"-c tcp_user_timeout={math.ceil(s.server_detection_bound * 1000)} "
            f"-c statement_timeout={math.ceil(s.check_timeout * 1000)}"
        )
        conn = await psycopg.AsyncConnection.connect(
            self.dsn.dsn,
            autocommit=True,
            application_name=APPLICATION_NAME,
            connect_timeout=max(2, math.ceil(s.connect_timeout)),
            keepalives=1,
            keepalives_idle=s.keepalive_idle,
            keepalives_interval=s.keepalive_interval,
            keepalives_count=s.keepalive_count,
            tcp_user_timeout=math.ceil(s.server_detection_bound * 1000),
            options=f"{own or ''} {server}".strip(),
        )
        try:
            await migrate(conn)  # the lease needs leader_holder; idempotent, serialised by its own lock
            cursor = await conn.execute(
                "SELECT current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'), "
                "current_setting('tcp_keepalives_count')"
            )
            row = await cursor.fetchone()
        except BaseException:
            await conn.close()
            raise
        self._keepalive = dict(zip(("idle", "interval", "count"), map(str, row or ()), strict=False))
        self._connected = True
        self._last_error = None
        return conn

    async def _session(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], stop: asyncio.Event) -> None:
        s = self.settings
        clean = await self._follow(conn, stop)
        if clean is None:
            return
        if not clean:  # the last holder died holding it: let it pass its step-down bound first
            log.info("leader lock taken from a holder that did not release it: acting in %gs", s.takeover_delay)
            if await _stopped(stop, s.takeover_delay):
                await self._release(conn)
                return
        sent = self._monotonic()
        await self._timed(conn.execute(_CLAIM, (self.replica_id, self._clock())))
        await self._become_leader(sent)
        while not await _stopped(stop, s.check_every):
            sent = self._monotonic()
            await self._timed(conn.execute("SELECT 1"))
            self._valid_until = sent + s.step_down_bound
        await self._step_down()  # before the lock goes: never two leaders, even for an instant
        await self._release(conn)

    async def _follow(self, conn: psycopg.AsyncConnection[tuple[Any, ...]], stop: asyncio.Event) -> bool | None:
        """Try the lock every retry_every until it is ours: True when its last holder released it cleanly,
        False when a holder's row is left over; None when stopped first."""
        while not stop.is_set():
            cursor = await self._timed(conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)))
            row = await cursor.fetchone()
            if row is not None and row[0]:
                cursor = await self._timed(conn.execute("SELECT pid FROM leader_holder WHERE pid IS NOT NULL"))
                return await cursor.fetchone() is None
            cursor = await self._timed(conn.execute(_HOLDER, (_CLASSID, _OBJID)))
            holder = await cursor.fetchone()
            self._holder = str(holder[0]) if holder is not None else None
            if await _stopped(stop, self.settings.retry_every):
                break
        return None

    async def _release(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """A clean stop: the row cleared (the successor need not wait), then the lock freed. Best effort: a
        closed connection frees the lock anyway."""
        try:
            await self._timed(conn.execute(_RELEASE))
            await self._timed(conn.execute("SELECT pg_advisory_unlock(%s)", (LEADER_LOCK,)))
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.warning("releasing the leader lock: %s (the closed connection frees it)", type(error).__name__)

    async def _timed(self, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, self.settings.check_timeout)

    async def _become_leader(self, sent: float) -> None:
        self._valid_until = sent + self.settings.step_down_bound
        self._leader = True
        self._holder = self.replica_id
        self._changed(True)
        log.info("replica %s is the leader", self.replica_id)
        await self._tell(True)

    async def _step_down(self) -> None:
        if not self._leader:
            return
        self._leader = False
        self._valid_until = 0.0
        self._holder = None
        self._changed(False)
        log.warning("replica %s stepped down as leader", self.replica_id)
        await self._tell(False)

    def _changed(self, leader: bool) -> None:
        self._since = self._clock()
        self._transitions += 1
        STORE_LEADER.set(1 if leader else 0)
        STORE_LEADER_TRANSITIONS.inc()

    async def _tell(self, leader: bool) -> None:
        for on_change in self._subscribers:
            try:
                await on_change(leader)
            except Exception:  # one duty's failure must not stop the lease, nor the others hearing of it
                log.exception("a leader subscriber failed")

    def _failed(self, error: BaseException) -> None:
        self._connected = False
        self._holder = None
        self._last_error = type(error).__name__
        log.warning("leader lease: PostgreSQL at %s: %s", self.dsn.redacted(), type(error).__name__)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds` or until `stop`; True when stopped."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
