"""Backends naming Kubernetes Services: how policy spells them, the errors (file, line, field), and what compiles."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.compiler.compile import compile_policy
from controlplane.compiler.names import backend_cluster
from controlplane.compiler.types import CLUSTER, ENDPOINT
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Endpoint, Policy, ServiceRef
from controlplane.sources.policy_dir import read_policy_dir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes-service"


def _with_backends(text: str) -> dict[str, str]:
    files = dict(read_policy_dir(EXAMPLE))
    files["backends.yaml"] = textwrap.dedent(text).lstrip("\n")
    return files


def _errors(text: str) -> list[tuple[str, int, str, str]]:
    with pytest.raises(PolicyInvalid) as raised:
        parse_policy(_with_backends(text))
    return [(e.file, e.line, e.field, e.message) for e in raised.value.errors]


BACKEND = """
kind: Backend
name: reports-api
hosts: [reports.local]
endpoints:
{endpoints}
---
kind: Backend
name: deploy-api
hosts: [deploy.local]
endpoints:
  - {{address: 127.0.0.1, port: 8082}}
"""


def _backend(endpoints: str) -> str:
    return BACKEND.format(endpoints=textwrap.indent(textwrap.dedent(endpoints).strip("\n"), "  "))


def test_the_example_names_a_service_by_port_name() -> None:
    policy = parse_policy(read_policy_dir(EXAMPLE))
    reports = policy.backend("reports-api")
    assert reports.services == (ServiceRef("shop", "reports", "http"),)
    assert reports.endpoints == ()
    assert reports.services[0].key == "shop/reports"
    assert policy.backend("deploy-api").services == ()


def test_a_port_number_and_several_services() -> None:
    policy = parse_policy(
        _with_backends(_backend("- {service: shop/reports, port: 8080}\n- {service: shop/reports-canary, port: web}"))
    )
    assert policy.backend("reports-api").services == (
        ServiceRef("shop", "reports", 8080),
        ServiceRef("shop", "reports-canary", "web"),
    )


def test_mixing_addresses_and_services_is_an_error_at_the_first_odd_one() -> None:
    errors = _errors(_backend("- {service: shop/reports, port: http}\n- {address: 10.0.0.1, port: 80}"))
    assert errors == [
        (
            "backends.yaml",
            6,
            "endpoints[1]",
            "a backend's endpoints are either all addresses ({address, port}) or all Kubernetes services "
            "({service, port}), not both",
        )
    ]


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        ("{service: reports, port: http}", "endpoints[0].service", "namespace/name"),
        ("{service: Shop/reports, port: http}", "endpoints[0].service", "namespace/name"),
        ("{service: shop/1reports, port: http}", "endpoints[0].service", "namespace/name"),
        ("{service: shop/reports, port: HTTP}", "endpoints[0].port", "lower-case"),
        ("{service: shop/reports, port: 0}", "endpoints[0].port", ""),
        # A quoted number was taken as a port *name* "80", matched no slice's port and served nothing (503).
        ("{service: shop/reports, port: '80'}", "endpoints[0].port", "write the number unquoted"),
        ("{service: shop/reports}", "endpoints[0].port", "missing required key"),
        ("{service: shop/reports, port: http, address: 10.0.0.1}", "endpoints[0].address", "not both"),
        ("{service: shop/reports, port: http, namespace: x}", "endpoints[0].namespace", "unknown key"),
    ],
)
def test_service_entry_errors_name_file_line_and_field(entry: str, path: str, message: str) -> None:
    errors = _errors(_backend(f"- {entry}"))
    assert [(file, line, at) for file, line, at, _ in errors] == [("backends.yaml", 5, path)]
    assert message in errors[0][3]


def test_a_duplicate_service_entry_is_reported() -> None:
    errors = _errors(_backend("- {service: shop/reports, port: http}\n- {service: shop/reports, port: http}"))
    assert [(line, path) for _, line, path, _ in errors] == [(6, "endpoints[1]")]


def _assignment(policy: Policy, backend: str) -> endpoint_pb2.ClusterLoadAssignment:
    compiled = compile_policy(policy)["ci-gateway"].resources
    raw = dict(compiled[ENDPOINT])[backend_cluster(backend)]
    return endpoint_pb2.ClusterLoadAssignment.FromString(raw)


def test_a_service_backend_is_an_eds_cluster_with_an_empty_assignment_until_endpoints_are_known() -> None:
    policy = parse_policy(read_policy_dir(EXAMPLE))
    assignment = _assignment(policy, "reports-api")
    assert assignment.cluster_name == "backend-reports-api"
    assert list(assignment.endpoints) == []  # no host: Envoy answers 503
    assert backend_cluster("reports-api") in dict(compile_policy(policy)["ci-gateway"].resources[CLUSTER])


def test_discovered_endpoints_change_only_that_assignment() -> None:
    policy = parse_policy(read_policy_dir(EXAMPLE))
    before = compile_policy(policy)["ci-gateway"].resources
    found = (Endpoint("10.1.0.7", 8080), Endpoint("fd00::7", 8080))
    live = replace(
        policy,
        backends=tuple(replace(b, endpoints=found) if b.services else b for b in policy.backends),
    )
    after = compile_policy(live)["ci-gateway"].resources
    changed = {(kind, name) for kind in after for name, raw in after[kind] if dict(before[kind]).get(name) != raw}
    assert changed == {(ENDPOINT, backend_cluster("reports-api"))}
    addresses = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in _assignment(live, "reports-api").endpoints
        for e in locality.lb_endpoints
    ]
    assert addresses == [("10.1.0.7", 8080), ("fd00::7", 8080)]
