"""controlplane next to sovereign: one fleet of real Envoys kept up to date by each, in the same run.

Why: issue #5 asks what our push design (ADS over gRPC, snapshots built once per change) costs and gains next
to a Python peer that serves REST xDS. sovereign (PyPI ``sovereign``, pinned below) renders its templates on
every Envoy poll, so its convergence is bounded by the poll period and its CPU grows with fleet size x poll rate.

Method (printed again after the table):
- The same content for both: BACKENDS clusters (one endpoint each, 2 s connect timeout) plus one "extra"
  cluster that every change replaces (``extra-<n>``, new endpoint port), and one listener whose HTTP connection
  manager routes each backend's host to its cluster over RDS. controlplane gets it as a policy directory (the
  backends, a Gateway; a change is an atomic replace of the gateway file, which the server watches) and adds
  jwt_authn and RBAC; sovereign gets it as a JSON file in its template context (refreshed every second, its
  minimum) rendered by the Python templates in ``benchmarks/sovereign/``; a change is an atomic replace.
  sovereign's clusters carry their endpoints inline (STATIC): EDS over REST is one polled subscription per
  cluster per Envoy.
- The fleets: ENVOYS real Envoy 1.40 processes per side, one side after the other (never concurrently). Ours
  over ADS (``render_bootstrap``, as ``controlplane bootstrap``); sovereign's with LDS, CDS and RDS over REST
  (``api_type: REST``, ``refresh_delay`` below; Envoy adds up to one more period of jitter).
- A change counts as held by an Envoy once its admin ``/config_dump`` shows exactly the new extra cluster
  active (the previous one gone) and its route configuration routing to it; each Envoy is polled with a
  deadline, every max(25 ms, 10 % of the time waited). Latency is from the file replace; a change's
  convergence is the time until every Envoy holds it. Changes are paced every INTERVAL seconds so both sides
  are measured over a window of the same length.
- CPU: utime+stime (+ reaped children) from /proc/<pid>/stat summed over each server's process tree (sovereign
  runs as gunicorn master + uvicorn workers) over that window. Memory: VmRSS summed over the tree, sampled
  every 200 ms (peak), and PSS (shared pages split between processes, fairer for forked workers). Then IDLE
  seconds with no change and no probe: what merely keeping the fleet connected costs the server and the Envoys.

    .venv/bin/python benchmarks/sovereign_compare.py [--envoys 20] [--changes 20] [--backends 100] [--api sotw]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.cli.bootstrap import render_bootstrap  # noqa: E402
from tests.support.backends import http_request  # noqa: E402
from tests.support.controlplane import ControlPlaneProcess  # noqa: E402
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.ports import LOOPBACK, free_port, poll_until  # noqa: E402

SOVEREIGN_VERSION = "0.32.12"
SOVEREIGN_VENV = ROOT / ".bench" / "sovereign-venv"
TEMPLATES = ROOT / "benchmarks" / "sovereign"
GROUP = "fleet"
ROUTE_CONFIG = f"gateway-{GROUP}"  # controlplane's name for a gateway's listener and routes; sovereign mirrors it
SOVEREIGN_CLUSTER = "sovereign"
CONTEXT_REFRESH_S = 1  # sovereign's template-context refresh: whole seconds, so 1 is its fastest
# Each admin poll costs the Envoy ~1 ms of CPU on a 2-core box shared with the server under test, so the poll
# interval grows with the time already waited: max(25 ms, 10 % of it), at most 250 ms (a bounded relative error).
PROBE_MIN_S, PROBE_RELATIVE, PROBE_MAX_S = 0.025, 0.10, 0.25
MEMORY_SAMPLE_S = 0.2
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- fleet content


@dataclass(frozen=True)
class Backend:
    name: str
    host: str
    address: str
    port: int


def fleet_backends(count: int, generation: int) -> list[Backend]:
    """The fixed backends plus the one extra backend a change replaces (new name, new endpoint port)."""
    fixed = [
        Backend(f"svc-{b:04d}", f"svc-{b:04d}.internal", f"10.{b // 250}.{b % 250}.10", 8080) for b in range(count)
    ]
    extra = Backend(f"extra-{generation}", f"extra-{generation}.internal", "10.255.0.10", 9000 + generation)
    return [*fixed, extra]


def replace_file(path: Path, text: str) -> float:
    """Write next to the target (a hidden name, which both servers ignore) and rename over it: the reader sees
    the old or the new file, never half of one. Returns the monotonic time of the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    written = time.monotonic()
    tmp.replace(path)
    return written


