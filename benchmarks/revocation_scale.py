"""What one more revoked job costs as the deny list grows: before issue 13 (today) and with its 16 ECDS buckets.

Today every revoked job id is one principal of an RBAC DENY policy embedded in every gateway's route
configuration (`route.revocations_entry`, gone since: the list is now 16 ECDS buckets, compiler/revocations.py,
and this script measures that), so each revocation re-sends the whole route configuration to every
Envoy, and every request is matched against the whole list.

Measured for N outstanding revocations (`--sizes`), each design being one function returning a `Figures`
(today's: `todays_design`; the new design adds its own beside it, and the table prints one column per design):

1. One more revocation, on the compiler as `serve` runs it: a `PolicyService` with its memo kept warm and a
   `Revocations` list read from a `revoked-jobs.json` of N jobs; the job is revoked and `recompile` is awaited, as
   `CredentialService.revoke_finished` does. Reported: the control plane's CPU (`time.process_time`, every
   thread: the compile runs in a worker thread) for the recompile and snapshot build (median of `--repeat`), and
   the bytes of the resources that changed, which is what each Envoy is re-sent (Delta xDS: the changed
   resources; SotW RDS: the same, the gateway has one route configuration). Fleet cost: those bytes x 1,000.
2. A burst: `--burst` revocations spread evenly over one second at N = `--burst-at`, each one an asyncio task
   doing what `revoke_finished` does (revoke, then await the recompile). Counted: compiles, snapshots published
   (one xDS push each to every Envoy of the group), and the route bytes each Envoy is sent in total.
3. A real Envoy (`--envoy-at`, 0: skipped): two stacks in one run (fake GitLab, echo backend, `controlplane
   serve`, Envoy), one started with no revocations, one with N in its state directory's `revoked-jobs.json`.
   On each, a credential of a job not on the list is exchanged, then `--requests` sequential GETs over one
   keep-alive connection after `--warmup` (stacks alternated in blocks of 100, so both see the same machine).
   Reported: p50/p99 latency and Envoy's `/memory` `allocated` and `heap_size`, and how long Envoy took from
   start to its first 200 (it loads the N-entry route configuration).
4. A simulated fleet (`--fleet-at`, 0: skipped): `controlplane serve` started with N jobs in its state directory
   and fleet_sim.py's policy, `--streams` simulated Envoys (fleet_sim's `Fleet`, `--mode` sotw or delta), then
   one Job Hook for a job never seen of project 1001 (which a raw-token backend admits, so the job is covered and
   listed): the time until every stream ACKed the new ECDS bucket (RDS before issue 13), the server's CPU over it,
   and when the hook was answered.

Method and figures: docs/performance.md, "Issue 13 baseline: today's deny list".

Usage: PYTHONPATH=. python benchmarks/revocation_scale.py [--sizes 500,5000,50000] [--envoy-at 50000]
       [--fleet-at 50000 --streams 1000 --mode delta]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import http.client
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fleet_sim  # noqa: E402
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config  # noqa: E402
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter  # noqa: E402
from fleet_client import raise_nofile  # noqa: E402
from google.protobuf.any_pb2 import Any as AnyProto  # noqa: E402
from revocation_latency import POLICY  # noqa: E402  (the same one-backend policy, exchanged credentials)

from controlplane.cli.bootstrap import render_bootstrap  # noqa: E402
from controlplane.cli.serve import CREDENTIAL_CHANGES_GATHER  # noqa: E402
from controlplane.compiler import wire  # noqa: E402
from controlplane.compiler.claims import claim_principal  # noqa: E402
from controlplane.compiler.revocations import bucket_config_bytes  # noqa: E402
from controlplane.credentials.revocation_store import REVOCATIONS_FILE  # noqa: E402
from controlplane.credentials.revocations import Revocations  # noqa: E402
from controlplane.model.credentials import (  # noqa: E402
    EXCHANGE_PATH,
    NO_REVOCATIONS,
    CredentialInputs,
    revocation_bucket,
    revocation_buckets,
)
from controlplane.runtime.policy_service import PolicyService  # noqa: E402
from controlplane.snapshots.cache import SnapshotCache  # noqa: E402
from controlplane.snapshots.snapshot import PUSH_ORDER, ROUTE, Snapshot  # noqa: E402
from tests.support.backends import EchoBackend, HttpResponse, http_request  # noqa: E402
from tests.support.controlplane import ControlPlaneProcess  # noqa: E402
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.fake_gitlab import FakeGitLab  # noqa: E402
from tests.support.gateway import Webhook  # noqa: E402
from tests.support.gitlab_hooks import GITLAB_VERSION, HookTarget  # noqa: E402
from tests.support.ports import LOOPBACK, free_port, poll_until  # noqa: E402

FLEET = 1_000  # Envoys, for the computed fleet cost
FIRST_JOB = 9_000_000_000  # GitLab job ids of a large instance have ten digits: the list's bytes depend on it
DENY_FOR = 3 * 3600.0  # serve's --deny-id-tokens-for default
HOOK_TIMEOUT = 120.0
KEYS = '{"keys":[{"crv":"P-256","kid":"cp-1","kty":"EC","x":"x","y":"y"}]}'  # shape only, for the compiler runs


@dataclass
class Figures:
    """One design's figures at one N; None: not measured."""

    route_bytes: int | None = None  # bytes of the changed resources one revocation re-sends to each Envoy
    changed_types: str = ""
    cpu_ms: float | None = None  # control plane CPU for one more revocation (median)
    burst_compiles: int | None = None
    burst_pushes: int | None = None
    burst_bytes: int | None = None  # route bytes sent to each Envoy over the whole burst
    burst_seconds: float | None = None  # first revocation → last push published
    burst_cpu_ms: float | None = None  # control plane CPU over the whole burst
    entry_ms: float | None = None  # of the CPU: encoding the changed deny-list bucket alone (median)
    envoy: dict[str, float] = field(default_factory=dict)

    @property
    def fleet_bytes(self) -> int | None:
        return None if self.route_bytes is None else self.route_bytes * FLEET


