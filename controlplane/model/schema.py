"""A JSON Schema (draft 2020-12) of one policy document, generated from the loader's own definitions.

Editors (through yaml-language-server's `# yaml-language-server: $schema=...` modeline) use it to complete
keys and flag mistakes while typing; `validate` stays the authority. Nothing here restates a rule: the keys
come from each kind's key table, the value shapes from what the converters declare (`fields.with_schema`:
patterns, ranges, enums, list bounds), and the required keys from asking the loader itself which keys a bare
document is missing. `make schema` writes the result to schema/controlplane-policy.schema.json and
tests/test_policy_schema.py fails when the committed file differs.

Pure: text out, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType

from controlplane.model import scalars
from controlplane.model.documents import API_VERSION, COMMON_KEYS, KINDS
from controlplane.model.errors import PolicyInvalid
from controlplane.model.fields import JsonSchema, list_of, object_schema, one_or_list, schema_of
from controlplane.model.kinds import aws, backend, binding, gateway, issuer, role
from controlplane.model.loader import parse_policy
from controlplane.model.policy import IssuerKind, Mode

SCHEMA_ID = "https://controlplane.invalid/schema/controlplane-policy.schema.json"

LOADER_ONLY = (
    "Only `controlplane validate` checks what needs more than one document or a computation: references "
    "between kinds (a Role's backend, a Binding's issuer and roles, a Gateway's backends), names and hosts "
    "unique across the tree, which Issuer a Binding uses when it names none, the keys a subject may use for "
    "its issuer's type (gitlab or oidc), duration bounds (a schema cannot compare 5m with 1h), IP addresses and "
    "URLs beyond their type, paths' glob rules, either-or keys (token_env or token_file, project or group, "
    "methods or paths, address or service) and the inventory files an Issuer names."
)

_STRING = scalars.string
_DURATION = scalars.duration(0, 0)  # bounds are loader-only: every duration has the same shape

Table = Mapping[str, Callable[..., object] | JsonSchema]


def _value(entry: Callable[..., object] | JsonSchema) -> JsonSchema:
    return dict(entry) if isinstance(entry, dict) else schema_of(entry)


def _refined(base: JsonSchema, table: Table, required: Collection[str] = ()) -> JsonSchema:
    """`base` (an object schema listing its allowed keys) with each key's value shape from `table`."""
    properties = base["properties"]
    assert isinstance(properties, dict)
    missing = set(table) - set(properties)
    if missing:  # a table naming a key the loader does not allow is a bug here, not in the policy
        raise ValueError(f"not keys of this mapping: {sorted(missing)}")
    schema = {**base, "properties": {key: _value(table.get(key, {})) for key in properties}}
    if required:
        schema["required"] = sorted(required)
    return schema


def _list(item: JsonSchema, *, non_empty: bool = True) -> JsonSchema:
    schema: JsonSchema = {"type": "array", "items": item}
    return {**schema, "minItems": 1} if non_empty else schema


# --- required keys, as the loader reports them -----------------------------------------------------------

_GITLAB_ISSUER = "kind: Issuer\nname: only\ntype: gitlab\nurl: https://gitlab.example.com\n"


def _missing(document: str) -> set[str]:
    """Paths of the keys the loader reports as plainly missing ("missing required key") in `document`.

    Conditional requirements ("missing required key when ..."/"for oidc issuers") are not plain and stay
    loader-only."""
    try:
        parse_policy({"probe.yaml": document, "issuer.yaml": _GITLAB_ISSUER})
    except PolicyInvalid as invalid:
        return {e.field for e in invalid.errors if e.file == "probe.yaml" and e.message == "missing required key"}
    return set()


def _required(kind: str, nested: str = "", seeds: tuple[str, ...] = ("{}",)) -> set[str]:
    """Keys required at the top of a `kind` document, or under its key `nested` (a mapping, or `nested[0]` of a
    list), whatever else the mapping holds: the keys every `seeds` value is reported missing."""
    found: set[str] | None = None
    for seed in seeds:
        body = f"{nested}: {seed}\n" if nested else ""
        paths = _missing(f"kind: {kind}\nname: probe\n{body}")
        prefix = f"{nested}." if nested and not seed.startswith("[") else f"{nested}[0]." if nested else ""
        keys = {p.removeprefix(prefix) for p in paths if p.startswith(prefix) and "." not in p.removeprefix(prefix)}
        found = keys if found is None else found & keys
    return found or set()


# --- the five kinds --------------------------------------------------------------------------------------


def _issuer() -> JsonSchema:
    api = _refined(
        object_schema(issuer._API_KEYS),
        {
            "url": scalars.url,
            "token_env": scalars.env_name,
            "token_file": scalars.absolute_path,
            "groups": _list(schema_of(issuer._api_group), non_empty=False),
            "reconcile": _DURATION,
            "max_staleness": _DURATION,
            "requests_per_second": issuer._rate,
        },
    )
    table: Table = {
        "type": scalars.enum("issuer type", [k.value for k in IssuerKind]),
        "url": scalars.issuer_url,
        "jwks": issuer._jwks_mode,
        "jwks_uri": scalars.url,
        "jwks_cache": _DURATION,
        "clock_skew": _DURATION,
        "inventory": issuer._inventory_path,
        "api": api,
    }
    return _kind("Issuer", issuer._ISSUER_KEYS, table)


