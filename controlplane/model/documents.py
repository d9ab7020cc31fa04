"""A policy document's header (`apiVersion`, `kind`, `name`) and what documents know of each other while built.

Cross references (a Role's backend, a Binding's roles...) are checked against every *declared* name, even of
elements that failed, so one mistake is reported once and does not cascade.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from controlplane.model import scalars
from controlplane.model.errors import Errors, PolicyError, Source, quoted
from controlplane.model.fields import Conv, Ctx, fail, suggest
from controlplane.model.inventory import Inventory
from controlplane.model.policy import IssuerKind
from controlplane.model.yaml_source import YMap, YNode

API_VERSION = "controlplane/v1"
KINDS = ("Backend", "Binding", "Gateway", "Issuer", "Role")


@dataclass(frozen=True)
class Doc:
    """A policy document after its header (`kind`, `name`, `apiVersion`) was read."""

    ctx: Ctx
    kind: str
    name: str | None
    node: YMap
    source: Source


class Registry:
    """Things that must be unique across the tree.

    A clash is reported at the first place, naming the second (and how many more), and at every later place,
    naming the first: linear. Listing every other place at every place made 2,000 repeats of a 3-line
    document (46 KB) into 6,000 errors and 108 MB of text.
    """

    def __init__(self) -> None:
        self._seen: dict[object, list[tuple[Source, str, str]]] = {}

    def add(self, key: object, source: Source, path: str, label: str) -> None:
        self._seen.setdefault(key, []).append((source, path, label))

    def report(self, errors: Errors, message: Callable[[str], str]) -> None:
        for places in self._seen.values():
            if len(places) < 2:
                continue
            (source, path, label), (second, _, second_label) = places[0], places[1]
            more = f" and {len(places) - 2} more places" if len(places) > 2 else ""
            errors.append(PolicyError.at(source, path, message(f"{second_label} at {second}{more}")))
            for later, later_path, _ in places[1:]:
                errors.append(PolicyError.at(later, later_path, message(f"{label} at {source} (the first definition)")))


@dataclass
class Env:
    """What documents need to know about each other while being built."""

    names: dict[str, dict[str, Source]]
    inventories: Mapping[str, Inventory | None]
    complete: bool
    issuer_kinds: dict[str, IssuerKind] = field(default_factory=dict)
    hosts: Registry = field(default_factory=Registry)

    def reference(self, kind: str) -> Conv[str]:
        """A name that must be declared by some document of `kind` (valid or not: no cascades)."""

        def check(name: str) -> str | None:
            declared = self.names.get(kind, {})
            if name in declared or not self.complete:  # a file that failed to parse may declare it
                return None
            return f"no {kind} named {quoted(name)}{suggest(name, declared)}"

        return scalars.checked(scalars.string, check)


COMMON_KEYS = ("apiVersion", "kind", "name")


def header(ctx: Ctx, node: YNode) -> Doc | None:
    if not isinstance(node, YMap) or node.reported:
        fail(ctx, node, "", "a mapping with kind and name (a policy document)")
        return None
    version = node.get("apiVersion")
    if version is not None:
        scalars.equal(API_VERSION)(ctx, version, "apiVersion")
    kind_node = node.get("kind")
    if kind_node is None:
        hint = " (groups/projects look like an inventory: reference this file from an Issuer's inventory)"
        inventory_like = node.get("groups") is not None or node.get("projects") is not None
        ctx.error(node.line, "kind", "missing required key" + (hint if inventory_like else ""))
        return None
    kind = scalars.enum("kind", KINDS)(ctx, kind_node, "kind")
    source = ctx.source(node.key_line("kind"))
    name_node = node.get("name")
    if name_node is None:
        ctx.error(node.line, "name", "missing required key")
    name = None if name_node is None else scalars.name(ctx, name_node, "name")
    return None if kind is None else Doc(ctx, kind, name, node, source)
