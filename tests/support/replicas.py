"""Several `controlplane serve` replicas sharing one PostgreSQL database, as a platform team runs them.

One outside world (fake GitLab, echo backends, one policy directory that every replica reads), then `count`
replicas, each with its own state directory, ports and webhook listener (registered with the fake GitLab,
which can then deliver a Job Hook to any one of them), all on `--store postgres` with the DSN from the
environment. Every process is started by a context manager, so leaving the `with` stops them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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
from .ports import poll_until
from .stack import OutsideWorld, PolicyWriter, outside_world

STORE_ENV = "CP_STORE_DSN"
KEY_ENV = "CP_STORE_KEY"  # the signing keys' key-encryption key, the same on every replica
STORE_KEY = "Y29udHJvbHBsYW5lIHRlc3QgS0VLLCAzMiBieXRlcyE="  # base64 of 32 bytes, for tests only
STORE_ARGS = ("--store", "postgres", "--store-dsn-env", STORE_ENV, "--store-key-env", KEY_ENV)


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
    gitlab: FakeGitLab | None = None,
) -> Iterator[Replicas]:
    """`count` replicas on `dsn`, yielded once each answers /readyz and its exchange issues (`gitlab`: a fake
    GitLab already running, e.g. holding the projects a policy's `api:` issuer reads)."""
    with outside_world(root, policy, backends=backends, gitlab=gitlab) as world, ExitStack() as up:
        built = Replicas(world)
        for index in range(count):
            hook = Webhook()
            controlplane = ControlPlaneProcess(
                world.policy,
                extra_args=(*STORE_ARGS, "--jwks-refresh", "1", *hook.args, *serve_args),
                env={STORE_ENV: dsn, KEY_ENV: STORE_KEY, **hook.env, **(env or {})},
                log_path=root / f"replica-{index}.log",
            )
            controlplane.start(wait_ready=False)
            up.callback(controlplane.close)
            built.replicas.append(Replica(index, controlplane, hook.register(world.gitlab)))
        for replica in built:
            replica.controlplane.wait_ready(ready_timeout)
        poll_until(
            lambda: all(r.exchange(built.subject(1)).status == 200 for r in built),
            ready_timeout,
            message="every replica's exchange answers",
        )
        yield built
