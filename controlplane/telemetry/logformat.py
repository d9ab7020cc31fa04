"""The log formats of `controlplane`: every record is one line, whatever a client put into it, and no token.

Log messages quote what clients send (node ids, gateway groups, HTTP paths, webhook fields, GitLab names). A
newline in one of them let a client write whole log lines of its choosing, and terminal escapes coloured (or
hid) an operator's terminal (issue 10). Escaping at each call site would miss one; the formatter sees them all.
Tracebacks are left as they are in the text format: they come from our code, and their lines matter to whoever
reads them. The JSON format (`--log-format json`, for log collectors) writes one object per line, where JSON's
own escaping does the same job for every field.

Both formats also blank anything shaped like a credential (a JWT, a GitLab token, an Authorization or token
header's value) in the whole output, traceback included: no code path logs one on purpose, and this is the net
for an exception or a client's bytes that quote one (a token pasted into the wrong header, a URL with a query).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

# C0 controls (tab included: it can fake columns), DEL, C1 controls (NEL among them), the Unicode line and
# paragraph separators and the bidirectional overrides, which reorder what a terminal shows.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {code: (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}") for code in _UNSAFE}
_ESCAPES |= {ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}

REDACTED = "[redacted]"
# A JWT: base64url JSON header (`{"` = `eyJ`), then two more parts. The header's run is always consumed, the rest
# being optional, so a search that finds no JWT there resumes after it: `eyJ` repeated with no dot (a client's
# bytes) cost one pass, where `eyJ...\.` retried every `eyJ` to the end of the run (90 KB took 2.6 s).
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*+((?:\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)?)")
# GitLab's token prefixes (personal, deploy, CI job, runner, trigger, feed, OAuth, agent...): the same shapes
# the audit trail refuses to store.
_GITLAB_TOKEN = re.compile(r"\bgl(?:pat|dt|cbt|rt|ptt|ft|imt|agent|oas|soat|ffct|wt)-[A-Za-z0-9_.-]{8,}")
# The value after a credential-carrying header, field or variable name, whatever its shape (`Authorization:
# Basic ...`, `PRIVATE-TOKEN=...`, `"authorization": "..."`, `Bearer abc`, `CI_JOB_TOKEN=...`, `?token=...`,
# `refresh_token`, `webhook_secret`), quotes escaped or not (JSON quoted inside a string: `\"password\": ...`).
_HEADER_VALUE = re.compile(
    r"""(?ix)
    ( \b(?:(?:\w+[-_])?(?:token|secret|password|passwd|api[-_]?key)
         |authorization|proxy-authorization|sslpassword)
      (?:\\?["'])?\s*[:=]\s*(?:\\?["'])?(?:(?:bearer|basic|token)\s+)?
    | \bbearer\s+ )
    [^\s"',;}&\\]+
    """
)
# The password in a URL's user-info (`postgresql://user:password@host`, `https://user:token@gitlab`). Only where
# a run of scheme characters starts, so a long run of them is read once.
_URL_PASSWORD = re.compile(r"(?i)(?<![a-z0-9+.-])([a-z][a-z0-9+.-]*://[^\s/?#@:'\"]*:)[^\s/?#@'\"]+@")

# A private key in PEM form, its body and end line too when they follow (newlines real or escaped, as in a repr).
_PEM_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[A-Za-z0-9+/=\s\\]*(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----)?"
)


def escape(text: str) -> str:
    return text.translate(_ESCAPES)


def redact(text: str) -> str:
    """`text` with every credential-shaped part replaced by ``[redacted]``."""
    text = _PEM_KEY.sub(REDACTED, text)
    text = _HEADER_VALUE.sub(lambda match: match.group(1) + REDACTED, text)
    text = _URL_PASSWORD.sub(lambda match: match.group(1) + REDACTED + "@", text)
    text = _JWT.sub(lambda match: REDACTED if match.group(1) else match.group(0), text)
    return _GITLAB_TOKEN.sub(REDACTED, text)


class LineFormatter(logging.Formatter):
    """``LOG_FORMAT`` lines: the message escaped onto one line, the whole output redacted."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # redacted before escaping too: `password:\tx` escaped to `password:\\tx` no longer reads as one
        return escape(redact(super().formatMessage(record)))

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# What every LogRecord carries; anything else on a record came from a caller's `extra=` and is worth keeping.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``exception``
    (the traceback, when the record has one), ``stack`` (with ``stack_info``) and the caller's ``extra=`` fields.
    ``ensure_ascii`` escapes every control character and non-ASCII one, so a field cannot break the line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": _text(record.getMessage()),
        }
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = _text(record.exc_text)
        if record.stack_info:
            entry["stack"] = _text(self.formatStack(record.stack_info))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = _field(value)
        return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def _field(value: object) -> object:
    if value is None or isinstance(value, bool) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, int) and abs(value) < 2**63:  # what every JSON reader holds exactly
        return value
    # NaN and infinities would be written as the bare words NaN and Infinity, which JSON does not have
    return _text(str(value))


def _text(text: str) -> str:
    """`text` redacted, and with any lone surrogate written as ``\\udcff``: aiohttp decodes a client's header
    and path bytes that are not UTF-8 with ``surrogateescape``, and json.dumps writes such a character as a
    ``\\udcff`` escape: RFC 8259 leaves what a reader does with it open, and strict ones (Rust's serde_json)
    refuse the whole line."""
    return redact(text).encode("utf-8", "backslashreplace").decode("utf-8")


def formatter(kind: str) -> logging.Formatter:
    """The formatter for ``--log-format`` `kind` (one of ``FORMATS``)."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return LineFormatter(LOG_FORMAT)
    raise ValueError(f"unknown log format {kind!r}: expected one of {', '.join(FORMATS)}")


def install(level: int | str, kind: str = "text") -> None:
    """Log to stderr in our format: `logging.basicConfig` with our formatter, and like it a no-op when the
    root logger has handlers already (`main` run again in one process, as tests do)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = _Handler()
    handler.setFormatter(formatter(kind))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # Python's warnings, otherwise printed raw, become records like the others
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_death
    sys.unraisablehook = _log_unraisable


class _Handler(logging.StreamHandler[TextIO]):
    """A stderr handler whose own failure is one more line in the format. logging's default prints a record it
    could not format (a bad ``%d``, an extra JSON cannot hold) as a traceback followed by the raw message and
    arguments: in neither format, and unredacted, so a token passed to a broken call reached stderr as it was."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        failed = logging.LogRecord(
            record.name,
            logging.ERROR,
            record.pathname,
            record.lineno,
            "a log record from %s:%d could not be written (%s: %s); its arguments are not shown",
            (record.pathname, record.lineno, type(error).__name__, error),
            None,
        )
        try:
            self.stream.write(self.format(failed) + self.terminator)
            self.flush()
        except Exception:  # stderr itself is failing: there is nowhere left to say so
            pass


# An exception nobody caught is printed by the interpreter straight to stderr, past the formatter: in neither
# format, unredacted. These hooks make it one more record (the interpreter still exits as it would). That
# includes the "Exception ignored in" ones nobody can catch: raised by a finaliser (`__del__`, a connection or
# client session closed by the garbage collector) or a generator's close, where a library's message may quote
# a URL with its token.
_uncaught = logging.getLogger("controlplane")


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    _uncaught.critical("uncaught exception", exc_info=(kind, error, trace))


def _log_thread_death(hook: threading.ExceptHookArgs) -> None:
    if hook.exc_type is SystemExit:
        return  # what the default hook does: a thread's SystemExit ends it quietly
    thread = hook.thread.name if hook.thread is not None else "?"
    error = hook.exc_value if hook.exc_value is not None else hook.exc_type()
    _uncaught.error("uncaught exception in thread %s", thread, exc_info=(hook.exc_type, error, hook.exc_traceback))


def _log_unraisable(hook: sys.UnraisableHookArgs) -> None:
    error = hook.exc_value if hook.exc_value is not None else hook.exc_type()
    where = hook.err_msg or "Exception ignored in"
    _uncaught.error("%s: %s", where, _described(hook.object), exc_info=(hook.exc_type, error, hook.exc_traceback))


def _described(thing: object) -> str:
    """The object's repr as the default hook shows it, or a placeholder when its repr raises too."""
    try:
        return repr(thing)
    except Exception:
        return f"<{type(thing).__name__} object (repr failed)>"