def _backend() -> JsonSchema:
    endpoint = _refined(
        schema_of(backend._endpoint),
        {"address": scalars.address, "port": backend._service_port, "service": backend._service},
        _required("Backend", "endpoints", ("[{}]", "[{service: a/b}]")),
    )
    tls = _refined(object_schema(("sni", "ca_file")), {"sni": scalars.hostname, "ca_file": scalars.absolute_path})
    inject = _refined(
        schema_of(backend._injection),
        {
            "header": backend._header_name,
            "value_prefix": backend._value_prefix,
            "secret_env": scalars.env_name,
            "secret_file": scalars.absolute_path,
        },
    )
    aws_signing = _refined(
        schema_of(aws.aws_signing),
        {
            "service": aws._service,
            "region": aws._region,
            "role_arn": aws.role_arn,
            "session_name": aws._session_name,
            "source": scalars.enum("source", aws.AWS_SOURCES),
        },
        _required("Backend", "aws"),
    )
    gcp = _refined(
        schema_of(backend._gcp),
        {
            "workload_identity_provider": backend._provider,
            "service_account": backend._service_account,
            "scopes": list_of(backend._scope),
            "id_token_audience": backend._https_audience,
            "lifetime": _DURATION,
        },
    )
    table: Table = {
        "hosts": list_of(scalars.host_pattern),
        "audience": scalars.string,
        "endpoints": _list(endpoint),
        "tls": {"anyOf": [{"type": "boolean"}, tls]},
        "connect_timeout": _DURATION,
        "timeout": _DURATION,
        "public_paths": _list(schema_of(backend._exact_path), non_empty=False),
        "credentials": scalars.enum("credentials", backend._BACKEND_CREDENTIALS),
        "inject": inject,
        "revoke": scalars.enum("revoke", backend._BACKEND_REVOKE),
        "aws": aws_signing,
        "gcp": gcp,
    }
    return _kind("Backend", backend._BACKEND_KEYS, table)


def _role() -> JsonSchema:
    rule = _refined(
        object_schema(("methods", "paths")),
        {
            "methods": {**_list({"enum": list(role.HTTP_METHODS)}), "uniqueItems": True},
            "paths": {**_list(schema_of(role._route_path)), "uniqueItems": True},
        },
    )
    return _kind("Role", role._ROLE_KEYS, {"backend": _STRING, "rules": _list(rule)})


def _binding() -> JsonSchema:
    claims: JsonSchema = {
        "type": "object",
        "minProperties": 1,
        "additionalProperties": schema_of(one_or_list(binding._claim_glob)),
    }
    gitlab_keys = (*binding._PIN_KEYS, *binding.GITLAB_CLAIMS, "claims")
    gitlab_table: dict[str, Callable[..., object] | JsonSchema] = {
        key: one_or_list(conv) for key, conv in binding.GITLAB_CLAIMS.items()
    }
    gitlab_table.update({"project": binding._projects, "group": binding._groups, "include_subgroups": scalars.boolean})
    gitlab_table["claims"] = claims
    subject = _refined(object_schema(gitlab_keys), gitlab_table)
    table: Table = {
        "issuer": _STRING,
        "roles": {**_list(schema_of(_STRING)), "uniqueItems": True},
        "mode": scalars.enum("mode", [m.value for m in Mode]),
        "subjects": _list(subject),
        "credential_ttl": _DURATION,
        "aws_role_arn": aws.role_arn,
    }
    return _kind("Binding", binding._BINDING_KEYS, table)


def _gateway() -> JsonSchema:
    listen = _refined(
        object_schema(("address", "port")),
        {"address": scalars.ip, "port": scalars.port},
        _required("Gateway", "listen"),
    )
    table: Table = {
        "listen": listen,
        "backends": {**_list(schema_of(_STRING)), "uniqueItems": True},
        "access_log": scalars.absolute_path,
    }
    return _kind("Gateway", gateway._GATEWAY_KEYS, table)


def _kind(kind: str, keys: Collection[str], table: Table) -> JsonSchema:
    header: Table = {"apiVersion": scalars.equal(API_VERSION), "kind": {"const": kind}, "name": scalars.name}
    required = {"kind", "name"} | _required(kind)
    return _refined(object_schema(keys), {**header, **table}, required)


_BUILDERS: Mapping[str, Callable[[], JsonSchema]] = MappingProxyType(
    {
        "Backend": _backend,
        "Binding": _binding,
        "Gateway": _gateway,
        "Issuer": _issuer,
        "Role": _role,
    }
)


def policy_schema() -> JsonSchema:
    """One policy document: a mapping whose `kind` picks which of the five shapes it must have."""
    assert tuple(_BUILDERS) == KINDS and set(COMMON_KEYS) == {"apiVersion", "kind", "name"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "controlplane policy document (apiVersion controlplane/v1)",
        "$comment": "Generated from controlplane/model by `make schema`; do not edit. " + LOADER_ONLY,
        "type": "object",
        "required": ["kind", "name"],
        "properties": {"kind": schema_of(scalars.enum("kind", KINDS))},
        "allOf": [
            {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]}, "then": {"$ref": f"#/$defs/{kind}"}}
            for kind in KINDS
        ],
        "$defs": {kind: build() for kind, build in _BUILDERS.items()},
    }


def render() -> str:
    """The schema file's text: stable (sorted keys) so a regenerated file diffs only where a definition moved."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"
