"""Two `controlplane serve --store postgres` replicas on one database: one leads, both register, `controlplane
status` against either lists both (and `--fleet` the proxies of both), and the follower takes over within the
stated bound after the leader is killed with SIGKILL (docs/shared-state.md, "Leader and replicas")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.ads import FakeEnvoy
from tests.support.controlplane import ControlPlaneProcess
from tests.support.ports import LOOPBACK, poll_until

pytestmark = pytest.mark.e2e

BACKENDS = """\
kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints:
  - {address: 127.0.0.1, port: 8081}
"""
GATEWAY = "kind: Gateway\nname: ci-gateway\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [reports-api]\n"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


@contextmanager
def replicas(tmp_path: Path, dsn: str, *names: str) -> Iterator[dict[str, ControlPlaneProcess]]:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "backends.yaml").write_text(BACKENDS)
    (policy / "gateway.yaml").write_text(GATEWAY)
    with ExitStack() as stack:
        started = {}
        for name in names:
            process = ControlPlaneProcess(
                policy,
                extra_args=("--no-exchange", "--store", "postgres", "--store-dsn-env", "CP_STORE_DSN",
                            "--replica-id", name),
                env={"CP_STORE_DSN": dsn},
                log_path=tmp_path / f"{name}.log",
            )  # fmt: skip
            started[name] = stack.enter_context(process)
        yield started


def leader_of(process: ControlPlaneProcess) -> dict[str, Any]:
    return dict(process.status()["store"]["leader"])


def status_command(process: ControlPlaneProcess, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "status", "--admin", process.admin_url, *args],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


async def connected_proxy(process: ControlPlaneProcess, node: str) -> tuple[grpc.aio.Channel, FakeEnvoy]:
    channel = grpc.aio.insecure_channel(f"{LOOPBACK}:{process.xds_port}")
    envoy = FakeEnvoy(channel, node, "ci-gateway")
    await envoy.send(CLUSTER)
    await envoy.ack(await envoy.recv())
    return channel, envoy


def test_two_replicas_one_leader_both_listed_failover_after_kill(tmp_path: Path, pg_dsn: str) -> None:
    with replicas(tmp_path, pg_dsn, "alpha", "beta") as running:
        alpha, beta = running["alpha"], running["beta"]
        poll_until(lambda: leader_of(alpha)["leader"] != leader_of(beta)["leader"], 15, message="one leader")
        first = alpha if leader_of(alpha)["leader"] else beta
        other = beta if first is alpha else alpha
        poll_until(lambda: leader_of(other)["holder"] == leader_of(first)["replica"], 15, message="holder known")

        async def with_a_proxy_on_the_follower() -> None:
            channel, _envoy = await connected_proxy(other, "gw-on-follower")
            try:
                # both replicas listed by either; the follower's proxy seen through the leader (next beat, 5 s)
                def fleet_seen() -> bool:
                    text = status_command(first, "--fleet")
                    return "gw-on-follower" in text and "whole fleet: 1 proxies on 2 replicas" in text

                deadline = time.monotonic() + 20
                while not await asyncio.to_thread(fleet_seen):
                    assert time.monotonic() < deadline, status_command(first, "--fleet")
                    await asyncio.sleep(0.2)  # poll interval: the registry is read once per beat
            finally:
                await channel.close()

        asyncio.run(with_a_proxy_on_the_follower())
        for process in (alpha, beta):
            text = status_command(process)
            assert "alpha" in text and "beta" in text and "this replica:" in text, text
            rows = process.status()["store"]["replicas"]["replicas"]
            assert {row["replica"] for row in rows} == {"alpha", "beta"}
            assert all(row["state"] == "up" for row in rows)
        as_json = json.loads(status_command(first, "--json", "--fleet"))
        assert {r["replica"] for r in as_json["fleet"]["replicas"]} == {"alpha", "beta"}

        assert first._proc is not None  # the process object's child: killed without warning
        first._proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        poll_until(lambda: leader_of(other)["leader"], 15, interval=0.02, message="the follower never took over")
        took = time.monotonic() - killed
        bound = leader_of(other)["bounds"]["failover_process_death"]
        print(f"\nserve killed with SIGKILL: the other replica leads after {took:.2f}s (bound {bound:g}s)")
        assert took < bound + 1.0  # round trips, a busy machine
        assert other.metric("controlplane_store_leader") == 1.0


def test_file_store_output_unchanged(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "backends.yaml").write_text(BACKENDS)
    (policy / "gateway.yaml").write_text(GATEWAY)
    with ControlPlaneProcess(policy, extra_args=("--no-exchange",), log_path=tmp_path / "cp.log") as alone:
        status = alone.status("?scope=all")
        assert "store" not in status and "fleet" not in status
        text = status_command(alone, "--fleet")
        assert "this replica" not in text and "whole fleet" not in text
        assert alone.metric("controlplane_store_leader") == 1.0


def test_without_the_exchange_an_unreachable_store_still_refuses_to_start(tmp_path: Path) -> None:
    """The registry's pool is opened before xDS is served: no exchange store, still exit 3, nothing served."""
    from tests.support.ports import free_port

    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--policy", str(tmp_path), "--state-dir", str(tmp_path / "s"),
         "--admin-address", f"{LOOPBACK}:{free_port()}", "--xds-address", f"{LOOPBACK}:{free_port()}",
         "--no-exchange", "--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"],
        env={**os.environ, "CP_STORE_DSN": f"postgresql://cp:s3cret@{LOOPBACK}:{free_port()}/cp"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert "refusing to start: PostgreSQL at" in result.stderr and "s3cret" not in result.stderr
    assert "serving xDS" not in result.stderr
