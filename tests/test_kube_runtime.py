"""Discovered endpoints as a live input of the policy service (runtime/policy_service.py): a change recompiles the
policy in service without reading its files, changes only that cluster's assignment, keeps every other backend's
compiled objects, follows the watch set, and reaches Envoy even while the last good model is what is served."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.compiler.names import backend_cluster
from controlplane.model.policy import Backend, Endpoint, Policy
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import ENDPOINT, Snapshot
from tests.support.ports import eventually

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kubernetes-service"


class Discovered:
    """What a Kubernetes source would answer, set by the test; records the watch-set calls."""

    def __init__(self) -> None:
        self.endpoints: tuple[Endpoint, ...] = ()
        self.asked: list[str] = []
        self.published: list[Policy] = []

    def for_backend(self, backend: Backend) -> tuple[Endpoint, ...]:
        self.asked.append(backend.name)
        return self.endpoints


def _service(tmp_path: Path, found: Discovered) -> PolicyService:
    shutil.copytree(EXAMPLE, tmp_path / "policy")
    return PolicyService(
        tmp_path / "policy",
        SnapshotCache(),
        clock=lambda: 1000.0,
        endpoints=found.for_backend,
        published=found.published.append,
    )


def _changed(before: Snapshot, after: Snapshot) -> set[tuple[str, str]]:
    return {
        (type_url, name)
        for type_url, typed in after.types.items()
        for name, resource in typed.resources.items()
        if before.types[type_url].resources.get(name) != resource
    }


def _assignment_hosts(snapshot: Snapshot) -> bytes:
    return snapshot.types[ENDPOINT].resources[backend_cluster("reports-api")].payload


def test_an_endpoint_change_recompiles_only_that_assignment(tmp_path: Path) -> None:
    found = Discovered()
    service = _service(tmp_path, found)
    assert service.reload()
    assert found.asked == ["reports-api"]  # only the Service backend asks
    assert [p.backend("reports-api").services[0].key for p in found.published] == ["shop/reports"]
    before = service.cache.get("ci-gateway")
    empty = endpoint_pb2.ClusterLoadAssignment.FromString(_assignment_hosts(before))
    assert empty.cluster_name == backend_cluster("reports-api") and not empty.endpoints  # nothing known yet

    found.endpoints = (Endpoint("10.1.0.7", 8080),)
    (tmp_path / "policy" / "roles.yaml").write_text("not: yaml: at all")  # a broken file on disk: not read
    assert asyncio.run(service.recompile("Kubernetes endpoints changed"))
    after = service.cache.get("ci-gateway")
    assert _changed(before, after) == {(ENDPOINT, backend_cluster("reports-api"))}
    assert b"10.1.0.7" in _assignment_hosts(after)
    assert len(found.published) == 1  # a recompile is not a new policy: the watch set stays


def test_the_same_endpoints_keep_the_model(tmp_path: Path) -> None:
    found = Discovered()
    found.endpoints = (Endpoint("10.1.0.7", 8080),)
    service = _service(tmp_path, found)
    assert service.reload()
    policy = service.current
    assert policy is not None
    first = service._with_live_inputs(policy)
    found.endpoints = (Endpoint("10.1.0.7", 8080),)  # equal, another tuple
    assert service._with_live_inputs(policy) is first
    found.endpoints = ()
    again = service._with_live_inputs(policy)
    assert again is not first and again.backend("deploy-api") is first.backend("deploy-api")
    assert again.backend("reports-api").endpoints == ()


def test_the_last_good_model_gets_the_endpoints_discovered_now(tmp_path: Path) -> None:
    """When live inputs make the policy in service invalid, the last good model is compiled: with the endpoints as
    they are now, so a pod that went away leaves Envoy's assignment all the same."""
    found = Discovered()
    found.endpoints = (Endpoint("10.1.0.7", 8080), Endpoint("10.1.0.8", 8080))
    service = _service(tmp_path, found)
    assert service.reload()
    found.endpoints = (Endpoint("10.1.0.8", 8080),)
    snapshots = service._compile_last_good()
    assert snapshots is not None
    hosts = _assignment_hosts(snapshots["ci-gateway"])
    assert b"10.1.0.8" in hosts and b"10.1.0.7" not in hosts


def test_changes_wake_one_recompile_and_changes_during_it_one_more() -> None:
    """Watch threads report changes from their own threads; the event loop runs `on_change` once for a burst, and
    once more for changes made while it ran: coalesced, never lost."""
    from controlplane.sources.kubernetes import KubernetesEndpoints

    async def scenario() -> int:
        source = KubernetesEndpoints(None)
        stopping = asyncio.Event()
        calls = 0
        release = asyncio.Event()
        started = asyncio.Event()

        async def on_change() -> None:
            nonlocal calls
            calls += 1
            started.set()
            await release.wait()

        idle = source._wake
        runner = asyncio.ensure_future(source.run(on_change, stopping))
        await eventually(lambda: source._wake is not idle, "the loop's wake-up installed")
        threads = [threading.Thread(target=source._changed) for _ in range(5)]  # a burst, from other threads
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        await asyncio.wait_for(started.wait(), 5)
        source._changed()  # while the first recompile runs
        source._changed()
        release.set()
        await eventually(lambda: calls == 2, "the second compile")
        await asyncio.sleep(0.05)  # nothing else was pending: no third (a bounded wait for an absence)
        stopping.set()
        await asyncio.wait_for(runner, 5)
        return calls

    assert asyncio.run(scenario()) == 2


def test_watches_started_for_a_refused_policy_are_stopped(tmp_path: Path) -> None:
    """`prepare` starts the watches of a candidate's new Services before it is compiled; when the candidate is then
    refused (GitLab cannot judge it, a compile error), they ran on until some later policy was accepted: a series of
    broken commits naming other Services piled up threads past the 256 bound."""
    from controlplane.sources.kubernetes import KubeAccess, KubernetesEndpoints
    from tests.support.fake_kube import FakeKube

    with FakeKube() as fake:
        kube = KubernetesEndpoints(KubeAccess(kubeconfig=fake.write_kubeconfig(tmp_path / "kubeconfig")))
        verdict: list[str | None] = [None]
        shutil.copytree(EXAMPLE, tmp_path / "policy")
        service = PolicyService(
            tmp_path / "policy",
            SnapshotCache(),
            clock=lambda: 1000.0,
            prepare=lambda candidate: kube.prepare(candidate) or verdict[0],
            endpoints=kube.for_backend,
            published=kube.retain,
        )
        try:
            verdict[0] = "GitLab cannot read a project it names"
            assert not service.reload()
            assert kube.status()["services"] == {}  # the refused candidate's watch was stopped
            verdict[0] = None
            assert service.reload()
            assert list(kube.status()["services"]) == ["shop/reports"]  # type: ignore[call-overload]
            policy = tmp_path / "policy" / "backends.yaml"
            policy.write_text(policy.read_text().replace("shop/reports", "shop/other"))
            verdict[0] = "refused again"
            assert not service.reload()
            assert list(kube.status()["services"]) == ["shop/reports"]  # type: ignore[call-overload]
        finally:
            kube.stop()
