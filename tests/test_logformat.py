"""The log format `controlplane` installs: one record, one line, whatever a client put in it (issue 10)."""

from __future__ import annotations

import logging
import sys

from controlplane.telemetry.logformat import LOG_FORMAT, LineFormatter


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("our own bug")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("controlplane.xds", logging.INFO, __file__, 1, msg, args, exc_info)


def test_control_characters_from_arguments_are_escaped() -> None:
    forged = "MARKER\x00\n2026-01-01 00:00:00,000 INFO controlplane: FAKE\x1b[31m\r\x7f\x85\u2028\u202e"
    line = LineFormatter(LOG_FORMAT).format(record("proxy %s connected (group %s)", forged, "ci\ngw"))
    assert "\n" not in line and "\x1b" not in line and "\x00" not in line and "\r" not in line
    assert "\x85" not in line and "\u2028" not in line and "\u202e" not in line and "\x7f" not in line
    assert "MARKER\\x00\\n2026-01-01" in line and "FAKE\\x1b[31m\\r\\x7f\\x85\\u2028\\u202e" in line
    assert line.endswith("(group ci\\ngw)")


def test_tracebacks_keep_their_lines_and_the_message_is_still_escaped() -> None:
    text = LineFormatter(LOG_FORMAT).format(record("failed for %s", "a\nb", exc=True))
    first, *rest = text.split("\n")
    assert first.endswith("failed for a\\nb")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: our own bug"


def test_plain_text_is_unchanged() -> None:
    line = LineFormatter("%(message)s").format(record("caf\u00e9 [ok] \\n stays"))
    assert line == "caf\u00e9 [ok] \\n stays"
