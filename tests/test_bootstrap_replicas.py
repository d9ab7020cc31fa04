"""`controlplane bootstrap` with several control plane replicas: the xds_cluster Envoy fails over with.

The shape is pinned here (priorities in a per-node order, ejection on one failure, one SNI) and the real Envoy
validates every variant; tests/test_e2e_failover.py shows the behaviour with three live replicas.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.cli.bootstrap import FAILOVER_DETECTION, ClientTls, bootstrap_yaml, render_bootstrap, replica_order
from tests.support.certs import make_pki
from tests.support.envoy import validate_config

THREE = [("10.0.0.1", 18000), ("10.0.0.2", 18000), ("10.0.0.3", 18001)]
TLS = ClientTls("/etc/cp/ca.pem", "/etc/cp/client.pem", "/etc/cp/client-key.pem")
TLS_SNI = ClientTls(TLS.ca_file, TLS.cert_file, TLS.key_file, "cp.infra")


def _cluster(node: str = "n1", addresses: list[tuple[str, int]] = THREE, **more: Any) -> dict[str, Any]:
    (host, port), *rest = addresses
    boot = render_bootstrap(group="g", node_id=node, xds_host=host, xds_port=port, more_xds_addresses=rest, **more)
    (cluster,) = boot["static_resources"]["clusters"]
    return dict(cluster)


def _order(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    """The endpoints by priority, as (host, port)."""
    found = []
    for locality in sorted(cluster["load_assignment"]["endpoints"], key=lambda e: e.get("priority", 0)):
        (endpoint,) = locality["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        found.append((address["address"], address["port_value"]))
    return found


def test_each_replica_is_a_priority_in_an_order_rotated_by_the_node_id() -> None:
    cluster = _cluster("gw-7")
    assert cluster["type"] == "STATIC"
    assert [e["priority"] for e in cluster["load_assignment"]["endpoints"]] == [0, 1, 2]
    order = _order(cluster)
    assert order == replica_order("gw-7", THREE) and sorted(order) == sorted(THREE)
    start = THREE.index(order[0])
    assert order == [*THREE[start:], *THREE[:start]]  # a rotation: the fallback after a replica is the next one
    assert cluster["outlier_detection"] == FAILOVER_DETECTION
    assert FAILOVER_DETECTION["consecutive_5xx"] == 1 and FAILOVER_DETECTION["max_ejection_percent"] == 100


def test_a_fleet_spreads_over_the_replicas_and_a_node_always_prefers_the_same() -> None:
    first = Counter(_order(_cluster(f"gw-{i}"))[0] for i in range(300))
    assert set(first) == set(THREE) and min(first.values()) > 60, first
    assert _order(_cluster("gw-1")) == _order(_cluster("gw-1"))


def test_one_address_stays_as_it_was_and_a_repeated_one_counts_once() -> None:
    single = _cluster(addresses=[("10.0.0.1", 18000)])
    assert "outlier_detection" not in single and _order(single) == [("10.0.0.1", 18000)]
    assert _order(_cluster(addresses=[("10.0.0.1", 18000), ("10.0.0.1", 18000)])) == [("10.0.0.1", 18000)]


def test_names_are_resolved_strictly_so_every_address_of_a_name_is_a_replica() -> None:
    cluster = _cluster(addresses=[("cp-0.cp.infra", 18000), ("cp-1.cp.infra", 18000)])
    assert (cluster["type"], cluster["dns_lookup_family"]) == ("STRICT_DNS", "V4_PREFERRED")


def test_tls_with_several_ips_checks_each_as_an_ip_san() -> None:
    tls = _cluster(tls=TLS)["transport_socket"]["typed_config"]
    sans = tls["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "IP_ADDRESS", "matcher": {"exact": host}} for host, _ in THREE]
    assert "sni" not in tls


def test_tls_with_several_names_needs_the_one_name_every_replica_holds() -> None:
    names = [("cp-0.cp.infra", 18000), ("cp-1.cp.infra", 18000)]
    with pytest.raises(ValueError, match="sni"):
        _cluster(addresses=names, tls=TLS)
    with pytest.raises(ValueError, match="sni"):
        _cluster(addresses=[("cp.infra", 18000), ("10.0.0.9", 18000)], tls=TLS)
    tls = _cluster(addresses=names, tls=TLS_SNI)
    context = tls["transport_socket"]["typed_config"]
    assert context["sni"] == "cp.infra"
    sans = context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert sans == [{"san_type": "DNS", "matcher": {"exact": "cp.infra"}}]
    # One name on several ports is still one name: its own SNI.
    same = _cluster(addresses=[("cp.infra", 18000), ("cp.infra", 18001)], tls=TLS)
    assert same["transport_socket"]["typed_config"]["sni"] == "cp.infra"


@pytest.mark.parametrize("bad", [("", 1), ("10.0.0.2", 0), ("10.0.0.2", 70000)])
def test_a_bad_further_address_is_refused(bad: tuple[str, int]) -> None:
    with pytest.raises(ValueError, match="xds_"):
        _cluster(addresses=[("10.0.0.1", 18000), bad])


@pytest.mark.parametrize(
    ("addresses", "sni"),
    [
        (THREE, None),
        (THREE, ""),
        ([("cp-0.cp.infra", 18000), ("cp-1.cp.infra", 18000), ("10.0.0.3", 18000)], None),
        ([("cp-0.cp.infra", 18000), ("cp-1.cp.infra", 18000)], "cp.infra"),
    ],
)
def test_envoy_accepts_every_variant(addresses: list[tuple[str, int]], sni: str | None, tmp_path: Path) -> None:
    """`sni` None: plain text; "" TLS with the default name; else TLS naming it (Envoy reads the files)."""
    pki = make_pki(tmp_path)
    tls = None if sni is None else ClientTls(str(pki.ca), str(pki.client.cert), str(pki.client.key), sni or None)
    (host, port), *rest = addresses
    text = bootstrap_yaml(group="g", node_id="n", xds_host=host, xds_port=port, tls=tls, more_xds_addresses=rest)
    ok, output = validate_config(text)
    assert ok, output


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "controlplane", "bootstrap", "--group", "g", "--node-id", "n", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_cli_takes_a_comma_list_and_repeated_flags() -> None:
    result = _cli("--xds-address", "10.0.0.1:18000,10.0.0.2:18000", "--xds-address", "10.0.0.3:18001")
    assert result.returncode == 0, result.stderr
    (cluster,) = yaml.safe_load(result.stdout)["static_resources"]["clusters"]
    assert sorted(_order(cluster)) == sorted(THREE)


def test_the_cli_refuses_several_names_with_tls_and_no_sni() -> None:
    tls = ("--tls-ca", "ca.pem", "--tls-cert", "c.pem", "--tls-key", "k.pem")
    result = _cli("--xds-address", "a.infra:1,b.infra:1", *tls)
    assert result.returncode == 2 and "sni" in result.stderr and result.stdout == ""
