"""The EndpointSlice reducer (sources/kubernetes_slices.py): pure, so every rule is tested without a server."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from controlplane.model.policy import Endpoint
from controlplane.sources import kubernetes_slices
from controlplane.sources.kubernetes_slices import (
    Slice,
    apply_event,
    from_list,
    parse_slice,
    ready_endpoints,
)


def _slice(
    name: str,
    addresses: list[tuple[str, Any]],
    ports: list[dict[str, Any]] | None = None,
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice as the API serves it; an address's second item is `conditions.ready` (... = unset)."""
    endpoints = []
    for address, ready in addresses:
        endpoint: dict[str, Any] = {"addresses": [address]}
        if ready is not ...:
            endpoint["conditions"] = {"ready": ready}
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "resourceVersion": "1", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}] if ports is None else ports,
        "endpoints": endpoints,
    }


def _ready(*slices: dict[str, Any], port: str | int = "http") -> tuple[Endpoint, ...]:
    parsed = [s for s in map(parse_slice, slices) if s is not None]
    return ready_endpoints(parsed, port).endpoints


def test_only_ready_endpoints_and_unset_counts_as_ready() -> None:
    found = _ready(_slice("a", [("10.0.0.1", True), ("10.0.0.2", False), ("10.0.0.3", ...), ("10.0.0.4", None)]))
    assert found == (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.3", 8080), Endpoint("10.0.0.4", 8080))


def test_no_conditions_at_all_is_ready_but_a_non_boolean_is_not() -> None:
    s = _slice("a", [("10.0.0.1", ...)])
    s["endpoints"].append({"addresses": ["10.0.0.2"], "conditions": {"ready": "yes"}})
    s["endpoints"].append({"addresses": ["10.0.0.3"], "conditions": "broken"})
    assert _ready(s) == (Endpoint("10.0.0.1", 8080),)


def test_the_port_is_resolved_by_name_per_slice() -> None:
    old = _slice("a", [("10.0.0.1", True)], ports=[{"name": "http", "port": 8080}])
    new = _slice("b", [("10.0.0.2", True)], ports=[{"name": "http", "port": 9090, "protocol": "TCP"}])
    other = _slice("c", [("10.0.0.3", True)], ports=[{"name": "metrics", "port": 9100}])
    assert _ready(old, new, other) == (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 9090))
    assert _ready(old, new, other, port="metrics") == (Endpoint("10.0.0.3", 9100),)


def test_a_port_number_is_the_endpoints_port_and_udp_is_never_used() -> None:
    s = _slice("a", [("10.0.0.1", True)], ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"port": 8080}])
    assert _ready(s, port=8080) == (Endpoint("10.0.0.1", 8080),)
    assert _ready(s, port="dns") == ()
    assert _ready(s, port=9999) == ()


def test_ipv6_is_canonical_and_endpoints_dedupe_across_slices() -> None:
    v6 = _slice("a", [("fd00:0::1", True), ("fd00::2", True)], address_type="IPv6")
    again = _slice("b", [("fd00::1", True)], address_type="IPv6")
    v4 = _slice("c", [("10.0.0.9", True), ("10.0.0.10", True)])
    assert _ready(v6, again, v4) == (
        Endpoint("10.0.0.9", 8080),
        Endpoint("10.0.0.10", 8080),
        Endpoint("fd00::1", 8080),
        Endpoint("fd00::2", 8080),
    )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(addressType="FQDN"),
        lambda s: s.update(metadata={}),
        lambda s: s.update(metadata="x"),
        lambda s: s.update(addressType=None),
    ],
)
def test_slices_that_are_not_ip_slices_with_a_name_are_ignored(mutate: Any) -> None:
    s = _slice("a", [("10.0.0.1", True)])
    mutate(s)
    assert parse_slice(s) is None


def test_hostile_fields_drop_the_endpoint_not_the_process() -> None:
    s = _slice("a", [("10.0.0.1", True)])
    s["endpoints"] += [
        {"addresses": "10.0.0.2"},
        {"addresses": []},
        {"addresses": [7]},
        {"addresses": ["not-an-ip"]},
        {"addresses": ["fd00::1"]},  # the wrong family for an IPv4 slice
        {"addresses": ["1" * 10_000]},
        "junk",
    ]
    s["ports"] += [{"name": "http", "port": "8080"}, {"name": "http", "port": 70000}, {"name": 5, "port": 1}, None]
    assert _ready(s) == (Endpoint("10.0.0.1", 8080),)
    assert parse_slice({"metadata": {"name": "x"}, "addressType": "IPv4", "ports": "x", "endpoints": 5}) == Slice(
        "x", (), ()
    )
    assert parse_slice(None) is None


