"""What per-binding AWS roles cost (docs/aws-backends.md "Per-binding roles"), beside the backend's role alone as
the baseline, all in one run (docs/performance.md, "Issue 16: what per-binding AWS roles cost").

A binding's `aws_role_arn` compiles to one route per role before the backend's default route, matching jwt_authn's
payload in dynamic metadata, and sets `clear_route_cache: true` on the issuer's jwt_authn provider: Envoy matches
the route table a second time once the token is verified. Each role route carries its credential inline, so a
binding role's refresh re-sends the gateway's RouteConfiguration, where the backend role's is one ECDS resource.

Method, with the compiler's real output for a policy of one S3-style backend (`aws:`), a `read` role, B bindings
`b-0000`..  (`{project: 42, ref: branch-NNNN}`, the last K of them naming a role of their own), and one binding
`z-everyone` (`{project: 42}`, no role), so a job matching no role route is still allowed by RBAC:

1. Per request: one static Envoy 1.40 (`--concurrency 1`, the snapshot inlined: tests/support/static_bootstrap.py)
   per K in 0 (baseline: no role route, no `clear_route_cache`), 1, 10, 100, with B = 100 (`--bindings`,
   `--roles`), in front of a local upstream in a process of its own that answers at once with the access key id
   that signed the request (no AWS: only Envoy's work is measured). Signing is on in every variant (the same
   filter, fake static credentials); every timed request must come back signed with its job's key. Two jobs per
   Envoy: `last`, whose token matches the last role route (with K = 0 the same binding, signed by the backend's
   role), and `none`, which matches no role route (signed by the backend's role). One keep-alive HTTP/1.1
   connection per (Envoy, job) from a raw socket; the Envoys take turns in blocks, after a warm-up. Reported:
   p50, p99, requests/s on one connection, and the differences to the baseline.
2. Compile and push, B = K = 10, 100, 1,000 (baseline: the same bindings without roles): a cold compile +
   snapshot build (median), the RouteConfiguration's bytes, and one credential refresh recompiled with the memo
   as `serve` does: a binding role's (its new RouteConfiguration) against the backend role's (its ECDS
   resource). Then, for K = 100 (and 1,000 unless `--quick`), a real Envoy on the control plane's own XdsServer
   (`--api`, SotW by default): from setting the refreshed snapshot to the first request signed with the new key,
   on an open connection (polled without pause), for each kind of refresh.

Usage: PYTHONPATH=. python benchmarks/aws_role_routes.py [--quick] [--rounds 20] [--block 200] [--api sotw|delta]
       [--bindings 100] [--roles 0,1,10,100]      (about 30 s; --quick about 3 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.cli.bootstrap import render_bootstrap  # noqa: E402
from controlplane.compiler.aws import SigningCredential  # noqa: E402
from controlplane.compiler.compile import compile_policy  # noqa: E402
from controlplane.compiler.memo import CompilerMemo  # noqa: E402
from controlplane.model.loader import parse_policy  # noqa: E402
from controlplane.model.policy import Policy  # noqa: E402
from controlplane.snapshots.cache import SnapshotCache  # noqa: E402
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, ROUTE, Snapshot, build_snapshots  # noqa: E402
from controlplane.xds.fleet_status import ProxyRegistry  # noqa: E402
from controlplane.xds.server import XdsServer  # noqa: E402
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.fake_gitlab import FakeGitLab  # noqa: E402
from tests.support.policy_parts import backend, binding, documents, gateway, issuer, role  # noqa: E402
from tests.support.ports import LOOPBACK, free_port  # noqa: E402
from tests.support.static_bootstrap import as_static_bootstrap  # noqa: E402

GROUP = "ci-gateway"
HOST = "s3.local"
AUDIENCE = f"https://{HOST}"
PATH = "/bucket/key"
ACCOUNT = "arn:aws:iam::123456789012:role"
BACKEND_ROLE = f"{ACCOUNT}/backend"
INVENTORY = "groups: [{id: 11, path: acme}]\nprojects: [{id: 42, path: acme/deployer, namespace_id: 11}]\n"
T = TypeVar("T")
KEYS: dict[str, str] = {}  # issuer name -> the JWKS relayed inline (the fake GitLab's, set once it runs)


def role_arn(index: int) -> str:
    return f"{ACCOUNT}/r{index:04d}"


def key_of(arn: str, generation: int = 0) -> str:
    """An access key id naming its role (what the upstream reads back from the signature)."""
    return f"ASIA{arn.rsplit('/', 1)[1].upper()}G{generation}"


def credential(arn: str, generation: int = 0) -> SigningCredential:
    return SigningCredential(key_of(arn, generation), f"secret-{generation}", f"token-{generation}")


@dataclass(frozen=True)
class Variant:
    bindings: int  # B
    roles: int  # K: the last K bindings name a role

    def arns(self) -> list[str]:
        return [role_arn(i) for i in range(self.bindings - self.roles, self.bindings)]

    def policy(self, issuer_url: str, listen: int, upstream: int) -> Policy:
        aws = f"aws: {{service: s3, region: eu-west-1, role_arn: '{BACKEND_ROLE}'}}"
        bindings = [
            binding(
                f"b-{i:04d}",
                ["read"],
                f"{{project: 42, ref: branch-{i:04d}}}",
                extra=f"aws_role_arn: '{role_arn(i)}'" if i >= self.bindings - self.roles else "",
            )
            for i in range(self.bindings)
        ]
        text = documents(
            issuer(issuer_url, extra="inventory: inventory.yaml"),
            backend("s3", upstream, host=HOST, extra=aws),
            role("read", "s3", paths=["/bucket/**"]),
            *bindings,
            binding("z-everyone", ["read"], "{project: 42}"),
            gateway(listen, ["s3"]),
        )
        return parse_policy({"inventory.yaml": INVENTORY, "policy.yaml": text})


def compiled(
    policy: Policy,
    credentials: dict[str, SigningCredential],
    memo: CompilerMemo | None = None,
    previous: Snapshot | None = None,
) -> Snapshot:
    """The gateway's snapshot as `serve` builds it, with the fake GitLab's keys relayed inline (KEYS)."""
    group = compile_policy(policy, memo, keys=KEYS, aws_credentials=credentials)[GROUP]
    return build_snapshots({GROUP: group.resources}, {GROUP: previous} if previous else None)[GROUP]


def resource_bytes(snapshot: Snapshot, type_url: str) -> int:
    return sum(len(r.payload) for r in snapshot.types[type_url].resources.values())


# -- the upstream, in a process of its own (not competing with the client for this one's GIL): each answer's body
# is the access key id that signed the request (read from its SigV4 `Authorization`), or `-` when unsigned.

UPSTREAM = """
import asyncio, sys

class Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while b"\\r\\n\\r\\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\\r\\n\\r\\n", 1)  # GETs only: no body
            key = b"-"
            for line in head.split(b"\\r\\n"):
                if line[:14].lower() == b"authorization:" and b"Credential=" in line:
                    key = line.split(b"Credential=", 1)[1].split(b"/", 1)[0]
            self.transport.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\n\\r\\n%s" % (len(key), key))

async def main():
    server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@contextmanager
def upstream() -> Iterator[int]:
    """The upstream's port; the process is stopped on leaving."""
    process = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield int(process.stdout.readline())
    finally:
        process.terminate()
        process.wait(5)


class Loop:
    """An event loop in a thread, for the control plane's XdsServer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Results:
    """What a run measured, for tests/test_bench_aws_role_routes.py (the figures themselves are printed)."""

    latency_us: dict[tuple[int, str], float] = field(default_factory=dict)  # (K, job) -> p50
    pushed_bytes: dict[tuple[int, int], int] = field(default_factory=dict)  # (B, K) -> bytes of one refresh
    signed_ms: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # (K, rds|ecds) -> push → signed


# -- part 1: per request


@dataclass
class Target:
    label: str
    port: int
    token: str
    key: str  # the access key that must sign this job's requests
    roles: int = 0  # K of its Envoy
    job: str = ""  # last | none
    samples: list[int] = field(default_factory=list)
    signed_by: str = ""

    def __post_init__(self) -> None:
        self.request = f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {self.token}\r\n\r\n".encode()
        self.sock = socket.create_connection((LOOPBACK, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(10)

    def one(self) -> int:
        """One request; its time in ns. `signed_by` is then the key that signed it (the upstream's answer)."""
        started = time.perf_counter_ns()
        self.sock.sendall(self.request)
        received = b""
        while b"\r\n\r\n" not in received:
            received += self._recv()
        head, body = received.split(b"\r\n\r\n", 1)
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        while len(body) < length:
            body += self._recv()
        elapsed = time.perf_counter_ns() - started
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{self.label}: {head[:60]!r} {body[:80]!r}")
        self.signed_by = body.decode()
        return elapsed

    def _recv(self) -> bytes:
        chunk = self.sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"{self.label}: connection closed")
        return chunk

    def signed(self) -> int:
        """One request, which must have been signed with this job's key (checked after the clock stopped)."""
        elapsed = self.one()
        if self.signed_by != self.key:
            raise RuntimeError(f"{self.label}: signed with {self.signed_by!r}, expected {self.key!r}")
        return elapsed


