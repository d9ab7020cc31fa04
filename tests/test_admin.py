"""Admin HTTP server and the `controlplane status` command, against a real loopback server on port 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from controlplane.admin.http import AdminServer
from controlplane.cli.status import StatusFilters, add_status_arguments, format_age, format_nack, run_status
from controlplane.snapshots.snapshot import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, SECRET
from controlplane.telemetry.metrics import SNAPSHOT_BUILDS
from controlplane.xds.fleet_status import ProxyRegistry


def fake_status() -> dict[str, Any]:
    """The fleet-independent part of a status document (what ``ControlPlane.status`` returns)."""
    return {
        "version": "0.1.0",
        "policy": {
            "root": "/etc/controlplane/policy",
            "last_good_load": time.time() - 0.5 - 125,
            "errors": [],
            "snapshot_versions": {"ci-prod": "a" * 12, "ci-staging": "b" * 12},
        },
    }


CURRENT = {"ci-prod": "a" * 64, "ci-staging": "b" * 64}  # every type of a group is at one version here


def current_versions(group: str) -> dict[str, str]:
    return {t: CURRENT[group] for t in (SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE)} if group in CURRENT else {}


def fake_fleet() -> ProxyRegistry:
    """Two groups, three proxies: one on the current version, one behind (stale), one currently NACKing LDS.

    Times sit half a second past whole seconds, so ages print the same as long as the test reads them
    within half a second of building the fleet.
    """
    now = time.time() - 0.5
    registry = ProxyRegistry()
    prod1 = registry.connect("gw-prod-1", "ci-prod", "10.0.0.1:4242", now - 192)
    for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        registry.acked(prod1, type_url, "a" * 64)
    prod2 = registry.connect("gw-prod-2", "ci-prod", "10.0.0.2:4242", now - 3700)
    registry.acked(prod2, CLUSTER, "c" * 64)
    registry.acked(prod2, LISTENER, "c" * 64)
    staging = registry.connect("gw-staging-1", "ci-staging", "10.0.1.1:4242", now - 5)
    staging.protocol = "delta"
    registry.acked(staging, CLUSTER, "b" * 64)
    error = "Error adding/updating listener(s) ingress:\n  duplicate\tfilter chain match"
    registry.nacked(staging, LISTENER, "d" * 64, error, now - 2)
    return registry


def healthy(registry: ProxyRegistry) -> ProxyRegistry:
    """End every NACK the way a proxy does: by ACKing the type again."""
    for record in registry.records():
        for type_url in list(record.nacks):
            registry.acked(record, type_url, CURRENT[record.group])
    return registry


@dataclass
class Admin:
    server: AdminServer
    url: str
    status: dict[str, Any] = field(default_factory=fake_status)
    registry: ProxyRegistry = field(default_factory=fake_fleet)
    ready: bool = False


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    holder: list[Admin] = []
    server = AdminServer(
        status=lambda: holder[0].status,
        fleet=lambda query: holder[0].registry.fleet(query, current_versions),
        ready=lambda: holder[0].ready,
        port=0,
    )
    port = await server.start()
    holder.append(Admin(server, f"http://127.0.0.1:{port}"))
    try:
        yield holder[0]
    finally:
        await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with http.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


async def status_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    code, ctype, body = await get(http, url)
    assert code == 200, body
    assert ctype.startswith("application/json")
    result: dict[str, Any] = json.loads(body)
    return result


def squash(line: str) -> str:
    """A table row with column padding collapsed, so assertions do not depend on column widths."""
    return " ".join(line.split())


def nodes(status: dict[str, Any]) -> list[str]:
    return [p["node"] for p in status["proxies"]]


# --- endpoints ----------------------------------------------------------------------------------------------


async def test_start_reports_ephemeral_port(admin: Admin) -> None:
    port = int(admin.url.rsplit(":", 1)[1])
    assert port > 0


async def test_healthz_ok(admin: Admin, http: aiohttp.ClientSession) -> None:
    code, _, body = await get(http, admin.url + "/healthz")
    assert (code, body.strip()) == (200, "ok")


async def test_readyz_flips_from_503_to_200(admin: Admin, http: aiohttp.ClientSession) -> None:
    code, _, body = await get(http, admin.url + "/readyz")
    assert code == 503
    assert body.startswith("not ready")
    admin.ready = True
    code, _, _ = await get(http, admin.url + "/readyz")
    assert code == 200


async def test_readyz_503_when_check_raises(http: aiohttp.ClientSession) -> None:
    def broken() -> bool:
        raise RuntimeError("state not initialised")

    server = AdminServer(status=fake_status, ready=broken, port=0)
    port = await server.start()
    try:
        code, _, body = await get(http, f"http://127.0.0.1:{port}/readyz")
    finally:
        await server.stop()
    assert code == 503
    assert "state not initialised" in body


async def test_readyz_says_why_it_is_not_ready(http: aiohttp.ClientSession) -> None:
    reason = "policy reload running for 75s, over the 60s limit"
    server = AdminServer(status=fake_status, ready=lambda: False, not_ready_reason=lambda: reason, port=0)
    port = await server.start()
    try:
        code, _, body = await get(http, f"http://127.0.0.1:{port}/readyz")
    finally:
        await server.stop()
    assert (code, body) == (503, f"not ready: {reason}\n")


async def test_metrics_exposition(admin: Admin, http: aiohttp.ClientSession) -> None:
    SNAPSHOT_BUILDS.inc()
    code, ctype, body = await get(http, admin.url + "/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    assert "version=0.0.4" in ctype
    assert "controlplane_snapshot_builds_total" in body
    assert "# TYPE controlplane_snapshot_builds_total counter" in body


async def test_status_unfiltered(admin: Admin, http: aiohttp.ClientSession) -> None:
    status = await status_json(http, admin.url + "/status")
    assert {k: status[k] for k in admin.status} == admin.status  # the fleet-independent part as produced
    assert nodes(status) == ["gw-prod-1", "gw-prod-2", "gw-staging-1"]
    assert status["proxies"][0] == {
        "node": "gw-prod-1",
        "group": "ci-prod",
        "protocol": "sotw",
        "connected_since": status["proxies"][0]["connected_since"],
        "peer": "10.0.0.1:4242",
        "acked": {t: "a" * 64 for t in ("cds", "eds", "lds", "rds")},
        "last_nack": None,
    }
    assert status["page"] == {"total": 3, "offset": 0, "limit": 100, "shown": 3}
    assert status["filters"] == {}
    summary = status["summary"]
    assert (summary["connected"], summary["proxies"], summary["nacking"], summary["stale"]) == (3, 3, 1, 1)
    assert summary["by_group"] == {"ci-prod": 2, "ci-staging": 1}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("group=ci-prod", ["gw-prod-1", "gw-prod-2"]),
        ("group=ci-pro", []),  # group is exact, not a prefix
        ("node=prod-2", ["gw-prod-2"]),
        ("node=gw", ["gw-prod-1", "gw-prod-2", "gw-staging-1"]),
        ("node=gw-*-1", ["gw-prod-1", "gw-staging-1"]),  # a glob matches the whole id
        ("node=prod-*", []),
        ("nacked=1", ["gw-staging-1"]),
        ("nacked=0", ["gw-prod-1", "gw-prod-2", "gw-staging-1"]),
        ("stale=1", ["gw-prod-2"]),
        ("protocol=delta", ["gw-staging-1"]),
        ("protocol=sotw&stale=yes", ["gw-prod-2"]),
        ("group=ci-prod&nacked=1", []),
        ("group=ci-staging&node=staging&nacked=true", ["gw-staging-1"]),
        ("limit=2", ["gw-prod-1", "gw-prod-2"]),
        ("limit=1&offset=2", ["gw-staging-1"]),
        ("limit=all&offset=1", ["gw-prod-2", "gw-staging-1"]),
        ("limit=0", []),
    ],
)
async def test_status_filters(admin: Admin, http: aiohttp.ClientSession, query: str, expected: list[str]) -> None:
    status = await status_json(http, f"{admin.url}/status?{query}")
    assert nodes(status) == expected
    assert status["summary"]["connected"] == 3  # what the filtered view was taken from


async def test_status_summary_covers_the_filtered_fleet_not_the_page(admin: Admin, http: aiohttp.ClientSession) -> None:
    status = await status_json(http, admin.url + "/status?group=ci-prod&limit=1")
    assert nodes(status) == ["gw-prod-1"]
    assert status["page"] == {"total": 2, "offset": 0, "limit": 1, "shown": 1}
    assert status["filters"] == {"group": "ci-prod"}
    assert status["summary"]["by_group"] == {"ci-prod": 2}
    cds = status["summary"]["groups"]["ci-prod"]["types"]["cds"]
    assert cds == {
        "current": "a" * 64,
        "on_current": 1,
        "stale": 1,
        "no_ack": 0,
        "nacking": 0,
        "versions": {"a" * 64: 1, "c" * 64: 1},
        "other_versions": 0,
    }


@pytest.mark.parametrize("query", ["summary=1", "proxies=0", "summary=1&nacked=1"])
async def test_status_summary_omits_proxies(admin: Admin, http: aiohttp.ClientSession, query: str) -> None:
    status = await status_json(http, f"{admin.url}/status?{query}")
    assert "proxies" not in status
    assert status["summary"]["nacking"] == 1
    assert status["policy"]["root"] == "/etc/controlplane/policy"


async def test_status_without_a_fleet_serves_the_document_as_produced(http: aiohttp.ClientSession) -> None:
    document = {**fake_status(), "proxies": [{"node": "n"}]}
    server = AdminServer(status=lambda: document, ready=lambda: True, port=0)
    port = await server.start()
    try:
        assert await status_json(http, f"http://127.0.0.1:{port}/status") == document
        assert "proxies" not in await status_json(http, f"http://127.0.0.1:{port}/status?summary=1")
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("nacked=maybe", "nacked"),
        ("stale=2", "stale"),
        ("protocol=grpc", "protocol"),
        ("limit=-1", "limit"),
        ("limit=ten", "limit"),
        ("offset=all", "offset"),
        ("grop=ci-prod", "grop"),  # a typo must not answer for the whole fleet
        ("limit=" + "9" * 5000, "limit"),  # past int()'s 4300-digit cap: was a 500 with a traceback
        ("offset=" + "1" * 5000, "offset"),
        ("limit=1000000001", "limit"),
        ("group=" + "g" * 5000, "group"),
        ("node=" + "n" * 5000, "node"),
        ("nacked=" + "1" * 5000, "nacked"),
        ("proxies=0&summary=01", "summary"),  # found by fuzzing: a false `proxies` left `summary` unchecked
    ],
)
async def test_status_rejects_bad_query(admin: Admin, http: aiohttp.ClientSession, query: str, named: str) -> None:
    code, _, body = await get(http, f"{admin.url}/status?{query}")
    assert code == 400
    assert named in body


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_endpoints_without_parameters_refuse_any(admin: Admin, http: aiohttp.ClientSession, path: str) -> None:
    admin.ready = True
    code, _, body = await get(http, f"{admin.url}{path}?verbose=1")
    assert code == 400
    assert "verbose" in body


async def test_status_reads_live_state(admin: Admin, http: aiohttp.ClientSession) -> None:
    healthy(admin.registry)
    assert (await status_json(http, admin.url + "/status?nacked=1"))["proxies"] == []


async def test_unknown_path_404_and_non_get_405(admin: Admin, http: aiohttp.ClientSession) -> None:
    assert (await get(http, admin.url + "/nope"))[0] == 404
    for method in ("POST", "PUT", "DELETE"):
        async with http.request(method, admin.url + "/status") as response:
            assert response.status == 405, method


async def test_no_info_logs_per_request(
    admin: Admin, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for path in ("/healthz", "/metrics", "/status", "/nope"):
            await get(http, admin.url + path)
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


async def test_warns_when_bound_beyond_loopback(caplog: pytest.LogCaptureFixture) -> None:
    server = AdminServer(status=fake_status, ready=lambda: True, host="0.0.0.0", port=0)
    with caplog.at_level(logging.WARNING, logger="controlplane.admin.http"):
        await server.start()
        await server.stop()
    assert any("no authentication" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


async def test_no_warning_on_loopback(caplog: pytest.LogCaptureFixture) -> None:
    server = AdminServer(status=fake_status, ready=lambda: True, port=0)
    with caplog.at_level(logging.WARNING, logger="controlplane.admin.http"):
        await server.start()
        await server.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_stop_is_idempotent_and_releases_port(http: aiohttp.ClientSession) -> None:
    server = AdminServer(status=fake_status, ready=lambda: True, port=0)
    port = await server.start()
    await server.stop()
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(http, f"http://127.0.0.1:{port}/healthz")


# --- controlplane status ------------------------------------------------------------------------------------


async def run_cli(
    url: str,
    *,
    as_json: bool = False,
    group: str | None = None,
    nacked_only: bool = False,
    filters: StatusFilters | None = None,
) -> int:
    # run_status blocks on urllib; the server lives on this loop, so the client must run in a thread.
    return await asyncio.to_thread(
        run_status, url, as_json=as_json, group=group, nacked_only=nacked_only, filters=filters
    )


async def test_cli_table_healthy_exits_0(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    healthy(admin.registry)
    assert await run_cli(admin.url) == 0
    out = capsys.readouterr().out
    lines = [squash(line) for line in out.splitlines()]
    assert lines[:4] == [
        "proxies: 3 connected, 0 NACKing, 1 stale (not on the current version)",
        "GROUP PROXIES SOTW DELTA NACKING STALE",
        "ci-prod 2 2 0 0 1",
        "ci-staging 1 0 1 0 0",
    ]
    versions = lines.index("GROUP TYPE CURRENT ON CURRENT STALE NO ACK NACKING OTHER VERSIONS")
    assert lines[versions + 1 : versions + 8] == [
        "ci-prod cds aaaaaaaa 1 1 0 0 cccccccc (1)",
        "ci-prod eds aaaaaaaa 1 0 1 0 -",
        "ci-prod lds aaaaaaaa 1 1 0 0 cccccccc (1)",
        "ci-prod rds aaaaaaaa 1 0 1 0 -",
        "ci-staging cds bbbbbbbb 1 0 0 0 -",  # sds, eds, rds: nobody holds them, no row
        "ci-staging lds bbbbbbbb 1 0 0 0 -",
        "",
    ]
    table = lines.index("NODE GROUP PROTO PEER CONNECTED SINCE SDS CDS EDS LDS ECDS RDS LAST NACK")
    assert table > versions
    assert lines[table + 1 : table + 5] == [
        "gw-prod-1 ci-prod sotw 10.0.0.1:4242 3m12s - aaaaaaaa aaaaaaaa aaaaaaaa - aaaaaaaa -",
        "gw-prod-2 ci-prod sotw 10.0.0.2:4242 1h01m - cccccccc - cccccccc - - -",
        "gw-staging-1 ci-staging delta 10.0.1.1:4242 5s - bbbbbbbb - bbbbbbbb - - -",
        "showing 3 of 3 proxies",
    ]
    assert "last good load: 2m05s ago" in out
    assert "errors: none" in out
    assert lines.index("policy: /etc/controlplane/policy") > table  # errors end up next to the prompt


async def test_cli_table_shows_the_filter_configs_each_proxy_holds(
    admin: Admin, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ECDS column sits in push order, between listeners and routes; "-" for a proxy holding none."""
    healthy(admin.registry)
    (prod1,) = (r for r in admin.registry.records() if r.node_id == "gw-prod-1")
    admin.registry.acked(prod1, EXTENSION_CONFIG, "e" * 64)
    assert await run_cli(admin.url) == 0
    lines = [squash(line) for line in capsys.readouterr().out.splitlines()]
    table = lines.index("NODE GROUP PROTO PEER CONNECTED SINCE SDS CDS EDS LDS ECDS RDS LAST NACK")
    assert lines[table + 1 : table + 3] == [
        "gw-prod-1 ci-prod sotw 10.0.0.1:4242 3m12s - aaaaaaaa aaaaaaaa aaaaaaaa eeeeeeee aaaaaaaa -",
        "gw-prod-2 ci-prod sotw 10.0.0.2:4242 1h01m - cccccccc - cccccccc - - -",
    ]


