"""Backends served by Kubernetes Services: their EndpointSlices listed and watched through the `kubernetes` client.

One thread per watched Service (the policy's Services, at most MAX_SERVICES) runs list → watch → watch … with the
API's resource versions: a watch resumes where the last one ended, bookmarks move that point while nothing changes,
and a 410 Gone (the version is older than the API server keeps) starts again with a list. Errors wait a jittered
exponential backoff. What a Service serves is kept through any outage: only the API server saying so changes it,
never its absence. Each change wakes one coroutine on the event loop, which recompiles (coalesced: changes made
while a compile runs are one more compile). The protocol facts relied on: docs/kubernetes-endpoints.md.

Threads stop cleanly: `stop` sets a flag and shuts the socket of the request each thread is blocked in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from controlplane.model.policy import Backend, Endpoint, Policy, ServiceRef
from controlplane.retry import Backoff
from controlplane.sources.kubernetes_slices import (
    MAX_ADDRESSES_PER_SERVICE,
    MAX_ENDPOINTS_PER_SERVICE,
    MAX_SLICES_PER_SERVICE,
    SERVICE_NAME_LABEL,
    Network,
    Slice,
    apply_event,
    endpoint_order,
    keep_first,
    parse_slice,
    ready_endpoints,
)
from controlplane.telemetry.metrics import REGISTRY
from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.kubernetes")
_REFUSED_LOG = RateLimitedLog(log, burst=5, interval=60.0)

MAX_SERVICES = 256  # threads: one per watched Service
LIST_PAGE = 100  # slices per list request (`limit`); pages follow `continue`
# Pages one list may take: twice what MAX_SLICES_PER_SERVICE needs (a server may return fewer than `limit`). A server
# whose every page says there is another (no item, a `continue` token) was asked forever, at full speed.
MAX_LIST_PAGES = 2 * -(-MAX_SLICES_PER_SERVICE // LIST_PAGE)
# List pages read and parsed at once, all Services together: a page is up to MAX_RESPONSE_BYTES and ~4 times that
# parsed, and after an API server restart every watch is answered 410 and relists at the same moment (256 Services
# at once was 256 of them: ~20 GiB).
LIST_CONCURRENCY = 4
_LISTING = threading.BoundedSemaphore(LIST_CONCURRENCY)
MAX_RESPONSE_BYTES = 16 << 20  # one list page or one watch event; past it the response is refused as hostile
WATCH_SECONDS = 300  # the server ends each watch after this (`timeoutSeconds`); it resumes from its version
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # a list page; a watch allows WATCH_SECONDS + this before the connection counts as dead
BACKOFF = Backoff(base_seconds=0.2, cap_seconds=30.0)
SHORT_WATCH_SECONDS = 1.0  # a watch ended sooner with no event is a failure (backed off), not the server's timeout
STOP_JOIN_SECONDS = 5.0  # `stop` waits this long in all for every watch thread (a thread in a request not yet
# answered cannot be interrupted: it ends when its request times out, on its own, as a daemon thread)

WATCHED_SERVICES = Gauge(
    "controlplane_kubernetes_watched_services",
    "Kubernetes Services whose EndpointSlices are watched (those the policy in service names).",
    registry=REGISTRY,
)
READY_ENDPOINTS = Gauge(
    "controlplane_kubernetes_ready_endpoints",
    "Ready endpoints each Service-backed backend is served by (in its last compile's assignment).",
    ["backend"],
    registry=REGISTRY,
)
WATCH_RESTARTS = Counter(
    "controlplane_kubernetes_watch_restarts_total",
    "EndpointSlice watches started again, by reason: `expired` (the server ended it, resumed from its version), "
    "`gone` (410: relisted), `error` (no or a bad answer: relisted after a backoff), `hostile` (a response over "
    "the size bound), `overdue` (not ended by the server at its timeoutSeconds: ended by us).",
    ["reason"],
    registry=REGISTRY,
)
RELISTS = Counter(
    "controlplane_kubernetes_relists_total",
    "EndpointSlice lists, by reason: `start`, `gone` (410 Gone), `error` (after a failed list or watch).",
    ["reason"],
    registry=REGISTRY,
)
CAPPED = Counter(
    "controlplane_kubernetes_capped_total",
    "Times a Service's slices or endpoints were over their bound and some were left out, by what: `slices`, "
    "`endpoints`.",
    ["what"],
    registry=REGISTRY,
)
REFUSED_ENDPOINTS = Counter(
    "controlplane_kubernetes_refused_endpoints_total",
    "Ready endpoints left out of a Service's assignment because of their address (loopback, link-local, cloud "
    "metadata, multicast...: docs/kubernetes-endpoints.md), by reason; counted each time a slice listing one is "
    "received.",
    ["reason"],
    registry=REGISTRY,
)
SYNC_AGE = Gauge(
    "controlplane_kubernetes_sync_age_seconds",
    "Seconds since each watched Service's EndpointSlices were last known current (a list, an event or a "
    "bookmark); -1 before the first list.",
    ["service"],
    registry=REGISTRY,
)


class KubernetesUnavailable(Exception):
    """No way to reach the API server was configured or found (no in-cluster service account, no kubeconfig)."""


class Gone(Exception):
    """410: the resource version asked for is older than the API server keeps; list again."""


class Stopped(Exception):
    """The watch was stopped while waiting for its turn to list."""


class Overdue(Exception):
    """A watch the server did not end at its `timeoutSeconds` (ended by us READ_TIMEOUT later)."""


class Hostile(Exception):
    """A response over the size bound."""


@dataclass(frozen=True)
class KubeAccess:
    """How to reach the API server: a kubeconfig file, else the pod's service account (in-cluster).

    A fresh client is built for every list and every watch: a kubeconfig or CA file rotated in place is read
    again, and the in-cluster loader re-reads the service account token (bound tokens expire) on its own."""

    kubeconfig: Path | None = None
    context: str | None = None
    # In-cluster files and environment, replaceable for tests; the defaults are the Kubernetes ones.
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    environ: Mapping[str, str] | None = None

    def client(self) -> Any:
        from kubernetes import client, config  # heavy: imported when a policy names a Service
        from kubernetes.config.incluster_config import InClusterConfigLoader

        configuration = client.Configuration()
        try:
            if self.kubeconfig is not None:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(self.kubeconfig), context=self.context, client_configuration=configuration
                )
            else:
                InClusterConfigLoader(  # type: ignore[no-untyped-call]
                    token_filename=self.token_file,
                    cert_filename=self.ca_file,
                    environ=os.environ if self.environ is None else self.environ,
                ).load_and_set(configuration)
        except (config.ConfigException, OSError, ValueError, TypeError) as error:
            raise KubernetesUnavailable(str(error) or type(error).__name__) from error
        return client.ApiClient(configuration)

    def check(self) -> str | None:
        """Why the API server cannot be reached as configured (nothing is sent), or None."""
        try:
            self.client().close()
        except KubernetesUnavailable as error:
            where = f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster service account"
            return f"no Kubernetes access ({where}: {error})"
        return None


def services_of(policy: Policy | None) -> frozenset[tuple[str, str]]:
    """(namespace, name) of every Service the policy's backends name."""
    if policy is None:
        return frozenset()
    return frozenset((s.namespace, s.name) for b in policy.backends for s in b.services)


