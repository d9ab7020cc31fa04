"""Debounced watching of the policy directory, so one ``git pull`` or editor save means one reload.

watchfiles' own debounce (1600 ms by default) would add over a second to every policy change. Instead its rust
loop is run with a short step and debounce, which makes it hand over raw batches within a step or two of each
write, and the burst logic lives here where ``quiet`` and ``max_wait`` can be honoured precisely:

* the callback fires once ``quiet`` seconds pass with no relevant change, so write-to-reload latency is about
  ``quiet`` plus one or two steps;
* it never waits more than ``max_wait`` after the first change of a burst, so a process rewriting files in a
  loop cannot starve reloads.

Only changes that can alter the policy count: YAML files, and directories appearing or disappearing (a
directory moved in or out produces a single event for the directory, none for the files in it). Hidden
entries and editor droppings are ignored, with one exception: Kubernetes ConfigMap volumes publish updates by
swapping a hidden ``..data`` symlink, which is reported as a change of every YAML file in the tree.

If the root itself is replaced (a symlink repointed, or a new directory renamed into place), the kernel watch
still follows the old directory; the root's identity is therefore re-checked whenever the watcher is idle and
the watch is restarted on the new directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from watchfiles import Change, awatch

log = logging.getLogger(__name__)

YAML_SUFFIXES = (".yaml", ".yml")
TEMP_SUFFIXES = ("~", ".swp", ".tmp")
KUBERNETES_DATA_LINK = "..data"
ROOT_CHECK_INTERVAL = 1.0
"""Seconds between checks that the root directory is still the one being watched (only while idle)."""
DEFAULT_QUIET = 0.1
"""Seconds of quiet that end a burst of changes (serve's `--debounce`)."""
DEFAULT_MAX_WAIT = 1.0
"""Longest a burst is collected while writes keep coming (serve's `--max-wait`)."""

OnChange = Callable[[set[str]], Awaitable[None]]
RootId = tuple[int, int]


async def watch_policy_dir(
    root: Path,
    on_change: OnChange,
    *,
    quiet: float = DEFAULT_QUIET,
    max_wait: float = DEFAULT_MAX_WAIT,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Call ``on_change`` once per burst of policy changes under ``root`` until ``stop`` is set.

    ``on_change`` receives the changed paths relative to ``root`` (POSIX separators); a directory that
    appeared or vanished is listed under its own path, since a moved directory's files get no events of
    their own. Calls never overlap: changes made while it runs start the next burst. An exception from
    ``on_change`` is logged and watching continues, because one failed reload must not stop later fixes from
    being picked up. A burst still being collected when ``stop`` is set is dropped.

    ``ready``, if given, is set once the kernel watch is live. A caller that loads the policy after that
    point cannot miss an edit made between its load and the start of watching.
    """
    if quiet <= 0 or max_wait < quiet:
        raise ValueError(f"need 0 < quiet <= max_wait, got quiet={quiet} max_wait={max_wait}")
    base = Path(os.path.abspath(root))
    swapped: set[str] = set()
    while not stop.is_set():
        async with _Session(base, step_ms=_step_ms(quiet)) as session:
            if ready is not None:
                ready.set()
            if swapped:
                # Delivered only now that the new root is watched, so edits made after it are not lost.
                await _deliver(on_change, swapped)
            swapped = await _run_session(session, on_change, quiet=quiet, max_wait=max_wait, stop=stop)


def _step_ms(quiet: float) -> int:
    """watchfiles' polling step: fine enough to add only a few ms to ``quiet``, never a busy loop."""
    return max(5, min(50, round(quiet * 1000 / 10)))


async def _run_session(
    session: _Session, on_change: OnChange, *, quiet: float, max_wait: float, stop: asyncio.Event
) -> set[str]:
    """Deliver bursts until ``stop`` is set, or the root is replaced.

    On replacement it returns the paths to report, for the caller to deliver once the new root is watched.
    """
    loop = asyncio.get_running_loop()
    while True:
        first = await session.next_changes(stop, deadline=loop.time() + ROOT_CHECK_INTERVAL)
        if stop.is_set():
            return set()
        if first is None:
            if session.root_replaced():
                log.debug("policy root %s was replaced; re-watching it", session.root)
                return session.yaml_files_before_and_after()
            continue
        changed = await _collect_burst(session, first, quiet=quiet, max_wait=max_wait, stop=stop)
        if stop.is_set():
            return set()
        await _deliver(on_change, changed)


async def _collect_burst(
    session: _Session, first: set[str], *, quiet: float, max_wait: float, stop: asyncio.Event
) -> set[str]:
    """Accumulate changes until ``quiet`` passes without one, or ``max_wait`` since the burst began.

    watchfiles only hands over a batch after a whole step with no new event, so the newest change in it is at
    least one step old: timing from "now - step" is still conservative and saves that step of latency.
    """
    loop = asyncio.get_running_loop()
    changed = set(first)
    burst_deadline = loop.time() - session.step + max_wait
    while True:
        deadline = min(loop.time() - session.step + quiet, burst_deadline)
        more = await session.next_changes(stop, deadline=deadline)
        if more is None:
            return changed
        changed |= more


async def _deliver(on_change: OnChange, changed: set[str]) -> None:
    log.debug("policy change: %s", ", ".join(sorted(changed)))
    try:
        await on_change(changed)
    except Exception:
        log.exception("policy change handler failed; still watching %s", ", ".join(sorted(changed)))


class _Session:
    """One watchfiles watch on one incarnation of the root, plus the bookkeeping needed to filter it."""

    def __init__(self, root: Path, *, step_ms: int) -> None:
        self.root = root
        self.step = step_ms / 1000
        self._step_ms = step_ms
        self._root_id = _root_id(root)
        self._dirs = set(_scan_dirs(root))
        self._initial_yaml = set(_scan_yaml(root))
        self._queue: asyncio.Queue[set[tuple[Change, str]]] = asyncio.Queue()
        self._stop_pump = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Session:
        self._pump = asyncio.create_task(self._run_pump(), name=f"watch {self.root}")
        # awatch builds its RustNotify, which installs the inotify watches synchronously, in the first step
        # of the pump task; yielding once lets that step run, so the watch is live when this returns.
        await asyncio.sleep(0)
        if self._pump.done():
            self._pump.result()  # e.g. FileNotFoundError for a missing root: fail now, not on first change
        return self

    async def __aexit__(self, *_exc: object) -> None:
        pump, self._pump = self._pump, None
        if pump is None:
            return
        # watchfiles' rust loop sees this event within one step; cancelling it instead would also set our
        # event (awatch does that on cancellation) but only after the same wait.
        self._stop_pump.set()
        try:
            await asyncio.wait_for(pump, timeout=1.0)
        except TimeoutError:
            log.debug("watch on %s did not stop within 1s; abandoning it", self.root)
        except Exception:
            log.debug("watch on %s ended with an error", self.root, exc_info=True)

    async def _run_pump(self) -> None:
        """Forward raw batches; ``debounce == step`` makes watchfiles return within ~2 steps of a change."""
        async for batch in awatch(
            self.root,
            watch_filter=None,
            debounce=self._step_ms,
            step=self._step_ms,
            stop_event=self._stop_pump,
        ):
            self._queue.put_nowait(batch)

    async def next_changes(self, stop: asyncio.Event, *, deadline: float) -> set[str] | None:
        """The next batch of relevant changes, or None at ``deadline`` or when ``stop`` is set.

        Irrelevant batches (a swap file, a hidden directory) are swallowed without moving the deadline, so
        they neither start nor prolong a burst.
        """
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            batch = await self._next_batch(stop, remaining)
            if batch is None:
                return None
            relevant = self._relevant(batch)
            if relevant:
                return relevant
        return None

    async def _next_batch(self, stop: asyncio.Event, timeout: float) -> set[tuple[Change, str]] | None:
        assert self._pump is not None, "session not entered"
        getter = asyncio.ensure_future(self._queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({getter, stopper, self._pump}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
            stopper.cancel()
        if self._pump.done() and not stop.is_set():
            self._pump.result()  # re-raise a watch failure rather than silently going deaf
            raise RuntimeError(f"watch on {self.root} ended unexpectedly")
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None

    def _relevant(self, batch: set[tuple[Change, str]]) -> set[str]:
        changed: set[str] = set()
        for change, path in batch:
            rel = _relative(self.root, path)
            if rel is not None:
                changed |= self._classify(change, rel)
        return changed

    def _classify(self, change: Change, rel: str) -> set[str]:
        """Map one raw change to the policy paths it affects (usually itself, often nothing)."""
        parts = rel.split("/")
        if parts[0] == KUBERNETES_DATA_LINK and len(parts) == 1:
            return set(_scan_yaml(self.root))
        if _ignored_name(parts):
            return set()
        if rel.lower().endswith(YAML_SUFFIXES):
            return {rel}
        return self._directory_change(change, rel)

    def _directory_change(self, change: Change, rel: str) -> set[str]:
        """Directories only matter when they appear or vanish, taking any YAML inside with them."""
        if change == Change.added and (self.root / rel).is_dir():
            self._dirs.add(rel)
            self._dirs.update(f"{rel}/{d}" for d in _scan_dirs(self.root / rel))
            return {rel}
        if change == Change.deleted and rel in self._dirs:
            self._dirs = {d for d in self._dirs if d != rel and not d.startswith(rel + "/")}
            return {rel}
        return set()

    def root_replaced(self) -> bool:
        current = _root_id(self.root)
        return current is not None and current != self._root_id

    def yaml_files_before_and_after(self) -> set[str]:
        """After a root swap, everything that existed in either tree may have changed."""
        return self._initial_yaml | set(_scan_yaml(self.root))


def _root_id(root: Path) -> RootId | None:
    """Device and inode of the directory ``root`` resolves to now; None while it is missing mid-swap."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _relative(root: Path, path: str) -> str | None:
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        return None
    return rel.replace(os.sep, "/")


def _ignored_name(parts: list[str]) -> bool:
    """Hidden anywhere in the path (covers ``.#*``), or an editor/atomic-write temporary (``*~`` etc.)."""
    return any(p.startswith(".") for p in parts) or parts[-1].endswith(TEMP_SUFFIXES)


def _walk_visible(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk that skips hidden directories (which also keeps Kubernetes' ``..2024_*`` copies out)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        yield ("" if rel == "." else rel.replace(os.sep, "/") + "/"), dirnames, filenames


def _scan_dirs(root: Path) -> Iterator[str]:
    for prefix, dirnames, _ in _walk_visible(root):
        yield from (prefix + d for d in dirnames)


def _scan_yaml(root: Path) -> Iterator[str]:
    for prefix, _, filenames in _walk_visible(root):
        yield from (prefix + f for f in filenames if f.lower().endswith(YAML_SUFFIXES) and not _ignored_name([f]))
