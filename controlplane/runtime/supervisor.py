"""Starts the parts of a long-running process in order and stops them in reverse, exactly once.

A part is started (or merely built) and, in the same breath, its stop is registered: if a later part fails to
start, everything already running is stopped before the error leaves `serve`, and on SIGTERM the whole
process comes down in the reverse of the order it came up (the xDS streams drained while the inputs that feed
them still exist). A background loop that ends on its own, crashed or not, is a failure of the process: a
half-alive server (following no policy edits, sweeping no finished jobs) is worse than a restart, so the
supervisor stops everything and `failed` says so (a non-zero exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger("controlplane")

T = TypeVar("T")


class Supervisor:
    """`async with Supervisor() as parts:` then `parts.start(...)`, `parts.run(...)`, `await parts.wait()`."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()  # the loops' common stop signal: set first when stopping begins
        self.failed: str | None = None  # which part ended on its own, and why
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        self.stopping.set()
        return await self._stack.__aexit__(kind, error, traceback)

    def enter(self, context: contextlib.AbstractContextManager[T]) -> T:
        """A part that is a context manager (held, e.g. a lock): released in its turn when stopping."""
        return self._stack.enter_context(context)

    def on_stop(self, stop: Callable[[], Awaitable[object] | object]) -> None:
        """What stops a part already built or started (a coroutine function or a plain one); stops run in the
        reverse order of registration."""
        self._stack.push_async_callback(_call, stop)

    async def start(self, start: Awaitable[T], stop: Callable[[], Awaitable[object] | object]) -> T:
        """Start a part and register its stop (only once it started: a failed start has nothing to stop)."""
        result = await start
        self.on_stop(stop)
        return result

    def run(self, name: str, loop: Coroutine[Any, Any, None], *, cancel: bool = False) -> asyncio.Task[None]:
        """A background loop that runs until `stopping` is set. When stopping, it is waited for (or, with
        `cancel`, cancelled: a loop that may wait long on something external); ending before that stops all."""
        task = asyncio.create_task(loop, name=name)
        task.add_done_callback(self._ended)
        self.on_stop(lambda: _join(task, cancel=cancel))
        return task

    def request_stop(self) -> None:
        """SIGTERM, SIGINT: stop in order, exit 0."""
        self.stopping.set()

    async def wait(self) -> None:
        """Until a stop is requested or a part fails."""
        await self.stopping.wait()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        error = task.exception()
        self.failed = f"{task.get_name()} stopped ({error or 'returned'})"
        log.critical("%s; shutting down so a supervisor restarts us", self.failed)
        self.stopping.set()


async def _call(stop: Callable[[], Awaitable[object] | object]) -> None:
    result = stop()
    if inspect.isawaitable(result):
        await result


async def _join(task: asyncio.Task[None], *, cancel: bool) -> None:
    if cancel:
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