def start(envoy: EnvoyProcess) -> EnvoyProcess:
    """From a worker thread: no plain fork while this process has gRPC threads (see tests/support/ecds_envoy.py)."""
    with ThreadPoolExecutor(1) as spawner:
        spawner.submit(envoy.start).result()
    return envoy


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def answers(port: int, token: str) -> bool:
    try:
        probe = Target("probe", port, token, "")
    except OSError:
        return False
    try:
        probe.one()
        return True
    except RuntimeError:
        return False
    finally:
        probe.sock.close()


def percentile(samples: list[int], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] / 1000.0


def per_request(gitlab: FakeGitLab, upstream: int, args: argparse.Namespace, results: Results) -> None:
    bindings = args.bindings
    claims: dict[str, Any] = {"project_id": 42, "project_path": "acme/deployer", "namespace_id": 11, "aud": AUDIENCE}
    last = gitlab.mint(ref=f"branch-{bindings - 1:04d}", ref_protected=False, ttl=3600, **claims)
    none = gitlab.mint(ref="feature", ref_protected=False, ttl=3600, **claims)
    targets: list[Target] = []
    with ExitStack() as stack:
        for roles in args.roles:
            variant = Variant(bindings, roles)
            listen = free_port()
            policy = variant.policy(gitlab.issuer, listen, upstream)
            credentials = {arn: credential(arn) for arn in [BACKEND_ROLE, *variant.arns()]}
            snapshot = compiled(policy, credentials)
            envoy = start(EnvoyProcess(as_static_bootstrap(snapshot), name=f"roles-{roles}"))
            stack.callback(envoy.stop)
            until(lambda: answers(listen, none), 20, f"K={roles} answering")  # noqa: B023 (used at once)
            label = "baseline (backend role only)" if roles == 0 else f"{roles} binding role{'s' * (roles > 1)}"
            last_key = key_of(role_arn(bindings - 1)) if roles else key_of(BACKEND_ROLE)
            for job, token, key in (("last", last, last_key), ("none", none, key_of(BACKEND_ROLE))):
                target = Target(f"{label}, job {job}", listen, token, key, roles, job)
                stack.callback(target.sock.close)
                target.signed()
                targets.append(target)
        for target in targets:
            for _ in range(args.warmup):
                target.one()
        for _ in range(args.rounds):
            for target in targets:
                target.samples += [target.signed() for _ in range(args.block)]
    base = {t.job: t for t in targets if t.roles == 0}
    print(f"\n1. Per request, {bindings} bindings + z-everyone, {len(targets[0].samples):,} requests each "
          f"(blocks of {args.block}), one keep-alive connection each; microseconds")  # fmt: skip
    print(f"{'':<44} {'p50':>7} {'p99':>7} {'req/s':>7} {'p50 - base':>11} {'p99 - base':>11}")
    for target in targets:
        p50, p99 = percentile(target.samples, 0.5), percentile(target.samples, 0.99)
        rate = 1e9 * len(target.samples) / sum(target.samples)
        results.latency_us[(target.roles, target.job)] = p50
        b50, b99 = percentile(base[target.job].samples, 0.5), percentile(base[target.job].samples, 0.99)
        print(f"{target.label:<44} {p50:>7.1f} {p99:>7.1f} {rate:>7.0f} {p50 - b50:>+11.1f} {p99 - b99:>+11.1f}")


