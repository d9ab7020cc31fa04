"""The structure docs/architecture.md describes, enforced: layers import only downward (import-linter, with the
contracts in pyproject.toml), and the layers documented as pure keep no hidden state (no caches, counters, memos
or mutable globals: whatever they reuse is owned by an object their caller holds). Two passes: (a) every value a
pure module or one of its classes holds is on an allow-list of immutable types, all the way down (functions
included: their closures, defaults, caches, attributes; enum members: their values); (b) the source makes no state
for later calls (mutable default arguments, class attributes written in methods, `global`/`nonlocal`, closures
over a mutable local that outlive the call, writes into `globals()` or onto a module-level function)."""

from __future__ import annotations
import __future__

import ast
import dataclasses
import enum
import importlib
import itertools
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path

from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PURE_PACKAGES = ("controlplane.model", "controlplane.resolved", "controlplane.compiler", "controlplane.assistant")
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


# -- (a) at run time: every value a pure module holds is of a type on this allow-list, all the way down.

# Values that cannot change once made. Containers are only as immutable as what they hold: checked recursively.
_IMMUTABLE_SCALARS = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis), re.Pattern)
_IMMUTABLE_CONTAINERS = (tuple, frozenset, types.MappingProxyType)
# Type-level objects: annotations and aliases (`X = int | str`, `tuple[str, ...]`), not values anyone can add to.
_TYPING = (type, types.UnionType, types.GenericAlias, typing.TypeVar, type(typing.Any), __future__._Feature)
_TYPING_PRIVATE = ("typing._GenericAlias", "typing._UnionGenericAlias", "typing._SpecialForm", "typing._LiteralGeneric")
# Descriptors a class body creates for its own machinery (slots, NamedTuple fields): they hold no data themselves.
_DESCRIPTORS = (types.MemberDescriptorType, types.GetSetDescriptorType, types.WrapperDescriptorType)
_DESCRIPTORS_PRIVATE = ("_collections._tuplegetter",)
# Set on classes by typing.NamedTuple and abc: machinery, not state the class body wrote.
_CLASS_MACHINERY = frozenset({"_field_defaults", "_abc_impl"})
SOURCE_ROOT = ROOT / "controlplane"


def _type_name(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _is_typing(value: object) -> bool:
    return isinstance(value, _TYPING) or _type_name(value) in _TYPING_PRIVATE


def _written_here(function: types.FunctionType) -> bool:
    """Code in controlplane's own files, not code a library generated for a class (dataclass __init__ and
    __repr__, NamedTuple's _make): that machinery's closures are the library's, and the same for every class."""
    return Path(function.__code__.co_filename).is_relative_to(SOURCE_ROOT)


def _ours(value: object) -> bool:
    return str(getattr(value, "__module__", "") or "").startswith("controlplane")


def _why_mutable(value: object, seen: frozenset[int] = frozenset()) -> str | None:
    """Why `value` (reachable from a pure module) can hold state between calls; None when it cannot."""
    if id(value) in seen or isinstance(value, _IMMUTABLE_SCALARS) or _is_typing(value):
        return None
    seen |= {id(value)}
    if isinstance(value, Message):
        return f"a protobuf message ({type(value).__name__}): mutable, shared by every caller"
    if isinstance(value, enum.Enum):  # a singleton, but what it holds is shared by every caller
        held = {"value": value.value, **{k: v for k, v in vars(value).items() if not k.startswith("_")}}
        for attr, part in held.items():
            if why := _why_mutable(part, seen):
                return f"an enum member whose {attr} is {why}"
        return None
    if isinstance(value, _IMMUTABLE_CONTAINERS):
        items = value.items() if isinstance(value, types.MappingProxyType) else ((v, None) for v in value)
        for held in itertools.chain.from_iterable(items):
            if why := _why_mutable(held, seen):
                return f"a {type(value).__name__} holding {why}"
        return None
    if isinstance(value, types.ModuleType):
        return None
    functions = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, staticmethod)
    if isinstance(value, functions) or (callable(value) and hasattr(value, "cache_info")):
        return _why_function(value, seen)
    if isinstance(value, classmethod):
        return _why_function(value.__func__, seen)
    if isinstance(value, property):
        parts = (value.fget, value.fset, value.fdel)
        return next((why for part in parts if part is not None and (why := _why_function(part, seen))), None)
    if isinstance(value, _DESCRIPTORS) or _type_name(value) in _DESCRIPTORS_PRIVATE:
        return None
    if type(value) is object:
        return None  # a bare sentinel (`_MISSING = object()`): it has no attributes to change
    kind = type(value)
    if _ours(kind) and dataclasses.is_dataclass(kind) and kind.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        for f in dataclasses.fields(kind):
            if why := _why_mutable(getattr(value, f.name), seen):
                return f"a frozen {kind.__qualname__} whose {f.name} is {why}"
        return None
    return f"a {kind.__module__}.{kind.__qualname__} (not on the allow-list of immutable types)"


