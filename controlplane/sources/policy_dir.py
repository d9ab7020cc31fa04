"""The policy tree on disk: every YAML file under a root, read in a stable order.

Reading is kept apart from validation (`parse_policy` is pure), so the same texts can come from a
directory, a git commit or a test, and always load to the same `Policy`.
"""

from __future__ import annotations

import os
from pathlib import Path

from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.load import parse_policy
from controlplane.model.policy import Policy

POLICY_SUFFIXES = (".yaml", ".yml")


def _is_policy_file(name: str) -> bool:
    """YAML only; hidden files and editor leftovers (`.#x.yaml`, `x.yaml~`, swap files) are not policy."""
    if name.startswith(".") or name.endswith(("~", ".swp")):
        return False
    return name.endswith(POLICY_SUFFIXES)


def _policy_paths(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .git, .cache ...
        found.extend(Path(directory, name) for name in names if _is_policy_file(name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _root_error(root: Path, message: str) -> PolicyInvalid:
    # line 0: the problem is the directory itself, not a line of any file
    return PolicyInvalid([PolicyError(str(root), 0, "", message)])


def read_policy_dir(root: Path) -> dict[str, str]:
    """{posix path relative to root: text} for every policy file under `root`, in sorted order.

    Raises `PolicyInvalid` naming the directory when it is missing or holds no policy file, and
    naming each file that cannot be read as UTF-8.
    """
    if not root.is_dir():
        raise _root_error(root, "policy directory does not exist (or is not a directory)")
    texts: dict[str, str] = {}
    errors: list[PolicyError] = []
    for path in _policy_paths(root):
        name = path.relative_to(root).as_posix()
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            errors.append(PolicyError(name, 1, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}"))
        except OSError as exc:
            errors.append(PolicyError(name, 1, "", f"cannot read: {exc.strerror or exc}"))
    if errors:
        raise PolicyInvalid(errors)
    if not texts:
        raise _root_error(root, f"no policy files ({', '.join('*' + s for s in POLICY_SUFFIXES)}) in {root}")
    return texts


def load_policy_dir(root: Path) -> Policy:
    """The validated policy under `root`; `PolicyInvalid` with every error otherwise."""
    return parse_policy(read_policy_dir(root))
