"""Debian's headless Chromium for tests that check a page as a browser renders it, and a PNG reader.

`make test` installs the browser where it can (the Makefile's `browser` step); `chromium()` finds it, and a test
without it is skipped on a developer's machine but fails under CI=true, where a silently skipped browser check
would prove nothing. Every run is bounded: Chromium runs in a session of its own, and on a timeout (or once it
has answered) that whole process group is killed, so no renderer or zygote outlives the test.

The PNG reader decodes what Chromium writes (8-bit RGB or RGBA, non-interlaced) with zlib and struct only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest

DEBIAN_PATH = Path("/usr/bin/chromium")
TIMEOUT = 60.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
INSTALL = "install Debian's package: apt-get install chromium (make test does it when run as root with apt)"


def chromium() -> Path:
    """The browser's path; skip without it, but fail under CI=true."""
    found = DEBIAN_PATH if DEBIAN_PATH.exists() else (Path(p) if (p := shutil.which("chromium")) else None)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"chromium not found under CI=true: {INSTALL}")
        pytest.skip(f"chromium not found: {INSTALL}")
    return found


def run_chromium(browser: Path, *args: str, timeout: float = TIMEOUT) -> str:
    """Run the browser with `args` and a throw-away profile; its stdout. Killed (the whole group) on timeout."""
    with tempfile.TemporaryDirectory(prefix="controlplane-chromium-") as profile:
        process = subprocess.Popen(
            [str(browser), *FLAGS, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            process.communicate()
            pytest.fail(f"chromium did not finish within {timeout:.0f}s")
        finally:
            _kill_group(process)
        if process.returncode != 0:
            pytest.fail(f"chromium exited {process.returncode}: {err.decode(errors='replace')[-2000:]}")
        return out.decode(errors="replace")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """The group this test started (its own session): the browser and every helper process it spawned."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class Image(NamedTuple):
    width: int
    height: int
    pixels: list[tuple[int, int, int]]  # row by row, RGB

    def colours(self) -> Counter[tuple[int, int, int]]:
        return Counter(self.pixels)


def read_png(path: Path) -> Image:
    """An 8-bit RGB/RGBA non-interlaced PNG, decoded (filters 0-4 as the PNG specification defines them)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    offset, idat = 8, b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                line[i] = (line[i] + _paeth(left, up, corner)) & 0xFF
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        previous = line
    return Image(width, height, pixels)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c
