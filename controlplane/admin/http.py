"""The admin HTTP endpoint: metrics, liveness, readiness and a status view for operators.

It runs on aiohttp inside the control plane's own asyncio loop, so handlers read live state without locks
or threads. The admin port has no authentication, which is why it binds to loopback unless told otherwise
and warns loudly when it is not.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import MultiMapping
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from controlplane.admin.explain import MAX_BODY_BYTES, BadExplainRequest, parse_body
from controlplane.admin.query import BadQuery, parse_count, parse_flag, parse_text, shown
from controlplane.resolved.explain import ExplainError, ExplainInputs, document, explain
from controlplane.serving import ADMIN_LIMITS, LOOPBACK, AppServer, HttpLimits, is_loopback
from controlplane.telemetry.metrics import REGISTRY
from controlplane.xds.fleet_status import DEFAULT_LIMIT, PROTOCOLS, FleetQuery

log = logging.getLogger(__name__)

STATUS_PARAMETERS = ("group", "protocol", "node", "nacked", "stale", "limit", "offset", "summary", "proxies", "scope")
SCOPES = ("replica", "all")  # this replica's proxies (the default), or every registered replica's too
# What each endpoint accepts; anything else is refused, so no parameter is silently ignored.
PARAMETERS: dict[str, tuple[str, ...]] = {
    "/status": STATUS_PARAMETERS,
    "/metrics": (),
    "/healthz": (),
    "/readyz": (),
    "/explain": (),
}


def check_parameters(path: str, query: MultiMapping[str]) -> None:
    """Refuse names an endpoint does not know and names given twice (which value would win is a guess)."""
    known = PARAMETERS.get(path)
    if known is None:
        return  # not ours: the router answers 404
    unknown = sorted(set(query) - set(known))
    if unknown:
        expected = f"known: {', '.join(known)}" if known else f"{path} takes no parameters"
        raise BadQuery(f"unknown parameter(s) {', '.join(shown(u) for u in unknown)}; {expected}")
    repeated = sorted(name for name in set(query) if len(query.getall(name)) > 1)
    if repeated:
        raise BadQuery(f"parameter(s) given more than once: {', '.join(repeated)}")


def parse_status_query(query: Mapping[str, str]) -> FleetQuery:
    """Read ``/status`` query parameters; unknown names and bad values are errors, so a typo (``?grop=x``)
    cannot silently turn a filtered question into the whole fleet."""
    unknown = sorted(set(query) - set(STATUS_PARAMETERS))
    if unknown:
        names = ", ".join(shown(u) for u in unknown)
        raise BadQuery(f"unknown parameter(s) {names}; known: {', '.join(STATUS_PARAMETERS)}")
    parse_scope(query)
    protocol = query.get("protocol") or None
    if protocol is not None and protocol not in PROTOCOLS:
        raise BadQuery(f"protocol must be one of {', '.join(PROTOCOLS)}, got {shown(protocol)}")
    # summary=1 and proxies=0 both mean "counts only": the first is the CLI's word, the second the JSON key's.
    # Both are read before combining them, so a bad value of either is an error whatever the other says.
    listed, summary = parse_flag("proxies", query.get("proxies"), True), parse_flag("summary", query.get("summary"))
    return FleetQuery(
        group=parse_text("group", query.get("group")),
        protocol=protocol,
        node=parse_text("node", query.get("node")),
        nacked=parse_flag("nacked", query.get("nacked")),
        stale=parse_flag("stale", query.get("stale")),
        limit=parse_count("limit", query.get("limit"), DEFAULT_LIMIT),
        offset=parse_count("offset", query.get("offset"), 0) or 0,
        proxies=listed and not summary,
    )


def parse_scope(query: Mapping[str, str]) -> str:
    """``scope=all``: add the proxies of every replica, as the replica registry last read them."""
    scope = query.get("scope") or "replica"
    if scope not in SCOPES:
        raise BadQuery(f"scope must be one of {', '.join(SCOPES)}, got {shown(scope)}")
    return scope


class AdminServer:
    """Serves ``/metrics``, ``/healthz``, ``/readyz`` and ``/status`` from the control plane's event loop."""

    def __init__(
        self,
        *,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        port: int,  # serve's default: cli/options.py
        host: str = LOOPBACK,
        fleet: Callable[[FleetQuery], dict[str, Any]] | None = None,
        limits: HttpLimits = ADMIN_LIMITS,
        not_ready_reason: Callable[[], str | None] | None = None,
        whole_fleet: Callable[[], dict[str, Any] | None] | None = None,
        explain: Callable[[], ExplainInputs | None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``status`` gives the document's fleet-independent part (policy, JWKS, GitLab...); ``fleet`` answers
        a query with ``proxies``, ``page``, ``filters`` and ``summary`` (``ProxyRegistry.fleet``), merged in.
        Without ``fleet`` the status document is served as ``status`` returns it, ``summary=1`` dropping its
        ``proxies``; that is for embedding and tests, where there is no registry."""
        self._status = status
        self._fleet = fleet
        # ``scope=all``: every replica's proxies (None without a shared registry: this replica is the fleet)
        self._whole_fleet = whole_fleet
        self._ready = ready
        # ``POST /explain``: the policy in service, its revocations and credentials (None before the first load)
        self._explain = explain
        self._clock = clock
        self._not_ready_reason = not_ready_reason  # what /readyz says when not ready
        self._host = host
        self._port = port
        self._limits = limits
        self._server = AppServer("admin server")

    async def start(self) -> int:
        """Bind and start serving; returns the bound port, which matters when asked for port 0."""
        # No access log: Prometheus scrapes and probes every few seconds; per-request lines are pure noise.
        addresses = await self._server.start(self._build_app(), self._host, self._port, self._limits)
        self._warn_if_exposed(addresses)
        port = addresses[0][1]
        log.info("admin server listening on %s", ", ".join(f"{h}:{p}" for h, p in addresses))
        return port

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice or before ``start``."""
        await self._server.stop()

    @staticmethod
    def _warn_if_exposed(addresses: list[tuple[str, int]]) -> None:
        exposed = [h for h, _ in addresses if not is_loopback(h)]
        if exposed:
            log.warning(
                "admin server bound to non-loopback address %s: it has no authentication, "
                "so anyone who can reach it can read proxy and policy status",
                ", ".join(exposed),
            )

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_debug_log, _checked_query])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status_view)
        if self._explain is not None:
            app.router.add_post("/explain", self._explain_view)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        """The format the scraper asks for, chosen by prometheus_client's own negotiation: OpenMetrics for
        ``Accept: application/openmetrics-text`` (what Prometheus sends first), the 1.0.0 text format when asked
        for by version, else the classic 0.0.4 text. The content type comes from the same call as the encoder:
        ``CONTENT_TYPE_LATEST`` names 1.0.0 since prometheus_client 0.22, which plain ``generate_latest`` is
        not labelled as, so pairing the two by hand is how a scraper gets a type that does not match the body."""
        encode, content_type = _encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(REGISTRY), headers={"Content-Type": content_type})

    async def _healthz(self, _request: web.Request) -> web.Response:
        # Liveness only: if the loop can answer, the process is alive. Readiness is a separate question.
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        try:
            ready = self._ready()
        except Exception as exc:
            log.exception("readiness check raised")
            return web.Response(status=503, text=f"not ready: readiness check failed: {exc}\n")
        if ready:
            return web.Response(text="ready\n")
        reason = self._not_ready_reason() if self._not_ready_reason else None
        return web.Response(
            status=503, text=f"not ready: {reason or 'startup not complete (no good policy load yet)'}\n"
        )

    async def _status_view(self, request: web.Request) -> web.Response:
        try:
            query = parse_status_query(request.query)
            scope = parse_scope(request.query)
        except BadQuery as exc:
            return web.Response(status=400, text=f"{exc}\n")
        body = self.status_document(query)
        everywhere = self._whole_fleet() if scope == "all" and self._whole_fleet is not None else None
        if everywhere is not None:
            body["fleet"] = everywhere
        return web.Response(text=json.dumps(body, indent=2, default=str) + "\n", content_type="application/json")

    async def _explain_view(self, request: web.Request) -> web.Response:
        """What the gateways do with the request and claims in the body (controlplane/admin/explain.py). The
        claims are never logged: only the decision, at DEBUG."""
        assert self._explain is not None
        if not self._local_host_header(request.host):
            return web.Response(status=403, text="a loopback admin port answers Host 127.0.0.1 or localhost only\n")
        if request.content_type != "application/json":
            # A web page can POST text/plain or a form here without a preflight (CSRF); not application/json.
            return web.Response(status=415, text="POST /explain takes Content-Type: application/json\n")
        raw = await _bounded_body(request, MAX_BODY_BYTES + 1)
        try:
            claims, asked, problem = parse_body(raw)
            inputs = self._explain()
            if inputs is None:
                return web.Response(status=503, text="no policy in service yet\n")
            answer = explain(inputs, claims, asked, int(self._clock()), problem)
        except (BadExplainRequest, ExplainError) as exc:
            return web.Response(status=400, text=f"{exc}\n")
        log.debug("explain: %s on backend %s", answer.decision, answer.backend)
        return web.Response(text=json.dumps(document(answer), indent=2) + "\n", content_type="application/json")

    def _local_host_header(self, host: str) -> bool:
        """On a loopback port, the Host header must name loopback too: a web page whose DNS name was rebound
        to 127.0.0.1 is same-origin with this port as far as the browser knows, and could read the answers;
        its Host header still carries its own name. Bound elsewhere, the operator chose who may reach it."""
        if not is_loopback(self._host):
            return True
        name = urlsplit(f"//{host}").hostname or ""
        return name == "localhost" or is_loopback(name)

    def status_document(self, query: FleetQuery) -> dict[str, Any]:
        """The ``/status`` body for a parsed query (separate from the handler so it can be timed and tested)."""
        body = dict(self._status())
        if self._fleet is not None:
            body.update(self._fleet(query))
        elif not query.proxies:
            body.pop("proxies", None)
        return body


