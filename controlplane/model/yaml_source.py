"""YAML parsing that remembers where everything was written.

PyYAML's `safe_load` forgets line numbers, silently keeps the last of two duplicate keys and turns
`on`/`yes`/`no` into booleans. A policy loader must point at the exact line to fix and must not guess,
so we compose the node graph (SafeLoader resolution, YAML 1.1) and walk it into a small tree of
located values: `YScalar`, `YSeq` and `YMap`, each with the 1-based line it starts on.

Problems found here become `PolicyError`s with the dotted field path inside the document, so the
loader reports them like any other validation error. A node that already produced an error is
marked `reported`, and readers skip it quietly instead of reporting it twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from controlplane.model.errors import QUOTE_LIMIT, Errors, PolicyError, quoted

Scalar: TypeAlias = str | int | bool | float | None

_TAG = "tag:yaml.org,2002:"
_BOOL_WORDS = MappingProxyType({"true": True, "false": False})
_SCALAR_TAGS = frozenset(f"{_TAG}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp"))


@dataclass(frozen=True)
class YScalar:
    """A scalar as YAML 1.1 resolved it (`42` is an int, `true` a bool); `text` is what was written."""

    value: Scalar
    line: int
    text: str
    reported: bool = False


@dataclass(frozen=True)
class YSeq:
    items: tuple[YNode, ...]
    line: int
    reported: bool = False


@dataclass(frozen=True)
class YEntry:
    """One `key: value` pair; errors about the key itself point at `key_line`."""

    key_line: int
    value: YNode


@dataclass(frozen=True)
class YMap:
    """A mapping in written order. Duplicate keys were reported; the first occurrence is kept."""

    entries: dict[str, YEntry] = field(hash=False)
    line: int
    reported: bool = False

    def get(self, key: str) -> YNode | None:
        entry = self.entries.get(key)
        return entry.value if entry else None

    def key_line(self, key: str) -> int:
        entry = self.entries.get(key)
        return entry.key_line if entry else self.line


YNode: TypeAlias = YScalar | YSeq | YMap


def child_path(parent: str, key: str | int) -> str:
    """Dotted field path as errors show it: `subjects[0].ref_protected`."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def describe(node: YNode) -> str:
    """How a value is named in 'expected X, got Y' messages."""
    if isinstance(node, YMap):
        return "a mapping"
    if isinstance(node, YSeq):
        return "a list"
    if node.value is None:
        return "null"
    if isinstance(node.value, str):
        return quoted(node.text)
    return node.text if len(node.text) <= QUOTE_LIMIT else node.text[: QUOTE_LIMIT - 1] + "…"


class _TooManyNodes(Exception):
    """A file holds more than its bound of values (`MAX_NODES_PER_FILE`); `line` is where it was passed."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (a shared node would make one line answer for two places) and counts
    values, up to `max_nodes` (see `MAX_NODES_PER_FILE`)."""

    def __init__(self, stream: str, max_nodes: int) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._max_nodes = max_nodes

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(None, None, _alias_message(event), event.start_mark)
        self._nodes += 1
        if self._nodes > self._max_nodes:
            raise _TooManyNodes(int(self.peek_event().start_mark.line) + 1)  # type: ignore[no-untyped-call]
        return super().compose_node(parent, index)


