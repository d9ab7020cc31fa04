"""`kind: Binding` and its subjects: which tokens (an issuer's, pinned to projects or groups, with claim
conditions) are granted which roles. Built last: what a subject may say depends on its issuer's type."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from controlplane.model import scalars
from controlplane.model.documents import COMMON_KEYS, Doc, Env
from controlplane.model.errors import quoted
from controlplane.model.fields import (
    Conv,
    Ctx,
    Fields,
    fail,
    list_of,
    need,
    one_of_message,
    one_or_list,
    record,
    with_schema,
)
from controlplane.model.kinds.aws import role_arn
from controlplane.model.policy import (
    DEFAULT_CREDENTIAL_TTL_SECONDS,
    Binding,
    ClaimMatch,
    GroupRef,
    IssuerKind,
    Mode,
    ProjectRef,
    Subject,
)
from controlplane.model.yaml_source import YMap, YNode, YScalar, child_path

RESERVED_CLAIMS = frozenset({"iss", "aud", "exp", "nbf", "iat", "jti"})

_BINDING_KEYS = (*COMMON_KEYS, "issuer", "roles", "mode", "subjects", "credential_ttl", "aws_role_arn")
_PIN_KEYS = ("project", "group", "include_subgroups")
_PINNED_CLAIMS = MappingProxyType({"project_id": "project", "namespace_id": "group"})


def _claim_text(ctx: Ctx, node: YNode, path: str) -> str | None:
    """A claim value as the token carries it: a string (`true` -> "true", `42` -> "42")."""
    if not isinstance(node, YScalar) or node.reported or node.value is None or isinstance(node.value, float):
        fail(ctx, node, path, "a string, an integer or true/false")
        return None
    if isinstance(node.value, bool):
        return "true" if node.value else "false"
    if isinstance(node.value, int):
        if str(node.value) != node.text:  # 0x10, 010, 1_000, 1:30 are numbers in YAML 1.1
            ctx.error(node.line, path, f"YAML reads {node.text} as the number {node.value}: quote it")
            return None
        return node.text
    return scalars.string(ctx, node, path)


with_schema(_claim_text, {"anyOf": [{"type": "string", "minLength": 1}, {"type": ["integer", "boolean"]}]})


def _glob_check(value: str) -> str | None:
    if "**" in value:
        return "'**' is not allowed in claim values ('*' matches any characters except '/')"
    return None


_claim_glob = scalars.checked(_claim_text, _glob_check)


def _claim_enum(*choices: str) -> Conv[str]:
    one_of = scalars.checked(_claim_text, lambda v: None if v in choices else one_of_message("value", v, choices))
    return with_schema(one_of, {"enum": list(choices)})


_claim_bool = with_schema(
    scalars.checked(
        _claim_text, lambda v: None if v in ("true", "false") else f"expected true or false, got {quoted(v)}"
    ),
    {"enum": [True, False, "true", "false"]},
)

GITLAB_CLAIMS: Mapping[str, Conv[str]] = MappingProxyType(
    {
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
)
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


def _claim_matches(f: Fields, kind: IssuerKind) -> list[ClaimMatch]:
    """Typed GitLab keys and the free-form `claims:` mapping, as one list of claim conditions."""
    typed: Mapping[str, Conv[str]] = GITLAB_CLAIMS if kind is IssuerKind.GITLAB else {}
    found = [(k, f.line(k), f.maybe(k, one_or_list(read))) for k, read in typed.items() if f.has(k)]
    node = f.node.get("claims")
    if node is not None and (not isinstance(node, YMap) or node.reported or not node.entries):
        fail(f.ctx, node, f.at("claims"), "a non-empty mapping of claim name to value(s)")
    elif isinstance(node, YMap):
        found.extend(_free_claims(f.ctx, node, f.at("claims"), kind))
    return [ClaimMatch(name, need(values), f.ctx.source(line)) for name, line, values in found]


def _free_claims(ctx: Ctx, node: YMap, path: str, kind: IssuerKind) -> list[tuple[str, int, tuple[str, ...] | None]]:
    """`claims:` maps any other claim name to a value or a list of values (OR)."""
    found = []
    for name, entry in node.entries.items():
        problem = _claim_name_problem(name, kind)
        if problem is not None:
            ctx.error(entry.key_line, child_path(path, name), problem)
        values = one_or_list(_claim_glob)(ctx, entry.value, child_path(path, name))
        found.append((name, entry.key_line, values))
    return found


_projects: Conv[tuple[ProjectRef, ...]] = one_or_list(scalars.project_ref)
_groups: Conv[tuple[GroupRef, ...]] = one_or_list(scalars.group_ref)


def _gitlab_subject(f: Fields) -> Subject:
    pinned = [key for key in ("project", "group") if f.has(key)]
    if not pinned:
        f.ctx.error(f.node.line, f.path, "every GitLab subject must pin a project or a group")
    elif len(pinned) == 2:
        f.error("group", "pin a project or a group, not both (write two subjects to allow either)")
    if f.has("include_subgroups") and not f.has("group"):
        f.error("include_subgroups", "only with group")
    projects = f.optional_tuple("project", _projects)
    groups = f.optional_tuple("group", _groups)
    include = f.optional("include_subgroups", scalars.boolean, True)
    claims = _claim_matches(f, IssuerKind.GITLAB)
    source = f.ctx.source(f.node.line)
    return Subject(need(projects), need(groups), need(include), _sorted_claims(claims), source)


def _oidc_subject(f: Fields) -> Subject:
    if not f.has("claims"):
        f.ctx.error(f.node.line, f.at("claims"), "missing required key for oidc issuers")
    claims = _claim_matches(f, IssuerKind.OIDC)
    return Subject((), (), True, _sorted_claims(claims), f.ctx.source(f.node.line))


def _sorted_claims(claims: list[ClaimMatch]) -> tuple[ClaimMatch, ...]:
    return tuple(sorted(claims, key=lambda c: c.claim))


_GITLAB_ONLY = MappingProxyType({key: "only for gitlab issuers" for key in (*_PIN_KEYS, *GITLAB_CLAIMS)})
_SUBJECTS: Mapping[IssuerKind, Conv[tuple[Subject, ...]]] = MappingProxyType(
    {
        IssuerKind.GITLAB: list_of(record(_gitlab_subject, (*_PIN_KEYS, *GITLAB_CLAIMS, "claims")), unique=False),
        IssuerKind.OIDC: list_of(record(_oidc_subject, ("claims",), _GITLAB_ONLY), unique=False),
    }
)


def build(doc: Doc, env: Env) -> Binding:
    f = Fields(doc.ctx, doc.node, "", _BINDING_KEYS)
    issuer = f.maybe("issuer", env.reference("Issuer")) if f.has("issuer") else _only_issuer(f, env)
    roles = f.required("roles", list_of(env.reference("Role")))
    mode = f.optional("mode", scalars.mapped(scalars.enum("mode", [m.value for m in Mode]), Mode), Mode.ENFORCE)
    kind = env.issuer_kinds.get(issuer) if issuer else None
    # An issuer whose type is invalid was reported there; its subjects cannot be checked meanwhile.
    subjects = f.required("subjects", _SUBJECTS[kind]) if kind else None
    credential_ttl = f.optional("credential_ttl", scalars.seconds(10, 86_400), DEFAULT_CREDENTIAL_TTL_SECONDS)
    aws_role = f.maybe("aws_role_arn", role_arn)
    return Binding(
        name=need(doc.name),
        issuer=need(issuer),
        roles=tuple(sorted(need(roles))),
        subjects=need(subjects),
        mode=need(mode),
        source=doc.source,
        credential_ttl_seconds=need(credential_ttl),
        aws_role_arn=aws_role,
    )


def _only_issuer(f: Fields, env: Env) -> str | None:
    declared = sorted(env.names.get("Issuer", {}))
    if len(declared) == 1:
        return declared[0]
    if env.complete:
        listed = f": one of {', '.join(declared)}" if declared else " (no Issuer is declared)"
        message = f"missing required key when there is not exactly one Issuer{listed}"
        f.ctx.error(f.node.line, "issuer", message)
    return None
