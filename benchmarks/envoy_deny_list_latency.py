"""What a deny list of N jobs costs each request in a real Envoy: today's one-principal-per-job list beside
issue 13's 17 deny filters (16 sealed regex buckets and the recent list), with none as the baseline, all in one
run (docs/performance.md, "Issue 13").

Method: four Envoys (the pinned 1.40 binary, `--concurrency 1`) on tiny ADS servers (tests/support/ecds_envoy.py),
each with one listener whose routes answer directly (no upstream), so the figures are the filter chain's own:

- `none`: no deny filter at all;
- `today`: today's design, one RBAC DENY policy with one principal per job (here an exact match of the request
  header `x-job`, where the gateway matches the `job_id` claim in jwt_authn's metadata: the same list of
  string matchers, walked one by one);
- `buckets, 0`: issue 13's design with nothing revoked: the 17 deny filters of the compiler (named as the
  compiler names them), all empty;
- `buckets, N + recent R`: the 16 sealed buckets holding the N jobs, each one RE2 regex built by the compiler
  (`controlplane.compiler.revocations`), and the recent list holding R more (`--recent`, default
  2 x RECENT_LIMIT + 1: its largest, a limit seal's ids still settling beside a full list of new ones), the
  ids after the N in the same sequence; all matched here against `x-job`.

N job ids are consecutive ten-digit ids (a busy GitLab's finished jobs: `--spread` spaces them 7,919 apart, the
worst case for the regexes' shared prefixes). Every request carries a job id that is NOT on the list but sits
among the sealed ones (so a bucket's regex follows its prefix to the last digit, and today's list is walked to its
end), over one keep-alive HTTP/1.1 connection per Envoy from a raw socket (no HTTP library in the timing). The
Envoys take turns in blocks of `--block` requests, `--rounds` times, after a warm-up, so all four see the same
machine. Reported: p50, p90, p99 per Envoy, the difference to `buckets, 0` and to `none`, Envoy's `/memory`
(allocated, heap) and the regexes' sizes.

Usage: PYTHONPATH=. python benchmarks/envoy_deny_list_latency.py [--jobs 50000] [--rounds 40] [--block 200]
       [--spread] [--recent 801]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envoy.config.core.v3 import extension_pb2  # noqa: E402
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from controlplane.compiler import revocations  # noqa: E402
from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter  # noqa: E402
from controlplane.credentials.revocations import RECENT_LIMIT  # noqa: E402
from controlplane.model.credentials import REVOCATION_BUCKETS, revocation_bucket  # noqa: E402
from tests.support.ecds_envoy import ECDS, RBAC_URL, ecds_filter, envoy_on_ads, live_listener, once  # noqa: E402
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.ports import LOOPBACK, free_port  # noqa: E402
from tests.support.tiny_ads import TinyAds  # noqa: E402

FIRST_JOB = 9_000_000_000
RUNTIME = {"re2.max_program_size.error_level": 10_000_000}


def job_ids(count: int, spread: bool, start: int = 0) -> list[str]:
    step = 7919 if spread else 1
    return [str(FIRST_JOB + i * step) for i in range(start, start + count)]


def today_filter(jobs: list[str]) -> rbac_pb2.RBAC:
    principals = [{"header": {"name": "x-job", "string_match": {"exact": job}}} for job in jobs]
    policy = {"permissions": [{"any": True}], "principals": principals}
    return json_format.ParseDict({"rules": {"action": "DENY", "policies": {"revoked": policy}}}, rbac_pb2.RBAC())


def bucket_filter(regex: str | None) -> rbac_pb2.RBAC:
    """The compiler's bucket: DENY, one principal matching the bucket's regex (here on `x-job`)."""
    if regex is None:
        return json_format.ParseDict({"rules": {"action": "DENY"}}, rbac_pb2.RBAC())
    principal = {"header": {"name": "x-job", "string_match": {"safe_regex": {"regex": regex}}}}
    policy = {"permissions": [{"any": True}], "principals": [principal]}
    return json_format.ParseDict({"rules": {"action": "DENY", "policies": {"revoked": policy}}}, rbac_pb2.RBAC())


def bucket_regexes(jobs: list[str]) -> list[str | None]:
    buckets: list[list[str]] = [[] for _ in range(REVOCATION_BUCKETS)]
    for job in jobs:
        buckets[revocation_bucket(job)].append(job)
    return [revocations.bucket_regex(sorted(b)) if b else None for b in buckets]


def typed(name: str, message: Any) -> extension_pb2.TypedExtensionConfig:
    config = extension_pb2.TypedExtensionConfig(name=name)
    config.typed_config.Pack(message)
    return config


class Target:
    """One Envoy and one keep-alive connection to its listener."""

    def __init__(self, label: str, envoy: EnvoyProcess, port: int, job: str) -> None:
        self.label, self.envoy, self.port, self.samples = label, envoy, port, []  # type: list[int]
        self.request = f"GET / HTTP/1.1\r\nHost: bench\r\nx-job: {job}\r\n\r\n".encode()
        self.sock = socket.create_connection((LOOPBACK, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def one(self) -> int:
        started = time.perf_counter_ns()
        self.sock.sendall(self.request)
        received = b""
        while not received.endswith(b"ok"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError(f"{self.label}: connection closed")
            received += chunk
        elapsed = time.perf_counter_ns() - started
        if not received.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self.label}: {received[:40]!r}")
        return elapsed


@contextmanager
def envoy_with(filters: list[tuple[str, Any]]) -> Iterator[tuple[TinyAds, EnvoyProcess, int]]:
    port = free_port()
    with envoy_on_ads("delta", RUNTIME) as (ads, envoy):
        for name, message in filters:
            ads.put(ECDS, name, typed(name, message))
        live_listener(ads, envoy, port, [ecds_filter(name, RBAC_URL) for name, _ in filters])
        envoy.wait_for(lambda: once(port, x_job="1") == 200, 60, "listener up")
        yield ads, envoy, port


def percentile(samples: list[int], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000.0


def memory(envoy: EnvoyProcess) -> tuple[float, float]:
    status, body = envoy.admin_get("/memory")
    data = json.loads(body) if status == 200 else {}
    return int(data.get("allocated", 0)) / 1e6, int(data.get("heap_size", 0)) / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--spread", action="store_true", help="ids 7,919 apart instead of consecutive")
    parser.add_argument("--recent", type=int, default=2 * RECENT_LIMIT + 1, help="ids in the recent list")
    args = parser.parse_args(argv)
    jobs = job_ids(args.jobs, args.spread)
    recent = job_ids(args.recent, args.spread, start=args.jobs)  # revoked after the sealed ones
    probe = jobs.pop(len(jobs) // 2)  # not on the list, among listed ids
    regexes = [*bucket_regexes(jobs), revocations.bucket_regex(recent) if recent else None]
    names = [*(revocation_bucket_filter(i) for i in range(REVOCATION_BUCKETS)), REVOKED_RECENTLY_FILTER]
    setups: dict[str, Callable[[], list[tuple[str, Any]]]] = {
        "none": lambda: [],
        "today": lambda: [("today", today_filter(jobs))],
        "buckets, 0": lambda: [(n, bucket_filter(None)) for n in names],
        f"buckets, {args.jobs:,} + recent {args.recent}": lambda: [
            (n, bucket_filter(r)) for n, r in zip(names, regexes, strict=True)
        ],
    }
    sizes = [len(r or "") for r in regexes[:-1]]
    print(f"{args.jobs:,} {'spread' if args.spread else 'consecutive'} job ids sealed, {args.recent} recent; "
          f"probe {probe} (not listed)")  # fmt: skip
    print(f"bucket regexes: {sum(sizes):,} chars in all, largest {max(sizes):,}, smallest {min(sizes):,}; "
          f"recent list's: {len(regexes[-1] or ''):,}")  # fmt: skip
    with ExitStack() as stack:
        targets = []
        for label, filters in setups.items():
            started = time.perf_counter()
            _, envoy, port = stack.enter_context(envoy_with(filters()))
            target = Target(label, envoy, port, probe)
            stack.callback(target.sock.close)
            targets.append(target)
            print(f"  {label}: Envoy serving after {time.perf_counter() - started:.2f} s")
        # The listed ids are denied where a deny list holds them (a sealed one, a recent one), the probe is not.
        denied = {job: once(targets[-1].port, x_job=job) for job in (jobs[0], jobs[-1], *recent[:1], *recent[-1:])}
        if set(denied.values()) != {403}:
            raise RuntimeError(f"listed ids not denied: {denied}")
        for target in targets:
            for _ in range(args.warmup):
                target.one()
        for _ in range(args.rounds):
            for target in targets:
                target.samples += [target.one() for _ in range(args.block)]
        base = {p: percentile(targets[2].samples, p) for p in (0.5, 0.9, 0.99)}
        none = {p: percentile(targets[0].samples, p) for p in (0.5, 0.9, 0.99)}
        print(f"\n{len(targets[0].samples):,} requests each, in blocks of {args.block}; microseconds")
        print(f"{'':<28} {'p50':>8} {'p90':>8} {'p99':>8} {'p99 - buckets,0':>16} {'p99 - none':>11} "
              f"{'allocated MB':>13} {'heap MB':>8}")  # fmt: skip
        for target in targets:
            p = {q: percentile(target.samples, q) for q in (0.5, 0.9, 0.99)}
            allocated, heap = memory(target.envoy)
            print(f"{target.label:<28} {p[0.5]:>8.1f} {p[0.9]:>8.1f} {p[0.99]:>8.1f} {p[0.99] - base[0.99]:>16.1f} "
                  f"{p[0.99] - none[0.99]:>11.1f} {allocated:>13.1f} {heap:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
