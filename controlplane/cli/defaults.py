"""The command line's defaults are read from the option dataclasses, so a flag and its option cannot drift."""

from __future__ import annotations

import dataclasses
from typing import Any


def option_default(options: type, name: str) -> Any:
    """The default of field `name` of the dataclass `options` (a field without one is a programming error)."""
    for field in dataclasses.fields(options):
        if field.name == name:
            if field.default is not dataclasses.MISSING:
                return field.default
            if field.default_factory is not dataclasses.MISSING:
                return field.default_factory()
            break
    raise LookupError(f"{options.__name__}.{name} has no default")
