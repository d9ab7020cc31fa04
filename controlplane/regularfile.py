"""Reading a file named from outside (a policy file, a secret it names, a certificate) that can neither block the
reader nor fill its memory.

Why: these files are read on a reload or before a TLS handshake, where nothing may hang. A path (or a link)
pointing at a named pipe blocked for good (opening a pipe waits for a writer, reading it for data), a device can
have effects when opened, and `/dev/zero` or a huge file filled memory. So only a regular file is read: its kind
is checked before opening and again on what was opened (the path may have been replaced in between), it is
opened without blocking, and at most `limit` bytes are read whatever it grows into meanwhile. Callers phrase
the refusal (each names its own flag or file); a leaf: the standard library only.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_FILE_KINDS = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)
READ_CHUNK = 1 << 16


class NotRegularFile(Exception):
    """The path is not a regular file; `kind` says what it is ("a named pipe")."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class FileTooLarge(Exception):
    """The file holds more than the limit; `size` is what is known of it (its size, or the limit plus one)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is."""
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "an unknown kind of file")


def read_regular(path: str | Path, limit: int, *, mode: int | None = None, flags: int = 0) -> bytes:
    """The bytes of the regular file at `path` (links followed unless `flags` has O_NOFOLLOW), at most `limit`.

    `mode`: the caller's own stat of it, when it has one (else it is stat'ed here). Raises `NotRegularFile`,
    `FileTooLarge`, or the OSError of the stat, open or read."""
    if mode is None:
        mode = os.stat(path).st_mode
    if (kind := file_kind(mode)) is not None:  # before opening: opening a FIFO or device is not harmless
        raise NotRegularFile(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | flags)
    try:
        st = os.fstat(fd)  # what was opened: the path may have been replaced since the stat
        if (kind := file_kind(st.st_mode)) is not None:
            raise NotRegularFile(kind)
        if st.st_size > limit:
            raise FileTooLarge(st.st_size)
        data = read_bounded(fd, limit)
    finally:
        os.close(fd)
    if data is None:
        raise FileTooLarge(limit + 1)
    return data


def read_bounded(fd: int, limit: int) -> bytes | None:
    """At most `limit` bytes to the end of the file, or None when there are more (a file still growing)."""
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, min(READ_CHUNK, limit + 1 - size)):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None
    return b"".join(chunks)
