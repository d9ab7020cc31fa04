"""grpc's Python log lines, rewritten so that no client's bytes reach the log, at a bounded rate.

grpc logs a request whose header value is not valid UTF-8 as ``Invalid encoding on b'...'``, with a traceback,
at ERROR, once per request (issue 10): a client could put anything there (a token pasted in the wrong header,
or bytes chosen to fill the disk) and have it written as often as it liked. Every record of the ``grpc``
loggers is therefore taken off the normal path and written again on ``controlplane.grpc``: that one with a
fixed text, the others with any bytes argument (how grpc passes metadata) replaced by its length, all through
a rate limit per kind of line. grpc core's own C-level log goes straight to file descriptor 2; `serve` relays
that descriptor through a rate limit too (`bound_native_stderr`; docs/http-listeners.md, "grpc's logs").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable

from controlplane.telemetry.ratelog import RateLimitedLog

log = logging.getLogger("controlplane.grpc")

_INVALID_ENCODING = "Invalid encoding on %s"  # grpc/_cython/_cygrpc/metadata.pyx.pxi, in grpcio 1.85


class _Rewrite(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self._limited = RateLimitedLog(log, burst=5, interval=60.0)

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == _INVALID_ENCODING or (record.exc_info and isinstance(record.exc_info[1], UnicodeError)):
            self._limited.log(
                logging.WARNING,
                "grpc: a request carried a header value that is not valid UTF-8 (value not logged)",
                key="invalid encoding",
            )
            return
        args = record.args if isinstance(record.args, tuple) else ()
        self._limited.log(
            record.levelno,
            "grpc (%s): " + str(record.msg),
            record.name,
            *(_shown(arg) for arg in args),
            key=str(record.msg),
            exc_info=record.exc_info,
        )


def _shown(arg: object) -> object:
    return f"<{len(arg)} bytes, not logged>" if isinstance(arg, bytes | bytearray | memoryview) else arg


def route_grpc_logs() -> Callable[[], None]:
    """Send every ``grpc.*`` record through the rewrite (and nowhere else); returns how to undo it."""
    grpc_logger = logging.getLogger("grpc")
    if any(isinstance(handler, _Rewrite) for handler in grpc_logger.handlers):
        return lambda: None  # `main` run again in one process, as tests do
    handler = _Rewrite()
    propagate = grpc_logger.propagate
    grpc_logger.addHandler(handler)
    grpc_logger.propagate = False

    def undo() -> None:
        grpc_logger.removeHandler(handler)
        grpc_logger.propagate = propagate

    return undo


# grpc core's line format: "E1206 06:20:01.123456 12 hpack_parser.cc:1048] message"; the source location is
# the kind of line, and its first letter the severity.
_CORE_LOCATION = re.compile(r"[\w.-]+\.(?:cc|c|h):\d+\]")
_MAX_CORE_LINE = 1000  # characters kept of one line; a line with no end is cut, never grows


def bound_native_stderr(lines_per_minute: int = 5) -> Callable[[], None]:
    """Relay what C code writes to file descriptor 2 (grpc core's log) through a rate limit per kind of line.

    grpc core writes one line per malformed stream (a bad ``grpc-timeout`` header: 2,000 lines in 0.13 s from
    one connection), with no rate of its own. Descriptor 2 becomes a pipe read by a thread that logs each line
    on ``controlplane.grpc.core``; the write end does not block, so a full pipe drops C lines rather than stall
    grpc's threads. Python's own handlers and ``sys.stderr`` move to a copy of the real stderr first. Returns
    a function that puts descriptor 2 back and waits for the relay to write what is left (for a clean exit)."""
    try:
        real = os.dup(2)
        reader, writer = os.pipe()
    except OSError as error:
        log.warning("grpc core's stderr is not rate-limited: %s", error)
        return lambda: None
    os.set_blocking(writer, False)
    stream = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115 (kept open)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and _is_stderr(handler.stream):
            handler.setStream(stream)
    sys.stderr = stream
    os.dup2(writer, 2)
    os.close(writer)
    relay = threading.Thread(target=_relay, args=(reader, lines_per_minute), name="native-stderr", daemon=True)
    relay.start()

    def restore() -> None:
        os.dup2(real, 2)  # the pipe's last writer goes: the relay reads what is left, then its end
        relay.join(5)

    return restore


def _is_stderr(stream: object) -> bool:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return bool(stream.fileno() == 2)  # type: ignore[attr-defined]
    return False


def _relay(reader: int, lines_per_minute: int) -> None:
    limited = RateLimitedLog(logging.getLogger("controlplane.grpc.core"), burst=lines_per_minute, interval=60.0)
    pending = b""
    with open(reader, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            pending = pending[-_MAX_CORE_LINE:]
            for line in lines:
                _relay_line(limited, line.decode("utf-8", "backslashreplace")[:_MAX_CORE_LINE])
    if pending:
        _relay_line(limited, pending.decode("utf-8", "backslashreplace"))


def _relay_line(limited: RateLimitedLog, text: str) -> None:
    if not text.strip():
        return
    location = _CORE_LOCATION.search(text)
    level = logging.INFO if text[:1] == "I" else logging.WARNING
    limited.log(level, "grpc core: %s", text, key=location.group(0) if location else text[:40])
