"""One aiohttp app on a port of its own: the admin server, the webhook receiver and the token exchange.

They share the event loop with the xDS server; each needs the same few steps to bind (port 0 → the kernel's
choice, reported back), to fail without leaking a half-started runner, and to stop idempotently.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web


class AppServer:
    def __init__(self, name: str) -> None:
        self.name = name
        self._runner: web.AppRunner | None = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(
        self, app_or_routes: web.Application | Iterable[web.RouteDef], host: str, port: int
    ) -> list[tuple[str, int]]:
        """Bind and serve; returns every bound (host, port). Access logs are off: handlers log what matters."""
        if self._runner is not None:
            raise RuntimeError(f"{self.name} already started")
        app = app_or_routes if isinstance(app_or_routes, web.Application) else web.Application()
        if not isinstance(app_or_routes, web.Application):
            app.add_routes(list(app_or_routes))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        return [(str(a[0]), int(a[1])) for a in runner.addresses]

    async def stop(self) -> None:
        """Stop serving and release the port; safe to call twice or before `start`."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