def test_the_endpoint_cap_keeps_the_first_by_address() -> None:
    s = _slice("a", [(f"10.0.{i // 250}.{i % 250}", True) for i in range(30)])
    parsed = [parse_slice(s)]
    capped = ready_endpoints([p for p in parsed if p is not None], "http", limit=10)
    assert capped.capped
    assert capped.endpoints[0] == Endpoint("10.0.0.0", 8080) and len(capped.endpoints) == 10
    assert not ready_endpoints([p for p in parsed if p is not None], "http").capped


def test_events_add_modify_and_delete_copy_on_write() -> None:
    empty: dict[str, Slice] = {}
    added = apply_event(empty, "ADDED", _slice("a", [("10.0.0.1", True)]))
    assert added.changed and set(added.slices) == {"a"} and empty == {}
    same = apply_event(added.slices, "MODIFIED", _slice("a", [("10.0.0.1", True)]))
    assert not same.changed and same.slices is added.slices
    modified = apply_event(added.slices, "MODIFIED", _slice("a", [("10.0.0.1", False)]))
    assert modified.changed and _ready_of(modified.slices) == ()
    assert _ready_of(added.slices) == (Endpoint("10.0.0.1", 8080),)  # a reader's mapping never moves
    deleted = apply_event(modified.slices, "DELETED", {"metadata": {"name": "a"}})
    assert deleted.changed and deleted.slices == {}
    assert not apply_event(deleted.slices, "DELETED", {"metadata": {"name": "a"}}).changed


def test_bookmarks_errors_and_unknown_types_change_no_slice() -> None:
    slices = apply_event({}, "ADDED", _slice("a", [("10.0.0.1", True)])).slices
    for kind in ("BOOKMARK", "ERROR", "SURPRISE"):
        applied = apply_event(slices, kind, {"metadata": {"name": "a", "resourceVersion": "9"}})
        assert not applied.changed and applied.slices is slices


def test_a_slice_turning_fqdn_is_removed() -> None:
    slices = apply_event({}, "ADDED", _slice("a", [("10.0.0.1", True)])).slices
    turned = apply_event(slices, "MODIFIED", _slice("a", [("api.example", True)], address_type="FQDN"))
    assert turned.changed and turned.slices == {}


def test_the_slice_cap_drops_new_slices_and_says_so() -> None:
    slices = from_list([_slice("a", [("10.0.0.1", True)]), _slice("b", [("10.0.0.2", True)])], limit=2)[0]
    dropped = apply_event(slices, "ADDED", _slice("c", [("10.0.0.3", True)]), limit=2)
    assert dropped.dropped and not dropped.changed and set(dropped.slices) == {"a", "b"}
    kept = apply_event(slices, "MODIFIED", _slice("b", [("10.0.0.4", True)]), limit=2)
    assert kept.changed and not kept.dropped


def test_a_list_over_the_cap_keeps_the_first_by_name() -> None:
    items = [_slice(name, [("10.0.0.1", True)]) for name in ("c", "a", "b")] + ["junk"]
    slices, capped = from_list(items, limit=2)
    assert capped and list(slices) == ["a", "b"]
    assert from_list(items, limit=3) == ({"a": slices["a"], "b": slices["b"], "c": parse_slice(items[0])}, False)


def _ready_of(slices: dict[str, Slice] | Any) -> tuple[Endpoint, ...]:
    return ready_endpoints(slices.values(), "http").endpoints


# Addresses a slice may list that must never receive the backend's traffic (and its injected credential): the
# gateway's own host, a cloud's metadata service, multicast. Before the refusal they were all served.
REFUSED = [
    ("127.0.0.1", "IPv4", "loopback"),
    ("127.3.4.5", "IPv4", "loopback"),
    ("0.0.0.0", "IPv4", "unspecified"),
    ("169.254.169.254", "IPv4", "link-local"),
    ("169.254.0.1", "IPv4", "link-local"),
    ("100.100.100.200", "IPv4", "metadata"),
    ("224.0.0.1", "IPv4", "multicast"),
    ("239.1.2.3", "IPv4", "multicast"),
    ("255.255.255.255", "IPv4", "reserved"),
    ("::1", "IPv6", "loopback"),
    ("0::1", "IPv6", "loopback"),
    ("::", "IPv6", "unspecified"),
    ("::ffff:127.0.0.1", "IPv6", "ipv4-mapped"),
    ("::ffff:169.254.169.254", "IPv6", "ipv4-mapped"),
    ("::ffff:10.0.0.1", "IPv6", "ipv4-mapped"),
    ("::127.0.0.1", "IPv6", "ipv4-compatible"),
    ("fe80::1", "IPv6", "link-local"),
    ("fd00:ec2::254", "IPv6", "metadata"),
    ("fd20:ce::254", "IPv6", "metadata"),
    ("ff02::1", "IPv6", "multicast"),
]


