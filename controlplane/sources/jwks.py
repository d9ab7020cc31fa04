"""The key relay's fetcher: one issuer's JWKS, read by the control plane and pushed to Envoy inline.

Why the control plane fetches instead of every Envoy: Envoy never refetches on a token naming an unknown kid
(it waits for its cache duration), a cold Envoy that cannot reach the issuer answers every job with 401
"Jwks remote fetch is failed" (docs/envoy-filters.md#issuer-keys), and every gateway would need a route to
GitLab. Here one process reads the keys every `refresh_interval` (seconds, ignoring the server's one-day max-age,
so a rotation reaches the fleet quickly) and the compiler inlines them.

Envoy rejects a whole listener update when one key in an inline JWKS cannot be parsed, and a NACKed version is
never re-sent, so every key is checked here (it must load as a public key) and the ones Envoy cannot use are
dropped. The document is normalized (only public members, keys sorted by kid, canonical JSON) so the same
keys always give the same bytes, hence the same snapshot version and no needless push.

On any error the last good document stays: good keys are never replaced with nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import Counter, Gauge

from controlplane import __version__
from controlplane.retry import Backoff, RetryPolicy, retry_after_seconds
from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.jwks")

FETCHES = Counter(
    "controlplane_jwks_fetches_total",
    "JWKS refreshes by outcome: changed, unchanged, not_modified (HTTP 304) or error.",
    ["issuer", "result"],
    registry=REGISTRY,
)
KEY_CHANGES = Counter(
    "controlplane_jwks_key_changes_total",
    "Times an issuer's key set changed after its first successful fetch (rotations, withdrawals).",
    ["issuer"],
    registry=REGISTRY,
)
KEYS = Gauge(
    "controlplane_jwks_keys",
    "Usable keys in the issuer's current JWKS (0 before the first successful fetch).",
    ["issuer"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "controlplane_jwks_last_success_timestamp_seconds",
    "Unix time of the last successful JWKS fetch (a 304 counts).",
    ["issuer"],
    registry=REGISTRY,
)
RESULTS: Final = ("changed", "unchanged", "not_modified", "error")

DEFAULT_REFRESH_INTERVAL = 30.0  # seconds between reads of a relayed issuer's keys (serve's `--jwks-refresh`)
DEFAULT_MIN_INTERVAL = 1.0  # seconds: never read an issuer more often, whatever asks
DEFAULT_TIMEOUT = 5.0  # seconds per request
DEFAULT_MAX_RETRIES = 3
MAX_BODY_BYTES = 1 << 20  # a JWKS is a few kB; anything near this is not one
MIN_RSA_BITS = 2048  # Envoy would verify with weaker keys; we do not trust them
_RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# 0.2 s, 0.4 s, 0.8 s... capped at 2 s, exact: one relay per issuer, nobody to spread out.
BACKOFF: Final = Backoff(base_seconds=0.2, cap_seconds=2.0, jitter=False)
MAX_RETRY_AFTER_SECONDS: Final = 5.0
"""The longest an issuer's Retry-After holds one fetch: a longer wait is left to `run`, which retries later."""
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: Mapping[str, tuple[ec.EllipticCurve, int, str]] = {
    "P-256": (ec.SECP256R1(), 32, "ES256"),
    "P-384": (ec.SECP384R1(), 48, "ES384"),
    "P-521": (ec.SECP521R1(), 66, "ES512"),
}


class JwksError(Exception):
    """A fetch or a document that cannot be used; the message is safe to log (it never holds key material)."""


class UnusableKey(Exception):
    """One key Envoy cannot use; the rest of the document may still be fine."""


@dataclass(frozen=True)
class JwksDocument:
    """A normalized JWKS. `canonical` is what Envoy gets inline: the same keys always give the same bytes."""

    canonical: str
    kids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.kids)


@dataclass(frozen=True)
class DroppedKey:
    kid: str  # or "#<index>" when the key has none
    reason: str


