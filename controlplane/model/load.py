"""Policy files in, a validated `Policy` out, or every error at once.

`parse_policy` is pure: it sees only file names and texts, so `validate` in CI, the live watcher and the
tests all load policy the same way. It never stops at the first problem: each field is read on its own,
an element with any error is dropped, and `PolicyInvalid` lists every error with file, line and field.

Reading is table driven: each kind lists its keys, and small converters (`Conv`) turn one located YAML
node into one typed value or report why not. Cross references (a Role's backend, a Binding's roles...)
are checked against every *declared* name, even of elements that failed, so one mistake is reported
once and does not cascade.
"""

from __future__ import annotations

import difflib
import ipaddress
import posixpath
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeAlias, TypeVar
from urllib.parse import urlsplit

from controlplane.model.errors import Errors, PolicyError, Source, quoted
from controlplane.model.inventory import Group, Inventory, Project
from controlplane.model.policy import (
    Backend,
    Binding,
    ClaimMatch,
    Endpoint,
    Gateway,
    GitLabApi,
    GroupRef,
    Injection,
    Issuer,
    IssuerKind,
    JwksMode,
    Mode,
    Named,
    Policy,
    ProjectRef,
    Role,
    RoleRule,
    Subject,
    UpstreamTLS,
)
from controlplane.model.yaml_source import YMap, YNode, YScalar, YSeq, child_path, describe, parse_yaml

T = TypeVar("T")
U = TypeVar("U")

API_VERSION = "controlplane/v1"
KINDS = ("Backend", "Binding", "Gateway", "Issuer", "Role")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti"})
DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
GITLAB_JWKS_PATH = "/oauth/discovery/keys"

# Patterns end in `\Z`, not `$` (which also matches before a final newline), and spell digits `[0-9]` (`\d` is
# any Unicode digit): a newline or a foreign digit must never reach an Envoy name, domain or header.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
_WILDCARD_HOST_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\Z")
_DURATION_RE = re.compile(r"^([0-9]{1,18})(ms|s|m|h)\Z")  # 18 digits: past any bound, far from int()'s cap
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_GITLAB_SEGMENT = r"[A-Za-z0-9_.][A-Za-z0-9_.-]*"
_GROUP_PATH_RE = re.compile(rf"^{_GITLAB_SEGMENT}(/{_GITLAB_SEGMENT})*\Z")
_PROJECT_PATH_RE = re.compile(rf"^{_GITLAB_SEGMENT}(/{_GITLAB_SEGMENT})+\Z")


class _Invalid(Exception):
    """An element cannot be built; its errors were already recorded."""


@dataclass
class _Ctx:
    """The file being read and the error list shared by the whole load."""

    file: str
    errors: Errors

    def error(self, line: int, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.file, line, path, message))

    def source(self, line: int) -> Source:
        return Source(self.file, line)


Conv: TypeAlias = Callable[[_Ctx, YNode, str], "T | None"]
"""Reads one node at a field path: the typed value, or None after recording why not."""


def _need(value: T | None) -> T:
    """Used when assembling an element: a failed field (already reported) drops the whole element."""
    if value is None:
        raise _Invalid
    return value


def _attempt(ctx: _Ctx, build: Callable[[], T]) -> T | None:
    """Runs a builder that reads every field first; any error recorded meanwhile means no element."""
    before = len(ctx.errors)
    try:
        value = build()
    except _Invalid:
        return None
    return value if len(ctx.errors) == before else None


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {quoted(close[0])}?)" if close else ""


def _one_of_message(what: str, value: str, choices: Collection[str]) -> str:
    return f"unknown {what} {quoted(value)}{_suggest(value, choices)}; allowed: {', '.join(choices)}"


# --- scalar converters -------------------------------------------------------------------------


def _fail(ctx: _Ctx, node: YNode, path: str, expected: str) -> None:
    if not node.reported:
        ctx.error(node.line, path, f"expected {expected}, got {describe(node)}")


def _string(ctx: _Ctx, node: YNode, path: str) -> str | None:
    if not isinstance(node, YScalar) or not isinstance(node.value, str) or node.reported:
        _fail(ctx, node, path, "a string")
        return None
    if not node.value:
        ctx.error(node.line, path, "must not be empty")
        return None
    return node.value


def _integer(ctx: _Ctx, node: YNode, path: str) -> int | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(ctx, node, path, "an integer")
        return None
    return value


def _boolean(ctx: _Ctx, node: YNode, path: str) -> bool | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, bool):
        _fail(ctx, node, path, "true or false")
        return None
    return value


def _checked(conv: Conv[T], check: Callable[[T], str | None]) -> Conv[T]:
    """`conv`, then `check` on its result: a message means the value is rejected there."""

    def read(ctx: _Ctx, node: YNode, path: str) -> T | None:
        value = conv(ctx, node, path)
        problem = None if value is None else check(value)
        if problem is not None:
            ctx.error(node.line, path, problem)
            return None
        return value

    return read


def _mapped(conv: Conv[T], fn: Callable[[T], U]) -> Conv[U]:
    def read(ctx: _Ctx, node: YNode, path: str) -> U | None:
        value = conv(ctx, node, path)
        return None if value is None else fn(value)

    return read


def _in_range(lo: int, hi: int) -> Conv[int]:
    return _checked(_integer, lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}")


def _matching(regex: re.Pattern[str], rule: str) -> Conv[str]:
    return _checked(_string, lambda v: None if regex.match(v) else f"{rule}, got {quoted(v)}")


def _enum(what: str, choices: Collection[str]) -> Conv[str]:
    return _checked(_string, lambda v: None if v in choices else _one_of_message(what, v, choices))


def _equal(expected: str) -> Conv[str]:
    return _checked(_string, lambda v: None if v == expected else f"expected {quoted(expected)}, got {quoted(v)}")


_port = _in_range(1, 65535)


