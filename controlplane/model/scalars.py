"""Converters of one scalar: strings, numbers, names, hosts, URLs, durations and GitLab references.

Each is a `Conv` built from the few in `fields`; the kinds name them in their key tables. They live apart from
the kinds because one rule (what a host or a duration is) must read the same in every document.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection
from types import MappingProxyType
from typing import TypeVar
from urllib.parse import urlsplit

from controlplane.model.errors import quoted
from controlplane.model.fields import Conv, Ctx, Fields, JsonSchema, fail, one_of_message, schema_of, with_schema
from controlplane.model.policy import GroupRef, ProjectRef
from controlplane.model.yaml_source import YNode, YScalar

T = TypeVar("T")
U = TypeVar("U")


# Patterns end in `\Z`, not `$` (which also matches before a final newline), and spell digits `[0-9]` (`\d` is
# any Unicode digit): a newline or a foreign digit must never reach an Envoy name, domain or header.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
_WILDCARD_HOST_RE = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\Z")
_DURATION_RE = re.compile(r"^([0-9]{1,18})(ms|s|m|h)\Z")  # 18 digits: past any bound, far from int()'s cap
_DURATION_UNITS_MS = MappingProxyType({"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000})
_GITLAB_SEGMENT = r"[A-Za-z0-9_.][A-Za-z0-9_.-]*"
_GROUP_PATH_RE = re.compile(rf"^{_GITLAB_SEGMENT}(/{_GITLAB_SEGMENT})*\Z")
_PROJECT_PATH_RE = re.compile(rf"^{_GITLAB_SEGMENT}(/{_GITLAB_SEGMENT})+\Z")
_ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*\Z")


def string(ctx: Ctx, node: YNode, path: str) -> str | None:
    if not isinstance(node, YScalar) or not isinstance(node.value, str) or node.reported:
        fail(ctx, node, path, "a string")
        return None
    if not node.value:
        ctx.error(node.line, path, "must not be empty")
        return None
    return node.value


def pattern(regex: re.Pattern[str]) -> JsonSchema:
    """A string matching `regex`, in JSON Schema's (ECMA-262) dialect: `\\Z` becomes `$`."""
    return {"type": "string", "pattern": regex.pattern.replace("\\Z", "$")}


with_schema(string, {"type": "string", "minLength": 1})


def integer(ctx: Ctx, node: YNode, path: str) -> int | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, int) or isinstance(value, bool):
        fail(ctx, node, path, "an integer")
        return None
    return value


with_schema(integer, {"type": "integer"})


def boolean(ctx: Ctx, node: YNode, path: str) -> bool | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, bool):
        fail(ctx, node, path, "true or false")
        return None
    return value


with_schema(boolean, {"type": "boolean"})


def number(ctx: Ctx, node: YNode, path: str) -> float | None:
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        fail(ctx, node, path, "a number")
        return None
    return float(value)


with_schema(number, {"type": "number"})


def checked(conv: Conv[T], check: Callable[[T], str | None]) -> Conv[T]:
    """`conv`, then `check` on its result: a message means the value is rejected there."""

    def read(ctx: Ctx, node: YNode, path: str) -> T | None:
        value = conv(ctx, node, path)
        problem = None if value is None else check(value)
        if problem is not None:
            ctx.error(node.line, path, problem)
            return None
        return value

    return with_schema(read, schema_of(conv))


def mapped(conv: Conv[T], fn: Callable[[T], U]) -> Conv[U]:
    def read(ctx: Ctx, node: YNode, path: str) -> U | None:
        value = conv(ctx, node, path)
        return None if value is None else fn(value)

    return with_schema(read, schema_of(conv))


def in_range(lo: int, hi: int) -> Conv[int]:
    within = checked(integer, lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}, got {v}")
    return with_schema(within, {"type": "integer", "minimum": lo, "maximum": hi})


def matching(regex: re.Pattern[str], rule: str) -> Conv[str]:
    matches = checked(string, lambda v: None if regex.match(v) else f"{rule}, got {quoted(v)}")
    return with_schema(matches, pattern(regex))


def enum(what: str, choices: Collection[str]) -> Conv[str]:
    one_of = checked(string, lambda v: None if v in choices else one_of_message(what, v, choices))
    return with_schema(one_of, {"type": "string", "enum": list(choices)})


def equal(expected: str) -> Conv[str]:
    same = checked(string, lambda v: None if v == expected else f"expected {quoted(expected)}, got {quoted(v)}")
    return with_schema(same, {"const": expected})


port = in_range(1, 65535)


def _not_an_id(value: int) -> str:
    return f"expected a positive integer within GitLab's 64-bit ids, got {quoted(str(value))}"


