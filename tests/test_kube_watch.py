"""EndpointSlice discovery through the real `kubernetes` client against the fake API server
(tests/support/fake_kube.py): list + watch from resource versions, bookmarks, relist on 410 Gone, backoff while the
server is down, the last endpoints kept through an outage, the watch set following the policy, clean stops."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.model.loader import parse_policy
from controlplane.model.policy import Endpoint, Policy, ServiceRef
from controlplane.retry import Backoff
from controlplane.sources import kubernetes as kube_source
from controlplane.sources.kubernetes import KubeAccess, KubernetesEndpoints, ServiceWatch
from controlplane.sources.policy_dir import read_policy_dir
from tests.support.certs import make_pki
from tests.support.fake_kube import FakeKube, endpoint, endpoint_slice
from tests.support.ports import eventually, poll_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes-service"
FAST = Backoff(base_seconds=0.05, cap_seconds=0.4, jitter=False)
REF = ServiceRef("shop", "reports", "http")


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def access(fake: FakeKube, tmp_path: Path) -> KubeAccess:
    return KubeAccess(kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig", token_file=tmp_path / "token"))


class Changes:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1


@pytest.fixture
def watch(access: KubeAccess) -> Iterator[tuple[ServiceWatch, Changes]]:
    changes = Changes()
    w = ServiceWatch("shop", "reports", access, changes, backoff=FAST)
    yield w, changes
    w.stop()
    assert w.join(), "the watch thread did not stop"


def _slice(name: str, *addresses: str, ready: bool = True, port: int = 8080) -> dict[str, object]:
    return endpoint_slice(
        "reports",
        [endpoint(a, ready=ready, namespace="shop") for a in addresses],
        namespace="shop",
        name=name,
        ports=[("http", port)],
    )


def _ready(w: ServiceWatch) -> tuple[Endpoint, ...]:
    from controlplane.sources.kubernetes_slices import ready_endpoints

    return ready_endpoints(w.state.slices.values(), "http").endpoints


def _started(w: ServiceWatch) -> ServiceWatch:
    w.start()
    assert w.synced.wait(5), "no first list"
    return w


def test_list_then_watch_follows_ready_endpoints(fake: FakeKube, watch: tuple[ServiceWatch, Changes]) -> None:
    fake.create(_slice("reports-a", "10.1.0.1"))
    fake.create(endpoint_slice("other", [endpoint("10.9.9.9")], namespace="shop", name="other-a"))  # not selected
    w, changes = watch
    _started(w)
    assert _ready(w) == (Endpoint("10.1.0.1", 8080),)
    poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
    fake.create(_slice("reports-b", "10.1.0.2", ready=False))
    fake.validate = False  # the API server refuses the next slice; the discovery must still not use it
    fake.replace(_slice("reports-b", "10.1.0.2", "fd00::2"))  # an IPv6 address in an IPv4 slice: not used
    poll_until(lambda: _ready(w) == (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080)), 5, message="ready")
    fake.delete("shop", "reports-a")
    poll_until(lambda: _ready(w) == (Endpoint("10.1.0.2", 8080),), 5, message="deleted slice gone")
    assert changes.count >= 3
    assert fake.lists == 1  # one list, then resumed watches only
    assert {r.query.get("labelSelector") for r in fake.requests()} == {"kubernetes.io/service-name=reports"}


def test_a_bookmark_advances_the_version_without_a_change(fake: FakeKube, watch: tuple[ServiceWatch, Changes]) -> None:
    fake.create(_slice("reports-a", "10.1.0.1"))
    w, changes = watch
    _started(w)
    poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
    before, seen = w.state.version, changes.count
    fake.create(endpoint_slice("other", [endpoint("10.9.9.9")], namespace="shop", name="other-a"))  # moves the rv
    assert fake.bookmark() == 1
    poll_until(lambda: w.state.version == fake.resource_version, 5, message="bookmark's version taken")
    assert w.state.version != before and changes.count == seen
    watches = fake.watches
    fake.drop_watches()  # the server ends the watch: it resumes from the bookmark, no list
    poll_until(lambda: fake.watches > watches, 5, message="watch resumed")
    resumed = fake.requests("watch")[-1].query
    assert resumed["resourceVersion"] == fake.resource_version
    assert resumed["allowWatchBookmarks"] == "true"
    assert fake.lists == 1


def test_410_gone_relists_and_keeps_serving_the_right_endpoints(
    fake: FakeKube, watch: tuple[ServiceWatch, Changes]
) -> None:
    fake.create(_slice("reports-a", "10.1.0.1"))
    w, _ = watch
    _started(w)
    poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
    gone_before = kube_source.RELISTS.labels("gone")._value.get()
    fake.drop_watches(abrupt=True)  # cut: it reconnects from its last version …
    fake.create(_slice("reports-b", "10.1.0.2"))
    fake.compact()  # … which the server no longer keeps: 410 Gone
    poll_until(lambda: fake.lists >= 2, 5, message="a relist after 410")
    poll_until(lambda: _ready(w) == (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080)), 5, message="relisted")
    assert kube_source.RELISTS.labels("gone")._value.get() == gone_before + 1


def test_the_server_going_away_keeps_the_last_endpoints_and_backs_off(
    fake: FakeKube, watch: tuple[ServiceWatch, Changes]
) -> None:
    fake.create(_slice("reports-a", "10.1.0.1"))
    w, _ = watch
    _started(w)
    poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
    fake.stop()
    time.sleep(1.0)  # the outage being measured: how many attempts a second of it costs
    attempts = w.state.restarts
    # 0.05, 0.1, 0.2, 0.4, 0.4 … s: about 5 in a second, never a busy loop
    assert 2 <= attempts <= 7, attempts
    assert _ready(w) == (Endpoint("10.1.0.1", 8080),)
    assert w.state.last_error is not None and w.sync_age() >= 0.9
    fake.start()  # same port, state kept; a change made meanwhile is seen after the relist
    fake.create(_slice("reports-b", "10.1.0.2"))
    poll_until(lambda: len(_ready(w)) == 2, 5, message="caught up after the outage")
    assert w.state.last_error is None


def test_stop_ends_a_blocked_watch_at_once(fake: FakeKube, access: KubeAccess) -> None:
    w = _started(ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST))
    poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
    started = time.monotonic()
    w.stop()
    assert w.join(2.0)
    assert time.monotonic() - started < 1.0


def _policy(*services: str) -> Policy:
    policy = parse_policy(read_policy_dir(EXAMPLE))
    refs = tuple(ServiceRef("shop", s, "http") for s in services)
    return replace(policy, backends=tuple(replace(b, services=refs) if b.services else b for b in policy.backends))


def test_the_watch_set_follows_the_policy(fake: FakeKube, access: KubeAccess) -> None:
    fake.create(_slice("reports-a", "10.1.0.1"))
    source = KubernetesEndpoints(access, backoff=FAST)
    try:
        two = _policy("reports", "reports-canary")
        assert source.prepare(two) is None  # waits for the first lists
        backend = two.backend("reports-api")
        assert source.for_backend(backend) == (Endpoint("10.1.0.1", 8080),)
        assert source.for_backend(backend) is source.for_backend(backend)  # unchanged: the same tuple
        assert kube_source.WATCHED_SERVICES._value.get() == 2
        assert set(source.status()["services"]) == {"shop/reports", "shop/reports-canary"}  # type: ignore[arg-type]
        source.retain(_policy("reports"))
        assert kube_source.WATCHED_SERVICES._value.get() == 1
        assert set(source.status()["services"]) == {"shop/reports"}  # type: ignore[arg-type]
        assert "kubernetes watch shop/reports" in _threads()
        # stopped, not joined by retain (it runs on the event loop); its watch was shut down, so it ends at once
        poll_until(lambda: "kubernetes watch shop/reports-canary" not in _threads(), 2, message="canary stopped")
        assert {ref.name for ref, _ in source._cache} == {"reports"}  # the canary's memo went with its watch
        source.retain(None)
        assert not source._cache and not source._merged  # what the compile memoised goes with the policy
        assert source.for_backend(backend) == ()
    finally:
        source.stop()
    assert kube_source.WATCHED_SERVICES._value.get() == 0


def test_a_policy_naming_services_without_access_is_refused(tmp_path: Path) -> None:
    nowhere = KubernetesEndpoints(None)
    assert "no Kubernetes access" in (nowhere.prepare(_policy("reports")) or "")
    assert nowhere.prepare(replace(_policy(), backends=())) is None  # no Service named: nothing needed
    not_in_a_cluster = KubernetesEndpoints(
        KubeAccess(token_file=str(tmp_path / "token"), ca_file=str(tmp_path / "ca"), environ={})
    )
    refusal = not_in_a_cluster.prepare(_policy("reports"))
    assert refusal is not None and "in-cluster service account" in refusal and "shop/reports" in refusal


def test_over_tls_a_rotated_token_file_is_read_again(tmp_path: Path) -> None:
    """HTTPS verified against the cluster's CA, the token in a file the kubeconfig names (`tokenFile`, as a mounted
    service account token is read). The token is rotated in place: the server accepts only the new one at once, the
    watch fails (401) and backs off keeping its endpoints, and once the file holds the new token the next attempt
    reads it: a fresh client per request, so no restart."""
    pki = make_pki(tmp_path / "pki")
    token = tmp_path / "token"
    with FakeKube(tls=pki.server, ca=pki.ca) as api:
        access = KubeAccess(kubeconfig=api.write_kubeconfig(tmp_path / "kubeconfig", token_file=token))
        api.create(_slice("reports-a", "10.1.0.1"))
        w = _started(ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST))
        try:
            assert _ready(w) == (Endpoint("10.1.0.1", 8080),)
            poll_until(lambda: api.open_watches == 1, 5, message="a watch opened")
            api.token = "rotated-" + api.token  # the old token is refused from now on
            api.drop_watches(abrupt=True)
            poll_until(lambda: w.state.last_error == "HTTP 401 Unauthorized", 5, message="refused with the old token")
            assert _ready(w) == (Endpoint("10.1.0.1", 8080),)  # kept meanwhile
            token.write_text(api.token)  # the kubelet writes the new token
            api.create(_slice("reports-b", "10.1.0.2"))
            poll_until(lambda: len(_ready(w)) == 2, 5, message="the rotated token read")
            assert w.state.last_error is None
        finally:
            w.stop()
            assert w.join()


def test_in_cluster_access_reads_the_service_account_files(fake: FakeKube, tmp_path: Path) -> None:
    """The in-cluster loader, pointed at the fake through its environment (plain HTTP here: the loader always says
    https, so only the configuration it builds is checked, not a request)."""
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text(fake.token)
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    access = KubeAccess(
        token_file=str(token),
        ca_file=str(ca),
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fake.port)},
    )
    client = access.client()
    try:
        assert client.configuration.host == f"https://127.0.0.1:{fake.port}"
        assert client.configuration.api_key["BearerToken"] == f"bearer {fake.token}"
        assert client.configuration.ssl_ca_cert == str(ca)
        assert client.configuration.refresh_api_key_hook is not None  # re-reads the rotated token
    finally:
        client.close()


def test_a_response_over_the_size_bound_is_refused_and_counted(
    fake: FakeKube, access: KubeAccess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile or huge answer is not held in memory whole: over the bound, the list is refused (and retried with
    backoff), nothing of it is served, and the same bound applies to one watch event."""
    monkeypatch.setattr(kube_source, "MAX_RESPONSE_BYTES", 4096)
    fake.create(_slice("reports-a", *(f"10.1.{i // 200}.{i % 200}" for i in range(60))))  # ~9 KB listed
    hostile = kube_source.WATCH_RESTARTS.labels("hostile")._value.get()
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST)
    w.start()
    try:
        poll_until(
            lambda: kube_source.WATCH_RESTARTS.labels("hostile")._value.get() >= hostile + 2, 5, message="refused"
        )
        assert not w.synced.is_set() and w.state.slices == {}
        assert w.state.last_error is not None and "bytes" in w.state.last_error
        fake.delete("shop", "reports-a")  # small again: listed, then a big event on the watch is refused too
        fake.create(_slice("reports-b", "10.2.0.1"))
        assert w.synced.wait(5)
        poll_until(lambda: fake.open_watches == 1, 5, message="a watch opened")
        before = kube_source.WATCH_RESTARTS.labels("hostile")._value.get()
        fake.create(_slice("reports-c", *(f"10.3.{i // 200}.{i % 200}" for i in range(60))))
        poll_until(lambda: kube_source.WATCH_RESTARTS.labels("hostile")._value.get() > before, 5, message="event")
        assert _ready(w) == (Endpoint("10.2.0.1", 8080),)  # the last endpoints stay
    finally:
        w.stop()
        assert w.join()


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate()}


