"""Fleet simulator: a real `controlplane serve` and N simulated Envoys (ADS SotW or Delta) in K worker processes.

Method: the policy (an Issuer, BACKENDS EDS backends with a Role and a Binding each, one gateway) is generated
into a temp dir; the server runs as users run it. Clients (fleet_client.py) open one channel per stream (unless
--per-channel says otherwise), follow Envoy's startup sequence and ACK every response. Latencies come from the
clients' ACK timestamps (system-wide monotonic clock) minus the parent's file-write time, so they include the
watcher's debounce (default 100 ms). RSS is VmRSS of the server; CPU is utime+stime of server and workers over
each scenario.

"The client holds the new config" means, per type, the same thing in both modes: SotW's acked version_info,
and for Delta a digest of the held {name: version} set (equal to the server's type version when the client
holds the whole type; the `delta consistency` figure checks it against the server's system_version_info).
Types are labelled cds, eds, lds, ecds (HTTP filter configurations a listener names, subscribed as Envoy does:
docs/envoy-ecds.md §8) and rds. Every scenario reports `received_kb_per_stream`: per type, the response bytes
each stream received during it (p50/max over the streams), what the change cost each Envoy on the wire.

Scenarios:
  connect    the storm: every stream connects and completes Envoy's startup; server RSS per stream
  steady     10 s idle with every stream connected: server CPU and RSS
  policy     a policy commit: one Binding's subject changes, so only RDS (per-route RBAC) changes
  swap       one backend replaced (a cluster removed and one added: SotW make-before-break)
  burst      50 policy writes in 1 s (the server should coalesce them)
  churn      10% of the streams reconnect per second for 10 s (Delta resumes with initial_resource_versions)
  nack       one stream NACKs the next CDS; it must not be sent it again, the others move on
  soak       --pushes policy commits, each written once a sample of streams converged; RSS before/after
  delta-cpu  grows to --cpu-backends backends; server CPU per push when ONE backend's endpoints change vs ALL

Targets (issue #5): a change ACKed by all 1,000 streams within 300 ms p99; ≤ 100 KB RSS per stream; soak RSS
after ≤ 1.1 x before.

    python benchmarks/fleet_sim.py --streams 1000 --workers 2 --scenario all --mode sotw
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fleet_client import ORDER, WorkerConfig, raise_nofile, worker_main  # noqa: E402

from tests.support.controlplane import ControlPlaneProcess  # noqa: E402
from tests.support.ports import LOOPBACK, poll_until  # noqa: E402

GROUP = "fleet"
SCENARIOS = ("connect", "steady", "policy", "swap", "burst", "churn", "nack", "soak", "delta-cpu")
TICKS = os.sysconf("SC_CLK_TCK")
STEADY_S = 10.0
WARMUP = 10  # soak pushes before its "before" RSS
CPU_REPS = 3  # pushes per kind in delta-cpu
GRPC_THREADS = ("event_engine", "grpc", "default-executo", "lifeguard", "resolver-execut")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    return cpu_s_of(Path(f"/proc/{pid}/stat"))  # utime, stime (fields 14 and 15 of stat)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """Server CPU by thread kind: "loop" (the main thread: asyncio, xDS state machines, fan-out), "grpc" (core's
    event_engine/poller threads: socket I/O), "other" (Python worker threads: policy read and compile, watcher).

    Splitting lets a push's xDS cost be told apart from its compile cost, which the total mixes.
    """
    split = {"loop": 0.0, "grpc": 0.0, "other": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            cpu = cpu_s_of(task / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        kind = "loop" if task.name == str(pid) else "grpc" if comm.startswith(GRPC_THREADS) else "other"
        split[kind] += cpu
    return split


def cpu_s_of(stat: Path) -> float:
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


def spread(values: list[float]) -> str:
    """p50/p99/max, the shape every latency is reported in."""
    return "/".join(f"{x:.0f}" for x in (pct(values, 0.5), pct(values, 0.99), max(values))) if values else "-"


class Policy:
    """The generated policy directory; every write is atomic (rename) and returns its monotonic time.

    base.yaml: Issuer + backends (endpoint ports can change: delta-cpu). access.yaml: a Role and a Binding per
    backend except the first. team.yaml: the first backend's Role and Binding, whose subject a policy commit
    changes. gateway.yaml: one extra backend (replaced by a swap) and the Gateway listing every backend.
    """

    def __init__(self, directory: Path, backends: int) -> None:
        self.dir = directory
        self.ports = [8080] * backends
        self.extra = 0
        self.team = 0
        self.written_unix = 0.0

    @property
    def names(self) -> list[str]:
        return [f"svc-{b:04d}" for b in range(len(self.ports))]

    def write_all(self) -> None:
        self.write_base()
        roles = "".join(self._access(name, 1000 + b) for b, name in enumerate(self.names) if b)
        self._write("access.yaml", roles)
        self.write_team()
        self.write_gateway()

    def write_base(self, comment: str = "") -> float:
        text = f"# {comment}\nkind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n---\n"
        text += "".join(_backend(f"svc-{b:04d}", b, port) for b, port in enumerate(self.ports))
        return self._write("base.yaml", text)

    def write_team(self) -> float:
        """A policy commit: the first backend's Binding now names another project (only RBAC changes)."""
        return self._write("team.yaml", self._access(self.names[0], 100_000 + self.team))

    def write_gateway(self) -> float:
        """A swap: the extra backend is replaced (one cluster removed, one added)."""
        names = [*self.names, f"extra-{self.extra}"]
        text = _backend(f"extra-{self.extra}", 249, 9000 + self.extra % 50000)
        text += f"kind: Gateway\nname: {GROUP}\nlisten: {{address: 127.0.0.1, port: 10000}}\n"
        text += f"backends: [{', '.join(names)}]\naccess_log: /dev/null\n"
        return self._write("gateway.yaml", text)

    @staticmethod
    def _access(name: str, project: int) -> str:
        return (
            f"kind: Role\nname: {name}-read\nbackend: {name}\nrules: [{{methods: [GET, HEAD], paths: ['/**']}}]\n"
            f"---\nkind: Binding\nname: {name}-readers\nroles: [{name}-read]\n"
            f"subjects: [{{project: {project}, ref_protected: true}}]\n---\n"
        )

    def _write(self, name: str, text: str) -> float:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        written = time.monotonic()
        self.written_unix = time.time()  # to compare with the server's publication timestamp (a Unix time)
        tmp.replace(self.dir / name)
        return written