async def _bounded_body(request: web.Request, limit: int) -> bytes:
    """At most `limit` bytes of the body (one more than allowed is enough to refuse it), read chunk by chunk:
    a single `read(n)` returns what has arrived so far, not n bytes."""
    raw = bytearray()
    while len(raw) < limit:
        chunk = await request.content.read(limit - len(raw))
        if not chunk:
            break
        raw += chunk
    return bytes(raw)


def _encoder(accept: str) -> tuple[Callable[[Collector], bytes], str]:
    """`choose_encoder`'s answer, or the classic text when it raises: it compares the ``version=`` it read as a
    tuple of numbers, and one that is not (``version=x``, ``version=1.x``) raised TypeError, so any client could
    turn a scrape into a 500 and an ERROR traceback in the log, once per request. A scraper that sent nothing
    usable gets what an Accept naming no known format gets."""
    try:
        return choose_encoder(accept)
    except (TypeError, ValueError):
        return choose_encoder("")


@web.middleware
async def _checked_query(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every endpoint's parameters are checked before its handler runs: a typo is a 400, never ignored."""
    try:
        check_parameters(request.path, request.query)
    except BadQuery as exc:
        return web.Response(status=400, text=f"{exc}\n")
    return await handler(request)


@web.middleware
async def _debug_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per-request trace at DEBUG only, for when someone is actually debugging the admin port."""
    response = await handler(request)
    names = "&".join(sorted(set(request.query)))  # the names only: a value may be a token pasted there
    log.debug("admin %s %s%s -> %d", request.method, request.path, f"?{names}" if names else "", response.status)
    return response