@pytest.fixture
def mute_access(tmp_path: Path) -> Iterator[KubeAccess]:
    """An API server that accepts TCP connections and never answers: a listening socket never accepted from (the
    kernel completes the handshakes, the requests sit unread). Closing it resets them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        port = listener.getsockname()[1]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "mute", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "mute", "user": {"token": "t"}}],
            "contexts": [{"name": "mute", "context": {"cluster": "mute", "user": "mute"}}],
            "current-context": "mute",
        }
        path = tmp_path / "mute-kubeconfig"
        path.write_text(json.dumps(config))
        yield KubeAccess(kubeconfig=path)


def test_dropping_services_whose_api_server_never_answers_does_not_block(mute_access: KubeAccess) -> None:
    """`retain` runs on the event loop after a policy is published. It joined each removed watch for up to 5 s,
    and a thread blocked in a request not answered yet cannot be interrupted: 3 Services dropped froze every xDS
    stream for 15 s (256 for 21 minutes)."""
    source = KubernetesEndpoints(mute_access, backoff=FAST, initial_wait=0.2)
    try:
        assert source.prepare(_policy("reports", "reports-a", "reports-b")) is None  # not synced: waited 0.2 s
        started = time.monotonic()
        source.retain(None)
        assert time.monotonic() - started < 0.5
        assert kube_source.WATCHED_SERVICES._value.get() == 0
        assert "kubernetes watch shop/reports" in _threads()  # still blocked in its list request
        assert not [s for s in kube_source.SYNC_AGE.collect()[0].samples if s.labels["service"] == "shop/reports"]
    finally:
        source.stop()


def test_a_service_named_again_while_its_old_watch_hangs_reuses_that_thread(mute_access: KubeAccess) -> None:
    """A policy flapping while the API server hangs must not pile up one more blocked thread per flap."""
    source = KubernetesEndpoints(mute_access, backoff=FAST, initial_wait=0.05)
    try:
        for _ in range(5):
            source.prepare(_policy("reports"))
            source.retain(_policy("reports"))
            source.retain(None)
        watching = [t for t in threading.enumerate() if t.name == "kubernetes watch shop/reports"]
        assert len(watching) == 1
        source.prepare(_policy("reports"))
        assert set(source.status()["services"]) == {"shop/reports"}  # type: ignore[arg-type]
    finally:
        source.stop()


def test_stop_waits_for_hung_watches_once_not_once_each(
    mute_access: KubeAccess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube_source, "STOP_JOIN_SECONDS", 0.5)
    source = KubernetesEndpoints(mute_access, backoff=FAST, initial_wait=0.05)
    source.prepare(_policy(*(f"reports-{i}" for i in range(6))))
    started = time.monotonic()
    source.stop()
    assert time.monotonic() - started < 1.5  # it was 0.5 s per watch: 3 s


def test_lists_of_many_services_are_read_a_few_at_a_time(
    fake: FakeKube, access: KubeAccess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list page is up to 16 MiB and several times that parsed; after an API server restart every watch relists
    at once. Every Service's page was read and parsed at the same time (256 Services: ~20 GiB)."""
    monkeypatch.setattr(kube_source, "_LISTING", threading.BoundedSemaphore(2), raising=False)
    inside, most, lock, gate = 0, 0, threading.Lock(), threading.Event()
    read_all = ServiceWatch._read_all

    def counting(self: ServiceWatch, response: object) -> bytes:
        nonlocal inside, most
        if self._stop.is_set():  # an earlier test's stopped watch whose retry reached this port: not counted
            return read_all(self, response)
        with lock:
            inside += 1
            most = max(most, inside)
        gate.wait(5)
        with lock:
            inside -= 1
        return read_all(self, response)

    monkeypatch.setattr(ServiceWatch, "_read_all", counting)
    source = KubernetesEndpoints(access, backoff=FAST, initial_wait=0.0)
    try:
        source.prepare(_policy(*(f"reports-{i}" for i in range(6))))
        poll_until(lambda: inside >= 2, 5, message="two lists being read")
        ended = time.monotonic() + 0.3
        while time.monotonic() < ended:  # the other four wait for a slot: never a third read at once
            assert inside <= 2 and fake.lists == 2
        gate.set()
        poll_until(lambda: all(s["synced"] for s in source.status()["services"].values()), 5, message="all listed")  # type: ignore[attr-defined]
        assert most == 2
    finally:
        gate.set()
        source.stop()


