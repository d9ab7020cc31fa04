"""Compile + serialize at scale: 1,000 backends and 10,000 bindings, then a one-binding change.

Method: the policy model is generated in memory (YAML parsing is not what is measured here), then
`compile_policy` + `Snapshot.build` (every resource serialized and hashed, as `serve` does) runs
REPEAT times; the median is reported. The one-binding change is measured both with the compiler's
memo and the resolution held between compiles (what `serve` does) and without them (a cold compile of the
changed policy: the baseline). The compile runs with the cyclic collector off, as it did inside
`compile_policy` before the run time took that decision (`gc_control.no_cyclic_gc`).

Targets (issue #2): full compile + serialize < 1 s; one-binding change < 50 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from controlplane.compiler.compile import compile_policy
from controlplane.compiler.memo import CompilerMemo
from controlplane.model.errors import Source
from controlplane.model.policy import (
    Backend,
    Binding,
    ClaimMatch,
    Endpoint,
    Gateway,
    Issuer,
    IssuerKind,
    Mode,
    Policy,
    Role,
    RoleRule,
    Subject,
)
from controlplane.resolved.index import Resolution
from controlplane.runtime.gc_control import no_cyclic_gc
from controlplane.snapshots.snapshot import Snapshot, build_snapshots

SOURCE = Source("generated.yaml", 1)


def generate(backends: int, bindings_per_backend: int) -> Policy:
    issuer = Issuer(
        "gitlab",
        IssuerKind.GITLAB,
        "https://gitlab.example.com",
        "https://gitlab.example.com/oauth/discovery/keys",
        30,
        300,
        SOURCE,
    )
    backend_list, roles, bindings = [], [], []
    for b in range(backends):
        name = f"svc-{b:04d}"
        backend_list.append(
            Backend(
                name,
                (f"{name}.internal",),
                f"https://{name}.internal",
                (Endpoint(f"10.{b // 250}.{b % 250}.10", 8080),),
                None,
                2000,
                15000,
                (),
                SOURCE,
            )
        )
        roles.append(Role(f"{name}-read", name, (RoleRule(("GET", "HEAD"), ("/api/**",)),), SOURCE))
        roles.append(Role(f"{name}-write", name, (RoleRule(("POST", "PUT", "DELETE"), ("/api/**",)),), SOURCE))
        for k in range(bindings_per_backend):
            claims = (
                ClaimMatch("ref", ("main",) if k % 2 else ("release/*",), SOURCE),
                ClaimMatch("ref_protected", ("true",), SOURCE),
            )
            subject = Subject((1000 + (b * bindings_per_backend + k) % 5000,), (), True, claims, SOURCE)
            role = f"{name}-write" if k % 3 == 0 else f"{name}-read"
            bindings.append(Binding(f"{name}-b{k}", "gitlab", (role,), (subject,), Mode.ENFORCE, SOURCE))
    gateway = Gateway("fleet", "0.0.0.0", 10000, tuple(b.name for b in backend_list), "/dev/stdout", SOURCE)
    return Policy((issuer,), tuple(backend_list), tuple(roles), tuple(bindings), (gateway,))


def compile_and_serialize(
    policy: Policy,
    memo: CompilerMemo | None,
    resolution: Resolution | None = None,
    previous: dict[str, Snapshot] | None = None,
) -> tuple[float, dict[str, Snapshot]]:
    """What `serve` does on a change: resolve, compile, then build every group's snapshot (serialize, hash)."""
    started = time.perf_counter()
    with no_cyclic_gc():
        resolved = resolution.update(policy) if resolution is not None else None
        compiled = compile_policy(policy, memo, resolved=resolved)
    snapshots = build_snapshots({name: group.resources for name, group in compiled.items()}, previous)
    return time.perf_counter() - started, snapshots


def change_one_binding(policy: Policy, index: int) -> Policy:
    bindings = list(policy.bindings)
    old = bindings[index]
    subject = replace(old.subjects[0], claims=(ClaimMatch("ref", (f"hotfix-{index}",), SOURCE),))
    bindings[index] = replace(old, subjects=(subject,))
    return replace(policy, bindings=tuple(bindings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", type=int, default=1000)
    parser.add_argument("--bindings-per-backend", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    policy = generate(args.backends, args.bindings_per_backend)
    full = [compile_and_serialize(policy, None)[0] for _ in range(args.repeat)]
    _, snapshots = compile_and_serialize(policy, None)
    sizes = {
        t.rsplit(".", 1)[-1]: sum(len(r.any_bytes) for r in ts.resources.values())
        for t, ts in snapshots["fleet"].types.items()
    }

    memo, resolution = CompilerMemo(), Resolution()
    _, held = compile_and_serialize(policy, memo, resolution)  # warm: what a running server holds
    incremental, cold = [], []
    current = policy
    for i in range(args.repeat * 2):
        changed = change_one_binding(current, (i * 997) % len(policy.bindings))
        seconds, warm_snapshots = compile_and_serialize(changed, memo, resolution, held)
        incremental.append(seconds)
        cold_seconds, cold_snapshots = compile_and_serialize(changed, None)
        cold.append(cold_seconds)
        warm, cold_snapshot = warm_snapshots["fleet"], cold_snapshots["fleet"]
        assert all(warm.version(t) == cold_snapshot.version(t) for t in warm.types), "memo must not change output"
        current, held = changed, warm_snapshots

    def line(label: str, xs: list[float], target: str) -> None:
        med = statistics.median(xs) * 1000
        print(f"{label:<34} median {med:7.1f} ms  (min {min(xs) * 1000:.1f}, n={len(xs)})  {target}")

    counts = f"{len(policy.backends)} backends, {len(policy.roles)} roles, {len(policy.bindings)} bindings"
    print(f"policy: {counts}, 1 gateway")
    print("serialized bytes by type: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    line("full compile + serialize:", full, "target < 1000 ms")
    line("one-binding change (memo):", incremental, "target < 50 ms")
    line("one-binding change (cold, base):", cold, "the same change without the memo")
    speedup = statistics.median(cold) / statistics.median(incremental)
    print(f"the memo makes a one-binding change {speedup:.1f}x faster than a cold compile")


if __name__ == "__main__":
    main()
