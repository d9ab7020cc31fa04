"""What the supervisor guarantees: parts stop in the reverse order they started, exactly once; a part that
ends on its own (a loop `serve` runs, or a watcher or key fetcher a part spawned) stops every other one and makes
the exit non-zero; a start that fails stops what already ran, and starting ends once a part failed; a stop that
fails is logged and makes the exit non-zero; stopping is bounded, and a second signal exits at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest

from controlplane.cli.options import ServeOptions
from controlplane.cli.serve import serve
from controlplane.model.inventory import Inventory
from controlplane.runtime.gitlab_link import GitLabLink
from controlplane.runtime.keyrelay import KeyRelay
from controlplane.runtime.supervisor import DEFAULT_STOP_DEADLINE, StartAbandoned, Supervisor
from controlplane.sources.jwks import JwksFetcher
from controlplane.sources.secrets import SecretsSource
from tests.compiled import policy_of
from tests.support.backends import http_request
from tests.support.policy_parts import MAIN_GITLAB, TWO_GITLABS
from tests.support.ports import LOOPBACK, free_port, poll_until

ROOT = Path(__file__).resolve().parent.parent


class Part:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def start(self) -> str:
        self.log.append(f"start {self.name}")
        return self.name

    async def stop(self) -> None:
        self.log.append(f"stop {self.name}")


async def _loop(name: str, log: list[str], stopping: asyncio.Event) -> None:
    await stopping.wait()
    log.append(f"loop {name} ended")


async def test_parts_stop_in_the_reverse_order_of_their_start_when_asked() -> None:
    log: list[str] = []
    async with Supervisor() as parts:
        assert await parts.start(Part("a", log).start(), Part("a", log).stop) == "a"
        parts.run("loop b", _loop("b", log, parts.stopping))
        parts.on_stop(lambda: log.append("stop c"))  # a plain function is a stop too
        await parts.start(Part("d", log).start(), Part("d", log).stop)
        asyncio.get_running_loop().call_soon(parts.request_stop)
        await parts.wait()
    assert log == ["start a", "start d", "stop d", "stop c", "loop b ended", "stop a"]
    assert parts.failed is None


async def test_a_part_that_fails_stops_the_others_and_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []

    async def crash() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("disk gone")

    with caplog.at_level(logging.CRITICAL, logger="controlplane"):
        async with Supervisor() as parts:
            await parts.start(Part("a", log).start(), Part("a", log).stop)
            parts.run("loop b", _loop("b", log, parts.stopping))
            parts.run("watcher", crash())
            await asyncio.wait_for(parts.wait(), 5)  # returns because of the crash: nobody asked to stop
    assert log == ["start a", "loop b ended", "stop a"]
    assert parts.failed == "watcher stopped (disk gone)"
    assert "watcher stopped (disk gone); shutting down" in caplog.text


async def test_a_loop_that_returns_early_is_a_failure_too() -> None:
    async def gives_up() -> None:
        return None

    async with Supervisor() as parts:
        parts.run("poller", gives_up())
        await asyncio.wait_for(parts.wait(), 5)
    assert parts.failed == "poller stopped (returned)"


async def test_a_start_that_fails_stops_what_already_started_and_raises() -> None:
    log: list[str] = []

    async def refuse() -> None:
        raise OSError("address in use")

    with pytest.raises(OSError, match="address in use"):
        async with Supervisor() as parts:
            await parts.start(Part("a", log).start(), Part("a", log).stop)
            parts.run("loop b", _loop("b", log, parts.stopping))
            await parts.start(refuse(), Part("never", log).stop)
    assert log == ["start a", "loop b ended", "stop a"]


async def test_a_cancelled_loop_is_not_waited_for() -> None:
    """A sweep waiting on GitLab's retries must not hold the shutdown."""
    async with Supervisor() as parts:
        task = parts.run("sweep", asyncio.sleep(3600), cancel=True)
        parts.request_stop()
    assert task.cancelled()
    assert parts.failed is None


