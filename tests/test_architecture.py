"""The structure docs/architecture.md describes, enforced: layers import only downward (import-linter, with the
contracts in pyproject.toml), and the layers documented as pure keep no hidden state at module level (no
caches, counters, memos or mutable globals: whatever they reuse is owned by an object their caller holds)."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import itertools
import os
import pkgutil
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PURE_PACKAGES = ("controlplane.model", "controlplane.resolved", "controlplane.compiler")
PURE_MODULES = ("controlplane.xds.protocol", "controlplane.xds.delta", "controlplane.xds.memo")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_layer_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _tree_with(tmp_path: Path, module: str, line: str) -> Path:
    shutil.copytree(ROOT / "controlplane", tmp_path / "controlplane", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "controlplane" / module
    target.write_text(target.read_text() + f"\n{line}\n")
    return tmp_path


def test_an_upward_import_breaks_the_layer_contract(tmp_path: Path) -> None:
    result = _lint_imports(_tree_with(tmp_path, "compiler/util.py", "import controlplane.xds.server"))
    assert result.returncode != 0
    assert "controlplane.compiler is not allowed to import controlplane.xds" in result.stdout


def test_a_clock_or_file_access_in_the_pure_core_breaks_its_contract(tmp_path: Path) -> None:
    result = _lint_imports(_tree_with(tmp_path, "resolved/conditions.py", "import time\nfrom pathlib import Path"))
    assert result.returncode != 0
    assert "controlplane.resolved is not allowed to import time" in result.stdout
    assert "controlplane.resolved is not allowed to import pathlib" in result.stdout


# -- module state ---------------------------------------------------------------------------------------------


def _pure_modules() -> Iterator[types.ModuleType]:
    for name in PURE_PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            yield importlib.import_module(info.name)
    yield from map(importlib.import_module, PURE_MODULES)


_MUTABLE = (dict, list, set, bytearray)
# Set by typing.NamedTuple on every class it makes: machinery, not state the class body wrote.
_CLASS_MACHINERY = frozenset({"_field_defaults"})


def _state(module: str, name: str, value: object) -> str | None:
    """Why `value`, bound to `name` at module level, is state kept between calls; None when it is not.

    Whatever its name: a constant is frozen (MappingProxyType, frozenset, tuple), so nothing can change it."""
    if isinstance(value, (type, types.ModuleType)):
        return None
    if callable(value) and hasattr(value, "cache_info") and getattr(value, "__module__", None) == module:
        return "a cache kept by the module (functools.lru_cache/cache)"
    if isinstance(value, itertools.count):
        return "a counter kept by the module"
    if isinstance(value, _MUTABLE):
        return f"a mutable {type(value).__name__} (a constant is a MappingProxyType, frozenset or tuple)"
    if isinstance(value, Message):
        return f"a protobuf message ({type(value).__name__}): mutable, shared by every caller"
    kind = type(value)
    if callable(value) or not kind.__module__.startswith("controlplane"):
        return None
    frozen = dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen  # type: ignore[attr-defined]
    if frozen or isinstance(value, (tuple, enum.Enum)):
        return None
    return f"an instance of {kind.__qualname__}, an object with state"


def _class_state(name: str, value: object) -> str | None:
    """Why a class attribute is state shared by every instance (and every caller); None when it is not."""
    if (name.startswith("_") and name.endswith("_")) or name in _CLASS_MACHINERY:
        return None  # dunders and sunders: the class machinery's (dataclass fields, enum members)
    if isinstance(value, _MUTABLE):
        return f"a mutable {type(value).__name__} on the class, shared by every instance"
    if isinstance(value, Message):
        return f"a protobuf message ({type(value).__name__}) on the class, shared by every instance"
    return None


def _findings(modules: Iterator[types.ModuleType]) -> list[str]:
    found = []
    for m in modules:
        for name, value in vars(m).items():
            if not name.startswith("__") and (why := _state(m.__name__, name, value)):
                found.append(f"{m.__name__}.{name}: {why}")
            if isinstance(value, type) and value.__module__ == m.__name__:
                found.extend(
                    f"{m.__name__}.{name}.{attr}: {why}"
                    for attr, held in vars(value).items()
                    if (why := _class_state(attr, held))
                )
    return found


def test_the_pure_layers_keep_no_module_state() -> None:
    assert _findings(_pure_modules()) == []


def test_module_state_is_found_where_there_is_some() -> None:
    source = """
import dataclasses, enum, functools, itertools, types
from typing import NamedTuple
from google.protobuf import struct_pb2
class Memo:
    def __init__(self): self.seen = {}
@functools.lru_cache(maxsize=8)
def cached(x): return x
COUNTER = itertools.count()
_MEMO = Memo()
seen = {}
LIMITS = {"a": 1}
_NAMES = ["a"]
ALLOWED = {"a"}
_BUFFER = bytearray()
_DEFAULT = struct_pb2.Struct()
FROZEN_LIMITS = types.MappingProxyType({"a": 1})
FROZEN_NAMES = ("a",)
FROZEN_SET = frozenset({"a"})
class Registry:
    known = {}
    plain = "fine"
    frozen = types.MappingProxyType({})
class Template:
    shared = struct_pb2.Value()
@dataclasses.dataclass(frozen=True)
class Point:
    x: int = 0
class Colour(enum.Enum):
    RED = 1
class Pair(NamedTuple):
    a: int = 0
"""
    module = types.ModuleType("controlplane.fake_pure")
    exec(compile(source, "fake_pure.py", "exec", dont_inherit=True), module.__dict__)
    for kind in (module.Memo, module.Registry, module.Template, module.Point, module.Colour, module.Pair):
        kind.__module__ = "controlplane.fake_pure"
    found = _findings(iter([module]))
    assert [f.split(":")[0] for f in found] == [
        "controlplane.fake_pure.cached",
        "controlplane.fake_pure.COUNTER",
        "controlplane.fake_pure._MEMO",
        "controlplane.fake_pure.seen",
        "controlplane.fake_pure.LIMITS",
        "controlplane.fake_pure._NAMES",
        "controlplane.fake_pure.ALLOWED",
        "controlplane.fake_pure._BUFFER",
        "controlplane.fake_pure._DEFAULT",
        "controlplane.fake_pure.Registry.known",
        "controlplane.fake_pure.Template.shared",
    ]
