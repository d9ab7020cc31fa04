"""The Grafana dashboard and the Prometheus alerts in deploy/monitoring name only what a running control plane
exports, and /metrics speaks the formats scrapers ask for.

Every expression (dashboard targets and variables, alert rules) is parsed with `promql_parser`; the parse tree
gives every metric a selector names, the labels its matchers, `by`/`without` and `on`/`ignoring` clauses use.
Each must be in the live /metrics of `controlplane serve` run as users run it (exchange, webhooks, an issuer
with a GitLab API, a real Envoy connected), with the suffix its type allows (`_total` for a counter; `_bucket`,
`_sum`, `_count` for a histogram; none for a gauge). A renamed metric or label fails here, not on a dashboard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

import controlplane.cli.serve  # noqa: F401  (imports every module that registers a metric)
from controlplane.telemetry.metrics import REGISTRY
from tests.support.backends import http_request
from tests.support.fake_gitlab import FakeGitLab
from tests.support.gitlab_hooks import deliver
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana" / "controlplane.json"
ALERTS = ROOT / "deploy" / "monitoring" / "prometheus" / "alerts.yaml"

# Labels Prometheus adds to every scraped series, and the series it makes per target itself.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC = {"up": TARGET_LABELS, "scrape_duration_seconds": TARGET_LABELS}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
# Grafana's own variables, replaced by a value of their kind before parsing (`$job`, `$instance` sit inside
# label matchers' strings, where PromQL takes them as they are).
GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<expr>.+),\s*)?(?P<label>\w+)\)$")

API = "api:\n  token_env: GITLAB_TOKEN\n  reconcile: 10s"
DEPLOYER = "{project: acme/deployer}"


def policy(given: PolicyInputs) -> str:
    return documents(
        issuer(given.issuer, extra=API),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer-reads-reports", ["reports-read"], DEPLOYER, extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


@dataclass
class MonitoredStack(Served):
    project: int = 0

    def subject(self, job_id: int, aud: str = "https://reports.local", **claims: Any) -> str:
        return super().subject(job_id, aud, project_id=self.project, project_path="acme/deployer", **claims)


@dataclass(frozen=True)
class Exported:
    """What one live /metrics holds: each series name a selector may use, with its label names."""

    series: dict[str, frozenset[str]]
    families: dict[str, str]  # family name -> type


def exported(text: str) -> Exported:
    """Series names and their labels from a 0.0.4 text scrape. A labelled family with no child yet (no NACK
    so far) shows only its HELP and TYPE: its label names are the ones its code declares, which the families
    that do have samples prove to be the same (`test_declared_labels_are_the_exported_ones`)."""
    declared = declared_labels()
    series: dict[str, set[str]] = {}
    families: dict[str, str] = {}
    for family in parse_text(text):
        families[family.name] = family.type
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(base + suffix, set())
        for sample in family.samples:
            assert sample.name in series, f"{sample.name}: not a suffix its type {family.type} allows"
            series[sample.name] |= set(sample.labels)
        if not family.samples:
            for suffix in SUFFIXES.get(family.type, ("",)):
                series[base + suffix] |= declared.get(base, set()) | ({"le"} if suffix == "_bucket" else set())
    return Exported({name: frozenset(labels) for name, labels in series.items()}, families)


def declared_labels() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        if hasattr(collector, "_labelnames"):
            names[collector._name] = set(collector._labelnames)
    return names


# -- expressions ---------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable, Grafana's variables filled in."""
    found = [(f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            assert match, f"variable {variable['name']}: not label_values(...)"
            # label_values(EXPR, LABEL) lists LABEL's values on EXPR: checked as `count by (LABEL) (EXPR)`
            found.append((f"variable {variable['name']}", f"count by ({match['label']}) ({match['expr'] or 'up'})"))
    return [(where, GRAFANA_DURATIONS.sub("5m", expr)) for where, expr in found]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def all_expressions() -> list[tuple[str, str]]:
    return dashboard_expressions() + [(f"rule {r.get('alert') or r['record']}", r["expr"]) for r in alert_rules()]


def problems(expr: str, known: Exported) -> list[str]:
    """What `expr` names that `known` does not export: unknown series, and labels no selected series has."""
    found: list[str] = []
    _check(promql_parser.parse(expr), {**known.series, **SYNTHETIC}, found)
    return found


def _check(node: Any, series: dict[str, frozenset[str]], found: list[str]) -> frozenset[str]:
    """Checks `node`'s subtree; returns the labels its result can carry (for the clauses above it)."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name not in series:
            found.append(f"unknown series {node.name}")
            return frozenset()
        labels = series[node.name] | TARGET_LABELS
        for matcher in node.matchers.matchers:
            if matcher.name not in labels | {"__name__"}:
                found.append(f"{node.name} has no label {matcher.name}")
        return labels
    if isinstance(node, promql_parser.MatrixSelector):
        return _check(node.vector_selector, series, found)
    if isinstance(node, promql_parser.AggregateExpr):
        below = _check(node.expr, series, found)
        modifier = node.modifier
        if modifier is None:
            return frozenset()
        by = modifier.type == promql_parser.AggModifierType.By
        if missing := set(modifier.labels) - below:
            clause = "by" if by else "without"
            found.append(f"{node.op} {clause} {sorted(missing)}: not labels of what it aggregates")
        return frozenset(modifier.labels) if by else below - set(modifier.labels)
    if isinstance(node, promql_parser.BinaryExpr):
        left, right = _check(node.lhs, series, found), _check(node.rhs, series, found)
        matching = node.modifier.matching if node.modifier is not None else None
        if matching is not None and (missing := set(matching.labels) - (left & right)):
            found.append(f"{node.op} on/ignoring {sorted(missing)}: not labels of both sides")
        return left | right
    if isinstance(node, promql_parser.Call):
        labels: frozenset[str] = frozenset()
        for argument in node.args:
            labels |= _check(argument, series, found)
        return labels
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return _check(node.expr, series, found)
    return frozenset()  # numbers and strings


# -- the live control plane ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Live:
    stack: MonitoredStack
    text: str  # /metrics, no Accept header
    known: Exported


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """`serve` with its JSON log format, the exchange, webhooks, an issuer with a GitLab API and an Envoy, after
    a job got a credential, used it, was refused one, ended (Job Hook), and a forged hook was refused."""
    root = tmp_path_factory.mktemp("monitoring")
    with FakeGitLab() as gitlab:
        project = gitlab.add_project("acme/deployer")
        with serve_exchange_stack(
            root,
            policy,
            kind=MonitoredStack,
            envoy=EnvoySpec("monitored-1", "monitoring-envoy"),
            gitlab=gitlab,
            gitlab_token=True,
            ready=None,
            env={"CONTROLPLANE_LOG_FORMAT": "json"},
        ) as built:
            built.project = project
            job = gitlab.add_job(project)
            poll_until(
                lambda: built.call("reports.local", built.credential(job)) == 200, 30, interval=0.1, message="up"
            )
            assert built.exchange("not-a-token").status == 400
            assert deliver(built.hook, "Job Hook", {"object_kind": "build"}, token="wrong").status == 401
            built.job_finished(job, project_id=project)
            poll_until(lambda: built.controlplane.metric("controlplane_revocations_total") >= 1, 10, message="revoked")
            text = built.controlplane.metrics()
            yield Live(built, text, exported(text))


@pytest.mark.e2e
def test_every_expression_names_only_exported_metrics_and_labels(live: Live) -> None:
    wrong = {where: found for where, expr in all_expressions() if (found := problems(expr, live.known))}
    assert not wrong, json.dumps(wrong, indent=1)


@pytest.mark.e2e
def test_the_check_fails_on_a_renamed_metric_or_label(live: Live) -> None:
    """The check above can fail: a metric renamed (or given the wrong suffix for its type), a label renamed."""
    assert problems("sum(rate(controlplane_xds_nack_total[5m]))", live.known) == [
        "unknown series controlplane_xds_nack_total"
    ]
    assert problems("controlplane_policy_errors_total", live.known) == [
        "unknown series controlplane_policy_errors_total"
    ]
    assert problems("controlplane_xds_pushes", live.known) == ["unknown series controlplane_xds_pushes"]
    assert problems('controlplane_xds_nacks_total{kind="cds"}', live.known) == [
        "controlplane_xds_nacks_total has no label kind"
    ]
    assert problems("sum by (group) (controlplane_xds_proxies_rejecting)", live.known) == [
        "sum by ['group']: not labels of what it aggregates"
    ]
    assert problems("a_total / on (type) controlplane_xds_nacks_total", live.known)[0] == "unknown series a_total"
    assert (
        problems('sum by (type, le) (rate(controlplane_xds_push_ack_latency_seconds_bucket{job="x"}[5m]))', live.known)
        == []
    )


@pytest.mark.e2e
def test_declared_labels_are_the_exported_ones(live: Live) -> None:
    """Families without a sample yet take their labels from the code; where samples exist, they agree."""
    declared = declared_labels()
    checked = 0
    for family in parse_text(live.text):
        base = family.name.removesuffix("_total") if family.type == "counter" else family.name
        if family.samples and base in declared:
            labels = {name for sample in family.samples for name in sample.labels} - {"le"}
            assert labels == declared[base], family.name
            checked += 1
    assert checked >= 30


@pytest.mark.e2e
def test_the_stack_exported_what_the_dashboard_watches(live: Live) -> None:
    """The traffic the fixture made shows where the panels look (a dashboard that only ever reads empty series
    would pass the name check and show nothing)."""
    sample = live.stack.controlplane.metric
    assert sample("controlplane_xds_connected_proxies", group="ci-gateway") == 1
    assert sample("controlplane_credential_exchanges_total", result="granted") >= 1
    assert (
        sample("controlplane_credential_exchanges_total", result="invalid_request")
        + sample("controlplane_credential_exchanges_total", result="invalid_grant")
        >= 1
    )
    assert sample("controlplane_webhook_events_total", event="job", result="unauthorized") == 1
    assert sample("controlplane_webhook_events_total", event="job", result="accepted") >= 1
    assert sample("controlplane_build_info", **build_labels(live.text)) == 1
    assert "process_resident_memory_bytes" in live.known.series and "python_info" in live.known.families


def build_labels(text: str) -> dict[str, str]:
    (family,) = [f for f in parse_text(text) if f.name == "controlplane_build_info"]
    (sample,) = family.samples
    assert set(sample.labels) == {"version", "python_version", "grpc_version", "protobuf_version"}
    return dict(sample.labels)


# -- /metrics formats ----------------------------------------------------------------------------------------


# What Prometheus 3 sends (OpenMetrics first, UTF-8 names allowed), and what Prometheus 2 sends (OpenMetrics
# 0.0.1 first, which prometheus_client does not write: it answers the 0.0.4 text the header also accepts).
PROMETHEUS_3 = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
    "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
PROMETHEUS_2 = "application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        ("", TEXT_0_0_4),
        ("text/plain", TEXT_0_0_4),
        (PROMETHEUS_2, TEXT_0_0_4),
        (PROMETHEUS_3, "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
        ("application/openmetrics-text", "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        ("text/plain;version=1.0.0", "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    ],
)
def test_metrics_negotiates_its_format_and_has_no_created_series(live: Live, accept: str, content_type: str) -> None:
    headers = {"Accept": accept} if accept else {}
    response = http_request(f"{live.stack.controlplane.admin_url}/metrics", headers=headers)
    assert response.status == 200
    assert response.headers["content-type"] == content_type
    openmetrics = content_type.startswith("application/openmetrics-text")
    if openmetrics:
        assert response.text.endswith("# EOF\n")
    families = list((parse_openmetrics if openmetrics else parse_text)(response.text))
    names = {sample.name for family in families for sample in family.samples}
    assert "controlplane_credential_exchanges_total" in names and "controlplane_build_info" in names
    assert "controlplane_xds_push_ack_latency_seconds_bucket" in names
    assert not [name for name in names if name.endswith("_created")]
    assert "_created" not in response.text


@pytest.mark.e2e
def test_serve_logs_json_lines_when_asked(live: Live) -> None:
    lines = live.stack.controlplane.log_text().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(entries) >= 5 and len(entries) >= len(lines) - 2, lines[:20]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(entry["logger"].startswith("controlplane") for entry in entries)


# -- structure -----------------------------------------------------------------------------------------------


GROUPS = (
    "Fleet and versions",
    "Push latency",
    "NACKs",
    "Policy errors and age",
    "GitLab and JWKS freshness",
    "Webhooks",
    "Exchanges",
    "Revocations",
    "Audit",
    "Process",
    "TLS certificates",
    "Kubernetes endpoints",
    "Cloud credentials",
)


def test_dashboard_is_structurally_sound() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [panel["title"] for panel in board["panels"] if panel["type"] == "row"]
    assert tuple(rows) == GROUPS
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"panel {panel['id']} overlaps another"
        occupied |= cells
    for panel in panels():
        assert panel["targets"], f"panel {panel['id']} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["expr"]
            assert 'job=~"$job"' in target["expr"] and 'instance=~"$instance"' in target["expr"], panel["title"]


def test_every_row_has_panels() -> None:
    current, counts = "", dict.fromkeys(GROUPS, 0)
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
        else:
            counts[current] += 1
    assert all(counts.values()), counts


def test_every_expression_parses() -> None:
    for where, expr in all_expressions():
        try:
            promql_parser.parse(expr)
        except Exception as error:  # the parser raises its own error types
            pytest.fail(f"{where}: {expr!r}: {error}")


README_ALERTS = (
    "ControlplanePolicyErrors",
    "ControlplaneProxiesRejecting",
    "ControlplanePolicyStale",
    "ControlplaneGitLabInventoryOld",
    "ControlplaneWebhookUnauthorized",
    "ControlplaneAuditRecordsDropped",
    "ControlplaneAuditStreamsRefused",
)
PRODUCTION_ALERTS = (
    "ControlplaneTargetDown",
    "ControlplaneNotReady",
    "ControlplaneExchangeUnavailable",
    "ControlplaneJwksStale",
    "ControlplaneStoreFeedDown",
    "ControlplaneNoProxiesConnected",
)


def test_alerts_are_complete_and_each_has_a_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    assert set(README_ALERTS + PRODUCTION_ALERTS) <= set(names)
    runbook = (ROOT / "docs" / "alerts.md").read_text()
    anchors = {_anchor(title) for title in re.findall(r"^### (\w+)$", runbook, flags=re.MULTILINE)}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook"] == f"docs/alerts.md#{_anchor(rule['alert'])}"
        assert _anchor(rule["alert"]) in anchors, f"no runbook section for {rule['alert']}"


def _anchor(title: str) -> str:
    return title.lower()
