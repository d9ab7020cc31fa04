"""`kind: Issuer`: who signs the tokens, where its keys are, and what it knows of GitLab (offline or live).

Tokens are never read from policy files (`_NO_TOKENS`): only where the control plane finds them.
"""

from __future__ import annotations

import posixpath
from functools import partial
from types import MappingProxyType

from controlplane.model import scalars
from controlplane.model.documents import COMMON_KEYS, Doc, Env
from controlplane.model.errors import quoted
from controlplane.model.fields import Fields, list_of, need, record
from controlplane.model.inventory import Inventory
from controlplane.model.policy import (
    DEFAULT_JWKS_MODE,
    DEFAULT_RECONCILE_SECONDS,
    DEFAULT_REQUESTS_PER_SECOND,
    GitLabApi,
    Issuer,
    IssuerKind,
    JwksMode,
)

GITLAB_JWKS_PATH = "/oauth/discovery/keys"

_ISSUER_KEYS = (*COMMON_KEYS, "type", "url", "jwks", "jwks_uri", "jwks_cache", "clock_skew", "inventory", "api")
_SKEW_WHY = " (0 is not allowed: Envoy reads 0 as its default of 60s)"
_TOKEN_KEYS = ("token", "private_token", "access_token", "api_token", "gitlab_token")
_NO_TOKENS = MappingProxyType(
    {
        key: "tokens never go in policy files (they are read by many and kept in git history): "
        "name where to find it with token_env or token_file"
        for key in _TOKEN_KEYS
    }
)


def _inventory_path_check(value: str) -> str | None:
    normal = posixpath.normpath(value)
    if value.startswith("/") or "\\" in value or normal.startswith("../") or normal == "..":
        return f"expected a path relative to the policy root, got {quoted(value)}"
    return None


_relative_path = scalars.checked(scalars.string, _inventory_path_check)
_inventory_path = scalars.mapped(_relative_path, lambda path: posixpath.normpath(path))


def build(doc: Doc, env: Env) -> Issuer:
    f = Fields(doc.ctx, doc.node, "", _ISSUER_KEYS, _NO_TOKENS)
    kind = f.required("type", scalars.mapped(scalars.enum("issuer type", [k.value for k in IssuerKind]), IssuerKind))
    if kind is not None and doc.name is not None:
        env.issuer_kinds[doc.name] = kind
    url = f.required("url", scalars.issuer_url)
    if kind is IssuerKind.OIDC:
        jwks_uri = f.required("jwks_uri", scalars.url, " for oidc issuers")
    elif f.has("jwks_uri"):
        jwks_uri = f.maybe("jwks_uri", scalars.url)
    else:
        jwks_uri = None if url is None else url + GITLAB_JWKS_PATH
    jwks_mode = f.optional("jwks", _jwks_mode, DEFAULT_JWKS_MODE)
    cache = f.optional("jwks_cache", scalars.seconds(1, 86400), 300)
    skew = f.optional("clock_skew", scalars.seconds(1, 300, _SKEW_WHY), 30)
    inventory = _issuer_inventory(f, kind, env)
    api = _issuer_api(f, kind, url)
    return Issuer(
        name=need(doc.name),
        kind=need(kind),
        url=need(url),
        jwks_uri=need(jwks_uri),
        clock_skew_seconds=need(skew),
        jwks_cache_seconds=need(cache),
        source=doc.source,
        inventory=inventory,
        jwks_mode=need(jwks_mode),
        api=api,
    )


def _issuer_inventory(f: Fields, kind: IssuerKind | None, env: Env) -> Inventory | None:
    if not f.has("inventory"):
        return None
    if kind is IssuerKind.OIDC:
        f.error("inventory", "only for gitlab issuers")
        return None
    path = need(f.maybe("inventory", _inventory_path))
    if path not in env.inventories:
        f.error("inventory", f"no file {quoted(path)} in the policy tree")
        return None
    return need(env.inventories[path])  # None: the inventory file had errors, reported there


_jwks_mode = scalars.mapped(scalars.enum("jwks mode", tuple(m.value for m in JwksMode)), JwksMode)
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


_rate = scalars.checked(
    scalars.number, lambda v: None if 0.1 <= v <= 1000 else f"must be between 0.1 and 1000, got {v:g}"
)
_api_url = scalars.mapped(scalars.url, lambda url: url.rstrip("/"))
# Groups and the policy project are kept as GitLab's API takes them: a path, or an id written as a string.
_api_group = scalars.mapped(scalars.group_ref, str)


def _issuer_api(f: Fields, kind: IssuerKind | None, issuer_url: str | None) -> GitLabApi | None:
    """`api:` watches GitLab live; it replaces an offline `inventory:` rather than mixing with it."""
    if not f.has("api"):
        return None
    if kind is IssuerKind.OIDC:
        f.error("api", "only for gitlab issuers")
        return None
    if f.has("inventory"):  # still read below, so its own mistakes are reported in the same pass
        f.error("api", "use either inventory (offline) or api (live GitLab), not both")
    read = record(partial(_api_fields, issuer_url=issuer_url), _API_KEYS, _NO_TOKENS)
    return need(f.maybe("api", read))


def _api_fields(a: Fields, issuer_url: str | None) -> GitLabApi:
    token_env, token_file = scalars.secret_source(a, "token_env", "token_file")
    url = a.optional("url", _api_url, issuer_url)
    groups = a.optional_tuple("groups", list_of(_api_group, non_empty=False))
    reconcile = a.optional("reconcile", scalars.seconds(10, 86400), DEFAULT_RECONCILE_SECONDS)
    max_staleness = a.maybe("max_staleness", scalars.seconds(10, _API_MAX_STALENESS_S))
    if max_staleness is not None and reconcile is not None and max_staleness < reconcile:
        at_least = scalars.format_ms(reconcile * 1000)
        message = f"must be at least reconcile ({at_least}): one late reconcile would withdraw"
        a.error("max_staleness", message + " every binding that depends on GitLab")
    rate = a.optional("requests_per_second", _rate, DEFAULT_REQUESTS_PER_SECOND)
    return GitLabApi(
        url=need(url),
        token_env=token_env,
        token_file=token_file,
        groups=need(groups),
        reconcile_seconds=need(reconcile),
        max_staleness_seconds=max_staleness,
        requests_per_second=need(rate),
    )
