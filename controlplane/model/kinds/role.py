"""`kind: Role`: what may be done (methods and paths) on one backend."""

from __future__ import annotations

from controlplane.model import scalars
from controlplane.model.documents import COMMON_KEYS, Doc, Env
from controlplane.model.errors import quoted
from controlplane.model.fields import Fields, list_of, need, one_of_message, record
from controlplane.model.policy import Role, RoleRule

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_ROLE_KEYS = (*COMMON_KEYS, "backend", "rules")


def _method_check(value: str) -> str | None:
    if value in HTTP_METHODS:
        return None
    if value.upper() in HTTP_METHODS:
        return f"methods are upper-case: write {quoted(value.upper())}"
    return one_of_message("method", value, HTTP_METHODS)


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


_method = scalars.checked(scalars.string, _method_check)
_route_path = scalars.checked(scalars.string, _route_path_check)


def _rule(f: Fields) -> RoleRule:
    if not f.has("methods") and not f.has("paths"):
        message = "a rule needs methods or paths (to allow everything write paths: ['/**'])"
        f.ctx.error(f.node.line, f.path, message)
    methods = f.optional_tuple("methods", list_of(_method))
    paths = f.optional_tuple("paths", list_of(_route_path))
    return RoleRule(need(methods), need(paths))


_rules = list_of(record(_rule, ("methods", "paths")))


def build(doc: Doc, env: Env) -> Role:
    f = Fields(doc.ctx, doc.node, "", _ROLE_KEYS)
    backend = f.required("backend", env.reference("Backend"))
    rules = f.required("rules", _rules)
    return Role(name=need(doc.name), backend=need(backend), rules=need(rules), source=doc.source)
