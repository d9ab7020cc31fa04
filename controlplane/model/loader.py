"""Policy files in, a validated `Policy` out, or every error at once.

The tree as a whole: files are parsed, inventory files told apart, each document's header read, names
registered (a duplicate is an error), then the five kinds built in order (`kinds/`), and host names checked
across backends. It never stops at the first problem: each field is read on its own, an element with any
error is dropped, and `PolicyInvalid` lists every error with file, line and field.

A reload of a large tree after a one-file commit rebuilds only that file's documents: `PolicyLoader` keeps
the parse cache and the build memo between loads. `parse_policy` is the same load with nothing kept.
"""

from __future__ import annotations

import posixpath
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TypeVar

from controlplane.model.documents import Doc, Env, Registry, header
from controlplane.model.errors import Errors, PolicyError, Source, quoted
from controlplane.model.fields import Ctx, attempt
from controlplane.model.inventory_file import read_inventory
from controlplane.model.kinds import aws, backend, binding, gateway, issuer, role
from controlplane.model.parse_cache import PARSE_CACHE_BYTES, PARSE_CACHE_FILES, ParseCache, ParseCacheInfo
from controlplane.model.policy import Named, Policy
from controlplane.model.yaml_source import YMap, YNode, YScalar


class PolicyLoader:
    """Loads policy trees one after another, reusing what an unchanged file gave the load before.

    It owns both memos: the parse cache (YAML of unchanged texts is not composed again) and the build memo
    (documents of those files are not built again). One long-lived loader belongs to whoever reloads the same
    tree (the policy service); a one-shot load needs none (`parse_policy`). Loads are taken one at a time: the
    build memo moves from one load to the next, and service reloads run in worker threads.
    """

    def __init__(self, max_bytes: int = PARSE_CACHE_BYTES, max_files: int = PARSE_CACHE_FILES) -> None:
        self._parses = ParseCache(max_bytes, max_files)
        self._built = _BuildMemo()
        self._lock = threading.Lock()

    def load(self, files: Mapping[str, str]) -> Policy:
        """Validate a policy tree given as {posix path relative to the root: file text}.

        Deterministic: the same files always give an equal `Policy` (every tuple sorted by name), whatever was
        loaded before. Raises `PolicyInvalid` listing the errors found, each with file, line and field path: at
        most `MAX_ERRORS_PER_FILE` per file and `MAX_ERRORS` in all, then how many more there were.
        """
        with self._lock:
            return _load(files, self._parses, self._built)

    def cache_info(self) -> ParseCacheInfo:
        """Hits, misses and what the parse cache holds."""
        return self._parses.info()


def parse_policy(files: Mapping[str, str]) -> Policy:
    """`PolicyLoader.load` with nothing remembered before or after: for one-shot callers (validate, compile).

    Pure: it sees only file names and texts, so `validate` in CI, the live watcher and the tests all load
    policy the same way.
    """
    return PolicyLoader().load(files)


def _load(files: Mapping[str, str], parses: ParseCache, built: _BuildMemo) -> Policy:
    errors = Errors()
    parsed: dict[str, tuple[YNode, ...]] = {}
    complete = True
    for file in sorted(files):
        result = parses.parse(file, files[file])
        parsed[file] = result.documents
        errors.extend(result.errors, result.omitted)
        complete = complete and result.complete

    inventory_files = _inventory_references(parsed) & parsed.keys()
    inventories = {path: read_inventory(Ctx(path, errors), parsed[path]) for path in sorted(inventory_files)}
    built.begin()
    docs = [
        doc
        for file, documents in parsed.items()
        if file not in inventory_files
        for ctx in (Ctx(file, errors),)
        for node in documents
        if (doc := built.header(ctx, node)) is not None
    ]
    env = Env(_register_names(docs, errors), inventories, complete)
    seen = built.fingerprint(env)
    policy = Policy(
        issuers=_build_all(docs, "Issuer", issuer.build, env, built, seen),
        backends=_build_all(docs, "Backend", backend.build, env, built, seen),
        roles=_build_all(docs, "Role", role.build, env, built, seen),
        gateways=_build_all(docs, "Gateway", gateway.build, env, built, seen),
        # last: subjects depend on their issuer's type
        bindings=_build_all(docs, "Binding", binding.build, env, built, seen),
        files=tuple(sorted(files)),
    )
    env.hosts.report(errors, lambda others: f"host is also served by {others}")
    errors.extend(aws.binding_role_errors(policy))
    errors.extend(aws.role_source_errors(policy))
    if errors:
        raise errors.invalid()
    return policy


def _inventory_references(parsed: Mapping[str, tuple[YNode, ...]]) -> set[str]:
    """Files named by some Issuer's `inventory:`; they are read as inventories, not policy documents."""
    found = set()
    for documents in parsed.values():
        for node in documents:
            if not isinstance(node, YMap) or _scalar_value(node, "kind") != "Issuer":
                continue
            path = _scalar_value(node, "inventory")
            if isinstance(path, str) and path:
                found.add(posixpath.normpath(path))
    return found


def _scalar_value(node: YMap, key: str) -> object:
    value = node.get(key)
    return value.value if isinstance(value, YScalar) else None


def _register_names(docs: list[Doc], errors: Errors) -> dict[str, dict[str, Source]]:
    registry = Registry()
    names: dict[str, dict[str, Source]] = {}
    for doc in docs:
        if doc.name is not None:
            registry.add((doc.kind, doc.name), doc.source, "name", f"{doc.kind} {quoted(doc.name)}")
            names.setdefault(doc.kind, {}).setdefault(doc.name, doc.source)
    registry.report(errors, lambda others: f"duplicate name, also used by {others}")
    return names