# -- part 2: compile and push


def median_time(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextmanager
def served(loop: Loop, first: Snapshot, api: str) -> Iterator[tuple[SnapshotCache, EnvoyProcess]]:
    cache = SnapshotCache()
    cache.set(first)
    server = XdsServer(cache, ProxyRegistry(), log=logging.getLogger("controlplane.xds"))
    port = loop.run(server.start(LOOPBACK, 0))
    boot = render_bootstrap(group=GROUP, node_id="bench-roles", xds_host=LOOPBACK, xds_port=port, api=api)
    envoy = EnvoyProcess(boot, name="roles-xds")
    try:
        start(envoy)
        yield cache, envoy
    finally:
        envoy.stop()
        loop.run(server.stop(1.0))


def push_to_signed(loop: Loop, cache: SnapshotCache, snapshot: Snapshot, target: Target) -> float:
    """From setting `snapshot` to the first request on `target`'s open connection signed with its new key, ms."""

    async def put() -> None:
        cache.set(snapshot)

    before = target.signed_by  # the key that signed until now
    pushed = time.perf_counter()
    loop.run(put())
    while True:
        target.one()
        if target.signed_by not in (before, target.key):
            raise RuntimeError(f"{target.label}: signed with {target.signed_by!r} during the refresh")
        if target.signed_by == target.key:
            return 1000 * (time.perf_counter() - pushed)
        if time.perf_counter() - pushed > 10:
            raise RuntimeError(f"{target.label}: not signed with {target.key} within 10 s")


def compile_and_push(gitlab: FakeGitLab, loop: Loop, upstream: int, args: argparse.Namespace, results: Results) -> None:
    print("\n2. Compile and push, B bindings all naming a role (K = B) vs the same bindings without roles (K = 0)")
    print(f"{'B':>6} {'K':>6} {'compile+build ms':>17} {'routes kB':>10} {'refresh compile ms':>19} "
          f"{'pushed kB':>10} {'what is pushed':>16}")  # fmt: skip
    claims: dict[str, Any] = {"project_id": 42, "project_path": "acme/deployer", "namespace_id": 11, "aud": AUDIENCE}
    for count in args.scale:
        for roles in (0, count):
            variant = Variant(count, roles)
            listen = free_port()
            policy = variant.policy(gitlab.issuer, listen, upstream)
            credentials = {arn: credential(arn) for arn in [BACKEND_ROLE, *variant.arns()]}
            cold = median_time(lambda: compiled(policy, credentials), args.repeat)  # noqa: B023
            memo = CompilerMemo()
            first = compiled(policy, credentials, memo)
            refreshed = BACKEND_ROLE if roles == 0 else role_arn(count - 1)
            renewed = credentials | {refreshed: credential(refreshed, 1)}
            started = time.perf_counter()
            second = compiled(policy, renewed, memo, first)
            refresh = time.perf_counter() - started
            changed = ROUTE if roles else EXTENSION_CONFIG
            if first.version(changed) == second.version(changed):
                raise RuntimeError(f"B={count} K={roles}: the refresh changed no {changed}")
            other = EXTENSION_CONFIG if roles else ROUTE
            if first.version(other) != second.version(other):
                raise RuntimeError(f"B={count} K={roles}: the refresh changed {other} too")
            pushed = results.pushed_bytes[(count, roles)] = resource_bytes(second, changed)
            what = "RDS: routes" if roles else "ECDS: signer"
            print(f"{count:>6} {roles:>6} {1000 * cold:>17.1f} {resource_bytes(first, ROUTE) / 1000:>10.1f} "
                  f"{1000 * refresh:>19.1f} {pushed / 1000:>10.1f} {what:>16}")  # fmt: skip
            if roles and count in args.envoy_at:
                times = envoy_apply(loop, gitlab, policy, credentials, first, listen, count, claims, args)
                results.signed_ms |= {(count, kind): ms for kind, ms in times.items()}


def envoy_apply(
    loop: Loop,
    gitlab: FakeGitLab,
    policy: Policy,
    credentials: dict[str, SigningCredential],
    first: Snapshot,
    listen: int,
    count: int,
    claims: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """Alternate refreshes of the last binding role (RDS) and of the backend role (ECDS) on a real Envoy."""
    last = gitlab.mint(ref=f"branch-{count - 1:04d}", ref_protected=False, ttl=3600, **claims)
    none = gitlab.mint(ref="feature", ref_protected=False, ttl=3600, **claims)
    times: dict[str, list[float]] = {"rds": [], "ecds": []}
    with served(loop, first, args.api) as (cache, envoy):
        until(lambda: answers(listen, none), 20, "the xDS-fed Envoy answering")
        role_job = Target("binding role", listen, last, key_of(role_arn(count - 1)))
        backend_job = Target("backend role", listen, none, key_of(BACKEND_ROLE))
        role_job.signed()
        backend_job.signed()
        current, memo, previous = dict(credentials), CompilerMemo(), first
        for generation in range(1, args.pushes + 1):
            for kind, arn, target in (("rds", role_arn(count - 1), role_job), ("ecds", BACKEND_ROLE, backend_job)):
                current[arn] = credential(arn, generation)
                target.key = key_of(arn, generation)
                previous = compiled(policy, current, memo, previous)
                times[kind].append(push_to_signed(loop, cache, previous, target))
        reloads = envoy.stats("rds\\..*config_reload$")
        role_job.sock.close()
        backend_job.sock.close()
    for kind, label in (("rds", "binding role (RDS)"), ("ecds", "backend role (ECDS, baseline)")):
        ms = sorted(times[kind])
        print(f"       B=K={count}, {args.api}: refresh of the {label} → first request signed with the new key: "
              f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)})")  # fmt: skip
    print(f"       Envoy's RDS reloads: {sum(reloads.values())}")
    return times


