"""What the supervisor guarantees: parts stop in the reverse order they started, exactly once; a part that
ends on its own stops every other one and makes the exit non-zero; a start that fails stops what already ran."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from controlplane.cli.options import ServeOptions
from controlplane.cli.serve import serve
from controlplane.runtime.supervisor import Supervisor
from controlplane.sources.secrets import SecretsSource

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
    options = ServeOptions(
        policy=ROOT / "examples" / "quickstart",
        xds_port=0,
        admin_port=0,
        jwks_startup_wait=0.0,
        gitlab_startup_wait=0.0,
        state_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(options), 30) == 1
    assert "secrets watcher stopped (secrets watcher broke); shutting down" in caplog.text
    assert "stopped" in caplog.messages
    # The lock was released: a second serve may take the directory (it fails the same way, not "in use").
    with caplog.at_level(logging.INFO, logger="controlplane"):
        assert await asyncio.wait_for(serve(options), 30) == 1
