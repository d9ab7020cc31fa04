"""Smoke run of the fleet simulator: a real `controlplane serve` and 20 simulated Envoys in one worker.

Why: the simulator is the yardstick for issue #5's fleet targets, so it must keep working as the server
changes; this small run checks convergence after connect and one policy change, and that a NACKing proxy is
never sent the version it rejected while the others move on. Latency targets are not asserted here (the
shared CI machine is too noisy); `benchmarks/fleet_sim.py` reports them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fleet_sim

pytestmark = pytest.mark.e2e


def test_fleet_smoke_connect_change_nack() -> None:
    started = time.monotonic()
    results = {
        r.scenario: r for r in fleet_sim.main(["--streams", "20", "--workers", "1", "--scenario", "change,nack"])
    }
    assert set(results) == {"connect", "change", "nack"}
    assert results["connect"].ok, results["connect"].figures
    assert results["connect"].figures["ready"] == "20/20"
    assert results["change"].ok, results["change"].figures
    assert results["change"].figures["acked"] == "20/20"
    nack = results["nack"]
    assert nack.ok, nack.figures
    assert nack.figures["rejected_version_received_times"] == 1
    assert nack.figures["others_converged"] is True
    assert time.monotonic() - started < 30
