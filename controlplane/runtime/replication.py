"""How a replica of `serve --store postgres` takes part in the fleet: the leader lease (store/leader.py) and its
row in the replica registry (store/replicas.py), built from serve's options. With `--store file` there is one
replica and it always leads (StaticLeader), and nothing is registered.

The lease's `is_leader` is what the singleton duties (key rotation, GitLab polling and reconcile, commit
statuses, retention) ask before acting; a follower does none of them.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import psycopg

from controlplane.store.dsn import StoreDsn
from controlplane.store.leader import LeaderLease, LeaseSettings, StaticLeader
from controlplane.store.migrations import migrate
from controlplane.store.pool import PoolSettings, StorePool, StoreUnavailable
from controlplane.store.replicas import PROXIES_LISTED, ReplicaInfo, ReplicaRegistry
from controlplane.xds.fleet_status import CurrentVersions, FleetQuery, ProxyRegistry

REGISTRY_POOL = PoolSettings(min_size=1, max_size=2)  # one beat at a time, plus a stop


def replica_id(given: str | None) -> str:
    return given or str(uuid.uuid4())


def leader(dsn: StoreDsn | None, replica: str, retry_every: float) -> LeaderLease | StaticLeader:
    if dsn is None:
        return StaticLeader()
    return LeaderLease(dsn, replica_id=replica, settings=LeaseSettings(retry_every=retry_every))


def proxies_summary(
    proxies: ProxyRegistry, current: CurrentVersions, versions: Callable[[], Mapping[str, object]]
) -> Callable[[], dict[str, Any]]:
    """What a replica publishes of its proxies at each beat: the fleet view's counts and first rows, and the
    snapshot version it serves per group."""

    def summary() -> dict[str, Any]:
        return {**proxies.fleet(FleetQuery(limit=PROXIES_LISTED), current), "versions": dict(versions())}

    return summary


async def registry_pool(dsn: StoreDsn) -> StorePool:
    """The registry's small pool, connected and the schema migrated, before anything is served (unreachable:
    StoreUnavailable or MigrationError, and `serve` refuses to start, as for the exchange store)."""
    pool = StorePool(dsn, REGISTRY_POOL)
    await pool.open()
    try:
        async with pool.connection() as conn:
            await migrate(conn)
    except BaseException:
        await pool.close()
        raise
    return pool


async def registered(
    pool: StorePool, info: ReplicaInfo, *, fleet: Callable[[], dict[str, Any]], is_leader: Callable[[], bool]
) -> ReplicaRegistry:
    """The registry with its first beat done, so `/status` lists this replica from the start. PostgreSQL away
    by now is no reason to stop serving: the beats that follow retry (and `/status` says so)."""
    registry = ReplicaRegistry(pool, info, fleet=fleet, is_leader=is_leader)
    with contextlib.suppress(StoreUnavailable, psycopg.Error):
        await registry.beat()
    return registry


def this_replica(replica: str, xds: tuple[str, int], admin: tuple[str, int], version: str, now: float) -> ReplicaInfo:
    return ReplicaInfo(replica, socket.gethostname(), f"{xds[0]}:{xds[1]}", f"{admin[0]}:{admin[1]}", version, now)