@dataclass
class _Walker:
    """Turns one composed document into located values, collecting errors as it goes."""

    file: str
    errors: Errors
    _constructor: SafeConstructor = field(default_factory=SafeConstructor)
    _depth: int = 0

    def error(self, node: Node, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.file, _line(node), path, message))

    def walk(self, node: Node, path: str) -> YNode:
        if isinstance(node, ScalarNode):
            return self._scalar(node, path)
        if self._depth >= MAX_DEPTH:  # the policy language nests 5 levels; anything this deep is not policy
            self.error(node, path, _too_deep())
            return YScalar(None, _line(node), "", reported=True)
        self._depth += 1
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            assert isinstance(node, SequenceNode)
            return self._sequence(node, path)
        finally:
            self._depth -= 1

    def _unsupported_tag(self, node: Node, path: str, default: str) -> bool:
        if node.tag == f"{_TAG}{default}":
            return False
        self.error(node, path, f"unsupported YAML tag {quoted(node.tag)}")
        return True

    def _sequence(self, node: SequenceNode, path: str) -> YSeq:
        bad = self._unsupported_tag(node, path, "seq")
        items = tuple(self.walk(item, child_path(path, i)) for i, item in enumerate(node.value))
        return YSeq(items, _line(node), reported=bad)

    def _mapping(self, node: MappingNode, path: str) -> YMap:
        bad = self._unsupported_tag(node, path, "map")
        entries: dict[str, YEntry] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            if key is None:
                bad = True
                continue
            if key in entries:
                first = entries[key].key_line
                self.error(key_node, child_path(path, key), f"duplicate key {quoted(key)} (first at line {first})")
                continue
            entries[key] = YEntry(_line(key_node), self.walk(value_node, child_path(path, key)))
        return YMap(entries, _line(node), reported=bad)

    def _key(self, node: Node, path: str) -> str | None:
        """Keys are plain strings in this language: take the text as written (`on:` is the key 'on')."""
        if node.tag == f"{_TAG}merge":
            self.error(node, child_path(path, "<<"), "merge keys (<<) are not supported; write the keys out")
            return None
        if not isinstance(node, ScalarNode) or not node.value:
            self.error(node, path, "mapping keys must be non-empty strings")
            return None
        return str(node.value)

    def _scalar(self, node: ScalarNode, path: str) -> YScalar:
        text = str(node.value)
        if node.tag not in _SCALAR_TAGS:
            self.error(node, path, f"unsupported YAML tag {quoted(node.tag)}")
            return YScalar(text, _line(node), text, reported=True)
        if node.tag == f"{_TAG}bool":
            return self._bool(node, path, text)
        value: Scalar
        if node.tag == f"{_TAG}null":
            value = None
        elif node.tag in (f"{_TAG}int", f"{_TAG}float"):
            return self._number(node, path, text)
        else:
            value = text  # str, and timestamps: a date-like ref or tag name stays what was written
        return YScalar(value, _line(node), text)

    def _number(self, node: ScalarNode, path: str, text: str) -> YScalar:
        """Before PyYAML converts: int() refuses over 4,300 digits (a ValueError naming no file) and YAML 1.1's
        base-60 integers (`1:59:59`) take quadratic time; no number in a policy needs a long text."""
        if len(text) > MAX_NUMBER_TEXT:
            self.error(node, path, f"number too long ({len(text)} characters, at most {MAX_NUMBER_TEXT})")
            return YScalar(None, _line(node), text[:QUOTE_LIMIT], reported=True)
        try:
            value = self._constructor.construct_object(node)
        except (ValueError, OverflowError) as exc:
            self.error(node, path, f"not a number PyYAML can read: {quoted(text)} ({type(exc).__name__})")
            return YScalar(None, _line(node), text, reported=True)
        return YScalar(value, _line(node), text)

    def _bool(self, node: ScalarNode, path: str, text: str) -> YScalar:
        """YAML 1.1 reads yes/no/on/off as booleans; that surprises people, so only true/false are."""
        word = _BOOL_WORDS.get(text.lower())
        if word is None:
            self.error(node, path, f"expected true or false, got {quoted(text)} (quote it if you mean the string)")
            return YScalar(text, _line(node), text, reported=True)
        return YScalar(word, _line(node), text)


MAX_NODES_PER_FILE = 200_000
"""Values (scalars, lists and mappings, keys included) read from one file: ~100,000 lines of policy. Composed,
each costs ~450 bytes before any check runs: a 4 MB file of `[1,1,1,…]` (2.1M values) took 1 GB and 14 s."""

MAX_NUMBER_TEXT = 64
"""Longest number read, in characters: ids, ports and rates have at most 20 digits."""

MAX_DEPTH = 64
"""Deepest nesting of lists and mappings read: every reader of the tree recurses, so depth is bounded here,
once, for all of them (900 levels overflowed Python's stack; libyaml itself stops at 1,000)."""


