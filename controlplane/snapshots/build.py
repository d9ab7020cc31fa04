"""A policy into snapshots in one call: what `validate`, `compile`, the golden tests and the run time's reload
share. Parsing, resolving and compiling stay in their own layers; this only chains them, so a one-shot caller
need not reach into the run time (which adds live inputs, a memo and a readiness clock around the same chain).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from controlplane.compiler.aws import SigningCredential
from controlplane.compiler.compile import compile_policy, revocation_resources
from controlplane.compiler.memo import CompilerMemo
from controlplane.model.credentials import CredentialInputs
from controlplane.model.loader import parse_policy
from controlplane.model.policy import Policy
from controlplane.resolved.access import ResolvedPolicy
from controlplane.snapshots.snapshot import EXTENSION_CONFIG, Snapshot, build_snapshots
from controlplane.sources.policy_dir import DEFAULT_LIMITS, ReadLimits, read_policy_dir

Pins = Mapping[str, Mapping[str, int]]


def compile_files(
    files: Mapping[str, str],
    memo: CompilerMemo | None = None,
    previous: Mapping[str, Snapshot] | None = None,
    keys: Mapping[str, str] | None = None,
) -> tuple[Policy, dict[str, Snapshot]]:
    """Parse, validate and compile a policy tree. Raises PolicyInvalid with every error found.

    `keys`: relayed issuers' JWKS by issuer name (see compile_policy)."""
    policy = parse_policy(files)
    return policy, compile_model(policy, memo, previous, keys)


def compile_model(
    policy: Policy,
    memo: CompilerMemo | None = None,
    previous: Mapping[str, Snapshot] | None = None,
    keys: Mapping[str, str] | None = None,
    pins: Pins | None = None,
    *,
    credentials: CredentialInputs | None = None,
    secrets: Mapping[str, str] | None = None,
    resolved: ResolvedPolicy | None = None,
    aws_credentials: Mapping[str, SigningCredential] | None = None,
) -> dict[str, Snapshot]:
    """A validated policy into snapshots; entries whose bytes did not change are taken from `previous`.

    `credentials`: the control plane's own credential inputs; `secrets`: injected upstream credentials by
    backend; `resolved`: the policy's resolution, None: resolved here with `pins` (see compile_policy);
    `aws_credentials`: usable AWS role credentials by role ARN (compiler/aws.py)."""
    compiled = compile_policy(
        policy, memo, keys, pins, credentials, secrets, resolved=resolved, aws_credentials=aws_credentials
    )
    return build_snapshots({name: group.resources for name, group in compiled.items()}, previous)


def with_revocations(
    snapshots: Mapping[str, Snapshot], credentials: CredentialInputs, memo: CompilerMemo
) -> dict[str, Snapshot]:
    """`snapshots` with the deny list's buckets of `credentials`: the run time's last resort when neither the
    policy in service nor its last good model can be compiled (a compiler failure; an invalid policy is handled
    by compiling the last good model with the fresh inputs). A finished job must not keep its access until the
    compiler is fixed."""
    buckets = revocation_resources(credentials, memo)
    return {group: snapshot.replacing(EXTENSION_CONFIG, buckets) for group, snapshot in snapshots.items()}


def compile_dir(
    root: Path, memo: CompilerMemo | None = None, limits: ReadLimits = DEFAULT_LIMITS
) -> tuple[Policy, dict[str, Snapshot]]:
    """A policy directory into snapshots, as `controlplane compile` and the golden tests read one."""
    return compile_files(read_policy_dir(root, limits), memo)
