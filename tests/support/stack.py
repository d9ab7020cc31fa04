"""The end-to-end gateway stack: fake GitLab issuer → `controlplane serve` → real Envoy → two echo backends.

One definition for every suite that needs the reference policy (two backends, two bindings, one gateway):
the SotW and Delta suites start it through the `stack` fixture of tests/conftest.py, the audit suite takes
only its outside world (`outside_world`) to wire its own in-process control plane to it. Every process is
started by a context manager, so leaving the `with` stops it whatever the test did.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from controlplane.cli.bootstrap import render_bootstrap

from .backends import EchoBackend, HttpResponse, http_request
from .controlplane import ControlPlaneProcess
from .envoy import EnvoyProcess
from .fake_gitlab import FakeGitLab
from .ports import LOOPBACK, free_port, poll_until

Protocol = Literal["sotw", "delta"]

GROUP = "ci-gateway"
NODE = "e2e-envoy-1"

DEPLOYER = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
OTHER = {"project_id": 43, "project_path": "acme/platform/other", "namespace_id": 11}

ISSUER = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
inventory: inventory.yaml
"""
INVENTORY = """\
groups:
  - {{id: 10, path: acme}}
  - {{id: 11, path: acme/platform, parent_id: 10}}
projects:
  - {{id: 42, path: acme/platform/deployer, namespace_id: 11}}
  - {{id: 43, path: acme/platform/other, namespace_id: 11}}
"""
BACKENDS = """\
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {reports_port}}}]
public_paths: [/healthz]
---
kind: Backend
name: deploy-api
hosts: [deploy.local]
audience: https://deploy.local
endpoints: [{{address: 127.0.0.1, port: {deploy_port}}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET, HEAD], paths: ["/**"]}}]
---
kind: Role
name: deploy-trigger
backend: deploy-api
rules: [{{methods: [POST], paths: ["/deployments/**"]}}]
"""
BINDINGS = """\
kind: Binding
name: deployer-reads-reports
roles: [reports-read]
subjects:
  - project: acme/platform/deployer
    ref_protected: true
---
kind: Binding
name: deployer-deploys
roles: [deploy-trigger]
subjects:
  - project: acme/platform/deployer
    ref: main
    ref_type: branch
    ref_protected: true
    pipeline_source: push
"""
GATEWAY = """\
kind: Gateway
name: ci-gateway
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api, deploy-api]
access_log: {access_log}
"""
OTHER_PROJECT_BINDING = """\
kind: Binding
name: other-reads-reports
roles: [reports-read]
subjects:
  - project: 43
"""


def write_policy(root: Path, **values: Any) -> None:
    """The reference policy into `root`, its templates filled from `values` (ports, issuer URL, log path)."""
    for name, template in (
        ("issuer.yaml", ISSUER),
        ("inventory.yaml", INVENTORY),
        ("backends.yaml", BACKENDS),
        ("bindings.yaml", BINDINGS),
        ("gateway.yaml", GATEWAY),
    ):
        (root / name).write_text(template.format(**values))


@dataclass
class OutsideWorld:
    """What a control plane serves between: the issuer, the backends and the policy naming them."""

    gitlab: FakeGitLab
    reports: EchoBackend
    deploy: EchoBackend
    policy: Path
    listen_port: int
    access_log: Path


@contextmanager
def outside_world(root: Path) -> Iterator[OutsideWorld]:
    policy = root / "policy"
    policy.mkdir()
    listen_port = free_port()
    access_log = root / "access.log"
    with FakeGitLab() as gitlab, EchoBackend("reports") as reports, EchoBackend("deploy") as deploy:
        write_policy(
            policy,
            issuer=gitlab.issuer,
            reports_port=reports.port,
            deploy_port=deploy.port,
            listen_port=listen_port,
            access_log=access_log,
        )
        yield OutsideWorld(gitlab, reports, deploy, policy, listen_port, access_log)


