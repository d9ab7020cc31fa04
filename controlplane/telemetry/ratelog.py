"""Log lines that an outsider can trigger at will, at a bounded rate.

A rejected webhook, a refused exchange or a malformed request is worth one line to an operator, but a client
can send thousands a second: one line each would fill the disk and bury everything else. Here each kind of
line (its key) is written at most ``burst`` times per ``interval``; the rest are counted and reported in one
"suppressed" line when the kind next occurs after the interval.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from logging import _ExcInfoType  # typeshed's alias for what exc_info accepts

MAX_KEYS = 256  # keys are message kinds, a handful per logger; the bound only matters if a caller misuses them


@dataclass
class _Window:
    started: float
    written: int = 0
    suppressed: int = 0


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 5,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or interval <= 0:
            raise ValueError("burst must be >= 1 and interval > 0")
        self.logger = logger
        self._burst, self._interval, self._clock = burst, interval, clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def log(
        self, level: int, msg: str, *args: object, key: str | None = None, exc_info: _ExcInfoType | None = None
    ) -> bool:
        """Write the line unless its kind (``key``, by default the format string) is over its rate; True if
        written. The check comes after the level test so lines nobody would see do not use up the burst."""
        if not self.logger.isEnabledFor(level):
            return False
        kind = msg if key is None else key
        window = self._window(kind, level)
        if window.written >= self._burst:
            window.suppressed += 1
            return False
        window.written += 1
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
        return True

    def _window(self, kind: str, level: int) -> _Window:
        now = self._clock()
        window = self._windows.get(kind)
        if window is not None and now - window.started < self._interval:
            return window
        if window is not None and window.suppressed:
            self.logger.log(
                level,
                "suppressed %d more line(s) like %r in the last %.0fs",
                window.suppressed,
                kind,
                now - window.started,
            )
        fresh = self._windows[kind] = _Window(now)
        self._windows.move_to_end(kind)
        while len(self._windows) > MAX_KEYS:
            self._windows.popitem(last=False)
        return fresh
