"""The policy tree on disk: every YAML file under a root, read in a stable order.

Reading is kept apart from validation (`parse_policy` is pure), so the same texts can come from a
directory, a git commit or a test, and always load to the same `Policy`.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.regularfile import READ_CHUNK as READ_CHUNK  # the chunk policy files are read and downloaded in
from controlplane.regularfile import FileTooLarge, NotRegularFile, read_regular

POLICY_SUFFIXES = (".yaml", ".yml")
DEFAULT_MAX_FILE_BYTES = 4 * 1024 * 1024
"""Per policy file: ~100,000 lines, far beyond any hand-written file (the largest example is 10 KB)."""
DEFAULT_MAX_TREE_BYTES = 32 * 1024 * 1024
"""Per tree: thousands of backends and bindings fit in a few MB; parsed, 32 MB of YAML is already ~1 GB."""
DEFAULT_MAX_FILES = 2000
"""Per tree: read through GitLab's API, each file is one request of the budget the served policy shares."""


def _is_policy_file(name: str) -> bool:
    """YAML only; hidden files and editor leftovers (`.#x.yaml`, `x.yaml~`, swap files) are not policy."""
    if name.startswith(".") or name.endswith(("~", ".swp")):
        return False
    return name.endswith(POLICY_SUFFIXES)


DIRECTORY_LINK = "a symlink to a directory: not followed (link the files, or copy the directory)"


def _policy_paths(root: Path) -> tuple[list[Path], list[Path]]:
    """The policy files under `root`, and the symlinks to directories met (not followed, but reported:
    skipped in silence, a team's directory linked in would drop out of the policy unnoticed)."""
    found: list[Path] = []
    linked: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .git, .cache ...
        linked.extend(Path(directory, d) for d in subdirs if os.path.islink(os.path.join(directory, d)))
        found.extend(Path(directory, name) for name in names if _is_policy_file(name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix()), linked


def _root_error(root: Path, message: str) -> PolicyInvalid:
    # line 0: the problem is the directory itself, not a line of any file
    return PolicyInvalid([PolicyError(str(root), 0, "", message)])


@dataclass(frozen=True)
class ReadLimits:
    """How much a policy tree may hold. A policy is text people review: megabytes of it is a mistake or an
    attack, and parsing keeps every node in memory (~30x the text), so the bounds keep the server's memory
    bounded whatever is dropped into the tree."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_tree_bytes: int = DEFAULT_MAX_TREE_BYTES
    max_files: int = DEFAULT_MAX_FILES


DEFAULT_LIMITS = ReadLimits()


def read_policy_dir(root: Path, limits: ReadLimits = DEFAULT_LIMITS) -> dict[str, str]:
    """{posix path relative to root: text} for every policy file under `root`, in sorted order.

    Only regular files inside the tree are read (a symlink may point elsewhere in the tree, as Kubernetes
    ConfigMap volumes do); a FIFO, device or socket, a symlink leading out of the tree, a symlink to a
    directory (never followed: hidden ones such as `..data` aside) and a file or tree over `limits` are
    errors naming the file. No read can block: types are checked before opening, the
    open does not wait, and reads stop at the bound. Raises `PolicyInvalid` with every such error, naming
    the directory when it is missing or holds no policy file.
    """
    if not root.is_dir():
        raise _root_error(root, "policy directory does not exist (or is not a directory)")
    inside = os.path.realpath(root)
    texts: dict[str, str] = {}
    errors: list[PolicyError] = []
    total = 0
    paths, linked = _policy_paths(root)
    if len(paths) > limits.max_files:
        raise _root_error(root, too_many_files(len(paths), limits.max_files))
    errors.extend(PolicyError(link.relative_to(root).as_posix(), 1, "", DIRECTORY_LINK) for link in linked)
    for path in paths:
        name = path.relative_to(root).as_posix()
        data = _read_policy_file(path, inside, limits.max_file_bytes)
        if isinstance(data, str):
            errors.append(PolicyError(name, 1, "", data))
            continue
        total += len(data)
        if total > limits.max_tree_bytes:
            errors.append(PolicyError(name, 1, "", tree_too_large(total, limits.max_tree_bytes)))
            break  # nothing more is read: the bound is on what the server holds
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(PolicyError(name, 1, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
    if errors:
        raise PolicyInvalid(errors)
    if not texts:
        raise _root_error(root, f"no policy files ({', '.join('*' + s for s in POLICY_SUFFIXES)}) in {root}")
    return texts


def file_too_large(size: int, limit: int, flag: str | None = "--max-policy-file-bytes") -> str:
    see = f"; see {flag}" if flag else ""
    return f"file is larger than the {limit}-byte limit ({size} bytes or more{see})"


def too_many_files(count: int, limit: int) -> str:
    return f"policy tree holds {count} policy files, more than the {limit} a tree may hold (see --max-policy-files)"


def tree_too_large(total: int, limit: int) -> str:
    return (
        f"policy tree exceeds its size limit: {total} bytes with this file, more than the {limit}-byte limit "
        "(see --max-policy-tree-bytes)"
    )


def _read_policy_file(path: Path, inside: str, limit: int) -> bytes | str:
    """The file's bytes, or why it is refused. Nothing about a file outside the tree is told, not even its path."""
    try:
        st = os.lstat(path)
        target = str(path)
        if stat.S_ISLNK(st.st_mode):  # the walk does not follow directory symlinks: only file links can leave
            target = os.path.realpath(path)
            if os.path.commonpath([target, inside]) != inside:
                return "a symlink leading outside the policy tree: only files inside the tree are read"
            st = os.stat(target)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return _read_regular(target, st.st_mode, limit, os.O_NOFOLLOW, "--max-policy-file-bytes")


def read_regular_file(path: str, limit: int) -> bytes | str:
    """The bytes of a regular file of at most `limit` bytes (symlinks followed), or why it is refused.

    For files the policy names by absolute path (injected secrets), read during a reload: the same guarantee
    as for policy files, that a FIFO or device cannot block or bloat the reload.
    """
    return _read_regular(path, None, limit, 0, None)


def _read_regular(target: str, mode: int | None, limit: int, flags: int, flag: str | None) -> bytes | str:
    try:
        return read_regular(target, limit, mode=mode, flags=flags)
    except NotRegularFile as refused:
        return f"not a regular file ({refused.kind}): only regular files are read"
    except FileTooLarge as large:
        return file_too_large(large.size, limit, flag)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"


def load_policy_dir(root: Path, limits: ReadLimits = DEFAULT_LIMITS) -> Policy:
    """The validated policy under `root`; `PolicyInvalid` with every error otherwise."""
    return parse_policy(read_policy_dir(root, limits))
