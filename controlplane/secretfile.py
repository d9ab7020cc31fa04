"""Reading a file that holds a secret (a DSN with its password, a key-encryption key), strictly.

Why strict: a secret's file is named by a flag, so a mistake in it must fail at start with a message naming the
flag and the path, never by reading the wrong thing: a regular file only, reached without following a symbolic
link at its last component (a Kubernetes Secret volume's file is a link into `..data/`: point the flag at the
target, or mount it with subPath), read up to a bound, and no byte of it ever in a message. A leaf (the
standard library and controlplane/regularfile.py only), so the store and the credentials can share it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from controlplane.regularfile import FileTooLarge, NotRegularFile, read_regular


class SecretFileError(ValueError):
    """The file cannot be used; the message names the flag and the path, never the content."""


def read_secret_file(path: Path, *, flag: str, max_bytes: int, holds: str) -> bytes:
    """The file's bytes, at most `max_bytes` (`holds` says what it should hold, for the message past that)."""
    where = f"{flag} {path}"
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            raise SecretFileError(f"{where}: is a symbolic link; give the file it points to")
        # Never blocks: a named pipe at the path (or swapped in after the lstat) would hang the start for good.
        return read_regular(path, max_bytes, mode=mode, flags=os.O_NOFOLLOW)
    except NotRegularFile as error:
        raise SecretFileError(f"{where}: not a regular file ({error.kind})") from None
    except FileTooLarge:
        raise SecretFileError(f"{where}: larger than {max_bytes} bytes; it should hold {holds}") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise SecretFileError(f"{where}: is a symbolic link; give the file it points to") from None
        raise SecretFileError(f"{where}: cannot read: {error.strerror}") from None
