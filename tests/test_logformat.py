"""The log format `controlplane` installs: one record, one line, whatever a client put in it (issue 10)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from controlplane.telemetry.logformat import LOG_FORMAT, JsonFormatter, LineFormatter, formatter, redact


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


# A JWT-shaped token (header {"alg":"RS256"}), a GitLab job token: neither may reach a log line, in either format.
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJqb2IifQ.c2lnbmF0dXJlLXNlY3JldA"
GLTOKEN = "glcbt-64_abcdefghijklmnopqrst"


def test_json_lines_are_one_object_with_time_level_logger_message_and_exception() -> None:
    forged = 'x\n{"level":"ERROR"}\x1b[31m\u2028\u202e'
    line = JsonFormatter().format(record("proxy %s connected", forged, exc=True))
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line and "\u202e" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO" and entry["logger"] == "controlplane.xds"
    assert entry["message"] == f"proxy {forged} connected"  # JSON's escaping kept it whole, on one line
    assert entry["time"].endswith("Z")
    assert datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).utcoffset() == timedelta(0)
    assert entry["exception"].splitlines()[-1] == "ValueError: our own bug"


def test_json_keeps_a_callers_extra_fields_and_omits_an_absent_exception() -> None:
    logged = record("pushed")
    logged.__dict__.update(group="ci", count=3, token_header=f"Bearer {JWT}")
    entry = json.loads(JsonFormatter().format(logged))
    assert entry["group"] == "ci" and entry["count"] == 3 and "exception" not in entry
    assert JWT not in json.dumps(entry) and entry["token_header"] == "Bearer [redacted]"


def test_credential_shapes_are_redacted_and_ordinary_text_is_not() -> None:
    assert redact(f"got {JWT}.") == "got [redacted]."
    assert redact(f"PRIVATE-TOKEN: {GLTOKEN}") == "PRIVATE-TOKEN: [redacted]"
    assert redact('{"authorization": "Basic dXNlcjpwYXNz"}') == '{"authorization": "Basic [redacted]"}'
    assert redact("subject_token=abc&x=1") == "subject_token=[redacted]&x=1"
    plain = "global-rate-limit-exceeded for group gw-prod, password authentication failed, eyJ alone"
    assert redact(plain) == plain


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        formatter("xml")


# Every path a token could take to stderr in `serve`: our loggers (message, arguments, exception text, extra
# fields), grpc's Python loggers (rewritten by grpclog), and grpc core's C log on descriptor 2 (relayed).
LEAK_SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from controlplane.telemetry import logformat
    from controlplane.telemetry.grpclog import bound_native_stderr, route_grpc_logs

    jwt, gl = sys.argv[2], sys.argv[3]
    logformat.install("INFO", sys.argv[1])
    route_grpc_logs()
    restore = bound_native_stderr()
    log = logging.getLogger("controlplane.credentials")
    log.warning("exchange refused for %s", f"Authorization: Bearer {jwt}")
    log.info("token %s", jwt, extra={"header": f"PRIVATE-TOKEN: {gl}"})
    try:
        raise RuntimeError(f"GitLab said no to {gl} (headers {{'Authorization': 'Bearer {jwt}'}})")
    except RuntimeError:
        log.exception("GitLab call failed")
    grpc = logging.getLogger("grpc._server")
    grpc.error("Invalid encoding on %s", f"authorization: {jwt}".encode())
    grpc.error("metadata %s and %s", f"x-token {jwt}".encode(), f"Bearer {jwt}")
    os.write(2, f"E1206 06:20:00.000000 12 http_server.cc:99] header authorization: Bearer {jwt}\\n".encode())
    import threading, warnings
    def crash():
        raise ValueError(f"bad header Authorization: Bearer {jwt}")
    thread = threading.Thread(target=crash, name="crasher")
    thread.start()
    thread.join()
    warnings.warn(f"odd token {gl}")
    restore()
    raise RuntimeError(f"uncaught {jwt}")  # the interpreter's last words go through the log too
    """
)


@pytest.mark.parametrize("kind", ["text", "json"])
def test_no_token_reaches_stderr_on_any_logging_path(kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LEAK_SCRIPT, kind, JWT, GLTOKEN], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 1, done.stderr[-2000:]  # the uncaught exception at the end
    for secret in (JWT, GLTOKEN, *JWT.split(".")[1:], GLTOKEN.split("-", 1)[1]):
        assert secret not in done.stderr
    # message, argument, exception (2), grpc argument, grpc core, thread, warning, uncaught; JSON adds `extra=`
    assert done.stderr.count("[redacted]") == (10 if kind == "json" else 9)
    for seen in ("grpc core:", "GitLab call failed", "exchange refused", "thread crasher", "odd token", "uncaught"):
        assert seen in done.stderr
    if kind == "json":
        entries = [json.loads(line) for line in done.stderr.splitlines()]
        assert {entry["logger"] for entry in entries} >= {"controlplane.credentials", "controlplane.grpc.core"}
        assert {entry["logger"] for entry in entries} >= {"py.warnings", "controlplane"}
        assert sum("Traceback" in entry.get("exception", "") for entry in entries) == 3


def test_the_cli_refuses_an_unknown_format_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "controlplane"]
    flag = subprocess.run([*command, "--log-format", "xml", "validate", str(tmp_path)], capture_output=True, text=True)
    assert flag.returncode == 2 and "invalid choice: 'xml'" in flag.stderr
    env = dict(os.environ, CONTROLPLANE_LOG_FORMAT="xml")
    variable = subprocess.run([*command, "validate", str(tmp_path)], capture_output=True, text=True, env=env)
    assert variable.returncode == 2 and "CONTROLPLANE_LOG_FORMAT must be one of text, json" in variable.stderr