@dataclass
class _ServiceState:
    """What one Service's watch knows; `slices` is replaced, never mutated (readers in other threads)."""

    slices: Mapping[str, Slice] = field(default_factory=dict)
    synced_at: float | None = None  # monotonic time the slices were last known current
    version: str | None = None
    restarts: int = 0
    last_error: str | None = None


class ServiceWatch:
    """The list/watch loop of one Service, in its own thread."""

    def __init__(
        self,
        namespace: str,
        name: str,
        access: KubeAccess,
        on_change: Callable[[], None],
        *,
        backoff: Backoff = BACKOFF,
        watch_seconds: int = WATCH_SECONDS,
        allow: tuple[Network, ...] = (),
    ) -> None:
        self.namespace, self.name = namespace, name
        self._allow = allow
        self.key = f"{namespace}/{name}"
        self.state = _ServiceState()
        self.synced = threading.Event()  # set once the first list is in
        self._access, self._on_change, self._backoff, self._watch_seconds = access, on_change, backoff, watch_seconds
        self._stop = threading.Event()
        self._finished = False  # the thread left its loop for good (under _lock: see `revive`)
        self._response: Any = None  # the urllib3 response being read, shut down by `stop`
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"kubernetes watch {self.key}", daemon=True)
        SYNC_AGE.labels(self.key).set_function(self.sync_age)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Never blocks: the flag, and the socket of the response being read shut down. A request not answered yet
        has no response to shut: the thread ends when it times out (or is revived)."""
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _shutdown(response)
        with contextlib.suppress(KeyError):  # the Service is no longer served: no age to report
            SYNC_AGE.remove(self.key)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def revive(self) -> bool:
        """Undo `stop` if the thread has not left its loop yet (it may be blocked in a request that cannot be
        interrupted): a Service named again while its old watch is still finishing reuses that thread instead of
        starting one more, so a policy flapping while the API server hangs does not pile threads up. False when
        the thread is done (start another watch)."""
        with self._lock:
            if self._finished:
                return False
            self._stop.clear()
        SYNC_AGE.labels(self.key).set_function(self.sync_age)
        return True

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(STOP_JOIN_SECONDS if timeout is None else timeout)
        return not self._thread.is_alive()

    def sync_age(self) -> float:
        synced = self.state.synced_at
        return -1.0 if synced is None else time.monotonic() - synced

    # -- the loop

    def _run(self) -> None:
        """The loop until stopped; whether it is over is decided under the lock, so `revive` never races a thread
        that is leaving."""
        while True:
            self._loop()
            with self._lock:
                if self._stop.is_set():
                    self._finished = True
                    return

    def _loop(self) -> None:
        reason, failures = "start", 0
        while not self._stop.is_set():
            try:
                if self.state.version is None:
                    RELISTS.labels(reason).inc()
                    self._list()
                self._watch()
                failures, reason = 0, "error"
                if not self._stop.is_set():
                    WATCH_RESTARTS.labels("expired").inc()
            except Gone:
                self.state.version, reason = None, "gone"
                WATCH_RESTARTS.labels("gone").inc()
                log.info("EndpointSlices of %s: resource version expired (410 Gone), listing again", self.key)
                if failures:  # Gone again before any watch worked: a server that keeps saying so is waited for
                    self._stop.wait(self._backoff.delay(failures))
                failures += 1
            except Exception as error:
                if self._stop.is_set():
                    break
                hostile = isinstance(error, Hostile)
                WATCH_RESTARTS.labels(
                    "hostile" if hostile else "overdue" if isinstance(error, Overdue) else "error"
                ).inc()
                if hostile:  # what was read of it cannot be trusted to have left the slices whole
                    self.state.version = None
                # Otherwise the watch resumes from the last version, as client-go's reflector does: a dropped
                # connection costs no list, and a version the server no longer keeps is a 410 and a relist.
                reason = "error"
                self.state.restarts += 1
                self.state.last_error = _short(error)
                delay = self._backoff.delay(failures)
                failures += 1
                log.warning(
                    "EndpointSlices of %s: %s; keeping the last endpoints, retrying in %.1fs",
                    self.key,
                    self.state.last_error,
                    delay,
                )
                self._stop.wait(delay)  # the backoff; `stop` ends it at once

    def _list(self) -> None:
        """Every slice of the Service, page by page; the version to watch from is the list's. Each page is parsed
        before the next is read: only what discovery uses of it is kept (a page's raw objects are ~10 times that)."""
        parsed: list[Slice] = []
        token: str | None = None
        for _ in range(MAX_LIST_PAGES):
            kwargs: dict[str, Any] = {"limit": LIST_PAGE}
            if token:
                kwargs["_continue"] = token
            with self._listing():
                page = self._request(self._call(**kwargs, _request_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT)))
                body = json.loads(self._read_all(page))
                page_items = body.get("items") if isinstance(body, dict) else None
                for item in page_items if isinstance(page_items, list) else ():
                    if self._ours(item) and (slice_ := parse_slice(item, self._allow)) is not None:
                        parsed.append(slice_)
                metadata = body.get("metadata") if isinstance(body, dict) else None
                token = metadata.get("continue") if isinstance(metadata, dict) else None
                version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
                del body, page_items  # before the slot is given to another Service's list
            if not token or len(parsed) >= MAX_SLICES_PER_SERVICE:
                break
        slices, capped = keep_first(parsed)
        for slice_ in slices.values():
            self._report_refused(slice_)
        if capped or token:
            CAPPED.labels("slices").inc()
            log.warning(
                "EndpointSlices of %s: over %d slices or %d ready addresses, the rest left out",
                self.key,
                MAX_SLICES_PER_SERVICE,
                MAX_ADDRESSES_PER_SERVICE,
            )
        if not isinstance(version, str) or not version:
            raise ValueError("list answer without metadata.resourceVersion")
        self._set(slices, version, changed=slices != self.state.slices or self.state.synced_at is None)
        self.synced.set()

    @contextlib.contextmanager
    def _listing(self) -> Iterator[None]:
        """One of the LIST_CONCURRENCY slots, waited for as long as the watch is not stopped."""
        slots = _LISTING  # the one acquired is the one released, even if the module's is replaced meanwhile
        while not slots.acquire(timeout=0.2):
            if self._stop.is_set():
                raise Stopped
        try:
            yield
        finally:
            slots.release()

    def _watch(self) -> None:
        """One watch from the current version, until the server ends it (its timeout) or an error."""
        response = self._request(
            self._call(
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=self.state.version,
                timeout_seconds=self._watch_seconds,
                _request_timeout=(CONNECT_TIMEOUT, self._watch_seconds + READ_TIMEOUT),
            )
        )
        # The server ends the watch at `timeoutSeconds`; one that does not (a byte now and then, never a whole
        # line, each read answered within its timeout) would freeze the Service for good: its socket is shut down
        # READ_TIMEOUT later, and the watch resumes from its version.
        overdue = threading.Event()
        timer = threading.Timer(self._watch_seconds + READ_TIMEOUT, _overdue, (response, overdue))
        timer.daemon = True
        timer.start()
        opened, events = time.monotonic(), 0
        try:
            for line in _lines(response):
                if self._stop.is_set():
                    return
                self._event(json.loads(line))
                events += 1
        except Exception:
            if overdue.is_set():
                raise Overdue(f"the watch outlived its {self._watch_seconds}s timeout") from None
            raise
        finally:
            timer.cancel()
            with self._lock:
                self._response = None
            response.close()
        if overdue.is_set():
            raise Overdue(f"the watch outlived its {self._watch_seconds}s timeout")
        if not events and not self._stop.is_set() and time.monotonic() - opened < SHORT_WATCH_SECONDS:
            # Ended at once with nothing in it (a proxy, a server going away): opened again at once, that was a
            # tight loop of requests. A failure, backed off, as client-go's reflector does ("very short watch").
            raise ValueError(f"very short watch: ended in under {SHORT_WATCH_SECONDS:.0f}s with no event")

    def _event(self, event: object) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise ValueError("watch event without an object")
        kind, obj = event.get("type"), event["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone
            raise ValueError(f"watch error: {_short_text(str(obj.get('message')))}")
        metadata = obj.get("metadata")
        version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        if not isinstance(version, str) or not version:
            raise ValueError(f"{kind} event without metadata.resourceVersion")
        if kind in ("ADDED", "MODIFIED") and not self._ours(obj):
            kind = "DELETED"  # not (or no longer) this Service's: as the server says when a label changes
        applied = apply_event(self.state.slices, str(kind), obj, allow=self._allow)
        if applied.dropped:
            CAPPED.labels("slices").inc()
        name = metadata.get("name") if isinstance(metadata, dict) else None
        if applied.changed and isinstance(name, str) and (parsed := applied.slices.get(name)) is not None:
            self._report_refused(parsed)
        self._set(applied.slices, version, changed=applied.changed)

    def _ours(self, obj: object) -> bool:
        """The object carries this Service's label. The server selects by it; checked again because what the API
        server sends is not trusted to be what was asked for (a proxy, a bug): another Service's slice never feeds
        this one's backend."""
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            return False
        labels = obj["metadata"].get("labels")
        return isinstance(labels, dict) and labels.get(SERVICE_NAME_LABEL) == self.name

    def _report_refused(self, slice_: Slice) -> None:
        """Logged and counted: a refused address is someone pointing the backend's traffic (and its injected
        credential) at the gateway's host or a metadata service, or a misconfigured controller."""
        for _, reason in slice_.refused:
            REFUSED_ENDPOINTS.labels(reason).inc()
        if slice_.refused:  # one line per slice, not per address: a slice may list a thousand
            shown = ", ".join(f"{address} ({reason})" for address, reason in slice_.refused[:3])
            more = f" and {len(slice_.refused) - 3} more" if len(slice_.refused) > 3 else ""
            # Whoever writes slices in the namespace decides how often this is said: a few lines a minute per
            # Service, then "suppressed N more" (the counter has every one).
            _REFUSED_LOG.log(
                logging.WARNING,
                "EndpointSlice %s/%s lists ready endpoints at refused addresses, no traffic is sent there: %s%s",
                self.namespace,
                slice_.name,
                shown,
                more,
                key=f"refused {self.key}",
            )

    def _set(self, slices: Mapping[str, Slice], version: str, *, changed: bool) -> None:
        self.state.slices, self.state.version = slices, version
        self.state.synced_at, self.state.last_error = time.monotonic(), None
        if changed and not self._stop.is_set():  # a stopped watch's Service is no longer served: nothing to wake
            self._on_change()

    # -- HTTP

    def _call(self, **kwargs: Any) -> Callable[[], Any]:
        def call() -> Any:
            from kubernetes import client

            api = client.DiscoveryV1Api(self._access.client())
            return api.list_namespaced_endpoint_slice(
                self.namespace,
                label_selector=f"{SERVICE_NAME_LABEL}={self.name}",
                _preload_content=False,
                **kwargs,
            )

        return call

    def _request(self, call: Callable[[], Any]) -> Any:
        """The response of `call`, registered so `stop` can shut it; 410 is `Gone`."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = call()
        except ApiException as error:
            if error.status == 410:
                raise Gone from error
            raise
        with self._lock:
            self._response = response
        if self._stop.is_set():
            _shutdown(response)
        return response

    def _read_all(self, response: Any) -> bytes:
        """A list page, at most MAX_RESPONSE_BYTES of it; the connection closed (its client is not reused)."""
        try:
            body: bytes = response.read(amt=MAX_RESPONSE_BYTES + 1)
        finally:
            with self._lock:
                self._response = None
            response.close()
        if len(body) > MAX_RESPONSE_BYTES:
            raise Hostile(f"list page over {MAX_RESPONSE_BYTES} bytes")
        return body


def _lines(response: Any) -> Iterator[bytes]:
    """The watch's newline-delimited JSON events, each bounded by MAX_RESPONSE_BYTES."""
    buffer = bytearray()  # appended in place: a 16 MiB event is not copied once per chunk
    for chunk in response.stream(64 << 10, decode_content=True):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            _bounded(line)
            if line.strip():
                yield line
        _bounded(buffer)
    if buffer.strip():
        yield bytes(buffer)


def _bounded(line: bytes | bytearray) -> None:
    if len(line) > MAX_RESPONSE_BYTES:
        raise Hostile(f"watch event over {MAX_RESPONSE_BYTES} bytes")


def _overdue(response: Any, overdue: threading.Event) -> None:
    overdue.set()
    _shutdown(response)


def _shutdown(response: Any) -> None:
    """Unblocks the read a watch thread is waiting in (urllib3 ≥ 2.3); a response already read and released
    has nothing to unblock."""
    with contextlib.suppress(Exception):
        response.shutdown()


def _ignore(_: object) -> None:
    return None


def _label_sets(metric: Gauge) -> list[tuple[str, ...]]:
    return [tuple(s.labels.values()) for m in metric.collect() for s in m.samples]


def _short(error: BaseException) -> str:
    status = getattr(error, "status", None)
    reason = getattr(error, "reason", None)
    if status is not None:  # ApiException: its str() carries the headers and body
        return f"HTTP {status} {reason or ''}".strip()
    return _short_text(f"{type(error).__name__}: {error}")


def _short_text(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class KubernetesEndpoints:
    """The watch set following the policy, and the endpoints it found; wakes `on_change` on the event loop."""

    def __init__(
        self,
        access: KubeAccess | None,
        *,
        backoff: Backoff = BACKOFF,
        watch_seconds: int = WATCH_SECONDS,
        initial_wait: float = 2.0,
        allow: tuple[Network, ...] = (),
    ) -> None:
        """`access` None: serve was given no way to Kubernetes and is not in a cluster; a policy naming a Service
        is then refused. `initial_wait`: how long a policy naming a new Service waits for its first list. `allow`:
        networks whose endpoints are served although their addresses are refused by default (REFUSED_NETWORKS)."""
        self._access, self._backoff, self._watch_seconds = access, backoff, watch_seconds
        self._allow = allow
        self._initial_wait = initial_wait
        self._watches: dict[tuple[str, str], ServiceWatch] = {}
        self._stopping: dict[tuple[str, str], ServiceWatch] = {}  # stopped, their threads maybe still finishing
        self._lock = threading.Lock()
        self._wake: Callable[[], None] = lambda: None
        self._cache: dict[tuple[ServiceRef, int], tuple[Mapping[str, Slice], tuple[Endpoint, ...]]] = {}
        self._merged: dict[str, tuple[tuple[tuple[Endpoint, ...], ...], tuple[Endpoint, ...]]] = {}

    # -- following the policy

    def prepare(self, policy: Policy) -> str | None:
        """Called (in the reload's worker thread) for a valid policy before it is compiled: its Services are
        watched from now on, and a new one's first list is waited for (bounded) so the first compile carries
        its endpoints. An answer is why the policy cannot be served: it names Services and there is no access."""
        wanted = services_of(policy)
        if not wanted:
            return None
        if len(wanted) > MAX_SERVICES:
            return f"the policy names {len(wanted)} Kubernetes Services, over the {MAX_SERVICES} one server watches"
        refusal = self._access_refusal() if not self._watches else None  # access that worked is not re-judged
        if refusal is not None:
            names = ", ".join(sorted(f"{ns}/{n}" for ns, n in wanted)[:5])
            return f"backends name Kubernetes Services ({names}) but {refusal}"
        started = self._add(wanted)
        deadline = time.monotonic() + self._initial_wait
        for watch in started:
            watch.synced.wait(max(0.0, deadline - time.monotonic()))
        return None

    def _access_refusal(self) -> str | None:
        if self._access is None:
            return "serve has no Kubernetes access (not in a cluster, no --kubeconfig)"
        return self._access.check()

    def _add(self, wanted: frozenset[tuple[str, str]]) -> list[ServiceWatch]:
        assert self._access is not None
        started = []
        with self._lock:
            for namespace, name in sorted(wanted - set(self._watches)):
                lingering = self._stopping.pop((namespace, name), None)
                if lingering is not None and lingering.revive():
                    self._watches[(namespace, name)] = lingering
                    started.append(lingering)
                    continue
                watch = ServiceWatch(
                    namespace,
                    name,
                    self._access,
                    self._changed,
                    backoff=self._backoff,
                    watch_seconds=self._watch_seconds,
                    allow=self._allow,
                )
                self._watches[(namespace, name)] = watch
                watch.start()
                started.append(watch)
            WATCHED_SERVICES.set(len(self._watches))
        if started:
            log.info("watching the EndpointSlices of %s", ", ".join(w.key for w in started))
        return started

    def retain(self, policy: Policy | None) -> None:
        """The policy in service changed: Services it no longer names are no longer watched."""
        wanted = services_of(policy)
        metered = {b.name for b in policy.backends if b.services} if policy is not None else set()
        for (backend,) in [labels for labels in _label_sets(READY_ENDPOINTS) if labels[0] not in metered]:
            READY_ENDPOINTS.remove(backend)
        # What the compile memoised for Services and backends no longer named (rebound, not mutated: the compile
        # may read them from its worker thread; a lost race costs one recomputation or one prune later).
        self._cache = {k: v for k, v in self._cache.items() if (k[0].namespace, k[0].name) in wanted}
        self._merged = {k: v for k, v in self._merged.items() if k in metered}
        with self._lock:
            gone = [self._watches.pop(key) for key in sorted(set(self._watches) - wanted)]
            WATCHED_SERVICES.set(len(self._watches))
            # Called on the event loop: stopped, never joined here (a thread blocked in a request the API server
            # does not answer would stall every xDS stream until it times out). Kept to be revived or reaped.
            self._stopping = {k: w for k, w in self._stopping.items() if w.alive()}
            for watch in gone:
                watch.stop()
                self._stopping[(watch.namespace, watch.name)] = watch
        if gone:
            log.info("no longer watching %s", ", ".join(w.key for w in gone))

    def stop(self) -> None:
        """Every watch stopped and joined, STOP_JOIN_SECONDS in all (not per watch: 256 threads blocked in requests
        the API server never answers took 256 times that); those still blocked end on their own (daemons)."""
        with self._lock:
            watches = [*self._watches.values(), *self._stopping.values()]
            self._watches.clear()
            self._stopping.clear()
            WATCHED_SERVICES.set(0)
        for watch in watches:
            watch.stop()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        stuck = [w.key for w in watches if not w.join(max(0.0, deadline - time.monotonic()))]
        if stuck:
            log.warning(
                "%d Kubernetes watches did not stop in %.0fs (blocked in a request): %s",
                len(stuck),
                STOP_JOIN_SECONDS,
                ", ".join(stuck[:5]),
            )

    # -- what the compile reads

    def endpoints(self, ref: ServiceRef) -> tuple[Endpoint, ...]:
        """The Service's ready endpoints on the port `ref` names; () before its first list (fail closed). The same
        tuple while its slices did not change, so the compiler's memo keeps the backend."""
        watch = self._watches.get((ref.namespace, ref.name))
        if watch is None:
            return ()
        slices = watch.state.slices
        key = (ref, id(slices))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is slices:
            return hit[1]
        found = ready_endpoints(slices.values(), ref.port)
        if found.capped:
            CAPPED.labels("endpoints").inc()
            log.warning("%s: over %d ready endpoints, the rest left out", ref.key, MAX_ENDPOINTS_PER_SERVICE)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != ref}
        self._cache[key] = (slices, found.endpoints)
        return found.endpoints

    def for_backend(self, backend: Backend) -> tuple[Endpoint, ...]:
        """The backend's endpoints: those of every Service it names, deduplicated and sorted (the same tuple while
        nothing changed); metered as its ready endpoints."""
        parts = tuple(self.endpoints(ref) for ref in backend.services)
        hit = self._merged.get(backend.name)
        if len(parts) == 1:
            found = parts[0]
        elif hit is not None and len(hit[0]) == len(parts) and all(map(operator.is_, hit[0], parts)):
            found = hit[1]
        else:
            found = tuple(sorted({e for part in parts for e in part}, key=endpoint_order))
            self._merged[backend.name] = (parts, found)
        READY_ENDPOINTS.labels(backend.name).set(len(found))
        return found

    # -- waking the event loop

    async def run(self, on_change: Callable[[], Awaitable[object]], stopping: asyncio.Event) -> None:
        """Calls `on_change` after slices changed; changes made while it runs are one more call (coalesced)."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        self._wake = lambda: _ignore(loop.call_soon_threadsafe(changed.set))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            while not stopping.is_set():
                wait = asyncio.ensure_future(changed.wait())
                await asyncio.wait({wait, stop}, return_when=asyncio.FIRST_COMPLETED)
                wait.cancel()
                if stopping.is_set():
                    return
                changed.clear()
                await on_change()
        finally:
            self._wake = lambda: None
            stop.cancel()

    def _changed(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while a watch thread was finishing
            self._wake()

    def status(self) -> dict[str, object]:
        with self._lock:
            watches = list(self._watches.values())
        return {
            "access": None if self._access is None else str(self._access.kubeconfig or "in-cluster"),
            "services": {
                w.key: {
                    "slices": len(w.state.slices),
                    "synced": w.state.synced_at is not None,
                    "sync_age_seconds": round(w.sync_age(), 3) if w.state.synced_at is not None else None,
                    "resource_version": w.state.version,
                    "restarts": w.state.restarts,
                    "last_error": w.state.last_error,
                }
                for w in sorted(watches, key=lambda w: w.key)
            },
        }