def _why_function(value: object, seen: frozenset[int]) -> str | None:
    """A function is state when it carries some: a cache, a wrapped original, a bound object, a closure's cells,
    mutable default arguments, mutable attributes of its own."""
    if isinstance(value, staticmethod):
        value = value.__func__
    if isinstance(value, types.MethodType) or (
        isinstance(value, types.BuiltinFunctionType) and not isinstance(value.__self__, (types.ModuleType, type(None)))
    ):
        bound = value.__self__
        return f"a method bound to a {type(bound).__name__} (its object keeps state)"
    if not _ours(value):
        return None  # a library's function (urllib's urlsplit keeps its own lru_cache): not this module's state
    if hasattr(value, "cache_info") or hasattr(value, "cache_clear"):
        return "a cache (functools.lru_cache/cache)"
    if not isinstance(value, types.FunctionType) or not _written_here(value):
        return None
    if hasattr(value, "__wrapped__"):
        return "a wrapper around another callable (a decorator's state cannot be seen)"
    for cell in value.__closure__ or ():
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell: a name the enclosing function has not bound yet
            continue
        if why := _why_mutable(held, seen):
            return f"a closure over {why}"
    defaults = (*(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values())
    for default in defaults:
        if why := _why_mutable(default, seen):
            return f"a default argument that is {why}"
    for attr, held in vars(value).items():  # `f.memo = {}`, `f.__dict__.setdefault("memo", {})`
        if why := _why_mutable(held, seen):
            return f"a function whose attribute {attr} is {why}"
    return None


def _class_findings(qualname: str, cls: type) -> Iterator[str]:
    """Class attributes are shared by every instance (and every caller): values, methods, static and class
    methods, properties are checked as module values are."""
    for attr, held in vars(cls).items():
        if isinstance(held, type) and held.__module__ == cls.__module__:
            yield from _class_findings(f"{qualname}.{attr}", held)
            continue
        callable_like = isinstance(held, (types.FunctionType, staticmethod, classmethod, property))
        machinery = (attr.startswith("_") and attr.endswith("_")) or attr in _CLASS_MACHINERY
        if machinery and not callable_like:
            continue  # dunders and sunders: the class machinery's (dataclass fields, enum members, slots)
        if why := _why_mutable(held):
            yield f"{qualname}.{attr}: {why} on the class, shared by every instance"


def _findings(modules: Iterator[types.ModuleType]) -> list[str]:
    found = []
    for m in modules:
        for name, value in vars(m).items():
            if name.startswith("__") and name.endswith("__"):
                continue
            if isinstance(value, type):
                if value.__module__ == m.__name__:
                    found.extend(_class_findings(f"{m.__name__}.{name}", value))
                continue
            if why := _why_mutable(value):
                found.append(f"{m.__name__}.{name}: {why}")
    return found


# -- (b) in the source: state a function makes for later calls, which no module attribute shows until it runs.

_MUTABLE_CALLS = frozenset(
    {"dict", "list", "set", "bytearray", "defaultdict", "OrderedDict", "Counter", "deque", "array", "SimpleNamespace"}
    | {"WeakValueDictionary", "WeakKeyDictionary", "WeakSet", "count"}
)
_MUTABLE_NODES = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


def _makes_mutable(node: ast.AST | None) -> bool:
    if isinstance(node, _MUTABLE_NODES):
        return True
    if isinstance(node, ast.Call):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return name in _MUTABLE_CALLS
    return False


def _is_class_target(node: ast.AST, classes: frozenset[str]) -> bool:
    """`cls.x`, `type(self).x`, `self.__class__.x`, `SomeClass.x` (a class of this module): a class attribute."""
    if not isinstance(node, ast.Attribute):
        return False
    owner = node.value
    if isinstance(owner, ast.Name):
        return owner.id == "cls" or owner.id in classes
    if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name):
        return owner.func.id == "type"
    return isinstance(owner, ast.Attribute) and owner.attr == "__class__"


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return [t for target in node.targets for t in ast.walk(target)]
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    if isinstance(node, ast.Delete):
        return list(node.targets)
    if isinstance(node, ast.Call) and node.args and _sets_an_attribute(node.func):
        return [ast.Attribute(value=node.args[0], attr="?", ctx=ast.Store())]
    return []


