"""The one way the control plane's state files are written and read.

The state directory holds what must survive a restart: signing keys, the deny list of finished jobs, the project
ids paths resolved to, the jobs that hold live credentials. Losing any of them quietly hands access back (a
revoked job allowed again, a re-used path bound to a new project) or breaks credentials in flight, so:

- A write is a whole new file: a temporary file in the same directory (created 0600), written, fsynced, renamed
  over the old one, and then the directory fsynced so the rename itself survives a power loss. A crash at any
  point leaves the old file or the new one, never a mix, and never a stray temporary file from this process.
  It is the one atomic write in the code base: `compile --out` uses it too, with the mode any new file gets.
- A read is strict: a file that exists but cannot be read or parsed, or whose document is not an object (`null`
  included), is an error naming the file (`StateFileError`), never an empty start. Only a missing file means
  "first start". A SQLite database is created whole under a temporary name and linked into place
  (`create_database`), so a crash never leaves a 0-byte file that a later start would take for a new one.
- State files are never symbolic links (opened with O_NOFOLLOW, or lstat-ed before SQLite opens them): a link
  could point the deny list at a file that does not exist, which would read as "first start".
- Files are 0600 and the state directory 0700: the keys sign credentials, the rest tells who did what.
  `secure_state_dir` tightens what an older version or an operator left looser, at start.
- One `serve` owns a state directory (`lock_state_dir`): two writers of the same files would each overwrite
  what the other recorded. Replicas share state through a database instead (PostgreSQL, issue 12).

Callers decide what a failure means: at start-up it stops `serve` (fail closed); at run time a failed write is
reported (`report_write_failure`: a log line and `controlplane_state_write_failures_total`) while the process
keeps serving what it holds in memory, and the next write carries the whole state again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from controlplane.telemetry.metrics import REGISTRY

log = logging.getLogger("controlplane.state")

FILE_MODE = 0o600
DIR_MODE = 0o700

STATE_WRITE_FAILURES = Counter(
    "controlplane_state_write_failures_total",
    "State files that could not be written (the in-memory state is still served; the next write retries).",
    ["file"],
    registry=REGISTRY,
)


LOCK_NAME = "lock"
STATE_DIR_ENV = "CONTROLPLANE_STATE_DIR"
DEFAULT_STATE_DIR = Path(".controlplane")
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def default_state_dir() -> Path:
    """$CONTROLPLANE_STATE_DIR, else `.controlplane`: where every command looks for serve's state."""
    return Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))


class StateFileError(Exception):
    """A state file cannot be read, parsed or written. The message names the file, never its content."""


class StateDirInUse(StateFileError):
    """Another `serve` holds the state directory's lock."""


def ensure_state_dir(directory: Path) -> None:
    """Create `directory` (and parents) 0700 if missing. An existing one keeps its mode here: `serve` makes it
    private at start (`secure_state_dir`), once, rather than every write warning about it."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as error:
        # Absolute: `.controlplane` alone does not say under which working directory it was refused.
        raise StateFileError(f"{directory.absolute()}: cannot create the state directory: {_reason(error)}") from None


def atomic_write_bytes(path: Path, data: bytes, *, mode: int | None = FILE_MODE) -> None:
    """Replace `path` with `data`, durably and atomically (see the module docstring).

    `mode` is the new file's: 0600 for state files; None for files meant to be shared (`compile --out`), which
    get what any new file gets, 0666 less the umask.
    """
    try:
        ensure_state_dir(path.parent)
        fd, temporary = _create_temporary(path, FILE_MODE if mode is not None else 0o666)
    except (OSError, StateFileError) as error:
        raise StateFileError(f"{path}: cannot write: {_reason(error)}") from None
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # explicit, whatever the umask took away
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


def atomic_write_text(path: Path, text: str, *, mode: int | None = FILE_MODE) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def _create_temporary(path: Path, permissions: int) -> tuple[int, Path]:
    """A new, empty file beside `path` with a name no other writer picks (O_EXCL, never through a link), created
    with `permissions` less the umask. Its name starts with a dot and ends in `.tmp`, which watchers ignore."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temporary, flags, permissions), temporary


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
    """The file's bytes; None only when nothing is there (a first start). A symbolic link (even a dangling one),
    a directory or any other failure is an error naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _symlink_error(path) from None
        raise StateFileError(f"{path}: cannot read: {_reason(error)}") from None
    try:
        with os.fdopen(fd, "rb") as source:
            if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                raise StateFileError(f"{path}: not a regular file")
            data = source.read()
    except OSError as error:
        raise StateFileError(f"{path}: cannot read: {_reason(error)}") from None
    _warn_if_readable_by_others(path)
    return data


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed document, an object; None only when the file does not exist. Empty, truncated or invalid JSON,
    and any document that is not an object (`null`, a list, a number), is an error: a crash of an older,
    non-atomic writer, a full disk or a hand edit must stop the start, not empty the state."""
    data = read_bytes(path)
    if data is None:
        return None
    if not data.strip():
        raise StateFileError(f"{path}: empty (expected a JSON document); restore it from a backup or remove it")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise StateFileError(
            f"{path}: not valid JSON ({type(error).__name__} at byte {_position(error)}): "
            "restore it from a backup or remove it"
        ) from None
    if not isinstance(document, dict):
        raise malformed(path, f"expected a JSON object, found {_json_kind(document)}; restore it from a backup")
    return document


