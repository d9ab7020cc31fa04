"""Reading a file that holds a secret (a DSN with its password, a key-encryption key), strictly.

Why strict: a secret's file is named by a flag, so a mistake in it must fail at start with a message naming the
flag and the path, never by reading the wrong thing: a regular file only, reached without following a symbolic
link at its last component (a Kubernetes Secret volume's file is a link into `..data/`: point the flag at the
target, or mount it with subPath), read up to a bound, and no byte of it ever in a message. A leaf: the standard
library only, so the store (a leaf itself) and the credentials can share it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class SecretFileError(ValueError):
    """The file cannot be used; the message names the flag and the path, never the content."""


def read_secret_file(path: Path, *, flag: str, max_bytes: int, holds: str) -> bytes:
    """The file's bytes, at most `max_bytes` (`holds` says what it should hold, for the message past that)."""
    where = f"{flag} {path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SecretFileError(f"{where}: is a symbolic link; give the file it points to") from None
        raise SecretFileError(f"{where}: cannot read: {error.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SecretFileError(f"{where}: not a regular file")
        data = os.read(fd, max_bytes + 1)
    except OSError as error:
        raise SecretFileError(f"{where}: cannot read: {error.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise SecretFileError(f"{where}: larger than {max_bytes} bytes; it should hold {holds}")
    return data
