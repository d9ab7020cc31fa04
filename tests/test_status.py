"""`/status` at fleet size: filters, summary and paging over thousands of proxies, the endpoint, and the CLI.

Why: with 10,000 proxies the status view is only useful if the server filters and counts (the whole filtered
fleet, not the listed page) and lists a bounded page by default. The expected numbers here come from the
synthetic fleet's own description (`Spec`), never from the code under test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from controlplane.admin.http import AdminServer, BadQuery, parse_status_query
from controlplane.cli.main import main
from controlplane.cli.status import StatusFilters, add_status_arguments, format_other_versions, status_url
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, SECRET, Snapshot
from controlplane.xds.fleet_status import (
    DEFAULT_LIMIT,
    VERSIONS_LISTED,
    FleetQuery,
    ProxyRegistry,
    cache_versions,
    fleet_status,
    is_stale,
    node_matcher,
)

FLEET = 6_000
GROUPS = ("g0", "g1", "g2")
LABELS = {SECRET: "sds", CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}


def current_version(group: str, type_url: str) -> str:
    return f"{group}-{LABELS[type_url]}-v2"


def current_versions(group: str) -> dict[str, str]:
    return {t: current_version(group, t) for t in LABELS}


@dataclass(frozen=True)
class Spec:
    """One synthetic proxy, described independently of the registry."""

    index: int

    @property
    def node(self) -> str:
        return f"node-{self.index:05d}"

    @property
    def group(self) -> str:
        return GROUPS[self.index % 3]

    @property
    def protocol(self) -> str:
        return "delta" if self.index % 4 == 0 else "sotw"

    @property
    def acked(self) -> dict[str, str]:
        """CDS and LDS for all, EDS and RDS for even indexes, SDS never; some CDS and LDS one version behind."""
        types = [CLUSTER, LISTENER] + ([ENDPOINT, ROUTE] if self.index % 2 == 0 else [])
        versions = {t: current_version(self.group, t) for t in types}
        if self.index % 10 == 7:
            versions[CLUSTER] = f"{self.group}-cds-v1"
        if self.index % 25 == 3:
            versions[LISTENER] = f"{self.group}-lds-v1"
        return versions

    @property
    def nacking(self) -> bool:
        return self.index % 50 == 1

    @property
    def stale(self) -> bool:
        return self.index % 10 == 7 or self.index % 25 == 3


SPECS = [Spec(i) for i in range(FLEET)]


def build_fleet(specs: list[Spec]) -> ProxyRegistry:
    registry = ProxyRegistry()
    for spec in specs:
        record = registry.connect(spec.node, spec.group, f"10.{spec.index // 65536}.0.{spec.index % 256}:4242", 1e9)
        record.protocol = spec.protocol
        for type_url, version in spec.acked.items():
            registry.acked(record, type_url, version)
        if spec.nacking:
            registry.nacked(record, LISTENER, f"{spec.group}-lds-v3", "duplicate listener", 1e9 + spec.index)
    return registry


@pytest.fixture(scope="module")
def fleet() -> ProxyRegistry:
    return build_fleet(SPECS)


def ordered_nodes(specs: list[Spec]) -> list[str]:
    return [s.node for s in sorted(specs, key=lambda s: (s.group, s.node))]


# --- summary and filters over a synthetic fleet ---------------------------------------------------------------


def test_whole_fleet_counts_by_hand(fleet: ProxyRegistry) -> None:
    summary = fleet.fleet(FleetQuery(), current_versions)["summary"]
    # i % 10 == 7 (600) and i % 25 == 3 (240) never coincide; i % 50 == 1 (120) is neither.
    assert (summary["connected"], summary["proxies"], summary["stale"], summary["nacking"]) == (6000, 6000, 840, 120)
    assert summary["by_group"] == {"g0": 2000, "g1": 2000, "g2": 2000}
    g0 = summary["groups"]["g0"]
    assert g0["protocols"] == {"delta": 500, "sotw": 1500}  # i % 12 == 0 among i % 3 == 0
    assert g0["types"]["sds"] == {
        "current": "g0-sds-v2",
        "on_current": 0,
        "stale": 0,
        "no_ack": 2000,  # never subscribed is not stale
        "nacking": 0,
        "versions": {},
        "other_versions": 0,
    }


def expected_group(specs: list[Spec], group: str) -> dict[str, object]:
    """The per-group summary, computed straight from the specs."""
    members = [s for s in specs if s.group == group]
    types: dict[str, object] = {}
    for type_url, label in LABELS.items():
        held = Counter(s.acked[type_url] for s in members if type_url in s.acked)
        current = current_version(group, type_url)
        ranked = sorted(held.items(), key=lambda item: (-item[1], item[0]))[:VERSIONS_LISTED]
        types[label] = {
            "current": current,
            "on_current": held[current],
            "stale": sum(held.values()) - held[current],
            "no_ack": len(members) - sum(held.values()),
            "nacking": sum(1 for s in members if s.nacking and type_url == LISTENER),
            "versions": dict(ranked),
            "other_versions": 0,
        }
    return {
        "proxies": len(members),
        "nacking": sum(s.nacking for s in members),
        "stale": sum(s.stale for s in members),
        "protocols": dict(sorted(Counter(s.protocol for s in members).items())),
        "types": types,
    }


def test_group_summaries_match_the_specs(fleet: ProxyRegistry) -> None:
    groups = fleet.fleet(FleetQuery(proxies=False), current_versions)["summary"]["groups"]
    assert groups == {g: expected_group(SPECS, g) for g in GROUPS}


QUERIES: list[tuple[FleetQuery, Callable[[Spec], bool]]] = [
    (FleetQuery(group="g1"), lambda s: s.group == "g1"),
    (FleetQuery(protocol="delta"), lambda s: s.protocol == "delta"),
    (FleetQuery(nacked=True), lambda s: s.nacking),
    (FleetQuery(stale=True), lambda s: s.stale),
    (FleetQuery(node="0042"), lambda s: "0042" in s.node),
    (FleetQuery(node="node-01*7"), lambda s: s.node.startswith("node-01") and s.node.endswith("7")),
    (FleetQuery(node="node-0?00?"), lambda s: s.node[5] == "0" and s.node[7:9] == "00"),
    (
        FleetQuery(group="g2", stale=True, protocol="sotw"),
        lambda s: s.group == "g2" and s.stale and s.protocol == "sotw",
    ),
    (FleetQuery(group="g0", nacked=True, stale=True), lambda s: False),  # NACKing proxies here hold current versions
    (FleetQuery(group="nope"), lambda s: False),
]


def query_id(value: object) -> str | None:
    return repr(value.filters()) if isinstance(value, FleetQuery) else None


@pytest.mark.parametrize(("query", "admits"), QUERIES, ids=query_id)
def test_filters_count_and_summarise_the_filtered_fleet(
    fleet: ProxyRegistry, query: FleetQuery, admits: Callable[[Spec], bool]
) -> None:
    matching = [s for s in SPECS if admits(s)]
    result = fleet.fleet(query, current_versions)
    summary = result["summary"]
    assert summary["connected"] == FLEET
    assert result["page"]["total"] == summary["proxies"] == len(matching)
    assert summary["by_group"] == dict(sorted(Counter(s.group for s in matching).items()))
    assert summary["nacking"] == sum(s.nacking for s in matching)
    assert summary["stale"] == sum(s.stale for s in matching)
    assert [p["node"] for p in result["proxies"]] == ordered_nodes(matching)[:DEFAULT_LIMIT]
    assert result["page"]["shown"] == min(len(matching), DEFAULT_LIMIT)
    for group in summary["groups"]:
        assert summary["groups"][group] == expected_group(matching, group)


def test_pages_walk_the_whole_selection_in_order(fleet: ProxyRegistry) -> None:
    walked: list[str] = []
    offset = 0
    while True:
        result = fleet.fleet(FleetQuery(group="g1", limit=300, offset=offset), current_versions)
        assert result["page"]["total"] == 2000
        if not result["proxies"]:
            break
        walked += [p["node"] for p in result["proxies"]]
        offset += 300
    assert walked == ordered_nodes([s for s in SPECS if s.group == "g1"])
    assert len(fleet.fleet(FleetQuery(limit=None), current_versions)["proxies"]) == FLEET


def test_summary_only_and_limit_zero_list_nothing_but_count_everything(fleet: ProxyRegistry) -> None:
    summary_only = fleet.fleet(FleetQuery(proxies=False, nacked=True), current_versions)
    assert "proxies" not in summary_only
    assert summary_only["page"] == {"total": 120, "offset": 0, "limit": DEFAULT_LIMIT, "shown": 0}
    assert summary_only["filters"] == {"nacked": True}
    none_listed = fleet.fleet(FleetQuery(limit=0), current_versions)
    assert none_listed["proxies"] == []
    assert none_listed["summary"]["proxies"] == FLEET


def test_listed_rows_are_the_full_proxy_records(fleet: ProxyRegistry) -> None:
    (row,) = fleet.fleet(FleetQuery(node="node-00001"), current_versions)["proxies"]
    assert row["node"] == "node-00001" and row["group"] == "g1" and row["protocol"] == "sotw"
    assert row["peer"] == "10.0.0.1:4242" and row["connected_since"] == 1e9
    assert row["acked"] == {"cds": "g1-cds-v2", "lds": "g1-lds-v2"}
    assert row["last_nack"] == {"type": "lds", "version": "g1-lds-v3", "error": "duplicate listener", "at": 1e9 + 1}


def test_many_versions_are_listed_most_held_first_and_the_rest_counted() -> None:
    registry = ProxyRegistry()
    for i in range(210):  # version k held by k+1 proxies... for k = 0..19 (210 = 1 + 2 + ... + 20)
        version = next(k for k in range(20) if i < (k + 1) * (k + 2) // 2)
        registry.acked(registry.connect(f"n{i}", "g", "p", 0.0), CLUSTER, f"v{version:02d}")
    summary = registry.fleet(FleetQuery(proxies=False), lambda g: {CLUSTER: "v19"})["summary"]
    cds = summary["groups"]["g"]["types"]["cds"]
    assert list(cds["versions"]) == [f"v{k:02d}" for k in range(19, 19 - VERSIONS_LISTED, -1)]
    assert cds["versions"]["v19"] == cds["on_current"] == 20
    assert cds["stale"] == 190
    assert cds["other_versions"] == sum(range(1, 20 - VERSIONS_LISTED + 1))
    assert format_other_versions(cds) == "v18 (19), v17 (18), v16 (17), +" + f"{sum(range(1, 17))} on other versions"


def test_stale_means_holding_a_non_current_version() -> None:
    current = {CLUSTER: "c2", LISTENER: "l2"}
    assert not is_stale([], current)  # nothing ACKed yet: not behind, just not there
    assert not is_stale([(CLUSTER, "c2")], current)
    assert is_stale([(CLUSTER, "c2"), (LISTENER, "l1")], current)
    assert is_stale([(LISTENER, "l2+keep")], current)  # a make-before-break version is on its way, not there
    assert not is_stale([(ROUTE, "r9")], current)  # no current version known for the type: cannot judge


@pytest.mark.parametrize(
    ("pattern", "node", "matches"),
    [
        ("prod", "gw-prod-1", True),
        ("gw-prod", "gw-staging", False),
        ("gw-*-1", "gw-prod-1", True),
        ("gw-*-1", "gw-prod-12", False),  # a glob matches the whole id
        ("gw-prod-[12]", "gw-prod-2", True),
        ("GW", "gw-prod-1", False),  # case matters, as node ids are opaque
    ],
)
def test_node_matcher(pattern: str, node: str, matches: bool) -> None:
    match = node_matcher(pattern)
    assert match is not None and bool(match(node)) is matches
    assert node_matcher("") is None and node_matcher(None) is None


def test_current_versions_come_from_the_snapshot_cache() -> None:
    cache = SnapshotCache()
    served = Snapshot.build("known", {CLUSTER: [("c", b"\x0a\x01c")]})
    cache.set(served)
    current = cache_versions(cache)
    assert current("known") == {t: served.version(t) for t in served.types}
    empty = Snapshot.empty("unknown")
    assert current("unknown") == {t: empty.version(t) for t in empty.types}  # what such a proxy is sent

    registry = ProxyRegistry()
    registry.acked(registry.connect("a", "known", "p", 0.0), CLUSTER, served.version(CLUSTER))
    registry.acked(registry.connect("b", "known", "p", 0.0), CLUSTER, "older")
    summary = registry.fleet(FleetQuery(stale=True), current)["summary"]
    assert (summary["proxies"], summary["groups"]["known"]["types"]["cds"]["on_current"]) == (1, 0)


def test_filter_configs_are_listed_only_where_a_group_has_some_or_a_proxy_holds_one() -> None:
    """No compiled policy has ECDS resources yet: the summary of such a group is what it was before ECDS."""
    cache = SnapshotCache()
    cache.set(Snapshot.build("plain", {CLUSTER: [("c", b"\x0a\x01c")]}))
    with_filters = Snapshot.build("filters", {EXTENSION_CONFIG: [("deny", b"\x0a\x04deny")]})
    cache.set(with_filters)
    registry = ProxyRegistry()
    for group in ("plain", "filters"):
        registry.acked(registry.connect(group, group, "p", 0.0), CLUSTER, "v")
    groups = registry.fleet(FleetQuery(), cache_versions(cache))["summary"]["groups"]
    assert list(groups["plain"]["types"]) == ["sds", "cds", "eds", "lds", "rds"]
    assert list(groups["filters"]["types"]) == ["sds", "cds", "eds", "lds", "rds", "ecds"]
    assert groups["filters"]["types"]["ecds"]["current"] == with_filters.version(EXTENSION_CONFIG)
    registry.acked(registry.connect("held", "plain", "p", 0.0), EXTENSION_CONFIG, "older")  # one it still holds
    groups = registry.fleet(FleetQuery(), cache_versions(cache))["summary"]["groups"]
    assert groups["plain"]["types"]["ecds"]["versions"] == {"older": 1}


def test_fleet_status_lists_records_in_the_order_given(fleet: ProxyRegistry) -> None:
    records = [r for r in fleet.records() if r.group == "g0"][:10]
    result = fleet_status(records[::-1], FleetQuery(), current_versions)
    assert result["summary"]["connected"] == 10
    assert [p["node"] for p in result["proxies"]] == [r.node_id for r in records[::-1]]


def test_listing_order_follows_connects_and_disconnects() -> None:
    registry = build_fleet(SPECS[:50])
    assert fleet_nodes(registry) == ordered_nodes(SPECS[:50])
    early = registry.connect("a-first", "g0", "p", 0.0)
    late = registry.connect("z-last", "g0", "p", 0.0)
    assert fleet_nodes(registry)[0] == "a-first" and fleet_nodes(registry)[18] == "z-last"  # after g0's 17
    registry.disconnect(early)
    registry.disconnect(late)
    assert fleet_nodes(registry) == ordered_nodes(SPECS[:50])


def fleet_nodes(registry: ProxyRegistry) -> list[str]:
    return [p["node"] for p in registry.fleet(FleetQuery(limit=None), current_versions)["proxies"]]


# --- query parameters ------------------------------------------------------------------------------------------


def test_parse_status_query_defaults_and_every_parameter() -> None:
    assert parse_status_query({}) == FleetQuery()
    query = parse_status_query(
        {
            "group": "g1",
            "protocol": "delta",
            "node": "gw-*",
            "nacked": "1",
            "stale": "true",
            "limit": "all",
            "offset": "40",
        }
    )
    assert query == FleetQuery("g1", "delta", "gw-*", nacked=True, stale=True, limit=None, offset=40)
    assert parse_status_query({"summary": "1"}).proxies is False
    assert parse_status_query({"proxies": "0"}).proxies is False
    assert parse_status_query({"limit": "0", "group": ""}) == FleetQuery(limit=0)


@pytest.mark.parametrize("query", [{"limit": "-5"}, {"offset": "1.5"}, {"protocol": "xds"}, {"nodes": "x"}])
def test_parse_status_query_refuses_what_it_cannot_honour(query: dict[str, str]) -> None:
    with pytest.raises(BadQuery):
        parse_status_query(query)


# --- 10,000 proxies: time and size ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_fleet() -> tuple[ProxyRegistry, list[Spec]]:
    specs = [Spec(i) for i in range(10_000)]
    return build_fleet(specs), specs


def best_of(runs: int, action: Callable[[], object]) -> float:
    """Best wall time of a few runs: the least noisy figure on a shared machine."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return min(timings)


