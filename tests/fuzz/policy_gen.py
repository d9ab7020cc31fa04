"""Structure-aware policy inputs: the example trees, mutated as a hostile or careless author would, re-emitted.

A policy document is held as `Map` (a list of key/value pairs, so duplicate keys can be written) and lists,
with `Raw` for text placed verbatim (tags, anchors, aliases, 5,000-digit integers, deep flow nesting) that no
Python value would serialize to. `emit` writes YAML in a randomly chosen style (block or flow, plain or quoted
scalars), so the same tree also proves the loader does not depend on how it was written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@dataclass(frozen=True)
class Raw:
    """YAML text written as is where a value goes (on the same line as its key or dash)."""

    text: str


class Map(list[tuple[str, Any]]):
    """A mapping as written: ordered pairs, duplicates allowed."""


def _tree(value: Any) -> Any:
    if isinstance(value, dict):
        return Map((str(k), _tree(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_tree(v) for v in value]
    return value


def _seed_files(case: Path) -> dict[str, str]:
    return {p.relative_to(case).as_posix(): p.read_text() for p in sorted(case.rglob("*.y*ml"))}


SEEDS: dict[str, dict[str, str]] = {case.name: _seed_files(case) for case in sorted(EXAMPLES.iterdir())}
SEED_TREES: dict[str, dict[str, list[Any]]] = {
    case: {name: [_tree(d) for d in yaml.safe_load_all(text) if d is not None] for name, text in files.items()}
    for case, files in SEEDS.items()
}
SEED_BYTES: list[bytes] = [text.encode() for files in SEEDS.values() for text in files.values()]

# --- emitting --------------------------------------------------------------------------------------------------

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9/_.-]*")
_RESERVED_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~"})


@dataclass(frozen=True)
class Style:
    flow: bool  # every collection in flow style ({a: 1}), else block
    quote_all: bool  # every string double-quoted, else plain where that reads back as the same string
    ascii: bool  # \u escapes in quoted strings, else the characters themselves
    indent: int


def _scalar(value: Any, style: Style) -> str:
    if isinstance(value, Raw):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if not style.quote_all and _PLAIN.fullmatch(text) and text.lower() not in _RESERVED_WORDS:
        return text
    return json.dumps(text, ensure_ascii=style.ascii)


def _flow(value: Any, style: Style) -> str:
    if isinstance(value, Map):
        return "{" + ", ".join(f"{_scalar(k, style)}: {_flow(v, style)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v, style) for v in value) + "]"
    return _scalar(value, style)


def _block(value: Any, style: Style, depth: int, out: list[str]) -> None:
    """Append the lines of a collection value; scalars and empty collections are written inline by the caller."""
    pad = " " * (style.indent * depth)
    if isinstance(value, Map):
        for key, item in value:
            if _inline(item):
                out.append(f"{pad}{_scalar(key, style)}: {_flow(item, style)}")
            else:
                out.append(f"{pad}{_scalar(key, style)}:")
                _block(item, style, depth + 1, out)
        return
    for item in value:
        if _inline(item):
            out.append(f"{pad}- {_flow(item, style)}")
        else:
            out.append(f"{pad}-")
            _block(item, style, depth + 1, out)


def _inline(value: Any) -> bool:
    return not isinstance(value, Map | list) or not value


def emit(documents: list[Any], style: Style) -> str:
    parts = []
    for document in documents:
        if style.flow or _inline(document):
            parts.append(_flow(document, style) + "\n")
        else:
            lines: list[str] = []
            _block(document, style, 0, lines)
            parts.append("\n".join(lines) + "\n")
    return "---\n".join(parts)


styles = st.builds(
    Style, flow=st.booleans(), quote_all=st.booleans(), ascii=st.booleans(), indent=st.sampled_from([2, 4])
)

# --- mutations -------------------------------------------------------------------------------------------------

ODD_CHARACTERS = [
    "\u202e",  # right-to-left override
    "\u200b",  # zero width space
    "\ufeff",  # byte order mark, mid-text
    "\x85",  # NEL: a YAML 1.1 line break
    "\u2028",  # line separator: a YAML 1.1 line break
    "\u2029",
    "\r",
    "\t",
    "\x7f",
    "\u0301",  # combining acute accent
    "\u212a",  # KELVIN SIGN, lower()s to ASCII k
    "\u0131",  # dotless i, upper()s to ASCII I
    "\uff0f",  # fullwidth solidus
    "\u0663",  # ARABIC-INDIC DIGIT THREE: str.isdigit() and \d accept it
    "\U0001f600",
    "\ue000",  # private use
    "\ufffd",
]
odd_text = st.lists(st.sampled_from(ODD_CHARACTERS) | st.text(max_size=3), min_size=1, max_size=8).map("".join)

TAGGED = [
    "!!binary aGVsbG8=",
    "!foo bar",
    "!!python/object/apply:os.system [true]",
    "!!set {a: null}",
    "!!omap [{a: 1}]",
    "!!str 42",
    "!!int '7'",
    "!!float 1",
    "!!bool yes",
    "!!null ''",
    "!!timestamp 2001-12-14",
    "!<tag:yaml.org,2002:str> x",
    "!!map {a: 1}",
    "!!seq [1]",
    "!!merge <<",
]
NUMBERISH = [
    "1e999",
    "-1e999",
    ".nan",
    ".inf",
    "017",
    "0o17",
    "0b101",
    "0x1F",
    "+1",
    "1_000",
    "-0",
    "1:30",
    "190:20:30",
    "2024-01-01",
    "2001-12-14t21:59:43.10-05:00",
    "~",
    "yes",
    "Off",
    "NULL",
    "",
    "''",
    '""',
    "http://[",
    "'https://a]b.example.com'",
    "http://h:99999",
]


@st.composite
def huge_numbers(draw: st.DrawFn) -> Raw:
    digits = draw(st.integers(4000, 20_000))
    form = draw(st.sampled_from(["{d}", "-{d}", "0x{h}", "0b{b}", "0o{o}", "1{s}", "{d}.5", "{d}s", "{d}ms"]))
    return Raw(form.format(d="9" * digits, h="f" * digits, b="1" * digits, o="7" * digits, s=":59" * (digits // 3)))


@st.composite
def deep_flow(draw: st.DrawFn) -> Raw:
    depth = draw(st.integers(50, 3000))
    if draw(st.booleans()):
        return Raw("[" * depth + "]" * depth)
    return Raw("{a: " * depth + "1" + "}" * depth)


@st.composite
def huge_strings(draw: st.DrawFn) -> str:
    size = draw(st.integers(10_000, 400_000))
    return draw(st.sampled_from(["x", "/", "*", "é", "\U0001f600", "a-"])) * (size // 2)


def _anchor_text(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else "a"


wrong_values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    odd_text,
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.builds(lambda k, v: Map([(k, v)]), st.text(min_size=1, max_size=5), st.integers()),
    st.sampled_from(TAGGED).map(Raw),
    st.sampled_from(NUMBERISH).map(Raw),
    st.just(Map()),
    st.just([]),
    huge_numbers(),
    deep_flow(),
    huge_strings(),
    st.text(alphabet="-_a", min_size=1, max_size=6).map(lambda a: Raw(f"&{_anchor_text(a)} x")),
    st.just(Raw("*a")),
)


def _slots(value: Any, out: list[tuple[Any, int]]) -> None:
    """Every (container, index) pair in a tree: places a mutation can land."""
    if isinstance(value, list):  # Map is a list of pairs
        for i, item in enumerate(value):
            out.append((value, i))
            _slots(item[1] if isinstance(value, Map) else item, out)


@st.composite
def mutated_tree(draw: st.DrawFn, documents: list[Any]) -> list[Any]:
    """The documents with one to four mutations applied (in a deep copy)."""
    documents = _copy(documents)
    for _ in range(draw(st.sampled_from([1, 1, 2, 3, 4]))):
        slots: list[tuple[Any, int]] = []
        _slots(documents, slots)
        if not slots:  # every document was dropped by an earlier mutation
            documents.append(Map())
            continue
        scalars = [(c, i) for c, i in slots if isinstance(c[i][1] if isinstance(c, Map) else c[i], str | int)]
        container, index = draw(st.sampled_from(slots) | st.sampled_from(scalars or slots))
        kind = draw(
            st.sampled_from(
                ["value", "key", "unknown", "drop", "duplicate", "alias", "merge", "document", "suffix", "suffix"]
            )
        )
        _mutate(draw, documents, container, index, kind)
    return documents


def _mutate(draw: st.DrawFn, documents: list[Any], container: Any, index: int, kind: str) -> None:
    is_map = isinstance(container, Map)
    key = container[index][0] if is_map else None
    if kind == "value":
        replacement = draw(wrong_values)
        container[index] = (key, replacement) if is_map else replacement
    elif kind == "key" and is_map:
        container[index] = (draw(odd_text | st.sampled_from(NUMBERISH) | st.text(max_size=10)), container[index][1])
    elif kind == "unknown" and is_map:
        container.append((draw(st.text(min_size=1, max_size=12)), draw(wrong_values)))
    elif kind == "drop":
        del container[index]
    elif kind == "duplicate":
        container.insert(index, container[index])
    elif kind == "alias" and is_map:
        container[index] = (key, Raw("&anchor " + _flow(container[index][1], Style(True, True, True, 2))))
        container.append(("copy", Raw("*anchor")))
    elif kind == "merge" and is_map:
        container.append(("<<", Raw(draw(st.sampled_from(["*anchor", "{kind: Role}", "[{a: 1}]"])))))
    elif kind == "suffix":  # a valid value with one character more: trailing newline, NUL, space, odd digit
        value = container[index][1] if is_map else container[index]
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = str(value) + draw(st.sampled_from(["\n", "\x00", " ", "\t", "\u0663", "\r\n", "\u2028"]))
            container[index] = (key, text) if is_map else text
    elif kind == "document":
        documents.append(draw(st.sampled_from([Raw("[]"), Raw("42"), Raw("'text'"), Raw("!!binary aGk="), Map()])))


def _copy(value: Any) -> Any:
    if isinstance(value, Map):
        return Map((k, _copy(v)) for k, v in value)
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def deep_block(depth: int, sequences: bool) -> str:
    """A document nested `depth` levels deep in block style (libyaml's flow-depth limit does not apply)."""
    if sequences:
        return "".join(" " * i + "-\n" for i in range(depth)) + " " * depth + "- x\n"
    return "".join(" " * i + "a:\n" for i in range(depth)) + " " * depth + "a: x\n"


# --- raw bytes -------------------------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A seed file with byte-level edits (insert, delete, overwrite, duplicate, splice another seed)."""
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["insert", "delete", "overwrite", "duplicate", "splice"]))
        at = draw(st.integers(0, len(data)))
        if op == "insert":
            data[at:at] = draw(
                st.binary(min_size=1, max_size=16)
                | st.sampled_from(
                    [
                        b"\x00",
                        b"\xff",
                        b"\xef\xbb\xbf",
                        b"\r",
                        b"\t",
                        b"&a ",
                        b"*a",
                        b"!!",
                        b"? ",
                        b"- ",
                        b": ",
                        b"---\n",
                        b"{",
                        b"[",
                        b'"',
                        b"'",
                        b"%YAML 1.2\n",
                    ]
                )
            )
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif op == "overwrite" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "duplicate":
            end = min(len(data), at + draw(st.integers(1, 200)))
            data[at:at] = data[at:end]
        elif op == "splice":
            other = draw(st.sampled_from(SEED_BYTES))
            start = draw(st.integers(0, len(other)))
            data[at:at] = other[start : start + draw(st.integers(1, 300))]
    return bytes(data)
