"""The machinery every policy reader shares: a load's error context, converters, lists and mappings by key.

Reading is table driven: each kind lists its keys, and small converters (`Conv`) turn one located YAML node
into one typed value or report why not. Every field is read on its own and an element with any error is
dropped (`need`, `attempt`), so one load reports every mistake at once without building half an element.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeAlias, TypeVar

from controlplane.model.errors import Errors, PolicyError, Source, quoted
from controlplane.model.yaml_source import YMap, YNode, YSeq, child_path, describe

T = TypeVar("T")


class _Invalid(Exception):
    """An element cannot be built; its errors were already recorded."""


@dataclass
class Ctx:
    """The file being read and the error list shared by the whole load."""

    file: str
    errors: Errors

    def error(self, line: int, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.file, line, path, message))

    def source(self, line: int) -> Source:
        return Source(self.file, line)


Conv: TypeAlias = Callable[[Ctx, YNode, str], "T | None"]
"""Reads one node at a field path: the typed value, or None after recording why not."""

JsonSchema: TypeAlias = dict[str, object]
_SCHEMA_ATTR = "json_schema"


def with_schema(conv: Conv[T], schema: Mapping[str, object]) -> Conv[T]:
    """Declares what JSON Schema can say of the values `conv` accepts (model/schema.py reads it back).

    Kept on the converter itself, next to the code that checks, so the published schema and the loader have
    one source: every constructor below and in `scalars` passes its pattern, range or keys on to its result.
    The schema may be looser than the converter (a check it cannot express), never stricter.
    """
    setattr(conv, _SCHEMA_ATTR, _frozen(schema))  # frozen: converters are shared module state
    return conv


def schema_of(conv: Callable[..., object]) -> JsonSchema:
    """The schema declared for `conv` (a fresh copy the caller may change): {} (anything) when it declares none."""
    declared = _thawed(getattr(conv, _SCHEMA_ATTR, None))
    return declared if isinstance(declared, dict) else {}


def _frozen(value: object) -> object:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    return value


def _thawed(value: object) -> object:
    if isinstance(value, Mapping):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thawed(item) for item in value]
    return value


def need(value: T | None) -> T:
    """Used when assembling an element: a failed field (already reported) drops the whole element."""
    if value is None:
        raise _Invalid
    return value


def attempt(ctx: Ctx, build: Callable[[], T]) -> T | None:
    """Runs a builder that reads every field first; any error recorded meanwhile means no element."""
    before = len(ctx.errors)
    try:
        value = build()
    except _Invalid:
        return None
    return value if len(ctx.errors) == before else None


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {quoted(close[0])}?)" if close else ""


def one_of_message(what: str, value: str, choices: Collection[str]) -> str:
    return f"unknown {what} {quoted(value)}{suggest(value, choices)}; allowed: {', '.join(choices)}"


def fail(ctx: Ctx, node: YNode, path: str, expected: str) -> None:
    if not node.reported:
        ctx.error(node.line, path, f"expected {expected}, got {describe(node)}")


# --- collections ---------------------------------------------------------------------------------


def list_of(item: Conv[T], *, non_empty: bool = True, unique: bool = True) -> Conv[tuple[T, ...]]:
    """A YAML list of `item`s; duplicates are reported on the later item, naming the earlier line."""

    def read(ctx: Ctx, node: YNode, path: str) -> tuple[T, ...] | None:
        if not isinstance(node, YSeq) or node.reported:
            fail(ctx, node, path, "a list")
            return None
        if non_empty and not node.items:
            ctx.error(node.line, path, "must not be empty")
            return None
        values = _each(ctx, node.items, path, item)
        if values is None:
            return None
        located = [(v, n.line, child_path(path, i)) for i, (v, n) in enumerate(zip(values, node.items, strict=True))]
        if (unique and report_duplicates(ctx, located)) or any(v is None for v in values):
            return None
        return tuple(need(v) for v in values)

    schema: JsonSchema = {"type": "array", "items": schema_of(item)}
    if non_empty:
        schema["minItems"] = 1
    if unique:
        schema["uniqueItems"] = True
    return with_schema(read, schema)


def _each(ctx: Ctx, items: tuple[YNode, ...], path: str, item: Conv[T]) -> list[T | None] | None:
    """Every item read, or None once the file's errors are at their bound (a list of 2M bad items)."""
    values: list[T | None] = []
    for i, n in enumerate(items):
        if ctx.errors.full(ctx.file):
            ctx.errors.stop()
            return None
        values.append(item(ctx, n, child_path(path, i)))
    return values