def test_status_of_10000_proxies_is_fast_and_the_default_answer_small(
    big_fleet: tuple[ProxyRegistry, list[Spec]], capsys: pytest.CaptureFixture[str]
) -> None:
    registry, _ = big_fleet
    server = AdminServer(
        status=lambda: {"version": "x"},
        fleet=lambda q: registry.fleet(q, current_versions),
        ready=lambda: True,
        port=0,  # never started: only its status document is read
    )

    def serve(query: FleetQuery) -> str:
        return json.dumps(server.status_document(query), indent=2, default=str)

    default_body = serve(FleetQuery())
    summary_body = serve(FleetQuery(proxies=False))
    default_time = best_of(5, lambda: serve(FleetQuery()))
    summary_time = best_of(5, lambda: serve(FleetQuery(proxies=False)))
    filtered_time = best_of(5, lambda: serve(FleetQuery(group="g1", stale=True)))
    with capsys.disabled():
        print(
            f"\n/status, 10,000 proxies: default {default_time * 1e3:.1f} ms ({len(default_body)} bytes), "
            f"summary only {summary_time * 1e3:.1f} ms ({len(summary_body)} bytes), "
            f"group+stale {filtered_time * 1e3:.1f} ms"
        )
    assert len(json.loads(default_body)["proxies"]) == DEFAULT_LIMIT
    assert len(default_body) < 64_000
    assert len(summary_body) < 16_000
    # The target is well under 100 ms; the bound leaves room for a loaded CI machine.
    assert default_time < 0.25 and summary_time < 0.25 and filtered_time < 0.25


