"""The end-to-end gateway stack: fake GitLab issuer → `controlplane serve` → real Envoy → two echo backends.

One definition for every suite that needs the reference policy (two backends, two bindings, one gateway):
the SotW and Delta suites start it through the `stack` fixture of tests/conftest.py, the audit suite takes
only its outside world (`outside_world`) to wire its own in-process control plane to it. Every process is
started by a context manager, so leaving the `with` stops it whatever the test did.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .backends import EchoBackend, HttpResponse, http_request
from .controlplane import ControlPlaneProcess
from .envoy import EnvoyProcess
from .fake_gitlab import FakeGitLab
from .gateway import gateway_envoy
from .ports import LOOPBACK, free_port, poll_until

Protocol = Literal["sotw", "delta"]

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
class Stack(OutsideWorld):
    """The outside world with a control plane serving it and an Envoy configured by that control plane."""

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
        gateway_envoy(
            controlplane.xds_port, node=NODE, name=f"e2e-envoy-{protocol}", api=protocol, flush_logs=True
        ) as envoy,
    ):
        built = Stack(**vars(world), controlplane=controlplane, envoy=envoy)
        built.wait_status("reports.local", "/healthz", None, 200, timeout=20)
        yield built
