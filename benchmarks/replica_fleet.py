"""Replicas against one server: 2 replicas x N/2 simulated Envoys vs 1 replica x N, in the same run.

Method: one generated policy directory (fleet_sim.Policy: an Issuer, BACKENDS EDS backends with a Role and a
Binding each, one gateway). Phase 1 runs one `controlplane serve` with N simulated Envoys (fleet_client.py, one
TCP connection per stream, Envoy's startup sequence, every response ACKed); phase 2 runs two `serve` processes
on the same directory (own state directories, `--store file`: identical inputs are all replicas need to serve
identical versions) with N/2 streams each. Each phase makes --commits policy commits one at a time (one
Binding's subject changes, so only RDS changes): convergence is from the file write until every stream of the
fleet, on whichever replica, ACKed the new route configuration; server CPU is utime+stime of the replica
processes from the write until their push counters stop moving (summed, and the busiest replica's share).
Both replicas must name the new version the same (checked: a stream of each replica's fleet holds the same
version as a stream of the other's), which is what lets an Envoy move between them with nothing re-sent.

    python benchmarks/replica_fleet.py --streams 5000 --workers 4 --commits 5 --mode sotw|delta
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fleet_client import raise_nofile  # noqa: E402
from fleet_sim import Fleet, Policy, cpu_s, spread  # noqa: E402

from tests.support.controlplane import ControlPlaneProcess  # noqa: E402
from tests.support.ports import LOOPBACK  # noqa: E402

SETTLE_S = 3.0  # at most this long for the push counters to stop moving after the last ACK


def _pushes(replica: ControlPlaneProcess) -> float:
    found = re.findall(r'^controlplane_xds_pushes_total{type="\w+"} (\S+)$', replica.metrics(), re.MULTILINE)
    return sum(float(n) for n in found)


def _settled(replicas: list[ControlPlaneProcess]) -> None:
    """Until no replica's push counter moved for 0.1 s: a response counts once its write completed."""
    deadline = time.monotonic() + SETTLE_S
    last = [_pushes(r) for r in replicas]
    while time.monotonic() < deadline:
        time.sleep(0.1)  # the poll interval, bounded by the deadline
        now = [_pushes(r) for r in replicas]
        if now == last:
            return
        last = now


def _reply_all(fleets: list[Fleet], name: str, wait: float, **kwargs: Any) -> list[Any]:
    """One command to every worker of every fleet at once, then all answers: the fleets run concurrently."""
    for fleet in fleets:
        for conn in fleet.conns:
            conn.send((name, kwargs))
    return [Fleet._reply(conn, wait) for fleet in fleets for conn in fleet.conns]


def _pid(replica: ControlPlaneProcess) -> int:
    assert replica._proc is not None
    return replica._proc.pid


