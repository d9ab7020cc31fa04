"""The end-to-end gateway stack, built one way for every suite: fake GitLab → `controlplane serve` → real Envoy →
echo backends.

`serve_stack` takes what differs between suites (the policy, the backends, `serve`'s flags and environment, the
webhook, the Envoy's node and protocol, when it is ready) and yields one `Served` with the helpers every suite
uses; a suite subclasses `Served` only for helpers of its own. `outside_world` is the first half alone, for the
audit suite, which wires an in-process control plane to it. The reference policy (two backends, two bindings,
one gateway) is the `stack` fixture of tests/conftest.py. Every process is started by a context manager, so
leaving the `with` stops it whatever the test did; every port is an ephemeral loopback one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from .backends import EchoBackend, HttpResponse, LoopbackHTTPServer, http_request
from .controlplane import ControlPlaneProcess
from .envoy import EnvoyProcess
from .exchange import post_exchange
from .fake_gitlab import FakeGitLab
from .gateway import Webhook, gateway_envoy
from .gitlab_hooks import HookTarget, deliver
from .policy_parts import ACME_INVENTORY, backend, binding, documents, gateway, issuer, role
from .ports import LOOPBACK, free_port, poll_until

Protocol = Literal["sotw", "delta"]

NODE = "e2e-envoy-1"

DEPLOYER_PATH = "acme/platform/deployer"
DEPLOYER = {"project_id": 42, "project_path": DEPLOYER_PATH, "namespace_id": 11}
OTHER = {"project_id": 43, "project_path": "acme/platform/other", "namespace_id": 11}

INVENTORY_FILE = "inventory: inventory.yaml"  # the reference issuer's projects and groups, without an API
OTHER_PROJECT_BINDING = binding("other-reads-reports", ["reports-read"], "{project: 43}")


@dataclass(frozen=True)
class PolicyInputs:
    """What a suite's policy names that is known only once the outside world runs: addresses and paths."""

    issuer: str
    listen_port: int
    ports: Mapping[str, int]  # backend server name -> its port
    access_log: Path
    root: Path


# A suite's policy: one text (written as policy.yaml), or file name -> text.
PolicyWriter = Callable[[PolicyInputs], "str | Mapping[str, str]"]


def reference_policy(given: PolicyInputs) -> dict[str, str]:
    """The reference policy, one kind a file as an operator lays it out."""
    return {
        "issuer.yaml": issuer(given.issuer, extra=INVENTORY_FILE),
        "inventory.yaml": ACME_INVENTORY,
        "backends.yaml": documents(
            backend("reports-api", given.ports["reports"], extra="public_paths: [/healthz]"),
            backend("deploy-api", given.ports["deploy"]),
            role("reports-read", "reports-api", ["GET", "HEAD"], ["/**"]),
            role("deploy-trigger", "deploy-api", ["POST"], ["/deployments/**"]),
        ),
        "bindings.yaml": documents(
            binding("deployer-reads-reports", ["reports-read"], f"{{project: {DEPLOYER_PATH}, ref_protected: true}}"),
            binding(
                "deployer-deploys",
                ["deploy-trigger"],
                f"{{project: {DEPLOYER_PATH}, ref: main, ref_type: branch, ref_protected: true, "
                "pipeline_source: push}",
            ),
        ),
        "gateway.yaml": gateway(given.listen_port, ["reports-api", "deploy-api"], access_log=given.access_log),
    }


