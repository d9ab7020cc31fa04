"""The GitLab webhook receiver: authenticated, bounded, de-duplicated deliveries in, typed re-sync triggers out.

Webhooks tell the control plane quickly *what* changed in GitLab (a push, a rename, an archived project) so it
can re-read just that; the periodic reconcile still catches what no webhook reports. A webhook is never
trusted for *facts*: an event only says "look again", and what is granted comes from the GitLab API. So a
forged or replayed delivery can at worst cause an extra, harmless re-read, and this receiver's job is to make
even that hard and cheap:

- `X-Gitlab-Token` is GitLab's plain shared secret. It is compared with every configured secret (several, so
  a secret can be rotated with overlap) in constant time; anything else is 401 with no detail, before the body
  is read.
- The body is bounded (413 from `Content-Length` alone, or as soon as a streamed body passes the limit), must
  be JSON (415 otherwise, 400 when malformed), and only the few fields a re-sync needs are kept.
- Deliveries are de-duplicated by `Idempotency-Key`, which GitLab keeps across re-sends of one event. Not by
  `X-Gitlab-Event-UUID`: that is GitLab's recursion-detection id, shared by every hook a request triggers and
  recycled from incoming API calls, so it is not a per-delivery id. Keys are remembered only for authenticated
  deliveries whose callback succeeded, so nobody can pre-empt an event, and a re-send of a failed one is
  processed again.

The callback is **awaited** before answering, not run as a fire-and-forget task. It must only *schedule* work
(e.g. `InventoryWatcher.request_project`, which sets an asyncio.Event), never perform the re-sync: GitLab
times hooks out and disables failing ones. Awaiting it means a failed hand-off is reported to GitLab as 500
(visible in the hook's log, re-sendable), and that when the HTTP answer arrives the callback has run, which
makes tests deterministic. A callback slower than `callback_timeout` is cancelled and answered 500 too.

Nothing here logs a secret, a presented token or a request body.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final, Protocol

from aiohttp import web
from prometheus_client import Counter, Gauge

from controlplane.serving import LOOPBACK, WEBHOOK_LIMITS, AppServer, HttpLimits
from controlplane.sources.gitlab_events import GitLabEvent, Malformed, parse_event
from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.webhooks")

PATH: Final = "/webhooks/gitlab"

WEBHOOK_EVENTS = Counter(
    "controlplane_webhook_events_total",
    "GitLab webhook deliveries, by event kind and result "
    "(accepted, duplicate, unauthorized, malformed, too_large, ignored, failed).",
    ["event", "result"],
    registry=REGISTRY,
)
WEBHOOK_LAST_EVENT = Gauge(
    "controlplane_webhook_last_event_timestamp_seconds",
    "Time of the last authenticated GitLab webhook delivery (GitLab disables hooks that keep failing: "
    "a stale value means webhooks stopped and only the periodic reconcile keeps the inventory current).",
    registry=REGISTRY,
)

# Label values for `event` come from this fixed table (or a parsed event's kind), never from the request:
# every distinct label value is a time series kept forever, and unauthenticated senders choose headers.
_HEADER_LABELS: Final = {
    "Push Hook": "push",
    "Tag Push Hook": "tag_push",
    "Merge Request Hook": "merge_request",
    "Job Hook": "job",
    "Pipeline Hook": "pipeline",
    "System Hook": "system",
    "Project Hook": "project",
    "Subgroup Hook": "group",
}
_MAX_KEY_LENGTH: Final = 200  # GitLab sends a UUID; anything much longer is not GitLab


# --- secrets ---------------------------------------------------------------------------------------


class WebhookSecretError(ValueError):
    """The webhook secret cannot be read. Messages name the variable or file, never a secret."""


def secrets_from(env: str | None, file: str | None) -> list[bytes]:
    """The accepted webhook secrets: the value of environment variable `env` and/or the lines of `file`.

    Several lines in the file are all accepted, so a secret is rotated without a window of 401s: add the new
    one, change it in GitLab, remove the old one. Blank lines are skipped and surrounding whitespace stripped
    (editors add newlines). Secrets come from the environment or a file, never argv, where any local user can
    read them.
    """
    if env is None and file is None:
        raise WebhookSecretError("a webhook secret is required: name an environment variable or a file")
    found: list[bytes] = []
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise WebhookSecretError(f"environment variable {env} is not set or empty")
        found.append(value.encode())
    if file is not None:
        found.extend(_secrets_file(file))
    return list(dict.fromkeys(found))


def _secrets_file(file: str) -> list[bytes]:
    try:
        with open(file, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            lines = handle.read().splitlines()
    except OSError as error:
        raise WebhookSecretError(f"cannot read webhook secret file {file}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("webhook secret file %s is readable by other users (chmod 600 it)", file)
    secrets = [line.strip() for line in lines if line.strip()]
    if not secrets:
        raise WebhookSecretError(f"webhook secret file {file} holds no secret")
    return secrets


# --- de-duplication --------------------------------------------------------------------------------


class _SeenKeys:
    """Idempotency keys remembered for `ttl` seconds, at most `size` of them (the oldest go first).

    Insertion order is expiry order (one TTL for all), so expired keys are always at the front.
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self._size, self._ttl, self._clock = size, ttl, clock
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def _expire(self) -> None:
        now = self._clock()
        while self._expiry and next(iter(self._expiry.values())) <= now:
            self._expiry.popitem(last=False)

    def add(self, key: str) -> bool:
        """Remember `key`; False if it was already remembered (a replay)."""
        self._expire()
        if key in self._expiry:
            return False
        self._expiry[key] = self._clock() + self._ttl
        while len(self._expiry) > self._size:
            self._expiry.popitem(last=False)
        return True

    def forget(self, key: str) -> None:
        self._expiry.pop(key, None)


