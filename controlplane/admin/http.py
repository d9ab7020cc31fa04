"""The admin HTTP endpoint: metrics, liveness, readiness and a status view for operators.

It runs on aiohttp inside the control plane's own asyncio loop, so handlers read live state without locks
or threads. The admin port has no authentication, which is why it binds to loopback unless told otherwise
and warns loudly when it is not.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import generate_latest

from controlplane.admin.metrics import REGISTRY
from controlplane.admin.serving import AppServer

log = logging.getLogger(__name__)

# ``generate_latest`` with its default escaping writes the classic 0.0.4 text format. prometheus_client's own
# ``CONTENT_TYPE_LATEST`` advertises 1.0.0 since 0.22, which is not what that function produces, so the type
# is spelled out here (it is what ``choose_encoder`` pairs with ``generate_latest`` too).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


class BadQuery(ValueError):
    """A query parameter the operator mistyped; reported as 400 rather than silently ignored."""


def parse_flag(name: str, value: str | None) -> bool:
    """Read a boolean query flag; an unrecognised value is an error so typos do not widen a filter."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadQuery(f"{name} must be 1 or 0, got {value!r}")


def is_nacking(proxy: dict[str, Any]) -> bool:
    """True when the proxy's last response was a NACK.

    Contract with the status producer: ``last_nack`` is cleared once the proxy ACKs that type again, so its
    presence means the proxy is rejecting config right now (``controlplane status`` relies on the same rule).
    """
    return proxy.get("last_nack") is not None


def filter_proxies(
    proxies: list[dict[str, Any]], *, group: str | None, node: str | None, nacked: bool
) -> list[dict[str, Any]]:
    """Apply the ``/status`` filters: exact group, node substring, currently NACKing."""
    return [
        p
        for p in proxies
        if (group is None or p.get("group") == group)
        and (node is None or node in str(p.get("node", "")))
        and (not nacked or is_nacking(p))
    ]


def filtered_status(status: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
    """Return a copy of ``status`` with the query's filters applied to its proxy list.

    The summary is left as produced (fleet-wide), so a filtered view still shows what it was filtered from.
    """
    result = dict(status)
    if parse_flag("summary", query.get("summary")):
        result.pop("proxies", None)
        return result
    result["proxies"] = filter_proxies(
        list(status.get("proxies") or []),
        group=query.get("group"),
        node=query.get("node"),
        nacked=parse_flag("nacked", query.get("nacked")),
    )
    return result


def is_loopback(host: str) -> bool:
    """True when a bound socket address only accepts local connections."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class AdminServer:
    """Serves ``/metrics``, ``/healthz``, ``/readyz`` and ``/status`` from the control plane's event loop."""

    def __init__(
        self,
        *,
        status: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        host: str = "127.0.0.1",
        port: int = 9902,
    ) -> None:
        self._status = status
        self._ready = ready
        self._host = host
        self._port = port
        self._server = AppServer("admin server")

    async def start(self) -> int:
        """Bind and start serving; returns the bound port, which matters when asked for port 0."""
        # No access log: Prometheus scrapes and probes every few seconds; per-request lines are pure noise.
        addresses = await self._server.start(self._build_app(), self._host, self._port)
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
        app = web.Application(middlewares=[_debug_log])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status_view)
        return app

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": METRICS_CONTENT_TYPE})

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
        return web.Response(status=503, text="not ready: startup not complete (no good policy load yet)\n")

    async def _status_view(self, request: web.Request) -> web.Response:
        try:
            body = filtered_status(self._status(), dict(request.query))
        except BadQuery as exc:
            return web.Response(status=400, text=f"{exc}\n")
        return web.Response(text=json.dumps(body, indent=2, default=str) + "\n", content_type="application/json")


@web.middleware
async def _debug_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per-request trace at DEBUG only, for when someone is actually debugging the admin port."""
    response = await handler(request)
    log.debug("admin %s %s -> %d", request.method, request.path_qs, response.status)
    return response