def _backend(name: str, n: int, port: int) -> str:
    return (
        f"kind: Backend\nname: {name}\nhosts: [{name}.internal]\n"
        f"endpoints: [{{address: 10.{n // 250}.{n % 250}.10, port: {port}}}]\n---\n"
    )


@dataclass
class Result:
    scenario: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    server_cpu: float = 0.0
    server_split: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    wall: float = 0.0
    pushes: dict[str, float] = field(default_factory=dict)  # responses sent during the scenario, by type


class Fleet:
    """The worker processes and the command round-trips to them; always stopped by ``close``."""

    def __init__(self, args: argparse.Namespace, target: str) -> None:
        ctx = mp.get_context("spawn")  # grpc does not survive fork after it started threads
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        self.owner: dict[int, int] = {}
        per_worker = -(-args.streams // args.workers)
        read_timeout = args.read_timeout or max(20.0, args.streams / 100)
        for w in range(args.workers):
            # Contiguous index ranges, so streams sharing a channel (--per-channel) are in one worker.
            indices = list(range(w * per_worker, min(args.streams, (w + 1) * per_worker)))
            config = WorkerConfig(
                target, GROUP, args.mode, indices, args.per_channel, args.wave, read_timeout, args.inflight
            )
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, config), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.owner.update(dict.fromkeys(indices, w))

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def all(self, name: str, wait: float, **kwargs: Any) -> list[Any]:
        for conn in self.conns:
            conn.send((name, kwargs))
        return [self._reply(conn, wait) for conn in self.conns]

    def one(self, index: int, name: str, wait: float = 10.0, **kwargs: Any) -> Any:
        conn = self.conns[self.owner[index]]
        conn.send((name, {"index": index, **kwargs}))
        return self._reply(conn, wait)

    @staticmethod
    def _reply(conn: Connection, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise TimeoutError("worker did not answer in time")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker failed: {value}")
        return value

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("stop", {}))
                conn.poll(10)  # a worker busy in a long command is killed below
            except (OSError, EOFError):
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