def _sets_an_attribute(func: ast.expr) -> bool:
    """`setattr`, `delattr`, and `object.__setattr__`/`type.__setattr__` (and `__delattr__`), which get past a
    class's own `__setattr__`: all write an attribute of their first argument."""
    if isinstance(func, ast.Name):
        return func.id in ("setattr", "delattr")
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
        return False
    return func.attr in ("__setattr__", "__delattr__") and func.value.id in ("object", "type")


_MUTATORS = frozenset({"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"})


def _shared_namespace(node: ast.AST, functions: frozenset[str]) -> str | None:
    """`globals()`, `f.__dict__`, `vars(f)` (f a module-level function): a namespace that outlives every call."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == "globals" and not node.args:
            return "the module's globals()"
        held = node.args[0] if node.func.id == "vars" and len(node.args) == 1 else None
        if isinstance(held, ast.Name) and held.id in functions:
            return f"the attributes of the function {held.id}"
    if isinstance(node, ast.Attribute) and node.attr == "__dict__" and isinstance(node.value, ast.Name):
        return f"the attributes of the function {node.value.id}" if node.value.id in functions else None
    return None


def _shared_write(node: ast.AST, functions: frozenset[str]) -> str | None:
    """Writes that make state for later calls wherever they run: into `globals()`, onto a module-level function
    (`f.memo = {}`, `f.__dict__.setdefault(...)`: a memo every caller of `f` shares)."""
    for part in (p for target in _targets(node) for p in ast.walk(target)):
        if isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id in functions:
            return f"writes an attribute of the function {part.value.id}, shared by every call"
        if where := _shared_namespace(part, functions):
            return f"writes into {where}"
    func = node.func if isinstance(node, ast.Call) else None
    mutates = isinstance(func, ast.Attribute) and func.attr in _MUTATORS
    where = _shared_namespace(func.value, functions) if isinstance(func, ast.Attribute) and mutates else None
    return f"writes into {where}" if where else None


def _escapes(inner: str, function: ast.AST) -> bool:
    """The inner function outlives the call: returned, yielded, or stored on an object or in a container."""

    def names_it(node: ast.AST | None) -> bool:
        return node is not None and any(isinstance(n, ast.Name) and n.id == inner for n in ast.walk(node))

    for node in ast.walk(function):
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom)) and names_it(node.value):
            return True
        stores = isinstance(node, ast.Assign) and any(
            isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets
        )
        if stores and names_it(node.value):
            return True
    return False


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _own_scope(function: ast.AST) -> Iterator[ast.AST]:
    """The nodes of `function`'s body, not those of the functions it defines."""
    for child in ast.iter_child_nodes(function):
        yield child
        if not isinstance(child, _FUNCTIONS):
            yield from _own_scope(child)