@pytest.mark.parametrize(("address", "family", "reason"), REFUSED)
def test_an_address_on_the_gateway_host_or_a_metadata_service_is_refused(
    address: str, family: str, reason: str
) -> None:
    good = "10.0.0.9" if family == "IPv4" else "fd00::9"
    parsed = parse_slice(_slice("a", [(address, True), (good, True)], address_type=family))
    assert parsed is not None
    assert parsed.addresses == (good,)
    assert [r for _, r in parsed.refused] == [reason]
    assert ready_endpoints([parsed], "http").endpoints == (Endpoint(good, 8080),)


def test_pod_and_service_ranges_are_not_refused() -> None:
    ordinary = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "8.8.8.8", "169.255.0.1", "126.255.255.255"]
    parsed = parse_slice(_slice("a", [(a, True) for a in ordinary]))
    assert parsed is not None and parsed.refused == () and len(parsed.addresses) == len(ordinary)
    v6 = parse_slice(_slice("b", [(a, True) for a in ("fd00::1", "2001:db8::1", "fd00:ec2::253")], address_type="IPv6"))
    assert v6 is not None and v6.refused == () and len(v6.addresses) == 3


def test_a_refused_first_address_drops_the_endpoint_even_if_another_is_fine() -> None:
    s = _slice("a", [])
    s["endpoints"] = [{"addresses": ["127.0.0.1", "10.0.0.1"], "conditions": {"ready": True}}]
    parsed = parse_slice(s)
    assert parsed is not None and parsed.addresses == () and parsed.refused == (("127.0.0.1", "loopback"),)


def test_a_not_ready_refused_address_is_not_reported() -> None:
    parsed = parse_slice(_slice("a", [("127.0.0.1", False)]))
    assert parsed is not None and parsed.addresses == () and parsed.refused == ()


def test_allowed_networks_let_a_refused_address_through_and_nothing_else() -> None:
    allow = (ipaddress.ip_network("127.0.0.0/8"),)
    s = _slice("a", [("127.0.0.1", True), ("169.254.169.254", True)])
    parsed = parse_slice(s, allow)
    assert parsed is not None and parsed.addresses == ("127.0.0.1",)
    assert parsed.refused == (("169.254.169.254", "link-local"),)
    slices, _ = from_list([s], allow=allow)
    assert slices["a"].addresses == ("127.0.0.1",)
    assert apply_event({}, "ADDED", s, allow=allow).slices["a"].addresses == ("127.0.0.1",)
    assert apply_event({}, "ADDED", s).slices["a"].addresses == ()


def test_a_services_slices_hold_a_bounded_number_of_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 slices of 1,000 endpoints (the API's own limits, writable by anyone who can write EndpointSlices in the
    namespace) were all kept: ~72 MiB per Service, ~600 MiB while listing."""
    monkeypatch.setattr(kubernetes_slices, "MAX_ADDRESSES_PER_SERVICE", 5, raising=False)
    a = _slice("a", [(f"10.0.0.{i}", True) for i in range(3)])
    b = _slice("b", [(f"10.0.1.{i}", True) for i in range(2)])
    c = _slice("c", [("10.0.2.1", True)])
    slices, capped = from_list([c, b, a])
    assert sorted(slices) == ["a", "b"] and capped  # by name: every replica keeps the same ones
    applied = apply_event(slices, "ADDED", c)
    assert applied.dropped and not applied.changed and applied.slices is slices
    bigger = _slice("b", [(f"10.0.1.{i}", True) for i in range(3)])
    applied = apply_event(slices, "MODIFIED", bigger)  # grown past the bound: left out, its old addresses too
    assert applied.dropped and applied.changed and sorted(applied.slices) == ["a"]
    assert apply_event(applied.slices, "ADDED", c).slices.keys() == {"a", "c"}


def test_an_address_with_a_zone_is_dropped() -> None:
    """`fd00::1%eth0` parses in Python; Envoy refused (NACKed) the assignment holding it and the backend then
    followed no change (tests/test_e2e_kube.py)."""
    parsed = parse_slice(_slice("a", [("fd00::1%eth0", True), ("fd00::2", True)], address_type="IPv6"))
    assert parsed is not None and parsed.addresses == ("fd00::2",)


def test_refused_addresses_count_against_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice's refused addresses are kept (to be reported): 1,000 slices of 1,000 multicast or reserved addresses
    (which the API server stores) were held without bound."""
    monkeypatch.setattr(kubernetes_slices, "MAX_ADDRESSES_PER_SERVICE", 5, raising=False)
    a = _slice("a", [("10.0.0.1", True), ("10.0.0.2", True)])
    b = _slice("b", [(f"239.0.0.{i}", True) for i in range(4)])
    slices, capped = from_list([a, b])
    assert list(slices) == ["a"] and capped
    assert apply_event(slices, "ADDED", b).dropped
