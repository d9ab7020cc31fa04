"""The debounced policy-directory watcher, on a real temporary directory and real inotify events.

Absence of an extra callback is proven with a sentinel write rather than a wait: callbacks are delivered in
order, so once the sentinel's callback arrives every earlier change has been delivered too, and the sentinel
must arrive alone.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.model.errors import PolicyInvalid
from controlplane.sources.policy_dir import read_policy_dir
from controlplane.sources.watch import watch_policy_dir

QUIET = 0.1
MAX_WAIT = 1.0
DEADLINE = 5.0


@dataclass
class Recorder:
    """Collects (monotonic time, changed paths) per callback."""

    calls: list[tuple[float, set[str]]] = field(default_factory=list)
    fail_next: bool = False

    async def __call__(self, changed: set[str]) -> None:
        self.calls.append((time.monotonic(), set(changed)))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("reload blew up")

    @property
    def paths(self) -> list[set[str]]:
        return [c for _, c in self.calls]


async def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)  # poll interval, bounded by the deadline


def write(path: Path, text: str = "kind: test\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@dataclass
class Watch:
    root: Path
    recorder: Recorder
    stop: asyncio.Event
    task: asyncio.Task[None]
    probes: int = 0

    async def expect_call(self, containing: str, timeout: float = DEADLINE) -> set[str]:
        """Wait for the callback whose change set contains ``containing`` and return that set."""

        def seen() -> bool:
            return any(containing in c for c in self.recorder.paths)

        await wait_until(seen, timeout, f"a callback with {containing}")
        return next(c for c in self.recorder.paths if containing in c)

    async def sentinel(self) -> None:
        """Prove nothing else is pending: a fresh write must come back as a callback of its own."""
        self.probes += 1
        name = f"sentinel-{self.probes}.yaml"
        before = len(self.recorder.calls)
        write(self.root / name)
        assert await self.expect_call(name) == {name}
        assert len(self.recorder.calls) == before + 1, self.recorder.paths[before:]
        self.recorder.calls.clear()


async def start_watch(root: Path, *, quiet: float = QUIET, max_wait: float = MAX_WAIT) -> Watch:
    recorder = Recorder()
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(watch_policy_dir(root, recorder, quiet=quiet, max_wait=max_wait, stop=stop, ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=DEADLINE)
    return Watch(root, recorder, stop, task)


async def stop_watch(watch: Watch) -> None:
    watch.stop.set()
    await asyncio.wait_for(watch.task, timeout=2.0)


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Watch]:
    root = tmp_path / "policy"
    write(root / "groups" / "prod.yaml")
    w = await start_watch(root)
    try:
        yield w
    finally:
        await stop_watch(w)


async def test_burst_of_writes_gives_one_callback(watch: Watch) -> None:
    started = time.monotonic()
    for i in range(20):
        write(watch.root / f"burst-{i}.yaml", f"n: {i}\n")
        # Paced against the clock so a late wake-up shortens the next gap instead of stretching the burst.
        await asyncio.sleep(max(0.0, started + (i + 1) * 0.0025 - time.monotonic()))  # ok: spacing writes
    assert time.monotonic() - started < QUIET, "host too loaded: the burst took longer than the quiet period"
    changed = await watch.expect_call("burst-19.yaml")
    assert changed == {f"burst-{i}.yaml" for i in range(20)}
    assert len(watch.recorder.calls) == 1
    await watch.sentinel()


async def test_rewriting_one_file_many_times_is_one_change(watch: Watch) -> None:
    started = time.monotonic()
    for i in range(20):
        write(watch.root / "groups" / "prod.yaml", f"n: {i}\n")
        await asyncio.sleep(max(0.0, started + (i + 1) * 0.002 - time.monotonic()))  # ok: spacing writes
    assert await watch.expect_call("groups/prod.yaml") == {"groups/prod.yaml"}
    await watch.sentinel()


async def test_bursts_separated_by_more_than_quiet_give_two_callbacks(watch: Watch) -> None:
    write(watch.root / "a1.yaml")
    write(watch.root / "a2.yaml")
    await asyncio.sleep(QUIET * 3)  # ok: spacing writes
    write(watch.root / "b1.yaml")
    write(watch.root / "b2.yaml")
    assert await watch.expect_call("b1.yaml") == {"b1.yaml", "b2.yaml"}
    assert watch.recorder.paths == [{"a1.yaml", "a2.yaml"}, {"b1.yaml", "b2.yaml"}]
    await watch.sentinel()


async def test_max_wait_bounds_a_continuous_stream(tmp_path: Path) -> None:
    max_wait = 0.3
    w = await start_watch(tmp_path, quiet=QUIET, max_wait=max_wait)
    try:
        first_write = time.monotonic()
        i = 0
        while time.monotonic() - first_write < 1.2:
            write(tmp_path / f"stream-{i % 5}.yaml", f"n: {i}\n")
            i += 1
            await asyncio.sleep(0.02)  # ok: spacing writes (well under quiet, so the burst never goes quiet)
        await w.expect_call(f"stream-{(i - 1) % 5}.yaml")
        times = [t for t, _ in w.recorder.calls]
        # Without max_wait there would be exactly one callback, after the stream ends (~1.3s).
        assert times[0] - first_write < max_wait + 0.15, times[0] - first_write
        assert len(times) >= 3, len(times)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps[:-1], default=0) < max_wait + 0.15, gaps
    finally:
        await stop_watch(w)


async def test_atomic_replace_is_seen_and_temp_files_are_not(watch: Watch) -> None:
    target = watch.root / "groups" / "prod.yaml"
    hidden_tmp = watch.root / "groups" / ".prod.yaml.tmp"
    hidden_tmp.write_text("v: 2\n")
    os.replace(hidden_tmp, target)
    assert await watch.expect_call("groups/prod.yaml") == {"groups/prod.yaml"}
    await watch.sentinel()

    visible_tmp = watch.root / "groups" / "prod.yaml.tmp"
    visible_tmp.write_text("v: 3\n")
    os.replace(visible_tmp, target)
    assert await watch.expect_call("groups/prod.yaml") == {"groups/prod.yaml"}
    await watch.sentinel()


async def test_ignores_hidden_editor_and_non_yaml_files(watch: Watch) -> None:
    ignored = "prod.yaml~ .#prod.yaml .prod.yaml.swp prod.yaml.swp x.tmp README.md .git/HEAD .hidden/in.yaml"
    for name in ignored.split():
        write(watch.root / name)
    (watch.root / "README.md").unlink()
    await watch.sentinel()  # the sentinel arrives alone: nothing above produced a callback


async def test_yml_suffix_counts(watch: Watch) -> None:
    write(watch.root / "other.yml")
    assert await watch.expect_call("other.yml") == {"other.yml"}


async def test_directory_moved_out_and_in(watch: Watch, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    os.rename(watch.root / "groups", outside)
    assert await watch.expect_call("groups") == {"groups"}
    await watch.sentinel()

    os.rename(outside, watch.root / "teams")
    assert await watch.expect_call("teams") == {"teams"}
    await watch.sentinel()


async def test_directory_removed(watch: Watch) -> None:
    shutil.rmtree(watch.root / "groups")
    assert await watch.expect_call("groups") == {"groups", "groups/prod.yaml"}
    await watch.sentinel()


async def test_write_to_callback_latency(watch: Watch) -> None:
    latencies = []
    for i in range(5):
        name = f"latency-{i}.yaml"
        written = time.monotonic()
        write(watch.root / name)
        await watch.expect_call(name)
        latencies.append(watch.recorder.calls[-1][0] - written)
        watch.recorder.calls.clear()
    median, worst = statistics.median(latencies) * 1000, max(latencies) * 1000
    print(f"write->callback latency (quiet={QUIET}s): median {median:.0f} ms, max {worst:.0f} ms")
    assert max(latencies) < 0.4, latencies
    assert min(latencies) >= QUIET, latencies  # the quiet period is actually waited for


async def test_handler_failure_does_not_stop_watching(watch: Watch) -> None:
    watch.recorder.fail_next = True
    write(watch.root / "bad.yaml")
    await watch.expect_call("bad.yaml")
    write(watch.root / "fixed.yaml")
    assert await watch.expect_call("fixed.yaml") == {"fixed.yaml"}


async def test_stops_promptly(tmp_path: Path) -> None:
    w = await start_watch(tmp_path)
    started = time.monotonic()
    w.stop.set()
    await asyncio.wait_for(w.task, timeout=1.0)
    assert time.monotonic() - started < 0.3


async def test_stop_drops_a_pending_burst(tmp_path: Path) -> None:
    w = await start_watch(tmp_path, quiet=0.5, max_wait=1.0)
    write(tmp_path / "late.yaml")  # quiet is 0.5s, so this burst is still open when stop is set
    w.stop.set()
    await asyncio.wait_for(w.task, timeout=1.0)
    assert w.recorder.calls == []


async def test_root_symlink_swap_rewatches_new_directory(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    write(v1 / "old.yaml")
    write(v2 / "new.yaml")
    root = tmp_path / "current"
    root.symlink_to(v1)
    w = await start_watch(root)
    try:
        (tmp_path / "next").symlink_to(v2)
        os.replace(tmp_path / "next", root)
        changed = await w.expect_call("new.yaml")
        assert {"old.yaml", "new.yaml"} <= changed
        w.recorder.calls.clear()
        write(v2 / "after.yaml")  # only seen if the watch moved to v2
        assert await w.expect_call("after.yaml") == {"after.yaml"}
    finally:
        await stop_watch(w)


async def test_kubernetes_configmap_update(tmp_path: Path) -> None:
    """ConfigMap volumes: visible files link through a hidden ``..data`` symlink, swapped atomically."""
    write(tmp_path / "..v1" / "policy.yaml", "v: 1\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    w = await start_watch(tmp_path)
    try:
        write(tmp_path / "..v2" / "policy.yaml", "v: 2\n")
        (tmp_path / "..data_tmp").symlink_to("..v2")
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
        shutil.rmtree(tmp_path / "..v1")
        changed = await w.expect_call("policy.yaml")
        assert "policy.yaml" in changed
        assert not any(p.startswith("..") for p in changed)
    finally:
        await stop_watch(w)


async def test_ready_means_no_write_is_missed(tmp_path: Path) -> None:
    """Edits made right after ``ready`` must be seen: this is what makes load-after-ready race free."""
    for i in range(10):
        w = await start_watch(tmp_path, quiet=0.02, max_wait=0.1)
        try:
            write(tmp_path / f"early-{i}.yaml")
            assert await w.expect_call(f"early-{i}.yaml") == {f"early-{i}.yaml"}
        finally:
            await stop_watch(w)


async def test_missing_root_fails_fast(tmp_path: Path) -> None:
    async def noop(_changed: set[str]) -> None:
        return None

    with pytest.raises(FileNotFoundError):
        await asyncio.wait_for(watch_policy_dir(tmp_path / "absent", noop, stop=asyncio.Event()), timeout=DEADLINE)


def test_rejects_max_wait_below_quiet(tmp_path: Path) -> None:
    async def noop(_changed: set[str]) -> None:
        return None

    with pytest.raises(ValueError, match="quiet"):
        asyncio.run(watch_policy_dir(tmp_path, noop, quiet=0.5, max_wait=0.1, stop=asyncio.Event()))


async def test_a_fifo_in_the_tree_neither_blocks_the_reload_nor_stops_later_edits(tmp_path: Path) -> None:
    """A named pipe saved as p.yaml froze every later reload (the read waited for a writer that never came)."""
    root = tmp_path / "policy"
    write(root / "a.yaml", "kind: a\n")
    outcomes: list[str] = []

    async def reload(changed: set[str]) -> None:
        try:
            texts = await asyncio.wait_for(asyncio.to_thread(read_policy_dir, root), timeout=DEADLINE)
            outcomes.append("ok: " + ", ".join(sorted(texts)))
        except PolicyInvalid as invalid:
            outcomes.append("; ".join(str(e) for e in invalid.errors))

    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(watch_policy_dir(root, reload, quiet=QUIET, max_wait=MAX_WAIT, stop=stop, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), timeout=DEADLINE)
        os.mkfifo(root / "p.yaml")
        await wait_until(lambda: bool(outcomes), what="the reload after the FIFO appeared")
        assert outcomes == ["p.yaml:1: not a regular file (a named pipe): only regular files are read"]
        (root / "p.yaml").unlink()
        write(root / "b.yaml", "kind: b\n")
        await wait_until(lambda: outcomes[-1] == "ok: a.yaml, b.yaml", what="the later edit")
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=DEADLINE)
