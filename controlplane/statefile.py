"""The one way the control plane's state files are written and read.

The state directory holds what must survive a restart: signing keys, the deny list of finished jobs, the project
ids paths resolved to, the jobs that hold live credentials. Losing any of them quietly hands access back (a
revoked job allowed again, a re-used path bound to a new project) or breaks credentials in flight, so:

- A write is a whole new file: a temporary file in the same directory (created 0600), written, fsynced, renamed
  over the old one, and then the directory fsynced so the rename itself survives a power loss. A crash at any
  point leaves the old file or the new one, never a mix, and never a stray temporary file from this process.
- A read is strict: a file that exists but cannot be read or parsed is an error naming the file
  (`StateFileError`), never an empty start. Only a missing file means "first start".
- Files are 0600 and a state directory we create is 0700: the keys sign credentials, the rest tells who did what.

Callers decide what a failure means: at start-up it stops `serve` (fail closed); at run time a failed write is
reported (`report_write_failure`: a log line and `controlplane_state_write_failures_total`) while the process
keeps serving what it holds in memory, and the next write carries the whole state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from controlplane.admin.metrics import REGISTRY

log = logging.getLogger("controlplane.state")

FILE_MODE = 0o600
DIR_MODE = 0o700

STATE_WRITE_FAILURES = Counter(
    "controlplane_state_write_failures_total",
    "State files that could not be written (the in-memory state is still served; the next write retries).",
    ["file"],
    registry=REGISTRY,
)


class StateFileError(Exception):
    """A state file cannot be read, parsed or written. The message names the file, never its content."""


def ensure_state_dir(directory: Path) -> None:
    """Create `directory` (and parents) 0700 if missing. An existing directory keeps its mode (it may be shared,
    like `.`), but a group- or world-accessible one is worth a warning."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        mode = stat.S_IMODE(directory.stat().st_mode)
    except OSError as error:
        raise StateFileError(f"{directory}: cannot create the state directory: {_reason(error)}") from None
    if mode & 0o077:
        log.warning("state directory %s has mode %o: it should be 0700", directory, mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, durably and atomically (see the module docstring); mode 0600."""
    try:
        ensure_state_dir(path.parent)
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (OSError, StateFileError) as error:
        raise StateFileError(f"{path}: cannot write: {_reason(error)}") from None
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 already; explicit, whatever a platform does
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_directory(path.parent)
    except OSError as error:
        raise StateFileError(f"{path}: cannot write: {_reason(error)}") from None


def atomic_write_json(path: Path, document: Any) -> None:
    """`atomic_write_bytes` of `document` as sorted, indented JSON (readable in a diff, stable across runs)."""
    atomic_write_bytes(path, (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def fsync_directory(directory: Path) -> None:
    """Make a rename (or a file creation) in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(path: Path) -> bytes | None:
    """The file's bytes; None when it does not exist (a first start). Any other failure names the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateFileError(f"{path}: cannot read: {_reason(error)}") from None
    _warn_if_readable_by_others(path)
    return data


def read_json(path: Path) -> Any:
    """The parsed document, or None when the file does not exist. Empty, truncated or invalid JSON is an error:
    a crash of an older, non-atomic writer (or a full disk) must stop the start, not empty the state."""
    data = read_bytes(path)
    if data is None:
        return None
    if not data.strip():
        raise StateFileError(f"{path}: empty (expected a JSON document); restore it from a backup or remove it")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise StateFileError(
            f"{path}: not valid JSON ({type(error).__name__} at byte {_position(error)}): "
            "restore it from a backup or remove it"
        ) from None


def malformed(path: Path, what: str) -> StateFileError:
    """The error for a file that parses but does not have the expected shape."""
    return StateFileError(f"{path}: malformed: {what}")


def report_write_failure(path: Path, error: Exception, consequence: str) -> None:
    """A write failed at run time: say so loudly, count it, and let the caller keep serving from memory."""
    STATE_WRITE_FAILURES.labels(path.name).inc()
    log.error(
        "%s; %s (the next change retries the write)",
        error if isinstance(error, StateFileError) else f"{path}: cannot write: {_reason(error)}",
        consequence,
    )


class OffLoopWriter:
    """Writes one state file in a worker thread, so its fsyncs (about 10 ms each on a disk) never stall the event
    loop that serves xDS. Documents are built by the caller on the loop, so the last one passed is always the
    newest; writes are serialized, and a burst coalesces into fewer writes (a caller whose document was
    superseded while it waited returns when the newer one is written). Failures are reported, not raised."""

    def __init__(self, path: Path, consequence: str) -> None:
        self.path = path
        self.consequence = consequence
        self._lock = asyncio.Lock()
        self._pending: Any = None
        self._has_pending = False
        self._last_ok = True

    async def write(self, document: Any) -> bool:
        """True once `document`, or a newer one, is on disk; False (reported) when that write failed."""
        self._pending, self._has_pending = document, True
        async with self._lock:
            if not self._has_pending:  # written by the caller that held the lock: it took the newest document
                return self._last_ok
            latest, self._pending, self._has_pending = self._pending, None, False
            try:
                await asyncio.to_thread(atomic_write_json, self.path, latest)
            except StateFileError as error:
                report_write_failure(self.path, error, self.consequence)
                self._last_ok = False
            else:
                self._last_ok = True
            return self._last_ok


def make_private(path: Path) -> None:
    """Tighten an existing file to 0600 (an older version may have created it with the umask's mode)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            path.chmod(FILE_MODE)
    except FileNotFoundError:
        return
    except OSError as error:
        raise StateFileError(f"{path}: cannot make it private (0600): {_reason(error)}") from None


def _warn_if_readable_by_others(path: Path) -> None:
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "state file %s has mode %o: it should be 0600 (it is rewritten 0600 on the next change)", path, mode
            )


def _reason(error: BaseException) -> str:
    if isinstance(error, StateFileError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def _position(error: Exception) -> int:
    return getattr(error, "pos", None) or getattr(error, "start", 0) or 0
