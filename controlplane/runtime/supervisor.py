"""Starts the parts of a long-running process in order and stops them in reverse, exactly once.

A part is started (or merely built) and, in the same breath, its stop is registered: if a later part fails to
start, everything already running is stopped before the error leaves `serve`, and on SIGTERM the whole
process comes down in the reverse of the order it came up (the xDS streams drained while the inputs that feed
them still exist). A background task that ends on its own, crashed or not, is a failure of the process: a
half-alive server (following no policy edits, sweeping no finished jobs) is worse than a restart, so the
supervisor stops everything and `failed` says so (a non-zero exit). That holds for the loops `serve` starts
(`run`) and for those the parts start per issuer (`spawn`, handed to them in their constructor); a task its
owner cancels on purpose (an issuer left the policy) did not fail.

Starting stops as soon as stopping begins (a part failed, or SIGTERM): what is not started yet never is, so a
crashed input never leads to serving xDS. A stop that raises is logged and makes the exit non-zero; the others
still run. Stopping as a whole is bounded (`stop_deadline`): what has not stopped by then is abandoned and the
process exits at once with 1, as it does (128 + the signal) on a second SIGTERM or SIGINT; a stop may hang in a
thread, which nothing in the process can interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

log = logging.getLogger("controlplane")

T = TypeVar("T")

# Seconds every stop together may take: more than the xDS drain (`ServeOptions.shutdown_grace`), less than the
# 30 s an orchestrator (Kubernetes' default grace period) waits before SIGKILL, so the log says what hung.
DEFAULT_STOP_DEADLINE = 15.0

Stop = Callable[[], Awaitable[object] | object]


class Spawn(Protocol):
    """Starts a background task its caller owns (`asyncio.create_task`'s shape): `Supervisor.spawn` in `serve`."""

    def __call__(self, loop: Coroutine[Any, Any, None], /, *, name: str) -> asyncio.Task[None]: ...


class StartAbandoned(Exception):
    """Stopping began while starting (a part failed, or a stop was asked for): the rest is not started."""


def _exit_now(code: int) -> None:
    logging.shutdown()  # the line saying why must reach the log before the process goes
    os._exit(code)


class Supervisor:
    """`async with Supervisor() as parts:` then `parts.start(...)`, `parts.run(...)`, `await parts.wait()`."""

    def __init__(
        self, *, stop_deadline: float = DEFAULT_STOP_DEADLINE, exit_now: Callable[[int], None] = _exit_now
    ) -> None:
        self.stopping = asyncio.Event()  # the loops' common stop signal: set first when stopping begins
        self.failed: str | None = None  # which part ended on its own or failed to stop, and why
        self.stop_deadline = stop_deadline
        self._exit_now = exit_now  # exits the process without waiting for anything (a test records the code)
        self._stops: list[tuple[str, Stop]] = []
        self._signals: list[int] = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        self.stopping.set()
        try:
            await self._stop_all()
        finally:
            loop = asyncio.get_running_loop()
            for signum in self._signals:
                loop.remove_signal_handler(signum)
        return isinstance(error, StartAbandoned)  # stopping early is no error; a failed start stays one

    def enter(self, context: contextlib.AbstractContextManager[T], *, name: str) -> T:
        """A part that is a context manager (held, e.g. a lock): released in its turn when stopping."""
        held = context.__enter__()
        self.on_stop(lambda: context.__exit__(None, None, None), name=name)
        return held

    def on_stop(self, stop: Stop, *, name: str | None = None) -> None:
        """What stops a part already built or started (a coroutine function or a plain one); stops run in the
        reverse order of registration. `name` is what a log line calls it (default: the function's name)."""
        self._stops.append((name or str(getattr(stop, "__qualname__", "a stop")), stop))

    async def start(self, start: Awaitable[T], stop: Stop, *, name: str | None = None) -> T:
        """Start a part and register its stop (only once it started: a failed start has nothing to stop)."""
        self._refuse_if_stopping(start)
        result = await start
        self.on_stop(stop, name=name)
        self._refuse_if_stopping()
        return result

    async def step(self, step: Awaitable[T]) -> T:
        """A start-up step that may take long (a first load, waiting for first keys): abandoned, and the rest of
        the start with it, the moment stopping begins."""
        self._refuse_if_stopping(step)
        task = asyncio.ensure_future(step)
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            stopping.cancel()
        if self.stopping.is_set():
            task.cancel()
            task.add_done_callback(_retrieve)  # what it raises now is no longer anyone's business
            raise StartAbandoned(self.failed or "stop requested")
        return task.result()

    def run(self, name: str, loop: Coroutine[Any, Any, None], *, cancel: bool = False) -> asyncio.Task[None]:
        """A background loop that runs until `stopping` is set. When stopping, it is waited for (or, with
        `cancel`, cancelled: a loop that may wait long on something external); ending before that stops all."""
        self._refuse_if_stopping(loop)
        task = self.spawn(loop, name=name)
        self.on_stop(lambda: _join(task, cancel=cancel), name=name)
        return task

    def spawn(self, loop: Coroutine[Any, Any, None], /, *, name: str) -> asyncio.Task[None]:
        """A background task whose owner stops it (by cancelling it, or with its own stop registered here):
        ending in any other way while the process runs is a failure, as for `run`."""
        task = asyncio.create_task(loop, name=name)
        task.add_done_callback(self._ended)
        return task

    def stop_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """The first SIGTERM or SIGINT stops in order (exit 0); a second exits at once (128 + the signal)."""
        loop = asyncio.get_running_loop()
        for signum in signals:
            loop.add_signal_handler(signum, self._signalled, signum)
            self._signals.append(signum)

    def request_stop(self) -> None:
        """SIGTERM, SIGINT: stop in order, exit 0."""
        self.stopping.set()

    async def wait(self) -> None:
        """Until a stop is requested or a part fails."""
        await self.stopping.wait()

    def _signalled(self, signum: int) -> None:
        if not self.stopping.is_set():
            self.request_stop()
            return
        log.critical("%s while stopping: exiting now, without waiting for the stops", signal.Signals(signum).name)
        self._exit_now(128 + signum)

    def _refuse_if_stopping(self, unstarted: Awaitable[object] | None = None) -> None:
        if not self.stopping.is_set():
            return
        if inspect.iscoroutine(unstarted):
            unstarted.close()  # never awaited, on purpose
        raise StartAbandoned(self.failed or "stop requested")

    def _ended(self, task: asyncio.Task[None]) -> None:
        # Cancelled, or asked to be (3.11's wait_for can turn a cancel into a return): its owner stopped it.
        if task.cancelled() or task.cancelling() or self.stopping.is_set():
            return
        error = task.exception()
        self._fail(f"{task.get_name()} stopped ({error or 'returned'})")
        log.critical("%s; shutting down so a supervisor restarts us", self.failed)
        self.stopping.set()

    def _fail(self, reason: str) -> None:
        self.failed = reason if self.failed is None else f"{self.failed}; {reason}"

    async def _stop_all(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_deadline
        while self._stops:
            name, stop = self._stops.pop()
            limit = asyncio.timeout_at(deadline)
            try:
                async with limit:
                    await _call(stop)
            except Exception as error:  # the other parts still stop; the exit says one did not
                if limit.expired():
                    self._abandon([name, *(waiting for waiting, _ in reversed(self._stops))])
                    return
                text = " ".join(str(error).split())[:200]
                self._fail(f"stopping {name} failed ({type(error).__name__}: {text})")
                log.error("stopping %s failed: %s: %s", name, type(error).__name__, text)

    def _abandon(self, names: list[str]) -> None:
        self._stops.clear()
        self._fail(f"stopping took longer than {self.stop_deadline:g}s")
        log.critical(
            "stopping took longer than %gs: %d stop(s) abandoned (%s); exiting now",
            self.stop_deadline,
            len(names),
            ", ".join(names),
        )
        self._exit_now(1)


async def _call(stop: Stop) -> None:
    result = stop()
    if inspect.isawaitable(result):
        await result


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _join(task: asyncio.Task[None], *, cancel: bool) -> None:
    if cancel:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
