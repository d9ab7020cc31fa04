"""Replicas given the same inputs serve byte-identical resources and versions (issue 12 item 5).

A replica differs from another in everything but its inputs: its process (so Python's string hash seed, which
orders sets), where its checkout of the policy lives, its working directory. None of it may reach a resource
or a version, or an Envoy moving between replicas would be sent everything again. `controlplane compile`
writes every group's resources with their versions, so two compiles in two such processes must write the
same bytes. The live check, with `serve` processes and a real Envoy, is tests/test_e2e_failover.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compile(policy: Path, out: Path, seed: str, cwd: Path) -> dict[str, bytes]:
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "controlplane", "compile", str(policy), "--out", str(out)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("example", ["multi-backend", "gitlab-state"])
def test_two_replicas_compile_the_same_bytes_and_versions(example: str, tmp_path: Path) -> None:
    written = []
    for replica, seed in (("replica-a", "1"), ("elsewhere/replica-b", "2")):
        home = tmp_path / replica
        shutil.copytree(ROOT / "examples" / example, home / "policy")
        written.append(_compile(home / "policy", home / "out", seed, cwd=home))
    first, second = written
    assert first.keys() == second.keys() and any(name.endswith("routes.yaml") for name in first)
    assert all(b"# version: " in text for name, text in first.items() if name.endswith(".yaml") and "/" in name)
    assert first == second