def _too_deep() -> str:
    return f"lists and mappings nested deeper than {MAX_DEPTH} levels"


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _is_empty(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == f"{_TAG}null" and node.value in ("", "~", "null")


def _composed(text: str, max_nodes: int) -> Iterator[Node]:
    if _FastLoader is None:
        yield from _composed_slowly(text, max_nodes)
        return
    # Only a text with an asterisk can hold an alias, and every value takes at least half a character
    # (`[1,1]`, `{a,b}`): other texts need no look before composing.
    if "*" in text or len(text) > max_nodes // 2:
        _check_events(text, max_nodes)
    yield from yaml.compose_all(text, Loader=_FastLoader)


def _composed_slowly(text: str, max_nodes: int) -> Iterator[Node]:
    """`yaml.compose_all` with our `_Loader`, which takes the bound."""
    loader = _Loader(text, max_nodes)
    try:
        while loader.check_node() and (node := loader.get_node()) is not None:
            yield node
    finally:
        loader.dispose()


def _check_events(text: str, max_nodes: int) -> None:
    """Refuses aliases and counts values in one pass of libyaml's parser, which keeps nothing."""
    nodes = 0
    for event in yaml.parse(text, Loader=yaml.CSafeLoader):
        if isinstance(event, yaml.AliasEvent):
            mark = cast(yaml.error.Mark, event.start_mark)  # libyaml's Mark has the same fields
            raise yaml.composer.ComposerError(None, None, _alias_message(event), mark)
        if isinstance(event, _NODE_EVENTS):
            nodes += 1
            if nodes > max_nodes:
                raise _TooManyNodes(int(cast(yaml.error.Mark, event.start_mark).line) + 1)


_NODE_EVENTS = (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)


def _alias_message(event: yaml.AliasEvent) -> str:
    return f"anchors and aliases are not supported (found *{event.anchor}); write the value out"


# libyaml's parser and composer, when PyYAML was built with it: ~10x faster than the pure-Python composer on
# a policy tree of thousands of documents. Same SafeLoader resolution, same marks (line numbers).
_FastLoader: type[yaml.CSafeLoader] | None = getattr(yaml, "CSafeLoader", None)


@dataclass(frozen=True)
class ParsedYaml:
    """One file: its non-empty documents, the errors found, and whether the whole text was read."""

    documents: tuple[YNode, ...]
    errors: tuple[PolicyError, ...]
    complete: bool
    omitted: int = 0  # errors found beyond the per-file bound, not kept


def parse_yaml(file: str, text: str, *, max_nodes: int = MAX_NODES_PER_FILE) -> ParsedYaml:
    """Every non-empty document of one file, and every error found in it: a file of more than `max_nodes`
    values is refused whole.

    A syntax error ends the file (YAML cannot be resumed after one): the documents before it are
    kept, `complete` is False, and the error carries the line PyYAML reports.

    The result is immutable: `ParseCache` hands the very same one (the same nodes) to the next load of an
    unchanged text, which is what lets the loader reuse what it built from them.
    """
    errors = Errors()
    walker = _Walker(file, errors)
    documents: list[YNode] = []
    complete = False
    try:
        for node in _composed(text, max_nodes):
            if not _is_empty(node):
                documents.append(walker.walk(node, ""))
        complete = True
    except yaml.MarkedYAMLError as exc:
        errors.append(_syntax_error(file, exc, last_line=max(1, len(text.splitlines()))))
    except yaml.YAMLError as exc:  # e.g. a reader error without a mark
        errors.append(PolicyError(file, 1, "", f"invalid YAML: {exc}"))
    except RecursionError:  # the pure-Python composer recurses per level (libyaml's stops at 1,000 levels)
        errors.append(PolicyError(file, 1, "", _too_deep()))
    except _TooManyNodes as many:
        documents.clear()  # nothing of a file this size is used: its errors would be noise
        message = f"more than {max_nodes} values (scalars, lists and mappings) in one file: split it"
        errors.append(PolicyError(file, many.line, "", message))
    return ParsedYaml(tuple(documents), tuple(errors.kept), complete, errors.omitted)


def _syntax_error(file: str, exc: yaml.MarkedYAMLError, last_line: int) -> PolicyError:
    """At the end of input the parser's mark is one line past a last line without a final newline."""
    mark = exc.problem_mark or exc.context_mark
    line = min(int(mark.line) + 1, last_line) if mark is not None else 1
    if exc.problem and "maximum nesting depth" in exc.problem:  # libyaml's own bound, past ours
        return PolicyError(file, line, "", _too_deep())
    parts = [p for p in (exc.context, exc.problem) if p]
    return PolicyError(file, line, "", "invalid YAML: " + ", ".join(parts))


def to_plain(node: YNode) -> object:
    """The value without locations, for tests and debugging."""
    if isinstance(node, YMap):
        return {k: to_plain(e.value) for k, e in node.entries.items()}
    if isinstance(node, YSeq):
        return [to_plain(i) for i in node.items]
    return node.value