def refuse_symlink(path: Path) -> bool:
    """Whether `path` exists, as a regular file; a symbolic link or anything else there is an error naming it.
    For files opened by a library (SQLite) that would follow a link."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as error:
        raise StateFileError(f"{path}: cannot read: {_reason(error)}") from None
    if stat.S_ISLNK(mode):
        raise _symlink_error(path)
    if not stat.S_ISREG(mode):
        raise StateFileError(f"{path}: not a regular file")
    return True


def create_database(path: Path, initialise: Callable[[sqlite3.Connection], None]) -> None:
    """Create the SQLite database `path` whole, or leave an existing one alone.

    `initialise` runs on a file with a temporary name (schema and user_version), which is then fsynced and
    hard-linked into place (a link never replaces: a concurrent creator's file wins and ours is dropped), and
    the directory fsynced. So a database file that exists was always complete: a 0-byte or schema-less one is
    damage, and the callers refuse it instead of starting with an empty ledger or trail."""
    if refuse_symlink(path):
        return
    ensure_state_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        try:
            os.close(os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE))
            db = sqlite3.connect(temporary, isolation_level=None)
            try:
                initialise(db)
            finally:
                db.close()
            fd = os.open(temporary, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path, follow_symlinks=False)
        finally:
            for leftover in (temporary, *(temporary.with_name(temporary.name + c) for c in SQLITE_COMPANIONS)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        fsync_directory(path.parent)
    except (OSError, sqlite3.Error) as error:
        raise StateFileError(f"{path}: cannot create the database: {_reason(error)}") from None
    refuse_symlink(path)


def secure_state_dir(directory: Path, names: Iterable[str]) -> None:
    """At start: the state directory 0700 and each state file in `names` (with SQLite's companion files) 0600,
    whatever an older version, a restore or the umask left; none of them may be a symbolic link. What was
    tightened is logged once."""
    ensure_state_dir(directory)
    tightened: list[str] = []
    try:
        if stat.S_IMODE(directory.stat().st_mode) != DIR_MODE:
            directory.chmod(DIR_MODE)
            tightened.append(f"{directory} (directory, now 0700)")
    except OSError as error:
        raise StateFileError(f"{directory}: cannot make the state directory private (0700): {_reason(error)}") from None
    for name in names:
        for candidate in (name, *(name + c for c in SQLITE_COMPANIONS)):
            path = directory / candidate
            if refuse_symlink(path) and _tighten(path):
                tightened.append(candidate)
    if tightened:
        log.warning("state directory %s was readable by others: made private %s", directory, ", ".join(tightened))


def lock_state_dir(directory: Path) -> int:
    """Take the state directory's lock for this process's life and return its descriptor (keep it open; the
    kernel releases the lock when the process ends, kill -9 included). Raises `StateDirInUse` naming the holder
    when another `serve` has it: two writers of the same state files would lose each other's records."""
    ensure_state_dir(directory)
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _symlink_error(path) from None
        raise StateFileError(f"{path}: cannot open the state directory's lock: {_reason(error)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _lock_holder(fd)
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StateDirInUse(
                f"state dir {directory} is in use by another controlplane serve (pid {holder}); "
                "one serve owns a state directory"
            ) from None
        raise StateFileError(f"{path}: cannot lock the state directory: {_reason(error)}") from None
    try:
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as error:
        log.warning("%s: cannot record this process's id: %s", path, _reason(error))
    return fd


def _lock_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode("ascii").strip()))
    return "unknown"


def _tighten(path: Path) -> bool:
    try:  # `path` was just lstat-ed: a regular file, not a link
        if stat.S_IMODE(path.lstat().st_mode) & 0o077:
            path.chmod(FILE_MODE)
            return True
    except OSError as error:
        raise StateFileError(f"{path}: cannot make it private (0600): {_reason(error)}") from None
    return False


def _symlink_error(path: Path) -> StateFileError:
    return StateFileError(
        f"{path}: is a symbolic link; state files must be regular files in the state directory (replace the "
        "link with the file itself)"
    )


def _json_kind(document: object) -> str:
    if document is None:
        return "null"
    return {list: "a list", str: "a string", bool: "a boolean"}.get(type(document), "a number")


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