def job_ids(count: int, first: int = FIRST_JOB, step: int = 1) -> list[str]:
    return [str(first + i * step) for i in range(count)]


def write_revocations(path: Path, count: int) -> None:
    """`revoked-jobs.json` as `serve` keeps it in its state directory, with `count` jobs denied for 3 h."""
    until = time.time() + DENY_FOR
    path.write_text(json.dumps({"version": 1, "revoked": dict.fromkeys(job_ids(count), until)}))
    path.chmod(0o600)  # as serve writes it (it warns about any other mode)


# -- today's design: the whole deny list in every route configuration

_PER_FILTER_CONFIG = 16  # RouteConfiguration.typed_per_filter_config
_RBAC_PER_ROUTE_URL = "type.googleapis.com/" + rbac_filter.RBACPerRoute.DESCRIPTOR.full_name


def revocations_entry(job_ids: Sequence[str]) -> bytes:
    """Today's encoder, kept here when issue 13 took it out of the compiler (controlplane/compiler/route.py at
    commit 5b19082): the deny list as RouteConfiguration.typed_per_filter_config["controlplane.revocations"], an
    RBACPerRoute DENY policy with one `job_id` principal per job, appended to every route configuration."""
    if not job_ids:
        return b""
    policy = rbac_config.Policy(
        permissions=[rbac_config.Permission(any=True)],
        principals=[claim_principal("job_id", job) for job in sorted(set(job_ids))],
    )
    per_route = rbac_filter.RBACPerRoute(
        rbac=rbac_filter.RBAC(rules=rbac_config.RBAC(action=rbac_config.RBAC.DENY, policies={"revoked-jobs": policy}))
    )
    config = AnyProto(type_url=_RBAC_PER_ROUTE_URL, value=per_route.SerializeToString(deterministic=True))
    return wire.map_entry(_PER_FILTER_CONFIG, "controlplane.revocations", config.SerializeToString(deterministic=True))