N = TypeVar("N", bound=Named)


def _build_all(
    docs: list[Doc],
    kind: str,
    builder: Callable[[Doc, Env], N],
    env: Env,
    memo: _BuildMemo,
    fingerprint: object,
) -> tuple[N, ...]:
    built = [e for doc in docs if doc.kind == kind if (e := memo.build(doc, builder, env, fingerprint))]
    return tuple(sorted(built, key=lambda e: e.name))


@dataclass(frozen=True)
class _Built:
    node: YMap  # held so that its id, part of the key, cannot be reused by another node
    env: object  # the environment's fingerprint when it was built
    value: object
    hosts: tuple[tuple[str, Source, str, str], ...]  # its registrations in the hosts registry, to replay


class _RecordingRegistry(Registry):
    def __init__(self, target: Registry) -> None:
        super().__init__()
        self.target = target
        self.added: list[tuple[str, Source, str, str]] = []

    def add(self, key: object, source: Source, path: str, label: str) -> None:
        assert isinstance(key, str)
        self.added.append((key, source, path, label))
        self.target.add(key, source, path, label)


class _BuildMemo:
    """Documents that built without error, reused while their YAML node and what they saw of the tree stay.

    The parse cache returns the very same nodes for a file whose text did not change, so a one-file commit
    rebuilds that file's documents only (at 1,000 backends the rest took ~0.3 s per commit). A document's
    build depends on the names declared in the whole tree (references), on whether every file parsed, and,
    for Bindings, on the issuers' types: that is the fingerprint. Issuers also read inventories, which are
    new objects on every load, so they are always rebuilt (there are few). Failed builds are never kept:
    their errors must be reported again. Entries not used by the latest load are dropped.
    """

    _UNCACHED = frozenset({"Issuer"})

    def __init__(self) -> None:
        self._previous: dict[tuple[str, str, int], _Built] = {}
        self._current: dict[tuple[str, str, int], _Built] = {}
        self._previous_headers: dict[tuple[str, int], tuple[YMap, str, str | None, Source]] = {}
        self._headers: dict[tuple[str, int], tuple[YMap, str, str | None, Source]] = {}
        self._fingerprint: object = None

    def begin(self) -> None:
        """Called at the start of every load: what the previous load did not use is dropped now."""
        self._previous, self._current = self._current or self._previous, {}
        self._previous_headers, self._headers = self._headers or self._previous_headers, {}

    def header(self, ctx: Ctx, node: YNode) -> Doc | None:
        """`documents.header`, reused for a node whose header was read without error before."""
        key = (ctx.file, id(node))
        hit = self._headers.get(key) or self._previous_headers.get(key)
        if hit is not None and hit[0] is node:
            self._headers[key] = hit
            return Doc(ctx, hit[1], hit[2], hit[0], hit[3])
        before = len(ctx.errors)
        doc = header(ctx, node)
        if doc is not None and len(ctx.errors) == before:
            self._headers[key] = (doc.node, doc.kind, doc.name, doc.source)
        return doc

    def fingerprint(self, env: Env) -> object:
        """Called once per load, after names are registered and before anything is built: the load's
        fingerprint, to pass to every `build` of that load (loads in other threads have their own)."""
        self._fingerprint = self._interned(self._fingerprint, (env.complete, _declared(env.names)))
        return self._fingerprint

    def build(self, doc: Doc, builder: Callable[[Doc, Env], N], env: Env, fingerprint: object) -> N | None:
        if doc.kind in self._UNCACHED:
            return attempt(doc.ctx, partial(builder, doc, env))
        if doc.kind == "Binding":
            fingerprint = (fingerprint, tuple(sorted(env.issuer_kinds.items())))
        key = (doc.kind, doc.ctx.file, id(doc.node))
        hit = self._current.get(key) or self._previous.get(key)
        if hit is not None and hit.node is doc.node and hit.env == fingerprint:
            for registration in hit.hosts:
                env.hosts.add(*registration)
            self._current[key] = hit
            return hit.value  # type: ignore[return-value]
        recorder = _RecordingRegistry(env.hosts)
        value = attempt(doc.ctx, partial(builder, doc, replace(env, hosts=recorder)))
        if value is not None:
            self._current[key] = _Built(doc.node, fingerprint, value, tuple(recorder.added))
        return value

    @staticmethod
    def _interned(previous: object, current: object) -> object:
        """The previous fingerprint when equal, so that most documents compare it by identity."""
        return previous if previous == current else current


def _declared(names: Mapping[str, Mapping[str, Source]]) -> frozenset[tuple[str, str]]:
    return frozenset((kind, name) for kind, by_name in names.items() for name in by_name)


def policy_warnings(policy: Policy) -> list[PolicyError]:
    """What is valid but almost certainly not meant: reported (validate, /status), never refused.

    A Role on a backend that no Gateway fronts grants nothing anywhere, so bindings naming it look like
    access that does not exist (a typo in a Gateway's `backends`, or a gateway removed before its roles).
    """
    fronted = {backend for gateway in policy.gateways for backend in gateway.backends}
    return sorted(
        PolicyError.at(
            role.source,
            "backend",
            f"role {role.name} is on backend {role.backend}, which no Gateway fronts: it grants nothing",
        )
        for role in policy.roles
        if role.backend not in fronted
    )