class _DrippingApiServer:
    """Answers a list with no slices, and each watch with a stream that sends one byte every 50 ms and never a
    newline, ignoring `timeoutSeconds` (`chunked`: as 1-byte chunks; else a response with no length); `empty`: ends
    each watch at once, cleanly, with no event; `endless_list`: every list page says there is another. Counts the
    lists and watches it was asked for."""

    def __init__(self, *, chunked: bool, empty: bool = False, endless_list: bool = False) -> None:
        self.watches = self.lists = 0
        self._endless = endless_list
        self._chunked, self._empty = chunked, empty
        self._closing = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            try:
                if b"watch=true" not in request.split(b"\r\n", 1)[0]:
                    self.lists += 1
                    metadata = {"resourceVersion": "7", **({"continue": "more"} if self._endless else {})}
                    body = json.dumps({"kind": "EndpointSliceList", "items": [], "metadata": metadata})
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                        + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
                    )
                    return
                self.watches += 1
                framing = b"Transfer-Encoding: chunked" if self._chunked else b"Connection: close"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")
                if self._empty:  # ended at once, cleanly: no event
                    conn.sendall(b"0\r\n\r\n" if self._chunked else b"")
                    return
                while not self._closing.wait(0.05):  # the drip's pace, not synchronisation
                    conn.sendall(b"1\r\n \r\n" if self._chunked else b" ")
            except OSError:
                return

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "drip", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "drip", "user": {"token": "t"}}],
            "contexts": [{"name": "drip", "context": {"cluster": "drip", "user": "drip"}}],
            "current-context": "drip",
        }
        path.write_text(json.dumps(config))
        return path

    def close(self) -> None:
        self._closing.set()
        self._listener.close()


