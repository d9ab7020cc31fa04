"""Smoke run of benchmarks/aws_role_routes.py (`--quick`): per-binding AWS roles through real Envoys.

Why: the benchmark's figures are published (docs/performance.md), so it must keep running as the compiler
changes. The run itself checks what it measures: every timed job's requests are signed with the key its role
should have (the upstream answers the key that signed), a binding role's refresh changes the RouteConfiguration
and no ECDS resource, the backend role's the other way round, and each refresh reaches an open connection. The
figures are not asserted (the shared machine is too noisy), only their shape: a binding role's refresh pushes
the whole route configuration, more bytes than the backend role's ECDS resource. About 5 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import aws_role_routes

pytestmark = pytest.mark.e2e


def test_the_quick_run_measures_every_variant_and_both_kinds_of_refresh() -> None:
    results = aws_role_routes.main(["--quick"])
    assert set(results.latency_us) == {(k, job) for k in (0, 1, 10, 100) for job in ("last", "none")}
    assert set(results.pushed_bytes) == {(b, k) for b in (10, 100) for k in (0, b)}
    assert results.pushed_bytes[(100, 100)] > 10 * results.pushed_bytes[(100, 0)]  # routes vs one ECDS resource
    assert results.pushed_bytes[(100, 100)] > results.pushed_bytes[(10, 10)]  # grows with the roles
    assert set(results.signed_ms) == {(100, "rds"), (100, "ecds")}
    assert all(len(times) == 2 for times in results.signed_ms.values())
