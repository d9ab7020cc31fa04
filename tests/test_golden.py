"""Golden snapshots: every `examples/<case>/` compiles to exactly `snapshots/<case>/`, and Envoy accepts it.

`snapshots/<case>/resolved.yaml` is the resolved policy the snapshots were compiled from (who may do what on
which backend), so a change to access shows up in review as such, not only as RBAC protobuf.

After a deliberate compiler change: `make snapshots`, then review the diff like any other code.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.model.loader import parse_policy
from controlplane.resolved import render
from controlplane.resolved.index import Resolution
from controlplane.snapshots import golden
from controlplane.snapshots.build import compile_dir
from controlplane.sources.policy_dir import read_policy_dir
from tests.support.envoy import validate_config
from tests.support.static_bootstrap import as_static_bootstrap

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir())


def test_there_are_at_least_three_examples() -> None:
    assert {"quickstart", "multi-backend", "gitlab-and-oidc", "gitlab-state"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_example_matches_its_golden_snapshot(case: str) -> None:
    _, snapshots = compile_dir(ROOT / "examples" / case)
    expected_dir = ROOT / "snapshots" / case
    expected = {p.relative_to(expected_dir).as_posix(): p.read_text() for p in sorted(expected_dir.rglob("*.yaml"))}
    actual = {
        f"{group}/{name}": text for group, snap in snapshots.items() for name, text in golden.render(snap).items()
    }
    resolved = Resolution().update(parse_policy(read_policy_dir(ROOT / "examples" / case)))
    actual[render.FILE_NAME] = render.render(resolved)
    assert sorted(actual) == sorted(expected), "files differ: run `make snapshots` and review"
    for name, text in actual.items():
        assert text == expected[name], f"snapshots/{case}/{name} is stale: run `make snapshots` and review the diff"


def test_compiling_twice_gives_the_same_versions() -> None:
    first = compile_dir(ROOT / "examples" / "multi-backend")[1]
    second = compile_dir(ROOT / "examples" / "multi-backend")[1]
    assert {g: s.summary_version for g, s in first.items()} == {g: s.summary_version for g, s in second.items()}


@pytest.mark.parametrize("case", CASES)
def test_real_envoy_accepts_every_compiled_example(case: str) -> None:
    _, snapshots = compile_dir(ROOT / "examples" / case)
    for group, snapshot in snapshots.items():
        ok, output = validate_config(as_static_bootstrap(snapshot))
        assert ok, f"{case}/{group} rejected by envoy --mode validate:\n{output[-3000:]}"
