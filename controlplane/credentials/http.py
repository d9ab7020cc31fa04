"""The token-exchange endpoint over HTTP: `POST EXCHANGE_PATH`, form-encoded, answered with `no-store`.

`routes()` mounts it into another aiohttp application; `start`/`stop` serve it alone (gateways route
EXCHANGE_PATH here). Tokens travel only in the request body: a query string is refused so no token ever lands
in an access log, and nothing logged here holds one (only backend, project, job, roles and credential jti).

With `ExchangeListenerTls` the listener speaks TLS (the ID tokens cross the gateway -> exchange hop). Its certificate
rotates without a restart: the listener's SSLContext has an `sni_callback`, called on every handshake, that
asks `CertificateFiles` whether the files changed (a stat each) and hands the handshake a context loaded from
the new files; a half-rotated pair keeps the previous context (controlplane/certfiles.py). Connections already
open keep their session.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qsl

from aiohttp import web

from controlplane.certfiles import CertificateFileError, CertificateFiles, CertificateSet, check_served_to_gateways
from controlplane.credentials import metrics
from controlplane.credentials.exchange import ExchangeResult, JobToVerify, TokenExchange
from controlplane.credentials.oidc import OidcEndpoint
from controlplane.model.credentials import EXCHANGE_PATH
from controlplane.serving import EXCHANGE_LIMITS, LOOPBACK, AppServer, HttpLimits
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.credentials")

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_BODY_BYTES = 16 * 1024  # an ID token is 1-2 kB; the whole form is far below this
MAX_FIELDS = 32
# RFC 6749 §5.1: token responses must never be cached, errors included.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True)
class ExchangeListenerTls:
    """The exchange listener's certificate and key (PEM files), the CA bundle gateways verify it with (pushed
    to them over ADS) and the name its certificate holds, which they check."""

    cert_file: Path
    key_file: Path
    ca_file: Path
    server_name: str


class RotatingServerContext:
    """An SSLContext for a server whose certificate files rotate: `context` is what the listener is given."""

    def __init__(self, tls: ExchangeListenerTls) -> None:
        self.tls = tls
        # The CA bundle is one of the files: a certificate refused because the bundle did not vouch for it is
        # tried again when the bundle changes (a CA rotation done in the wrong order, then put right).
        self._files = CertificateFiles("exchange", tls.cert_file, tls.key_file, tls.ca_file, self._loaded)
        self._current, self._served = self._files.initial
        self.context = self._load(None)
        self.context.sni_callback = self._handshake

    @property
    def serial(self) -> int:
        return self._files.serial

    def _load(self, checked: CertificateSet | None) -> ssl.SSLContext:
        """A server context from the files (checked just before by `CertificateFiles`; should they change in
        between, OpenSSL refuses a key that does not match and the previous context stays). A certificate the
        gateways would refuse (not for the name they check, not from the CA bundle they are pushed) is refused
        here: at start `serve` stops, on a rotation the previous certificate stays in service."""
        if checked is not None:
            check_served_to_gateways(checked, self.tls.server_name, self.tls.cert_file, self.tls.ca_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        context.set_alpn_protocols(["http/1.1"])
        return context

    def _loaded(self, checked: CertificateSet) -> tuple[ssl.SSLContext, CertificateSet]:
        return self._load(checked), checked

    def _refresh(self) -> ssl.SSLContext:
        fresh = self._files.current()
        if fresh is not None:
            self._current, self._served = fresh
        return self._current

    def refused_with(self, ca_pem: str) -> str | None:
        """Why gateways verifying with the bundle `ca_pem` would refuse the certificate now served, or None."""
        try:
            check_served_to_gateways(
                replace(self._served, ca=ca_pem.encode()), self.tls.server_name, self.tls.cert_file, self.tls.ca_file
            )
        except CertificateFileError as refused:
            return str(refused)
        return None

    def _handshake(self, connection: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        connection.context = self._refresh()

    def stale(self, request: web.BaseRequest) -> bool:
        """Whether `request` came on a connection set up with a certificate since replaced: its response then
        closes the connection, so a gateway's pooled connection (kept busy, never idle) moves to the new
        certificate after one more request instead of keeping the old session for hours."""
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        return tls is not None and tls.context is not self._refresh()


class BadForm(Exception):
    """The HTTP request itself is unusable; the message is safe to return and log."""

    def __init__(self, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.status = status


class ExchangeEndpoint:
    def __init__(
        self,
        exchange: TokenExchange,
        *,
        max_body: int = MAX_BODY_BYTES,
        limits: HttpLimits = EXCHANGE_LIMITS,
        verify: Callable[[JobToVerify], Awaitable[bool]] | None = None,
        tls: ExchangeListenerTls | None = None,
    ) -> None:
        """`verify` asks GitLab about a job the exchange cannot vouch for (True: exchange again); without it
        such an exchange is refused (503). `tls`: serve HTTPS (read at `start`, re-read when the files change)."""
        self.exchange = exchange
        self.tls = tls
        self.ssl: RotatingServerContext | None = None
        self.verify = verify
        self.max_body = max_body
        self.limits = limits
        # Refusals are whatever any client sends, so they are rate-limited; grants (the audit) never are.
        self._refusals = RateLimitedLog(log, burst=10, interval=60.0)
        self._server = AppServer("exchange endpoint")
        self.oidc: OidcEndpoint | None = None  # discovery and JWKS for relying parties, set before `start`

    def routes(self) -> list[web.RouteDef]:
        oidc = self.oidc.routes() if self.oidc is not None else []
        return [web.post(EXCHANGE_PATH, self.handle), *oidc]

    async def start(self, host: str = LOOPBACK, port: int = 0) -> int:
        """Serve alone; returns the bound port (useful with port 0). `handle` logs each exchange itself."""
        if self.tls is not None and self.ssl is None:
            self.ssl = RotatingServerContext(self.tls)  # a bad file stops start-up, naming it
            log.info("token exchange TLS certificate serial %x; its files are watched for rotation", self.ssl.serial)
        context = self.ssl.context if self.ssl is not None else None
        bound = (await self._server.start(self.routes(), host, port, self.limits, ssl_context=context))[0][1]
        log.info("token exchange listening on %s:%d%s", host, bound, EXCHANGE_PATH)
        return bound

    async def stop(self) -> None:
        """Safe to call twice or before `start`."""
        await self._server.stop()

    async def handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        if self.ssl is not None and self.ssl.stale(request):
            response.force_close()  # HTTP/1.1 `Connection: close`: the client's next request opens a new one
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        try:
            form = await self._read_form(request)
        except BadForm as bad:
            metrics.count_exchange("invalid_request")
            self._refusals.log(logging.INFO, "token exchange refused (invalid_request): %s", bad)
            return _json({"error": "invalid_request", "error_description": str(bad)}, bad.status)
        result = await self.exchange_checked(form)
        self._log(result)
        return _json(result.body, result.status)

    async def exchange_checked(self, form: dict[str, str]) -> ExchangeResult:
        """The exchange, asking GitLab about the job first when the exchange says so, and retrying once."""
        result = await self.exchange.exchange(form)
        job = result.verify
        if job is not None and self.verify is not None and await self.verify(job):
            result = await self.exchange.exchange(form, checked=job.job_id)
        return result if result.verify is None else self.exchange.unverified(result)

    def _log(self, result: ExchangeResult) -> None:
        if result.granted:
            log.info(
                "token exchange granted: backend=%s project_id=%s job_id=%s roles=%s credential_jti=%s",
                result.backend,
                result.project_id,
                result.job_id,
                ",".join(result.roles),
                result.jti,
            )
            return
        self._refusals.log(
            logging.INFO,
            "token exchange refused (%s): backend=%s project_id=%s job_id=%s roles=%s: %s",
            result.result,
            result.backend,
            result.project_id,
            result.job_id,
            ",".join(result.roles) or "-",
            result.body.get("error_description"),
            key=f"refused {result.result}",
        )

    async def _read_form(self, request: web.Request) -> dict[str, str]:
        if request.query_string:
            raise BadForm("parameters belong in the request body, never in the URL")
        if request.content_type != FORM_CONTENT_TYPE:
            raise BadForm(f"the body must be {FORM_CONTENT_TYPE}")
        body = await _read_bounded(request, self.max_body)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
        except (UnicodeDecodeError, ValueError):
            raise BadForm("the body is not a valid form") from None
        form = dict(pairs)
        if len(form) != len(pairs):
            raise BadForm("a parameter is repeated (RFC 6749 §3.2)")
        return form


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    too_large = BadForm(f"the body is over {limit} bytes", status=413)
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(4096):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _json(body: dict[str, object], status: int) -> web.Response:
    return web.json_response(body, status=status, headers=NO_STORE)
