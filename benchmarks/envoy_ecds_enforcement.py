"""Push of an RBAC deny list by ECDS → the real Envoy enforcing it on an already open connection (issue 13,
docs/envoy-ecds.md).

Method: a real Envoy on a tiny ADS server (tests/support/ecds_envoy.py), SotW or Delta ADS, a listener whose one
HTTP filter is an RBAC configured by ECDS. One keep-alive HTTP/1.1 connection is opened first and kept; each
round pushes a deny list that adds (then, next round, drops) job 1002 and polls on that connection, without
pause, until its answer flips. Reported per protocol: push → first flipped answer (median, p90, max over the
rounds), and the listener counters that must not move (`listener_modified`, `total_filter_chains_draining`,
the listener's closed connections). Baseline in the same run: the time of one request on that connection.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ecds_envoy import (  # noqa: E402
    ECDS,
    RBAC_URL,
    Client,
    ecds_filter,
    envoy_on_ads,
    listener_stats,
    live_listener,
    once,
    rbac,
    typed,
)
from tests.support.ports import LOOPBACK, free_port  # noqa: E402


def measure(api: str, rounds: int) -> None:
    port = free_port()
    with envoy_on_ads(api) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1001"])))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL)])
        envoy.wait_for(lambda: once(port, x_job="1002") == 200, 10, "listener up")
        client = Client(port)
        closed = f"listener.{LOOPBACK}_{port}.downstream_cx_destroy"
        before = {**listener_stats(envoy), closed: envoy.stats("downstream_cx_destroy$")[closed]}
        request = []
        for _ in range(50):
            started = time.perf_counter()
            client.status(x_job="1002")
            request.append(time.perf_counter() - started)
        flips = []
        for round_ in range(rounds):
            deny = round_ % 2 == 0
            want = 403 if deny else 200
            pushed = time.perf_counter()
            ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1001", "1002"] if deny else ["1001"])))
            while client.status(x_job="1002") != want:
                if time.perf_counter() - pushed > 5:
                    raise AssertionError(f"{api}: not enforced within 5 s")
            flips.append(time.perf_counter() - pushed)
        after = {**listener_stats(envoy), closed: envoy.stats("downstream_cx_destroy$")[closed]}
        client.close()
    ms = sorted(1000 * f for f in flips)
    one = 1000 * statistics.median(request)
    print(
        f"{api:>5}: push → enforced on the open connection, {rounds} rounds: median {statistics.median(ms):.1f} ms, "
        f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms; one request {one:.2f} ms"
    )
    print(f"       listener counters before {before}")
    print(f"       listener counters after  {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    for api in ("sotw", "delta"):
        measure(api, args.rounds)


if __name__ == "__main__":
    main()