# --- the endpoint and the command at fleet size -----------------------------------------------------------------


@dataclass
class Served:
    url: str
    specs: list[Spec]


@pytest.fixture
async def served(big_fleet: tuple[ProxyRegistry, list[Spec]]) -> AsyncIterator[Served]:
    registry, specs = big_fleet
    status = {"version": "x", "policy": {"root": "/p", "errors": [], "last_good_load": time.time()}}
    server = AdminServer(
        status=lambda: status, fleet=lambda q: registry.fleet(q, current_versions), ready=lambda: True, port=0
    )
    port = await server.start()
    try:
        yield Served(f"http://127.0.0.1:{port}", specs)
    finally:
        await server.stop()


async def fetch_json(url: str) -> Any:
    def read() -> Any:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    return await asyncio.to_thread(read)


async def test_endpoint_filters_and_pages_10000_proxies(served: Served) -> None:
    status = await fetch_json(f"{served.url}/status?group=g1&stale=1&protocol=sotw&limit=5&offset=5")
    matching = [s for s in served.specs if s.group == "g1" and s.stale and s.protocol == "sotw"]
    assert status["page"] == {"total": len(matching), "offset": 5, "limit": 5, "shown": 5}
    assert [p["node"] for p in status["proxies"]] == ordered_nodes(matching)[5:10]
    assert status["filters"] == {"group": "g1", "stale": True, "protocol": "sotw"}
    assert status["summary"]["stale"] == len(matching)
    assert status["summary"]["connected"] == 10_000
    default = await fetch_json(f"{served.url}/status")
    assert len(default["proxies"]) == DEFAULT_LIMIT


