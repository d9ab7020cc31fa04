"""A fake Kubernetes API server for EndpointSlices: a real HTTP(S) server on loopback speaking list + watch.

No API server can run here, so the control plane's EndpointSlice discovery is tested against this fake through the
real ``kubernetes`` client, exactly as it would run against a cluster. Fidelity is the point, as with the fake
GitLab: a fake that is kinder than Kubernetes (never answers 410, never ends a watch, sends bookmarks on every
event) would let a watcher that cannot recover pass its tests. What it implements, and why each subtle choice
was made, is written in docs/kubernetes-endpoints.md ("The fake API server"), citing the API concepts pages:

- ``GET /apis/discovery.k8s.io/v1[/namespaces/{ns}]/endpointslices``: ``labelSelector`` (equality and set-based,
  comma = and), ``fieldSelector`` (``metadata.name``, ``metadata.namespace``), ``limit`` + ``continue`` (a
  consistent snapshot across pages; 410 ``Expired`` once compacted), ``resourceVersion`` + ``resourceVersionMatch``
  (unset = most recent, ``0`` = any, ``NotOlderThan``, ``Exact``); an ``EndpointSliceList`` whose items carry no
  kind/apiVersion, as the real server's lists do.
- ``?watch=true``: a chunked stream, one JSON event per line, from a resourceVersion (unset or ``0``: synthetic
  ``ADDED`` for the current state first); label selector transitions become ``ADDED``/``DELETED`` as the watch cache
  does; ``allowWatchBookmarks`` BOOKMARK events (kind, apiVersion and ``metadata.resourceVersion`` only);
  ``sendInitialEvents``; ``timeoutSeconds`` ends the stream cleanly; a version older than the history kept gives
  an ``ERROR`` event carrying a ``Status`` with code 410 and reason ``Expired`` (HTTP 200: the stream started).
- ``GET .../endpointslices/{name}``; ``Authorization: Bearer <token>`` required (401 ``Status`` otherwise);
  optional TLS with the tests' CA.

One global resourceVersion increases on every write, like etcd's revision. Test controls are plain thread-safe
methods that never block (usable from sync and async tests alike): ``create``/``replace``/``apply``/``delete``
(with ``endpoint_slice()`` and ``endpoint()`` building realistic objects), ``compact()``, ``bookmark()``,
``drop_watches()``, ``stop()`` then ``start()`` again on the same port with the state kept, and request counts
(``lists``, ``watches``). Everything kept is bounded: the history (``max_history`` events, older ones are
compacted as etcd does), each watch's queue (a watcher that falls behind is closed, as the watch cache closes a
slow watcher) and the request log.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import ipaddress
import json
import queue
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import kubernetes.client
import kubernetes_validate  # type: ignore[import-untyped]

from .certs import CertFiles
from .lifecycle import Started
from .ports import LOOPBACK

__all__ = [
    "API_VERSION",
    "KIND",
    "SERVICE_NAME_LABEL",
    "FakeKube",
    "KubeRequest",
    "endpoint",
    "endpoint_slice",
    "validation_errors",
]

GROUP_VERSION = "discovery.k8s.io/v1"
API_VERSION = GROUP_VERSION
KIND = "EndpointSlice"
LIST_KIND = "EndpointSliceList"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
MANAGED_BY = "endpointslice-controller.k8s.io"
INITIAL_EVENTS_END = "k8s.io/initial-events-end"
FIRST_RESOURCE_VERSION = 1000  # a fresh fake does not start at 1: nothing may rely on small numbers
TOO_LARGE_WAIT = 3.0  # seconds the real server waits for a too-new resourceVersion before 504 (watch cache)
DEFAULT_WATCH_TIMEOUT = 1800.0  # kube-apiserver's --min-request-timeout: a watch without timeoutSeconds ends then

_TRUE = frozenset({"true", "1", "t", "yes"})
_NS_PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/namespaces/([^/]+)/endpointslices(?:/([^/]+))?$")
_ALL_PATH = "/apis/discovery.k8s.io/v1/endpointslices"
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # the apiserver's generateName alphabet (no vowels, no 0/1/3)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name): ordered like etcd's keys


# --- building realistic objects


def endpoint(
    address: str | Sequence[str],
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    pod: str | None = None,
    namespace: str = "default",
    node: str | None = "node-1",
    zone: str | None = None,
    hostname: str | None = None,
) -> Obj:
    """One entry of ``endpoints[]`` as the EndpointSlice controller writes it.

    ``serving`` defaults to ``ready`` (the controller sets ready = serving and not terminating); a pod shutting
    down but still answering is ``ready=False, serving=True, terminating=True``. ``pod`` names the targetRef.
    """
    addresses = [address] if isinstance(address, str) else list(address)
    out: Obj = {
        "addresses": addresses,
        "conditions": {"ready": ready, "serving": ready if serving is None else serving, "terminating": terminating},
    }
    if hostname is not None:
        out["hostname"] = hostname
    if node is not None:
        out["nodeName"] = node
    if pod is not None:
        out["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pod, "uid": str(uuid.uuid4())}
    if zone is not None:
        out["zone"] = zone
    return out


def endpoint_slice(
    service: str,
    endpoints: Iterable[Obj] = (),
    *,
    namespace: str = "default",
    name: str | None = None,
    ports: Iterable[tuple[str | None, int] | Obj] = (("http", 8080),),
    address_type: str = "IPv4",
    labels: Mapping[str, str] | None = None,
) -> Obj:
    """An EndpointSlice of ``service`` as the controller makes it: the service-name and managed-by labels, an owner
    reference to the Service, named TCP ports (a ``None`` name is the unnamed port, ``""``). Without ``name``,
    ``create`` generates one from ``generateName`` (``<service>-xxxxx``), as the controller's creates do."""
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise ValueError(f"addressType must be IPv4, IPv6 or FQDN, not {address_type!r}")
    metadata: Obj = {
        "namespace": namespace,
        "labels": {SERVICE_NAME_LABEL: service, MANAGED_BY_LABEL: MANAGED_BY, **(labels or {})},
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": service,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"service/{namespace}/{service}")),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if name is None:
        metadata["generateName"] = f"{service}-"
    else:
        metadata["name"] = name
    port_list = [
        dict(p) if isinstance(p, Mapping) else {"name": p[0] or "", "protocol": "TCP", "port": p[1]} for p in ports
    ]
    return {
        "metadata": metadata,
        "addressType": address_type,
        "endpoints": [copy.deepcopy(e) for e in endpoints],
        "ports": port_list,
    }


def _timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _status(code: int, reason: str, message: str, **extra: Any) -> Obj:
    """A ``metav1.Status`` failure, the body of every API error and of a watch's ERROR event."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": extra.pop("metadata", {}),
        "status": "Failure",
        "message": message,
        "reason": reason,
        **extra,
        "code": code,
    }


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = _status(code, reason, message, **extra)
        self.code = code
        self.retry_after = retry_after


# The Status an injected failure answers with (fail_next): what the API server says for each code.
_FAILURES: dict[int, tuple[str, str]] = {
    403: (
        "Forbidden",
        'endpointslices.discovery.k8s.io is forbidden: User "system:serviceaccount:controlplane:controlplane" '
        'cannot {verb} resource "endpointslices" in API group "discovery.k8s.io" {scope}',
    ),
    429: ("TooManyRequests", "Too many requests, please try again later."),
    500: ("InternalError", "Internal error occurred: etcdserver: request timed out"),
    503: ("ServiceUnavailable", "The server is currently unable to handle the request"),
    504: ("Timeout", "Timeout: request did not complete within the allotted timeout"),
}


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, "BadRequest", message)


# --- what the API server refuses to store

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_ENDPOINTS = 1000  # the API's limits on one EndpointSlice
MAX_PORTS = 100
MAX_ADDRESSES = 100


def validation_errors(obj: Obj) -> list[str]:
    """Why the API server would refuse to store this EndpointSlice: the strict OpenAPI schema (unknown fields,
    wrong types) and the rules its validation adds (addresses of the slice's addressType, the size limits, port
    names). A fake that stored what a real server refuses would let a test feed the discovery impossible data."""
    errors = []
    try:
        kubernetes_validate.validate({"kind": KIND, "apiVersion": API_VERSION, **obj}, "1.37", strict=True)
    except kubernetes_validate.ValidationError as err:
        errors.append(f"schema: {err.message}")
    meta, address_type = obj.get("metadata", {}), obj.get("addressType")
    name = meta.get("name", "")
    if name and (len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name: Invalid value: {name!r}: not a DNS subdomain")
    endpoints, ports = obj.get("endpoints") or [], obj.get("ports") or []
    if len(endpoints) > MAX_ENDPOINTS:
        errors.append(f"endpoints: Too many: {len(endpoints)}: must have at most {MAX_ENDPOINTS} items")
    if len(ports) > MAX_PORTS:
        errors.append(f"ports: Too many: {len(ports)}: must have at most {MAX_PORTS} items")
    for i, ep in enumerate(endpoints):
        addresses = ep.get("addresses") or []
        if not 1 <= len(addresses) <= MAX_ADDRESSES:
            errors.append(f"endpoints[{i}].addresses: must have between 1 and {MAX_ADDRESSES} items")
        for address in addresses:
            if not _address_fits(address, address_type):
                errors.append(f"endpoints[{i}].addresses: Invalid value: {address!r}: not an {address_type} address")
            elif address_type != "FQDN" and (special := _special_ip(address)):
                errors.append(f"endpoints[{i}].addresses: Invalid value: {address!r}: may not be {special}")
    names = [p.get("name", "") for p in ports]
    for port_name in names:
        if port_name and (len(port_name) > 63 or not _DNS_LABEL.match(port_name)):
            errors.append(f"ports.name: Invalid value: {port_name!r}: not a DNS label")
    if len(set(names)) != len(names):
        errors.append("ports.name: Duplicate value")
    return errors


def _address_fits(address: Any, address_type: Any) -> bool:
    if not isinstance(address, str):
        return False
    if address_type == "FQDN":
        return len(address) <= 253 and _DNS_SUBDOMAIN.match(address) is not None
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return parsed.version == (4 if address_type == "IPv4" else 6)


def _special_ip(address: str) -> str | None:
    """What the API server refuses in an EndpointSlice since the fix of CVE-2021-25737 (the checks Endpoints
    already had): the unspecified address, loopback, link-local unicast and link-local multicast. Go's `net.IP`
    judges an IPv4-mapped IPv6 address as the IPv4 one, so `::ffff:127.0.0.1` is loopback too. Other multicast,
    broadcast and cloud metadata addresses outside 169.254/16 are stored."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return "unspecified (0.0.0.0, ::)"
    if ip.is_loopback:
        return "in the loopback range (127.0.0.0/8, ::1/128)"
    if ip.is_link_local:
        return "in the link-local range (169.254.0.0/16, fe80::/10)"
    link_local_multicast = ipaddress.ip_network("224.0.0.0/24" if ip.version == 4 else "ff02::/16")
    if ip in link_local_multicast:
        return "in the link-local multicast range (224.0.0.0/24, ff02::/10)"
    return None


# --- selectors


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # "!=" and "notin" match a missing label


_SET_REQ = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_REQ = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)\s*$")
_EXISTS_REQ = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_requirements(selector: str) -> list[str]:
    """Split on the commas outside ``( )``: ``a in (x,y),b`` is two requirements."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return parts


def parse_label_selector(selector: str) -> tuple[_Requirement, ...]:
    """The label selector grammar of the API (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
    ``k notin (a,b)``; commas are a conjunction). Anything else is a 400, as the server answers."""
    if not selector.strip():
        return ()
    out = []
    for part in _split_requirements(selector):
        if m := _SET_REQ.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append(_Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_REQ.match(part):
            out.append(_Requirement(m.group(1), "!=" if m.group(2) == "!=" else "=", frozenset({m.group(3)})))
        elif m := _EXISTS_REQ.match(part):
            out.append(_Requirement(m.group(2), "!" if m.group(1) else "exists"))
        else:
            raise _bad_request(f"unable to parse requirement: {part.strip()!r}: invalid label selector")
    return tuple(out)


def _parse_field_selector(selector: str) -> tuple[tuple[str, bool, str], ...]:
    """``metadata.name`` and ``metadata.namespace`` (``=``, ``==``, ``!=``): the fields EndpointSlices support."""
    if not selector.strip():
        return ()
    out = []
    for part in selector.split(","):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise _bad_request(f"invalid selector: {part!r}; can't understand {part!r}")
        if m.group(1) not in ("metadata.name", "metadata.namespace"):
            raise _bad_request(f'field label not supported: {m.group(1)}: "{m.group(1)}" is not a known field selector')
        out.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return tuple(out)


@dataclass(frozen=True)
class _Filter:
    namespace: str | None
    labels: tuple[_Requirement, ...] = ()
    fields: tuple[tuple[str, bool, str], ...] = ()

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta["namespace"] != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        for name, equal, value in self.fields:
            actual = meta["name"] if name == "metadata.name" else meta["namespace"]
            if (actual == value) != equal:
                return False
        return True


# --- events and watchers


@dataclass(frozen=True)
class _Change:
    """One write, as etcd keeps it: the object before (None on create) and after (None on delete)."""

    rv: int
    key: Key
    old: Obj | None
    new: Obj | None


_END = "end"  # the stream ends cleanly (terminating chunk): a timeout, drop_watches(), a slow watcher
_ABORT = "abort"  # the connection is cut mid-stream: the API server went away


@dataclass
class _Watcher:
    filter: _Filter
    bookmarks: bool
    after: int  # only changes with rv > after are sent
    queue: queue.Queue[tuple[str, Obj] | str]
    connection: socket.socket
    closing: str | None = None

    def offer(self, change: _Change) -> None:
        """Queue the event this change means to this watcher (called under the store's lock)."""
        if change.rv <= self.after or self.closing:
            return
        was, now = self.filter.matches(change.old), self.filter.matches(change.new)
        if now and change.new is not None:
            kind = "ADDED" if not was else "MODIFIED"
            self._put((kind, change.new))
        elif was and change.old is not None:
            # Deleted, or no longer selected: DELETED carrying the object as it was before (the content the
            # watcher selected), at this change's resourceVersion, as the watch cache sends it.
            obj = copy.deepcopy(change.old)
            obj["metadata"]["resourceVersion"] = str(change.rv)
            self._put(("DELETED", obj))

    def _put(self, item: tuple[str, Obj] | str) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:  # fallen behind: closed, as the watch cache closes a watcher whose buffer is full
            self.close(_END)

    def close(self, how: str) -> None:
        """End the stream after the events queued (or, when the queue is full, instead of them: the client resumes
        from the last version it received, and the history still has them)."""
        if self.closing is None:
            self.closing = how
        while True:
            try:
                self.queue.put_nowait(how)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.queue.get_nowait()
        if how == _ABORT:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class KubeRequest:
    """One API request as the fake saw it. ``verb`` is the Kubernetes verb: list, watch, get (or "other")."""

    verb: str
    namespace: str | None
    path: str
    query: Mapping[str, str]
    status: int
    at: float
    authorized: bool


# --- the store: objects, history, resourceVersion


class _Store:
    """The objects, the global resourceVersion and the retained history, under one lock.

    The history is a base snapshot (the state at ``base_rv``) plus every change after it, so any version from
    ``base_rv`` to now can be rebuilt (an ``Exact`` list, a continued list) and a watch can start from any of them;
    older versions are gone: 410, as after etcd's compaction.
    """

    def __init__(self, max_history: int, watch_queue: int) -> None:
        self.lock = threading.Condition()
        self.rv = FIRST_RESOURCE_VERSION
        self.objects: dict[Key, Obj] = {}
        self.base: dict[Key, Obj] = {}
        self.base_rv = self.rv
        self.history: deque[_Change] = deque()
        self.max_history = max_history
        self.watch_queue = watch_queue
        self.watchers: list[_Watcher] = []

    def write(self, key: Key, new: Obj | None) -> _Change:
        with self.lock:
            self.rv += 1
            old = self.objects.get(key)
            if new is None:
                del self.objects[key]
            else:
                new["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[key] = new
            change = _Change(self.rv, key, old, new)
            self.history.append(change)
            while len(self.history) > self.max_history:
                self._fold_oldest()
            for watcher in self.watchers:
                watcher.offer(change)
            self.lock.notify_all()
            return change

    def _fold_oldest(self) -> None:
        change = self.history.popleft()
        if change.new is None:
            self.base.pop(change.key, None)
        else:
            self.base[change.key] = change.new
        self.base_rv = change.rv

    def compact(self) -> None:
        with self.lock:
            while self.history:
                self._fold_oldest()
            self.base_rv = self.rv

    def snapshot(self, rv: int) -> dict[Key, Obj]:
        """The objects as they were at ``rv`` (``base_rv <= rv <= self.rv``; the caller checks)."""
        state = dict(self.base)
        for change in self.history:
            if change.rv > rv:
                break
            if change.new is None:
                state.pop(change.key, None)
            else:
                state[change.key] = change.new
        return state

    def wait_for(self, rv: int, timeout: float) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.rv >= rv, timeout)


# --- the HTTP side


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "").strip().lower() in _TRUE


