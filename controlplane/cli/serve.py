"""`controlplane serve`: the long-running process. Wires the layers together and nothing else."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from controlplane import __version__
from controlplane.admin.http import AdminServer
from controlplane.keyrelay import KeyRelay
from controlplane.service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.sources.watch import watch_policy_dir
from controlplane.xds.registry import ProxyRegistry
from controlplane.xds.server import XdsServer

log = logging.getLogger("controlplane")


@dataclass(frozen=True)
class ServeOptions:
    policy: Path
    xds_host: str
    xds_port: int
    admin_host: str
    admin_port: int
    debounce: float = 0.1
    max_wait: float = 1.0
    shutdown_grace: float = 5.0
    jwks_refresh: float = 30.0
    # How long start-up waits for relayed issuers' first keys before serving xDS: an Envoy reconnecting to a
    # restarted control plane must not be sent the placeholder keys (every token refused) in the meantime.
    jwks_startup_wait: float = 10.0


class ControlPlane:
    """The running control plane: policy service, xDS server, admin server and the policy watcher."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.cache = SnapshotCache()
        self.registry = ProxyRegistry()
        self.policy = PolicyService(options.policy, self.cache)
        self.keys = KeyRelay(self.policy.set_keys, refresh_interval=options.jwks_refresh)
        self.xds = XdsServer(self.cache, self.registry, log=logging.getLogger("controlplane.xds"))
        self.admin = AdminServer(
            status=self.status,
            ready=lambda: self.policy.ready,
            host=options.admin_host,
            port=options.admin_port,
        )
        self.stopping = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.xds_port = 0
        self.admin_port = 0

    def status(self) -> dict[str, object]:
        return {
            "version": __version__,
            "policy": self.policy.status(),
            "jwks": self.keys.status(),
            "proxies": self.registry.status(),
            "summary": self.registry.summary(),
        }

    async def start(self) -> None:
        """Watch first, then load: an edit made while the first load runs is never missed."""
        watching = asyncio.Event()
        self._watcher = asyncio.create_task(
            watch_policy_dir(
                self.options.policy,
                self._on_policy_change,
                quiet=self.options.debounce,
                max_wait=self.options.max_wait,
                stop=self.stopping,
                ready=watching,
            )
        )
        self._watcher.add_done_callback(self._watcher_done)
        await asyncio.wait({self._watcher, asyncio.ensure_future(watching.wait())}, return_when=asyncio.FIRST_COMPLETED)
        await self.policy.reload_off_loop()
        await self._follow_issuers(wait=self.options.jwks_startup_wait)
        self.xds_port = await self.xds.start(self.options.xds_host, self.options.xds_port)
        self.admin_port = await self.admin.start()
        log.info(
            "controlplane %s serving xDS on %s:%d, admin on http://%s:%d, policy %s",
            __version__,
            self.options.xds_host,
            self.xds_port,
            self.options.admin_host,
            self.admin_port,
            self.options.policy,
        )

    async def run(self) -> None:
        await self.start()
        await self.stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        log.info("shutting down: draining xDS streams for up to %.1fs", self.options.shutdown_grace)
        self.stopping.set()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.keys.stop()
        await self.xds.stop(self.options.shutdown_grace)
        await self.admin.stop()
        log.info("stopped")

    def _watcher_done(self, task: asyncio.Task[None]) -> None:
        """A watcher that dies must not go unnoticed: the served policy would silently stop following edits."""
        if task.cancelled() or self.stopping.is_set():
            return
        error = task.exception()
        log.critical("policy watcher stopped (%s); shutting down so a supervisor restarts us", error)
        self.stopping.set()

    async def _on_policy_change(self, changed: set[str]) -> None:
        log.info("policy change: %s", ", ".join(sorted(changed)) or "(directory)")
        await self.policy.reload_off_loop()
        await self._follow_issuers()

    async def _follow_issuers(self, wait: float = 0.0) -> None:
        """Relay the keys of the issuers of the policy in service (a rejected change keeps the old ones)."""
        current = self.policy.current
        if current is not None:
            await self.keys.update(current.issuers, wait=wait)

    def request_stop(self) -> None:
        self.stopping.set()


async def serve(options: ServeOptions) -> int:
    plane = ControlPlane(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, plane.request_stop)
    await plane.run()
    return 0
