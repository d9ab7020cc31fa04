"""Backends discovered from Kubernetes, end to end: fake API server (tests/support/fake_kube.py) → `controlplane
serve --kubeconfig` (EndpointSlices through the real `kubernetes` client) → EDS → real Envoy → echo "pods".

Two echo servers stand for two pods of the Service shop/reports; each is in its own EndpointSlice, whose port named
`http` is that pod's port (the port is resolved per slice). Requests go to a public path, so no token is needed:
what is measured is where Envoy sends them. Every wait polls with a deadline; the times are printed."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.backends import EchoBackend, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.fake_kube import FakeKube, endpoint, endpoint_slice
from tests.support.policy_parts import ACME_INVENTORY, backend, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_stack

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes-service"
BUDGET = 1.0  # seconds from the API server's change to Envoy sending requests accordingly


def policy(given: PolicyInputs) -> dict[str, str]:
    return {
        "issuer.yaml": issuer(given.issuer, extra="inventory: inventory.yaml"),
        "inventory.yaml": ACME_INVENTORY,
        "backends.yaml": documents(
            "kind: Backend\nname: reports-api\nhosts: [reports.local]\n"
            "endpoints:\n  - {service: shop/reports, port: http}\npublic_paths: [/healthz]\n",
            role("reports-read", "reports-api"),
            # An address-backed EDS backend beside it: its assignment must never be pushed for a Service change.
            backend("deploy-api", given.ports["static"], extra="public_paths: [/healthz]"),
        ),
        "gateway.yaml": gateway(given.listen_port, ["reports-api", "deploy-api"]),
    }


def pod_slice(pod: EchoBackend, *, ready: bool = True) -> dict[str, object]:
    return endpoint_slice(
        "reports",
        [endpoint("127.0.0.1", ready=ready, namespace="shop", pod=pod.name)],
        namespace="shop",
        name=f"reports-{pod.name}",
        ports=[("http", pod.port)],
    )


@dataclass
class KubeStack(Served):
    kube: FakeKube | None = None

    @property
    def api(self) -> FakeKube:
        assert self.kube is not None
        return self.kube

    def answered_by(self) -> str | None:
        """Which pod answered one request; None when Envoy had nowhere to send it (503)."""
        response = self.request("reports.local", "/healthz")
        if response.status != 200:
            return None
        return str(response.json()["backend"])

    def pushed(self) -> dict[str, float]:
        """Resources pushed so far, by xDS type."""
        metric = "controlplane_xds_pushed_resources_total"
        return {t: self.controlplane.metric(metric, type=t) for t in ("cds", "eds", "lds", "rds", "ecds", "sds")}

    def spread(self, n: int = 20) -> set[str | None]:
        return {self.answered_by() for _ in range(n)}


@pytest.fixture
def pods() -> Iterator[tuple[EchoBackend, EchoBackend]]:
    with EchoBackend("pod-a") as a, EchoBackend("pod-b") as b:
        yield a, b


@pytest.fixture
def kube_stack(tmp_path: Path, pods: tuple[EchoBackend, EchoBackend]) -> Iterator[KubeStack]:
    """The "pods" listen on loopback, an address the control plane refuses by default (a slice pointing the
    gateway at its own host): serve is told to allow 127.0.0.1 here, as a test cluster would, and the fake API
    server to store what a real one (since the fix of CVE-2021-25737) refuses."""
    pod_a, pod_b = pods
    with FakeKube() as api:
        api.validate = False
        api.create(pod_slice(pod_a))
        api.create(pod_slice(pod_b, ready=False))
        with _serving(
            tmp_path, api, ("--kube-allow-endpoints", "127.0.0.1/32"), lambda b: b.answered_by() == "pod-a"
        ) as built:
            yield built


@contextlib.contextmanager
def _serving(
    tmp_path: Path, api: FakeKube, args: tuple[str, ...], ready: Callable[[KubeStack], object]
) -> Iterator[KubeStack]:
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token_file=tmp_path / "token")
    with serve_stack(
        tmp_path,
        policy,
        kind=KubeStack,
        envoy=EnvoySpec("kube-1", "kube-envoy"),
        backends=("static",),
        serve_args=("--kubeconfig", str(kubeconfig), *args),
        ready=ready,
    ) as built:
        built.kube = api
        yield built


@pytest.mark.parametrize(
    ("address", "family", "reason"),
    [
        ("127.0.0.1", "IPv4", "loopback"),
        ("0.0.0.0", "IPv4", "unspecified"),
        ("::ffff:127.0.0.1", "IPv6", "ipv4-mapped"),
    ],
)
def test_a_slice_pointing_at_the_gateways_own_host_gets_no_traffic(
    tmp_path: Path, pods: tuple[EchoBackend, EchoBackend], address: str, family: str, reason: str
) -> None:
    """Anyone who can write an EndpointSlice in the backend's namespace can list the gateway's own host: Envoy would
    connect there (its admin port, any local listener) with the job's request and the backend's injected
    credential. Without --kube-allow-endpoints such an endpoint is refused: 503, the local listener gets nothing,
    the refusal is counted. (Before the refusal, the "pod" on loopback answered every request.)"""
    pod, _ = pods
    local = endpoint_slice(
        "reports",
        [endpoint(address, namespace="shop", pod=pod.name)],
        namespace="shop",
        name="reports-local",
        ports=[("http", pod.port)],
        address_type=family,
    )
    with FakeKube() as api:
        api.validate = False  # an API server older than the fix of CVE-2021-25737 stores it
        api.create(local)

        def up(built: KubeStack) -> bool:
            return built.request("deploy.local", "/healthz").status == 200

        with _serving(tmp_path, api, (), up) as built:
            assert built.spread(10) == {None}  # 503: no host in the assignment
            assert pod.requests == []
            metric = "controlplane_kubernetes_refused_endpoints_total"
            poll_until(lambda: built.controlplane.metric(metric, reason=reason) >= 1, 5, message="refusal counted")
            assert built.controlplane.metric("controlplane_kubernetes_ready_endpoints", backend="reports-api") == 0
            status = built.controlplane.status()["kubernetes"]["services"]["shop/reports"]
            assert status["synced"] and status["last_error"] is None


def _timed(change: object, until: object) -> float:
    """Seconds from `change()` until `until()` holds (polled every 10 ms)."""
    started = time.monotonic()
    change()  # type: ignore[operator]
    poll_until(until, 5, interval=0.01, message="Envoy followed the change")  # type: ignore[arg-type]
    return time.monotonic() - started


def test_pods_becoming_ready_and_going_away_move_traffic_within_a_second(
    kube_stack: KubeStack, pods: tuple[EchoBackend, EchoBackend]
) -> None:
    _, pod_b = pods
    assert kube_stack.spread() == {"pod-a"}  # pod-b's endpoint is not ready: never sent to
    pushed = kube_stack.pushed()

    ready = _timed(lambda: kube_stack.api.replace(pod_slice(pod_b)), lambda: "pod-b" in kube_stack.spread(10))
    print(f"\npod-b ready -> first request to it through Envoy: {ready * 1000:.0f} ms")
    assert ready < BUDGET
    # Only that cluster's assignment was pushed: one EDS resource, nothing of any other type.
    assert kube_stack.pushed() == {**pushed, "eds": pushed["eds"] + 1}
    assert kube_stack.request("deploy.local", "/healthz").json()["backend"] == "static"
    assert kube_stack.spread(40) == {"pod-a", "pod-b"}

    gone = _timed(lambda: kube_stack.api.delete("shop", "reports-pod-a"), lambda: kube_stack.spread(20) == {"pod-b"})
    print(f"pod-a's slice deleted -> no request to it: {gone * 1000:.0f} ms")
    assert gone < BUDGET

    not_ready = _timed(
        lambda: kube_stack.api.replace(pod_slice(pod_b, ready=False)), lambda: kube_stack.spread(5) == {None}
    )
    print(f"last pod not ready -> Envoy answers 503 (no endpoint): {not_ready * 1000:.0f} ms")
    assert not_ready < BUDGET
    assert kube_stack.request("reports.local", "/healthz").status == 503

    status = kube_stack.controlplane.status()["kubernetes"]["services"]["shop/reports"]
    assert status["synced"] and status["last_error"] is None
    assert kube_stack.controlplane.metric("controlplane_kubernetes_ready_endpoints", backend="reports-api") == 0
    assert kube_stack.controlplane.metric("controlplane_kubernetes_watched_services") == 1


def test_the_api_server_going_away_keeps_the_last_endpoints(
    kube_stack: KubeStack, pods: tuple[EchoBackend, EchoBackend]
) -> None:
    _, pod_b = pods
    kube_stack.api.replace(pod_slice(pod_b))
    poll_until(lambda: kube_stack.spread(10) == {"pod-a", "pod-b"}, 5, message="both pods serve")
    kube_stack.api.stop()  # every connection cut, the listener closed
    metric = "controlplane_kubernetes_watch_restarts_total"
    poll_until(
        lambda: kube_stack.controlplane.metric(metric, reason="error") >= 2,
        10,
        message="the watch retried against the absent server",
    )
    ended = time.monotonic() + 2.0
    while time.monotonic() < ended:  # requests keep succeeding through the outage, on both pods
        assert kube_stack.spread(10) == {"pod-a", "pod-b"}
    status = kube_stack.controlplane.status()["kubernetes"]["services"]["shop/reports"]
    assert status["last_error"] is not None and status["sync_age_seconds"] >= 2.0
    assert kube_stack.controlplane.metric("controlplane_kubernetes_ready_endpoints", backend="reports-api") == 2

    kube_stack.api.start()  # back, with a change made meanwhile: followed once the watch reconnects
    kube_stack.api.delete("shop", "reports-pod-a")
    poll_until(lambda: kube_stack.spread(20) == {"pod-b"}, 10, message="the change after the outage")


def test_a_policy_naming_services_without_kubernetes_access_is_refused_and_not_ready() -> None:
    """No --kubeconfig and not in a cluster: the policy is refused with the reason, the server never serves it (it
    would have no endpoints to serve the backend from), and /readyz says why."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        pytest.skip("running inside a Kubernetes pod: in-cluster access exists")
    controlplane = ControlPlaneProcess(EXAMPLE)  # never ready, so not entered (that waits for /readyz)
    try:
        controlplane.start(wait_ready=False)

        def refused() -> list[str]:
            with contextlib.suppress(OSError, AssertionError):
                return [e for e in controlplane.status()["policy"]["errors"] if "Kubernetes" in e]
            return []

        errors = poll_until(refused, 30, message="the policy refused for want of Kubernetes access")
        assert "backends name Kubernetes Services (shop/reports) but no Kubernetes access" in errors[0]
        readyz = http_request(f"{controlplane.admin_url}/readyz")
        assert readyz.status == 503 and "no good policy load" in readyz.text
    finally:
        controlplane.close()


