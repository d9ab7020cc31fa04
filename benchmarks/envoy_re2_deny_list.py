"""A deny list of N job ids as ONE RE2 alternation in an RBAC filter delivered by ECDS: does the real Envoy
accept it, what RE2 program size does it report, and how long from the push until Envoy counts it accepted
(issue 13, docs/envoy-ecds.md).

Method: a real Envoy on a tiny ADS server (tests/support/ecds_envoy.py), Delta ADS, a listener whose one HTTP
filter is an RBAC configured by ECDS: DENY when the `x-job` header matches `id1|id2|...`. Envoy's static runtime
sets `re2.max_program_size.error_level` (default 100: an alternation of 100 ids is already refused) high enough
for every N and `re2.max_program_size.warn_level` to 1, so Envoy logs every regex's program size, which is read
back from its log. For each N: push, wait for `update_success`, then check that the first and the last id get
403 and an id not in the list 200. Two id distributions: spread (8 digits, a step of 7,919: few shared
prefixes) and dense (10 digits, a step of 3, as consecutive job ids of one busy instance). Baseline in the same
run: N = 1. The push time includes this script's serialisation of the resource (Python) and is one push each.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.ecds_envoy import (  # noqa: E402
    ECDS,
    RBAC_URL,
    ecds_filter,
    ecds_stat,
    envoy_on_ads,
    live_listener,
    once,
    rbac,
    typed,
)
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.tiny_ads import TinyAds  # noqa: E402

SIZE = re.compile(r"RE2 program size of (\d+) > max program size of 1 set for the warn")
DISTRIBUTIONS: dict[str, Callable[[int], str]] = {
    "spread": lambda i: str(10_000_000 + i * 7919),
    "dense": lambda i: str(8_000_000_000 + i * 3),
}


def push(ads: TinyAds, envoy: EnvoyProcess, ids: list[str]) -> float:
    """Seconds from handing the deny list to the ADS server to Envoy counting it accepted (`update_success`)."""
    before = ecds_stat(envoy, "deny-list", "update_success")
    pushed = time.monotonic()
    ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ids)))
    envoy.wait_for(lambda: ecds_stat(envoy, "deny-list", "update_success") > before, 60, "accepted", 0.001)
    return time.monotonic() - pushed


def logged_sizes(envoy: EnvoyProcess, seen: int) -> list[str]:
    """Every program size Envoy has logged, once it has logged more than `seen` of them."""

    def more() -> list[str]:
        found = SIZE.findall(envoy.log_text())
        return found if len(found) > seen else []

    return envoy.wait_for(more, 20, "a new program size logged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 1_000, 10_000, 50_000])
    args = parser.parse_args()
    runtime = {"re2.max_program_size.error_level": 10_000_000, "re2.max_program_size.warn_level": 1}
    port = free_port()
    print(
        f"{'ids':>8} {'distribution':>12} {'regex chars':>12} {'RE2 program size':>17} {'accepted after s':>16}"
        "  enforced"
    )
    with envoy_on_ads("delta", runtime=runtime) as (ads, envoy):
        ads.put(ECDS, "deny-list", typed("deny-list", rbac("DENY", ["1"])))
        live_listener(ads, envoy, port, [ecds_filter("deny-list", RBAC_URL)])
        envoy.wait_for(lambda: once(port, x_job="1") == 403, 10, "listener up")
        seen = len(envoy.wait_for(lambda: SIZE.findall(envoy.log_text()), 20, "the first size logged"))
        for name, job in DISTRIBUTIONS.items():
            for count in args.sizes:
                ids = [job(i) for i in range(count)]
                took = push(ads, envoy, ids)
                sizes = logged_sizes(envoy, seen)
                seen = len(sizes)
                answers = [once(port, x_job=j) for j in (ids[0], ids[-1], "99")]
                enforced = "yes" if answers == [403, 403, 200] else f"NO {answers}"
                print(
                    f"{count:>8,} {name:>12} {len('|'.join(ids)):>12,} {int(sizes[-1]):>17,} {took:>16.3f}  {enforced}"
                )
        assert not ads.nacks, ads.nacks


if __name__ == "__main__":
    main()
