"""The resolved policy: its rendering reads back as the data it shows, a resolution keeps the objects of
unchanged backends, and the package stands alone (no protobuf, nothing of the compiler or the exchange)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from controlplane.model.errors import PolicyError, Source
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Mode, RoleRule
from controlplane.resolved import render
from controlplane.resolved.access import BackendAccess, Grant, ResolvedPolicy
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.index import Resolution
from controlplane.sources.policy_dir import read_policy_dir

ROOT = Path(__file__).resolve().parent.parent
CASES = sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir())
AWKWARD = ("", "a b", "it's", 'say "hi"', "true", "42", "x: y", "#c", "*glob", "[x]", "a,b", "-", "ü")


@pytest.mark.parametrize("case", CASES)
def test_every_example_renders_to_yaml_that_reads_back_as_its_data(case: str) -> None:
    resolved = Resolution().update(parse_policy(read_policy_dir(ROOT / "examples" / case)))
    assert yaml.safe_load(render.render(resolved)) == render.document(resolved)


def test_awkward_values_alternatives_warnings_and_pins_read_back_exactly() -> None:
    conditions = tuple(Condition(f"c{i}", (v,), negated=i % 2 == 1, listy=i % 3 == 0) for i, v in enumerate(AWKWARD))
    subject = ResolvedSubject.of(
        [Condition("iss", ("https://gitlab.example.com",)), Condition("project_id", ("1", "2"), negated=True)],
        [conditions, [Condition("ref", ("release/*", "main"), listy=True)]],
    )
    rules = (RoleRule((), ()), RoleRule(("GET",), tuple(AWKWARD)))
    grants = (Grant("b", "r", Mode.SHADOW, rules, (subject,)), Grant("b", "gone", Mode.ENFORCE, rules, ()))
    warning = PolicyError.at(Source("bindings.yaml", 3), "subject", "access withdrawn: it's: #gone")
    resolved = ResolvedPolicy(
        backends={"svc": BackendAccess(("gitlab",), grants), "idle": BackendAccess((), ())},
        warnings=(warning,),
        pins={"gitlab": {"acme/x y": 7, "true": 8}},
    )
    text = render.render(resolved)
    assert yaml.safe_load(text) == render.document(resolved)
    assert "- ref has any of [release/*, main]" in text
    assert "- project_id not in [1, 2]" in text


def test_a_resolution_keeps_the_access_objects_of_backends_no_change_touched() -> None:
    policy = parse_policy(read_policy_dir(ROOT / "examples" / "multi-backend"))
    resolution = Resolution()
    before = resolution.update(policy)
    changed = policy.bindings[0]
    touched = {policy.role(r).backend for r in changed.roles}
    after = resolution.update(replace(policy, bindings=(replace(changed, mode=Mode.SHADOW), *policy.bindings[1:])))
    for name, access in after.backends.items():
        assert (access is before.backends[name]) is (name not in touched), name
    assert Resolution().update(policy).backends == before.backends  # fresh equals incremental


def test_the_resolved_package_imports_no_protobuf_and_nothing_above_the_model() -> None:
    modules = ["access", "conditions", "evaluate", "index", "render", "resolve"]
    code = (
        "import sys\n"
        + "".join(f"import controlplane.resolved.{m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('google', 'envoy', 'yaml')"
        " or (m.startswith('controlplane.') and m.split('.')[1] not in ('model', 'resolved')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