@pytest.mark.parametrize("chunked", [True, False])
def test_a_watch_that_drips_forever_is_ended_past_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    """A server (or a proxy) that ignores `timeoutSeconds` and keeps the stream alive a byte at a time, never
    ending a line: each read gets its byte within the read timeout, so the watch lasted forever, its Service frozen
    on what the list said. It is now ended at `timeoutSeconds` + READ_TIMEOUT and started again."""
    monkeypatch.setattr(kube_source, "READ_TIMEOUT", 0.5)
    server = _DrippingApiServer(chunked=chunked)
    w = ServiceWatch(
        "shop",
        "reports",
        KubeAccess(kubeconfig=server.kubeconfig(tmp_path / "k")),
        lambda: None,
        backoff=FAST,
        watch_seconds=1,
    )
    try:
        _started(w)
        poll_until(lambda: server.watches >= 2, 8, message="the dripping watch ended and another started")
        assert kube_source.WATCH_RESTARTS.labels("overdue")._value.get() >= 1
    finally:
        w.stop()
        server.close()
        assert w.join(5)


def test_a_slice_of_another_service_never_feeds_this_one(fake: FakeKube, access: KubeAccess) -> None:
    """The server selects by the service-name label; a server (or proxy) that sends another Service's slice anyway
    made its endpoints this backend's. Now such an object is ignored in a list and is a deletion in a watch."""
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST)
    ours = _slice("reports-a", "10.1.0.1")
    theirs = endpoint_slice("billing", [endpoint("10.9.0.9", namespace="shop")], namespace="shop", name="billing-a")
    theirs["metadata"]["resourceVersion"] = ours["metadata"]["resourceVersion"] = "5"  # type: ignore[index]
    w._event({"type": "ADDED", "object": ours})
    w._event({"type": "ADDED", "object": theirs})
    assert _ready(w) == (Endpoint("10.1.0.1", 8080),)
    relabelled = {**ours, "metadata": {**ours["metadata"], "labels": {"kubernetes.io/service-name": "billing"}}}  # type: ignore[dict-item]
    w._event({"type": "MODIFIED", "object": relabelled})
    assert _ready(w) == ()
    w._event({"type": "MODIFIED", "object": {**ours, "metadata": {"name": "reports-a", "resourceVersion": "6"}}})
    assert _ready(w) == ()  # no labels at all: not ours either


