"""The Google Cloud tokens of the policy's `gcp:` backends, kept fresh and handed to the SDS injection.

One `GcpCredentialRefresher` (cloud/gcp.py) per gcp backend of the policy in service: it signs a subject token as
the control plane's OIDC issuer (`serve --issuer-url`; `CredentialService.relying_party_tokens`), exchanges it at
Google's Security Token Service, impersonates the service account, and refreshes before expiry. Each change of
what a refresher holds (a new token, or none once the last one expired unrefreshed) recompiles, which changes only
that backend's Secret: Envoy gets one SDS push. The token lives in memory only, never in a file, a log or
`compile`'s output. A backend without a usable token gets an empty Secret and Envoy refuses its requests (fails
closed, never forwards them unauthenticated).

`for_policy` is called by the PolicyService from a worker thread while it compiles: it only reads what the
refreshers hold. `follow` is told the policy in service after each load and starts or stops refreshers on the
event loop (`call_soon_threadsafe`), so a candidate policy that is then rejected starts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aiohttp

from controlplane.cloud.gcp import (
    IAM_CREDENTIALS_URL,
    STS_URL,
    SUBJECT_TOKEN_TTL,
    CloudCredential,
    GcpCredentialRefresher,
    GcpExchangeError,
    GcpSettings,
    fetch_credential,
)
from controlplane.credentials.oidc import RelyingPartyTokens
from controlplane.model.policy import Backend, Policy

log = logging.getLogger("controlplane.gcp")

# Google's endpoints by default; an emulator's (tests, an air-gapped mirror) from the environment. Not flags: a
# deployment never changes them, and they are not secrets either.
STS_URL_ENV: Final = "CONTROLPLANE_GCP_STS_URL"
IAM_CREDENTIALS_URL_ENV: Final = "CONTROLPLANE_GCP_IAM_CREDENTIALS_URL"
HTTP_TIMEOUT: Final = 10.0


def settings_for(backend: Backend, environ: Mapping[str, str] = os.environ) -> GcpSettings:
    """The refresher's settings from a backend's `gcp:` block (the loader already checked its fields)."""
    gcp = backend.gcp
    if gcp is None:
        raise ValueError(f"backend {backend.name} has no gcp block")
    return GcpSettings(
        backend=backend.name,
        workload_identity_provider=gcp.workload_identity_provider,
        service_account=gcp.service_account,
        scopes=gcp.scopes,
        id_token_audience=gcp.id_token_audience,
        lifetime=gcp.lifetime_s,
        sts_url=environ.get(STS_URL_ENV) or STS_URL,
        iam_credentials_url=environ.get(IAM_CREDENTIALS_URL_ENV) or IAM_CREDENTIALS_URL,
    )


def refusal(policy: Policy, is_issuer: bool) -> str | None:
    """Why `policy` cannot be served: gcp backends need the control plane to be an OIDC issuer Google trusts."""
    names = sorted(b.name for b in policy.backends if b.gcp is not None)
    if not names or is_issuer:
        return None
    return (
        f"backend(s) {', '.join(names)} obtain Google Cloud tokens, which needs the control plane to be an OIDC "
        "issuer Google's workload identity pool trusts: start serve with --issuer-url (docs/gcp-credentials.md)"
    )


class GcpBackends:
    """The refreshers of the policy in service. `signer` is None when serve has no --issuer-url (then `accept`
    refuses any policy with a gcp backend, so no refresher is ever started without one)."""

    def __init__(
        self,
        signer: Callable[[], RelyingPartyTokens] | None,
        on_change: Callable[[], Awaitable[object]],
        *,
        environ: Mapping[str, str] = os.environ,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._signer = signer
        self._on_change = on_change
        self._environ = environ
        self._clock = clock
        self._refreshers: dict[str, GcpCredentialRefresher] = {}  # read from compile threads, changed on the loop
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pushes: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None

    def accept(self, policy: Policy) -> str | None:
        return refusal(policy, self._signer is not None)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT))

    async def stop(self) -> None:
        tasks = [*self._tasks.values(), *self._pushes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()

    def for_policy(self, policy: Policy) -> dict[str, str]:
        """Backend name → the token to inject now, for the gcp backends of `policy` whose refresher (with the same
        block) holds one. Only reads: refreshers follow the policy in service (`follow`), not a candidate."""
        tokens = {}
        for backend in policy.backends:
            refresher = self._refreshers.get(backend.name)
            if backend.gcp is None or refresher is None or refresher.settings != settings_for(backend, self._environ):
                continue
            if (current := refresher.current()) is not None:
                tokens[backend.name] = current.token
        return tokens

    def follow(self, policy: Policy | None) -> None:
        """The policy in service changed (accepted or not): start, restart (a changed block) or stop refreshers
        to match it. A new refresher's first token recompiles through `on_change`."""
        if policy is None or self._loop is None or self._signer is None:
            return
        wanted = {b.name: settings_for(b, self._environ) for b in policy.backends if b.gcp is not None}
        self._loop.call_soon_threadsafe(self._reconcile, wanted)

    def status(self) -> dict[str, object]:
        """For the admin status: per backend, its service account and how long its token stays usable."""
        out: dict[str, object] = {}
        for name, refresher in sorted(self._refreshers.items()):
            out[name] = {
                "service_account": refresher.settings.service_account,
                "valid_seconds": round(refresher.valid_seconds()),
                "last_error": refresher.state.last_error,
            }
        return out

    def _reconcile(self, wanted: Mapping[str, GcpSettings]) -> None:
        for name in [n for n, r in self._refreshers.items() if wanted.get(n) != r.settings]:
            self._refreshers.pop(name).stop()  # a backend no longer in the policy has no series
            self._tasks.pop(name).cancel()
            log.info("gcp credential refresher for backend %s stopped", name)
        for name, settings in wanted.items():
            if name in self._refreshers:
                continue
            refresher = GcpCredentialRefresher(settings, self._fetch, clock=self._clock, on_change=self._changed)
            self._refreshers[name] = refresher
            self._tasks[name] = asyncio.create_task(refresher.run(), name=f"gcp credential {name}")
            log.info(
                "gcp credential refresher for backend %s started (service account %s)", name, settings.service_account
            )

    def _changed(self) -> None:
        """A refresher's token changed (or was withdrawn): recompile, so the backend's Secret follows."""
        push = asyncio.ensure_future(self._on_change())
        self._pushes.add(push)
        push.add_done_callback(self._pushes.discard)

    async def _fetch(self, settings: GcpSettings, now: float) -> CloudCredential:
        if self._signer is None or self._session is None:
            raise GcpExchangeError("unsigned", "the control plane is no OIDC issuer")
        try:
            subject = self._signer().sign(
                subject=settings.subject, audience=settings.subject_audience, lifetime=SUBJECT_TOKEN_TTL
            )
        except RuntimeError:  # no signing key may sign yet
            raise GcpExchangeError("unsigned", "no signing key may sign yet") from None
        return await fetch_credential(self._session, settings, subject, now)
