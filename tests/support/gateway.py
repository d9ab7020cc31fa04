"""Starting the pieces every end-to-end stack wires the same way: an Envoy on the control plane's xDS port, and
the webhook GitLab delivers its system hooks to.

Each suite keeps its own policy and its own checks; how an Envoy is pointed at a control plane, and how a
webhook's address and secret reach both `controlplane serve` and the fake GitLab, is written once here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Literal

from controlplane.cli.bootstrap import render_bootstrap

from .envoy import EnvoyProcess
from .fake_gitlab import FakeGitLab
from .gitlab_hooks import HookTarget
from .ports import LOOPBACK, free_port

# Envoy flushes file access logs every 10 s by default; suites that read them want them at once.
FLUSH_LOGS = ("--file-flush-interval-msec", "20")


def gateway_envoy(
    xds_port: int,
    *,
    node: str,
    name: str,
    group: str = "ci-gateway",
    api: Literal["sotw", "delta"] = "sotw",
    flush_logs: bool = False,
) -> EnvoyProcess:
    """An Envoy of `group` that takes all its configuration from the control plane on `xds_port`.

    Use it as a context manager: entering starts it and waits until it is ready, leaving stops it.
    """
    bootstrap = render_bootstrap(group=group, node_id=node, xds_host=LOOPBACK, xds_port=xds_port, api=api)
    return EnvoyProcess(bootstrap, name=name, extra_args=FLUSH_LOGS if flush_logs else ())


@dataclass(frozen=True)
class Webhook:
    """The control plane's webhook listener: a free loopback port and a fresh secret, passed in `HOOK_SECRET`."""

    port: int = field(default_factory=free_port)
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def args(self) -> tuple[str, ...]:
        return ("--webhook-address", f"{LOOPBACK}:{self.port}", "--webhook-secret-env", "HOOK_SECRET")

    @property
    def env(self) -> dict[str, str]:
        return {"HOOK_SECRET": self.secret}

    def register(self, gitlab: FakeGitLab) -> HookTarget:
        """The fake GitLab's system hook to this listener, as an admin would add it."""
        return gitlab.add_system_hook(f"http://{LOOPBACK}:{self.port}/webhooks/gitlab", self.secret)
