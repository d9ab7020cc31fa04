"""Several `controlplane serve` replicas sharing one PostgreSQL database, as a platform team runs them.

One outside world (fake GitLab, echo backends, one policy directory that every replica reads), then `count`
replicas, each with its own state directory, ports and webhook listener (registered with the fake GitLab,
which can then deliver a Job Hook to any one of them), all on `--store postgres` with the DSN from the
environment. Every process is started by a context manager, so leaving the `with` stops them all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import HttpResponse
from .controlplane import ControlPlaneProcess
from .exchange import post_exchange
from .fake_gitlab import FakeGitLab
from .gateway import Webhook
from .gitlab_hooks import HookTarget, deliver
from .policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from .ports import LOOPBACK, poll_until
from .stack import EnvoySpec, OutsideWorld, PolicyInputs, PolicyWriter, S, outside_world, serve_exchange_stack

STORE_ENV = "CP_STORE_DSN"
KEY_ENV = "CP_STORE_KEY"  # the signing keys' key-encryption key, the same on every replica
STORE_KEY = "Y29udHJvbHBsYW5lIHRlc3QgS0VLLCAzMiBieXRlcyE="  # base64 of 32 bytes, for tests only
STORE_ARGS = ("--store", "postgres", "--store-dsn-env", STORE_ENV, "--store-key-env", KEY_ENV)


def exchanged_reports(given: PolicyInputs) -> str:
    """One gateway, one backend that takes only exchanged credentials, bound to project 42's protected refs."""
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        role("reports-read", "reports-api"),
        binding("deployer", ["reports-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api"]),
    )


def gateway_per_replica(ports: Sequence[int]) -> PolicyWriter:
    """`exchanged_reports` with a gateway `gw-<n>` on each of `ports`, so replica n's own Envoy can be asked."""

    def policy(given: PolicyInputs) -> str:
        return documents(
            issuer(given.issuer),
            backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
            role("reports-read", "reports-api"),
            binding("jobs-read-reports", ["reports-read"], "{project: 42}"),
            *(gateway(port, ["reports-api"], name=f"gw-{n}") for n, port in enumerate(ports)),
        )

    return policy


@dataclass
class Replica:
    index: int
    controlplane: ControlPlaneProcess
    hook: HookTarget

    def status(self, query: str = "") -> dict[str, Any]:
        return self.controlplane.status(query)

    def exchange(self, subject: str, audience: str = "reports-api") -> HttpResponse:
        """The token exchange at this replica's own port."""
        return post_exchange(self.controlplane.exchange_port, subject, audience)

    def job_finished(self, job_id: int, project_id: int = 42) -> None:
        """GitLab's Job Hook for a job that succeeded, delivered to this replica and answered."""
        payload = {"object_kind": "build", "build_id": job_id, "build_status": "success", "pipeline_id": 9}
        payload |= {"project_id": project_id, "ref": "main", "project_name": "acme / deployer"}
        assert deliver(self.hook, "Job Hook", payload).status == 200


@dataclass
class Replicas:
    world: OutsideWorld
    replicas: list[Replica] = field(default_factory=list)
    policy_project: int | None = None  # the GitLab project the policy is served from, if any

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def subject(self, job_id: int, aud: str = "https://reports.local", **claims: Any) -> str:
        """A running job's ID token as GitLab mints it (project 42 unless `claims` say otherwise, an hour)."""
        return self.world.gitlab.mint(job_id=job_id, aud=aud, **{"project_id": 42, "ttl": 3600, **claims})


@contextmanager
def replicated(
    root: Path,
    policy: PolicyWriter,
    dsn: str,
    *,
    count: int = 3,
    backends: tuple[str, ...] = ("reports",),
    serve_args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60.0,
    policy_project: str | None = None,
    hooked: Collection[int] | None = None,
    gitlab: FakeGitLab | None = None,
) -> Iterator[Replicas]:
    """`count` replicas on `dsn`, yielded once each answers /readyz and its exchange issues. `policy_project`: the
    policy is served from that GitLab project (created with `policy`'s text) instead of the directory. `hooked`:
    the replicas whose webhook listener GitLab delivers to (default all; the others receive only what a test
    sends them). `gitlab`: a fake GitLab already running, e.g. holding the projects a policy's `api:` issuer reads."""
    with outside_world(root, policy, backends=backends, gitlab=gitlab) as world, ExitStack() as up:
        built = Replicas(world)
        source: tuple[str, ...] = ()
        if policy_project is not None:
            built.policy_project = world.gitlab.add_project(
                policy_project, files={"policy.yaml": (world.policy / "policy.yaml").read_text()}
            )
            source = ("--policy-project", policy_project, "--gitlab-url", world.gitlab.base_url)
            source += ("--gitlab-token-env", "GITLAB_TOKEN")
        for index in range(count):
            hook = Webhook()
            controlplane = ControlPlaneProcess(
                world.policy,
                extra_args=(*STORE_ARGS, "--jwks-refresh", "1", *hook.args, *source, *serve_args),
                env={
                    STORE_ENV: dsn,
                    KEY_ENV: STORE_KEY,
                    "GITLAB_TOKEN": world.gitlab.api_token,
                    **hook.env,
                    **(env or {}),
                },
                log_path=root / f"replica-{index}.log",
            )
            controlplane.start(wait_ready=False)
            up.callback(controlplane.close)
            if hooked is None or index in hooked:
                target = hook.register(world.gitlab)
            else:
                target = HookTarget(f"http://{LOOPBACK}:{hook.port}/webhooks/gitlab", hook.secret)
            built.replicas.append(Replica(index, controlplane, target))
        for replica in built:
            replica.controlplane.wait_ready(ready_timeout)
        poll_until(
            lambda: all(r.exchange(built.subject(1)).status == 200 for r in built),
            ready_timeout,
            message="every replica's exchange answers",
        )
        yield built


@contextmanager
def stacks_on_one_store(
    root: Path,
    policy: PolicyWriter,
    dsn: str,
    *,
    kind: type[S],
    envoy: Callable[[str], EnvoySpec],
    names: Sequence[str] = ("a", "b"),
    serve_args: tuple[str, ...] = (),
) -> Iterator[list[S]]:
    """Replicas each with a whole stack of its own (`serve_exchange_stack`: a policy directory, state directory,
    backend and Envoy, `envoy(name)`; two Envoys cannot share a listener port) on `dsn`, with one fake GitLab;
    yielded once every exchange answers, everything stopped on leaving. Unlike `replicated`, each replica reads its
    own policy directory, so a test can change one replica's policy alone."""
    with FakeGitLab() as gitlab, ExitStack() as running:
        built = []
        for name in names:
            home = root / name
            home.mkdir()
            built.append(
                running.enter_context(
                    serve_exchange_stack(
                        home,
                        policy,
                        kind=kind,
                        envoy=envoy(name),
                        gitlab=gitlab,
                        serve_args=(*STORE_ARGS, *serve_args),
                        env={STORE_ENV: dsn, KEY_ENV: STORE_KEY},
                    )
                )
            )
        yield built