class _Stack:
    """`serve`'s compile path without its network: a PolicyService with a warm memo, fed by a Revocations list.

    `design` "buckets" is the code as it is (16 ECDS buckets); "today" re-creates the design before issue 13:
    the same compile with no bucket filled, plus today's encoder run on the whole list after it (as the removed
    `route.revocations_entry` ran inside every compile), its bytes counted as part of the route configuration."""

    def __init__(self, root: Path, outstanding: int, design: str = "buckets", gather: float = 0.0) -> None:
        (root / "policy.yaml").write_text(POLICY.format(issuer="http://127.0.0.1:1", backend_port=1, listen_port=1))
        # As `serve` starts: the state directory's list, read into this replica's view (the outbox stays empty).
        write_revocations(root / REVOCATIONS_FILE, outstanding)
        self.design, self.gather = design, gather
        self.revocations = Revocations(root / REVOCATIONS_FILE)
        self.cache = SnapshotCache()
        self.published: list[Snapshot] = []
        self.cache.subscribe(self.published.append)
        self.compiles = 0
        self.entry = b""  # today's: the list as last encoded
        self.service = PolicyService(root, self.cache, credentials=self._inputs)
        self._next = FIRST_JOB + outstanding

    def _inputs(self) -> CredentialInputs:
        self.compiles += 1  # read once per compile, in the worker thread
        revoked = self.revocations.buckets() if self.design == "buckets" else NO_REVOCATIONS
        return CredentialInputs(jwks=KEYS, exchange_address=(LOOPBACK, 18080), revoked=revoked)

    async def revoke_one(self) -> None:
        """What `CredentialService.revoke_finished` does once the job is recorded: deny, then recompile."""
        job, self._next = str(self._next), self._next + 1
        if self.revocations.revoke(job, time.time() + DENY_FOR):
            await self.service.recompile("credentials changed", gather=self.gather)
            if self.design == "today":
                self.entry = revocations_entry(self.revocations.active())


def changed(before: Snapshot, after: Snapshot) -> tuple[int, str]:
    """Bytes of the resources whose version changed (what Delta xDS sends), and their types."""
    size, types = 0, []
    for type_url in PUSH_ORDER:
        old, new = before.types[type_url].resources, after.types[type_url].resources
        for name, resource in new.items():
            if name not in old or old[name].version != resource.version:
                size += len(resource.response_entry)
                types.append(type_url.rsplit(".", 1)[-1])
    return size, ",".join(sorted(set(types)))


def route_bytes(snapshot: Snapshot) -> int:
    return sum(len(r.response_entry) for r in snapshot.types[ROUTE].resources.values())


def one_more(design: str, outstanding: int, repeat: int) -> Figures:
    """One more revocation, `repeat` times: CPU of revoke + recompile + snapshot, bytes each Envoy is re-sent."""
    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp:
        stack = _Stack(Path(tmp), outstanding, design)
        assert stack.service.reload(), stack.service.state.errors
        cpu, sizes, kinds = [], [], set()
        gc.collect()

        async def one() -> None:
            before = stack.published[-1] if stack.published else None
            started = time.process_time()
            await stack.revoke_one()
            cpu.append(time.process_time() - started)
            if design == "today":  # the whole route configuration, the list in it, to every Envoy
                sizes.append(route_bytes(stack.service.cache.get("bench")) + len(stack.entry))
                kinds.add("RouteConfiguration")
            else:
                assert before is not None
                size, types = changed(before, stack.published[-1])
                sizes.append(size)
                kinds.add(types)

        async def runs() -> None:
            await stack.revoke_one()  # a first recompile, as after `serve`'s start: the memo is warm from here
            for _ in range(repeat):
                await one()

        asyncio.run(runs())
        figures.cpu_ms = statistics.median(cpu) * 1000
        figures.route_bytes = int(statistics.median(sizes))
        figures.changed_types = "/".join(sorted(kinds))
        entry = []
        for _ in range(repeat):
            started = time.process_time()
            if design == "today":
                revocations_entry(stack.revocations.active())
            else:
                index = revocation_bucket(str(stack._next - 1))
                bucket_config_bytes(index, stack.revocations.buckets()[index])
            entry.append(time.process_time() - started)
        figures.entry_ms = statistics.median(entry) * 1000
    return figures


