"""Immutable, content-addressed snapshots: one per gateway group.

Every resource is packed into an `Any` and serialized exactly once here; the xDS layer only
concatenates these bytes. The version of a type is a hash of its content, so every replica and
every restart names the same config the same way.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

# Named by the compiler, which produces them; re-exported for the xDS layer, which serves them by type.
from controlplane.compiler.types import CLUSTER as CLUSTER
from controlplane.compiler.types import ENDPOINT as ENDPOINT
from controlplane.compiler.types import EXTENSION_CONFIG as EXTENSION_CONFIG
from controlplane.compiler.types import LISTENER as LISTENER
from controlplane.compiler.types import ROUTE as ROUTE
from controlplane.compiler.types import SECRET as SECRET
from controlplane.compiler.wire import varint as varint

# Make before break: secrets exist before anything uses them; clusters and their endpoints before anything
# routes to them. Secrets are named subscriptions (SDS), never wildcards. Filter configurations (ECDS, named
# subscriptions too) go after the listeners, whose arrival is what makes Envoy ask for them (a listener naming
# one warms until it comes, docs/envoy-ecds.md §2), and before the routes, whose per-filter settings name
# parts of them (a jwt_authn `requirement_name`).
PUSH_ORDER: tuple[str, ...] = (SECRET, CLUSTER, ENDPOINT, LISTENER, EXTENSION_CONFIG, ROUTE)
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

# Distinct subscriptions remembered per TypeSnapshot; proxies of a group normally share one or two.
_BODY_MEMO_LIMIT = 64
_REPEATED_RESOURCES_TAG = b"\x12"  # DiscoveryResponse.resources = 2, wire type 2


@dataclass(frozen=True)
class EncodedResource:
    """One resource, framed once as a `DiscoveryResponse.resources` entry (an `Any` with its tag and length).

    Built with a single copy of the payload: big route configurations are megabytes, and every copy counts
    when a one-binding change must be published in a few tens of milliseconds.
    """

    name: str
    response_entry: bytes
    version: str  # sha256 prefix of the entry; Delta xDS uses it per resource
    payload: bytes = b""  # the serialized message itself, to recognise it unchanged in the next build
    any_offset: int = 0  # where the Any starts inside response_entry

    @property
    def any_bytes(self) -> bytes:
        """The serialized `Any` (a copy; only for tools and tests, never on the push path)."""
        return self.response_entry[self.any_offset :]

    @classmethod
    def of(cls, name: str, message: Message) -> EncodedResource:
        # Serialize with `deterministic`: Any.Pack would not, and map order would then vary.
        type_url = "type.googleapis.com/" + message.DESCRIPTOR.full_name
        return cls.of_payload(name, type_url, message.SerializeToString(deterministic=True))

    @classmethod
    def of_payload(cls, name: str, type_url: str, payload: bytes) -> EncodedResource:
        """From an already serialized message, so the compiler can reuse bytes of unchanged parts."""
        url = type_url.encode()
        # Any { type_url = 1; value = 2 }, hand-framed: byte-identical to AnyProto(...).SerializeToString().
        any_head = b"\x0a" + varint(len(url)) + url
        if payload:  # proto3 leaves an empty bytes field out
            any_head += b"\x12" + varint(len(payload))
        entry_head = _REPEATED_RESOURCES_TAG + varint(len(any_head) + len(payload))
        entry = b"".join((entry_head, any_head, payload))
        return cls(name, entry, hashlib.sha256(entry).hexdigest()[:16], payload, len(entry_head))


@dataclass(frozen=True)
class TypeSnapshot:
    """All resources of one type for one group, with a version that is a hash of their content."""

    type_url: str
    version: str
    resources: Mapping[str, EncodedResource]

    @classmethod
    def of(cls, type_url: str, encoded: Iterable[EncodedResource]) -> TypeSnapshot:
        by_name = {r.name: r for r in sorted(encoded, key=lambda r: r.name)}
        digest = hashlib.sha256(type_url.encode())
        for resource in by_name.values():
            digest.update(resource.name.encode() + b"\0" + resource.version.encode() + b"\0")
        return cls(type_url, digest.hexdigest()[:16], MappingProxyType(by_name))

    _bodies: dict[frozenset[str], tuple[bytes, tuple[str, ...]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @functools.cached_property
    def all_entries(self) -> bytes:
        """Every response_entry in name order: a wildcard response body (built on first use only)."""
        return b"".join(r.response_entry for r in self.resources.values())

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(self.resources)

    def entries_for(self, names: frozenset[str] | None) -> tuple[bytes, tuple[str, ...]]:
        """The response body for a subscription (None = wildcard) and the names it holds.

        Memoized per subscription: every proxy of a group asks for the same names, so a fan-out to thousands
        of streams builds each body once and they all share one bytes object (and one tuple of names).
        """
        if names is None:
            return self.all_entries, self.names
        hit = self._bodies.get(names)
        if hit is None:
            if len(self._bodies) >= _BODY_MEMO_LIMIT:
                self._bodies.clear()
            present = tuple(sorted(n for n in names if n in self.resources))
            hit = self._bodies[names] = (b"".join(self.resources[n].response_entry for n in present), present)
        return hit


@dataclass(frozen=True)
class Snapshot:
    """Everything one gateway group receives. Immutable; replaced whole on every change."""

    group: str
    types: Mapping[str, TypeSnapshot] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        group: str,
        resources: Mapping[str, Iterable[tuple[str, Message | bytes]]],
        previous: Snapshot | None = None,
    ) -> Snapshot:
        """`resources` maps a type URL to (name, message or its serialized bytes); missing types are empty.

        Resources whose bytes equal those in `previous` reuse its encoding instead of hashing again.
        """
        types = {}
        for type_url in PUSH_ORDER:
            known = previous.types[type_url].resources if previous is not None else {}
            encoded = (_encode(type_url, n, r, known.get(n)) for n, r in resources.get(type_url, ()))
            types[type_url] = TypeSnapshot.of(type_url, encoded)
        return cls(group, MappingProxyType(types))

    @classmethod
    def empty(cls, group: str) -> Snapshot:
        return cls.build(group, {})

    def version(self, type_url: str) -> str:
        return self.types[type_url].version

    def replacing(self, type_url: str, resources: Iterable[tuple[str, bytes]]) -> Snapshot:
        """This snapshot with the named resources of `type_url` that it holds replaced (others are ignored);
        every other type, and every unchanged resource, is the same object."""
        typed = self.types[type_url]
        merged = dict(typed.resources)
        for name, payload in resources:
            if name in merged:
                merged[name] = _encode(type_url, name, payload, merged[name])
        types = dict(self.types)
        types[type_url] = TypeSnapshot.of(type_url, merged.values())
        return Snapshot(self.group, MappingProxyType(types))

    @property
    def summary_version(self) -> str:
        """One name for the whole snapshot (status pages, logs, metrics).

        Filter configurations (ECDS) count only when there are some: a snapshot without them keeps the name it
        had before ECDS was served, so replicas of both releases name the same snapshot alike during an upgrade.
        """
        digest = hashlib.sha256()
        for type_url in PUSH_ORDER:
            typed = self.types[type_url]
            if type_url == EXTENSION_CONFIG and not typed.resources:
                continue
            digest.update(typed.version.encode())
        return digest.hexdigest()[:12]


def _encode(type_url: str, name: str, resource: Message | bytes, known: EncodedResource | None) -> EncodedResource:
    if isinstance(resource, bytes):
        if known is not None and (known.payload is resource or known.payload == resource):
            return known
        return EncodedResource.of_payload(name, type_url, resource)
    return EncodedResource.of(name, resource)


def build_snapshots(
    groups: Mapping[str, Mapping[str, Iterable[tuple[str, Message | bytes]]]],
    previous: Mapping[str, Snapshot] | None = None,
) -> dict[str, Snapshot]:
    """One snapshot per group from compiled resources, reusing encodings from the previous snapshots."""
    previous = previous or {}
    return {name: Snapshot.build(name, resources, previous.get(name)) for name, resources in groups.items()}
