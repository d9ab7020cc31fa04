"""The one log format of `controlplane`: every record is one line, whatever a client put into it.

Log messages quote what clients send (node ids, gateway groups, HTTP paths, webhook fields, GitLab names). A
newline in one of them let a client write whole log lines of its choosing, and terminal escapes coloured (or
hid) an operator's terminal (issue 10). Escaping at each call site would miss one; the formatter sees them all.
Tracebacks are left as they are: they come from our code, and their lines matter to whoever reads them.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls (tab included: it can fake columns), DEL, C1 controls (NEL among them), the Unicode line and
# paragraph separators and the bidirectional overrides, which reorder what a terminal shows.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _UNSAFE}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def escape(text: str) -> str:
    return text.translate(_ESCAPES)


class LineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def install(level: int | str) -> None:
    """Log to stderr in our format: `logging.basicConfig` with our formatter, and like it a no-op when the
    root logger has handlers already (`main` run again in one process, as tests do)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter(LOG_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
