"""What one more revoked job costs as the deny list grows: before issue 13 (today), with last session's 16 ECDS
buckets (buckets), and with the recent list beside the 16 sealed buckets that the code now runs (tiered).

Today every revoked job id is one principal of an RBAC DENY policy embedded in every gateway's route
configuration (`route.revocations_entry`, gone since), so each revocation re-sends the whole route configuration
to every Envoy, and every request is matched against the whole list. Last session moved the list into 16 ECDS
buckets by thousand-block (one more revocation re-sends its bucket: 1/16 of the list). The code now adds a recent
list (`controlplane.revoked_jobs.recent`) that every revocation joins, sealed into the buckets at each 300 s
quantum or past `RECENT_LIMIT` ids, make-before-break (credentials/revocations.py, docs/revocation-at-scale.md).

The designs, each measured through `serve`'s compile path without its network (`_Stack`: a `PolicyService` with
its memo kept warm, fed by a `Revocations` that loaded N jobs at start from a store, sealed into the buckets, as
`serve` loads its file or PostgreSQL; a fake clock, so quanta pass when the benchmark says):
- `today`: the same compile with no deny list, plus today's encoder (`revocations_entry`, kept here) run on the
  whole list after it, as the removed code ran inside every compile; its bytes count as route configuration.
- `buckets`: last session's design, re-created with the code as it is: the compiler is handed every listed id in
  the 16 buckets and an empty recent list. The `Revocations` behind it has a recent limit of 0, so every id joins
  its bucket at once and unchanged buckets stay the same objects (as last session's did, so the memo is used as it
  was); its buckets equal `revocation_buckets(every listed id)` (checked), which is byte-for-byte last session's
  16 configurations, plus one empty recent configuration that never changes.
- `tiered`: the code as it is (`Revocations.buckets()` and `.recent()`).

N outstanding revocations (`--sizes`), at three id densities (`DENSITIES`: consecutive ids, every tenth, and ids
7,919 apart, each its own thousand-block: the worst case for the regexes' shared prefixes, see `density_table`):

1. One more revocation: the job is revoked and `recompile` awaited, as `CredentialService.revoke_finished` does.
   Reported: the bytes of the resources whose version changed, which is what each Envoy is re-sent (Delta: the
   changed resources; SotW: the same, ECDS being a named type, docs/envoy-ecds.md §7), x 1,000 Envoys, and the
   control plane's CPU (`time.process_time`, every thread: the compile runs in a worker thread) for the revoke,
   recompile and snapshot build (median of `--repeat`), and of that the encoding of the changed deny-list
   configuration alone. `tiered` is measured with the recent list holding 0, RECENT_LIMIT // 2 and
   RECENT_LIMIT - `--repeat` ids before the timed revocations (the last reaches RECENT_LIMIT - 1: the most
   before a limit seal), and with a seal settling (RECENT_LIMIT + 1 sealed ids still listed, plus the rest: the
   recent list at its largest, twice the limit). Its bytes are the recent list's: they do not depend on N.
   `today` is measured at consecutive ids only (its bytes hardly depend on density: one principal per id).
2. A seal (`tiered`): the recent list holding RECENT_LIMIT ids, one more revocation seals it (a limit seal);
   and RECENT_LIMIT // 2 ids sealed when the fake clock reaches the next quantum (a quantum seal). Reported: the
   bytes of the seal push (the buckets the ids join, and the recent list), of the settle push `SEAL_SETTLE`
   later (the recent list emptied), their sum per sealed id, and the seal push's CPU.
3. A steady state (`--hours` of simulated time, `--rate` revocations a second, each denied for `--window`, 3 h by
   default, as `serve`'s --deny-id-tokens-for): N = rate x window jobs are listed at start (revoked over the last
   window, so the oldest expire first) and N stays constant: 54,000 at the defaults, the issue's busy GitLab
   (`--steady-at 50000,200000` sets N instead, each at the rate N / window). The fake clock steps from event to
   event: a revocation, or `Revocations.next_expiry()`, when `prune()` runs as `CredentialService.run` would (expiry,
   quantum seals, settles; limit seals happen inside a revocation). A push is a recompile whenever what the design
   hands the compiler changed. Each revocation is pushed alone: at 5 a second they are 0.2 s apart, more than
   `serve`'s 0.1 s gather; at faster rates `serve` would coalesce some, so the figures are then an upper bound.
   Reported for `buckets` and `tiered` at each density: the bytes every push re-sends to one Envoy, in all per
   revocation ("all-in": seals, settles and expiry included) and split by kind of push, the largest single push, and
   the control plane's CPU per revocation all-in.
4. A burst: `--burst` revocations spread evenly over one second at N = `--burst-at` (consecutive ids), each one
   an asyncio task doing what `revoke_finished` does, with `serve`'s gather, for `buckets` and `tiered`. Counted:
   compiles, snapshots published (one xDS push each to every Envoy of the group), and the bytes each Envoy is
   sent in total.
5. A real Envoy (`--envoy-at`, 0: skipped): two stacks in one run (fake GitLab, echo backend, `controlplane
   serve`, Envoy), one started with no revocations, one with N in its state directory's `revoked-jobs.json`.
   On each, a credential of a job not on the list is exchanged, then `--requests` sequential GETs over one
   keep-alive connection after `--warmup` (stacks alternated in blocks of 100, so both see the same machine).
   Reported: p50/p99 latency and Envoy's `/memory` `allocated` and `heap_size`, and how long Envoy took from
   start to its first 200 (it loads the N-entry list, sealed at start into the buckets).
6. A simulated fleet (`--fleet-at`, 0: skipped): `controlplane serve` started with N jobs in its state directory
   and fleet_sim.py's policy, `--streams` simulated Envoys (fleet_sim's `Fleet`, `--mode` sotw or delta: each
   subscribes to the 18 ECDS configurations the listener names, jwt_authn, 16 buckets and the recent list), then
   one Job Hook for a job never seen of project 1001 (which a raw-token backend admits, so the job is covered and
   listed): the time until every stream ACKed the change of the `ecds` type (the recent list), the server's CPU
   over it, and when the hook was answered.

Method and figures: docs/performance.md, "Issue 13". The machine's other load shows in the CPU figures; the bytes
are exact.

Usage: PYTHONPATH=. python benchmarks/revocation_scale.py [--sizes 500,5000,50000,200000] [--hours 1 --rate 5]
       [--envoy-at 50000] [--fleet-at 50000 --streams 1000 --mode delta]
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
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
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
from controlplane.compiler.names import REVOKED_RECENTLY_FILTER, revocation_bucket_filter  # noqa: E402
from controlplane.compiler.revocations import bucket_config_bytes  # noqa: E402
from controlplane.credentials.revocation_store import REVOCATIONS_FILE  # noqa: E402
from controlplane.credentials.revocations import (  # noqa: E402
    EXPIRY_QUANTUM,
    RECENT_LIMIT,
    SEAL_SETTLE,
    Revocations,
    horizon,
)
from controlplane.model.credentials import (  # noqa: E402
    EXCHANGE_PATH,
    NO_REVOCATIONS,
    Buckets,
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
# How far apart the listed job ids are: every finished job listed; one in ten; each its own thousand-block.
DENSITIES = {"consecutive": 1, "every tenth": 10, "spread": 7919}
# The fake clock's start: 10 s into a quantum, so nothing is sealed by the clock unless a benchmark moves it.
START = 6_000_000 * EXPIRY_QUANTUM + 10.0


class FakeClock:
    """The time `Revocations` reads: moved by the benchmark, never by the machine."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class LoadedStore:
    """A `RevocationStore` holding the N jobs a replica loads at start; writes cost nothing (the store's own
    cost is not the compile path's, and a real one would only grow the outbox here: `persist` empties it)."""

    def __init__(self, entries: dict[str, float]) -> None:
        self.entries = entries

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def changes(self, since: int) -> tuple[dict[str, float], int]:
        return (dict(self.entries) if since == 0 else {}), 1

    async def save(self, entries: Mapping[str, float]) -> None:
        return None

    async def prune(self) -> int:
        return 0

    def status(self) -> dict[str, object]:
        return {"kind": "benchmark"}