def _int(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _bad_request(f"{name}: Invalid value: {value!r}: must be an integer") from None


def _parse_rv(value: str) -> int:
    try:
        rv = int(value)
    except ValueError:
        rv = -1
    if rv < 0:
        raise _ApiError(400, "BadRequest", f'invalid resource version "{value}"')
    return rv


def _encode_continue(rv: int, start: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        rv, start = int(data["rv"]), str(data["start"])
        if data.get("v") != "meta.k8s.io/v1" or rv <= 0:
            raise ValueError("unknown continue token version")
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _bad_request("continue key is not valid: incorrect encoded start resourceVersion") from None
    return rv, start


def _key_string(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each watch event leaves at once
    server: _HTTPServer
    extra_headers: dict[str, str]

    def setup(self) -> None:
        self.extra_headers = {}
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()  # here, in this connection's thread, not in the accept loop
            except (OSError, ssl.SSLError):
                self.request.close()
                raise
        super().setup()
        self.server.track(self.request, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.request, add=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: request lines and headers are not logged (tokens)."""

    def do_GET(self) -> None:
        self.server.fake._serve(self, "GET")

    def _other(self) -> None:
        self.server.fake._serve(self, self.command)

    do_POST = do_PUT = do_PATCH = do_DELETE = _other

    # -- writing

    def send_json(self, status: int, body: Obj) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        for name, value in self.extra_headers.items():
            self.send_header(name, value)
        self.extra_headers = {}
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def send_event(self, event_type: str, obj: Obj) -> None:
        """One event per chunk, newline-terminated, as the API server's JSON watch encoder writes them."""
        data = json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, fake: FakeKube, port: int, context: ssl.SSLContext | None) -> None:
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((LOOPBACK, port), _Handler)
        if context is not None:
            self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (a watch stopped by its client, a killed control plane) is not the fake's
        error, and neither is a refused TLS handshake: no traceback for those."""
        if not isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            super().handle_error(request, client_address)

    def cut_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class FakeKube(Started):
    """The API server (see the module docstring). ``with FakeKube() as kube:`` starts it on an ephemeral loopback
    port; ``tls=pki.server`` (tests/support/certs.py) serves HTTPS, verified by clients against ``ca``."""

    def __init__(
        self,
        *,
        token: str | None = None,
        tls: CertFiles | None = None,
        ca: Path | None = None,
        port: int = 0,
        max_history: int = 1000,
        watch_queue: int = 1000,
        watch_timeout: float = DEFAULT_WATCH_TIMEOUT,
        bookmark_interval: float | None = None,
        max_requests_logged: int = 10_000,
    ) -> None:
        """``bookmark_interval``: with it, every bookmark-enabled watch gets a BOOKMARK after that many idle seconds
        (the real server sends one about every minute); without it, only ``bookmark()`` sends them.
        ``watch_timeout``: how long a watch without ``timeoutSeconds`` lasts before the server ends it."""
        if tls is not None and ca is None:
            raise ValueError("tls needs the ca that signed it, for the clients' configuration")
        self.token = token or secrets.token_urlsafe(24)
        """The only bearer token accepted (a service account token, in Kubernetes' terms)."""
        self.tls = tls
        self.ca = ca
        self.watch_timeout = watch_timeout
        self.bookmark_interval = bookmark_interval
        self.validate = True
        """Refuse (``ValueError``) a slice the API server would refuse (``validation_errors``); False lets a test
        store one anyway, to see what the discovery does with data no real server would give it."""
        self.too_large_wait = TOO_LARGE_WAIT
        """How long a request for a resourceVersion not reached yet waits for it before its 504."""
        self._port = port
        self._store = _Store(max_history, watch_queue)
        self._log: deque[KubeRequest] = deque(maxlen=max_requests_logged)
        self._log_lock = threading.Lock()
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stop_lock = threading.Lock()
        self._failures: deque[tuple[int, str | None, int | None]] = deque()

    # -- lifecycle

    def start(self) -> Self:
        """Start serving; after ``stop()``, on the same port and with every object and version kept, as an API
        server that restarts behind a stable address."""
        if self._server is not None:
            return self
        context = None
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls.cert, self.tls.key)
        self._server = _HTTPServer(self, self._port, context)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-kube", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """The API server goes away: listener closed, every connection (open watches included) cut. `running`
        turns false only once the listener is closed: a client that saw its watch cut (the first step) and asked
        again at once was still served while the stop went on in another thread."""
        with self._stop_lock:
            server, thread = self._server, self._thread
            if server is None:
                return
            self.drop_watches(abrupt=True)
            server.shutdown()
            server.cut_connections()
            server.server_close()
            if thread is not None:
                thread.join(timeout=5)
            self._server = self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("fake kube API server was never started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    # -- client configuration

    def configuration(self) -> kubernetes.client.Configuration:
        """A client ``Configuration`` for this server: host, bearer token, and the CA when serving TLS."""
        config = kubernetes.client.Configuration(
            host=self.base_url,
            api_key={"BearerToken": self.token},
            api_key_prefix={"BearerToken": "Bearer"},
        )
        if self.ca is not None:
            config.ssl_ca_cert = str(self.ca)
            config.verify_ssl = True
        return config

    def api_client(self) -> kubernetes.client.ApiClient:
        return kubernetes.client.ApiClient(self.configuration())

    def write_kubeconfig(self, path: Path, *, namespace: str = "default", token_file: Path | None = None) -> Path:
        """A kubeconfig for a separately started process. With ``token_file`` the token is written there and the
        kubeconfig names it (``tokenFile``) rather than holding it, as a mounted service account token is read."""
        user: Obj
        if token_file is not None:
            token_file.write_text(self.token)
            user = {"tokenFile": str(token_file)}
        else:
            user = {"token": self.token}
        cluster: Obj = {"server": self.base_url}
        if self.ca is not None:
            cluster["certificate-authority"] = str(self.ca)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=2))  # JSON is YAML: no yaml dependency here
        path.chmod(0o600)
        return path

    # -- test controls: objects

    @property
    def resource_version(self) -> str:
        """The current global resourceVersion (etcd's revision)."""
        with self._store.lock:
            return str(self._store.rv)

    def create(self, obj: Obj) -> Obj:
        """Create an EndpointSlice (``endpoint_slice()`` builds one); returns it as stored (uid, resourceVersion,
        creationTimestamp, generation, a generated name). An existing name is a conflict: ``KeyError``."""
        new = self._complete(obj)
        meta = new["metadata"]
        if "name" not in meta:
            meta["name"] = self._generate_name(meta)
        self._check(new)
        key = (meta["namespace"], meta["name"])
        with self._store.lock:
            if key in self._store.objects:
                raise KeyError(f"endpointslices {meta['name']!r} already exists in {meta['namespace']!r}")
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_timestamp(), generation=1)
            self._store.write(key, new)
            return copy.deepcopy(new)

    def replace(self, obj: Obj) -> Obj:
        """Replace an existing EndpointSlice (metadata.name and namespace name it): a new resourceVersion, uid and
        creationTimestamp kept, generation bumped when anything but metadata changed."""
        new = self._complete(obj)
        self._check(new)
        meta = new["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._store.lock:
            old = self._store.objects.get(key)
            if old is None:
                raise KeyError(f"endpointslices {meta['name']!r} not found in {meta['namespace']!r}")
            old_meta = old["metadata"]
            changed = {k: v for k, v in new.items() if k != "metadata"} != {
                k: v for k, v in old.items() if k != "metadata"
            }
            meta.update(
                uid=old_meta["uid"],
                creationTimestamp=old_meta["creationTimestamp"],
                generation=old_meta["generation"] + (1 if changed else 0),
            )
            if "generateName" in old_meta:
                meta["generateName"] = old_meta["generateName"]
            self._store.write(key, new)
            return copy.deepcopy(new)

    def apply(self, obj: Obj) -> Obj:
        """Create, or replace when a slice of that name exists."""
        meta = obj["metadata"]
        if "name" in meta and self.get(meta.get("namespace", "default"), meta["name"]) is not None:
            return self.replace(obj)
        return self.create(obj)

    def delete(self, namespace: str, name: str) -> Obj:
        """Delete a slice; watchers get DELETED with its last state at the deletion's resourceVersion."""
        with self._store.lock:
            old = self._store.objects.get((namespace, name))
            if old is None:
                raise KeyError(f"endpointslices {name!r} not found in {namespace!r}")
            change = self._store.write((namespace, name), None)
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(change.rv)
            return gone

    def get(self, namespace: str, name: str) -> Obj | None:
        with self._store.lock:
            obj = self._store.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def slices(self, namespace: str | None = None, service: str | None = None) -> list[Obj]:
        """The current slices (optionally of one namespace / Service), in key order."""
        with self._store.lock:
            out = [
                copy.deepcopy(obj)
                for key, obj in sorted(self._store.objects.items())
                if (namespace is None or key[0] == namespace)
                and (service is None or obj["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL) == service)
            ]
        return out

    def _complete(self, obj: Obj) -> Obj:
        new = copy.deepcopy(obj)
        meta = new.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        for drop in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            meta.pop(drop, None)
        new.pop("kind", None)
        new.pop("apiVersion", None)
        if new.get("addressType") not in ("IPv4", "IPv6", "FQDN"):
            raise ValueError(f"addressType: Unsupported value: {new.get('addressType')!r}")
        new.setdefault("endpoints", [])
        return new

    def _check(self, obj: Obj) -> None:
        if self.validate and (errors := validation_errors(obj)):
            raise ValueError("EndpointSlice is invalid: " + "; ".join(errors))

    def _generate_name(self, meta: Obj) -> str:
        prefix = meta.get("generateName") or "endpointslice-"
        while True:
            name = prefix + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
            if (meta["namespace"], name) not in self._store.objects:
                return name

    # -- test controls: history and watches

    def compact(self) -> str:
        """Forget the history (etcd compaction): a watch or an Exact/continued list from any version before now
        gets 410 Gone. Returns the resourceVersion compacted to."""
        self._store.compact()
        return self.resource_version

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current resourceVersion to every open watch that allowed bookmarks, after the
        events already queued for it. Returns how many watches it went to."""
        with self._store.lock:
            watchers = [w for w in self._store.watchers if w.bookmarks and not w.closing]
            for watcher in watchers:
                watcher._put(("BOOKMARK", self._bookmark_object(self._store.rv)))
            return len(watchers)

    def drop_watches(self, *, abrupt: bool = False) -> int:
        """End every open watch: cleanly (the stream's last chunk, as on a server-side timeout) or ``abrupt``
        (the connection cut mid-stream). Returns how many were open."""
        with self._store.lock:
            watchers = list(self._store.watchers)
            for watcher in watchers:
                watcher.close(_ABORT if abrupt else _END)
        return len(watchers)

    @property
    def open_watches(self) -> int:
        with self._store.lock:
            return sum(1 for w in self._store.watchers if not w.closing)

    def fail_next(self, code: int, *, times: int = 1, verb: str | None = None, retry_after: int | None = None) -> None:
        """The next ``times`` authorized requests (of ``verb`` only: list, watch or get) answer ``code`` with the
        API server's Status for it: 403 Forbidden (RBAC), 429 TooManyRequests (with ``retry_after``: the
        Retry-After header and ``details.retryAfterSeconds``), 500, 503, 504. For backoff tests."""
        with self._log_lock:
            self._failures.extend([(code, verb, retry_after)] * times)

    # -- test controls: what clients asked

    def requests(self, verb: str | None = None) -> list[KubeRequest]:
        with self._log_lock:
            return [r for r in self._log if verb is None or r.verb == verb]

    @property
    def lists(self) -> int:
        """List requests served so far (authorized ones), whatever their outcome."""
        return sum(1 for r in self.requests("list") if r.authorized)

    @property
    def watches(self) -> int:
        """Watch requests served so far (authorized ones), whatever their outcome."""
        return sum(1 for r in self.requests("watch") if r.authorized)

    # -- serving

    def _authorized(self, header: str) -> bool:
        """The API server's bearer-token authenticator splits the header on white space and compares the scheme
        without case: the client's in-cluster loader sends `bearer <token>`, a kubeconfig `Bearer <token>`."""
        parts = header.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return False
        return secrets.compare_digest(parts[1].encode(), self.token.encode())

    def _serve(self, handler: _Handler, method: str) -> None:
        split = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        namespace, name, verb = self._route(split.path, query)
        authorized = self._authorized(handler.headers.get("Authorization", ""))
        try:
            if not authorized:
                raise _ApiError(401, "Unauthorized", "Unauthorized")
            if verb == "other":
                raise _ApiError(404, "NotFound", "the server could not find the requested resource")
            if method != "GET":
                raise _ApiError(405, "MethodNotAllowed", f"{method} is not supported by this fake")
            self._injected_failure(verb, namespace)
            if verb == "watch":
                opened = self._open_watch(handler, namespace, query)
                self._log_request(verb, namespace, split.path, query, 200, authorized)
                self._stream(handler, *opened)
                return
            status, body = 200, self._get(namespace, name) if verb == "get" else self._list(namespace, query)
        except _ApiError as err:
            status, body = err.code, err.status
            if err.retry_after is not None:
                handler.extra_headers["Retry-After"] = str(err.retry_after)
        self._log_request(verb, namespace, split.path, query, status, authorized)
        handler.send_json(status, body)

    def _injected_failure(self, verb: str, namespace: str | None) -> None:
        with self._log_lock:
            if not self._failures or self._failures[0][1] not in (None, verb):
                return
            code, _, retry_after = self._failures.popleft()
        reason, message = _FAILURES.get(code, ("Unknown", f"an error on the server ({code}) has prevented the request"))
        if code == 403:
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = message.format(verb=verb if verb != "watch" else "watch", scope=scope)
        extra: dict[str, Any] = {}
        if retry_after is not None:
            extra["details"] = {"retryAfterSeconds": retry_after}
        raise _ApiError(code, reason, message, retry_after=retry_after, **extra)

    def _get(self, namespace: str | None, name: str | None) -> Obj:
        assert namespace is not None and name is not None
        obj = self.get(namespace, name)
        if obj is None:
            raise _ApiError(
                404, "NotFound", f'endpointslices.discovery.k8s.io "{name}" not found',
                details={"name": name, "group": "discovery.k8s.io", "kind": "endpointslices"},
            )  # fmt: skip
        return {"kind": KIND, "apiVersion": API_VERSION, **obj}

    @staticmethod
    def _route(path: str, query: Mapping[str, str]) -> tuple[str | None, str | None, str]:
        watching = _flag(query, "watch")
        if path == _ALL_PATH:
            return None, None, "watch" if watching else "list"
        if m := _NS_PATH.match(path):
            namespace, name = unquote(m.group(1)), m.group(2)
            if name is not None:
                return namespace, unquote(name), "get"
            return namespace, None, "watch" if watching else "list"
        return None, None, "other"

    def _log_request(
        self, verb: str, namespace: str | None, path: str, query: Mapping[str, str], status: int, authorized: bool
    ) -> None:
        with self._log_lock:
            self._log.append(KubeRequest(verb, namespace, path, dict(query), status, time.monotonic(), authorized))

    def _filter(self, namespace: str | None, query: Mapping[str, str]) -> _Filter:
        return _Filter(
            namespace,
            parse_label_selector(query.get("labelSelector", "")),
            _parse_field_selector(query.get("fieldSelector", "")),
        )

    # -- list

    def _list(self, namespace: str | None, query: Mapping[str, str]) -> Obj:
        selector = self._filter(namespace, query)
        limit = _int(query, "limit")
        if limit is not None and limit < 0:
            raise _bad_request("limit: Invalid value: must be non-negative")
        rv_param, match = query.get("resourceVersion", ""), query.get("resourceVersionMatch", "")
        token = query.get("continue", "")
        store = self._store
        if match and match not in ("Exact", "NotOlderThan"):
            raise _bad_request(f'resourceVersionMatch: Unsupported value: "{match}"')
        if match and not rv_param:
            raise _bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
                               "resourceVersion is provided")  # fmt: skip
        if token and (rv_param or match):
            raise _bad_request("specifying resource version is not allowed when using continue")
        start = ""
        if token:
            at, start = _decode_continue(token)
            with store.lock:
                if at < store.base_rv:
                    raise self._expired_continue(selector, start, limit)
                state = store.snapshot(at)
        elif match == "Exact" or (not match and rv_param not in ("", "0") and limit):
            # Exact, asked for or implied: a resourceVersion with a limit and no match is the legacy Exact.
            at = _parse_rv(rv_param)
            if at == 0:
                raise _bad_request('resourceVersionMatch "exact" is forbidden for resourceVersion "0"')
            if not store.wait_for(at, self.too_large_wait):
                raise self._too_large(at)
            with store.lock:
                if at < store.base_rv:
                    raise _ApiError(410, "Expired", "The resourceVersion for the provided list is too old.")
                state = store.snapshot(at)
        else:
            wanted = _parse_rv(rv_param) if rv_param else 0
            if wanted and not store.wait_for(wanted, self.too_large_wait):
                raise self._too_large(wanted)
            with store.lock:
                at, state = store.rv, dict(store.objects)
        return self._page(state, at, selector, start, limit)

    def _page(self, state: Mapping[Key, Obj], at: int, selector: _Filter, start: str, limit: int | None) -> Obj:
        keys = [k for k in sorted(state) if _key_string(k) >= start]
        items: list[Obj] = []
        more = False
        for i, key in enumerate(keys):
            if limit and len(items) == limit:
                more = i < len(keys)
                break
            if selector.matches(state[key]):
                items.append(copy.deepcopy(state[key]))
        metadata: Obj = {"resourceVersion": str(at)}
        if more:
            last = _key_string((items[-1]["metadata"]["namespace"], items[-1]["metadata"]["name"]))
            metadata["continue"] = _encode_continue(at, last + "\x00")
            if not selector.labels and not selector.fields:
                remaining = sum(1 for k in keys if _key_string(k) > last and selector.matches(state[k]))
                metadata["remainingItemCount"] = remaining
        return {"kind": LIST_KIND, "apiVersion": API_VERSION, "metadata": metadata, "items": items}

    def _expired_continue(self, selector: _Filter, start: str, limit: int | None) -> _ApiError:
        """410 with a continue token for the rest of the list from the latest state (inconsistent), as documented."""
        with self._store.lock:
            at = self._store.rv
        return _ApiError(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new "
            "list without the continue parameter, or use the continue token in this response to retrieve the "
            "remainder of the results. Continuing with the provided token results in an inconsistent list - objects "
            "that were created, modified, or deleted between the time the first chunk was returned and now may "
            "show up in the list.",
            metadata={"continue": _encode_continue(at, start)},
        )

    def _too_large(self, rv: int) -> _ApiError:
        with self._store.lock:
            current = self._store.rv
        return _ApiError(
            504,
            "Timeout",
            f"Too large resource version: {rv}, current: {current}",
            details={"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                     "retryAfterSeconds": 1},
        )  # fmt: skip

    # -- watch

    def _bookmark_object(self, rv: int, annotations: Mapping[str, str] | None = None) -> Obj:
        metadata: Obj = {"resourceVersion": str(rv)}
        if annotations:
            metadata["annotations"] = dict(annotations)
        return {"kind": KIND, "apiVersion": API_VERSION, "metadata": metadata}

    def _open_watch(
        self, handler: _Handler, namespace: str | None, query: Mapping[str, str]
    ) -> tuple[_Watcher | None, list[tuple[str, Obj]], float]:
        """Check the request (a 4xx/5xx before the stream starts), then register the watcher and compute the
        initial events under the store's lock, so no change falls between them. Without a watcher, the initial
        events are the stream's whole content: the 410 ERROR."""
        selector = self._filter(namespace, query)
        bookmarks = _flag(query, "allowWatchBookmarks")
        timeout = _int(query, "timeoutSeconds")
        deadline = time.monotonic() + (timeout if timeout else self.watch_timeout)
        rv_param, match = query.get("resourceVersion", ""), query.get("resourceVersionMatch", "")
        explicit_initial = _flag(query, "sendInitialEvents") if query.get("sendInitialEvents", "") else None
        if explicit_initial is not None and match != "NotOlderThan":
            raise _bad_request("resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
                               "resourceVersionMatch to NotOlderThan")  # fmt: skip
        if match and explicit_initial is None:
            raise _bad_request("resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch")
        if explicit_initial and not bookmarks:
            raise _bad_request("allowWatchBookmarks: Required value: allowWatchBookmarks must be true if "
                               "sendInitialEvents is true")  # fmt: skip
        requested = _parse_rv(rv_param) if rv_param else 0
        # Unset or "0" without sendInitialEvents: the current state first, as synthetic ADDED events.
        send_initial = requested == 0 if explicit_initial is None else explicit_initial
        store = self._store
        if send_initial and requested and not store.wait_for(requested, self.too_large_wait):
            raise self._too_large(requested)
        with store.lock:
            if send_initial or requested == 0:
                after = store.rv
            elif requested < store.base_rv:
                expired = _status(410, "Expired", f"too old resource version: {requested} ({store.base_rv + 1})")
                return None, [("ERROR", expired)], deadline
            else:
                after = requested
            initial: list[tuple[str, Obj]] = []
            if send_initial:
                initial = [("ADDED", copy.deepcopy(o)) for _, o in sorted(store.objects.items()) if selector.matches(o)]
                if explicit_initial:
                    initial.append(("BOOKMARK", self._bookmark_object(after, {INITIAL_EVENTS_END: "true"})))
            watcher = _Watcher(selector, bookmarks, after, queue.Queue(store.watch_queue), handler.request)
            for change in store.history:  # a watch from an older version: the retained changes since it
                watcher.offer(change)
            store.watchers.append(watcher)
        return watcher, initial, deadline

    def _stream(
        self, handler: _Handler, watcher: _Watcher | None, initial: list[tuple[str, Obj]], deadline: float
    ) -> None:
        try:
            handler.start_stream()
            for event_type, obj in initial:
                handler.send_event(event_type, self._with_kind(event_type, obj))
            if watcher is None:
                handler.end_stream()
            else:
                self._pump(handler, watcher, deadline)
        except OSError:  # the client went away, or the connection was cut
            pass
        finally:
            if watcher is not None:
                with self._store.lock:
                    watcher.closing = watcher.closing or _ABORT
                    with contextlib.suppress(ValueError):
                        self._store.watchers.remove(watcher)

    @staticmethod
    def _with_kind(event_type: str, obj: Obj) -> Obj:
        """Objects in watch events carry kind and apiVersion (list items do not); bookmarks and errors have theirs."""
        if event_type in ("BOOKMARK", "ERROR"):
            return obj
        return {"kind": KIND, "apiVersion": API_VERSION, **obj}

    def _pump(self, handler: _Handler, watcher: _Watcher, deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            wait = remaining if self.bookmark_interval is None else min(remaining, self.bookmark_interval)
            try:
                item = watcher.queue.get(timeout=wait)
            except queue.Empty:
                if self.bookmark_interval is not None and watcher.bookmarks and time.monotonic() < deadline:
                    with self._store.lock:  # idle: every change so far was sent, so now is a safe bookmark
                        idle = watcher.queue.empty()
                        rv = self._store.rv
                    if idle:
                        handler.send_event("BOOKMARK", self._bookmark_object(rv))
                continue
            if isinstance(item, str):
                if item == _ABORT:
                    return
                break
            event_type, obj = item
            handler.send_event(event_type, self._with_kind(event_type, obj))
        handler.end_stream()