async def test_serve_exits_non_zero_and_stops_everything_when_a_part_crashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a half-alive server: the secrets watcher dying takes the whole process down, the state dir released."""

    async def crash(self: SecretsSource, stop: asyncio.Event) -> None:
        raise RuntimeError("secrets watcher broke")

    monkeypatch.setattr(SecretsSource, "run", crash)
    options = _serve_options(tmp_path)
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(options), 30) == 1
    assert "secrets watcher stopped (secrets watcher broke); shutting down" in caplog.text
    assert "stopped" in caplog.messages
    # The lock was released: a second serve may take the directory (it fails the same way, not "in use").
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(options), 30) == 1


async def test_starting_ends_once_a_part_failed_and_nothing_after_it_starts() -> None:
    """A crashed input never leads to serving xDS: the step under way is abandoned, later starts refused."""
    log: list[str] = []
    crashed = asyncio.Event()

    async def crash() -> None:
        crashed.set()
        raise RuntimeError("input broke")

    async with Supervisor() as parts:
        await parts.start(Part("a", log).start(), Part("a", log).stop)
        parts.run("input", crash())
        with pytest.raises(StartAbandoned):
            await parts.step(asyncio.sleep(3600))  # e.g. waiting for first keys: not waited out
        with pytest.raises(StartAbandoned):
            await parts.start(Part("xds", log).start(), Part("xds", log).stop)
        with pytest.raises(StartAbandoned):
            parts.run("later loop", _loop("later", log, parts.stopping))
    assert crashed.is_set()
    assert log == ["start a", "stop a"]
    assert parts.failed == "input stopped (input broke)"


async def test_a_start_abandoned_ends_the_block_without_an_error() -> None:
    """`serve` raises `StartAbandoned` out of its start; the supervisor takes it as the stop it is."""
    async with Supervisor() as parts:
        parts.request_stop()
        await parts.step(asyncio.sleep(0))
    assert parts.failed is None


async def test_a_stop_that_fails_is_logged_the_others_still_run_and_the_exit_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []

    async def broken() -> None:
        raise RuntimeError("disk\nfull")

    with caplog.at_level(logging.ERROR, logger="controlplane"):
        async with Supervisor() as parts:
            await parts.start(Part("a", log).start(), Part("a", log).stop)
            parts.on_stop(broken, name="audit store")
            await parts.start(Part("b", log).start(), Part("b", log).stop)
            parts.request_stop()
    assert log == ["start a", "start b", "stop b", "stop a"]
    assert parts.failed == "stopping audit store failed (RuntimeError: disk full)"
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == "stopping audit store failed: RuntimeError: disk full"
    assert record.exc_info is None  # one line, no traceback


async def test_stopping_is_bounded_what_hangs_is_abandoned_and_the_process_exits_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    exits: list[int] = []
    hung = asyncio.Event()

    async def hangs() -> None:
        hung.set()
        await asyncio.sleep(3600)

    started = time.monotonic()
    with caplog.at_level(logging.CRITICAL, logger="controlplane"):
        async with Supervisor(stop_deadline=0.2, exit_now=exits.append) as parts:
            await parts.start(Part("a", log).start(), Part("a", log).stop)
            parts.on_stop(hangs, name="xDS server")
            await parts.start(Part("b", log).start(), Part("b", log).stop)
            parts.request_stop()
    assert hung.is_set() and time.monotonic() - started < 5
    assert log == ["start a", "start b", "stop b"]  # a is abandoned: the process exits
    assert exits == [1]
    assert parts.failed == "stopping took longer than 0.2s"
    assert "stopping took longer than 0.2s: 2 stop(s) abandoned (xDS server, Part.stop); exiting now" in caplog.text


def test_the_stop_deadline_outlasts_the_xds_drain() -> None:
    assert ServeOptions.stop_deadline == DEFAULT_STOP_DEADLINE > ServeOptions.shutdown_grace
    with pytest.raises(ValueError, match="must exceed shutdown_grace"):
        ServeOptions(policy=Path("p"), shutdown_grace=20.0)


class _Inventories:
    """A GitLab that answers every read with an empty inventory."""

    def fetch_inventory(self, *, groups: Iterable[str | int], projects: Iterable[str | int]) -> Inventory:
        return Inventory(fetched_at=1.0)

    def fetch_project(self, project: str | int) -> None:
        return None


async def test_a_gitlab_watcher_that_dies_stops_the_process() -> None:
    """An inventory watcher whose `on_change` raises (inside `_tell`) no longer leaves a half-alive server."""

    async def recompile() -> None:
        raise RuntimeError("recompile broke")

    async with Supervisor() as parts:
        link = GitLabLink(on_inventory_change=recompile, spawn=parts.spawn, source_factory=lambda api: _Inventories())
        parts.on_stop(link.stop)
        link.follow(policy_of(issuers=MAIN_GITLAB), {})
        await asyncio.wait_for(parts.wait(), 10)
    assert parts.failed == "gitlab-watch-main stopped (recompile broke)"


async def test_a_gitlab_watcher_unwatched_on_purpose_is_no_failure() -> None:
    changes = asyncio.Event()

    async def recompile() -> None:
        changes.set()

    async with Supervisor() as parts:
        link = GitLabLink(on_inventory_change=recompile, spawn=parts.spawn, source_factory=lambda api: _Inventories())
        parts.on_stop(link.stop)
        link.follow(policy_of(issuers=TWO_GITLABS), {})
        await asyncio.wait_for(changes.wait(), 10)
        link.follow(policy_of(issuers=MAIN_GITLAB), {})  # "other" left the policy
        await asyncio.sleep(0)  # the cancelled watcher ends (a turn of the loop, not a wait for time)
        assert not parts.stopping.is_set()
        parts.request_stop()
    assert parts.failed is None


RELAYED = (
    "kind: Issuer\nname: oidc\ntype: oidc\nurl: https://oidc.example.com\njwks_uri: https://oidc.example.com/keys\n"
)


class _Fetcher:
    """Stands in for `JwksFetcher`: `run` raises `crash`, or waits for its stop as the real one does."""

    crash: str | None = None

    def __init__(self, issuer_url: str, **options: object) -> None:
        self.name, self.refresh_interval, self.document = str(options["name"]), 30.0, None
        self.settled = asyncio.Event()

    async def run(self, stop: asyncio.Event, on_change: object) -> None:
        if self.crash is not None:
            raise RuntimeError(self.crash)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 3600)

    async def close(self) -> None:
        return None


async def test_a_jwks_fetcher_that_dies_stops_the_process_one_no_longer_relayed_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def set_keys(keys: object) -> None:
        return None

    issuers = policy_of(issuers=RELAYED).issuers
    async with Supervisor() as parts:
        relay = KeyRelay(set_keys, spawn=parts.spawn, fetcher_factory=_Fetcher)  # type: ignore[arg-type]
        parts.on_stop(relay.stop)
        await relay.update(issuers)
        await relay.update([])  # no longer relayed: cancelled on purpose
        await asyncio.sleep(0)
        assert not parts.stopping.is_set()
        monkeypatch.setattr(_Fetcher, "crash", "keys broke")
        await relay.update(issuers)
        await asyncio.wait_for(parts.wait(), 10)
    assert parts.failed == "jwks-oidc stopped (keys broke)"


def _serve_options(tmp_path: Path) -> ServeOptions:
    return ServeOptions(
        policy=ROOT / "examples" / "quickstart",
        xds_port=0,
        admin_port=0,
        jwks_startup_wait=0.0,
        gitlab_startup_wait=0.0,
        state_dir=tmp_path,
    )


async def test_serve_exits_1_when_a_key_fetcher_dies_and_never_serves_xds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(self: JwksFetcher, stop: asyncio.Event, on_change: object) -> None:
        raise RuntimeError("jwks fetcher broke")

    monkeypatch.setattr(JwksFetcher, "run", crash)
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(_serve_options(tmp_path)), 30) == 1
    assert "jwks-gitlab stopped (jwks fetcher broke); shutting down" in caplog.text
    assert "serving xDS" not in caplog.text


async def test_serve_logs_a_stop_that_fails_and_exits_1_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(self: SecretsSource, stop: asyncio.Event) -> None:
        raise RuntimeError("secrets watcher broke")

    async def broken_stop(self: GitLabLink) -> None:
        raise OSError("stop broke")

    monkeypatch.setattr(SecretsSource, "run", crash)
    monkeypatch.setattr(GitLabLink, "stop", broken_stop)
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(_serve_options(tmp_path)), 30) == 1
    assert "stopping GitLab watchers failed: OSError: stop broke" in caplog.messages
    assert "stopped" in caplog.messages


# `serve` whose audit store never finishes closing: only a second signal (or the stop deadline) ends it.
HANGING_STOP = """
import sys, threading
from controlplane.audit.store import AuditStore
from controlplane.cli.main import main
AuditStore.close = lambda self: threading.Event().wait(600)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    admin = free_port()
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-c", HANGING_STOP, "serve",
        "--policy", str(ROOT / "examples" / "quickstart"), "--no-exchange", "--state-dir", str(tmp_path / "state"),
        "--xds-address", f"{LOOPBACK}:{free_port()}", "--admin-address", f"{LOOPBACK}:{admin}",
    ]  # fmt: skip

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(OSError):
            return http_request(f"http://{LOOPBACK}:{admin}/readyz", timeout=1.0).status == 200
        return False

    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        poll_until(ready, 30, interval=0.05, message="serve ready")
        proc.send_signal(sig)
        poll_until(lambda: "draining xDS streams" in log.read_text(), 10, message="stopping began")
        proc.send_signal(sig)
        assert proc.wait(DEFAULT_STOP_DEADLINE / 2) == 128 + sig, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert f"{sig.name} while stopping: exiting now" in log.read_text()


@pytest.mark.parametrize("taken", ["xds_port", "admin_port"])
async def test_a_part_that_cannot_start_is_one_log_line_and_exit_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, taken: str
) -> None:
    """A port already in use is an operator's mistake with a clear cause: one line naming it, no traceback."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        port = holder.getsockname()[1]
        options = replace(_serve_options(tmp_path), **{taken: port})
        with caplog.at_level(logging.INFO, logger="controlplane"):
            assert await asyncio.wait_for(serve(options), 30) == 1
    failed = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(failed) == 1 and str(port) in failed[0].getMessage(), caplog.text
    assert not any(r.exc_info for r in caplog.records), caplog.text
    assert "serving xDS" not in caplog.text