# ------------------------------------------------------------------------------------ process-tree accounting


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces): [0] is field 3 (state)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    """The root and every descendant, from the ppid in /proc/*/stat (gunicorn workers, anything a server forks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_cpu_s(root: int) -> float:
    """utime+stime of every live process in the tree, plus cutime+cstime (children already reaped)."""
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError):
            fields = _stat(pid)
            total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / TICKS


def _status_kb(path: Path, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def tree_memory_kb(root: int) -> tuple[int, int]:
    """(VmRSS, PSS) summed over the tree. RSS counts pages shared by forked workers once per worker; PSS splits
    them, so the PSS sum is the tree's real footprint."""
    pids = process_tree(root)
    rss = sum(_status_kb(Path(f"/proc/{pid}/status"), "VmRSS:") for pid in pids)
    pss = sum(_status_kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss:") for pid in pids)
    return rss, pss


class MemorySampler:
    """Peak tree RSS/PSS over a window: a config change can allocate and free between two end-point readings."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            rss, pss = tree_memory_kb(self.root)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            if self._stop.wait(MEMORY_SAMPLE_S):  # the sampling period, not a synchronisation
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far of the server tree, the Envoy fleet, this process (the probes) and the whole machine:
    the difference between two snapshots shows what else ran, i.e. how noisy the latency figures are."""

    server: float
    fleet: float
    probe: float
    machine: float

    @classmethod
    def take(cls, root: int, envoy_pids: list[int]) -> CpuSnapshot:
        own = os.times()
        busy = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in busy[:8])
        return cls(
            server=tree_cpu_s(root),
            fleet=sum(tree_cpu_s(pid) for pid in envoy_pids),
            probe=own.user + own.system,
            machine=(user + nice + system + irq + softirq + steal) / TICKS,
        )


# ------------------------------------------------------------------------------------------ the two servers


class Server(Protocol):
    """One control plane under test: started, pointed at by a fleet, changed, stopped."""

    label: str
    transport: str

    def start(self) -> None: ...
    def root_pid(self) -> int: ...
    def bootstrap(self, index: int) -> dict[str, Any]: ...
    def apply(self, generation: int) -> float: ...
    def stop(self) -> None: ...


class ControlPlaneServer:
    """``python -m controlplane serve`` on a policy directory, exactly as tests and fleet_sim run it."""

    label = "controlplane"

    def __init__(self, workdir: Path, backends: int, listen_port: int, api: str) -> None:
        self.policy = workdir / "policy"
        self.backends, self.listen_port, self.api = backends, listen_port, api
        self.transport = f"ADS gRPC {'Delta' if api == 'delta' else 'SotW'}, push"
        self.process = ControlPlaneProcess(
            self.policy,
            log_level="WARNING",
            extra_args=("--no-exchange", "--state-dir", str(workdir / "state")),
            log_path=workdir / "controlplane.log",
        )

    def start(self) -> None:
        self.policy.mkdir(parents=True)
        text = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n---\n"
        text += "".join(_backend_yaml(b) for b in fleet_backends(self.backends, 0)[:-1])
        (self.policy / "base.yaml").write_text(text)
        self.apply(0)
        self.process.start(timeout=60)

    def root_pid(self) -> int:
        if self.process._proc is None:
            raise RuntimeError("controlplane is not running")
        return self.process._proc.pid

    def bootstrap(self, index: int) -> dict[str, Any]:
        return render_bootstrap(
            group=GROUP, node_id=f"cp-{index:03d}", xds_host=LOOPBACK, xds_port=self.process.xds_port,
            admin_port=0, api=self.api,
        )  # fmt: skip

    def apply(self, generation: int) -> float:
        """The changing part: the extra backend and the Gateway that lists it (CDS, EDS and RDS change)."""
        backends = fleet_backends(self.backends, generation)
        text = _backend_yaml(backends[-1])
        text += f"kind: Gateway\nname: {GROUP}\nlisten: {{address: {LOOPBACK}, port: {self.listen_port}}}\n"
        text += f"backends: [{', '.join(b.name for b in backends)}]\naccess_log: /dev/null\n"
        return replace_file(self.policy / "gateway.yaml", text)

    def stop(self) -> None:
        self.process.stop()


