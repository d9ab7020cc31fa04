"""`controlplane diff OLD NEW`: what a policy change does to access, in words, for a reviewer.

Each side is a policy directory, or a git revision (`REV`, or `REV:path` with git's meaning: path from the
repository's root) of the repository the current directory is in, read with `git archive` into a temporary
directory. Both sides are loaded, resolved and compiled as `validate --offline` does (the policy alone: no
GitLab live state, keys, credentials or secrets), and compared by `controlplane.resolved.diff`.

Exit status as diff(1)'s: 0 access unchanged, 1 changed, 2 a usage error or an invalid side.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from controlplane.cli.output import add_format_arguments
from controlplane.model.errors import PolicyInvalid
from controlplane.model.policy import Policy
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.diff import BackendDiff, Change, PolicyDiff, cloud_text, compare, document
from controlplane.snapshots.snapshot import Snapshot
from controlplane.sources.policy_dir import ReadLimits

GIT_TIMEOUT = 60.0


class UsageError(Exception):
    """A side that is neither a directory nor a revision git can read."""


class Side(NamedTuple):
    policy: Policy
    resolved: ResolvedPolicy
    snapshots: Mapping[str, Snapshot]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 access unchanged, 1 changed, 2 usage error or an invalid side (file:line: field: message). "
        "JSON output: docs/policy-diff.md."
    )
    parser.add_argument("old", help="policy directory, or git revision REV or REV:path")
    parser.add_argument("new", help="policy directory, or git revision REV or REV:path")
    add_format_arguments(parser, json_help="print the diff as JSON (stable keys, sorted)")


def run_diff(args: argparse.Namespace, limits: ReadLimits) -> int:
    sides = []
    for spec in (args.old, args.new):
        try:
            with policy_tree(spec) as tree:
                side = load_side(tree, spec, limits)
        except UsageError as error:
            print(f"controlplane diff: {error}", file=sys.stderr)
            return 2
        if side is None:
            return 2
        sides.append(side)
    old, new = sides
    diff = compare(old.resolved, new.resolved, _fronted(old.policy), _fronted(new.policy))
    resources = resource_changes(old.snapshots, new.snapshots)
    if args.format == "json":
        out = {**document(diff), "resources": resources}
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        for line in text_lines(diff, resources):
            print(line)
    return 1 if diff.changed else 0


def _fronted(policy: Policy) -> dict[str, tuple[str, ...]]:
    return {g.name: g.backends for g in policy.gateways}


@contextmanager
def policy_tree(spec: str) -> Iterator[Path]:
    """The directory `spec` names, or the tree of a git revision extracted into a temporary directory."""
    path = Path(spec)
    if path.is_dir():
        yield path
        return
    rev, _, sub = spec.partition(":")
    treeish = f"{rev}:{sub}" if sub else f"{rev}^{{tree}}"
    if not rev or rev.startswith("-"):
        raise UsageError(f"{spec}: not a directory nor a git revision")
    done = subprocess.run(
        ["git", "archive", "--format=tar", treeish], capture_output=True, timeout=GIT_TIMEOUT, check=False
    )
    if done.returncode != 0:
        reason = done.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(f"{spec}: not a directory nor a git revision ({reason[-1] if reason else 'git failed'})")
    with tempfile.TemporaryDirectory(prefix="controlplane-diff-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
            archive.extractall(tmp, filter="data")
        yield Path(tmp)


def load_side(tree: Path, spec: str, limits: ReadLimits) -> Side | None:
    """Load, resolve and compile as `validate --offline` does; print the errors (file:line: field: message,
    files named as in the tree) and return None for an invalid side."""
    from controlplane.compiler.compile import check_reserved_names
    from controlplane.model.loader import parse_policy
    from controlplane.resolved.index import Resolution
    from controlplane.snapshots.build import compile_model
    from controlplane.sources.policy_dir import read_policy_dir

    try:
        policy = parse_policy(read_policy_dir(tree, limits))
        check_reserved_names(policy, None)
        resolved = Resolution().update(policy)
        snapshots = compile_model(policy, resolved=resolved)
    except PolicyInvalid as invalid:
        for line in invalid.lines():
            print(line, file=sys.stderr)
        print(f"{spec}: invalid policy ({invalid.total} error(s))", file=sys.stderr)
        return None
    except OSError as error:
        print(f"{spec}: {error}", file=sys.stderr)
        return None
    except Exception as error:  # a bug: one line, as validate reports it, and the usage-error status
        print(f"{spec}: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return Side(policy, resolved, snapshots)


def resource_changes(old: Mapping[str, Snapshot], new: Mapping[str, Snapshot]) -> dict[str, dict[str, dict[str, int]]]:
    """Per gateway, per resource type (`Cluster`, `Listener`...): how many resources were added, removed and
    changed (same name, other bytes). Types and gateways without a change are left out."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for group in sorted(old.keys() | new.keys()):
        before, after = old.get(group), new.get(group)
        types = sorted((before.types.keys() if before else set()) | (after.types.keys() if after else set()))
        counts = {}
        for type_url in types:
            was = {n: r.version for n, r in before.types[type_url].resources.items()} if before else {}
            now = {n: r.version for n, r in after.types[type_url].resources.items()} if after else {}
            added, removed = len(now.keys() - was.keys()), len(was.keys() - now.keys())
            changed = sum(1 for n in now.keys() & was.keys() if now[n] != was[n])
            if added or removed or changed:
                counts[type_url.rsplit(".", 1)[-1]] = {"added": added, "removed": removed, "changed": changed}
        if counts:
            out[group] = counts
    return out


def text_lines(diff: PolicyDiff, resources: Mapping[str, Mapping[str, Mapping[str, int]]]) -> list[str]:
    """Per backend `+`/`-` lines in words; nothing at all when nothing changed."""
    lines = []
    for backend in diff.backends:
        lines.extend(_backend_lines(backend))
    lines.extend(f"gateway {name}: added" for name in diff.gateways_added)
    lines.extend(f"gateway {name}: removed" for name in diff.gateways_removed)
    for front in diff.fronts:
        verb = "now fronts" if front.added else "no longer fronts"
        lines.append(f"gateway {front.gateway}: {verb} backend {front.backend}")
    if resources:
        lines.append("envoy resources:")
        for group, counts in resources.items():
            words = ", ".join(
                f"{kind} +{c['added']} -{c['removed']} ~{c['changed']}" for kind, c in sorted(counts.items())
            )
            lines.append(f"  gateway {group}: {words}")
    return lines


def _backend_lines(backend: BackendDiff) -> list[str]:
    head = f"backend {backend.name}" + ("" if backend.status == "changed" else f" ({backend.status})")
    lines = [head]
    lines.extend(_change_line("+", "gains", c) for c in backend.gains)
    lines.extend(_change_line("-", "loses", c) for c in backend.losses)
    for mode in backend.modes:
        effect = "would start enforcing" if mode.new == "enforce" else "would stop enforcing (logged only)"
        lines.append(f"  ! {mode.grant}: {mode.old} -> {mode.new}: {effect}")
    lines.extend(f"  ~ {name}: new shadow grant (logged only, allows nothing)" for name in backend.shadow_added)
    lines.extend(f"  ~ {name}: shadow grant removed (it allowed nothing)" for name in backend.shadow_removed)
    lines.extend(f"  * {cloud_text(c)}" for c in backend.cloud)
    return lines


def _change_line(sign: str, verb: str, change: Change) -> str:
    return f"  {sign} {change.subject} {verb} {', '.join(change.methods)} {change.path} (via {', '.join(change.via)})"