def test_watches_ended_at_once_by_the_server_are_backed_off(tmp_path: Path) -> None:
    """A server or proxy that answers every watch with an empty stream, cleanly: each end counted as the server's
    timeout and the next watch opened at once, hundreds of requests a second per Service. A watch ended within a
    second with no event is now a failure (client-go's reflector calls it a "very short watch") and backs off."""
    server = _DrippingApiServer(chunked=True, empty=True)
    access = KubeAccess(kubeconfig=server.kubeconfig(tmp_path / "k"))
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=Backoff(0.2, 1.0, jitter=False))
    try:
        _started(w)
        started = time.monotonic()
        poll_until(lambda: time.monotonic() - started > 1.5, 3, interval=0.1, message="a while")
        assert server.watches <= 6  # backoff 0.2, 0.4, 0.8: about 4 in 1.5 s (it was hundreds)
        assert w.state.last_error is not None and "short" in w.state.last_error
    finally:
        w.stop()
        server.close()
        assert w.join(5)


def test_a_list_whose_pages_never_end_is_cut(tmp_path: Path) -> None:
    """Every page carrying a `continue` token and no item: the list asked for page after page, with no backoff and
    no end, and the Service never synced. Pages are now bounded (what MAX_SLICES_PER_SERVICE needs, twice)."""
    server = _DrippingApiServer(chunked=True, endless_list=True)
    access = KubeAccess(kubeconfig=server.kubeconfig(tmp_path / "k"))
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST)
    try:
        w.start()
        assert w.synced.wait(10), f"never synced after {server.lists} list pages"
        assert server.lists == kube_source.MAX_LIST_PAGES
    finally:
        w.stop()
        server.close()
        assert w.join(5)


