"""The ids project paths resolved to, remembered across restarts.

Paths are not identities: if `acme/app` meant project 42 yesterday and a new project took that path today,
access must not silently move to it. GitLab's redirect routes forget the old meaning once a path is re-used,
so the control plane keeps its own record, in a small JSON file in its state directory.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("controlplane.pins")

Pins = dict[str, dict[str, int]]  # issuer → project path → project id


class PinStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: Pins = {}

    def load(self) -> Pins:
        """The remembered pins; an unreadable file is reported and treated as empty (never as a crash)."""
        try:
            raw = json.loads(self.path.read_text())
            pins = {str(i): {str(p): int(v) for p, v in paths.items()} for i, paths in raw["pins"].items()}
        except FileNotFoundError:
            pins = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            log.error("cannot read %s (%s): starting without remembered project ids", self.path, error)
            pins = {}
        self._saved = pins
        return {i: dict(p) for i, p in pins.items()}

    def save(self, pins: Mapping[str, Mapping[str, int]]) -> None:
        """Merged with what is remembered (a path dropped from the policy keeps its meaning), atomically."""
        merged: Pins = {i: dict(p) for i, p in self._saved.items()}
        for issuer, paths in pins.items():
            merged.setdefault(issuer, {}).update(paths)
        if merged == self._saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pins-", dir=self.path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump({"version": 1, "pins": merged}, out, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
        self._saved = merged

    @property
    def current(self) -> Pins:
        return {i: dict(p) for i, p in self._saved.items()}
