"""The key relay: the control plane reads each relayed issuer's JWKS and the compiler inlines it for Envoy.

`KeyRelay` follows the policy in service: one `JwksFetcher` per issuer with `jwks: relay` (the default),
started when the issuer appears, stopped when it goes or switches to `remote`, restarted when its URL or JWKS
URI changes (keys of the old address are dropped at once: they must never verify the new issuer's tokens).
Whenever the keys mapping changes it calls `on_change` with the whole mapping, one call at a time and in
order, so the last call always carries the latest keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from controlplane.model.policy import Issuer, JwksMode
from controlplane.runtime.supervisor import Spawn
from controlplane.sources.jwks import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_MIN_INTERVAL,
    DEFAULT_REFRESH_INTERVAL,
    DEFAULT_TIMEOUT,
    JwksDocument,
    JwksFetcher,
)

log = logging.getLogger("controlplane.jwks")


class FetcherFactory(Protocol):
    def __call__(
        self,
        issuer_url: str,
        *,
        jwks_uri: str | None,
        timeout: float,
        max_retries: int,
        min_interval: float,
        refresh_interval: float,
        name: str | None,
    ) -> JwksFetcher: ...


@dataclass
class _Relayed:
    source: tuple[str, str]  # (issuer url, jwks uri): a change means another key set
    fetcher: JwksFetcher
    stop: asyncio.Event
    task: asyncio.Task[None]


class KeyRelay:
    def __init__(
        self,
        on_change: Callable[[Mapping[str, str]], Awaitable[object]],
        *,
        spawn: Spawn,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        fetcher_factory: FetcherFactory = JwksFetcher,
    ) -> None:
        self.on_change = on_change
        self.refresh_interval = refresh_interval
        self.min_interval = min_interval
        self.timeout = timeout
        self.max_retries = max_retries
        self._factory = fetcher_factory
        self._spawn = spawn  # a fetcher that dies stops the process (supervisor.py); one no longer wanted is cancelled
        self._relayed: dict[str, _Relayed] = {}
        self._keys: dict[str, str] = {}
        self._notify = asyncio.Lock()

    @property
    def keys(self) -> Mapping[str, str]:
        """Issuer name → canonical JWKS, for every relayed issuer whose keys have been read."""
        return dict(self._keys)

    async def update(self, issuers: Iterable[Issuer], *, wait: float = 0.0) -> None:
        """Follow the policy's issuers. With `wait`, give new issuers up to that many seconds for their first
        fetch (and its recompile) to finish: at start-up this keeps the placeholder keys away from Envoys
        that already hold real ones."""
        wanted = {i.name: (i.url, i.jwks_uri) for i in issuers if i.jwks_mode is JwksMode.RELAY}
        gone = [name for name, r in self._relayed.items() if wanted.get(name) != r.source]
        for name in gone:
            await self._stop(name)
        async with self._notify:
            if any(self._keys.pop(name, None) is not None for name in gone):
                await self.on_change(dict(self._keys))
        started = [self._start(name, *source) for name, source in sorted(wanted.items()) if name not in self._relayed]
        if started and wait > 0:
            settling = [asyncio.ensure_future(f.settled.wait()) for f in started]
            _, pending = await asyncio.wait(settling, timeout=wait)
            for waiter in pending:
                waiter.cancel()
            for fetcher in started:
                if fetcher.document is None:
                    log.warning("jwks %s: no keys yet; its tokens are refused until they arrive", fetcher.name)

    async def on_unknown_kid(self, issuer: str, kid: str) -> bool:
        """A token from `issuer` names `kid`: True when the relay holds it (after a refetch if needed)."""
        relayed = self._relayed.get(issuer)
        return relayed is not None and await relayed.fetcher.on_unknown_kid(kid)

    async def stop(self) -> None:
        for name in list(self._relayed):
            await self._stop(name)

    def status(self) -> dict[str, object]:
        return {name: r.fetcher.status() for name, r in sorted(self._relayed.items())}

    def _start(self, name: str, url: str, jwks_uri: str) -> JwksFetcher:
        fetcher = self._factory(
            url,
            jwks_uri=jwks_uri,
            timeout=self.timeout,
            max_retries=self.max_retries,
            min_interval=self.min_interval,
            refresh_interval=self.refresh_interval,
            name=name,
        )
        stop = asyncio.Event()

        async def changed(_document: JwksDocument) -> None:
            async with self._notify:
                relayed = self._relayed.get(name)
                if relayed is None or relayed.fetcher is not fetcher or fetcher.document is None:
                    return  # stopped meanwhile: its keys are no longer wanted
                # The fetcher's latest, not the argument: two changes may reach this lock out of order.
                self._keys[name] = fetcher.document.canonical
                await self.on_change(dict(self._keys))

        task = self._spawn(fetcher.run(stop, changed), name=f"jwks-{name}")
        self._relayed[name] = _Relayed((url, jwks_uri), fetcher, stop, task)
        log.info("jwks %s: relaying keys from %s every %gs", name, jwks_uri, fetcher.refresh_interval)
        return fetcher

    async def _stop(self, name: str) -> None:
        relayed = self._relayed.pop(name)
        relayed.stop.set()
        relayed.task.cancel()  # a fetch in flight is not worth waiting for
        await asyncio.gather(relayed.task, return_exceptions=True)
        await relayed.fetcher.close()
        log.info("jwks %s: no longer relayed", name)