def burst_figures(figures: Figures, outstanding: int, burst: int, gather: float) -> None:
    """`burst` revocations spread over one second, each its own task as concurrent Job Hooks are, with serve's
    `gather` (the new design; today's burst, which compiled once per hook, is recorded in docs/performance.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = _Stack(Path(tmp), outstanding, "buckets", gather)
        assert stack.service.reload()
        stack.compiles, stack.published[:] = 0, [stack.service.cache.get("bench")]

        async def run() -> float:
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for i in range(burst):
                delay = start + i / burst - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the load itself, not synchronisation
                tasks.append(asyncio.create_task(stack.revoke_one()))
            await asyncio.gather(*tasks)
            return loop.time() - start

        started = time.process_time()
        figures.burst_seconds = asyncio.run(run())
        figures.burst_cpu_ms = (time.process_time() - started) * 1000
        figures.burst_compiles = stack.compiles
        figures.burst_pushes = len(stack.published) - 1
        figures.burst_bytes = sum(changed(a, b)[0] for a, b in itertools.pairwise(stack.published))


# -- a real Envoy, with none and with N revocations


@contextmanager
def envoy_stack(gitlab: FakeGitLab, tmp: Path, label: str, outstanding: int) -> Iterator[dict[str, object]]:
    with ExitStack() as stack:
        backend = stack.enter_context(EchoBackend("reports"))
        policy, state, listen = tmp / f"policy-{label}", tmp / f"state-{label}", free_port()
        policy.mkdir()
        state.mkdir()
        (policy / "policy.yaml").write_text(
            POLICY.format(issuer=gitlab.issuer, backend_port=backend.port, listen_port=listen)
        )
        write_revocations(state / REVOCATIONS_FILE, outstanding)
        cp = stack.enter_context(ControlPlaneProcess(policy, log_level="WARNING", state_dir=state))
        boot = render_bootstrap(group="bench", node_id=f"bench-{label}", xds_host=LOOPBACK, xds_port=cp.xds_port)
        started = time.perf_counter()
        envoy = stack.enter_context(EnvoyProcess(boot, name=f"revocation-scale-{label}"))
        url = f"http://{LOOPBACK}:{listen}"
        subject = gitlab.mint(aud="https://reports.local", project_id=42, job_id=FIRST_JOB - 1, ttl=3600)
        form = urlencode({
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "subject_token": subject,
            "audience": "reports-api",
        }).encode()  # fmt: skip
        headers = {"Host": "reports.local", "Content-Type": "application/x-www-form-urlencoded"}

        def exchanged() -> str | None:
            response = http_request(url + EXCHANGE_PATH, method="POST", headers=headers, body=form)
            return str(response.json()["access_token"]) if response.status == 200 else None

        token = poll_until(exchanged, 120, message=f"exchange through Envoy ({label})")
        assert token is not None  # poll_until returns the first truthy answer or raises
        auth = {"Host": "reports.local", "Authorization": "Bearer " + token}
        poll_until(lambda: http_request(url + "/r", headers=auth).status == 200, 60, message=f"200 ({label})")
        ready = time.perf_counter() - started
        connection = http.client.HTTPConnection(LOOPBACK, listen, timeout=10)
        stack.callback(connection.close)
        yield {"envoy": envoy, "connection": connection, "auth": auth, "ready": ready}


def timed_requests(stack: dict[str, object], count: int) -> list[float]:
    connection, auth = stack["connection"], stack["auth"]
    assert isinstance(connection, http.client.HTTPConnection) and isinstance(auth, dict)
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        connection.request("GET", "/r", headers=auth)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"allowed request answered {response.status}")
    return samples


def percentile(samples: Sequence[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))]


def envoy_figures(outstanding: int, requests: int, warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """(with none, with `outstanding`) from one run."""
    with tempfile.TemporaryDirectory() as tmp, FakeGitLab() as gitlab:
        stacks = ExitStack()
        with stacks:
            none = stacks.enter_context(envoy_stack(gitlab, Path(tmp), "none", 0))
            many = stacks.enter_context(envoy_stack(gitlab, Path(tmp), "many", outstanding))
            samples: dict[str, list[float]] = {"none": [], "many": []}
            for stack in (none, many):
                timed_requests(stack, warmup)
            for _ in range(0, requests, 100):
                samples["none"] += timed_requests(none, min(100, requests - len(samples["none"])))
                samples["many"] += timed_requests(many, min(100, requests - len(samples["many"])))
            results = []
            for label, stack in (("none", none), ("many", many)):
                envoy = stack["envoy"]
                assert isinstance(envoy, EnvoyProcess)
                status, body = envoy.admin_get("/memory")
                memory = json.loads(body) if status == 200 else {}
                results.append({
                    "p50_ms": statistics.median(samples[label]) * 1000,
                    "p99_ms": percentile(samples[label], 0.99) * 1000,
                    "allocated_mb": int(memory.get("allocated", 0)) / 1e6,
                    "heap_mb": int(memory.get("heap_size", 0)) / 1e6,
                    "ready_s": float(stack["ready"]),  # type: ignore[arg-type]
                    "requests": len(samples[label]),
                })  # fmt: skip
    return results[0], results[1]


# -- a simulated fleet receiving one revocation


def fleet_figures(outstanding: int, streams: int, workers: int, mode: str, label: str = "rds") -> dict[str, object]:
    """`controlplane serve` started with `outstanding` jobs in its state directory's deny list and fleet_sim.py's
    policy (100 backends), `streams` simulated Envoys connected; then one Job Hook for a job never seen. Reported:
    the server's CPU from the delivery until every stream ACKed the new `label` (rds; ecds where the deny list is
    delivered by ECDS), and that time."""
    args = fleet_sim.parse_args(["--streams", str(streams), "--workers", str(workers), "--mode", mode])
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="revocation-fleet-") as tmp:
        directory, state, hook = Path(tmp) / "policy", Path(tmp) / "state", Webhook()
        directory.mkdir()
        state.mkdir()
        policy = fleet_sim.Policy(directory, args.backends)
        policy.write_all()
        write_revocations(state / REVOCATIONS_FILE, outstanding)
        extra = ("--state-dir", str(state), *hook.args)
        cp = ControlPlaneProcess(directory, log_level="WARNING", extra_args=extra, env=hook.env)
        target = HookTarget(f"http://{LOOPBACK}:{hook.port}/webhooks/gitlab", hook.secret)
        fleet: fleet_sim.Fleet | None = None
        try:
            cp.start()
            fleet = fleet_sim.Fleet(args, f"{LOOPBACK}:{cp.xds_port}")
            sim = fleet_sim.Sim(args, policy, cp, fleet)
            connect = sim.measured("connect", sim.connect)
            if not connect.ok:
                return {"error": f"the fleet did not connect: {connect.figures}"}
            job = FIRST_JOB + outstanding

            def revoke(result: fleet_sim.Result) -> None:
                base = sim.baseline()
                payload = {"object_kind": "build", "build_id": job, "build_status": "success", "pipeline_id": 1,
                           "project_id": 1001, "ref": "main"}  # fmt: skip
                answered: list[float | str] = []

                def post() -> None:  # in a thread: the webhook's answer can come after the push (see the docs)
                    try:
                        response = job_hook(target, payload)
                        answered.append(time.monotonic() - started if response.status == 200 else response.status)
                    except OSError as error:
                        answered.append(f"{type(error).__name__}: {error}")

                started = time.monotonic()
                sender = threading.Thread(target=post)
                sender.start()
                out = sim.await_change(base, [label])
                sender.join(HOOK_TIMEOUT)
                acked = [t[label] - started for t in out["times"].values() if t.get(label) is not None]
                result.ok = bool(answered) and isinstance(answered[0], float) and out["converged"]
                result.ok = result.ok and len(acked) == streams
                result.figures = {
                    "hook_answered_s": answered[0] if answered else "no answer yet",
                    "acked": len(acked),
                    "all_acked_s": max(acked) if acked else float("nan"),
                    "p50_acked_s": statistics.median(acked) if acked else float("nan"),
                }

            result = sim.measured("revoke", revoke)
            return {
                "ok": result.ok,
                **result.figures,
                "server_cpu_s": result.server_cpu,
                "client_cpu_s": result.client_cpu,
                "wall_s": result.wall,
                "pushes": result.pushes,
                "connect_wall_s": connect.wall,
                "connect_server_cpu_s": connect.server_cpu,
                "rss_mb": result.rss_after / 1024,
            }
        finally:
            if fleet is not None:
                fleet.close()
            cp.stop()


def job_hook(target: HookTarget, payload: dict[str, object]) -> HttpResponse:
    """gitlab_hooks.deliver's request with a longer timeout than its 5 s."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"GitLab/{GITLAB_VERSION}",
        "X-Gitlab-Event": "Job Hook",
        "X-Gitlab-Token": target.secret,
        "X-Gitlab-Instance": "https://gitlab.example.com",
        "X-Gitlab-Webhook-UUID": target.webhook_uuid,
        "X-Gitlab-Event-UUID": str(uuid.uuid4()),
        "Idempotency-Key": str(uuid.uuid4()),
    }
    body = json.dumps(payload).encode()
    return http_request(target.url, method="POST", headers=headers, body=body, timeout=HOOK_TIMEOUT)