# An exception raised where nobody can catch it (a finaliser, a generator's close) is printed by the
# interpreter's unraisable hook, past the formatter: neither redacted nor JSON unless routed through logging.
UNRAISABLE_SCRIPT = textwrap.dedent(
    """
    import gc, logging, sys
    from controlplane.telemetry import logformat

    logformat.install("INFO", sys.argv[1])
    class Session:
        def __del__(self):
            raise RuntimeError(f"closing https://gitlab.example/api/v4/job?private_token={sys.argv[2]}")
    session = Session()
    del session
    gc.collect()
    logging.getLogger("controlplane.test").info("still running")
    """
)


@pytest.mark.parametrize("kind", ["text", "json"])
def test_an_exception_in_a_finaliser_is_logged_redacted_in_the_format(kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", UNRAISABLE_SCRIPT, kind, GLTOKEN], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert GLTOKEN not in done.stderr and GLTOKEN.split("-", 1)[1] not in done.stderr
    assert "[redacted]" in done.stderr and "Session.__del__" in done.stderr
    if kind == "json":
        entries = [json.loads(line) for line in done.stderr.splitlines()]
        assert [entry["level"] for entry in entries] == ["ERROR", "INFO"]
        assert "RuntimeError: closing" in entries[0]["exception"]
    else:
        assert done.stderr.startswith(tuple("0123456789")) and " ERROR controlplane: " in done.stderr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://cp:s3cret@db.internal/cp", "postgresql://cp:[redacted]@db.internal/cp"),
        ("GET https://oauth2:hunter2@gitlab.example/api/v4", "GET https://oauth2:[redacted]@gitlab.example/api/v4"),
        ("/api/v4/jobs?token=abc123def&page=2", "/api/v4/jobs?token=[redacted]&page=2"),
        ("env CI_JOB_TOKEN=abc123def", "env CI_JOB_TOKEN=[redacted]"),
        ("refresh_token=xyz987 webhook_secret: s3cr3t", "refresh_token=[redacted] webhook_secret: [redacted]"),
        ('body "{\\"password\\": \\"hunter2\\"}"', 'body "{\\"password\\": \\"[redacted]\\"}"'),
        ("[('X-Vault-Token': 'hvs.abc')]", "[('X-Vault-Token': '[redacted]')]"),
    ],
)
def test_secrets_in_urls_variables_and_quoted_json_are_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_harmless_text_near_secret_words_is_kept() -> None:
    plain = "http://controlplane:9902/healthz tokens=3 --webhook-secret-file /run/s password auth, token_type=Bearer"
    assert redact(plain) == plain


def test_the_text_format_redacts_a_value_before_escaping_its_tab() -> None:
    line = LineFormatter(LOG_FORMAT).format(record("client sent %s", "password:\thunter2"))
    assert "hunter2" not in line and line.endswith("client sent password:\\t[redacted]")


@pytest.mark.parametrize("text", ["eyJ" * 40_000, "a-" * 60_000, "a://" * 30_000, "eyJa." * 25_000])
def test_redaction_is_linear_on_hostile_text(text: str) -> None:
    # `eyJ` 40,000 times took 2.6 s when every `eyJ` was searched to the end of its run for a dot
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 0.5


def test_json_lines_hold_only_valid_unicode_whatever_bytes_a_client_sent() -> None:
    # aiohttp hands a header value that is not UTF-8 over as lone surrogates (surrogateescape)
    value = b"evil\xff\xfe".decode("utf-8", "surrogateescape")
    logged = record("client header %s", value)
    logged.header = value
    entry = json.loads(JsonFormatter().format(logged))
    for field in ("message", "header"):
        entry[field].encode("utf-8")  # a lone surrogate would raise here (and fail strict JSON readers)
    assert entry["message"] == "client header evil\\udcff\\udcfe" and entry["header"] == "evil\\udcff\\udcfe"


# A record logging cannot format (a bad `%d`, by our mistake or a library's) was printed by logging's own
# handleError: a traceback, then the raw message and arguments, token included, in neither format.
BROKEN_CALL_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from controlplane.telemetry import logformat

    logformat.install("INFO", sys.argv[1])
    log = logging.getLogger("controlplane.credentials")
    log.info("exchanged %d", sys.argv[2])
    log.info("after", extra={"ratio": float("nan"), "huge": 10**30, "count": 3})
    """
)


@pytest.mark.parametrize("kind", ["text", "json"])
def test_a_record_that_cannot_be_formatted_is_one_line_without_its_arguments(kind: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BROKEN_CALL_SCRIPT, kind, JWT], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert not [part for part in JWT.split(".") if part in done.stderr], done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "could not be written (TypeError" in lines[0], lines
    if kind == "json":
        entries = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # NaN is not JSON
        assert entries[0]["level"] == "ERROR" and "arguments are not shown" in entries[0]["message"]
        assert (entries[1]["ratio"], entries[1]["huge"], entries[1]["count"]) == ("nan", str(10**30), 3)


def test_a_private_key_in_pem_form_is_redacted_whole_even_inside_a_repr() -> None:
    body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg" + "A" * 40
    pem = f"-----BEGIN PRIVATE KEY-----\n{body}\n{body[:20]}==\n-----END PRIVATE KEY-----\n"
    assert redact(f"loaded {pem}next") == "loaded [redacted]\nnext"
    assert body not in redact(f"got {pem.encode()!r}") and body[:20] not in redact(f"got {pem.encode()!r}")
    assert redact("-----BEGIN EC PRIVATE KEY-----\nAAAA") == "[redacted]"
    certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    assert redact(certificate) == certificate  # public: kept
