"""The ids project paths resolved to, remembered across restarts.

Paths are not identities: if `acme/app` meant project 42 yesterday and a new project took that path today,
access must not silently move to it. GitLab's redirect routes forget the old meaning once a path is re-used,
so the control plane keeps its own record, in a small JSON file in its state directory (written and read through
`controlplane.statefile`: a corrupt file stops the start instead of forgetting every pin).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from controlplane.statefile import StateFileError, atomic_write_json, malformed, read_json, report_write_failure

log = logging.getLogger("controlplane.pins")

PINS_FILE = "pins.json"  # its name in the state directory

Pins = dict[str, dict[str, int]]  # issuer → project path → project id


class RememberedPins(Protocol):
    """What the policy service needs: `PinStore` (a file) or `PostgresPinStore` (shared by replicas).

    Synchronous on purpose: `save` is called by the compiler in the policy service's worker thread."""

    def load(self) -> Pins: ...

    def save(self, pins: Mapping[str, Mapping[str, int]]) -> None: ...

    @property
    def current(self) -> Pins: ...


class PinStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: Pins = {}
        self._unwritten = False  # the last write failed: the next save writes even without a change

    def load(self) -> Pins:
        """The remembered pins ({} on a first start). Raises `StateFileError` when the file cannot be read."""
        document = read_json(self.path)
        pins = {} if document is None else self._parse(document)
        self._saved = pins
        return {i: dict(p) for i, p in pins.items()}

    def _parse(self, document: object) -> Pins:
        raw = document.get("pins") if isinstance(document, dict) else None
        if not isinstance(raw, dict) or not all(isinstance(paths, dict) for paths in raw.values()):
            raise malformed(self.path, 'expected an object with a "pins" object (issuer -> path -> project id)')
        pins: Pins = {}
        for issuer, paths in raw.items():
            for path, project_id in paths.items():
                if not isinstance(project_id, int) or isinstance(project_id, bool) or project_id < 1:
                    raise malformed(self.path, f"pins.{issuer}.{path}: the project id is not a positive integer")
                pins.setdefault(str(issuer), {})[str(path)] = project_id
        return pins

    def save(self, pins: Mapping[str, Mapping[str, int]]) -> None:
        """Merged with what is remembered (a path dropped from the policy keeps its meaning), atomically.

        A failed write is reported and the merged pins are kept in memory (they are what the compiler uses);
        the next call writes them again."""
        merged: Pins = {i: dict(p) for i, p in self._saved.items()}
        for issuer, paths in pins.items():
            merged.setdefault(issuer, {}).update(paths)
        if merged == self._saved and not self._unwritten:
            return
        self._saved = merged
        try:
            atomic_write_json(self.path, {"version": 1, "pins": merged})
        except StateFileError as error:
            self._unwritten = True
            report_write_failure(self.path, error, "the project ids are kept in memory, not yet on disk")
        else:
            self._unwritten = False

    @property
    def current(self) -> Pins:
        return {i: dict(p) for i, p in self._saved.items()}