@dataclass
class Figures:
    """One design's figures for one more revocation at one N; None: not measured."""

    label: str
    route_bytes: int | None = None  # bytes of the changed resources one revocation re-sends to each Envoy
    changed_types: str = ""
    cpu_ms: float | None = None  # control plane CPU for one more revocation (median)
    entry_ms: float | None = None  # of the CPU: encoding the changed deny-list configuration alone (median)

    @property
    def fleet_bytes(self) -> int | None:
        return None if self.route_bytes is None else self.route_bytes * FLEET


def job_ids(count: int, first: int = FIRST_JOB, step: int = 1) -> list[str]:
    return [str(first + i * step) for i in range(count)]


def job_id(index: int, step: int) -> str:
    return str(FIRST_JOB + index * step)


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
    """`serve`'s compile path without its network: a PolicyService with a warm memo, fed by a Revocations list
    that loaded `entries` at start (sealed into the buckets), on `clock`; new job ids come from `ids`.

    `design`: "tiered" is the code as it is; "buckets" last session's 16 buckets (a recent limit of 0: every id
    joins its bucket at once; the compiler gets an empty recent list); "today" the design before issue 13: the
    same compile with no deny list, plus today's encoder run on the whole list after it (as the removed
    `route.revocations_entry` ran inside every compile), its bytes counted as part of the route configuration."""

    def __init__(
        self,
        root: Path,
        design: str,
        entries: dict[str, float],
        ids: Iterator[str],
        clock: FakeClock,
        gather: float = 0.0,
    ) -> None:
        (root / "policy.yaml").write_text(POLICY.format(issuer="http://127.0.0.1:1", backend_port=1, listen_port=1))
        self.design, self.gather, self.clock, self.ids = design, gather, clock, ids
        limit = 0 if design == "buckets" else RECENT_LIMIT
        self.revocations = Revocations(LoadedStore(entries), clock=clock, recent_limit=limit)
        asyncio.run(self.revocations.open())  # as `serve` starts: the whole list, sealed
        self.cache = SnapshotCache()
        self.published: list[Snapshot] = []
        self.cache.subscribe(self.published.append)
        self.compiles = 0
        self.entry = b""  # today's: the list as last encoded
        self.service = PolicyService(root, self.cache, credentials=self._inputs)
        assert self.service.reload(), self.service.state.errors
        self.handed = self.lists()

    def lists(self) -> tuple[Buckets, tuple[str, ...]]:
        """What this design hands the compiler: the buckets and the recent list."""
        if self.design == "today":
            return NO_REVOCATIONS, ()
        if self.design == "buckets":
            return self.revocations.buckets(), ()
        return self.revocations.buckets(), self.revocations.recent()

    def _inputs(self) -> CredentialInputs:
        self.compiles += 1  # read once per compile, in the worker thread
        revoked, recent = self.lists()
        return CredentialInputs(jwks=KEYS, exchange_address=(LOOPBACK, 18080), revoked=revoked, revoked_recently=recent)

    def changed_inputs(self) -> bool:
        """Whether what the compiler is handed changed since the last call (by identity, as the memo sees it)."""
        now = self.lists()
        changed = any(a is not b for a, b in zip(now, self.handed, strict=True))
        self.handed = now
        return changed

    def revoke(self, count: int = 1) -> None:
        """Deny the next `count` jobs for the deny window, without a push (filling the list)."""
        for _ in range(count):
            assert self.revocations.revoke(next(self.ids), self.clock() + DENY_FOR)

    async def revoke_one(self, until: float | None = None) -> None:
        """What `CredentialService.revoke_finished` does once the job is recorded: deny, recompile, then write
        the store (here: nothing to write)."""
        job = next(self.ids)
        if self.revocations.revoke(job, until or self.clock() + DENY_FOR):
            await self.push()
        await self.revocations.persist()

    async def push(self) -> None:
        await self.service.recompile("credentials changed", gather=self.gather)
        self.changed_inputs()
        if self.design == "today":
            self.entry = revocations_entry(self.revocations.active())

    def last(self) -> Snapshot:
        return self.published[-1] if self.published else self.service.cache.get("bench")