def test_refused_addresses_are_counted_each_and_logged_once_per_slice(
    fake: FakeKube, access: KubeAccess, caplog: pytest.LogCaptureFixture
) -> None:
    fake.validate = False  # a server older than the fix of CVE-2021-25737
    fake.create(_slice("reports-a", *(f"127.0.0.{i}" for i in range(1, 51)), "169.254.169.254", "10.1.0.1"))
    before = {r: kube_source.REFUSED_ENDPOINTS.labels(r)._value.get() for r in ("loopback", "link-local")}
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST)
    try:
        with caplog.at_level("WARNING", logger="controlplane.kubernetes"):
            _started(w)
        assert _ready(w) == (Endpoint("10.1.0.1", 8080),)
        assert kube_source.REFUSED_ENDPOINTS.labels("loopback")._value.get() == before["loopback"] + 50
        assert kube_source.REFUSED_ENDPOINTS.labels("link-local")._value.get() == before["link-local"] + 1
        lines = [r.getMessage() for r in caplog.records if "refused addresses" in r.getMessage()]
        assert len(lines) == 1 and "127.0.0.1 (loopback)" in lines[0] and "and 48 more" in lines[0]
    finally:
        w.stop()
        assert w.join()


def test_refused_addresses_written_again_and_again_are_a_few_log_lines(
    fake: FakeKube, access: KubeAccess, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever may write slices in the namespace decides how often a refused slice changes: each change is
    counted, but the log says it a few times a minute per Service, not once per event."""
    fake.validate = False
    fake.create(_slice("reports-a", "127.0.0.1", "10.1.0.1"))
    before = kube_source.REFUSED_ENDPOINTS.labels("loopback")._value.get()
    w = ServiceWatch("shop", "reports", access, lambda: None, backoff=FAST)
    try:
        with caplog.at_level("WARNING", logger="controlplane.kubernetes"):
            _started(w)
            for i in range(2, 22):
                fake.replace(_slice("reports-a", f"127.0.0.{i}", "10.1.0.1"))
            poll_until(
                lambda: kube_source.REFUSED_ENDPOINTS.labels("loopback")._value.get() == before + 21,
                10,
                message="every refused address counted",
            )
        lines = [r.getMessage() for r in caplog.records if "refused addresses" in r.getMessage()]
        assert 1 <= len(lines) <= 5, lines
    finally:
        w.stop()
        assert w.join()


def test_a_storm_of_slice_changes_is_a_few_compiles(fake: FakeKube, access: KubeAccess) -> None:
    """200 MODIFIED events as fast as the API server takes them: each wakes the loop, but a compile (20 ms here)
    covers every change made before it started, so the compiles are bounded by time, not by events."""
    fake.create(_slice("reports-a", "10.1.0.1"))
    source = KubernetesEndpoints(access, backoff=FAST)

    async def scenario() -> tuple[int, float]:
        stopping, compiles = asyncio.Event(), 0

        async def compile_() -> None:
            nonlocal compiles
            compiles += 1
            await asyncio.sleep(0.02)  # stands for a compile's duration, not synchronisation

        runner = asyncio.ensure_future(source.run(compile_, stopping))
        await asyncio.to_thread(source.prepare, _policy("reports"))
        started = time.monotonic()
        await asyncio.to_thread(
            lambda: [fake.replace(_slice("reports-a", f"10.1.{i // 250}.{i % 250}")) for i in range(200)]
        )
        await eventually(lambda: source.endpoints(REF) == (Endpoint("10.1.0.199", 8080),), "the last change")
        elapsed = time.monotonic() - started
        stopping.set()
        await asyncio.wait_for(runner, 5)
        return compiles, elapsed

    try:
        compiles, elapsed = asyncio.run(scenario())
    finally:
        source.stop()
    print(f"\n200 slice changes in {elapsed:.2f}s: {compiles} compiles")
    assert compiles <= elapsed / 0.02 + 2 and compiles < 200
