"""Each replica registers itself in the `replicas` table, so any replica can say who else serves the fleet and
which proxies each holds: what `controlplane status` shows, and what it asks for the whole fleet.

A heartbeat every `heartbeat_every` seconds (default 5) upserts the replica's row: identity and addresses,
its controlplane version, start time, last_seen, whether it leads, and a bounded JSON summary of its proxies
(what `ProxyRegistry.fleet()` gives, at most MAX_FLEET_BYTES: past that the per-proxy rows are dropped and the
counts kept). The same beat reads every row back, so `list()` answers `/status` from memory: a status request
never waits on PostgreSQL, and says how old its view is. A row is `stale` after STALE_AFTER_BEATS missed beats
(judged by its own interval, so replicas with different intervals agree), `stopped` once its replica stopped
cleanly, and the leader deletes rows not seen for PRUNE_AFTER (an hour): a replica gone without a word stays
visible long enough to be noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from controlplane.store.pool import StorePool, StoreUnavailable

log = logging.getLogger("controlplane.store")

HEARTBEAT_EVERY = 5.0
STALE_AFTER_BEATS = 3
PRUNE_AFTER = 3600.0
MAX_FLEET_BYTES = 64 * 1024  # one row's proxy summary: a few hundred proxies' rows, any number of counts
PROXIES_LISTED = 200  # rows a replica publishes; the counts cover all of its proxies

_UPSERT = """
INSERT INTO replicas (replica_id, host, xds_address, admin_address, version, started_at, last_seen,
                      heartbeat_every, stopped_at, leader, fleet)
VALUES (%(replica_id)s, %(host)s, %(xds_address)s, %(admin_address)s, %(version)s, %(started_at)s, %(now)s,
        %(heartbeat_every)s, NULL, %(leader)s, %(fleet)s)
ON CONFLICT (replica_id) DO UPDATE SET host = excluded.host, xds_address = excluded.xds_address,
    admin_address = excluded.admin_address, version = excluded.version, started_at = excluded.started_at,
    last_seen = excluded.last_seen, heartbeat_every = excluded.heartbeat_every, stopped_at = NULL,
    leader = excluded.leader, fleet = excluded.fleet
"""
_READ = """
SELECT replica_id, host, xds_address, admin_address, version, started_at, last_seen, heartbeat_every,
       stopped_at, leader,
       CASE WHEN octet_length(fleet::text) <= %(limit)s THEN fleet ELSE '{"invalid": "oversized"}'::jsonb END
FROM replicas ORDER BY replica_id
"""
_COLUMNS = (
    "replica",
    "host",
    "xds_address",
    "admin_address",
    "version",
    "started_at",
    "last_seen",
    "heartbeat_every",
    "stopped_at",
    "leader",
    "fleet",
)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica says about itself; fixed for its lifetime."""

    replica_id: str
    host: str
    xds_address: str
    admin_address: str
    version: str
    started_at: float


def bounded(fleet: dict[str, Any], limit: int = MAX_FLEET_BYTES) -> dict[str, Any]:
    """The summary as published: whole when it fits `limit` bytes of JSON, else without its per-proxy rows
    (`proxies_dropped` says how many), else the connected count alone."""
    if len(json.dumps(fleet, default=str)) <= limit:
        return fleet
    rows = fleet.get("proxies") or []
    trimmed = {key: value for key, value in fleet.items() if key != "proxies"}
    trimmed["proxies_dropped"] = len(rows)
    if len(json.dumps(trimmed, default=str)) <= limit:
        return trimmed
    summary = fleet.get("summary") or {}
    return {"summary": {"connected": summary.get("connected")}, "proxies_dropped": len(rows), "truncated": True}


def checked(fleet: object) -> dict[str, Any]:
    """A replica's summary as another writer may have left it (oversized ones are replaced by PostgreSQL): one not
    of the shape `bounded` publishes becomes `{"invalid": ...}`, so `/status` and `status --fleet` still answer,
    listing that replica without its proxies."""
    if not isinstance(fleet, dict):
        return {"invalid": "not an object"}
    summary, proxies, versions = fleet.get("summary") or {}, fleet.get("proxies") or [], fleet.get("versions") or {}
    counts = (
        [summary.get("connected") or 0, *(summary.get("by_group") or {}).values()] if isinstance(summary, dict) else []
    )
    well_formed = (
        isinstance(summary, dict)
        and isinstance(summary.get("by_group") or {}, dict)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in counts)
        and isinstance(proxies, list)
        and all(isinstance(p, dict) for p in proxies)
        and isinstance(versions, dict)
    )
    return fleet if well_formed else {"invalid": "malformed"}


