"""`/status?scope=all` and `controlplane status` with replicas: the query's checks, the answer with and without
a shared registry, and the replicas and whole-fleet tables."""

from __future__ import annotations

import io
from typing import Any

import aiohttp

from controlplane.admin.http import AdminServer
from controlplane.cli.status import StatusFilters, render, status_url

NOW = 10_000.0


def document() -> dict[str, Any]:
    return {"version": "1", "policy": {"root": "/p", "errors": [], "last_good_load": NOW}}


async def answers(server: AdminServer, query: str) -> tuple[int, str]:
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/status{query}") as response:
            return response.status, await response.text()
    finally:
        await server.stop()


async def test_scope_all_adds_the_whole_fleet_only_when_asked() -> None:
    everywhere = {"replicas": [{"replica": "a"}], "connected": 0, "proxies": []}
    server = AdminServer(status=document, ready=lambda: True, port=0, whole_fleet=lambda: everywhere)
    code, body = await answers(server, "?scope=all")
    assert code == 200 and '"fleet"' in body
    code, body = await answers(server, "")
    assert code == 200 and '"fleet"' not in body
    code, body = await answers(server, "?scope=everything")
    assert code == 400 and "scope" in body


async def test_scope_all_without_a_registry_is_this_replica() -> None:
    server = AdminServer(status=document, ready=lambda: True, port=0, whole_fleet=lambda: None)
    code, body = await answers(server, "?scope=all")
    assert code == 200 and '"fleet"' not in body


def test_fleet_flag_asks_for_every_replica() -> None:
    assert status_url("http://a", StatusFilters(fleet=True)) == "http://a/status?scope=all"
    assert status_url("http://a", StatusFilters()) == "http://a/status"


def test_render_lists_replicas_and_the_whole_fleet() -> None:
    status = {
        **document(),
        "summary": {"connected": 0, "by_group": {}},
        "store": {
            "leader": {"replica": "alpha", "leader": False, "holder": "beta"},
            "replicas": {
                "replicas": [
                    {"replica": "alpha", "this": True, "state": "up", "leader": False, "xds_address": "h:1",
                     "admin_address": "h:2", "host": "h", "proxies": 0, "versions": {}, "last_seen": NOW - 2},
                    {"replica": "beta", "state": "stale", "leader": True, "xds_address": "k:1",
                     "admin_address": "k:2", "host": "k", "proxies": 1, "versions": {"edge": "abcdef123456"},
                     "last_seen": NOW - 20},
                ],
                "last_error": None,
            },
        },
        "fleet": {
            "replicas": [{"replica": "alpha"}, {"replica": "beta"}],
            "connected": 1,
            "proxies": [{"replica": "beta", "node": "gw-9", "group": "edge", "protocol": "sotw", "acked": {}}],
            "not_listed": 0,
        },
    }  # fmt: skip
    out = io.StringIO()
    render(status, out, now=NOW)
    text = out.getvalue()
    assert "this replica: alpha, follower (leader: beta)" in text
    assert "alpha *  up" in text and "beta     stale  yes" in text and "edge@abcdef12" in text and "20s ago" in text
    assert "whole fleet: 1 proxies on 2 replicas" in text and "beta     gw-9" in text
    plain = io.StringIO()
    render(document() | {"summary": {"connected": 0, "by_group": {}}}, plain, now=NOW)
    assert "replica" not in plain.getvalue()