def _not_an_id(value: int) -> str:
    return f"expected a positive integer within GitLab's 64-bit ids, got {quoted(str(value))}"


MAX_ID = 2**63 - 1  # GitLab's ids are 64-bit: a larger one names nothing and could never match a token
_positive = _checked(_integer, lambda v: None if 0 < v <= MAX_ID else _not_an_id(v))
_name = _matching(_NAME_RE, "must be lower-case letters, digits and '-', start and end with a letter or digit (max 63)")
_hostname = _matching(_HOST_RE, "expected a lower-case DNS name without port")
_host_pattern = _matching(_WILDCARD_HOST_RE, "expected a lower-case DNS name (or *.domain) without port")


def _absolute_path_check(value: str) -> str | None:
    return None if value.startswith("/") else f"expected an absolute path, got {quoted(value)}"


_absolute_path = _checked(_string, _absolute_path_check)


def _address_check(value: str) -> str | None:
    if _HOST_RE.match(value):
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"expected an IP address or a lower-case DNS name, got {quoted(value)}"
    return None


_address = _checked(_string, _address_check)


def _ip_check(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"expected an IP address, got {quoted(value)}"
    return None


_ip = _checked(_string, _ip_check)


def _url_check(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:  # e.g. an unbalanced '[' (an IPv6 literal that never ends)
        return f"expected an http(s) URL, got {quoted(value)}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http(s) URL, got {quoted(value)}"
    if parts.query or parts.fragment or parts.username or any(c.isspace() for c in value):
        return f"expected a URL without query, fragment, credentials or spaces, got {quoted(value)}"
    return None


def _issuer_url_check(value: str) -> str | None:
    if value.endswith("/"):
        return f"must not end with '/': it must equal the tokens' iss exactly, got {quoted(value)}"
    return _url_check(value)


_url = _checked(_string, _url_check)
_issuer_url = _checked(_string, _issuer_url_check)


def _duration_ms(ctx: _Ctx, node: YNode, path: str) -> int | None:
    """`250ms`, `30s`, `5m`, `1h`, or a bare integer of seconds."""
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value * 1000
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        return int(match[1]) * _DURATION_UNITS_MS[match[2]]
    _fail(ctx, node, path, "a duration such as 250ms, 30s, 5m, 1h or a number of seconds")
    return None


def _format_ms(ms: int) -> str:
    for unit in ("h", "m", "s"):
        if ms % _DURATION_UNITS_MS[unit] == 0 and ms >= _DURATION_UNITS_MS[unit]:
            return f"{ms // _DURATION_UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


def _duration(lo_ms: int, hi_ms: int, why: str = "") -> Conv[int]:
    def check(ms: int) -> str | None:
        if lo_ms <= ms <= hi_ms:
            return None
        return f"must be between {_format_ms(lo_ms)} and {_format_ms(hi_ms)}, got {_format_ms(ms)}{why}"

    return _checked(_duration_ms, check)


def _seconds(lo: int, hi: int, why: str = "") -> Conv[int]:
    bounded = _duration(lo * 1000, hi * 1000, why)
    whole = _checked(bounded, lambda ms: None if ms % 1000 == 0 else "whole seconds only")
    return _mapped(whole, lambda ms: ms // 1000)


# --- collections ---------------------------------------------------------------------------------


def _list_of(item: Conv[T], *, non_empty: bool = True, unique: bool = True) -> Conv[tuple[T, ...]]:
    """A YAML list of `item`s; duplicates are reported on the later item, naming the earlier line."""

    def read(ctx: _Ctx, node: YNode, path: str) -> tuple[T, ...] | None:
        if not isinstance(node, YSeq) or node.reported:
            _fail(ctx, node, path, "a list")
            return None
        if non_empty and not node.items:
            ctx.error(node.line, path, "must not be empty")
            return None
        values = _each(ctx, node.items, path, item)
        if values is None:
            return None
        located = [(v, n.line, child_path(path, i)) for i, (v, n) in enumerate(zip(values, node.items, strict=True))]
        if (unique and _report_duplicates(ctx, located)) or any(v is None for v in values):
            return None
        return tuple(_need(v) for v in values)

    return read


def _each(ctx: _Ctx, items: tuple[YNode, ...], path: str, item: Conv[T]) -> list[T | None] | None:
    """Every item read, or None once the file's errors are at their bound (a list of 2M bad items)."""
    values: list[T | None] = []
    for i, n in enumerate(items):
        if ctx.errors.full(ctx.file):
            ctx.errors.stop()
            return None
        values.append(item(ctx, n, child_path(path, i)))
    return values


def _one_or_list(item: Conv[T]) -> Conv[tuple[T, ...]]:
    """A single value or a list of them (OR)."""
    many = _list_of(item)

    def read(ctx: _Ctx, node: YNode, path: str) -> tuple[T, ...] | None:
        if isinstance(node, YSeq):
            return many(ctx, node, path)
        value = item(ctx, node, path)
        return None if value is None else (value,)

    return read


def _report_duplicates(ctx: _Ctx, items: Iterable[tuple[object, int, str]]) -> bool:
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


class _Fields:
    """One YAML mapping being read: unknown keys are reported up front, then fields are read by name."""

    def __init__(
        self,
        ctx: _Ctx,
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
                message = f"unknown key {quoted(key)}{_suggest(key, known)}; allowed: {', '.join(known)}"
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


def _record(
    build: Callable[[_Fields], T], allowed: Collection[str], misplaced: Mapping[str, str] | None = None
) -> Conv[T]:
    """A converter for a nested mapping: checks the keys, then `build` reads them into one value."""

    def read(ctx: _Ctx, node: YNode, path: str) -> T | None:
        if not isinstance(node, YMap) or node.reported:
            _fail(ctx, node, path, "a mapping")
            return None
        fields = _Fields(ctx, node, path, allowed, misplaced)
        return _attempt(ctx, lambda: build(fields))

    return read


# --- documents -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Doc:
    """A policy document after its header (`kind`, `name`, `apiVersion`) was read."""

    ctx: _Ctx
    kind: str
    name: str | None
    node: YMap
    source: Source


class _Registry:
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
class _Env:
    """What documents need to know about each other while being built."""

    names: dict[str, dict[str, Source]]
    inventories: Mapping[str, Inventory | None]
    complete: bool
    issuer_kinds: dict[str, IssuerKind] = field(default_factory=dict)
    hosts: _Registry = field(default_factory=_Registry)

    def reference(self, kind: str) -> Conv[str]:
        """A name that must be declared by some document of `kind` (valid or not: no cascades)."""

        def check(name: str) -> str | None:
            declared = self.names.get(kind, {})
            if name in declared or not self.complete:  # a file that failed to parse may declare it
                return None
            return f"no {kind} named {quoted(name)}{_suggest(name, declared)}"

        return _checked(_string, check)


_COMMON_KEYS = ("apiVersion", "kind", "name")


def _header(ctx: _Ctx, node: YNode) -> _Doc | None:
    if not isinstance(node, YMap) or node.reported:
        _fail(ctx, node, "", "a mapping with kind and name (a policy document)")
        return None
    version = node.get("apiVersion")
    if version is not None:
        _equal(API_VERSION)(ctx, version, "apiVersion")
    kind_node = node.get("kind")
    if kind_node is None:
        hint = " (groups/projects look like an inventory: reference this file from an Issuer's inventory)"
        inventory_like = node.get("groups") is not None or node.get("projects") is not None
        ctx.error(node.line, "kind", "missing required key" + (hint if inventory_like else ""))
        return None
    kind = _enum("kind", KINDS)(ctx, kind_node, "kind")
    source = ctx.source(node.key_line("kind"))
    name_node = node.get("name")
    if name_node is None:
        ctx.error(node.line, "name", "missing required key")
    name = None if name_node is None else _name(ctx, name_node, "name")
    return None if kind is None else _Doc(ctx, kind, name, node, source)


# --- GitLab references ---------------------------------------------------------------------------


def _project_ref(ctx: _Ctx, node: YNode, path: str) -> ProjectRef | None:
    return _pin_ref(ctx, node, path, _PROJECT_PATH_RE, "a project path (namespace/project)")


def _group_ref(ctx: _Ctx, node: YNode, path: str) -> GroupRef | None:
    return _pin_ref(ctx, node, path, _GROUP_PATH_RE, "a group path")


def _pin_ref(ctx: _Ctx, node: YNode, path: str, regex: re.Pattern[str], what: str) -> ProjectRef | None:
    """A positive id or an exact path; no globs, since the pin is resolved to immutable ids."""
    if isinstance(node, YScalar) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return _positive(ctx, node, path)
    if isinstance(node, YScalar) and isinstance(node.value, str) and not node.reported:
        if regex.match(node.value):
            return node.value
        ctx.error(node.line, path, f"expected {what} or a positive id, got {quoted(node.value)} (no globs)")
        return None
    _fail(ctx, node, path, f"{what} or a positive id")
    return None


# --- Issuer ----------------------------------------------------------------------------------------

_ISSUER_KEYS = (*_COMMON_KEYS, "type", "url", "jwks", "jwks_uri", "jwks_cache", "clock_skew", "inventory", "api")
_SKEW_WHY = " (0 is not allowed: Envoy reads 0 as its default of 60s)"
_TOKEN_KEYS = ("token", "private_token", "access_token", "api_token", "gitlab_token")
_NO_TOKENS = {
    key: "tokens never go in policy files (they are read by many and kept in git history): "
    "name where to find it with token_env or token_file"
    for key in _TOKEN_KEYS
}


def _inventory_path_check(value: str) -> str | None:
    normal = posixpath.normpath(value)
    if value.startswith("/") or "\\" in value or normal.startswith("../") or normal == "..":
        return f"expected a path relative to the policy root, got {quoted(value)}"
    return None


_relative_path = _checked(_string, _inventory_path_check)
_inventory_path = _mapped(_relative_path, lambda path: posixpath.normpath(path))


def _issuer(doc: _Doc, env: _Env) -> Issuer:
    f = _Fields(doc.ctx, doc.node, "", _ISSUER_KEYS, _NO_TOKENS)
    kind = f.required("type", _mapped(_enum("issuer type", [k.value for k in IssuerKind]), IssuerKind))
    if kind is not None and doc.name is not None:
        env.issuer_kinds[doc.name] = kind
    url = f.required("url", _issuer_url)
    if kind is IssuerKind.OIDC:
        jwks_uri = f.required("jwks_uri", _url, " for oidc issuers")
    elif f.has("jwks_uri"):
        jwks_uri = f.maybe("jwks_uri", _url)
    else:
        jwks_uri = None if url is None else url + GITLAB_JWKS_PATH
    jwks_mode = f.optional("jwks", _jwks_mode, JwksMode.RELAY)
    cache = f.optional("jwks_cache", _seconds(1, 86400), 300)
    skew = f.optional("clock_skew", _seconds(1, 300, _SKEW_WHY), 30)
    inventory = _issuer_inventory(f, kind, env)
    api = _issuer_api(f, kind, url)
    return Issuer(
        name=_need(doc.name),
        kind=_need(kind),
        url=_need(url),
        jwks_uri=_need(jwks_uri),
        clock_skew_seconds=_need(skew),
        jwks_cache_seconds=_need(cache),
        source=doc.source,
        inventory=inventory,
        jwks_mode=_need(jwks_mode),
        api=api,
    )


def _issuer_inventory(f: _Fields, kind: IssuerKind | None, env: _Env) -> Inventory | None:
    if not f.has("inventory"):
        return None
    if kind is IssuerKind.OIDC:
        f.error("inventory", "only for gitlab issuers")
        return None
    path = _need(f.maybe("inventory", _inventory_path))
    if path not in env.inventories:
        f.error("inventory", f"no file {quoted(path)} in the policy tree")
        return None
    return _need(env.inventories[path])  # None: the inventory file had errors, reported there


_jwks_mode = _mapped(_enum("jwks mode", [m.value for m in JwksMode]), JwksMode)
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")
_env_name = _matching(_ENV_NAME_RE, "expected an environment variable name such as GITLAB_TOKEN")
_API_KEYS = (
    "url",
    "token_env",
    "token_file",
    "groups",
    "reconcile",
    "max_staleness",
    "requests_per_second",
)
_API_MAX_STALENESS_S = 30 * 86400  # 720h: past that an inventory is no basis for access anyway


def _number(ctx: _Ctx, node: YNode, path: str) -> float | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        _fail(ctx, node, path, "a number")
        return None
    return float(value)


_rate = _checked(_number, lambda v: None if 0.1 <= v <= 1000 else f"must be between 0.1 and 1000, got {v:g}")
_api_url = _mapped(_url, lambda url: url.rstrip("/"))
# Groups and the policy project are kept as GitLab's API takes them: a path, or an id written as a string.
_api_group = _mapped(_group_ref, str)


def _issuer_api(f: _Fields, kind: IssuerKind | None, issuer_url: str | None) -> GitLabApi | None:
    """`api:` watches GitLab live; it replaces an offline `inventory:` rather than mixing with it."""
    if not f.has("api"):
        return None
    if kind is IssuerKind.OIDC:
        f.error("api", "only for gitlab issuers")
        return None
    if f.has("inventory"):  # still read below, so its own mistakes are reported in the same pass
        f.error("api", "use either inventory (offline) or api (live GitLab), not both")
    read = _record(partial(_api_fields, issuer_url=issuer_url), _API_KEYS, _NO_TOKENS)
    return _need(f.maybe("api", read))


def _api_fields(a: _Fields, issuer_url: str | None) -> GitLabApi:
    """The token is never in the policy, only where the control plane finds it: exactly one place."""
    places = [key for key in ("token_env", "token_file") if a.has(key)]
    if not places:
        a.ctx.error(a.node.line, a.at("token_env"), "missing required key: token_env or token_file")
    elif len(places) == 2:
        a.error("token_file", "use token_env or token_file, not both")
    url = a.optional("url", _api_url, issuer_url)
    token_env, token_file = a.maybe("token_env", _env_name), a.maybe("token_file", _absolute_path)
    groups = a.optional_tuple("groups", _list_of(_api_group, non_empty=False))
    reconcile = a.optional("reconcile", _seconds(10, 86400), 300)
    max_staleness = a.maybe("max_staleness", _seconds(10, _API_MAX_STALENESS_S))
    if max_staleness is not None and reconcile is not None and max_staleness < reconcile:
        message = f"must be at least reconcile ({_format_ms(reconcile * 1000)}): one late reconcile would withdraw"
        a.error("max_staleness", message + " every binding that depends on GitLab")
    rate = a.optional("requests_per_second", _rate, 10.0)
    return GitLabApi(
        url=_need(url),
        token_env=token_env,
        token_file=token_file,
        groups=_need(groups),
        reconcile_seconds=_need(reconcile),
        max_staleness_seconds=max_staleness,
        requests_per_second=_need(rate),
    )


# --- Backend ---------------------------------------------------------------------------------------

_BACKEND_KEYS = (
    *_COMMON_KEYS,
    *("hosts", "audience", "endpoints", "tls", "connect_timeout", "timeout", "public_paths", "credentials", "inject"),
)
# "any": GitLab ID tokens (per bindings) or the control plane's exchanged credentials; "exchanged": only the latter.
_BACKEND_CREDENTIALS = ("any", "exchanged")


def _exact_path_check(value: str) -> str | None:
    if not value.startswith("/"):
        return f"must start with '/', got {quoted(value)}"
    if any(c in value for c in "*?#") or any(c.isspace() for c in value):
        return f"expected an exact path (no globs, query, fragment or spaces), got {quoted(value)}"
    return None


_exact_path = _checked(_string, _exact_path_check)


def _endpoint_fields(f: _Fields) -> Endpoint:
    address, port = f.required("address", _address), f.required("port", _port)
    return Endpoint(_need(address), _need(port))


_endpoint = _record(_endpoint_fields, ("address", "port"))


def _backend(doc: _Doc, env: _Env) -> Backend:
    f = _Fields(doc.ctx, doc.node, "", _BACKEND_KEYS)
    hosts = f.required("hosts", _list_of(_host_pattern))
    _register_hosts(doc, f, hosts, env)
    first = hosts[0] if hosts else None
    audience = f.maybe("audience", _string)
    if audience is None and first is not None and not f.has("audience"):
        if first.startswith("*."):
            f.ctx.error(f.node.line, "audience", "missing required key when hosts[0] is a wildcard")
        audience = f"https://{first}"
    endpoints = f.required("endpoints", _list_of(_endpoint))
    tls = _tls(f, first)
    connect_timeout = f.optional("connect_timeout", _duration(1, 60_000), 2000)
    timeout = f.optional("timeout", _duration(1, 86_400_000), 15_000)
    public_paths = f.optional_tuple("public_paths", _list_of(_exact_path, non_empty=False))
    credentials = f.optional("credentials", _enum("credentials", _BACKEND_CREDENTIALS), "any")
    inject = f.maybe("inject", _injection)
    return Backend(
        name=_need(doc.name),
        hosts=_need(hosts),
        audience=_need(audience),
        endpoints=_need(endpoints),
        tls=tls,
        connect_timeout_ms=_need(connect_timeout),
        request_timeout_ms=_need(timeout),
        public_paths=_need(public_paths),
        source=doc.source,
        credentials=_need(credentials),
        inject=inject,
    )


_INJECT_KEYS = ("header", "value_prefix", "secret_env", "secret_file")
_NO_SECRETS = {
    key: "secrets never go in policy files (they are read by many and kept in git history): "
    "name where to find it with secret_env or secret_file"
    for key in ("secret", "value", "token")
}
# An HTTP field name (RFC 9110 token); pseudo-headers and Host are routing, not credentials.
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_header_name = _checked(
    _matching(_HEADER_RE, "expected an HTTP header name such as Authorization"),
    lambda v: "the Host header cannot carry a credential" if v.lower() == "host" else None,
)
_value_prefix = _checked(
    _string, lambda v: "no control characters in a header value" if any(ord(c) < 0x20 for c in v) else None
)


def _injection_fields(i: _Fields) -> Injection:
    """The secret is never in the policy, only where the control plane reads it: exactly one place."""
    places = [key for key in ("secret_env", "secret_file") if i.has(key)]
    if not places:
        i.ctx.error(i.node.line, i.at("secret_env"), "missing required key: secret_env or secret_file")
    elif len(places) == 2:
        i.error("secret_file", "use secret_env or secret_file, not both")
    header = i.optional("header", _header_name, "Authorization")
    prefix = i.optional("value_prefix", _value_prefix, "")
    secret_env, secret_file = i.maybe("secret_env", _env_name), i.maybe("secret_file", _absolute_path)
    return Injection(header=_need(header), prefix=_need(prefix), secret_env=secret_env, secret_file=secret_file)


_injection = _record(_injection_fields, _INJECT_KEYS, _NO_SECRETS)


def _register_hosts(doc: _Doc, f: _Fields, hosts: tuple[str, ...] | None, env: _Env) -> None:
    node = f.node.get("hosts")
    if hosts is None or not isinstance(node, YSeq):
        return
    label = f"Backend {quoted(doc.name)}"
    for i, (host, item) in enumerate(zip(hosts, node.items, strict=True)):
        env.hosts.add(host, doc.ctx.source(item.line), f"hosts[{i}]", label)


def _tls(f: _Fields, first_host: str | None) -> UpstreamTLS | None:
    """`tls: true` means every default; `false` or no key means plain text to the upstream."""
    node = f.node.get("tls")
    if isinstance(node, YScalar) and isinstance(node.value, bool) and not node.reported:
        node = YMap({}, node.line) if node.value else None
    if node is None:
        return None
    return _record(partial(_tls_fields, first_host=first_host), ("sni", "ca_file"))(f.ctx, node, f.at("tls"))


def _tls_fields(t: _Fields, first_host: str | None) -> UpstreamTLS:
    """SNI defaults to the first host, unless that is a wildcard (no single name to present)."""
    sni = t.maybe("sni", _hostname)
    if not t.has("sni") and first_host is not None:
        if first_host.startswith("*."):
            t.ctx.error(t.node.line, t.at("sni"), "missing required key when hosts[0] is a wildcard")
        else:
            sni = first_host
    ca_file = t.optional("ca_file", _absolute_path, DEFAULT_CA_FILE)
    return UpstreamTLS(_need(sni), _need(ca_file))


# --- Role ------------------------------------------------------------------------------------------

_ROLE_KEYS = (*_COMMON_KEYS, "backend", "rules")


def _method_check(value: str) -> str | None:
    if value in HTTP_METHODS:
        return None
    if value.upper() in HTTP_METHODS:
        return f"methods are upper-case: write {quoted(value.upper())}"
    return _one_of_message("method", value, HTTP_METHODS)


def _route_path_check(value: str) -> str | None:
    """Exact, or `*` within a segment, or a final `/**` for any depth."""
    if not value.startswith("/"):
        return f"must start with '/', got {quoted(value)}"
    if any(c in value for c in "?#") or any(c.isspace() for c in value):
        return f"no query, fragment or spaces in a path, got {quoted(value)}"
    segments = value.split("/")
    for i, segment in enumerate(segments):
        if "**" in segment and not (segment == "**" and i == len(segments) - 1):
            return f"'**' is only allowed as a final '/**' (any depth), got {quoted(value)}"
    return None


_method = _checked(_string, _method_check)
_route_path = _checked(_string, _route_path_check)


def _rule(f: _Fields) -> RoleRule:
    if not f.has("methods") and not f.has("paths"):
        message = "a rule needs methods or paths (to allow everything write paths: ['/**'])"
        f.ctx.error(f.node.line, f.path, message)
    methods = f.optional_tuple("methods", _list_of(_method))
    paths = f.optional_tuple("paths", _list_of(_route_path))
    return RoleRule(_need(methods), _need(paths))


_rules = _list_of(_record(_rule, ("methods", "paths")))


def _role(doc: _Doc, env: _Env) -> Role:
    f = _Fields(doc.ctx, doc.node, "", _ROLE_KEYS)
    backend = f.required("backend", env.reference("Backend"))
    rules = f.required("rules", _rules)
    return Role(name=_need(doc.name), backend=_need(backend), rules=_need(rules), source=doc.source)


# --- Gateway ---------------------------------------------------------------------------------------

_GATEWAY_KEYS = (*_COMMON_KEYS, "listen", "backends", "access_log")


def _listen_fields(f: _Fields) -> tuple[str, int]:
    address, port = f.optional("address", _ip, "0.0.0.0"), f.required("port", _port)
    return _need(address), _need(port)


_listen = _record(_listen_fields, ("address", "port"))


def _gateway(doc: _Doc, env: _Env) -> Gateway:
    f = _Fields(doc.ctx, doc.node, "", _GATEWAY_KEYS)
    listen = f.required("listen", _listen)
    backends = f.required("backends", _list_of(env.reference("Backend")))
    access_log = f.optional("access_log", _absolute_path, "/dev/stdout")
    address, port = _need(listen)
    return Gateway(
        name=_need(doc.name),
        address=address,
        port=port,
        backends=tuple(sorted(_need(backends))),
        access_log_path=_need(access_log),
        source=doc.source,
    )


# --- Binding and subjects --------------------------------------------------------------------------

_BINDING_KEYS = (*_COMMON_KEYS, "issuer", "roles", "mode", "subjects", "credential_ttl")
_PIN_KEYS = ("project", "group", "include_subgroups")
_PINNED_CLAIMS = {"project_id": "project", "namespace_id": "group"}


def _claim_text(ctx: _Ctx, node: YNode, path: str) -> str | None:
    """A claim value as the token carries it: a string (`true` -> "true", `42` -> "42")."""
    if not isinstance(node, YScalar) or node.reported or node.value is None or isinstance(node.value, float):
        _fail(ctx, node, path, "a string, an integer or true/false")
        return None
    if isinstance(node.value, bool):
        return "true" if node.value else "false"
    if isinstance(node.value, int):
        if str(node.value) != node.text:  # 0x10, 010, 1_000, 1:30 are numbers in YAML 1.1
            ctx.error(node.line, path, f"YAML reads {node.text} as the number {node.value}: quote it")
            return None
        return node.text
    return _string(ctx, node, path)


def _glob_check(value: str) -> str | None:
    if "**" in value:
        return "'**' is not allowed in claim values ('*' matches any characters except '/')"
    return None


_claim_glob = _checked(_claim_text, _glob_check)


def _claim_enum(*choices: str) -> Conv[str]:
    return _checked(_claim_text, lambda v: None if v in choices else _one_of_message("value", v, choices))


_claim_bool = _checked(
    _claim_text, lambda v: None if v in ("true", "false") else f"expected true or false, got {quoted(v)}"
)

GITLAB_CLAIMS: dict[str, Conv[str]] = {
    "ref": _claim_glob,
    "ref_type": _claim_enum("branch", "tag"),
    "ref_path": _claim_glob,
    "ref_protected": _claim_bool,
    "environment": _claim_glob,
    "environment_protected": _claim_bool,
    "deployment_tier": _claim_enum("production", "staging", "testing", "development", "other"),
    "environment_action": _claim_glob,
    "pipeline_source": _claim_glob,
    "user_access_level": _claim_enum("guest", "planner", "reporter", "developer", "maintainer", "owner"),
    "user_id": _claim_glob,
    "user_login": _claim_glob,
    "runner_environment": _claim_enum("gitlab-hosted", "self-hosted"),
    "sha": _claim_glob,
    "ci_config_ref_uri": _claim_glob,
    "ci_config_sha": _claim_glob,
    "project_visibility": _claim_glob,
}
"""The GitLab claims a subject may name directly, each with how its values are checked."""


def _claim_name_problem(name: str, kind: IssuerKind) -> str | None:
    if name in RESERVED_CLAIMS:
        return f"claim {quoted(name)} is checked by the token validation itself and cannot be matched"
    if any(c.isspace() for c in name):
        return f"claim names have no spaces, got {quoted(name)}"
    if kind is IssuerKind.GITLAB and name in GITLAB_CLAIMS:
        return f"write {quoted(name)} as a key of the subject, not under claims"
    if kind is IssuerKind.GITLAB and name in _PINNED_CLAIMS:
        return f"write {quoted(_PINNED_CLAIMS[name])} (resolved to ids through the inventory) instead of {quoted(name)}"
    return None


def _claim_matches(f: _Fields, kind: IssuerKind) -> list[ClaimMatch]:
    """Typed GitLab keys and the free-form `claims:` mapping, as one list of claim conditions."""
    typed = GITLAB_CLAIMS if kind is IssuerKind.GITLAB else {}
    found = [(k, f.line(k), f.maybe(k, _one_or_list(read))) for k, read in typed.items() if f.has(k)]
    node = f.node.get("claims")
    if node is not None and (not isinstance(node, YMap) or node.reported or not node.entries):
        _fail(f.ctx, node, f.at("claims"), "a non-empty mapping of claim name to value(s)")
    elif isinstance(node, YMap):
        found.extend(_free_claims(f.ctx, node, f.at("claims"), kind))
    return [ClaimMatch(name, _need(values), f.ctx.source(line)) for name, line, values in found]


def _free_claims(ctx: _Ctx, node: YMap, path: str, kind: IssuerKind) -> list[tuple[str, int, tuple[str, ...] | None]]:
    """`claims:` maps any other claim name to a value or a list of values (OR)."""
    found = []
    for name, entry in node.entries.items():
        problem = _claim_name_problem(name, kind)
        if problem is not None:
            ctx.error(entry.key_line, child_path(path, name), problem)
        values = _one_or_list(_claim_glob)(ctx, entry.value, child_path(path, name))
        found.append((name, entry.key_line, values))
    return found


_projects: Conv[tuple[ProjectRef, ...]] = _one_or_list(_project_ref)
_groups: Conv[tuple[GroupRef, ...]] = _one_or_list(_group_ref)


def _gitlab_subject(f: _Fields) -> Subject:
    pinned = [key for key in ("project", "group") if f.has(key)]
    if not pinned:
        f.ctx.error(f.node.line, f.path, "every GitLab subject must pin a project or a group")
    elif len(pinned) == 2:
        f.error("group", "pin a project or a group, not both (write two subjects to allow either)")
    if f.has("include_subgroups") and not f.has("group"):
        f.error("include_subgroups", "only with group")
    projects = f.optional_tuple("project", _projects)
    groups = f.optional_tuple("group", _groups)
    include = f.optional("include_subgroups", _boolean, True)
    claims = _claim_matches(f, IssuerKind.GITLAB)
    source = f.ctx.source(f.node.line)
    return Subject(_need(projects), _need(groups), _need(include), _sorted_claims(claims), source)


def _oidc_subject(f: _Fields) -> Subject:
    if not f.has("claims"):
        f.ctx.error(f.node.line, f.at("claims"), "missing required key for oidc issuers")
    claims = _claim_matches(f, IssuerKind.OIDC)
    return Subject((), (), True, _sorted_claims(claims), f.ctx.source(f.node.line))


def _sorted_claims(claims: list[ClaimMatch]) -> tuple[ClaimMatch, ...]:
    return tuple(sorted(claims, key=lambda c: c.claim))


_GITLAB_ONLY = {key: "only for gitlab issuers" for key in (*_PIN_KEYS, *GITLAB_CLAIMS)}
_SUBJECTS: dict[IssuerKind, Conv[tuple[Subject, ...]]] = {
    IssuerKind.GITLAB: _list_of(_record(_gitlab_subject, (*_PIN_KEYS, *GITLAB_CLAIMS, "claims")), unique=False),
    IssuerKind.OIDC: _list_of(_record(_oidc_subject, ("claims",), _GITLAB_ONLY), unique=False),
}


def _binding(doc: _Doc, env: _Env) -> Binding:
    f = _Fields(doc.ctx, doc.node, "", _BINDING_KEYS)
    issuer = f.maybe("issuer", env.reference("Issuer")) if f.has("issuer") else _only_issuer(f, env)
    roles = f.required("roles", _list_of(env.reference("Role")))
    mode = f.optional("mode", _mapped(_enum("mode", [m.value for m in Mode]), Mode), Mode.ENFORCE)
    kind = env.issuer_kinds.get(issuer) if issuer else None
    # An issuer whose type is invalid was reported there; its subjects cannot be checked meanwhile.
    subjects = f.required("subjects", _SUBJECTS[kind]) if kind else None
    credential_ttl = f.optional("credential_ttl", _seconds(10, 86_400), 900)
    return Binding(
        name=_need(doc.name),
        issuer=_need(issuer),
        roles=tuple(sorted(_need(roles))),
        subjects=_need(subjects),
        mode=_need(mode),
        source=doc.source,
        credential_ttl_seconds=_need(credential_ttl),
    )


def _only_issuer(f: _Fields, env: _Env) -> str | None:
    declared = sorted(env.names.get("Issuer", {}))
    if len(declared) == 1:
        return declared[0]
    if env.complete:
        listed = f": one of {', '.join(declared)}" if declared else " (no Issuer is declared)"
        message = f"missing required key when there is not exactly one Issuer{listed}"
        f.ctx.error(f.node.line, "issuer", message)
    return None


# --- inventory -------------------------------------------------------------------------------------

_group_path = _matching(_GROUP_PATH_RE, "expected a GitLab group path such as acme/platform")
_project_path = _matching(_PROJECT_PATH_RE, "expected a GitLab project path such as acme/platform/deployer")


def _group_fields(f: _Fields) -> Group:
    group_id, path = f.required("id", _positive), f.required("path", _group_path)
    return Group(_need(group_id), _need(path), f.maybe("parent_id", _positive))


def _project_fields(f: _Fields) -> Project:
    project_id, path = f.required("id", _positive), f.required("path", _project_path)
    namespace_id, archived = f.required("namespace_id", _positive), f.optional("archived", _boolean, False)
    return Project(_need(project_id), _need(path), _need(namespace_id), _need(archived))


_group = _record(_group_fields, ("id", "path", "parent_id"))
_project = _record(_project_fields, ("id", "path", "namespace_id", "archived"))


def _inventory(ctx: _Ctx, documents: tuple[YNode, ...]) -> Inventory | None:
    """One document `{groups: [...], projects: [...]}` whose ids and parent links are consistent."""
    for extra in documents[1:]:
        ctx.error(extra.line, "", "an inventory file holds one document")
    if not documents:
        return Inventory()

    def build(f: _Fields) -> Inventory:
        maybe_groups = f.optional_tuple("groups", _list_of(_group, non_empty=False))
        maybe_projects = f.optional_tuple("projects", _list_of(_project, non_empty=False))
        groups, projects = _need(maybe_groups), _need(maybe_projects)
        _check_inventory(f, groups, projects)
        by_id = sorted(projects, key=lambda p: p.id), sorted(groups, key=lambda g: g.id)
        return Inventory(tuple(by_id[0]), tuple(by_id[1]))

    return _record(build, ("groups", "projects"))(ctx, documents[0], "")


def _items(f: _Fields, key: str) -> tuple[YNode, ...]:
    node = f.node.get(key)
    return node.items if isinstance(node, YSeq) else ()


def _check_inventory(f: _Fields, groups: tuple[Group, ...], projects: tuple[Project, ...]) -> None:
    """Ids unique, paths unique (groups and projects share GitLab's namespace), links consistent."""
    located = [
        (f"groups[{i}]", n.line, g.id, g.path, g.parent_id, "parent_id")
        for i, (g, n) in enumerate(zip(groups, _items(f, "groups"), strict=True))
    ] + [
        (f"projects[{i}]", n.line, p.id, p.path, p.namespace_id, "namespace_id")
        for i, (p, n) in enumerate(zip(projects, _items(f, "projects"), strict=True))
    ]
    for prefix in ("groups", "projects"):
        ids = [(i, line, f"{at}.id") for at, line, i, *_ in located if at.startswith(prefix)]
        _report_duplicates(f.ctx, ids)
    _report_duplicates(f.ctx, [(path, line, f"{at}.path") for at, line, _, path, *_ in located])
    by_id = {g.id: g for g in groups}
    for at, line, _, path, parent_id, key in located:
        problem = _parent_problem(path, parent_id, by_id, key)
        if problem:
            f.ctx.error(line, f"{at}.{problem[0]}", problem[1])


def _parent_problem(path: str, parent_id: int | None, groups: Mapping[int, Group], key: str) -> tuple[str, str] | None:
    """Paths must agree with parent links, or a group pin would silently cover the wrong projects."""
    parent_path = path.rpartition("/")[0]
    if parent_id is None:
        return ("parent_id", f"missing: {quoted(path)} is a subgroup of {quoted(parent_path)}") if parent_path else None
    parent = groups.get(parent_id)
    if parent is None:
        return (key, f"no group with id {parent_id} in this inventory")
    if parent.path != parent_path:
        return ("path", f"{quoted(path)} is not directly under group {parent_id} ({quoted(parent.path)})")
    return None


# --- the whole tree --------------------------------------------------------------------------------


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


def _register_names(docs: list[_Doc], errors: Errors) -> dict[str, dict[str, Source]]:
    registry = _Registry()
    names: dict[str, dict[str, Source]] = {}
    for doc in docs:
        if doc.name is not None:
            registry.add((doc.kind, doc.name), doc.source, "name", f"{doc.kind} {quoted(doc.name)}")
            names.setdefault(doc.kind, {}).setdefault(doc.name, doc.source)
    registry.report(errors, lambda others: f"duplicate name, also used by {others}")
    return names


def parse_policy(files: Mapping[str, str]) -> Policy:
    """Validate a policy tree given as {posix path relative to the root: file text}.

    Pure and deterministic: the same files always give an equal `Policy` (every tuple sorted by name).
    Raises `PolicyInvalid` listing the errors found, each with file, line and field path: at most
    `MAX_ERRORS_PER_FILE` per file and `MAX_ERRORS` in all, then how many more there were.
    """
    errors = Errors()
    parsed: dict[str, tuple[YNode, ...]] = {}
    complete = True
    for file in sorted(files):
        result = parse_yaml(file, files[file])
        parsed[file] = result.documents
        errors.extend(result.errors, result.omitted)
        complete = complete and result.complete

    inventory_files = _inventory_references(parsed) & parsed.keys()
    inventories = {path: _inventory(_Ctx(path, errors), parsed[path]) for path in sorted(inventory_files)}
    _BUILT.begin()
    docs = [
        doc
        for file, documents in parsed.items()
        if file not in inventory_files
        for ctx in (_Ctx(file, errors),)
        for node in documents
        if (doc := _BUILT.header(ctx, node)) is not None
    ]
    env = _Env(_register_names(docs, errors), inventories, complete)
    seen = _BUILT.fingerprint(env)
    policy = Policy(
        issuers=_build_all(docs, "Issuer", _issuer, env, seen),
        backends=_build_all(docs, "Backend", _backend, env, seen),
        roles=_build_all(docs, "Role", _role, env, seen),
        gateways=_build_all(docs, "Gateway", _gateway, env, seen),
        bindings=_build_all(docs, "Binding", _binding, env, seen),  # last: subjects depend on their issuer's type
        files=tuple(sorted(files)),
    )
    env.hosts.report(errors, lambda others: f"host is also served by {others}")
    if errors:
        raise errors.invalid()
    return policy


N = TypeVar("N", bound=Named)


def _build_all(
    docs: list[_Doc], kind: str, builder: Callable[[_Doc, _Env], N], env: _Env, fingerprint: object
) -> tuple[N, ...]:
    built = [e for doc in docs if doc.kind == kind if (e := _BUILT.build(doc, builder, env, fingerprint))]
    return tuple(sorted(built, key=lambda e: e.name))


@dataclass(frozen=True)
class _Built:
    node: YMap  # held so that its id, part of the key, cannot be reused by another node
    env: object  # the environment's fingerprint when it was built
    value: object
    hosts: tuple[tuple[str, Source, str, str], ...]  # its registrations in the hosts registry, to replay


class _RecordingRegistry(_Registry):
    def __init__(self, target: _Registry) -> None:
        super().__init__()
        self.target = target
        self.added: list[tuple[str, Source, str, str]] = []

    def add(self, key: object, source: Source, path: str, label: str) -> None:
        assert isinstance(key, str)
        self.added.append((key, source, path, label))
        self.target.add(key, source, path, label)


class _BuildMemo:
    """Documents that built without error, reused while their YAML node and what they saw of the tree stay.

    `parse_yaml` returns the very same nodes for a file whose text did not change, so a one-file commit
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

    def header(self, ctx: _Ctx, node: YNode) -> _Doc | None:
        """`_header`, reused for a node whose header was read without error before."""
        key = (ctx.file, id(node))
        hit = self._headers.get(key) or self._previous_headers.get(key)
        if hit is not None and hit[0] is node:
            self._headers[key] = hit
            return _Doc(ctx, hit[1], hit[2], hit[0], hit[3])
        before = len(ctx.errors)
        doc = _header(ctx, node)
        if doc is not None and len(ctx.errors) == before:
            self._headers[key] = (doc.node, doc.kind, doc.name, doc.source)
        return doc

    def fingerprint(self, env: _Env) -> object:
        """Called once per load, after names are registered and before anything is built: the load's
        fingerprint, to pass to every `build` of that load (loads in other threads have their own)."""
        self._fingerprint = self._interned(self._fingerprint, (env.complete, _declared(env.names)))
        return self._fingerprint

    def build(self, doc: _Doc, builder: Callable[[_Doc, _Env], N], env: _Env, fingerprint: object) -> N | None:
        if doc.kind in self._UNCACHED:
            return _attempt(doc.ctx, partial(builder, doc, env))
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
        value = _attempt(doc.ctx, partial(builder, doc, replace(env, hosts=recorder)))
        if value is not None:
            self._current[key] = _Built(doc.node, fingerprint, value, tuple(recorder.added))
        return value

    @staticmethod
    def _interned(previous: object, current: object) -> object:
        """The previous fingerprint when equal, so that most documents compare it by identity."""
        return previous if previous == current else current


def _declared(names: Mapping[str, Mapping[str, Source]]) -> frozenset[tuple[str, str]]:
    return frozenset((kind, name) for kind, by_name in names.items() for name in by_name)


_BUILT = _BuildMemo()


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