def main(argv: list[str] | None = None) -> Results:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, B up to 100")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5, help="cold compiles per size (median)")
    parser.add_argument("--pushes", type=int, default=10, help="refreshes of each kind on the real Envoy")
    parser.add_argument("--api", choices=("sotw", "delta"), default="sotw")
    parser.add_argument("--bindings", type=int, default=100, help="B for the per-request part")
    parser.add_argument("--roles", default="0,1,10,100", help="the K of the per-request part, 0 the baseline")
    args = parser.parse_args(argv)
    args.roles = sorted({0, *(int(k) for k in args.roles.split(","))})
    if args.roles[-1] > args.bindings:
        parser.error("--roles may not exceed --bindings")
    args.scale = [10, 100, 1000]
    args.envoy_at = {100, 1000}
    if args.quick:
        args.rounds, args.block, args.warmup, args.repeat, args.pushes = 2, 50, 20, 1, 2
        args.scale, args.envoy_at = [10, 100], {100}
    loop, results = Loop(), Results()
    try:
        with upstream() as port, FakeGitLab(default_audience=AUDIENCE) as gitlab:
            KEYS["gitlab"] = json.dumps(gitlab.jwks(), sort_keys=True, separators=(",", ":"))
            per_request(gitlab, port, args, results)
            compile_and_push(gitlab, loop, port, args, results)
    finally:
        loop.close()
    return results


if __name__ == "__main__":
    main()