@dataclass
class Stack:
    gitlab: FakeGitLab
    reports: EchoBackend
    deploy: EchoBackend
    policy: Path
    listen_port: int
    access_log: Path
    controlplane: ControlPlaneProcess
    envoy: EnvoyProcess

    def request(
        self,
        host: str,
        path: str,
        token: str | None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
    ) -> HttpResponse:
        sent = {"Host": host, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return http_request(f"http://{LOOPBACK}:{self.listen_port}{path}", method=method, headers=sent)

    def token(self, project: dict[str, Any] = DEPLOYER, aud: str = "https://reports.local", **claims: Any) -> str:
        return self.gitlab.mint(aud=aud, **{**project, **claims})

    def write(self, name: str, text: str) -> None:
        """Atomic, like an editor or a git checkout: the watcher never sees half a file."""
        tmp = self.policy / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.policy / name)

    def remove(self, name: str) -> None:
        (self.policy / name).unlink()

    def wait_status(self, host: str, path: str, token: str | None, expected: int, timeout: float = 10.0) -> float:
        started = time.monotonic()
        poll_until(
            lambda: self.request(host, path, token).status == expected,
            timeout,
            message=f"{host}{path} -> {expected}",
        )
        return time.monotonic() - started

    def proxy(self) -> dict[str, Any] | None:
        """This stack's Envoy as the control plane's /status lists it (None until it has connected)."""
        proxies = self.controlplane.status()["proxies"]
        return next((p for p in proxies if p["node"] == NODE), None)

    def envoy_clusters(self) -> set[str]:
        status, text = self.envoy.admin_get("/clusters?format=json")
        assert status == 200
        return {c["name"] for c in json.loads(text)["cluster_statuses"]}


@contextmanager
def running_stack(root: Path, protocol: Protocol) -> Iterator[Stack]:
    """The whole stack with Envoy speaking `protocol`, yielded once a public path answers through it."""
    with (
        outside_world(root) as world,
        ControlPlaneProcess(world.policy, log_path=root / "controlplane.log") as controlplane,
    ):
        bootstrap = render_bootstrap(
            group=GROUP, node_id=NODE, xds_host=LOOPBACK, xds_port=controlplane.xds_port, api=protocol
        )
        # Envoy flushes file access logs every 10 s by default; the access log tests read them at once.
        flush = ("--file-flush-interval-msec", "20")
        with EnvoyProcess(bootstrap, name=f"e2e-envoy-{protocol}", extra_args=flush) as envoy:
            built = Stack(
                world.gitlab,
                world.reports,
                world.deploy,
                world.policy,
                world.listen_port,
                world.access_log,
                controlplane,
                envoy,
            )
            built.wait_status("reports.local", "/healthz", None, 200, timeout=20)
            yield built


# --- replacing a backend under load (Delta make-before-break, and the one-change swap on both protocols) ---

REPLACEMENT = """\
kind: Backend
name: reports-v2
hosts: [{host}]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {port}}}]
public_paths: [/healthz]
"""


class Traffic:
    """Requests back to back from a thread while the policy changes: every answer is recorded."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.answers: list[tuple[int, str]] = []
        self._stack, self._token = stack, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            response = self._stack.request("reports.local", "/r", self._token)
            backend = response.json().get("backend", "") if response.status == 200 else response.text
            self.answers.append((response.status, backend))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def served_by(self, backend: str) -> bool:
        return any(answer == (200, backend) for answer in self.answers[-3:])


def wait_for_the_replacement(stack: Stack, traffic: Traffic) -> None:
    """The replacement answers the traffic and the replaced backend's cluster has left Envoy."""
    poll_until(lambda: traffic.served_by("reports-v2"), 10, message="the replacement answers")
    poll_until(lambda: "backend-reports-api" not in stack.envoy_clusters(), 10, message="old cluster gone")


def wait_for_the_original(stack: Stack) -> None:
    """After the policy is restored: the replacement's cluster is gone and the original backend serves."""
    poll_until(lambda: "backend-reports-v2" not in stack.envoy_clusters(), 10, message="replacement removed")
    stack.wait_status("reports.local", "/r", stack.token(), 200)


def assert_no_request_failed(stack: Stack, traffic: Traffic, cds_rejected: int) -> None:
    """Every request of the swap answered 200, from both backends, and Envoy rejected no cluster update."""
    failures = [a for a in traffic.answers if a[0] != 200]
    assert not failures, f"{len(failures)} of {len(traffic.answers)} requests failed: {failures[:5]}"
    assert {b for status, b in traffic.answers if status == 200} == {"reports", "reports-v2"}
    assert stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0) == cds_rejected