async def test_cli_nack_exits_2_and_shows_squashed_error(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(admin.url) == 2
    out = capsys.readouterr().out
    staging = next(line for line in out.splitlines() if line.startswith("gw-staging-1"))
    squashed = "Error adding/updating listener(s) ingress: duplicate filter chain match"
    assert staging.endswith(f"lds@dddddddd: {squashed[:60].rstrip()}")
    assert format_nack(None) == "-"


async def test_cli_policy_errors_exit_2(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    healthy(admin.registry)
    admin.status["policy"]["errors"] = ["groups/prod.yaml:12: routes[0].backend: unknown backend 'db'"]
    assert await run_cli(admin.url) == 2
    out = capsys.readouterr().out
    assert "groups/prod.yaml:12: routes[0].backend: unknown backend 'db'" in out


async def test_cli_group_filter_scopes_exit_code(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(admin.url, group="ci-prod") == 0
    out = capsys.readouterr().out
    assert "gw-prod-1" in out
    assert "gw-staging-1" not in out


async def test_cli_nacked_only(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(admin.url, nacked_only=True) == 2
    out = capsys.readouterr().out
    assert "gw-staging-1" in out
    assert "gw-prod-1" not in out


async def test_cli_json_output(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(admin.url + "/", as_json=True, group="ci-staging") == 2
    printed = json.loads(capsys.readouterr().out)
    assert [p["node"] for p in printed["proxies"]] == ["gw-staging-1"]


async def test_cli_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    server = AdminServer(status=fake_status, ready=lambda: True, port=0)
    port = await server.start()
    await server.stop()  # nothing listens on this port any more
    url = f"http://127.0.0.1:{port}"
    assert await run_cli(url) == 1
    captured = capsys.readouterr()
    assert f"{url}/status" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


async def test_cli_http_error_exits_1(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli(admin.url + "/nope") == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_status_arguments_default_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_status_arguments(parser)
    args = parser.parse_args([])
    assert (args.admin, args.json, args.group, args.nacked) == ("http://127.0.0.1:9902", False, None, False)

    monkeypatch.setenv("CONTROLPLANE_ADMIN", "http://10.1.2.3:9000")
    parser = argparse.ArgumentParser()
    add_status_arguments(parser)
    args = parser.parse_args(["--json", "--group", "g", "--nacked"])
    assert (args.admin, args.json, args.group, args.nacked) == ("http://10.1.2.3:9000", True, "g", True)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (0, "0s"), (59.9, "59s"), (192, "3m12s"), (3700, "1h01m"), (90000, "1d01h")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=x",
        "application/openmetrics-text;version=1.x;q=0.9,text/plain;q=0.5",
        "text/plain; version=1.0.x",
    ],
)
async def test_metrics_answers_a_version_it_cannot_read_with_the_classic_text(
    admin: Admin, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, accept: str
) -> None:
    # prometheus_client compared such a version with numbers and raised: a 500 and a traceback per scrape
    async with http.get(admin.url + "/metrics", headers={"Accept": accept}) as response:
        status, ctype, body = response.status, response.headers.get("Content-Type", ""), await response.text()
    assert (status, ctype) == (200, "text/plain; version=0.0.4; charset=utf-8"), body[:300]
    assert "# TYPE controlplane_snapshot_builds_total counter" in body
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
