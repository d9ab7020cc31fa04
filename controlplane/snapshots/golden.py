"""Readable, stable YAML of compiled snapshots: what reviewers diff in `snapshots/<case>/`.

Secrets are rendered with their values (and the version, a hash of them) redacted: these files are
committed and reviewed, the injected upstream credentials must never be in them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyProto

from controlplane.compiler.types import CLUSTER, ENDPOINT, EXTENSION_CONFIG, LISTENER, ROUTE, SECRET
from controlplane.resolved import render as resolved_yaml
from controlplane.resolved.access import ResolvedPolicy
from controlplane.snapshots.snapshot import Snapshot
from controlplane.statefile import atomic_write_text

FILE_NAMES: Mapping[str, str] = {
    CLUSTER: "clusters.yaml",
    ENDPOINT: "endpoints.yaml",
    LISTENER: "listeners.yaml",
    ROUTE: "routes.yaml",
    EXTENSION_CONFIG: "filter_configs.yaml",  # ECDS: the revocation buckets (and jwt_authn)
    SECRET: "secrets.yaml",  # only when the group has secrets
}
REDACTED = "REDACTED"


def resource_dicts(snapshot: Snapshot, type_url: str) -> list[dict[str, Any]]:
    """Each resource as protobuf JSON (nested Anys expanded), in name order."""
    out = []
    for resource in snapshot.types[type_url].resources.values():
        packed = AnyProto.FromString(resource.any_bytes)
        # Through JSON text: MessageToDict returns OrderedDicts for Anys, which YAML cannot represent.
        out.append(json.loads(json_format.MessageToJson(packed, preserving_proto_field_name=True)))
    if type_url in (EXTENSION_CONFIG, ROUTE):  # a binding's own AWS role signs from its routes (compiler/aws.py)
        return [_redact_keys(r, _INLINE_SECRETS) for r in out]
    return [_redacted(r) for r in out] if type_url == SECRET else out


# AWS signing credentials travel inline in an ECDS resource, and a binding role's in its routes (compiler/aws.py);
# the key id, as in Envoy's own config dump, is not secret.
_INLINE_SECRETS = frozenset({"secret_access_key", "session_token"})


def _redact_keys(node: Any, keys: frozenset[str]) -> Any:
    if isinstance(node, dict):
        return {k: REDACTED if k in keys else _redact_keys(v, keys) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_keys(v, keys) for v in node]
    return node


def _redacted(secret: dict[str, Any]) -> dict[str, Any]:
    """Every data source of a Secret (generic, TLS keys...) replaced by a marker: the shape stays reviewable."""
    return {k: _redact_values(v) if k != "name" else v for k, v in secret.items()}


def _redact_values(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _redact_values(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_redact_values(v) for v in node]
    return REDACTED


def render(snapshot: Snapshot) -> dict[str, str]:
    """File name → YAML text for one gateway group."""
    files = {}
    for type_url, file_name in FILE_NAMES.items():
        if type_url == SECRET and not snapshot.types[SECRET].resources:
            continue
        version = REDACTED if type_url == SECRET else snapshot.version(type_url)
        header = f"# {type_url}\n# version: {version}\n"
        body = yaml.safe_dump(resource_dicts(snapshot, type_url), sort_keys=True, default_flow_style=False, width=120)
        files[file_name] = header + body
    return files


class OutputRefused(ValueError):
    """`--out` is not a snapshot directory this module may replace: nothing was deleted or written."""


def _first_line(type_url: str) -> bytes:
    """The line `render` starts each file of that type with: what marks a file as ours, beyond its name."""
    return f"# {type_url}\n".encode()


_OWN_FIRST_LINES: Mapping[str, bytes] = {
    **{file_name: _first_line(type_url) for type_url, file_name in FILE_NAMES.items()},
    resolved_yaml.FILE_NAME: resolved_yaml.HEADER.splitlines(keepends=True)[0].encode(),
}


def _is_ours(out_dir: Path, relative: Path) -> bool:
    """`resolved.yaml`, or `<group>/<one of FILE_NAMES>`, starting with the line `write` starts it with: a
    stranger's file under one of our names (`x/routes.yaml` holding `x: 1`) is not ours to delete."""
    parts = relative.parts
    named = len(parts) == 1 and parts[0] == resolved_yaml.FILE_NAME
    named = named or (len(parts) == 2 and parts[1] in FILE_NAMES.values())
    if not named:
        return False
    expected = _OWN_FIRST_LINES[parts[-1]]
    path = out_dir / relative
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open("rb") as file:
            return file.readline(len(expected) + 1) == expected  # bounded: never more than the line we want
    except OSError:
        return False  # unreadable: cannot be shown to be ours


def check_output(out_dir: Path, policy_dir: Path) -> list[Path]:
    """The YAML files `write` would replace in `out_dir`; `OutputRefused` when replacing them could lose work.

    Writing replaces every YAML file below `out_dir`, so a mistyped `--out` (the policy directory itself, or a
    folder of someone's YAML) would delete what is not ours to delete; and snapshots written inside the policy
    directory would be read back as policy on the next load."""
    out, policy = out_dir.resolve(), policy_dir.resolve()
    if out == policy or policy in out.parents:
        raise OutputRefused(f"{out_dir}: the output directory is (inside) the policy directory {policy_dir}")
    if out in policy.parents:
        raise OutputRefused(f"{out_dir}: the output directory holds the policy directory {policy_dir}")
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise OutputRefused(f"{out_dir}: not a directory")
    found = sorted(out_dir.rglob("*.yaml"), reverse=True)
    foreign = sorted(p.relative_to(out_dir).as_posix() for p in found if not _is_ours(out_dir, p.relative_to(out_dir)))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputRefused(f"{out_dir}: holds YAML that is not a compiled snapshot ({listed}); nothing was replaced")
    return found


def write(
    snapshots: Mapping[str, Snapshot], out_dir: Path, *, resolved: ResolvedPolicy, policy_dir: Path
) -> list[Path]:
    """Replace `out_dir` with one folder per group, so removed groups and types disappear from the diff, and
    the resolved policy they were compiled from (`resolved.yaml`) beside them. Refused (`OutputRefused`,
    before anything is deleted) when `out_dir` holds other YAML or lies in `policy_dir` (`check_output`).

    Each file is replaced whole (`statefile.atomic_write_text`): a crash, or a reader such as a deploy job
    picking the files up, never sees half a file."""
    written = []
    for stale in check_output(out_dir, policy_dir):
        stale.unlink()
    for group, snapshot in sorted(snapshots.items()):
        group_dir = out_dir / group
        group_dir.mkdir(parents=True, exist_ok=True)
        for file_name, text in render(snapshot).items():
            path = group_dir / file_name
            atomic_write_text(path, text, mode=None)  # shared output: the umask decides, as for any new file
            written.append(path)
    for empty in sorted((d for d in out_dir.rglob("*") if d.is_dir()), reverse=True):
        if not any(empty.iterdir()):
            empty.rmdir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / resolved_yaml.FILE_NAME
    atomic_write_text(path, resolved_yaml.render(resolved), mode=None)
    written.append(path)
    return written