def _backend_yaml(backend: Backend) -> str:
    return (
        f"kind: Backend\nname: {backend.name}\nhosts: [{backend.host}]\n"
        f"endpoints: [{{address: {backend.address}, port: {backend.port}}}]\n---\n"
    )


def ensure_sovereign() -> Path:
    """sovereign in its own venv (``.bench/sovereign-venv``), created on first run, so it never touches .venv."""
    python = SOVEREIGN_VENV / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('sovereign'))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == SOVEREIGN_VERSION:
        return SOVEREIGN_VENV / "bin" / "sovereign"
    print(f"installing sovereign=={SOVEREIGN_VERSION} into {SOVEREIGN_VENV.relative_to(ROOT)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(SOVEREIGN_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"sovereign=={SOVEREIGN_VERSION}"], check=True)
    return SOVEREIGN_VENV / "bin" / "sovereign"


class SovereignServer:
    """sovereign as it ships: its ``sovereign`` entry point (gunicorn + uvicorn workers), its own process group."""

    label = "sovereign"

    def __init__(self, workdir: Path, backends: int, listen_port: int, refresh_delay: float, workers: int | None):
        self.workdir, self.backends, self.listen_port = workdir, backends, listen_port
        self.refresh_delay, self.workers = refresh_delay, workers
        self.port = free_port()
        self.context = workdir / "fleet.json"
        self.transport = f"REST, poll {refresh_delay:g}-{2 * refresh_delay:g} s"
        self._proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        """sovereign's v2 config: one Python template per xDS type, the fleet JSON as refreshed context."""
        templates = "".join(
            f"    - type: {kind}\n      spec: {{protocol: python, serialization: raw, path: {TEMPLATES / kind}.py}}\n"
            for kind in ("clusters", "routes", "listeners")
        )
        return (
            f"templates:\n  default:\n{templates}"
            f"template_context:\n  refresh_rate: {CONTEXT_REFRESH_S}\n  context:\n"
            f"    fleet: {{protocol: file, serialization: json, path: {self.context}}}\n"
        )

    def start(self) -> None:
        executable = ensure_sovereign()
        self.apply(0)
        (self.workdir / "sovereign.yaml").write_text(self._config())
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(
            SOVEREIGN_CONFIG=f"file://{self.workdir / 'sovereign.yaml'}",
            SOVEREIGN_HOST=LOOPBACK,
            SOVEREIGN_PORT=str(self.port),
            SOVEREIGN_ENABLE_ACCESS_LOGS="false",  # one JSON line per poll; controlplane logs at WARNING here
        )
        if self.workers is not None:
            env["SOVEREIGN_WORKERS"] = str(self.workers)
        with (self.workdir / "sovereign.log").open("wb") as log:
            # cwd: pydantic-settings reads ./.env; a new session: the whole gunicorn tree is stopped as a group.
            self._proc = subprocess.Popen(
                [str(executable)], cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        poll_until(self._healthy, 60, interval=0.05, message="sovereign /healthcheck")

    def _healthy(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            log = (self.workdir / "sovereign.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"sovereign exited early:\n{log}")
        with contextlib.suppress(OSError):
            return http_request(f"http://{LOOPBACK}:{self.port}/healthcheck", timeout=1.0).status == 200
        return False

    def root_pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("sovereign is not running")
        return self._proc.pid

    def bootstrap(self, index: int) -> dict[str, Any]:
        """The same bootstrap as ours (node, admin, runtime, overload manager), with LDS/CDS over REST instead
        of ADS, and a static cluster for sovereign instead of the gRPC ``xds_cluster``."""
        bootstrap = render_bootstrap(
            group=GROUP, node_id=f"sov-{index:03d}", xds_host=LOOPBACK, xds_port=self.port, admin_port=0
        )
        rest = {"resource_api_version": "V3", "api_config_source": self.rest_source()}
        bootstrap["dynamic_resources"] = {"lds_config": rest, "cds_config": rest}
        address = {"socket_address": {"address": LOOPBACK, "port_value": self.port}}
        endpoints = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
        cluster = {"name": SOVEREIGN_CLUSTER, "type": "STATIC", "connect_timeout": "1s"}
        cluster["load_assignment"] = {"cluster_name": SOVEREIGN_CLUSTER, "endpoints": endpoints}
        bootstrap["static_resources"] = {"clusters": [cluster]}
        return bootstrap

    def rest_source(self) -> dict[str, Any]:
        return {
            "api_type": "REST", "transport_api_version": "V3", "cluster_names": [SOVEREIGN_CLUSTER],
            "refresh_delay": f"{self.refresh_delay:g}s", "request_timeout": "5s",
        }  # fmt: skip

    def apply(self, generation: int) -> float:
        """The whole context file: listener parameters and the backend list (the extra one replaced)."""
        fleet = {
            "group": GROUP,
            "route_config": ROUTE_CONFIG,
            "xds_cluster": SOVEREIGN_CLUSTER,
            "refresh_delay": f"{self.refresh_delay:g}s",
            "listen_address": LOOPBACK,
            "listen_port": self.listen_port,
            "backends": [vars(b) for b in fleet_backends(self.backends, generation)],
        }
        return replace_file(self.context, json.dumps(fleet, indent=1))

    def stop(self) -> None:
        """SIGTERM to the group (gunicorn stops its workers), SIGKILL to whatever is left after 10 s."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived its master


# ------------------------------------------------------------------------------------------------ the fleet


@contextlib.contextmanager
def envoy_fleet(server: Server, count: int) -> Iterator[list[EnvoyProcess]]:
    """COUNT real Envoys bootstrapped at SERVER, all started before any is awaited; always all stopped."""
    envoys: list[EnvoyProcess] = []
    try:
        for index in range(count):
            envoy = EnvoyProcess(
                server.bootstrap(index), name=f"{server.label}-envoy-{index:03d}", wait_ready=False, ready_timeout=90
            )
            envoys.append(envoy)
            envoy.start()
        for envoy in envoys:
            envoy.wait_ready()
        yield envoys
    finally:
        for envoy in envoys:
            envoy.stop()


def _get_json(conn: http.client.HTTPConnection, path: str) -> Any:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path} -> {response.status}: {body[:300]!r}")
    return json.loads(body) if body.strip() else {}


def holds(conn: http.client.HTTPConnection, generation: int) -> bool:
    """Does this Envoy serve generation GENERATION: its only extra cluster active is the new one (the old one
    removed) and its route configuration routes to it? The cheap cluster check runs first; the route dump
    (large) only once the clusters are right."""
    want = f"backend-extra-{generation}"
    clusters = _get_json(conn, "/config_dump?resource=dynamic_active_clusters&name_regex=" + quote("backend-extra-.*"))
    if {c["cluster"]["name"] for c in clusters.get("configs", [])} != {want}:
        return False
    routes = _get_json(conn, "/config_dump?resource=dynamic_route_configs&name_regex=" + quote(ROUTE_CONFIG))
    targets = {
        route.get("route", {}).get("cluster", "")
        for config in routes.get("configs", [])
        for host in config.get("route_config", {}).get("virtual_hosts", [])
        for route in host.get("routes", [])
    }
    return {t for t in targets if t.startswith("backend-extra-")} == {want}


def time_until_held(admin_url: str, generation: int, since: float, timeout: float) -> float | None:
    """Monotonic time of the first poll that found GENERATION held, or None once SINCE + TIMEOUT passed.
    One keep-alive admin connection per wait; the poll interval is max(25 ms, 10 % of the time waited)."""
    split = urlsplit(admin_url)
    conn = http.client.HTTPConnection(split.hostname or LOOPBACK, split.port, timeout=5)
    try:
        while True:
            asked = time.monotonic()
            try:
                if holds(conn, generation):
                    return asked
            except (OSError, http.client.HTTPException):
                conn.close()  # reconnects on the next request
            if asked - since >= timeout:
                return None
            interval = min(PROBE_MAX_S, max(PROBE_MIN_S, PROBE_RELATIVE * (asked - since)))
            time.sleep(min(interval, since + timeout - asked))  # the poll interval, bounded by the deadline
    finally:
        conn.close()


def fleet_stat(envoys: list[EnvoyProcess], pattern: str) -> int:
    """A stat summed over the fleet (Envoy's ``/stats?filter=`` regex)."""
    return sum(sum(e.stats(filter=pattern).values()) for e in envoys)


# ------------------------------------------------------------------------------------------------- one side

XDS_UPDATES = r"^(cluster_manager\.cds|listener_manager\.lds|http\..*\.rds\..*)\.update_attempt$"


@dataclass
class SideResult:
    label: str
    transport: str
    processes: int = 0
    startup_s: float = 0.0
    startup_cpu_s: float = 0.0
    window_s: float = 0.0
    cpu_s: float = 0.0
    fleet_cpu_s: float = 0.0
    probe_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # every other process on the machine during the window
    idle_cpu_s: float = 0.0
    idle_fleet_cpu_s: float = 0.0
    rss_peak_kb: int = 0
    pss_peak_kb: int = 0
    rss_end_kb: int = 0
    converge_s: list[float] = field(default_factory=list)  # per change: time until every Envoy held it
    per_proxy_s: list[float] = field(default_factory=list)  # every (change, Envoy) latency
    missed: int = 0  # (change, Envoy) pairs that did not hold the change by the deadline
    xds_updates: int = 0
    rejected: int = 0


def run_side(server: Server, args: argparse.Namespace) -> SideResult:
    """Start SERVER and its fleet, wait for the initial config everywhere, then apply CHANGES paced changes and
    measure; everything this starts is stopped before it returns."""
    result = SideResult(server.label, server.transport)
    launched = time.monotonic()
    try:
        server.start()
        root = server.root_pid()
        with envoy_fleet(server, args.envoys) as envoys, ThreadPoolExecutor(len(envoys)) as pool:

            def await_generation(generation: int, since: float) -> list[float | None]:
                urls = [e.admin_url for e in envoys]
                return list(pool.map(lambda u: time_until_held(u, generation, since, args.deadline), urls))

            if None in await_generation(0, time.monotonic()):
                raise RuntimeError(f"{server.label}: the fleet never held the initial config")
            result.startup_s = time.monotonic() - launched
            result.startup_cpu_s = tree_cpu_s(root)
            result.processes = len(process_tree(root))
            updates0 = fleet_stat(envoys, XDS_UPDATES)
            load = Path("/proc/loadavg").read_text().split()[0]
            print(
                f"  {server.label}: {args.envoys} Envoys hold the initial config after {result.startup_s:.1f} s "
                f"(load average {load} on {os.cpu_count()} CPUs)"
            )
            measure_changes(server, args, root, [e.pid for e in envoys], await_generation, result)
            measure_idle(args.idle, root, [e.pid for e in envoys], result)
            result.xds_updates = fleet_stat(envoys, XDS_UPDATES) - updates0
            result.rejected = fleet_stat(envoys, r"update_rejected$")
    finally:
        server.stop()
    return result


def measure_changes(
    server: Server,
    args: argparse.Namespace,
    root: int,
    envoy_pids: list[int],
    await_generation: Callable[[int, float], list[float | None]],
    result: SideResult,
) -> None:
    """The measured window: change n is written at start + (n-1)·INTERVAL (pacing, so both sides are measured
    over the same wall time, idle polling included), then awaited on every Envoy with a deadline."""
    start = time.monotonic()
    cpu0 = CpuSnapshot.take(root, envoy_pids)
    with MemorySampler(root) as memory:
        for generation in range(1, args.changes + 1):
            time.sleep(max(0.0, start + (generation - 1) * args.interval - time.monotonic()))  # pacing, not a wait
            written = server.apply(generation)
            held = await_generation(generation, written)
            latencies = [t - written for t in held if t is not None]
            result.missed += len(held) - len(latencies)
            result.per_proxy_s += latencies
            if len(latencies) == len(held):
                result.converge_s.append(max(latencies))
            everyone = f"{max(latencies):6.3f} s" if len(latencies) == len(held) else "NOT converged"
            print(f"  {server.label:<12} change {generation:>3}: all {len(held)} Envoys hold it after {everyone}")
        time.sleep(max(0.0, start + args.changes * args.interval - time.monotonic()))  # pacing: equal windows
        cpu1 = CpuSnapshot.take(root, envoy_pids)
        result.window_s = time.monotonic() - start
    result.cpu_s, result.fleet_cpu_s = cpu1.server - cpu0.server, cpu1.fleet - cpu0.fleet
    result.probe_cpu_s = cpu1.probe - cpu0.probe
    result.other_cpu_s = max(0.0, cpu1.machine - cpu0.machine - result.cpu_s - result.fleet_cpu_s - result.probe_cpu_s)
    result.rss_peak_kb, result.pss_peak_kb = memory.peak_rss, memory.peak_pss
    result.rss_end_kb = tree_memory_kb(root)[0]


def measure_idle(seconds: float, root: int, envoy_pids: list[int], result: SideResult) -> None:
    """No change and no probe for SECONDS: the standing cost of a connected fleet (REST polls never stop)."""
    before = CpuSnapshot.take(root, envoy_pids)
    time.sleep(seconds)  # the measured period itself, not a synchronisation
    after = CpuSnapshot.take(root, envoy_pids)
    result.idle_cpu_s, result.idle_fleet_cpu_s = after.server - before.server, after.fleet - before.fleet


# ------------------------------------------------------------------------------------------------- reporting


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure printed is one that was measured)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] if ordered else float("nan")


def _ratio(ours: float, theirs: float) -> str:
    return f"{theirs / ours:.1f}x" if ours > 0 and theirs == theirs else "n/a"  # theirs == theirs: not NaN


def table(cp: SideResult, sov: SideResult, args: argparse.Namespace) -> str:
    def row(name: str, ours: float, theirs: float, fmt: str, ratio: bool = True) -> list[str]:
        return [name, format(ours, fmt), format(theirs, fmt), _ratio(ours, theirs) if ratio else ""]

    def conv(r: SideResult, q: float | None) -> float:
        values = r.converge_s
        return (max(values) if q is None else pct(values, q)) if values else float("nan")

    rows = [
        ["", "controlplane", "sovereign", "sovereign / controlplane"],
        ["transport", cp.transport, sov.transport, ""],
        ["processes (tree)", str(cp.processes), str(sov.processes), ""],
        row(f"CPU s over the window ({cp.window_s:.0f} s / {sov.window_s:.0f} s)", cp.cpu_s, sov.cpu_s, ".2f"),
        row("CPU ms per change (window CPU / changes)", cp.cpu_s * 1000 / args.changes,
            sov.cpu_s * 1000 / args.changes, ".0f"),
        row("Envoy fleet CPU s over the window (incl. probes)", cp.fleet_cpu_s, sov.fleet_cpu_s, ".2f"),
        row(f"idle {args.idle:g} s (no change, no probe): server CPU s", cp.idle_cpu_s, sov.idle_cpu_s, ".2f"),
        row(f"idle {args.idle:g} s: Envoy fleet CPU s", cp.idle_fleet_cpu_s, sov.idle_fleet_cpu_s, ".2f"),
        row("RSS peak MB (VmRSS summed over the tree)", cp.rss_peak_kb / 1024, sov.rss_peak_kb / 1024, ".1f"),
        row("PSS peak MB (shared pages split)", cp.pss_peak_kb / 1024, sov.pss_peak_kb / 1024, ".1f"),
        row("RSS at the end MB", cp.rss_end_kb / 1024, sov.rss_end_kb / 1024, ".1f"),
        row("convergence, all Envoys: median s", conv(cp, 0.5), conv(sov, 0.5), ".3f"),
        row("convergence, all Envoys: p90 s", conv(cp, 0.9), conv(sov, 0.9), ".3f"),
        row("convergence, all Envoys: max s", conv(cp, None), conv(sov, None), ".3f"),
        row("per Envoy: median s", pct(cp.per_proxy_s, 0.5), pct(sov.per_proxy_s, 0.5), ".3f"),
        ["changes converged everywhere", f"{len(cp.converge_s)}/{args.changes}",
         f"{len(sov.converge_s)}/{args.changes}", ""],
        ["(change, Envoy) pairs missed at the deadline", str(cp.missed), str(sov.missed), ""],
        ["xDS updates seen by the fleet (LDS+CDS+RDS)", str(cp.xds_updates), str(sov.xds_updates), ""],
        ["updates rejected by Envoys (all types)", str(cp.rejected), str(sov.rejected), ""],
        row("noise: probes' CPU s (this process)", cp.probe_cpu_s, sov.probe_cpu_s, ".2f", ratio=False),
        row("noise: other processes' CPU s, whole machine", cp.other_cpu_s, sov.other_cpu_s, ".2f", ratio=False),
        row("start + initial config on every Envoy, s", cp.startup_s, sov.startup_s, ".1f"),
        row("  CPU s for it (incl. interpreter start)", cp.startup_cpu_s, sov.startup_cpu_s, ".2f"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def method(args: argparse.Namespace, sov_workers: int) -> str:
    """The method as printed under the table: what ran, what was measured and how, and what differs."""
    workers = "its default, 2 x CPUs + 1" if args.sovereign_workers is None else "--sovereign-workers"
    bullets = [
        f"Same machine, same run, one side after the other (never concurrently): {args.envoys} real Envoy 1.40 "
        f"processes per side; {args.backends} backend clusters (1 endpoint each) + 1 extra cluster that every change "
        f"replaces (new name, new endpoint); one listener whose HTTP connection manager routes each backend's host "
        f"to its cluster over RDS. {args.changes} changes, one every {args.interval:g} s (pacing: both windows have "
        f"the same length); deadline {args.deadline:g} s per change.",
        f"controlplane: {args.api} ADS over gRPC, bootstrap from render_bootstrap (= `controlplane bootstrap`); "
        "clusters are EDS; the listener also carries jwt_authn + 2 RBAC filters and a gRPC access log, each virtual "
        "host identity headers and RBAC per-route config, so it pushes more config than sovereign serves. A change is "
        "an atomic replace of the policy's gateway file; the server watches the directory (its debounce is "
        "included).",
        f"sovereign {SOVEREIGN_VERSION} in its own venv (.bench/sovereign-venv), run by its `sovereign` entry point: "
        f"gunicorn + {sov_workers} uvicorn workers ({workers}); access logs off (controlplane runs at WARNING). "
        "Python templates in benchmarks/sovereign/ render the same clusters, route configuration and listener from "
        f"a JSON file loaded as template context, which each worker re-reads every {CONTEXT_REFRESH_S} s (its "
        "minimum); a change is an atomic replace of that file. Clusters are STATIC with the same endpoints inline: "
        "EDS over REST would be one polled subscription per cluster per Envoy.",
        "sovereign's Envoys poll LDS, CDS and RDS over REST (api_type REST) with refresh_delay "
        f"{args.refresh_delay:g} s (sovereign's tutorial bootstrap uses 5 s for CDS and 15 s for LDS; the default "
        "1 s here keeps polling from being made artificially slow). Envoy waits "
        "refresh_delay + random(0, refresh_delay) after each response, and each worker refreshes its context on its "
        "own clock, so sovereign's convergence is bounded by design by context refresh + up to 2 poll periods.",
        "Held: the Envoy's /config_dump shows exactly the new extra cluster active (the previous one removed) and "
        "its route configuration routing to it. Every Envoy is polled with a deadline, every "
        f"max({PROBE_MIN_S * 1000:.0f} ms, {PROBE_RELATIVE:.0%} of the time waited) up to {PROBE_MAX_S * 1000:.0f} ms "
        "(an admin config_dump costs Envoy CPU; the figures are the first poll that saw the change, so at most that "
        "late); latency runs from the file rename; a change's convergence is the time until every Envoy holds it.",
        "CPU: utime+stime (+ reaped children) from /proc/<pid>/stat summed over each server's process tree over the "
        "paced window (idle time between changes included: polling costs even when nothing changes). RSS: VmRSS "
        "summed over the tree (pages shared by forked workers count once per worker); PSS splits shared pages. "
        f"Peaks sampled every {MEMORY_SAMPLE_S * 1000:.0f} ms. Ratios are sovereign / controlplane.",
        f"Idle: then {args.idle:g} s with no change and no probe, CPU of the server and of the Envoys: what merely "
        "keeping the fleet connected costs (REST polls never stop; ADS streams are quiet).",
        "Noise: machine busy time (/proc/stat) over the window minus the server, the fleet and this process (whose "
        "CPU is the probes); well above zero means other work shared the CPUs and the latencies are inflated.",
    ]
    wrapped = (textwrap.fill(b, 116, initial_indent="- ", subsequent_indent="  ") for b in bullets)
    return "Method\n" + "\n".join(wrapped)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envoys", type=int, default=20, help="real Envoys per side")
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--api", choices=["sotw", "delta"], default="sotw", help="controlplane's ADS flavour")
    parser.add_argument("--refresh-delay", type=float, default=1.0, help="REST poll period of sovereign's Envoys")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between changes (pacing)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds measured with no change and no probe")
    parser.add_argument("--deadline", type=float, default=30.0, help="per change, for every Envoy to hold it")
    parser.add_argument("--sovereign-workers", type=int, default=None, help="default: sovereign's own (2 x CPUs + 1)")
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)  # unwind through every finally: servers and Envoys stop
    results: list[SideResult] = []
    with tempfile.TemporaryDirectory(prefix="sovereign-compare-") as tmp:
        servers: list[Callable[[Path], Server]] = [
            lambda d: ControlPlaneServer(d, args.backends, free_port(), args.api),
            lambda d: SovereignServer(d, args.backends, free_port(), args.refresh_delay, args.sovereign_workers),
        ]
        for make in servers:
            workdir = Path(tempfile.mkdtemp(dir=tmp))
            server = make(workdir)
            print(f"{server.label}: {server.transport}", flush=True)
            results.append(run_side(server, args))
    cp, sov = results
    shape = f"{args.envoys} Envoys per side, {args.backends} + 1 clusters"
    print(f"\n{shape}, {args.changes} changes, one every {args.interval:g} s")
    print(table(cp, sov, args))
    for r in (cp, sov):
        if r.other_cpu_s > 0.1 * r.window_s * (os.cpu_count() or 1):
            print(f"WARNING: other processes used {r.other_cpu_s:.0f} CPU s during {r.label}'s window: noisy latencies")
    print()
    print(method(args, sov.processes - 1))
    return 0 if len(cp.converge_s) == len(sov.converge_s) == args.changes else 1


if __name__ == "__main__":
    sys.exit(main())