class Phase:
    """`replicas` servers on the policy, each with its share of the streams, started and stopped together."""

    def __init__(self, args: argparse.Namespace, policy: Policy, root: Path, replicas: int) -> None:
        self.args, self.policy, self.root, self.count = args, policy, root, replicas
        self.timeout = max(30.0, args.streams / 50)
        self.workers = max(1, args.workers // replicas)  # the same client processes in all, whatever the split

    def run(self) -> dict[str, Any]:
        with ExitStack() as running:
            replicas = [
                running.enter_context(
                    ControlPlaneProcess(
                        self.policy.dir,
                        log_level="WARNING",
                        extra_args=("--no-exchange", "--state-dir", str(self.root / f"state-{self.count}-{i}")),
                        log_path=self.root / f"cp-{self.count}-{i}.log",
                    )
                )
                for i in range(self.count)
            ]
            versions = {str(r.status()["policy"]["snapshot_versions"]) for r in replicas}
            assert len(versions) == 1, f"replicas disagree on the versions: {versions}"
            fleets: list[Fleet] = []
            running.callback(lambda: [fleet.close() for fleet in fleets])
            share = argparse.Namespace(
                **{**vars(self.args), "streams": self.args.streams // self.count, "workers": self.workers}
            )
            fleets += [Fleet(share, f"{LOOPBACK}:{r.xds_port}") for r in replicas]
            started = time.monotonic()
            connected = _reply_all(fleets, "connect", self.timeout + 120, timeout=self.timeout)
            assert all(x["converged"] for x in connected), "not every stream completed its startup"
            result: dict[str, Any] = {"connect_s": round(time.monotonic() - started, 1)}
            return result | self._commits(replicas, fleets)

    def _commits(self, replicas: list[ControlPlaneProcess], fleets: list[Fleet]) -> dict[str, Any]:
        converged, cpu, busiest, acked = [], [], [], []
        for _ in range(self.args.commits):
            base = dict(fleets[0].one(min(fleets[0].owner), "versions"))
            before = [cpu_s(_pid(r)) for r in replicas]
            self.policy.team += 1
            written = self.policy.write_team()
            replies = _reply_all(
                fleets, "await_change", self.timeout + 5, baseline=base, labels=["rds"], timeout=self.timeout,
                exclude=[], sample=0,
            )  # fmt: skip
            _settled(replicas)
            spent = [cpu_s(_pid(r)) - b for r, b in zip(replicas, before, strict=True)]
            times = [t["rds"] for r in replies for t in r["ack_times"].values() if t.get("rds") is not None]
            held = {str(r["versions"].get("rds")) for r in replies}
            assert len(held) == 1, f"streams of different replicas hold different route versions: {held}"
            acked.append(len(times))
            if times:
                converged.append((max(times) - written) * 1000)
            cpu.append(sum(spent))
            busiest.append(max(spent))
        return {
            "acked": f"{min(acked)}/{self.args.streams}",
            "converged_ms p50/p99/max": spread(converged),
            "server_cpu_s_per_commit": round(statistics.median(cpu), 2),
            "busiest_replica_cpu_s_per_commit": round(statistics.median(busiest), 2),
        }


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=5000, help="simulated Envoys in all, in each phase")
    parser.add_argument("--workers", type=int, default=4, help="client processes in all, shared by the replicas")
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--commits", type=int, default=5)
    parser.add_argument("--mode", choices=["sotw", "delta"], default="sotw")
    parser.add_argument("--inflight", type=int, default=125, help="streams starting at once per worker")
    args = parser.parse_args(argv)
    args.per_channel, args.wave, args.read_timeout = 1, 100, max(20.0, args.streams / 100)
    return args


def main(argv: list[str] | None = None) -> dict[int, dict[str, Any]]:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_signal)  # `timeout` must unwind through the stops
    raise_nofile()
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="replica-fleet-") as tmp:
        root = Path(tmp)
        policy = Policy(root / "policy", args.backends)
        policy.dir.mkdir()
        policy.write_all()
        for replicas in (1, 2):
            results[replicas] = Phase(args, policy, root, replicas).run()
            print(f"{replicas} replica(s) x {args.streams // replicas}: {results[replicas]}", flush=True)
    print(f"\n{args.mode}, {args.streams} simulated Envoys, {args.commits} commits (median unless noted)")
    rows = [
        ("connect storm, all through startup (s)", "connect_s"),
        ("commit converged on every stream, from the write: p50/p99/max ms", "converged_ms p50/p99/max"),
        ("server CPU per commit, all replicas (s)", "server_cpu_s_per_commit"),
        ("server CPU per commit, busiest replica (s)", "busiest_replica_cpu_s_per_commit"),
        ("streams that ACKed (fewest in a commit)", "acked"),
    ]
    print(f"| | 1 replica x {args.streams} | 2 replicas x {args.streams // 2} |\n|---|---|---|")
    for label, key in rows:
        print(f"| {label} | {results[1][key]} | {results[2][key]} |")
    return results


if __name__ == "__main__":
    main()
