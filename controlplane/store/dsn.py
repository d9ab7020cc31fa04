"""Where the store's DSN comes from, and how it is shown: never with a password.

Why the rules: a command line is readable by every user of the machine (`ps`, /proc/<pid>/cmdline) and lands
in shell history and process supervisors' logs, so a DSN given as an argument must carry no password; the
password comes from an environment variable, a file, or libpq's own PGPASSWORD/PGPASSFILE (~/.pgpass). The
same DSN is shown in logs and /status only as `redacted()`, which drops every secret key whether it came from
the URL's user-info or its query string (`?password=`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from psycopg import conninfo

from controlplane.secretfile import SecretFileError, read_secret_file

MAX_DSN_FILE_BYTES = 4096
# libpq keys whose values are secrets: never on a command line, never shown
SECRET_KEYS = frozenset({"password", "sslpassword"})
_ALTERNATIVES = (
    "give the password through --store-dsn-env NAME or --store-dsn-file PATH, "
    "or libpq's PGPASSWORD / PGPASSFILE (~/.pgpass)"
)


class DsnError(ValueError):
    """The DSN or its source is unusable; the message names the flag, variable or file, never the password."""


@dataclass(frozen=True)
class StoreDsn:
    """A validated DSN and where it came from. `repr` and `str` are redacted, so logging one is safe."""

    dsn: str = field(repr=False)
    source: str  # "--store-dsn", "$NAME" or a file path: for error messages and /status

    def redacted(self) -> str:
        return redacted(self.dsn)

    def __str__(self) -> str:
        return f"{self.redacted()} (from {self.source})"


def _parse(dsn: str, where: str) -> Mapping[str, object]:
    """The DSN's keys; an unparseable DSN is an error that does not echo it (it may hold a password)."""
    if not dsn.strip():
        raise DsnError(f"{where}: empty DSN")
    if "://" in dsn and not dsn.startswith(("postgres://", "postgresql://")):
        raise DsnError(f"{where}: not a PostgreSQL DSN (expected postgres://... or key=value pairs)")
    try:
        return conninfo.conninfo_to_dict(dsn)
    except Exception:  # psycopg's message may quote the DSN, password included
        raise DsnError(f"{where}: not a valid PostgreSQL DSN") from None


def from_argument(value: str, *, flag: str = "--store-dsn") -> StoreDsn:
    """A DSN given on the command line: valid, and holding no password (see the module docstring)."""
    parts = _parse(value, flag)
    secret = sorted(key for key in SECRET_KEYS if parts.get(key))
    if secret:
        raise DsnError(
            f"{flag}: the DSN holds a {secret[0]}, and a command line is visible to every user; {_ALTERNATIVES}"
        )
    return StoreDsn(value, flag)


def from_env(name: str, environ: Mapping[str, str] | None = None) -> StoreDsn:
    """The DSN held by environment variable `name` (it may hold a password: the environment is the process's own)."""
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        raise DsnError(f"--store-dsn-env: environment variable {name} is not set")
    _parse(value, f"environment variable {name}")
    return StoreDsn(value, f"${name}")


def from_file(path: Path) -> StoreDsn:
    """The DSN in a file, read strictly: a regular file reached without following a symbolic link at its last
    component (as statefile reads state), at most MAX_DSN_FILE_BYTES, UTF-8, one line (one trailing newline
    stripped). A secret file mounted by Kubernetes is a symlink into `..data/`: point the flag at the target
    or mount it with subPath."""
    where = f"--store-dsn-file {path}"
    try:
        data = read_secret_file(path, flag="--store-dsn-file", max_bytes=MAX_DSN_FILE_BYTES, holds="one DSN")
    except SecretFileError as error:
        raise DsnError(str(error)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError(f"{where}: not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if "\n" in text or "\r" in text:
        raise DsnError(f"{where}: more than one line; it should hold one DSN")
    _parse(text, where)
    return StoreDsn(text, str(path))


def resolve(*, store: str | None, dsn_env: str | None, dsn_file: Path | None) -> StoreDsn:
    """The one DSN source the options name (exactly one of them)."""
    given = [name for name, value in (("--store-dsn", store), ("--store-dsn-env", dsn_env),
                                      ("--store-dsn-file", dsn_file)) if value is not None]  # fmt: skip
    if len(given) != 1:
        raise DsnError(
            "--store postgres needs its DSN exactly once (--store-dsn, --store-dsn-env or --store-dsn-file), "
            f"got {', '.join(given) or 'none'}"
        )
    if store is not None:
        return from_argument(store)
    if dsn_env is not None:
        return from_env(dsn_env)
    assert dsn_file is not None
    return from_file(dsn_file)


def redacted(dsn: str) -> str:
    """The DSN as key=value pairs without any secret key, for logs and /status; an unparseable one is not shown."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<invalid DSN, not shown>"
    shown = {key: value for key, value in parts.items() if key not in SECRET_KEYS}
    if len(shown) != len(parts):
        shown["password"] = "redacted"
    return conninfo.make_conninfo(**shown)  # type: ignore[arg-type]
