"""Writes the Kubernetes PrometheusRule of deploy/kubernetes/components/servicemonitor from the rule file
deploy/monitoring/prometheus/alerts.yaml, so that the two never differ: `make prometheusrule` runs it, and
tests/test_kubernetes_manifests.py fails when the committed PrometheusRule is not what it writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/monitoring/prometheus/alerts.yaml"
TARGET = ROOT / "deploy/kubernetes/components/servicemonitor/prometheusrule.yaml"
HEADER = (
    "# Written from deploy/monitoring/prometheus/alerts.yaml by `make prometheusrule`: edit that file, not this.\n"
    "# What each alert means and what to do: docs/alerts.md.\n"
)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "controlplane",
            "namespace": "controlplane",
            "labels": {"app.kubernetes.io/name": "controlplane", "app.kubernetes.io/component": "server"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render() -> str:
    document = prometheus_rule(yaml.safe_load(RULES.read_text()))
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)


def main() -> int:
    TARGET.write_text(render())
    print(TARGET.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