class Sim:
    def __init__(self, args: argparse.Namespace, policy: Policy, cp: ControlPlaneProcess, fleet: Fleet) -> None:
        self.args, self.policy, self.cp, self.fleet = args, policy, cp, fleet
        self.server_pid = cp._proc.pid if cp._proc is not None else 0
        self.timeout = max(30.0, args.streams / 50)
        self.idle_rss = 0

    # -- measuring

    def measured(self, name: str, body: Callable[[Result], None]) -> Result:
        bytes0 = self.bytes_received()  # read outside the CPU window: the pipe round-trips are not the scenario's
        result = Result(name, False, rss_before=rss_kb(self.server_pid))
        pushes0 = self.pushes()
        server0 = cpu_s(self.server_pid)
        split0 = thread_cpu_s(self.server_pid)
        clients0 = sum(cpu_s(p) for p in self.fleet.pids())
        started = time.monotonic()
        try:
            body(result)
        except (AssertionError, TimeoutError, RuntimeError) as error:  # report and go on with the next scenario
            result.ok = False
            result.figures["error"] = str(error)[:300]
        result.wall = time.monotonic() - started
        result.server_cpu = cpu_s(self.server_pid) - server0
        result.server_split = {k: v - split0[k] for k, v in thread_cpu_s(self.server_pid).items()}
        result.client_cpu = sum(cpu_s(p) for p in self.fleet.pids()) - clients0
        result.rss_after = rss_kb(self.server_pid)
        pushes = self.settled_pushes()
        received = received_per_stream(bytes0, self.bytes_received())
        if received:
            result.figures["received_kb_per_stream"] = received
        result.pushes = {t: n - pushes0.get(t, 0) for t, n in pushes.items() if n - pushes0.get(t, 0)}
        return result

    def pushes(self) -> dict[str, float]:
        """controlplane_xds_pushes_total by type: how many responses the scenario cost, not only how long."""
        found = re.findall(r'^controlplane_xds_pushes_total{type="(\w+)"} (\S+)$', self.cp.metrics(), re.MULTILINE)
        return {label: float(n) for label, n in found}

    def settled_pushes(self, timeout: float = 3.0) -> dict[str, float]:
        """The counter once it stops moving: a response is counted when its write completes, which the
        server can learn after the client has already ACKed it (so after the scenario's own clock stopped)."""
        deadline = time.monotonic() + timeout
        last = self.pushes()
        while time.monotonic() < deadline:
            time.sleep(0.1)  # the poll interval, bounded by the deadline
            now = self.pushes()
            if now == last:
                return now
            last = now
        return last

    def bytes_received(self) -> dict[int, dict[str, int]]:
        """Per stream, response bytes received so far by type (fleet_client's ``bytes_received``)."""
        return {int(i): b for reply in self.fleet.all("bytes_received", 30) for i, b in reply.items()}

    def baseline(self, index: int = 0) -> dict[str, str]:
        return dict(self.fleet.one(index, "versions"))

    def await_change(
        self, base: dict[str, str], labels: list[str], exclude: list[int] | None = None, sample: int = 0
    ) -> dict[str, Any]:
        replies = self.fleet.all(
            "await_change", self.timeout + 5, baseline=base, labels=labels, timeout=self.timeout,
            exclude=exclude or [], sample=sample,
        )  # fmt: skip
        return {
            "converged": all(r["converged"] for r in replies),
            "times": {i: t for r in replies for i, t in r["ack_times"].items()},
            "versions": replies[0]["versions"],
        }

    def compile_s(self) -> tuple[float, float]:
        """(count, sum) of controlplane_compile_duration_seconds: the compile's share of a push."""
        text = self.cp.metrics()
        values = {}
        for name in ("controlplane_compile_duration_seconds_count", "controlplane_compile_duration_seconds_sum"):
            match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            values[name] = float(match.group(1)) if match else 0.0
        return tuple(values.values())  # type: ignore[return-value]

    # -- scenarios

    def connect(self, r: Result) -> None:
        replies = self.fleet.all("connect", self.timeout + 120, timeout=self.timeout)
        started = min(x["started"] for x in replies)
        ready = [t for x in replies for t in x["ready"].values() if t is not None]
        r.ok = all(x["converged"] for x in replies) and len(ready) == self.args.streams
        r.figures = {
            "ready": f"{len(ready)}/{self.args.streams}",
            "failed_opens": sum(len(x["failed"]) for x in replies),
            "call_retries": sum(x["retries"] for x in replies),
            "time_to_all_s": round(max(ready) - started, 2) if ready else None,
            "streams_per_channel": self.args.per_channel,
            "inflight_per_worker": self.args.inflight or f"unbounded (waves of {self.args.wave})",
            "nofile": replies[0]["nofile"][0],
        }
        errors = Counter(re.sub(r"\d+", "N", e)[:200] for x in replies for e in x["errors"])
        if errors:
            r.figures["call_errors"] = errors.most_common(4)
        stuck = [s for x in replies for s in x["stuck"]]
        if stuck:
            r.figures["not_ready_sample"] = stuck[:4]

    def steady(self, r: Result) -> None:
        time.sleep(STEADY_S)  # the measurement window itself: nothing changes, CPU and RSS are sampled around it
        r.ok = True
        r.figures = {"window_s": STEADY_S}

    def policy_commit(self, r: Result) -> None:
        """--commits policy commits, one at a time: each one's time until all streams ACKed it, from the file
        write and from the snapshot's publication (the server's last-good-load timestamp, set as the compiled
        snapshot is handed to the xDS cache, i.e. after the watcher's quiet period, parse and compile)."""
        everyone, first, published, per_stream, others = [], [], [], [], set()
        acked_all, fewest = True, self.args.streams
        for _ in range(self.args.commits):
            base = self.baseline()
            self.policy.team += 1
            written = self.policy.write_team()
            out = self.await_change(base, ["rds"])
            after = self.baseline()
            others |= {k for k in ("cds", "eds", "lds") if after.get(k) != base.get(k)}
            ms = [(t["rds"] - written) * 1000 for t in out["times"].values() if t.get("rds") is not None]
            acked_all = acked_all and out["converged"] and len(ms) == self.args.streams
            fewest = min(fewest, len(ms))
            if not ms:
                continue
            publication = (self._published_unix() - self.policy.written_unix) * 1000
            everyone.append(max(ms))
            first.append(min(ms))
            published.append(max(ms) - publication)
            per_stream += ms
        r.ok = acked_all and not others
        r.figures = {
            "commits": self.args.commits,
            "acked": f"{fewest}/{self.args.streams}",  # by every stream, in the commit with the fewest
            "all_acked_ms p50/p99/max": spread(everyone),
            "from_publication_ms p50/p99/max": spread(published),
            "first_ack_ms p50": round(pct(first, 0.5), 1) if first else None,
            "per_stream_ms p50/p99/max": spread(per_stream),
            "each_from_publication_ms": [round(x) for x in published],
            "other_types_changed": sorted(others) or "none",
        }
        if everyone:
            r.figures["all_ms"] = round(pct(everyone, 0.99), 1)
            r.figures["all_from_publication_ms"] = round(pct(published, 0.99), 1)

    def _published_unix(self) -> float:
        """When the server handed its latest snapshot to the xDS cache (Unix time)."""
        text = self.cp.metrics()
        match = re.search(r"^controlplane_policy_last_good_load_timestamp_seconds (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else float("nan")

    def swap(self, r: Result) -> None:
        base = self.baseline()
        self.policy.extra += 1
        written = self.policy.write_gateway()
        out = self.await_change(base, ["cds", "eds", "rds"])
        latencies = [max(v for v in t.values() if v is not None) - written for t in out["times"].values() if t]
        ms = [x * 1000 for x in latencies]
        r.ok = out["converged"] and len(ms) == self.args.streams
        r.figures = {
            "acked": f"{len(ms)}/{self.args.streams}",
            "p50/p99/max ms": spread(ms),
            "all_ms": round(max(ms), 1) if ms else None,
        }
        # Per type, in the order the server sends them. SotW: make before break sends CDS with old and new
        # clusters ("+keep"), then EDS, routes once those are ACKed, and last the final CDS. Delta removes and
        # adds in one CDS response (delta.py: "needs no union").
        for label in ("cds+keep", "cds", "eds", "rds"):
            per = [(t[label] - written) * 1000 for t in out["times"].values() if t.get(label) is not None]
            if per:
                r.figures[f"{label} p50/p99/max ms"] = spread(per)

    def burst(self, r: Result) -> None:
        builds0 = self.cp.metric("controlplane_snapshot_builds_total")
        base = self.baseline()
        seen0 = self.fleet.all("seen", 10)
        started = time.monotonic()
        for i in range(50):
            self.policy.team += 1
            time.sleep(max(0.0, started + i / 50 - time.monotonic()))  # pacing the load (50/s), not a wait
            self.policy.write_team()
        # The server coalesces writes behind a quiet period; the fleet is done once it settled on one version.
        out = self.await_change(base, ["rds"])
        seen = self.fleet.all("seen", 10)
        pushed = max(s.get("rds", 0) for s in seen) - max(s.get("rds", 0) for s in seen0)
        builds = self.cp.metric("controlplane_snapshot_builds_total") - builds0
        r.ok = out["converged"] and pushed <= 5
        r.figures = {"writes": 50, "rds_versions_pushed": pushed, "snapshot_builds": int(builds)}

    def churn(self, r: Result) -> None:
        replies = self.fleet.all(
            "churn", self.timeout + 120, fraction=0.1, seconds=10, timeout=self.timeout, seed=self.args.seed
        )
        times = [t * 1000 for x in replies for t in x["reconverge_s"]]
        live = sum(x["live"] for x in replies)
        streams = sum(x["reconnected_streams"] for x in replies)
        r.ok = all(x["converged"] for x in replies) and live == self.args.streams
        r.figures = {
            "reconnects": sum(x["reconnects"] for x in replies),
            "failed_opens": sum(len(x["failed"]) for x in replies),
            "live": f"{live}/{self.args.streams}",
            "reconnect->settled p50/p99/max ms": spread(times),
            "responses per reconnected stream": round(sum(x["responses_after_reconnect"] for x in replies) / streams, 2)
            if streams
            else None,
        }

    def nack(self, r: Result) -> None:
        before = self.fleet.one(0, "stream_stats")
        nacks0 = self._nacks()
        self.fleet.one(0, "nack_next", label="cds")
        base = self.baseline(1)
        self.policy.extra += 1
        written = self.policy.write_gateway()
        out = self.await_change(base, ["cds", "eds", "rds"], exclude=[0])
        # The NACKing stream answers within the same fan-out; wait for its NACK, bounded.
        poll_until(lambda: self.fleet.one(0, "stream_stats")["nacked"], self.timeout, message="stream 0 NACKs")
        # The client notes its NACK before the server reads it: wait (bounded) for the server's NACK counter.
        # (`/status` last_nack is transient: the server may next send this proxy a different, final CDS
        # version, and its ACK clears last_nack; so it is reported, not required.)
        poll_until(lambda: self._nacks() > nacks0, self.timeout, message="server counts the NACK")
        status = self._nack_status() or "cleared (proxy ACKed a later CDS)"
        # A second, unrelated change must reach it (proof the stream is alive) without re-sending the rejected one.
        base2 = self.baseline(1)
        self.policy.extra += 1
        self.policy.write_gateway()
        out2 = self.await_change(base2, ["cds", "eds", "rds"], exclude=[0])
        poll_until(
            lambda: self.fleet.one(0, "stream_stats")["acked"].get("cds") == out2["versions"].get("cds"),
            self.timeout,
            message="nacking stream receives the next version",
        )
        stats = self.fleet.one(0, "stream_stats")
        rejected = tuple(stats["nacked"][0])  # what stream 0 NACKed (SotW: may be the make-before-break step)
        resent = stats["received"].get(rejected, 0)
        resources_resent = sum(stats["resources_received"].get(tuple(k), 0) > 1 for k in stats["nacked_resources"])
        others = out["converged"] and out2["converged"] and len(out["times"]) == self.args.streams - 1
        r.ok = bool(stats["nacked"]) and resent == 1 and not resources_resent and others
        r.ok = r.ok and before["acked"] != stats["acked"]
        latencies = [max(v for v in t.values() if v is not None) - written for t in out["times"].values() if t]
        r.figures = {
            "nacked": stats["nacked"][:1],
            "rejected_version_received_times": resent,
            "rejected_resources_resent": resources_resent,
            "others_converged": others,
            "others_p99_ms": round(pct([x * 1000 for x in latencies], 0.99), 1),
            "server_nacks_counted": self._nacks() - nacks0,
            "server_status_last_nack": status,
        }

    def soak(self, r: Result) -> None:
        """Policy commits back to back: each written once one stream per worker holds the previous one.

        "Before" is the RSS after the first WARMUP pushes, not at the start: an earlier scenario (swap, nack)
        can leave transient response buffers that are released during the first pushes and would hide growth.
        """
        pushes = self.args.pushes
        base = self.baseline()
        start_rss = rss_kb(self.server_pid) / 1024
        checkpoints: dict[int, float] = {}
        converged = True
        started = time.monotonic()
        for i in range(1, pushes + 1):
            self.policy.team += 1
            self.policy.write_team()
            out = self.await_change(base, ["rds"], sample=1)
            converged = converged and out["converged"]
            base = {**base, **out["versions"]}
            if i == min(WARMUP, pushes) or i % max(1, pushes // 5) == 0:
                checkpoints[i] = rss_kb(self.server_pid) / 1024
                rate = i / (time.monotonic() - started)
                print(f"  soak: {i}/{pushes} pushes, {rate:.1f}/s, server rss {checkpoints[i]:.0f} MB", flush=True)
        elapsed = time.monotonic() - started
        final = self.await_change({"rds": ""}, ["rds"])  # every stream, not just the sample, holds the last one
        everyone = final["converged"] and final["versions"].get("rds") == base.get("rds")
        after = rss_kb(self.server_pid) / 1024
        before = checkpoints[min(WARMUP, pushes)]
        growth = (after - before) / max(1, pushes - min(WARMUP, pushes)) * 100
        marks = checkpoints.items()
        r.ok = converged and everyone and after <= 1.1 * before
        r.figures = {
            "pushes": pushes,
            "pushes_per_s": round(pushes / elapsed, 1),
            "all_streams_hold_last": everyone,
            "rss MB at start / at push": f"{start_rss:.0f} / " + " ".join(f"{k}:{v:.0f}" for k, v in marks),
            f"rss_after/after_{min(WARMUP, pushes)}_pushes": f"{after / before:.3f} (target <= 1.1)",
            "growth MB/100 pushes": round(growth, 1),
        }

    def delta_cpu(self, r: Result) -> None:
        """Server CPU per push: one backend's endpoints change vs all of them, with the compile shown apart.

        The xDS share of a push is the CPU of the event-loop and grpc threads (state machines, framing, socket
        writes, ACK handling) minus that of a no-op push (a write that compiles to the same snapshot); the
        compile runs in a worker thread ("other"). Delta should send 1 resource per stream for "one" and N for
        "all"; SotW sends all N CLAs per stream in both.
        """
        grow = max(0, self.args.cpu_backends - len(self.policy.ports))
        if grow:
            base = self.baseline()
            self.policy.ports += [8080] * grow
            self.policy.write_base()
            self.policy.write_gateway()
            out = self.await_change(base, ["cds", "eds", "rds"])
            assert out["converged"], f"fleet did not converge after growing to {self.args.cpu_backends} backends"
        n = len(self.policy.ports)
        noop = self._cpu_per_push(lambda rep: self.policy.write_base(comment=f"no-op {rep}"), labels=[])
        one = self._cpu_per_push(lambda rep: self._set_ports([0], 8100 + rep), labels=["eds"])
        every = self._cpu_per_push(lambda rep: self._set_ports(range(n), 8200 + rep), ["eds"])
        figures: dict[str, Any] = {"backends": n, "pushes_each": CPU_REPS}
        for name, push in (("noop", noop), ("one", one), ("all", every)):
            figures[f"{name}: srv/xds/compile s"] = "/".join(f"{push[k]:.3f}" for k in ("total", "xds", "other"))
            if push["ms"]:
                figures[f"{name}: all ACKed ms"] = round(push["ms"])
        fan_one, fan_all = one["xds"] - noop["xds"], every["xds"] - noop["xds"]
        figures["xds cpu per push one/all s"] = f"{fan_one:.3f}/{fan_all:.3f}"
        figures["one/all"] = round(fan_one / fan_all, 3) if fan_all > 0 else None
        r.ok = bool(one["ms"] and every["ms"])
        r.figures = figures

    def _compiled_since(self, count: float) -> bool:
        return self.compile_s()[0] > count

    def _set_ports(self, which: Any, port: int) -> float:
        for b in which:
            self.policy.ports[b] = port
        return self.policy.write_base()

    def _cpu_per_push(self, write: Callable[[int], float], labels: list[str]) -> dict[str, float]:
        """Means over CPU_REPS pushes of one kind: server CPU (total, xds = loop+grpc, other), ms to all ACKed.

        With no labels (a write that compiles to the same snapshot) the push ends when the compile is counted.
        """
        sums = {"total": 0.0, "xds": 0.0, "other": 0.0}
        waits: list[float] = []
        for rep in range(CPU_REPS):
            base = self.baseline()
            count0 = self.compile_s()[0]
            split0 = thread_cpu_s(self.server_pid)
            written = write(rep)
            if labels:
                out = self.await_change(base, labels)
                assert out["converged"], f"no convergence on {labels}"
                waits.append(max(t[labels[0]] for t in out["times"].values()) - written)
            poll_until(partial(self._compiled_since, count0), self.timeout, message="compile counted")
            split = {k: v - split0[k] for k, v in thread_cpu_s(self.server_pid).items()}
            sums["total"] += sum(split.values())
            sums["xds"] += split["loop"] + split["grpc"]
            sums["other"] += split["other"]
        means = {k: v / CPU_REPS for k, v in sums.items()}
        means["ms"] = statistics.mean(waits) * 1000 if waits else 0.0
        return means

    # -- server bookkeeping

    def _nacks(self) -> float:
        """controlplane_xds_nacks_total summed over its labels."""
        lines = self.cp.metrics().splitlines()
        return sum(
            float(line.rpartition(" ")[2])
            for line in lines
            if line.partition("{")[0].partition(" ")[0] == "controlplane_xds_nacks_total"
        )

    def _nack_status(self) -> str:
        """The server's ``last_nack`` for the NACKing proxy, "" while it has none."""
        proxies = self.cp.status("?node=fleet-00000").get("proxies") or []
        last = proxies[0].get("last_nack") if proxies else None
        return str(last) if last else ""

    def consistency(self) -> str:
        """Delta: streams whose held digest equals the server's last system_version_info, per type."""
        replies = self.fleet.all("consistency", 30)
        parts = []
        for label in ORDER:
            total = sum(x["total"].get(label, 0) for x in replies)
            if total:
                parts.append(f"{label} {sum(x['equal'].get(label, 0) for x in replies)}/{total}")
        return " ".join(parts)

    def run(self, scenarios: list[str]) -> list[Result]:
        self.idle_rss = rss_kb(self.server_pid)
        bodies: dict[str, Callable[[Result], None]] = {
            "connect": self.connect, "steady": self.steady, "policy": self.policy_commit, "swap": self.swap,
            "burst": self.burst, "churn": self.churn, "nack": self.nack, "soak": self.soak,
            "delta-cpu": self.delta_cpu,
        }  # fmt: skip
        results = []
        for name in ["connect", *[s for s in SCENARIOS[1:] if s in scenarios]]:
            result = self.measured(name, bodies[name])
            if name == "connect":
                result.rss_before = self.idle_rss
                per = (result.rss_after - self.idle_rss) / max(1, self.args.streams)
                result.figures["rss_kb_per_stream"] = round(per, 1)
            results.append(result)
            print(format_result(result), flush=True)
            if name == "connect" and not result.ok and self.args.streams > 0:
                break  # nothing else means anything without a connected fleet
        if self.args.mode == "delta":
            print(f"delta consistency (held digest == server system_version_info): {self.consistency()}")
        return results


def received_per_stream(before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]) -> dict[str, str]:
    """Per type, the KB of responses each stream received between two readings, as "p50/max" over the streams
    (what one change costs each Envoy on the wire); types nobody received are left out."""
    figures = {}
    for label in [*ORDER, *sorted({k for b in after.values() for k in b} - set(ORDER))]:
        kb = [(b.get(label, 0) - before.get(i, {}).get(label, 0)) / 1024 for i, b in after.items()]
        if any(kb):
            figures[label] = f"{pct(kb, 0.5):.1f}/{max(kb):.1f}"
    return figures


def format_result(r: Result) -> str:
    figures = "  ".join(f"{k}={v}" for k, v in r.figures.items())
    return (
        f"{r.scenario:<9} {'ok' if r.ok else 'FAIL':<4} wall={r.wall:6.1f}s srv_cpu={r.server_cpu:6.2f}s "
        f"({'/'.join(f'{v:.2f}' for v in r.server_split.values())} loop/grpc/other) "
        f"cli_cpu={r.client_cpu:6.2f}s rss {r.rss_before / 1024:6.1f}->{r.rss_after / 1024:6.1f} MB  "
        f"pushed={','.join(f'{k}:{v:.0f}' for k, v in sorted(r.pushes.items())) or '0'}  {figures}"
    )


def targets(results: list[Result], streams: int) -> list[str]:
    lines = []
    for r in results:
        if r.scenario == "connect" and "rss_kb_per_stream" in r.figures:
            per = r.figures["rss_kb_per_stream"]
            lines.append(f"RSS per stream {per} KB (target <= 100 KB): {'met' if per <= 100 else 'NOT met'}")
        if r.scenario == "policy" and r.figures.get("all_ms") is not None:
            goal = 300 if streams <= 1000 else 2000
            for key, origin in (("all_ms", "the file write, incl. the watcher's 100 ms quiet period"),
                                ("all_from_publication_ms", "the snapshot's publication")):  # fmt: skip
                everyone = r.figures[key]
                lines.append(
                    f"policy commit ACKed by all {streams} streams, p99 over {r.figures['commits']} commits: "
                    f"{everyone} ms from {origin} (target: {goal} ms): {'met' if everyone <= goal else 'NOT met'}"
                )
    return lines


def collector_summary(metrics: str) -> str:
    """The server's scheduled garbage collections (controlplane/runtime/gc_control.py): how many, and their pauses."""
    found = {
        (name, kind): float(value)
        for name, kind, value in re.findall(
            r'^controlplane_gc_collection_seconds_(count|sum){kind="(\w+)"} (\S+)$', metrics, re.MULTILINE
        )
    }
    kinds = sorted({kind for _, kind in found})
    parts = [
        f"{found['count', k]:.0f} {k}, mean pause {found['sum', k] / found['count', k] * 1e3:.0f} ms"
        for k in kinds
        if found.get(("count", k))
    ]
    return "scheduled garbage collections: " + ("; ".join(parts) or "none")


def server_log_summary(path: Path) -> str:
    """WARNING/ERROR lines of the server log, grouped: a stream failure on the server shows up here."""
    if not path.exists():
        return "server log: none"
    lines = [x for x in path.read_text(errors="replace").splitlines() if "WARNING" in x or "ERROR" in x]
    groups = Counter(re.sub(r"\d+", "N", x.partition("WARNING")[2] or x.partition("ERROR")[2])[:160] for x in lines)
    shown = "; ".join(f"{n}x {text.strip()}" for text, n in groups.most_common(3))
    return f"server log: {len(lines)} warning/error lines" + (f": {shown}" if shown else "")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--scenario", default="all", help=f"all or a comma list of {','.join(SCENARIOS)}")
    parser.add_argument("--mode", choices=["sotw", "delta"], default="sotw", help="ADS wire protocol")
    parser.add_argument("--pushes", type=int, default=1000, help="policy commits in the soak")
    parser.add_argument("--commits", type=int, default=10, help="policy commits measured one at a time (policy)")
    parser.add_argument("--cpu-backends", type=int, default=1000, help="backends during delta-cpu")
    parser.add_argument("--per-channel", type=int, default=1, help="streams multiplexed per channel (1 = Envoy)")
    parser.add_argument("--wave", type=int, default=100, help="channels opened at once per worker")
    parser.add_argument(
        "--inflight", type=int, default=250, help="streams starting at once per worker (0: unbounded, in waves)"
    )
    parser.add_argument("--read-timeout", type=float, default=0.0, help="startup watchdog (0: streams/100, >=20 s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--server-args", default="", help="more `controlplane serve` options, space-separated")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    scenarios = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (e.g. from `timeout`) must unwind through the finally below, which stops server and workers.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    raise_nofile()  # inherited by the server process: it holds one socket per stream
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        directory = Path(tmp) / "policy"
        directory.mkdir()
        policy = Policy(directory, args.backends)
        policy.write_all()
        extra = ("--no-exchange", "--state-dir", str(Path(tmp) / "state"), *args.server_args.split())
        log_path = Path(tmp) / "cp.log"
        cp = ControlPlaneProcess(directory, log_level="WARNING", extra_args=extra, log_path=log_path)
        fleet: Fleet | None = None
        try:
            cp.start()
            fleet = Fleet(args, f"{LOOPBACK}:{cp.xds_port}")
            sharing = "one channel (TCP connection) per stream" if args.per_channel <= 1 else (
                f"{args.per_channel} streams MULTIPLEXED per channel (distinct node ids; not one connection per Envoy)"
            )  # fmt: skip
            print(
                f"fleet: {args.streams} {args.mode} streams, {args.workers} workers, {args.backends} backends, "
                f"{sharing}",
                flush=True,
            )
            results = Sim(args, policy, cp, fleet).run(scenarios)
            for line in targets(results, args.streams):
                print(line)
            print(collector_summary(cp.metrics()))
            return results
        finally:
            if fleet is not None:
                fleet.close()
            cp.stop()
            print(server_log_summary(log_path), flush=True)


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(r.ok for r in outcome) else 1)