def _bound_names(function: ast.AST) -> set[str]:
    arguments = getattr(function, "args", None)
    params = {a.arg for a in ast.walk(arguments) if isinstance(a, ast.arg)} if arguments is not None else set()
    stored = {n.id for n in _own_scope(function) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return params | stored


def _closure_findings(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[tuple[int, str]]:
    mutable = {
        target.id
        for node in _own_scope(function)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _makes_mutable(node.value)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    for inner in _own_scope(function):
        if not isinstance(inner, _FUNCTIONS):
            continue
        used = {n.id for n in ast.walk(inner) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        captured = sorted((used - _bound_names(inner)) & mutable)
        if not captured:
            continue
        name = getattr(inner, "name", None)
        returned_lambda = isinstance(inner, ast.Lambda) and any(
            isinstance(r, ast.Return) and r.value is not None and inner in list(ast.walk(r.value))
            for r in ast.walk(function)
        )
        if returned_lambda or (name is not None and _escapes(name, function)):
            yield inner.lineno, f"a closure over the mutable {', '.join(captured)} outlives the call"


def _source_findings(path: str, source: str) -> list[str]:
    tree = ast.parse(source)
    classes = frozenset(n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef))
    functions = frozenset(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    found: list[tuple[int, str]] = []
    for node in _own_scope(tree):  # the module's own statements: what runs once, at import
        if why := _shared_write(node, functions):
            found.append((node.lineno, f"<module>: {why}"))
    for function in (n for n in ast.walk(tree) if isinstance(n, _FUNCTIONS)):
        name = getattr(function, "name", "<lambda>")
        arguments = function.args
        for default in (*arguments.defaults, *arguments.kw_defaults):
            if _makes_mutable(default):
                found.append((function.lineno, f"{name}: a mutable default argument, shared by every call"))
        for node in _own_scope(function):  # each function reports its own body, nested ones theirs
            if isinstance(node, (ast.Global, ast.Nonlocal)):
                kind = type(node).__name__.lower()
                found.append((node.lineno, f"{name}: `{kind} {', '.join(node.names)}` rebinds outer state"))
            for target in _targets(node):
                if _is_class_target(target, classes):
                    found.append((node.lineno, f"{name}: writes a class attribute, shared by every instance"))
            if why := _shared_write(node, functions):
                found.append((node.lineno, f"{name}: {why}"))
        if not isinstance(function, ast.Lambda):
            found.extend((line, f"{name}: {why}") for line, why in _closure_findings(function))
    return [f"{path}:{line}: {why}" for line, why in sorted(set(found))]


def _pure_sources() -> Iterator[tuple[str, str]]:
    for module in _pure_modules():
        file = Path(module.__file__ or "")
        yield file.relative_to(ROOT).as_posix(), file.read_text()


def test_the_pure_layers_keep_no_module_state() -> None:
    assert _findings(_pure_modules()) == []


def test_the_pure_layers_make_no_state_for_later_calls() -> None:
    assert [f for path, source in _pure_sources() for f in _source_findings(path, source)] == []


def test_module_state_is_found_where_there_is_some() -> None:
    source = """
import array, collections, dataclasses, enum, functools, itertools, re, types, weakref
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
PATTERN = re.compile("a+")
NESTED = types.MappingProxyType({"a": (1, frozenset({"b"})), "c": types.MappingProxyType({})})
_SENTINEL = object()
def _make_lookup():
    known = {}
    def lookup(key): return known.setdefault(key, len(known))
    return lookup
lookup = _make_lookup()
def remember(key, _memo={}): return _memo.setdefault(key, key)
def plain(key, default=(), *, limit=3): return key
BY_REF = weakref.WeakValueDictionary()
BY_KEY = weakref.WeakKeyDictionary()
RECENT = collections.deque(maxlen=4)
SAMPLES = array.array("i")
SETTINGS = types.SimpleNamespace(size=1)
BOUND = functools.partial(remember, "x")
HOLDS_A_DICT = ({},)
LISTS_BEHIND_A_PROXY = types.MappingProxyType({"a": []})
next_id = itertools.count().__next__
class Registry:
    known = {}
    plain = "fine"
    frozen = types.MappingProxyType({})
    n = 0
    def bump(self): type(self).n += 1
    @functools.cache
    def method_cache(self, x): return x
    @staticmethod
    @functools.cache
    def static_cache(x): return x
    @classmethod
    def with_default(cls, x, into=[]): return into
    @property
    def size(self): return 1
class Template:
    shared = struct_pb2.Value()
@dataclasses.dataclass(frozen=True)
class Point:
    x: int = 0
    tags: tuple = ()
@dataclasses.dataclass(frozen=True)
class Bag:
    items: list = dataclasses.field(default_factory=list)
ORIGIN = Point()
A_BAG = Bag()
class Colour(enum.Enum):
    RED = 1
class Pair(NamedTuple):
    a: int = 0
def with_memo(x): return x
with_memo.memo = {}
def grows(x): return grows.__dict__.setdefault("memo", {}).setdefault(x, x)
grows(1)
def marked(x): return x
marked.flag = True
class Shade(enum.Enum):
    DARK = {"a": 1}
    LIGHT = (1, ("b",))
class Tone(enum.Enum):
    LOUD = 1
    def __init__(self, level):
        self.seen = []
DEFAULT_SHADE = Shade.DARK
"""
    module = types.ModuleType("controlplane.fake_pure")
    filename = str(SOURCE_ROOT / "fake_pure.py")  # never written: the code only claims to come from there
    exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)
    kinds = (module.Memo, module.Registry, module.Template, module.Point, module.Bag, module.Colour, module.Pair)
    for kind in (*kinds, module.Shade, module.Tone):
        kind.__module__ = "controlplane.fake_pure"
    found = {f.split(":")[0].removeprefix("controlplane.fake_pure.") for f in _findings(iter([module]))}
    assert found == {
        *("cached", "COUNTER", "_MEMO", "seen", "LIMITS", "_NAMES", "ALLOWED", "_BUFFER", "_DEFAULT"),
        *("lookup", "remember", "BY_REF", "BY_KEY", "RECENT", "SAMPLES", "SETTINGS", "BOUND", "HOLDS_A_DICT"),
        *("LISTS_BEHIND_A_PROXY", "next_id", "A_BAG"),
        *("Registry.known", "Registry.method_cache", "Registry.static_cache", "Registry.with_default"),
        "Template.shared",
        *("with_memo", "grows", "Shade.DARK", "Tone.LOUD", "DEFAULT_SHADE"),
    }


def test_state_made_for_later_calls_is_found_in_the_source() -> None:
    """What no module attribute shows before the code runs: `type(self).n += 1` on an int, a closure made per
    call, `global`. Each line marked `# found` must be reported, and nothing else."""
    source = """
import collections, dataclasses
class Counter:
    n = 0
    def bump(self):
        type(self).n += 1  # found
    @classmethod
    def reset(cls):
        cls.n = 0  # found
    def other(self):
        self.__class__.n = 1  # found
        Counter.n = 2  # found
        setattr(type(self), "n", 3)  # found
        self.n = 4
def memo(key, cache={}):  # found
    return cache
def memo_kw(key, *, cache=collections.defaultdict(list)):  # found
    return cache
TOTAL = 0
def add(x):
    global TOTAL  # found
    TOTAL += x
def counter():
    count = 0
    def step():
        nonlocal count  # found
        count += 1
        return count
    return step
def make_lookup():
    known = {}
    def lookup(key):  # found
        return known.setdefault(key, key)
    return lookup
def make_lambda():
    seen = []
    return lambda x: seen.append(x)  # found
class Holder:
    def __init__(self):
        made = set()
        def check(x):  # found
            return x in made
        self.check = check
def memo_on_a_function(key):
    return memo_on_a_function.__dict__.setdefault("memo", {})  # found
def fills_a_function(key):
    memo_on_a_function.seen = key  # found
    memo_on_a_function.__dict__[key] = key  # found
    setattr(memo_on_a_function, "last", key)  # found
    vars(memo_on_a_function).update(last=key)  # found
memo_on_a_function.memo = {}  # found
def into_globals(key):
    globals()[key] = key  # found
    globals().update({key: key})  # found
    globals().setdefault(key, key)  # found
globals()["LATE"] = {}  # found
def on_a_class(value):
    object.__setattr__(Counter, "n", value)  # found
    type.__setattr__(Counter, "n", value)  # found
    object.__delattr__(Counter, "n")  # found
remember = lambda key, memo={}: memo.setdefault(key, key)  # found
@dataclasses.dataclass(frozen=True)
class Frozen:
    x: int
    def __post_init__(self):
        object.__setattr__(self, "x", int(self.x))
def fine(items):
    local = {}
    local.update(items)
    local.__dict__ = {}
    vars(local).update(a=1)
    def put(k):
        local[k] = 1
    for item in items:
        put(item)
    def own():
        mine = {}
        return mine
    return own, dict(local)
"""
    expected = [i for i, line in enumerate(source.splitlines(), start=1) if line.endswith("# found")]
    found = _source_findings("fake.py", source)
    assert [int(f.split(":")[1]) for f in found] == expected, "\n".join(found)
