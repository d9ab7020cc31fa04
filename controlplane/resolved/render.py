"""The resolved policy as readable, stable YAML: `snapshots/<case>/resolved.yaml`, what a reviewer reads to
see who may do what on which backend, and diffs when a change to the policy or the resolver moves access.

Written by hand (block style, keys in a fixed order) so this layer needs nothing beyond the standard library.
Text only: `controlplane.snapshots.golden` writes the file, beside the snapshots, so this layer stays pure.

An AWS or Google Cloud backend also shows `cloud:`, who its requests are sent upstream as (its `aws:`/`gcp:`
block, resolved/cloud.py), and a grant whose binding signs as a role of its own shows that `aws_role_arn`. (The
file's header comment stays as it was, so files without cloud backends do not change.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from controlplane.model.policy import RoleRule
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.cloud import CloudIdentity
from controlplane.resolved.conditions import Condition, ResolvedSubject

FILE_NAME = "resolved.yaml"

HEADER = """\
# Who may do what on which backend: the policy resolved against GitLab's state (see controlplane/resolved).
# A subject admits a token when every condition in `all` holds and, when `any_of` is given, every one of
#   some entry of it. `claim = v`, `claim in [...]`: the claim is that string (Envoy never matches a
#   number or a bool); `!=`, `not in`: negated, also true when the claim is absent; `claim has ...`: the claim
#   is such a string or a list holding one. `*` and `?` in a value are globs within one path segment.
# A rule allows its methods on its paths; `any` where none are listed. A grant without subjects admits no one.
"""

Node = str | int | Sequence["Node"] | Mapping[str, "Node"]


def render(resolved: ResolvedPolicy) -> str:
    return HEADER + "".join(_block(document(resolved), 0))


def document(resolved: ResolvedPolicy) -> dict[str, Node]:
    """What `render` writes, as the data a YAML parser reads back from it."""
    return {
        "backends": {name: _backend(resolved, name) for name in sorted(resolved.backends)},
        "warnings": [str(w) for w in resolved.warnings],
        "pins": {issuer: dict(sorted(paths.items())) for issuer, paths in sorted(resolved.pins.items())},
    }


def _backend(resolved: ResolvedPolicy, name: str) -> Node:
    access = resolved.access(name)
    out: dict[str, Node] = {"issuers": list(access.issuers)}
    cloud = resolved.cloud.get(name)
    if cloud is not None:
        out["cloud"] = _cloud(cloud)
    roles = dict(cloud.roles) if cloud is not None else {}
    out["grants"] = [_grant(g, roles.get(g.binding)) for g in access.grants]
    return out


def _cloud(cloud: CloudIdentity) -> Node:
    """Who the backend's requests reach the cloud as: the provider and its block's settings (scopes a list)."""
    out: dict[str, Node] = {"provider": cloud.provider}
    for key, value in cloud.settings:
        out[key] = value.split() if key == "scopes" else value
    return out


def _grant(grant: Grant, aws_role_arn: str | None) -> Node:
    """`aws_role_arn`: the binding's own role, which signs its requests here instead of the backend's."""
    out: dict[str, Node] = {"name": grant.name, "mode": grant.mode.value}
    if aws_role_arn is not None:
        out["aws_role_arn"] = aws_role_arn
    out["rules"] = [_rule(r) for r in grant.rules]
    out["subjects"] = [_subject(s) for s in grant.subjects]
    return out


def _rule(rule: RoleRule) -> Node:
    return {"methods": list(rule.methods) or "any", "paths": list(rule.paths) or "any"}


def _subject(subject: ResolvedSubject) -> Node:
    out: dict[str, Node] = {"all": [condition_text(c) for c in subject.conditions]}
    if subject.alternatives:
        out["any_of"] = [[condition_text(c) for c in alt] for alt in subject.alternatives]
    return out


def condition_text(condition: Condition) -> str:
    """One line a reviewer reads: `project_id in [1, 2]`, `pipeline_source != merge_request_event`; a value is
    JSON-quoted where it holds anything but name characters (an empty value, a space, a quote)."""
    values = [v if _BARE.fullmatch(v) else json.dumps(v) for v in condition.values]
    if condition.listy:
        operator = "has no" if condition.negated else "has"
        if len(values) == 1:
            return f"{condition.claim} {operator} {values[0]}"
        return f"{condition.claim} {operator} any of [{', '.join(values)}]"
    if len(values) == 1:
        return f"{condition.claim} {'!=' if condition.negated else '='} {values[0]}"
    return f"{condition.claim} {'not in' if condition.negated else 'in'} [{', '.join(values)}]"


# -- a small YAML emitter: mappings and lists in block style, short lists of words in flow style


def _block(node: Node, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(node, Mapping):
        if not node:
            return [pad + "{}\n"]
        lines = []
        for key, value in node.items():
            head = f"{pad}{_scalar(key)}:"
            if _inline(value):
                lines.append(f"{head} {_flow(value)}\n")
            else:
                lines.append(head + "\n")
                lines.extend(_block(value, indent + 2))
        return lines
    if isinstance(node, str | int):
        return [pad + _scalar(node) + "\n"]
    lines = []
    for item in node:
        if _inline(item):
            lines.append(f"{pad}- {_flow(item)}\n")
            continue
        nested = _block(item, indent + 2)
        lines.append(f"{pad}- {nested[0][indent + 2 :]}")
        lines.extend(nested[1:])
    return lines


def _inline(node: Node) -> bool:
    if isinstance(node, str | int):
        return True
    if isinstance(node, Mapping):
        return not node
    # Names and paths on one line; conditions and sentences (they hold spaces) one per line.
    words = all(isinstance(item, int) or (isinstance(item, str) and " " not in item) for item in node)
    return words and len(_flow(node)) <= 100


def _flow(node: Node, in_list: bool = False) -> str:
    if isinstance(node, str | int):
        return _scalar(node, in_list)
    if isinstance(node, Mapping):
        return "{}"
    return "[" + ", ".join(_flow(item, True) for item in node) + "]"


_BARE = re.compile(r"[\w./:*?@+~-]+")  # a claim value shown without quotes: nothing in it reads as syntax
# Plain (unquoted) where nothing in it reads as YAML syntax: `: ` and ` #` never, `,[]{}` only outside `[...]`.
_PLAIN = re.compile(r"[A-Za-z0-9/_.](?:[^\x00-\x1f:#]|:(?! )|(?<! )#)*(?<!:)")
_PLAIN_IN_LIST = re.compile(r"[A-Za-z0-9/_.](?:[^\x00-\x1f:#,\[\]{}'\"\\]|:(?! )|(?<! )#)*(?<!:)")
_NOT_PLAIN = re.compile(r"(?i)(true|false|yes|no|on|off|null|~|[-+]?[0-9][0-9_.:e+-]*|\.inf|\.nan)")


def _scalar(value: str | int, in_list: bool = False) -> str:
    """Plain where YAML reads it back as this very string, else single-quoted (quotes doubled)."""
    if isinstance(value, int):
        return str(value)
    plain = _PLAIN_IN_LIST if in_list else _PLAIN
    if plain.fullmatch(value) and not _NOT_PLAIN.fullmatch(value) and value == value.strip():
        return value
    return "'" + value.replace("'", "''") + "'"