class ReplicaRegistry:
    """`await registry.run(stop)` beats until stopped; `await registry.stop()` marks the row stopped."""

    def __init__(
        self,
        pool: StorePool,
        info: ReplicaInfo,
        *,
        fleet: Callable[[], dict[str, Any]],
        is_leader: Callable[[], bool] = lambda: True,
        heartbeat_every: float = HEARTBEAT_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not heartbeat_every > 0:
            raise ValueError("heartbeat_every must be positive")
        self.pool = pool
        self.info = info
        self.heartbeat_every = heartbeat_every
        self._fleet = fleet
        self._is_leader = is_leader
        self._clock = clock
        self._rows: list[dict[str, Any]] = []
        self._read_at: float | None = None
        self._last_error: str | None = None
        self.pruned = 0

    async def beat(self) -> None:
        """Upsert this replica's row, read every row back, and (leader only) delete rows an hour old."""
        now = self._clock()
        values = {
            **asdict(self.info),
            "now": now,
            "heartbeat_every": self.heartbeat_every,
            "leader": self._is_leader(),
            "fleet": Jsonb(bounded(self._fleet())),
        }
        async with self.pool.connection() as conn:
            await conn.execute(_UPSERT, values)
            if self._is_leader():
                cursor = await conn.execute("DELETE FROM replicas WHERE last_seen < %s", (now - PRUNE_AFTER,))
                self.pruned += max(0, cursor.rowcount)
            cursor = await conn.execute(_READ, {"limit": 2 * MAX_FLEET_BYTES})
            rows = await cursor.fetchall()
        self._rows = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
        for row in self._rows:
            row["fleet"] = checked(row["fleet"])
        self._read_at = now
        self._last_error = None

    async def run(self, stop: asyncio.Event) -> None:
        """A beat every heartbeat_every; PostgreSQL away is logged and reported, never raised."""
        while not stop.is_set():
            try:
                await self.beat()
            except (StoreUnavailable, psycopg.Error) as error:
                if self._last_error is None:
                    log.warning("replica registry: %s", error)
                self._last_error = str(error) if isinstance(error, StoreUnavailable) else type(error).__name__
            with contextlib.suppress(TimeoutError):  # the next beat is due
                await asyncio.wait_for(stop.wait(), self.heartbeat_every)

    async def stop(self) -> None:
        """Mark this replica's row stopped (status shows it so, the leader prunes it after PRUNE_AFTER)."""
        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE replicas SET stopped_at = %s, leader = false WHERE replica_id = %s",
                    (self._clock(), self.info.replica_id),
                )
        except (StoreUnavailable, psycopg.Error) as error:
            log.warning("replica registry: could not mark this replica stopped: %s", error)

    def list(self, *, with_fleet: bool = False) -> list[dict[str, Any]]:
        """Every registered replica as last read, each with its `state` (up, stale, stopped) and `age` (seconds
        since its last beat); `with_fleet` adds its proxy summary."""
        now = self._clock()
        listed = []
        for row in self._rows:
            age = now - float(row["last_seen"])
            if row["stopped_at"] is not None:
                state = "stopped"
            elif age > STALE_AFTER_BEATS * float(row["heartbeat_every"]):
                state = "stale"
            else:
                state = "up"
            shown = {key: value for key, value in row.items() if key != "fleet"}
            fleet = row["fleet"] or {}
            shown.update(
                state=state,
                age=age,
                this=row["replica"] == self.info.replica_id,
                proxies=(fleet.get("summary") or {}).get("connected"),
                versions=fleet.get("versions") or {},
            )
            if with_fleet:
                shown["fleet"] = fleet
            listed.append(shown)
        return listed

    def status(self) -> dict[str, Any]:
        return {
            "replica": self.info.replica_id,
            "replicas": self.list(),
            "read_at": self._read_at,
            "heartbeat_every": self.heartbeat_every,
            "last_error": self._last_error,
        }

    def whole_fleet(self) -> dict[str, Any]:
        """The proxies of every replica not stopped, from their last beats: `/status?scope=all`."""
        replicas = [row for row in self.list(with_fleet=True) if row["state"] != "stopped"]
        proxies: list[dict[str, Any]] = []
        by_group: dict[str, int] = {}
        connected = dropped = 0
        for row in replicas:
            fleet = row["fleet"]
            summary = fleet.get("summary") or {}
            connected += int(summary.get("connected") or 0)
            for group, count in (summary.get("by_group") or {}).items():
                by_group[group] = by_group.get(group, 0) + int(count)
            listed = fleet.get("proxies") or []
            proxies.extend({"replica": row["replica"], **proxy} for proxy in listed)
            dropped += max(0, int(summary.get("connected") or 0) - len(listed))
        return {
            "replicas": [
                {"replica": row["replica"], "state": row["state"], "age": row["age"], "proxies": row["proxies"]}
                for row in replicas
            ],
            "connected": connected,
            "by_group": dict(sorted(by_group.items())),
            "proxies": sorted(proxies, key=lambda p: (str(p.get("group")), str(p.get("node")), p["replica"])),
            "not_listed": dropped,
            "read_at": self._read_at,
        }