class DeliveryKeys(Protocol):
    """Where delivered keys are remembered: this process (`MemoryDeliveryKeys`) or every replica's table
    (`deliveries_pg.PostgresDeliveryKeys`), so a delivery retried to another replica is still applied once."""

    async def first(self, key: str) -> bool:
        """Remember `key`; False if it was already remembered (a replay)."""
        ...

    async def forget(self, key: str) -> None: ...

    def status(self) -> dict[str, object]: ...


class MemoryDeliveryKeys:
    """The keys in this process only (`--store file`): one replica sees every delivery."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float]) -> None:
        self._seen = _SeenKeys(size, ttl, clock)

    async def first(self, key: str) -> bool:
        return self._seen.add(key)

    async def forget(self, key: str) -> None:
        self._seen.forget(key)

    def status(self) -> dict[str, object]:
        return {"kind": "memory"}


# --- the receiver ----------------------------------------------------------------------------------


class WebhookReceiver:
    """Serves `POST /webhooks/gitlab`, either inside another aiohttp app (`routes()`) or on its own port."""

    def __init__(
        self,
        *,
        secrets: Sequence[bytes],
        on_event: Callable[[GitLabEvent], Awaitable[None]],
        max_body_bytes: int = 1 << 20,
        dedup_size: int = 10_000,
        dedup_ttl: float = 3600,
        callback_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        limits: HttpLimits = WEBHOOK_LIMITS,
        seen: DeliveryKeys | None = None,
    ) -> None:
        """`seen`: where idempotency keys are remembered; by default this process, `dedup_size` keys for
        `dedup_ttl` seconds."""
        if not secrets or any(not s for s in secrets):
            raise WebhookSecretError("at least one non-empty webhook secret is required")
        if max_body_bytes < 1 or dedup_size < 1 or dedup_ttl <= 0 or callback_timeout <= 0:
            raise ValueError("max_body_bytes, dedup_size, dedup_ttl and callback_timeout must be positive")
        # Digests of equal length: compare_digest is then constant time whatever length a sender tries.
        self._digests = tuple(hashlib.sha256(s).digest() for s in secrets)
        self._on_event = on_event
        self._max_body = max_body_bytes
        self._seen = seen if seen is not None else MemoryDeliveryKeys(dedup_size, dedup_ttl, clock)
        self._callback_timeout = callback_timeout
        self._limits = limits
        # Anyone who can reach the port can be refused: a few lines a minute tell the operator, not thousands.
        self._refusals = RateLimitedLog(log, burst=5, interval=60.0, clock=clock)
        self._server = AppServer("webhook receiver")

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self._handle)]

    async def start(self, host: str = LOOPBACK, port: int = 0) -> int:
        """Serve on a port of its own (GitLab must reach it; the admin port should not be exposed)."""
        addresses = await self._server.start(self.routes(), host, port, self._limits)  # the handler logs each delivery
        log.info("webhook receiver listening on %s", ", ".join(f"{h}:{p}{PATH}" for h, p in addresses))
        return addresses[0][1]

    async def stop(self) -> None:
        """Stop serving; safe to call twice or before `start`."""
        await self._server.stop()

    # -- one delivery

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        label = _HEADER_LABELS.get(request.headers.get("X-Gitlab-Event", ""), "other")
        try:
            return await self._deliver(request, label)
        except Exception:  # a bug of ours must not take the receiver down; the body is never logged
            log.exception("webhook %s: unexpected error", label)
            return _answer(500, label, "failed", {"error": "internal error"})

    async def _deliver(self, request: web.Request, label: str) -> web.StreamResponse:
        if not self._authenticated(request):
            self._refusals.log(
                logging.INFO, "webhook %s from %s: rejected, missing or unknown X-Gitlab-Token", label, request.remote
            )
            return _answer(401, label, "unauthorized", {"error": "unauthorized"})
        WEBHOOK_LAST_EVENT.set_to_current_time()
        key = request.headers.get("Idempotency-Key") or None
        if key is not None and len(key) > _MAX_KEY_LENGTH:
            return _answer(400, label, "malformed", {"error": "Idempotency-Key too long"})
        if request.content_type != "application/json":
            return _answer(415, label, "malformed", {"error": "Content-Type must be application/json"})
        body = await self._read_bounded(request)
        if body is None:
            response = _answer(413, label, "too_large", {"error": f"body over {self._max_body} bytes"})
            response.force_close()  # the rest of the body is not read; do not reuse the connection
            return response
        try:
            event = parse_event(json.loads(body), key)
        except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, Malformed
            detail = str(error) if isinstance(error, Malformed) else "the body is not valid JSON"
            return _answer(400, label, "malformed", {"error": detail})
        if event is None:
            log.debug("webhook %s: ignored (no re-sync needed for this kind)", label)
            return _answer(202, label, "ignored", {"ignored": True})
        return await self._dispatch(event)

    def _authenticated(self, request: web.Request) -> bool:
        presented = request.headers.get("X-Gitlab-Token")
        if not presented:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        matched = False
        for secret in self._digests:  # no early exit: the time taken does not say which secret matched
            matched |= hmac.compare_digest(digest, secret)
        return matched

    async def _read_bounded(self, request: web.Request) -> bytes | None:
        """The body, or None as soon as it is known to be over the limit (never buffered past it)."""
        if request.content_length is not None and request.content_length > self._max_body:
            return None
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > self._max_body:
                return None
        return bytes(body)

    async def _dispatch(self, event: GitLabEvent) -> web.StreamResponse:
        key = event.idempotency_key
        if key is not None and not await self._seen.first(key):
            log.debug("webhook %s: duplicate delivery %s ignored", event.kind, key)
            return _answer(200, event.kind, "duplicate", {"duplicate": True})
        try:
            await asyncio.wait_for(self._on_event(event), self._callback_timeout)
        except Exception as error:
            if key is not None:
                await self._seen.forget(key)  # a re-send of this event must be processed, not dropped as a replay
            why = "timed out (on_event must only schedule work)" if isinstance(error, TimeoutError) else "failed"
            log.error("webhook %s %s: handling %s", event.kind, key, why, exc_info=not isinstance(error, TimeoutError))
            return _answer(500, event.kind, "failed", {"error": "event not handled"})
        log.debug("webhook %s %s: accepted", event.kind, key)
        return _answer(200, event.kind, "accepted", {"accepted": True, "kind": event.kind})


def _answer(status: int, label: str, result: str, body: Mapping[str, object]) -> web.Response:
    WEBHOOK_EVENTS.labels(label, result).inc()
    return web.json_response(dict(body), status=status)
