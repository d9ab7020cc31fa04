"""The run-time policy pipeline: last good snapshot kept, errors shown, removed gateways emptied."""

from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.compiler.names import JWT_FILTER, revocation_bucket_filter
from controlplane.compiler.revocations import bucket_config_bytes
from controlplane.model.credentials import CredentialInputs, revocation_bucket, revocation_buckets
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.inventory import Group, Inventory, Project
from controlplane.model.loader import PolicyLoader
from controlplane.runtime import policy_service as service_module
from controlplane.runtime.policy_service import PolicyService
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import CLUSTER, EXTENSION_CONFIG
from controlplane.sources.pins import PinStore
from controlplane.sources.policy_source import DirectorySource, PolicyFiles
from controlplane.telemetry import metrics
from tests.support.policy_parts import MAIN_GITLAB, backend, binding, documents, gateway, role
from tests.support.ports import eventually

ROOT = Path(__file__).resolve().parent.parent


def _service(tmp_path: Path, example: str = "multi-backend") -> PolicyService:
    shutil.copytree(ROOT / "examples" / example, tmp_path / "policy")
    return PolicyService(tmp_path / "policy", SnapshotCache(), clock=lambda: 1000.0)


def test_a_good_load_publishes_every_gateway(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert service.reload() and service.ready
    assert set(service.state.versions) == {"ci-gateway", "prod-gateway"}
    assert service.cache.get("prod-gateway").types[CLUSTER].resources.keys() == {"backend-billing-api"}
    assert metrics.POLICY_CURRENT_ERRORS._value.get() == 0


def test_a_bad_load_keeps_the_last_good_snapshot_and_reports_every_error(tmp_path: Path) -> None:
    service = _service(tmp_path)
    service.reload()
    before = {g: service.cache.get(g) for g in ("ci-gateway", "prod-gateway")}
    gateways = tmp_path / "policy" / "gateways.yaml"
    gateways.write_text(gateways.read_text().replace("port: 8443", "port: 99999").replace("[billing-api]", "[nope]"))
    assert not service.reload()
    assert len(service.state.errors) == 2 and all(e.startswith("gateways.yaml:") for e in service.state.errors)
    assert {g: service.cache.get(g) for g in before} == before
    assert metrics.POLICY_CURRENT_ERRORS._value.get() == 2
    assert service.state.last_good_load == 1000.0


def test_snapshot_builds_count_every_load_and_their_help_says_so(tmp_path: Path) -> None:
    """The counter's help once said "one per accepted policy load"; it counts rejected loads too."""
    service = _service(tmp_path)
    builds, failures = metrics.SNAPSHOT_BUILDS._value.get(), metrics.SNAPSHOT_BUILD_FAILURES._value.get()
    assert service.reload()
    (tmp_path / "policy" / "broken.yaml").write_text("kind: Nope\n")
    assert not service.reload()
    assert metrics.SNAPSHOT_BUILDS._value.get() == builds + 2
    assert metrics.SNAPSHOT_BUILD_FAILURES._value.get() == failures + 1
    assert "accepted or rejected" in metrics.SNAPSHOT_BUILDS._documentation
    assert "accepted policy load" not in metrics.SNAPSHOT_BUILDS._documentation


def test_a_role_on_a_backend_no_gateway_fronts_is_a_warning_in_status(tmp_path: Path) -> None:
    service = _service(tmp_path, "quickstart")
    (tmp_path / "policy" / "orphan.yaml").write_text(
        "kind: Backend\nname: orphan-api\nhosts: [orphan.local]\nendpoints: [{address: 127.0.0.1, port: 9}]\n"
        "---\nkind: Role\nname: orphan-read\nbackend: orphan-api\nrules: [{methods: [GET]}]\n"
    )
    assert service.reload()
    (warning,) = service.status()["warnings"]  # type: ignore[misc]
    assert warning.startswith("orphan.yaml:6: backend: role orphan-read is on backend orphan-api"), warning
    (tmp_path / "policy" / "orphan.yaml").unlink()
    assert service.reload()
    assert service.status()["warnings"] == []


def test_a_removed_gateway_gets_an_empty_snapshot(tmp_path: Path) -> None:
    service = _service(tmp_path)
    service.reload()
    gateways = tmp_path / "policy" / "gateways.yaml"
    gateways.write_text(gateways.read_text().split("---")[0])
    assert service.reload()
    assert "prod-gateway" not in service.state.versions
    emptied = service.cache.get("prod-gateway")
    assert all(not t.resources for t in emptied.types.values())


async def test_reload_off_the_event_loop_publishes_the_same(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert await service.reload_off_loop()
    reference = _service(tmp_path / "other")
    reference.reload()
    assert service.state.versions == reference.state.versions


def test_a_commit_keeps_the_objects_it_did_not_change_so_the_compile_reuses_them(tmp_path: Path) -> None:
    """The compiler's memo is keyed by object identity: a reload must hand it the previous objects it equals."""
    service = _service(tmp_path)
    service.reload()
    before = service.current
    assert before is not None
    bindings = tmp_path / "policy" / "billing" / "bindings.yaml"
    bindings.write_text(bindings.read_text().replace("pipeline_source: push", "pipeline_source: web"))
    assert service.reload()
    after = service.current
    assert after is not None and after is not before
    changed = {b.name for b in after.bindings if b not in before.bindings}
    assert changed == {"deploy-prod-billing-write"}
    kept = [b for b in after.bindings if b.name not in changed]
    assert kept and all(any(b is old for old in before.bindings) for b in kept)
    assert after.backends is before.backends and after.roles is before.roles and after.issuers is before.issuers


def test_objects_carried_over_give_the_same_snapshots_as_a_fresh_load(tmp_path: Path) -> None:
    service = _service(tmp_path)
    service.reload()
    bindings = tmp_path / "policy" / "billing" / "bindings.yaml"
    bindings.write_text(bindings.read_text().replace("ref: main", "ref: release"))
    service.reload()
    fresh = PolicyService(tmp_path / "policy", SnapshotCache(), clock=lambda: 1000.0)
    fresh.reload()
    assert service.state.versions == fresh.state.versions


def test_remembered_project_ids_do_not_make_every_commit_re_resolve_every_binding(tmp_path: Path) -> None:
    """Pins are part of what a binding resolves with: handing the index an equal but new pins object each
    compile re-resolved every binding, so the compiler's memo never hit in a running server."""
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    service = PolicyService(tmp_path / "policy", SnapshotCache(), pin_store=PinStore(tmp_path / "pins.json"))
    assert service.reload() and service.pins  # project paths resolved, remembered: the next compile uses them
    bindings = tmp_path / "policy" / "billing" / "bindings.yaml"
    for before, after in (("push", "web"), ("web", "schedule")):
        assert service.exchange_policy is not None
        # Rebuilt only when the grants the resolution hands out for this backend are new objects.
        artifacts = service.exchange_policy.backends_named("artifacts-api")[0]
        text = bindings.read_text()
        bindings.write_text(text.replace(f"pipeline_source: {before}", f"pipeline_source: {after}"))
        assert bindings.read_text() != text and service.reload()
    assert service.exchange_policy.backends_named("artifacts-api")[0] is artifacts


def test_a_commit_rebuilds_the_token_exchange_entries_of_the_backends_it_touched_only(tmp_path: Path) -> None:
    service = _service(tmp_path)
    service.reload()
    before = {b.name: b for b in service.exchange_policy.backends} if service.exchange_policy else {}
    bindings = tmp_path / "policy" / "billing" / "bindings.yaml"
    bindings.write_text(bindings.read_text().replace("pipeline_source: push", "pipeline_source: web"))
    assert service.reload() and service.exchange_policy is not None
    after = {b.name: b for b in service.exchange_policy.backends}
    assert after["artifacts-api"] is before["artifacts-api"]
    assert after["billing-api"] is not before["billing-api"] and after["billing-api"] != before["billing-api"]
    fresh = PolicyService(tmp_path / "policy", SnapshotCache())
    fresh.reload()
    assert fresh.exchange_policy == service.exchange_policy


# --- hostile input: nothing raised past the service, and a reload that cannot finish is visible ----------------


def _gauge(name: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name)


def test_an_unexpected_exception_while_loading_is_a_reported_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A RecursionError used to escape the reload: serve exited at start, a running one silently kept the old policy."""
    service = _service(tmp_path)

    def explode(loader: object, files: object) -> None:
        raise RecursionError("maximum recursion depth exceeded while calling a Python object " + "x" * 500)

    monkeypatch.setattr(PolicyLoader, "load", explode)
    assert not service.reload() and not service.ready
    (error,) = service.state.errors
    assert error.startswith(f"{tmp_path / 'policy'}:0: internal error while loading the policy: RecursionError"), error
    assert "x" * 40 not in error
    assert metrics.POLICY_CURRENT_ERRORS._value.get() == 1
    assert service.status()["errors"] == [error]
    assert sum("Traceback" in r.getMessage() or r.exc_info is not None for r in caplog.records) == 0


async def test_an_unexpected_exception_while_recompiling_is_a_reported_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = _service(tmp_path)
    assert service.reload()

    def explode(*args: object, **kwargs: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(service_module, "compile_model", explode)
    assert not await service.recompile("issuer keys changed")
    assert service.status()["errors"] == [
        f"{tmp_path / 'policy'}:0: internal error while compiling the policy: KeyError: 'boom'"
    ]
    assert service.ready  # the last good snapshot stays in service


def test_a_deeply_nested_policy_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    service = _service(tmp_path)
    (tmp_path / "policy" / "deep.yaml").write_text(
        "kind: Role\nname: deep\nbackend: b\nrules: " + "[" * 900 + "]" * 900
    )
    assert not service.reload()
    assert (
        "deep.yaml:4: rules" + "[0]" * 63 + ": lists and mappings nested deeper than 64 levels" in service.state.errors
    )


class _BlockingSource:
    """A directory whose next read waits for `release`: a read that never returns, as a FIFO made it."""

    def __init__(self, root: Path) -> None:
        self.inner = DirectorySource(root)
        self.description = str(root)
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def read(self) -> PolicyFiles:
        self.blocked.set()
        self.release.wait(30)
        return self.inner.read()

    def report(self, files: PolicyFiles, accepted: bool, summary: str) -> None:
        return None


async def test_a_reload_that_does_not_finish_makes_the_server_not_ready(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    source = _BlockingSource(tmp_path / "policy")
    service = PolicyService(source, SnapshotCache(), reload_timeout=0.2)
    assert await service.reload_off_loop() and service.ready
    assert service.status()["reload"] == {"running_seconds": None, "timeout_seconds": 0.2, "stuck": False}
    source.release.clear()
    stuck = asyncio.create_task(service.reload_off_loop())
    try:
        await eventually(lambda: not service.ready, "not ready while the reload hangs")
        status = service.status()
        assert status["reload"]["stuck"] is True  # type: ignore[index]
        assert any("policy reload running for" in e and "not applied" in e for e in status["errors"])  # type: ignore[union-attr]
        assert _gauge("controlplane_policy_reload_stuck") == 1
        assert (_gauge("controlplane_policy_reload_running_seconds") or 0) >= 0.2
    finally:
        source.release.set()
    assert await stuck and service.ready
    assert service.status()["reload"]["stuck"] is False  # type: ignore[index]
    assert _gauge("controlplane_policy_reload_stuck") == 0


def test_a_flood_of_errors_is_logged_and_shown_within_bounds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """2.1M errors were 2.1M log lines (225 MB), a 131 MB /status and 45 s on the event loop."""
    service = _service(tmp_path)
    assert service.reload()
    bad = "kind: Role\nname: r{i}\nbackend: billing-api\nrules: [" + ",".join(["1"] * 60) + "]\n"
    for i in range(30):
        (tmp_path / "policy" / f"bad{i:02}.yaml").write_text(bad.format(i=i))
    caplog.clear()
    assert not service.reload()
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) <= service_module.LOGGED_ERRORS + 2, len(logged)
    assert logged[0] == "policy rejected with at least 1000 error(s); keeping the last good snapshot"
    assert logged[-1].startswith("  ... and ") and "not shown" in logged[-1]
    errors = service.status()["errors"]
    assert isinstance(errors, list) and len(errors) == 1001
    assert errors[-1] == "... and more errors not shown"
    assert metrics.POLICY_CURRENT_ERRORS._value.get() == 1000
    assert service.ready  # the last good snapshot stays in service


def test_a_reserved_name_is_reported_before_a_subject_that_does_not_resolve(tmp_path: Path) -> None:
    """As the compiler always checked: the names its own entries need first, then who the subjects are."""
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    issuer = tmp_path / "policy" / "issuer.yaml"
    issuer.write_text(issuer.read_text().replace("name: gitlab", "name: controlplane"))
    bindings = tmp_path / "policy" / "billing" / "bindings.yaml"
    text = bindings.read_text().replace("name: deploy-prod-billing-read\n", "name: exchanged\n")
    bindings.write_text(text.replace("project: infra/deploy-prod", "project: infra/nowhere"))
    credentials = CredentialInputs(jwks='{"keys":[]}')
    without = PolicyService(tmp_path / "policy", SnapshotCache())
    assert not without.reload()
    assert without.state.errors and all("infra/nowhere" in e for e in without.state.errors)
    service = PolicyService(tmp_path / "policy", SnapshotCache(), credentials=lambda: credentials)
    assert not service.reload()
    reserved = "is reserved for the control plane's exchanged credentials; rename it"
    assert sorted(service.state.errors) == [
        f"billing/bindings.yaml:3: name: 'exchanged' {reserved}",
        f"issuer.yaml:1: name: 'controlplane' {reserved}",
    ]


async def test_a_burst_of_live_changes_shares_compiles_and_none_is_missed(tmp_path: Path) -> None:
    """100 revocations as concurrent Job Hooks: callers share a compile that has not started, and every change is
    in the snapshot its caller is answered after (its compile read the inputs after the change was made)."""
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    revoked: list[str] = []
    reads: list[int] = []

    def credentials() -> CredentialInputs:
        reads.append(len(revoked))
        return CredentialInputs(revoked=revocation_buckets(revoked))

    service = PolicyService(tmp_path / "policy", SnapshotCache(), clock=lambda: 1000.0, credentials=credentials)
    assert service.reload()
    reads.clear()

    async def revoke(job: int) -> int:
        await asyncio.sleep(job / 1000)  # spread over 0.1 s, as hooks arrive
        revoked.append(str(job))
        changed_at = len(revoked)
        assert await service.recompile("credentials changed", gather=0.02)
        return changed_at

    made = await asyncio.gather(*(revoke(job) for job in range(100)))
    assert len(reads) < 20, reads  # not 100 compiles
    assert reads[-1] == 100
    # each caller's change was read by a compile that finished before its caller was answered
    assert all(any(read >= at for read in reads) for at in made)


async def test_a_change_made_while_a_compile_runs_gets_a_compile_of_its_own(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    revoked: list[str] = []
    inside, release = threading.Event(), threading.Event()
    reads: list[tuple[str, ...]] = []

    def credentials() -> CredentialInputs:
        reads.append(tuple(revoked))
        if len(reads) == 2:  # the first recompile (after the load): hold it while another change is made
            inside.set()
            assert release.wait(10)
        return CredentialInputs(revoked=revocation_buckets(revoked))

    service = PolicyService(tmp_path / "policy", SnapshotCache(), clock=lambda: 1000.0, credentials=credentials)
    assert service.reload()
    revoked.append("1")
    first = asyncio.ensure_future(service.recompile("credentials changed"))
    assert await asyncio.to_thread(inside.wait, 10)
    revoked.append("2")
    second = asyncio.ensure_future(service.recompile("credentials changed"))
    release.set()
    assert await first and await second
    assert reads[1:] == [("1",), ("1", "2")]


async def test_a_cancelled_caller_does_not_cancel_the_compile_others_share(tmp_path: Path) -> None:
    service = _service(tmp_path)
    assert service.reload()
    first = asyncio.ensure_future(service.recompile("a", gather=0.05))
    second = asyncio.ensure_future(service.recompile("b"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second


async def test_a_revocation_is_published_while_live_inputs_make_the_policy_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live compile that fails (GitLab's inventory makes the policy invalid, or the compiler raises) keeps the
    last good snapshot; a job revoked meanwhile must still reach Envoy: its Job Hook is answered after this
    recompile, and nothing else would push the deny list until the policy compiles again (fail open)."""
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    revoked: list[str] = []
    cache = SnapshotCache()
    service = PolicyService(
        tmp_path / "policy",
        cache,
        clock=lambda: 1000.0,
        credentials=lambda: CredentialInputs(revoked=revocation_buckets(revoked)),
    )
    assert service.reload()
    groups = sorted(service.state.versions)
    before = {g: cache.get(g) for g in groups}

    def invalid(*args: object, **kwargs: object) -> None:
        raise PolicyInvalid([PolicyError("gitlab", 0, "projects", "path now owned by another project")])

    monkeypatch.setattr(service_module, "compile_model", invalid)
    revoked.append("4242")
    assert not await service.recompile("credentials changed")
    assert service.state.live_errors
    index = revocation_bucket("4242")
    bucket = revocation_bucket_filter(index)
    for group in groups:
        now = cache.get(group)
        assert now is not None and before[group] is not None
        ecds = now.types[EXTENSION_CONFIG].resources
        assert ecds[bucket].payload == bucket_config_bytes(bucket, ("4242",)), group
        # Only the deny list changed: the rest is the last good snapshot's.
        for type_url, typed in now.types.items():
            if type_url != EXTENSION_CONFIG:
                assert typed is before[group].types[type_url]
        changed = {n for n, r in ecds.items() if before[group].types[EXTENSION_CONFIG].resources[n] is not r}
        assert changed == {bucket}
    # And an exception other than an invalid policy too.
    monkeypatch.setattr(service_module, "compile_model", lambda *a, **k: 1 / 0)
    revoked.append("4243")  # the same bucket
    assert not await service.recompile("credentials changed")
    for group in groups:
        now = cache.get(group)
        assert now is not None
        assert now.types[EXTENSION_CONFIG].resources[bucket].payload == bucket_config_bytes(bucket, ("4242", "4243"))


async def test_the_credential_service_hears_of_each_exchange_policy_published(tmp_path: Path) -> None:
    """What lets a policy that now covers a project list its jobs that finished unlisted (coverage)."""
    shutil.copytree(ROOT / "examples" / "multi-backend", tmp_path / "policy")
    heard: list[object] = []
    service = PolicyService(
        tmp_path / "policy",
        SnapshotCache(),
        clock=lambda: 1000.0,
        exchange_policy_changed=lambda: heard.append(service.exchange_policy),
    )
    assert service.reload()
    assert heard == [service.exchange_policy] and heard[0] is not None
    assert await service.recompile("credentials changed")
    assert heard[-1] is service.exchange_policy


def _jwks(*kids: str) -> str:
    """A relayed JWKS whose keys are told apart by `kid` (the compiler relays the text as it is)."""
    keys = ", ".join(f'{{"kty": "EC", "crv": "P-256", "kid": "{kid}", "x": "AA", "y": "AA"}}' for kid in kids)
    return f'{{"keys": [{keys}]}}'


async def test_a_key_withdrawn_while_gitlab_makes_the_policy_invalid_reaches_envoy_with_the_last_good_policy(
    tmp_path: Path,
) -> None:
    """The last good *policy* stays, not the last good snapshots: while GitLab's inventory makes the policy in
    service invalid (a path taken over by another project), a relayed issuer's withdrawn key, our rotated signing
    key and a revoked job still reach Envoy, the error stays reported, and the last good resolution (routes, RBAC)
    stays enforced."""
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "policy.yaml").write_text(
        documents(
            MAIN_GITLAB,
            backend("reports-api", 9),
            role("reports-read", "reports-api"),
            binding("deployer-reads-reports", ["reports-read"], "{project: acme/platform/deployer}"),
            gateway(10000, ["reports-api"]),
        )
    )
    platform = (Group(10, "acme"), Group(11, "acme/platform", parent_id=10))
    deployer = Project(42, "acme/platform/deployer", 11)
    inventories = {"main": Inventory(projects=(deployer,), groups=platform, fetched_at=1000.0)}
    revoked: list[str] = []
    signing = [_jwks("signing-1")]  # our own signing keys, as the credential service publishes them
    cache = SnapshotCache()
    service = PolicyService(
        tmp_path / "policy",
        cache,
        clock=lambda: 1000.0,
        inventories=lambda: inventories,
        pin_store=PinStore(tmp_path / "pins.json"),
        credentials=lambda: CredentialInputs(jwks=signing[0], revoked=revocation_buckets(revoked)),
    )
    assert service.reload()
    assert await service.set_keys({"main": _jwks("old-key", "new-key")})
    before = cache.get("ci-gateway")
    assert before is not None and b"old-key" in before.types[EXTENSION_CONFIG].resources[JWT_FILTER].payload
    assert b"signing-1" in before.types[EXTENSION_CONFIG].resources[JWT_FILTER].payload

    impostor = Project(99, "acme/platform/deployer", 11)
    renamed = replace(deployer, path="acme/platform/deployer-old")
    inventories["main"] = Inventory(projects=(renamed, impostor), groups=platform, fetched_at=1001.0)
    assert not await service.recompile("GitLab inventory changed")
    assert "now belongs to project 99" in service.state.live_errors[0]

    revoked.append("4242")
    signing[0] = _jwks("signing-2")
    assert not await service.set_keys({"main": _jwks("new-key")})  # GitLab withdrew the old key
    after = cache.get("ci-gateway")
    assert after is not None
    jwt_authn = after.types[EXTENSION_CONFIG].resources[JWT_FILTER].payload
    assert b"old-key" not in jwt_authn and b"new-key" in jwt_authn
    assert b"signing-1" not in jwt_authn and b"signing-2" in jwt_authn
    bucket = revocation_bucket_filter(revocation_bucket("4242"))
    assert after.types[EXTENSION_CONFIG].resources[bucket].payload == bucket_config_bytes(bucket, ("4242",))
    # The last good policy is what is enforced: the routes (RBAC of project 42) and everything else unchanged.
    for type_url, typed in after.types.items():
        if type_url != EXTENSION_CONFIG:
            assert typed.resources == before.types[type_url].resources, type_url
    # And the error is still reported until GitLab or the policy is fixed.
    status = service.status()["errors"]
    assert isinstance(status, list) and any("now belongs to project 99" in e for e in status)
    assert metrics.POLICY_CURRENT_ERRORS._value.get() >= 1
