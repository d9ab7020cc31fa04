"""The metrics reference names every metric the control plane exports, so an operator can trust it."""

from __future__ import annotations

import re
from pathlib import Path

import controlplane.cli.serve  # noqa: F401  (imports every module that registers a metric)
from controlplane.telemetry.metrics import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def _documented() -> str:
    return (ROOT / "docs" / "metrics.md").read_text()


def _exported() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        if metric.name.startswith("controlplane_"):
            names.add(metric.name + ("_total" if metric.type == "counter" else ""))
    return names


def test_every_exported_metric_is_in_the_reference() -> None:
    text = _documented()
    documented = set(re.findall(r"controlplane_[a-z0-9_]+", text))
    # "`controlplane_gitlab_rate_limit_waits_total`, `…_wait_seconds_total`" abbreviates a sibling's prefix.
    for short in re.findall(r"`…(_[a-z0-9_]+)`", text):
        documented |= {name.rsplit("_", 2)[0] + short for name in documented}
    missing = sorted(n for n in _exported() if n not in documented)
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def test_the_complete_policy_example_is_a_valid_policy() -> None:
    """docs/policy-example.md is what a reader copies: every file of it, as printed, must load."""
    from controlplane.model.loader import parse_policy

    text = (ROOT / "docs" / "policy-example.md").read_text()
    files = dict(re.findall(r"^`([\w/.-]+\.yaml)`\n```yaml\n(.*?)```", text, flags=re.MULTILINE | re.DOTALL))
    assert {"issuers.yaml", "inventory/gitlab.yaml", "roles.yaml", "bindings.yaml", "gateway.yaml"} <= set(files)
    policy = parse_policy(files)
    assert {b.name for b in policy.bindings} == {"deployer-deploys", "platform-reads", "sre-humans"}