def normalize_jwks(payload: bytes | str) -> tuple[JwksDocument, tuple[DroppedKey, ...]]:
    """Parse and normalize a JWKS: usable public keys only, sorted by kid, canonical JSON.

    Raises JwksError when the document is not a JWKS or holds no usable key (Envoy rejects an inline JWKS
    without one, "Jwks doesn't have any valid public key").
    """
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise JwksError(f"not JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('not a JWKS: expected an object with a "keys" list')
    kept: dict[str, dict[str, str]] = {}
    dropped: list[DroppedKey] = []
    for index, key in enumerate(document["keys"]):
        kid = key.get("kid") if isinstance(key, dict) else None
        label = kid if isinstance(kid, str) and kid else f"#{index}"
        try:
            public = _public_key(key)
        except UnusableKey as reason:
            dropped.append(DroppedKey(label, str(reason)))
            continue
        kept[_dumps(public)] = public  # an exact duplicate is kept once
    if not kept:
        reasons = "; ".join(f"{d.kid}: {d.reason}" for d in dropped) or "the keys list is empty"
        raise JwksError(f"no usable key ({reasons})")
    ordered = sorted(kept.items(), key=lambda item: (item[1]["kid"], item[0]))
    canonical = '{"keys":[' + ",".join(text for text, _ in ordered) + "]}"
    return JwksDocument(canonical, tuple(k["kid"] for _, k in ordered)), tuple(dropped)


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _public_key(key: object) -> dict[str, str]:
    """The public members Envoy needs, after checking the key loads (a key Envoy cannot parse NACKs the LDS)."""
    if not isinstance(key, dict):
        raise UnusableKey("not an object")
    kid, kty = key.get("kid"), key.get("kty")
    if not isinstance(kid, str) or not kid:
        raise UnusableKey("no kid")
    use, alg = key.get("use"), key.get("alg")
    if use is not None and use != "sig":
        raise UnusableKey(f"use is {use!r}, not 'sig'")
    if alg is not None and not isinstance(alg, str):
        raise UnusableKey("alg is not a string")
    public: dict[str, str] = {"kid": kid, "kty": str(kty)}
    if kty == "RSA":
        if alg is not None and alg not in _RSA_ALGS:
            raise UnusableKey(f"alg {alg} does not fit an RSA key")
        n, e = _b64_member(key, "n"), _b64_member(key, "e")
        try:
            numbers = rsa.RSAPublicNumbers(int.from_bytes(_b64(e), "big"), int.from_bytes(_b64(n), "big"))
            bits = numbers.public_key().key_size
        except ValueError as error:
            raise UnusableKey(f"invalid RSA key: {error}") from None
        if bits < MIN_RSA_BITS:
            raise UnusableKey(f"RSA key of {bits} bits, under {MIN_RSA_BITS}")
        public.update(n=n, e=e)
    elif kty == "EC":
        crv = key.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise UnusableKey(f"unsupported curve {crv!r}")
        curve, size, curve_alg = _EC_CURVES[crv]
        if alg is not None and alg != curve_alg:
            raise UnusableKey(f"alg {alg} does not fit curve {crv}")
        x, y = _b64_member(key, "x"), _b64_member(key, "y")
        if len(_b64(x)) != size or len(_b64(y)) != size:
            raise UnusableKey(f"coordinates of the wrong length for {crv}")
        try:
            ec.EllipticCurvePublicNumbers(
                int.from_bytes(_b64(x), "big"), int.from_bytes(_b64(y), "big"), curve
            ).public_key()
        except ValueError as error:
            raise UnusableKey(f"invalid EC key: {error}") from None
        public.update(crv=crv, x=x, y=y)
    else:
        raise UnusableKey(f"unsupported kty {kty!r}")
    if alg is not None:
        public["alg"] = alg  # Envoy skips a key whose alg differs from the token's
    if use is not None:
        public["use"] = use
    return public


def _b64_member(key: Mapping[str, Any], name: str) -> str:
    value = key.get(name)
    if not isinstance(value, str) or not value:
        raise UnusableKey(f"missing {name}")
    value = value.rstrip("=")  # padding is tolerated on input, never passed on
    _b64(value)
    return value


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise UnusableKey("a member is not base64url") from None


OnChange = Callable[[JwksDocument], Awaitable[object]]


class JwksFetcher:
    """Keeps one issuer's JWKS current. I/O lives here; the compiler only ever sees `JwksDocument.canonical`.

    `jwks_uri` given: it is fetched directly; otherwise it is discovered from
    `<issuer_url>/.well-known/openid-configuration`. `name` labels metrics and logs (default: the URL).
    """

    def __init__(
        self,
        issuer_url: str,
        *,
        jwks_uri: str | None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self.jwks_uri = jwks_uri
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries, backoff=BACKOFF)
        self.min_interval = min_interval
        self.refresh_interval = max(refresh_interval, min_interval)
        self._failure_backoff = Backoff(base_seconds=min_interval, cap_seconds=self.refresh_interval, jitter=False)
        self.name = name or issuer_url
        self.document: JwksDocument | None = None
        """The last good document; kept through every later error."""
        self.last_error: str | None = None
        self.last_success: float | None = None
        self.settled = asyncio.Event()
        """Set once the first refresh cycle of `run` (fetch and `on_change`) is over, whatever its outcome."""
        self._clock = clock
        self._wall_clock = wall_clock
        self._discovered: str | None = None
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._last_fetch: float | None = None
        self._reported: set[DroppedKey] = set()
        self._session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._on_change: OnChange | None = None
        KEYS.labels(self.name).set(0)

    # -- refreshing

    async def refresh(self, force: bool = False) -> JwksDocument | None:
        """Fetch now; the new document when the keys changed, else None (unchanged, 304, error, or too soon).

        Never fetches within `min_interval` of the previous fetch. `force` drops the HTTP validators, so
        neither the issuer nor a cache in between can answer with what we already hold.
        """
        async with self._lock:
            now = self._clock()
            if self._last_fetch is not None and now - self._last_fetch < self.min_interval:
                return None
            self._last_fetch = now
            try:
                fetched = await self._fetch(force)
            except JwksError as error:
                self._failed(str(error))
                return None
            return self._accept(fetched)

    async def on_unknown_kid(self, kid: str) -> bool:
        """A token names a kid we do not hold: refetch at once (at most once per `min_interval`).

        True when the kid is known afterwards. A change found this way is reported to `run`'s `on_change`.
        """
        if self.document is not None and kid in self.document.kids:
            return True
        changed = await self.refresh(force=True)
        if changed is not None and self._on_change is not None:
            await self._on_change(changed)
        return self.document is not None and kid in self.document.kids

    async def run(self, stop: asyncio.Event, on_change: OnChange) -> None:
        """Refresh every `refresh_interval` until `stop`; failures are retried sooner, backing off from
        `min_interval` up to `refresh_interval`. `on_change` gets each new document."""
        self._on_change = on_change
        failures = 0
        try:
            while not stop.is_set():
                changed = await self.refresh()
                failures = failures + 1 if self.last_error is not None else 0
                if changed is not None:
                    try:
                        await on_change(changed)
                    except Exception:
                        log.exception("jwks %s: applying new keys failed", self.name)
                self.settled.set()
                delay = self._failure_backoff.delay(failures - 1) if failures else self.refresh_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            self._on_change = None
            self.settled.set()

    async def close(self) -> None:
        """Close the HTTP session and withdraw this issuer's metric series (it is no longer relayed)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        for metric in (KEYS, LAST_SUCCESS, KEY_CHANGES):
            with contextlib.suppress(KeyError):
                metric.remove(self.name)
        for result in RESULTS:
            with contextlib.suppress(KeyError):
                FETCHES.remove(self.name, result)

    def status(self) -> dict[str, object]:
        return {
            "issuer": self.issuer_url,
            "jwks_uri": self.jwks_uri or self._discovered,
            "kids": list(self.document.kids) if self.document else [],
            "last_success": self.last_success,
            "last_error": self.last_error,
        }

    # -- outcomes

    def _accept(self, fetched: JwksDocument | None) -> JwksDocument | None:
        if self.last_error is not None and self.document is not None:
            log.info("jwks %s: refresh works again", self.name)
        self.last_error = None
        self.last_success = self._wall_clock()
        LAST_SUCCESS.labels(self.name).set(self.last_success)
        if fetched is None:
            FETCHES.labels(self.name, "not_modified").inc()
            return None
        previous, self.document = self.document, fetched
        KEYS.labels(self.name).set(len(fetched))
        if previous is not None and previous.canonical == fetched.canonical:
            FETCHES.labels(self.name, "unchanged").inc()
            return None
        FETCHES.labels(self.name, "changed").inc()
        if previous is None:
            log.info("jwks %s: %d key(s): %s", self.name, len(fetched), ", ".join(fetched.kids))
        else:
            KEY_CHANGES.labels(self.name).inc()
            added = sorted(set(fetched.kids) - set(previous.kids))
            removed = sorted(set(previous.kids) - set(fetched.kids))
            log.info(
                "jwks %s: keys changed, now %d (added: %s; removed: %s)",
                self.name,
                len(fetched),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
            )
        return fetched

    def _failed(self, error: str) -> None:
        FETCHES.labels(self.name, "error").inc()
        repeated = error == self.last_error
        self.last_error = error
        kept = f"keeping {len(self.document)} key(s) from the last good fetch" if self.document else "no keys yet"
        (log.debug if repeated else log.warning)("jwks %s: refresh failed: %s; %s", self.name, error, kept)

    # -- HTTP

    async def _fetch(self, force: bool) -> JwksDocument | None:
        """The normalized document, or None on a 304 (the cached one still holds)."""
        url = await self._jwks_url()
        headers = {"Accept": "application/json, application/jwk-set+json", "Cache-Control": "no-cache"}
        conditional = not force and self.document is not None
        if conditional and self._etag:
            headers["If-None-Match"] = self._etag
        if conditional and self._last_modified:
            headers["If-Modified-Since"] = self._last_modified
        try:
            status, response_headers, body = await self._request(url, headers)
        except JwksError:
            self._discovered = None  # the issuer may have moved its keys: discover again next time
            raise
        if status == 304 and conditional:
            return None
        if status != 200:
            raise JwksError(f"{url}: HTTP {status}")
        document, dropped = normalize_jwks(body)
        self._report(dropped)
        # Validators only for a document we accepted: a 304 must never pin a rejected one.
        self._etag = response_headers.get("ETag")
        self._last_modified = response_headers.get("Last-Modified")
        return document

    async def _jwks_url(self) -> str:
        if self.jwks_uri is not None:
            return self.jwks_uri
        if self._discovered is None:
            url = f"{self.issuer_url}/.well-known/openid-configuration"
            status, _, body = await self._request(url, {"Accept": "application/json"})
            if status != 200:
                raise JwksError(f"{url}: HTTP {status}")
            try:
                discovery = json.loads(body)
            except (ValueError, UnicodeDecodeError):
                raise JwksError(f"{url}: not JSON") from None
            if not isinstance(discovery, dict) or discovery.get("issuer", "").rstrip("/") != self.issuer_url:
                raise JwksError(f"{url}: the discovery document names another issuer")
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise JwksError(f"{url}: no http(s) jwks_uri")
            self._discovered = jwks_uri
        return self._discovered

    async def _request(self, url: str, headers: Mapping[str, str]) -> tuple[int, Mapping[str, str], bytes]:
        """GET with `self.retry`: transport errors, timeouts, 408/429/5xx are retried with backoff, or after the
        server's Retry-After when that is longer (up to MAX_RETRY_AFTER_SECONDS)."""
        attempt = 0
        while True:
            try:
                session = self._client()
                async with session.get(url, headers=headers, max_redirects=3) as response:
                    body = await _read_bounded(response)
                    if response.status not in _RETRYABLE:
                        return response.status, response.headers, body
                    error, hinted = f"HTTP {response.status}", retry_after_seconds(response.headers, self._wall_clock())
            except (aiohttp.ClientError, TimeoutError) as failure:
                error, hinted = f"{type(failure).__name__} {failure}".strip(), None
            if self.retry.exhausted(attempt):
                raise JwksError(f"{url}: {error} after {attempt + 1} attempt(s)")
            await asyncio.sleep(retry_delay(self.retry, attempt, hinted))
            attempt += 1

    def _client(self) -> aiohttp.ClientSession:
        """Created in the running loop. `trust_env=False`: proxy environment variables are ignored, so keys
        come straight from the issuer (and loopback test issuers are never sent to a proxy)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": f"controlplane/{__version__} (jwks relay)"},
                trust_env=False,
                raise_for_status=False,
            )
        return self._session

    def _report(self, dropped: tuple[DroppedKey, ...]) -> None:
        """Each unusable key is logged once, not on every refresh."""
        for key in dropped:
            if key not in self._reported:
                self._reported.add(key)
                log.warning("jwks %s: key %s dropped: %s", self.name, key.kid, key.reason)


def retry_delay(retry: RetryPolicy, attempt: int, hinted: float | None) -> float:
    """The wait after failed attempt `attempt`: the backoff, or the server's hint when longer, up to 5 s."""
    return max(retry.backoff.delay(attempt), min(hinted or 0.0, MAX_RETRY_AFTER_SECONDS))


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
        raise JwksError(f"response of {response.content_length} bytes, over {MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise JwksError(f"response over {MAX_BODY_BYTES} bytes")
    return bytes(body)