MAX_ID = 2**63 - 1  # GitLab's ids are 64-bit: a larger one names nothing and could never match a token
positive = checked(integer, lambda v: None if 0 < v <= MAX_ID else _not_an_id(v))
with_schema(positive, {"type": "integer", "minimum": 1, "maximum": MAX_ID})
name = matching(_NAME_RE, "must be lower-case letters, digits and '-', start and end with a letter or digit (max 63)")
hostname = matching(_HOST_RE, "expected a lower-case DNS name without port")
host_pattern = matching(_WILDCARD_HOST_RE, "expected a lower-case DNS name (or *.domain) without port")
env_name = matching(_ENV_NAME_RE, "expected an environment variable name such as GITLAB_TOKEN")


def _absolute_path_check(value: str) -> str | None:
    return None if value.startswith("/") else f"expected an absolute path, got {quoted(value)}"


absolute_path = checked(string, _absolute_path_check)


def secret_source(f: Fields, env_key: str, file_key: str) -> tuple[str | None, str | None]:
    """A secret is never in the policy, only where the control plane reads it: exactly one of an environment
    variable (`env_key`) or an absolute file path (`file_key`). Both are read either way, so the mistakes of
    each are reported in the same pass."""
    places = [key for key in (env_key, file_key) if f.has(key)]
    if not places:
        f.ctx.error(f.node.line, f.at(env_key), f"missing required key: {env_key} or {file_key}")
    elif len(places) == 2:
        f.error(file_key, f"use {env_key} or {file_key}, not both")
    return f.maybe(env_key, env_name), f.maybe(file_key, absolute_path)


def _address_check(value: str) -> str | None:
    if _HOST_RE.match(value):
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"expected an IP address or a lower-case DNS name, got {quoted(value)}"
    if "%" in value:  # Python takes fe80::1%eth0; Envoy refuses the whole assignment (a NACK)
        return f"an IPv6 address with a zone (%...) is not an endpoint Envoy accepts, got {quoted(value)}"
    return None


address = checked(string, _address_check)


def _ip_check(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"expected an IP address, got {quoted(value)}"
    return None


ip = checked(string, _ip_check)


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


url = checked(string, _url_check)
issuer_url = checked(string, _issuer_url_check)


def _duration_ms(ctx: Ctx, node: YNode, path: str) -> int | None:
    """`250ms`, `30s`, `5m`, `1h`, or a bare integer of seconds."""
    value = node.value if isinstance(node, YScalar) and not node.reported else None
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value * 1000
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        return int(match[1]) * _DURATION_UNITS_MS[match[2]]
    fail(ctx, node, path, "a duration such as 250ms, 30s, 5m, 1h or a number of seconds")
    return None


# Its bounds are checked on the milliseconds, which a schema cannot compute from `5m`: loader only.
with_schema(_duration_ms, {"anyOf": [pattern(_DURATION_RE), {"type": "integer", "minimum": 0}]})


def format_ms(ms: int) -> str:
    for unit in ("h", "m", "s"):
        if ms % _DURATION_UNITS_MS[unit] == 0 and ms >= _DURATION_UNITS_MS[unit]:
            return f"{ms // _DURATION_UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


def duration(lo_ms: int, hi_ms: int, why: str = "") -> Conv[int]:
    def check(ms: int) -> str | None:
        if lo_ms <= ms <= hi_ms:
            return None
        return f"must be between {format_ms(lo_ms)} and {format_ms(hi_ms)}, got {format_ms(ms)}{why}"

    return checked(_duration_ms, check)


def seconds(lo: int, hi: int, why: str = "") -> Conv[int]:
    bounded = duration(lo * 1000, hi * 1000, why)
    whole = checked(bounded, lambda ms: None if ms % 1000 == 0 else "whole seconds only")
    return mapped(whole, lambda ms: ms // 1000)


# --- GitLab references ---------------------------------------------------------------------------

group_path = matching(_GROUP_PATH_RE, "expected a GitLab group path such as acme/platform")
project_path = matching(_PROJECT_PATH_RE, "expected a GitLab project path such as acme/platform/deployer")


def project_ref(ctx: Ctx, node: YNode, path: str) -> ProjectRef | None:
    return _pin_ref(ctx, node, path, _PROJECT_PATH_RE, "a project path (namespace/project)")


def group_ref(ctx: Ctx, node: YNode, path: str) -> GroupRef | None:
    return _pin_ref(ctx, node, path, _GROUP_PATH_RE, "a group path")


with_schema(project_ref, {"anyOf": [schema_of(positive), pattern(_PROJECT_PATH_RE)]})
with_schema(group_ref, {"anyOf": [schema_of(positive), pattern(_GROUP_PATH_RE)]})


def _pin_ref(ctx: Ctx, node: YNode, path: str, regex: re.Pattern[str], what: str) -> ProjectRef | None:
    """A positive id or an exact path; no globs, since the pin is resolved to immutable ids."""
    if isinstance(node, YScalar) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return positive(ctx, node, path)
    if isinstance(node, YScalar) and isinstance(node.value, str) and not node.reported:
        if regex.match(node.value):
            return node.value
        ctx.error(node.line, path, f"expected {what} or a positive id, got {quoted(node.value)} (no globs)")
        return None
    fail(ctx, node, path, f"{what} or a positive id")
    return None