def stack_at(root: Path, design: str, outstanding: int, step: int, until: float = START + DENY_FOR) -> _Stack:
    """A stack with `outstanding` jobs `step` apart listed until `until`; new jobs continue the sequence."""
    entries = {job_id(i, step): until for i in range(outstanding)}
    ids = (job_id(i, step) for i in itertools.count(outstanding))
    return _Stack(root, design, entries, ids, FakeClock())


def changed(before: Snapshot, after: Snapshot) -> tuple[int, str]:
    """Bytes of the resources whose version changed (what Delta xDS sends), and their types (with a count)."""
    size, types = 0, Counter[str]()
    for type_url in PUSH_ORDER:
        old, new = before.types[type_url].resources, after.types[type_url].resources
        for name, resource in new.items():
            if name not in old or old[name].version != resource.version:
                size += len(resource.response_entry)
                types[type_url.rsplit(".", 1)[-1]] += 1
    return size, ",".join(f"{count} {kind}" for kind, count in sorted(types.items()))


def route_bytes(snapshot: Snapshot) -> int:
    return sum(len(r.response_entry) for r in snapshot.types[ROUTE].resources.values())


def one_more(design: str, outstanding: int, step: int, repeat: int, recent: int = 0, settling: bool = False) -> Figures:
    """One more revocation, `repeat` times: CPU of revoke + recompile + snapshot, bytes each Envoy is re-sent.
    `recent`: ids in the recent list before the first timed one (tiered); `settling`: a limit seal's
    RECENT_LIMIT + 1 ids still in it besides (the seal pushed, not yet settled)."""
    label = (
        design if design != "tiered" else f"tiered, recent {recent}" + (f" + {RECENT_LIMIT + 1}" if settling else "")
    )
    figures = Figures(f"N={outstanding:,} {label}")
    with tempfile.TemporaryDirectory() as tmp:
        stack = stack_at(Path(tmp), design, outstanding, step)
        if design == "buckets":  # last session's 16 configurations, byte for byte
            assert stack.revocations.buckets() == revocation_buckets(stack.revocations.active())
        cpu, sizes, kinds = [], [], set()

        async def one() -> None:
            before = stack.last()
            started = time.process_time()
            await stack.revoke_one()
            cpu.append(time.process_time() - started)
            if design == "today":  # the whole route configuration, the list in it, to every Envoy
                sizes.append(route_bytes(stack.service.cache.get("bench")) + len(stack.entry))
                kinds.add("1 RouteConfiguration")
            else:
                size, types = changed(before, stack.last())
                sizes.append(size)
                kinds.add(types)

        async def runs() -> None:
            if settling:
                stack.revoke(RECENT_LIMIT + 1)  # a limit seal: these ids joined their buckets and settle
                assert stack.revocations.status()["revoked_recently"] == RECENT_LIMIT + 1
            stack.revoke(recent)
            await stack.push()  # a first recompile, as after `serve`'s start: the memo is warm from here
            await stack.revocations.persist()
            gc.collect()
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
            elif design == "buckets":
                index = revocation_bucket(job_id(outstanding + recent + repeat - 1, step))
                bucket_config_bytes(revocation_bucket_filter(index), stack.revocations.buckets()[index])
            else:
                bucket_config_bytes(REVOKED_RECENTLY_FILTER, stack.revocations.recent())
            entry.append(time.process_time() - started)
        figures.entry_ms = statistics.median(entry) * 1000
    return figures