@dataclass
class OutsideWorld:
    """What a control plane serves between: the issuer, the backends and the policy naming them."""

    root: Path
    gitlab: FakeGitLab
    servers: dict[str, LoopbackHTTPServer]
    policy: Path
    listen_port: int
    access_log: Path

    def write(self, name: str, text: str) -> None:
        """Atomic, like an editor or a git checkout: the watcher never sees half a file."""
        tmp = self.policy / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.policy / name)

    def remove(self, name: str) -> None:
        (self.policy / name).unlink()

    def request(
        self,
        host: str,
        path: str = "/r",
        token: str | None = None,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        port: int | None = None,
    ) -> HttpResponse:
        """Through the gateway's listener (or `port`, another gateway's), as a job's request goes."""
        sent = {"Host": host, **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        url = f"http://{LOOPBACK}:{port or self.listen_port}{path}"
        return http_request(url, method=method, headers=sent)

    def call(self, host: str, token: str | None, method: str = "GET", path: str = "/r") -> int:
        """The status of one request through the gateway."""
        return self.request(host, path, token, method).status


@contextmanager
def outside_world(
    root: Path,
    policy: PolicyWriter = reference_policy,
    *,
    backends: tuple[str, ...] = ("reports", "deploy"),
    servers: Mapping[str, LoopbackHTTPServer] | None = None,
    gitlab: FakeGitLab | None = None,
) -> Iterator[OutsideWorld]:
    """A fake GitLab (or the one given, already running), an echo backend for each name in `backends` plus the
    `servers` given, and `policy` written into root/policy with their addresses."""
    with ExitStack() as running:
        if gitlab is None:
            gitlab = running.enter_context(FakeGitLab())
        started = {name: running.enter_context(EchoBackend(name)) for name in backends}
        started |= {name: running.enter_context(server) for name, server in (servers or {}).items()}
        directory = root / "policy"
        directory.mkdir()
        inputs = PolicyInputs(
            gitlab.issuer, free_port(), {name: s.port for name, s in started.items()}, root / "access.log", root
        )
        world = OutsideWorld(root, gitlab, started, directory, inputs.listen_port, inputs.access_log)
        written = policy(inputs)
        for name, text in ({"policy.yaml": written} if isinstance(written, str) else written).items():
            world.write(name, text)
        yield world


@dataclass(frozen=True)
class EnvoySpec:
    """The gateway Envoy of a stack: its node id, process name, gateway group and xDS flavour."""

    node: str
    name: str
    group: str = "ci-gateway"
    protocol: Protocol = "sotw"
    flush_logs: bool = False


@dataclass
class Served(OutsideWorld):
    """The outside world with `controlplane serve` on it and, unless a suite starts its own, an Envoy."""

    controlplane: ControlPlaneProcess
    envoy_process: EnvoyProcess | None = None
    hook_target: HookTarget | None = None
    policy_project: int | None = None
    exchange_host: ClassVar[str | None] = "reports.local"

    @property
    def envoy(self) -> EnvoyProcess:
        assert self.envoy_process is not None, "this stack runs no Envoy"
        return self.envoy_process

    @property
    def hook(self) -> HookTarget:
        """The fake GitLab's system hook to serve's webhook listener."""
        assert self.hook_target is not None, "this stack has no webhook"
        return self.hook_target

    def subject(self, job_id: int, aud: str = "https://reports.local", **claims: Any) -> str:
        """A running job's ID token as GitLab mints it: project 42 unless `claims` say otherwise, valid an hour."""
        return self.gitlab.mint(job_id=job_id, aud=aud, **{"project_id": 42, "ttl": 3600, **claims})

    def exchange(self, subject: str, audience: str = "reports-api", **form: str) -> HttpResponse:
        """The token exchange, through the gateway on `exchange_host`'s route as a job sends it, or at the
        control plane's own port when the suite's `exchange_host` is None."""
        if self.exchange_host is None:
            return post_exchange(self.controlplane.exchange_port, subject, audience, **form)
        return post_exchange(self.listen_port, subject, audience, host=self.exchange_host, **form)

    def credential(self, job_id: int, **form: str) -> str:
        """The job's short-lived credential for the reports backend, from a fresh subject token."""
        response = self.exchange(self.subject(job_id), **form)
        assert response.status == 200, response.text
        return str(response.json()["access_token"])

    def job_finished(self, job_id: int, project_id: int = 42, project_name: str = "acme / deployer") -> None:
        """GitLab's Job Hook for a job that succeeded, answered once the control plane handled it."""
        payload = {"object_kind": "build", "build_id": job_id, "build_status": "success", "pipeline_id": 9}
        payload |= {"project_id": project_id, "ref": "main", "project_name": project_name}
        assert deliver(self.hook, "Job Hook", payload).status == 200

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Until an Envoy is on the control plane again (its reconnect backoff grows with every restart)."""
        poll_until(
            lambda: self.controlplane.status("?summary=1")["summary"]["connected"] >= 1, timeout, message="Envoy back"
        )


S = TypeVar("S", bound=Served)


@contextmanager
def serve_stack(
    root: Path,
    policy: PolicyWriter,
    *,
    kind: type[S],
    envoy: EnvoySpec | None,
    ready: Callable[[S], object] | None = None,
    ready_timeout: float = 20.0,
    backends: tuple[str, ...] = ("reports",),
    servers: Mapping[str, LoopbackHTTPServer] | None = None,
    gitlab: FakeGitLab | None = None,
    policy_project: str | None = None,
    webhook: bool = False,
    gitlab_token: bool = False,
    serve_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    state_dir: Path | None = None,
) -> Iterator[S]:
    """The whole stack, yielded once `ready(stack)` is true (polled), every process stopped on leaving.

    `policy_project`: the policy is served from that GitLab project (created with `policy`'s text) instead
    of a directory. `webhook`: serve's webhook listener, registered as the fake GitLab's system hook.
    `gitlab_token`: the fake GitLab's API token in `GITLAB_TOKEN`, as policies' `api.token_env` name it.
    """
    with outside_world(root, policy, backends=backends, servers=servers, gitlab=gitlab) as world, ExitStack() as up:
        args, environment = list(serve_args), dict(env or {})
        project_id = None
        if policy_project is not None:
            text = (world.policy / "policy.yaml").read_text()
            project_id = world.gitlab.add_project(policy_project, files={"policy.yaml": text})
            args += ["--policy-project", policy_project, "--gitlab-url", world.gitlab.base_url]
            args += ["--gitlab-token-env", "GITLAB_TOKEN"]
        if gitlab_token or policy_project is not None:
            environment["GITLAB_TOKEN"] = world.gitlab.api_token
        hook = Webhook() if webhook else None
        if hook is not None:
            args += hook.args
            environment |= hook.env
        controlplane = up.enter_context(
            ControlPlaneProcess(
                world.policy,
                extra_args=tuple(args),
                env=environment,
                log_path=root / "controlplane.log",
                state_dir=state_dir,
            )
        )
        target = hook.register(world.gitlab) if hook is not None else None
        proxy = None
        if envoy is not None:
            proxy = up.enter_context(
                gateway_envoy(
                    controlplane.xds_port,
                    node=envoy.node,
                    name=envoy.name,
                    group=envoy.group,
                    api=envoy.protocol,
                    flush_logs=envoy.flush_logs,
                )
            )
        built = kind(**vars(world), controlplane=controlplane, envoy_process=proxy, hook_target=target)
        built.policy_project = project_id
        if ready is not None:
            poll_until(lambda: bool(ready(built)), ready_timeout, message=f"{envoy.name if envoy else 'stack'} ready")
        yield built


def exchange_answers(built: Served) -> bool:
    """Whether the token exchange grants a running job's subject token (job 1 of project 42)."""
    return built.exchange(built.subject(1)).status == 200


@contextmanager
def serve_exchange_stack(
    root: Path, policy: PolicyWriter, *, kind: type[S], envoy: EnvoySpec, serve_args: tuple[str, ...] = (), **more: Any
) -> Iterator[S]:
    """The stack of the credential suites: job ends arrive as Job Hooks on the webhook, GitLab's keys are
    re-read every second, and it is ready once the exchange answers (unless `ready` says otherwise)."""
    more.setdefault("ready", exchange_answers)
    args = ("--jwks-refresh", "1", *serve_args)
    with serve_stack(root, policy, kind=kind, envoy=envoy, webhook=True, serve_args=args, **more) as built:
        yield built


@dataclass
class Stack(Served):
    """The reference policy's stack: the SotW and Delta suites' `stack`."""

    @property
    def reports(self) -> LoopbackHTTPServer:
        return self.servers["reports"]

    @property
    def deploy(self) -> LoopbackHTTPServer:
        return self.servers["deploy"]

    def token(self, project: dict[str, Any] = DEPLOYER, aud: str = "https://reports.local", **claims: Any) -> str:
        return self.gitlab.mint(aud=aud, **{**project, **claims})

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
    """The reference stack with Envoy speaking `protocol`, yielded once a public path answers through it."""
    spec = EnvoySpec(NODE, f"e2e-envoy-{protocol}", protocol=protocol, flush_logs=True)
    with serve_stack(
        root,
        reference_policy,
        kind=Stack,
        envoy=spec,
        backends=("reports", "deploy"),
        ready=lambda built: built.call("reports.local", None, path="/healthz") == 200,
    ) as built:
        yield built


@dataclass
class DeployerStack(Served):
    """A served stack whose GitLab has a deployer project (its id set once added) that calls the reports backend
    with ID tokens: the GitLab-driven suites' shared client."""

    deployer: int = 0

    def get(self, **claims: Any) -> int:
        """A GET to reports.local with the deployer's ID token (`claims` added or overriding)."""
        token = self.gitlab.mint(aud="https://reports.local", **{"project_id": self.deployer, **claims})
        return self.call("reports.local", token)

    def wait_get(self, expected: int, timeout: float = 10.0, **claims: Any) -> float:
        """Seconds until that GET answers `expected` (polled)."""
        started = time.monotonic()
        poll_until(lambda: self.get(**claims) == expected, timeout, interval=0.02, message=f"GET -> {expected}")
        return time.monotonic() - started