async def run_main(*argv: str) -> int:
    return await asyncio.to_thread(main, ["status", *argv])


async def test_cli_lists_a_page_and_says_how_many_it_left_out(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_main("--admin", served.url, "--group", "g2", "--stale", "--limit", "3")
    out = capsys.readouterr().out
    matching = [s for s in served.specs if s.group == "g2" and s.stale]
    assert code == 0  # no g2 proxy NACKing is also stale
    assert f"proxies: {len(matching)} of 10000 connected match group=g2 stale, 0 NACKing" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith("node-")]
    assert rows == ordered_nodes(matching)[:3]
    assert f"showing 3 of {len(matching)} proxies (use --limit N or --limit all" in out


async def test_cli_exit_code_counts_nacks_beyond_the_listed_page(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    # node-00000 (listed) is not NACKing; node-00051 (not listed) is, in g0: the exit code still says so.
    assert await run_main("--admin", served.url, "--group", "g0", "--limit", "1") == 2
    out = capsys.readouterr().out
    assert "node-00000" in out and "node-00051" not in out
    assert await run_main("--admin", served.url, "--summary") == 2


async def test_cli_summary_prints_the_tables_but_no_proxies(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_main("--admin", served.url, "--summary", "--protocol", "delta") == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    delta = [s for s in served.specs if s.protocol == "delta"]
    stale, nacking = sum(s.stale for s in delta), sum(s.nacking for s in delta)
    assert (len(delta), stale, nacking) == (2500, 100, 0)  # i % 4 == 0: even, so never i % 50 == 1 or i % 10 == 7
    assert (
        lines[0]
        == "proxies: 2500 of 10000 connected match protocol=delta, 0 NACKing, 100 stale (not on the current version)"
    )
    assert lines[1] == "GROUP PROXIES SOTW DELTA NACKING STALE"
    assert "GROUP TYPE CURRENT ON CURRENT STALE NO ACK NACKING OTHER VERSIONS" in lines
    assert not any(line.startswith(("NODE", "node-", "showing")) for line in lines)


async def test_cli_json_mirrors_the_filters(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_main("--admin", served.url, "--json", "--node", "node-000*", "--limit", "all") == 2
    printed = json.loads(capsys.readouterr().out)
    assert printed["page"]["total"] == len(printed["proxies"]) == 100  # node-00000 to node-00099
    assert printed["filters"] == {"node": "node-000*"}


def test_status_arguments_and_url() -> None:
    parser = argparse.ArgumentParser()
    add_status_arguments(parser)
    args = parser.parse_args(
        [
            *("--group", "g", "--protocol", "delta", "--node", "gw-*", "--nacked", "--stale"),
            *("--limit", "all", "--offset", "20", "--summary"),
        ]
    )
    filters = StatusFilters.from_args(args)
    assert filters == StatusFilters("g", "delta", "gw-*", True, True, "all", 20, True)
    assert status_url("http://h:1/", filters) == (
        "http://h:1/status?group=g&protocol=delta&node=gw-%2A&nacked=1&stale=1&limit=all&offset=20&summary=1"
    )
    assert status_url("http://h:1", StatusFilters.from_args(parser.parse_args([]))) == "http://h:1/status"
    too_many = "9" * 5000  # found by fuzzing: --limit passed it on to the server
    for bad in (
        ["--limit", "-1"],
        ["--limit", "lots"],
        ["--offset", "-2"],
        ["--protocol", "grpc"],
        ["--limit", too_many],
        ["--offset", too_many],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
