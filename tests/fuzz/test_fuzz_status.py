"""Fuzzing `/status`: the query parser against an independent reading of its rules, the admin endpoint over raw
HTTP (400 for anything invalid, never 500), and `controlplane status` against the server (every query the CLI
accepts, the server accepts and reads back the same)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from controlplane.admin.http import STATUS_PARAMETERS, AdminServer, BadQuery, parse_status_query
from controlplane.cli.status import StatusFilters, add_status_arguments, status_url
from controlplane.xds.fleet_status import DEFAULT_LIMIT, PROTOCOLS, FleetQuery, ProxyRegistry
from tests.fuzz.figures import count
from tests.fuzz.http_harness import LoopThread, request, serve
from tests.fuzz.known import AVOID_KNOWN, avoid_known

MAX_COUNT, MAX_TEXT = 1_000_000_000, 256  # the documented bounds, restated (not imported) for independence
TRUE, FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
FLAGS = ("nacked", "stale", "proxies", "summary")

values = (
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "1",
            "01",
            "all",
            "ALL",
            " all ",
            "true",
            "Off",
            "yes",
            "-1",
            "+1",
            "1.5",
            "1e3",
            "0x10",
            "\u0663",
            "١٢",
            "10" * 3,
            "sotw",
            "delta",
            "SotW",
            "replica",
            "g1",
            "node-*",
            "[",
            "%",
            "\x00",
            "é",
            "9" * 4300,
            "9" * 4301,
        ]
    )
    | st.text(max_size=12)
    | st.integers(0, 10**40).map(str)
    | st.integers(4000, 6000).map(lambda n: "7" * n)
)
names = st.sampled_from(STATUS_PARAMETERS) | st.sampled_from(["grop", "Limit", "", "limit "]) | st.text(max_size=6)


def expected(query: dict[str, str]) -> FleetQuery | None:
    """The parsed query, or None when it must be refused: the rules of docs/http-listeners.md read independently."""
    if set(query) - set(STATUS_PARAMETERS):
        return None
    flags: dict[str, bool] = {}
    for name in FLAGS:
        raw = query.get(name)
        word = raw.strip().lower() if raw is not None else None
        if word is not None and word not in TRUE | FALSE:
            if AVOID_KNOWN and name == "summary" and flags.get("proxies") is False:
                continue  # finding F13: with proxies=0, summary is never read
            return None
        flags[name] = word in TRUE if word is not None else name == "proxies"
    flags.setdefault("summary", False)
    counts: dict[str, int | None] = {"limit": DEFAULT_LIMIT, "offset": 0}
    for name in counts:
        raw = query.get(name)
        text = (raw or "").strip().lower()
        if not text:
            continue
        if name == "limit" and text == "all":
            counts[name] = None
        elif text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_COUNT:
            counts[name] = int(text)
        else:
            return None  # not a count, or past the documented bound (docs/http-listeners.md, the /status query)
    protocol = query.get("protocol") or None
    if protocol is not None and protocol not in PROTOCOLS:
        return None
    if (query.get("scope") or "replica") not in ("replica", "all"):  # scope=all: every replica's proxies too
        return None
    if any(len(query.get(name) or "") > MAX_TEXT for name in ("group", "node")):
        return None
    return FleetQuery(
        group=query.get("group") or None,
        protocol=protocol,
        node=query.get("node") or None,
        nacked=flags["nacked"],
        stale=flags["stale"],
        limit=counts["limit"],
        offset=counts["offset"] or 0,
        proxies=flags["proxies"] and not flags["summary"],
    )


def _same(parsed: FleetQuery, wanted: FleetQuery) -> bool:
    return parsed == wanted


@given(query=st.dictionaries(names, values, max_size=5))
def test_status_query_is_parsed_or_refused_with_bad_query(query: dict[str, str]) -> None:
    count("status: query parser")
    wanted = expected(query)
    try:
        parsed = parse_status_query(query)
    except BadQuery as refused:
        assert wanted is None, f"refused a valid query: {refused}"
        assert str(refused)
        return
    except Exception as error:
        avoid_known(error)
        raise
    assert wanted is not None, f"accepted an invalid query as {parsed}"
    assert _same(parsed, wanted), (parsed, wanted)


class Admin:
    def __init__(self) -> None:
        self.loop = LoopThread()
        registry = ProxyRegistry()
        for i in range(30):
            registry.connect(f"node-{i}", f"g{i % 3}", "127.0.0.1:1", 0.0)
        self.server = AdminServer(
            status=lambda: {"policy": {"version": "v1"}},
            ready=lambda: True,
            port=0,
            fleet=lambda query: registry.fleet(query, lambda group: {}),
        )
        self.port = serve(self.loop, lambda: self.server.start())

    def close(self) -> None:
        self.loop.run(self.server.stop())
        self.loop.close()


@pytest.fixture(scope="module")
def admin() -> Iterator[Admin]:
    running = Admin()
    yield running
    running.close()


@st.composite
def raw_queries(draw: st.DrawFn) -> bytes:
    """A query string as bytes: well-formed pairs, percent-escapes (also of bytes that are not UTF-8), junk."""
    pairs = draw(st.lists(st.tuples(names, values), max_size=5))
    text = "&".join(f"{quote(n, safe='')}={quote(v, safe='')}" for n, v in pairs).encode()
    return text + draw(st.sampled_from([b"", b"", b"&", b"&&=", b"&limit", b"&%ff=1", b"&limit=%ff", b"&=x", b";x=1"]))


@given(query=raw_queries())
def test_status_endpoint_answers_200_or_400_never_500(admin: Admin, query: bytes) -> None:
    count("status: HTTP endpoint")
    answer = request(admin.port, "GET", b"/status?" + query, [], b"")
    if answer.status == 500 and AVOID_KNOWN:
        try:  # the same query through the parser alone: discarded if it is a known crash
            parse_status_query(URL("/status?" + query.decode("latin-1")).query)
        except Exception as error:
            avoid_known(error)
    assert answer.status in (200, 400), (answer.status, answer.body[:200])
    if answer.status == 200:
        body = json.loads(answer.body)
        assert body["policy"] == {"version": "v1"}
        assert body["summary"]["connected"] == 30
        assert len(body.get("proxies", [])) <= 30
    else:
        assert answer.body.strip(), "a 400 must say what was wrong"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_status_arguments(parser)
    return parser


cli_values = values | st.sampled_from(["a&b=c", "x y", "#frag", "?q", "a/b", "%20", "+", "g1"])


@given(
    options=st.dictionaries(
        st.sampled_from(["--group", "--node", "--protocol", "--limit", "--offset"]), cli_values, max_size=5
    ),
    switches=st.sets(st.sampled_from(["--nacked", "--stale", "--summary"])),
)
def test_every_query_the_cli_sends_is_one_the_server_reads_back(options: dict[str, str], switches: set[str]) -> None:
    """`controlplane status` checks its arguments before any request; whatever it accepts, the server must accept
    and read back as the same filters (no 400, no 500, no silently different question)."""
    count("status: CLI to server")
    argv = [f"{name}={value}" for name, value in options.items()] + sorted(switches)
    try:
        args = _parser().parse_args(argv)
    except (argparse.ArgumentError, SystemExit):
        return  # refused by the CLI itself, before any request
    except Exception as error:
        avoid_known(error)
        raise
    filters = StatusFilters.from_args(args)
    url = status_url("http://127.0.0.1:9902", filters)
    seen = dict(URL(url).query)  # what aiohttp hands the handler
    try:
        parsed = parse_status_query(seen)
    except Exception as error:
        avoid_known(error)
        raise AssertionError(f"the server refuses what the CLI sent ({url[:120]}): {error!r}") from error
    wanted: dict[str, Any] = {
        "group": filters.group or None,
        "protocol": filters.protocol,
        "node": filters.node or None,
        "nacked": filters.nacked,
        "stale": filters.stale,
        "offset": filters.offset,
        "proxies": not filters.summary,
    }
    assert {k: getattr(parsed, k) for k in wanted} == wanted
    if filters.limit is None:
        assert parsed.limit == DEFAULT_LIMIT
    elif filters.limit == "all":
        assert parsed.limit is None
    else:
        assert parsed.limit == int(filters.limit) or parsed.limit is None or parsed.limit >= 10**3