def tiered_fills(repeat: int) -> list[tuple[int, bool]]:
    """(ids in the recent list before the timed revocations, a seal settling): empty, half full, the most before
    a limit seal (the last timed one makes it RECENT_LIMIT), and a seal settling beside that."""
    most = max(0, RECENT_LIMIT - repeat)
    return [(0, False), (RECENT_LIMIT // 2, False), (most, False), (most, True)]


# -- a seal


@dataclass
class Seal:
    label: str
    sealed: int
    seal_bytes: int
    seal_types: str
    settle_bytes: int
    seal_cpu_ms: float

    @property
    def per_id(self) -> float:
        return (self.seal_bytes + self.settle_bytes) / self.sealed


def seal_figures(outstanding: int, step: int, limit: bool) -> Seal:
    """The two pushes of one seal (tiered): `limit`, RECENT_LIMIT + 1 ids sealed by the revocation that passes the
    limit; else RECENT_LIMIT // 2 ids sealed when the clock reaches the next quantum."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = stack_at(Path(tmp), "tiered", outstanding, step)
        sealed = RECENT_LIMIT + 1 if limit else RECENT_LIMIT // 2

        async def run() -> Seal:
            stack.revoke(sealed - 1 if limit else sealed)
            await stack.push()
            gc.collect()
            before, started = stack.last(), time.process_time()
            if limit:
                await stack.revoke_one()
            else:
                stack.clock.now = horizon(stack.clock()) + EXPIRY_QUANTUM
                assert stack.revocations.prune()
                await stack.push()
            cpu = time.process_time() - started
            assert len(stack.revocations.recent()) == sealed  # still listed there until they settle
            seal_bytes, types = changed(before, stack.last())
            before = stack.last()
            stack.clock.now += SEAL_SETTLE
            assert stack.revocations.prune() and not stack.revocations.recent()
            await stack.push()
            settle_bytes, _ = changed(before, stack.last())
            how = "limit" if limit else "quantum"
            return Seal(f"N={outstanding:,} {how} seal", sealed, seal_bytes, types, settle_bytes, cpu * 1000)

        return asyncio.run(run())


# -- a steady state, simulated


@dataclass
class Steady:
    label: str
    listed: int
    revocations: int = 0
    pushes: int = 0
    cpu_s: float = 0.0
    bytes_by_kind: Counter[str] = field(default_factory=Counter)
    pushes_by_kind: Counter[str] = field(default_factory=Counter)
    largest: int = 0
    largest_kind: str = ""

    def per_revocation(self, kind: str | None = None) -> float:
        total = sum(self.bytes_by_kind.values()) if kind is None else self.bytes_by_kind[kind]
        return total / max(1, self.revocations)


def steady_state(design: str, step: int, rate: float, window: float, hours: float) -> Steady:
    """`hours` of revocations at `rate` a second, each denied for `window`, with N = rate x window listed at
    start (revoked over the last window: the oldest expire first), so N stays constant; every push's bytes."""
    listed = round(rate * window)
    entries = {job_id(i, step): START + (i + 1) / rate for i in range(listed)}
    ids = (job_id(i, step) for i in itertools.count(listed))
    figures = Steady(f"N={listed:,} {design}", listed)
    with tempfile.TemporaryDirectory() as tmp:
        stack = _Stack(Path(tmp), design, entries, ids, FakeClock())
        revocations, clock, end = stack.revocations, stack.clock, START + hours * 3600

        async def run() -> None:
            next_revocation = START + 1 / rate
            while True:
                due = revocations.next_expiry() or float("inf")
                if min(due, next_revocation) > end:
                    return
                before, buckets, started = stack.last(), revocations.buckets(), time.process_time()
                if due <= next_revocation:  # what CredentialService.run does when the next expiry is due
                    clock.now = max(clock.now, due)
                    if not revocations.prune():
                        raise RuntimeError(f"next_expiry {due} had nothing to do")
                    kind = "settle" if revocations.buckets() is buckets else "quantum"
                else:
                    clock.now, next_revocation = next_revocation, next_revocation + 1 / rate
                    figures.revocations += 1
                    assert revocations.revoke(next(stack.ids), clock.now + window)
                    kind = "limit seal" if design == "tiered" and revocations.buckets() is not buckets else "revocation"
                if stack.changed_inputs():
                    await stack.push()
                    await revocations.persist()
                    size, _ = changed(before, stack.last())
                    figures.cpu_s += time.process_time() - started
                    if size:
                        figures.pushes += 1
                        figures.pushes_by_kind[kind] += 1
                        figures.bytes_by_kind[kind] += size
                        if size > figures.largest:
                            figures.largest, figures.largest_kind = size, kind

        asyncio.run(run())
        if design == "buckets":  # still last session's configurations, byte for byte
            assert revocations.buckets() == revocation_buckets(
                job for bucket in revocations.buckets() for job in bucket
            )
    return figures


def burst_figures(design: str, outstanding: int, burst: int, gather: float) -> dict[str, float]:
    """`burst` revocations spread over one second, each its own task as concurrent Job Hooks are, with serve's
    `gather` (today's burst, which compiled once per hook, is recorded in docs/performance.md)."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = stack_at(Path(tmp), design, outstanding, 1)
        stack.compiles, stack.published[:] = 0, [stack.last()]
        stack.gather = gather

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
        seconds = asyncio.run(run())
        return {
            "compiles": stack.compiles,
            "pushes": len(stack.published) - 1,
            "bytes": sum(changed(a, b)[0] for a, b in itertools.pairwise(stack.published)),
            "cpu_ms": (time.process_time() - started) * 1000,
            "seconds": seconds,
        }


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


# -- the tables


def kb(value: float | None) -> str | None:
    return None if value is None else f"{value / 1000:,.1f} kB"


def print_rows(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table whose first column is the row's label (design and N) and the others right-aligned figures."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for row in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def one_more_table(density: str, step: int, sizes: Sequence[int], repeat: int) -> None:
    rows: list[Figures] = []
    for n in sizes:
        if step == 1:
            rows.append(one_more("today", n, step, repeat))
        rows.append(one_more("buckets", n, step, repeat))
        rows.extend(one_more("tiered", n, step, repeat, recent, settling) for recent, settling in tiered_fills(repeat))
    print_rows(
        f"One more revocation, {density} ids (tiered: the recent list holds that many before it)",
        ["", "changed resources", "bytes per Envoy", f"x {FLEET:,} Envoys", "control plane CPU", "of which encoding"],
        [
            (
                f.label,
                f.changed_types,
                kb(f.route_bytes),
                None if f.fleet_bytes is None else f"{f.fleet_bytes / 1e6:,.1f} MB",
                None if f.cpu_ms is None else f"{f.cpu_ms:.1f} ms",
                None if f.entry_ms is None else f"{f.entry_ms:.2f} ms",
            )
            for f in rows
        ],
    )


def seal_table(density: str, step: int, sizes: Sequence[int]) -> None:
    seals = [seal_figures(n, step, limit) for n in sizes for limit in (True, False)]
    print_rows(
        f"A seal (tiered), {density} ids: the buckets the ids join, then the recent list emptied"
        f" {SEAL_SETTLE:g} s later",
        ["", "ids sealed", "seal push", "changed", "settle push", "bytes per sealed id", "seal push CPU"],
        [
            (
                s.label,
                s.sealed,
                kb(s.seal_bytes),
                s.seal_types,
                kb(s.settle_bytes),
                f"{s.per_id:,.0f} B",
                f"{s.seal_cpu_ms:.1f} ms",
            )
            for s in seals
        ],
    )


def steady_table(density: str, step: int, rates: Sequence[float], window: float, hours: float) -> None:
    runs = [steady_state(design, step, rate, window, hours) for rate in rates for design in ("buckets", "tiered")]
    kinds = ("revocation", "limit seal", "quantum", "settle")
    print_rows(
        f"Steady state, {density} ids: {hours:g} h at {'/'.join(f'{r:g}' for r in rates)} revocations/s, each denied"
        f" {window / 3600:g} h; bytes each push re-sends to one Envoy",
        [
            "",
            "revocations",
            "pushes",
            "all-in per revocation",
            *(f"{k} (n)" for k in kinds),
            "largest push",
            "CPU per revocation",
        ],
        [
            (
                f.label,
                f"{f.revocations:,}",
                f"{f.pushes:,}",
                kb(f.per_revocation()),
                *(f"{kb(f.per_revocation(k))} ({f.pushes_by_kind[k]:,})" for k in kinds),
                f"{kb(f.largest)} {f.largest_kind}",
                f"{f.cpu_s * 1000 / max(1, f.revocations):.1f} ms",
            )
            for f in runs
        ],
    )


def density_table(outstanding: int) -> None:
    """A bucket's bytes depend on how densely its ids fill their thousand-blocks: consecutive ids (a GitLab whose
    finished jobs are all listed) share prefixes and digit classes; ids `step` apart share less. Last session's
    design re-sent one bucket per revocation; the recent list's size at its limit (and twice it, a seal settling)
    is what one more revocation re-sends at worst now, whatever N."""
    print(f"\nDeny-list configuration sizes at {outstanding:,} outstanding, by how far apart the listed job ids are")
    print(
        f"{'ids apart':>10}  {'largest bucket':>15}  {'all 16':>10}  {'bytes per id':>12}  "
        f"{f'recent {RECENT_LIMIT}':>11}  {f'recent {2 * RECENT_LIMIT + 1}':>11}"
    )
    for step in (1, 3, 10, 100, 1000, 7919):
        buckets = revocation_buckets(job_ids(outstanding, step=step))
        sizes = [len(bucket_config_bytes(revocation_bucket_filter(i), jobs)) for i, jobs in enumerate(buckets)]
        recent = [
            len(bucket_config_bytes(REVOKED_RECENTLY_FILTER, job_ids(count, FIRST_JOB + outstanding * step, step)))
            for count in (RECENT_LIMIT, 2 * RECENT_LIMIT + 1)
        ]
        print(
            f"{step:>10,}  {kb(max(sizes)):>15}  {kb(sum(sizes)):>10}  {sum(sizes) / outstanding:>12.1f}  "
            f"{kb(recent[0]):>11}  {kb(recent[1]):>11}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="500,5000,50000,200000", help="outstanding revocations, comma-separated")
    parser.add_argument("--densities", default=",".join(DENSITIES), help=f"of {', '.join(DENSITIES)}")
    parser.add_argument("--repeat", type=int, default=7, help="revocations timed at each size (median)")
    parser.add_argument("--rate", type=float, default=5.0, help="steady state: revocations a second")
    parser.add_argument(
        "--steady-at", default="", help="steady state: outstanding revocations instead (rate = N / window), e.g. 200000"
    )
    parser.add_argument("--window", type=float, default=DENY_FOR, help="steady state: deny window, seconds")
    parser.add_argument("--hours", type=float, default=1.0, help="steady state: simulated hours (0: skip)")
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
    densities = {name: DENSITIES[name] for name in args.densities.split(",")}
    print(f"RECENT_LIMIT {RECENT_LIMIT}, SEAL_SETTLE {SEAL_SETTLE:g} s, EXPIRY_QUANTUM {EXPIRY_QUANTUM:g} s")
    for density, step in densities.items():
        one_more_table(density, step, sizes, args.repeat)
    for density, step in densities.items():
        seal_table(density, step, sizes)
    rates = [int(n) / args.window for n in args.steady_at.split(",")] if args.steady_at else [args.rate]
    if args.hours:
        for density, step in densities.items():
            steady_table(density, step, rates, args.window, args.hours)
    if args.burst:
        bursts = {design: burst_figures(design, args.burst_at, args.burst, CREDENTIAL_CHANGES_GATHER)
                  for design in ("buckets", "tiered")}  # fmt: skip
        print_rows(
            f"A burst of {args.burst} revocations in one second at {args.burst_at:,} outstanding (consecutive ids)",
            ["", "compiles", "pushes", "bytes per Envoy", "CPU", "first revocation → last push"],
            [
                (
                    design,
                    f"{b['compiles']:.0f}",
                    f"{b['pushes']:.0f}",
                    kb(b["bytes"]),
                    f"{b['cpu_ms']:,.0f} ms",
                    f"{b['seconds']:.2f} s",
                )
                for design, b in bursts.items()
            ],
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
