"""grpc core (C++) writes its log lines straight to file descriptor 2, past Python's logging: a client could make
it write one line per malformed stream (2,000 lines in 0.13 s from one connection). `serve` relays that
descriptor through a rate limit; Python's own log lines still reach the real stderr, unlimited."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from controlplane.telemetry import logformat
    from controlplane.telemetry.grpclog import bound_native_stderr

    logformat.install("INFO", sys.argv[1])
    restore = bound_native_stderr()
    os.write(2, b"E1206 06:20:00.000000 12 tcp_server.cc:210] File descriptor limit reached. Retrying.\\n")
    for i in range(2000):  # what grpc core writes for each stream with a bad grpc-timeout header
        try:
            os.write(2, b"E1206 06:20:01.%06d 12 hpack_parser.cc:1048] Error parsing 'grpc-timeout' metadata\\n" % i)
        except BlockingIOError:
            pass  # the pipe is full: dropped, as grpc core's write would be
    logging.getLogger("controlplane").info("our own line %d", 1)
    print("a traceback would go here", file=sys.stderr)
    restore()  # descriptor 2 back, the relay drained
    os.write(2, b"after restore\\n")
    """
)


def test_native_stderr_lines_are_relayed_at_a_bounded_rate_and_ours_are_not() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, "text"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    assert sum("hpack_parser.cc:1048" in line for line in lines) <= 5
    assert sum("tcp_server.cc:210" in line for line in lines) == 1  # another kind has a budget of its own
    assert any("our own line 1" in line for line in lines)
    assert "a traceback would go here" in lines
    assert lines[-1] == "after restore"
    assert len(lines) < 20


def test_native_stderr_lines_follow_the_json_log_format() -> None:
    """With ``--log-format json`` the relayed C lines are JSON objects like ours (what is not a log record, a
    bare print to stderr, stays as it is)."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, "json"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(records) == len(lines) - 2  # all but the print and the line written after restore
    core = [entry for entry in records if entry["logger"] == "controlplane.grpc.core"]
    assert 2 <= len(core) <= 7 and any("tcp_server.cc:210" in entry["message"] for entry in core)
    assert all(entry["level"] == "WARNING" for entry in core)
    assert any(entry["message"] == "our own line 1" for entry in records)
