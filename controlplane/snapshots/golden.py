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

from controlplane.compiler.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET
from controlplane.resolved import render as resolved_yaml
from controlplane.resolved.access import ResolvedPolicy
from controlplane.snapshots.snapshot import Snapshot
from controlplane.statefile import atomic_write_text

FILE_NAMES: Mapping[str, str] = {
    CLUSTER: "clusters.yaml",
    ENDPOINT: "endpoints.yaml",
    LISTENER: "listeners.yaml",
    ROUTE: "routes.yaml",
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
    return [_redacted(r) for r in out] if type_url == SECRET else out


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


def write(snapshots: Mapping[str, Snapshot], out_dir: Path, *, resolved: ResolvedPolicy) -> list[Path]:
    """Replace `out_dir` with one folder per group, so removed groups and types disappear from the diff, and
    the resolved policy they were compiled from (`resolved.yaml`) beside them.

    Each file is replaced whole (`statefile.atomic_write_text`): a crash, or a reader such as a deploy job
    picking the files up, never sees half a file."""
    written = []
    if out_dir.exists():
        for stale in sorted(out_dir.rglob("*.yaml"), reverse=True):
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