# -- the table


def print_table(
    title: str, rows: Sequence[tuple[str, Callable[[Figures], object]]], columns: dict[str, Figures]
) -> None:
    width = max(len(label) for label, _ in rows)
    print(f"\n{title}")
    print(f"{'':<{width}}  " + "  ".join(f"{name:>20}" for name in columns))
    for label, value in rows:
        cells = []
        for figures in columns.values():
            cell = value(figures)
            cells.append(f"{'-' if cell is None else cell:>20}")
        print(f"{label:<{width}}  " + "  ".join(cells))


def kb(value: int | None) -> str | None:
    return None if value is None else f"{value / 1000:,.1f} kB"


def density_table(outstanding: int) -> None:
    """A bucket's bytes depend on how densely its ids fill their thousand-blocks: consecutive ids (a GitLab whose
    finished jobs are all listed) share prefixes and digit classes; ids `step` apart share less. One revocation
    re-sends one bucket, so its largest size is what one more revocation costs each Envoy at worst."""
    print(f"\nBucket sizes at {outstanding:,} outstanding, by how far apart the listed job ids are")
    print(f"{'ids apart':>10}  {'largest bucket':>15}  {'all 16':>10}  {'bytes per id':>12}")
    for step in (1, 3, 10, 100, 1000, 7919):
        buckets = revocation_buckets(job_ids(outstanding, step=step))
        sizes = [len(bucket_config_bytes(i, jobs)) for i, jobs in enumerate(buckets)]
        print(f"{step:>10,}  {kb(max(sizes)):>15}  {kb(sum(sizes)):>10}  {sum(sizes) / outstanding:>12.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,5000,50000", help="outstanding revocations, comma-separated")
    parser.add_argument("--repeat", type=int, default=7, help="revocations timed at each size (median)")
    parser.add_argument("--burst", type=int, default=100, help="revocations in one second")
    parser.add_argument("--burst-at", type=int, default=5000, help="outstanding revocations during the burst")
    parser.add_argument("--envoy-at", type=int, default=50000, help="outstanding revocations for Envoy (0: skip)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--fleet-at", type=int, default=0, help="outstanding revocations, fleet run (0: skip)")
    parser.add_argument("--streams", type=int, default=1000, help="simulated Envoys in the fleet run")
    parser.add_argument("--workers", type=int, default=2, help="fleet client processes")
    parser.add_argument("--mode", choices=["sotw", "delta"], default="delta", help="fleet run's ADS protocol")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    for design in ("today", "buckets"):
        columns = {f"{design} N={n:,}": one_more(design, n, args.repeat) for n in sizes}
        if design == "buckets" and args.burst_at in sizes:
            burst_figures(
                columns[f"{design} N={args.burst_at:,}"], args.burst_at, args.burst, CREDENTIAL_CHANGES_GATHER
            )
        print_table(
            f"One more revocation ({design})",
            [
                ("changed resources", lambda f: f.changed_types),
                ("bytes per Envoy", lambda f: kb(f.route_bytes)),
                (
                    f"bytes x {FLEET:,} Envoys",
                    lambda f: None if f.fleet_bytes is None else f"{f.fleet_bytes / 1e6:,.0f} MB",
                ),
                ("control plane CPU", lambda f: None if f.cpu_ms is None else f"{f.cpu_ms:.1f} ms"),
                ("  of which the entry", lambda f: None if f.entry_ms is None else f"{f.entry_ms:.1f} ms"),
                (f"burst {args.burst}/s: compiles", lambda f: f.burst_compiles),
                (f"burst {args.burst}/s: pushes", lambda f: f.burst_pushes),
                (
                    "burst: bytes per Envoy",
                    lambda f: None if f.burst_bytes is None else kb(f.burst_bytes),
                ),
                ("burst: CPU", lambda f: None if f.burst_cpu_ms is None else f"{f.burst_cpu_ms:,.0f} ms"),
                ("burst: seconds", lambda f: None if f.burst_seconds is None else f"{f.burst_seconds:.2f} s"),
            ],
            columns,
        )
    density_table(max(sizes))
    if args.fleet_at:
        fleet = fleet_figures(args.fleet_at, args.streams, args.workers, args.mode, label="ecds")
        print(f"\nSimulated fleet ({args.mode}), {args.streams:,} streams, {args.fleet_at:,} revoked, one more:")
        for key, value in fleet.items():
            print(f"  {key:<22} {round(value, 3) if isinstance(value, float) else value}")
    if args.envoy_at:
        none, many = envoy_figures(args.envoy_at, args.requests, args.warmup)
        print(f"\nReal Envoy, {args.requests} sequential GETs each (keep-alive, after {args.warmup} warm-up), one run")
        print(f"{'':<22}  {'0 revoked':>12}  {f'{args.envoy_at:,} revoked':>16}")
        for key, label in (
            ("p50_ms", "latency p50 (ms)"),
            ("p99_ms", "latency p99 (ms)"),
            ("allocated_mb", "/memory allocated (MB)"),
            ("heap_mb", "/memory heap_size (MB)"),
            ("ready_s", "start → first 200 (s)"),
        ):
            print(f"{label:<22}  {none[key]:>12.3f}  {many[key]:>16.3f}")


if __name__ == "__main__":
    main()
