"""grpc's Python log lines, rewritten so that no client's bytes reach the log, at a bounded rate.

grpc logs a request whose header value is not valid UTF-8 as ``Invalid encoding on b'...'``, with a traceback,
at ERROR, once per request (issue 10): a client could put anything there (a token pasted in the wrong header,
or bytes chosen to fill the disk) and have it written as often as it liked. Every record of the ``grpc``
loggers is therefore taken off the normal path and written again on ``controlplane.grpc``: that one with a
fixed text, the others with any bytes argument (how grpc passes metadata) replaced by its length, all through
a rate limit per kind of line. grpc core's own C-level log (stderr, GRPC_VERBOSITY) is another matter:
docs/http-listeners.md, "grpc's logs".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controlplane.ratelog import RateLimitedLog

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