def one_or_list(item: Conv[T]) -> Conv[tuple[T, ...]]:
    """A single value or a list of them (OR)."""
    many = list_of(item)

    def read(ctx: Ctx, node: YNode, path: str) -> tuple[T, ...] | None:
        if isinstance(node, YSeq):
            return many(ctx, node, path)
        value = item(ctx, node, path)
        return None if value is None else (value,)

    return with_schema(read, {"anyOf": [schema_of(item), schema_of(many)]})


def report_duplicates(ctx: Ctx, items: Iterable[tuple[object, int, str]]) -> bool:
    """Reports each repeated value at its later place; True if there was any."""
    first: dict[object, int] = {}
    found = False
    for value, line, path in items:
        if value is None:
            continue
        if ctx.errors.full(ctx.file):
            ctx.errors.stop()
            return True
        if value in first:
            ctx.error(line, path, f"duplicate value {quoted(value)} (first at line {first[value]})")
            found = True
        else:
            first[value] = line
    return found


class Fields:
    """One YAML mapping being read: unknown keys are reported up front, then fields are read by name."""

    def __init__(
        self,
        ctx: Ctx,
        node: YMap,
        path: str,
        allowed: Collection[str],
        misplaced: Mapping[str, str] | None = None,
    ) -> None:
        self.ctx, self.node, self.path = ctx, node, path
        for key, entry in node.entries.items():
            if key in allowed and not (misplaced and key in misplaced):
                continue
            if ctx.errors.full(ctx.file):  # 200,000 unknown keys: the first ones say it all
                ctx.errors.stop()
                break
            if misplaced and key in misplaced:
                ctx.error(entry.key_line, child_path(path, key), misplaced[key])
            elif key not in allowed:
                known = sorted(allowed)
                message = f"unknown key {quoted(key)}{suggest(key, known)}; allowed: {', '.join(known)}"
                ctx.error(entry.key_line, child_path(path, key), message)

    def has(self, key: str) -> bool:
        return key in self.node.entries

    def at(self, key: str) -> str:
        return child_path(self.path, key)

    def line(self, key: str) -> int:
        return self.node.key_line(key)

    def error(self, key: str, message: str) -> None:
        self.ctx.error(self.line(key), self.at(key), message)

    def required(self, key: str, conv: Conv[T], why: str = "") -> T | None:
        node = self.node.get(key)
        if node is None:
            self.ctx.error(self.node.line, self.at(key), f"missing required key{why}")
            return None
        return conv(self.ctx, node, self.at(key))

    def optional(self, key: str, conv: Conv[T], default: T) -> T | None:
        node = self.node.get(key)
        return default if node is None else conv(self.ctx, node, self.at(key))

    def optional_tuple(self, key: str, conv: Conv[tuple[T, ...]]) -> tuple[T, ...] | None:
        """Optional list-valued key: absent means the empty tuple (any, or none, as the field says)."""
        node = self.node.get(key)
        return () if node is None else conv(self.ctx, node, self.at(key))

    def maybe(self, key: str, conv: Conv[T]) -> T | None:
        node = self.node.get(key)
        return None if node is None else conv(self.ctx, node, self.at(key))


def record(
    build: Callable[[Fields], T], allowed: Collection[str], misplaced: Mapping[str, str] | None = None
) -> Conv[T]:
    """A converter for a nested mapping: checks the keys, then `build` reads them into one value."""

    def read(ctx: Ctx, node: YNode, path: str) -> T | None:
        if not isinstance(node, YMap) or node.reported:
            fail(ctx, node, path, "a mapping")
            return None
        fields = Fields(ctx, node, path, allowed, misplaced)
        return attempt(ctx, lambda: build(fields))

    return with_schema(read, object_schema(allowed))


def object_schema(allowed: Collection[str]) -> JsonSchema:
    """A mapping with exactly these keys allowed; what each holds is refined by model/schema.py."""
    return {"type": "object", "properties": {key: {} for key in allowed}, "additionalProperties": False}
