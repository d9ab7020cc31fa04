"""A policy commit as `serve` handles it: read the files, parse, validate, compile, build snapshots.

Method: a policy tree of YAML files is generated (an Issuer, a Gateway, and per backend one file holding the
Backend, a Role and BINDINGS Bindings with numeric project subjects), then loaded once by a `PolicyService`
(the object `serve` reloads on every change). Each measured commit rewrites ONE backend's file (a binding now
names another project) and times `reload()`, REPEAT times: files of other backends are not parsed again,
their documents and model objects are reused and the compiler's memo recompiles one virtual host. The baseline
is the same reload in a fresh `PolicyService` (nothing to reuse: what every commit cost before).

compile_scale.py measures the compiler alone on an in-memory model; this one adds YAML, validation and the
service's bookkeeping, which are most of a commit's cost. Python's garbage collector runs as `serve` runs it
(controlplane/runtime/gc_control.py: no automatic full collections).

    python benchmarks/policy_commit.py --backends 1000 --bindings 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from controlplane.runtime.gc_control import CollectorSchedule
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache

HEADER = (
    "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n---\n"
    "kind: Gateway\nname: edge\nlisten: {{address: 127.0.0.1, port: 10000}}\nbackends: [{names}]\n"
)


def backend_file(b: int, bindings: int, generation: int = 0) -> str:
    name = f"svc-{b:04d}"
    text = (
        f"kind: Backend\nname: {name}\nhosts: [{name}.internal]\n"
        f"endpoints: [{{address: 10.{b // 250}.{b % 250}.10, port: 8080}}]\n---\n"
        f"kind: Role\nname: {name}-read\nbackend: {name}\nrules: [{{methods: [GET, HEAD], paths: ['/**']}}]\n---\n"
    )
    for i in range(bindings):
        project = 100_000 + b * bindings + i + (generation * 7 if i == 0 else 0)
        text += (
            f"kind: Binding\nname: {name}-b{i:02d}\nroles: [{name}-read]\n"
            f"subjects: [{{project: {project}, ref_protected: true}}]\n---\n"
        )
    return text


def write_tree(root: Path, backends: int, bindings: int) -> None:
    names = ", ".join(f"svc-{b:04d}" for b in range(backends))
    (root / "base.yaml").write_text(HEADER.format(names=names))
    for b in range(backends):
        (root / f"svc-{b:04d}.yaml").write_text(backend_file(b, bindings))


def timed(reload: Callable[[], bool]) -> float:
    started = time.perf_counter()
    if not reload():
        raise SystemExit("the generated policy was rejected")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--bindings", type=int, default=10, help="bindings per backend")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--baseline-repeat", type=int, default=3)
    args = parser.parse_args()
    collector = CollectorSchedule()  # as serve runs: no automatic full collections (gc_control.py)
    collector.start()
    with tempfile.TemporaryDirectory(prefix="policy-commit-") as tmp:
        root = Path(tmp)
        write_tree(root, args.backends, args.bindings)
        service = PolicyService(root, SnapshotCache())
        first = timed(service.reload)
        commits = []
        for generation in range(1, args.repeat + 1):
            b = generation * 37 % args.backends
            (root / f"svc-{b:04d}.yaml").write_text(backend_file(b, args.bindings, generation))
            commits.append(timed(service.reload))
        cold = [timed(PolicyService(root, SnapshotCache()).reload) for _ in range(args.baseline_repeat)]
    collector.stop()
    total = args.backends * args.bindings
    print(f"policy commit, {args.backends} backends, {total} bindings, {args.backends + 1} files:")
    print(f"  first load: {first * 1e3:.0f} ms")
    print(
        f"  one-binding commit (what serve does): median {statistics.median(commits) * 1e3:.1f} ms, "
        f"max {max(commits) * 1e3:.1f} ms (n={len(commits)})"
    )
    print(
        f"  baseline, the same reload with nothing to reuse: median {statistics.median(cold) * 1e3:.0f} ms "
        f"({statistics.median(cold) / statistics.median(commits):.0f}x slower, n={len(cold)})"
    )


if __name__ == "__main__":
    main()
