"""A leader lease in a process of its own, for tests that kill it: `python -m tests.support.leader_process ID`
with the DSN in $CP_STORE_DSN. Prints `leader` on a line once it leads, and runs until killed."""

from __future__ import annotations

import asyncio
import os
import sys

from controlplane.retry import Backoff
from controlplane.store.dsn import StoreDsn
from controlplane.store.leader import LeaderLease


async def main(replica_id: str) -> None:
    lease = LeaderLease(
        StoreDsn(os.environ["CP_STORE_DSN"], "$CP_STORE_DSN"), replica_id=replica_id, backoff=Backoff(0.1, 1.0)
    )

    async def announce(leader: bool) -> None:
        print("leader" if leader else "follower", flush=True)

    lease.subscribe(announce)
    await lease.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