def test_a_restart_during_an_api_outage_answers_503_until_a_list_succeeds(
    tmp_path: Path, pods: tuple[EchoBackend, EchoBackend]
) -> None:
    """Nothing is persisted: a control plane started while the API server is away knows no endpoint, and the
    documented answer is 503 (fail closed), not a 404, a hang or another backend; the first list fixes it."""
    pod_a, _ = pods
    with FakeKube() as api:
        api.validate = False
        api.create(pod_slice(pod_a))
        api.stop()

        def up(built: KubeStack) -> bool:
            return built.request("deploy.local", "/healthz").status == 200

        with _serving(tmp_path, api, ("--kube-allow-endpoints", "127.0.0.1/32"), up) as built:
            response = built.request("reports.local", "/healthz")
            assert response.status == 503, response.text
            assert pod_a.requests == []
            status = built.controlplane.status()["kubernetes"]["services"]["shop/reports"]
            assert not status["synced"] and status["last_error"] is not None
            assert built.controlplane.metric("controlplane_kubernetes_sync_age_seconds", service="shop/reports") == -1
            api.start()
            poll_until(lambda: built.answered_by() == "pod-a", 40, message="served once the list succeeds")


def test_a_slice_with_a_zoned_address_does_not_freeze_the_backend(
    kube_stack: KubeStack, pods: tuple[EchoBackend, EchoBackend]
) -> None:
    """A slice listing `fd00::1%lo` (a non-validating API server stores it): Envoy NACKed the assignment holding it,
    and every later one of that backend too, so pod-b becoming ready was never followed. Such an address is
    dropped; the backend keeps following its pods, with no NACK."""
    _, pod_b = pods
    kube_stack.api.create(
        endpoint_slice(
            "reports",
            [endpoint("fd00::1%lo", namespace="shop")],
            namespace="shop",
            name="reports-zoned",
            ports=[("http", 80)],
            address_type="IPv6",
        )
    )
    kube_stack.api.replace(pod_slice(pod_b))
    poll_until(lambda: "pod-b" in kube_stack.spread(10), 5, message="pod-b followed")
    assert kube_stack.controlplane.metric("controlplane_xds_nacks_total", type="eds") == 0
