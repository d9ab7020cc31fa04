"""The policy pipeline at run time: read → validate → compile → publish, keeping the last good snapshot.

A bad change never reaches Envoy: every error is logged with file:line and counted, the previous
snapshots stay in service, and status shows what is wrong until a good change arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.admin import metrics
from controlplane.compiler.compile import compile_policy
from controlplane.compiler.memo import CompilerMemo
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.load import parse_policy
from controlplane.model.policy import Policy
from controlplane.snapshots.snapshot import Snapshot, build_snapshots
from controlplane.sources.policy_dir import read_policy_dir

if TYPE_CHECKING:
    from controlplane.snapshots.cache import SnapshotCache

log = logging.getLogger("controlplane.policy")


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
) -> dict[str, Snapshot]:
    """A validated policy into snapshots; entries whose bytes did not change are taken from `previous`."""
    compiled = compile_policy(policy, memo, keys)
    return build_snapshots({name: group.resources for name, group in compiled.items()}, previous)


def compile_dir(root: Path, memo: CompilerMemo | None = None) -> tuple[Policy, dict[str, Snapshot]]:
    return compile_files(read_policy_dir(root), memo)


@dataclass
class PolicyState:
    root: str
    last_good_load: float | None = None
    last_attempt: float | None = None
    errors: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)


class PolicyService:
    """Owns the policy directory → snapshot cache path. `reload()` is the only way snapshots change."""

    def __init__(self, root: Path, cache: SnapshotCache, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.cache = cache
        self.state = PolicyState(root=str(root))
        self._memo = CompilerMemo()
        self._snapshots: dict[str, Snapshot] = {}
        self._policy: Policy | None = None  # the policy in service (last good)
        self._keys: Mapping[str, str] = {}  # relayed issuers' JWKS, by issuer name
        self._clock = clock
        self._lock = asyncio.Lock()

    def reload(self) -> bool:
        """True when a new policy was accepted (even if it compiled to the same snapshots)."""
        return self._apply(self._build())

    async def reload_off_loop(self) -> bool:
        """The same, compiling in a worker thread so xDS streams keep being served during a big compile.

        Snapshots are still published from the event loop, where the xDS server's listeners run; the lock
        keeps compiles (which share the memo) one at a time.
        """
        async with self._lock:
            return self._apply(await asyncio.to_thread(self._build))

    @property
    def current(self) -> Policy | None:
        """The policy in service (the last good one), None before the first good load."""
        return self._policy

    async def set_keys(self, keys: Mapping[str, str]) -> bool:
        """Recompile the policy in service with new relayed keys, off the loop like `reload_off_loop`.

        The policy files are not read again: a half-edited or broken policy on disk must never hold back a
        key rotation, and a key change must not clear (or mask) the policy's own errors and load time.
        False when no policy is in service yet; the first good load uses the keys.
        """
        async with self._lock:
            self._keys = dict(keys)
            policy = self._policy
            if policy is None:
                return False
            started = time.perf_counter()
            snapshots = await asyncio.to_thread(compile_model, policy, self._memo, self._snapshots, self._keys)
            metrics.COMPILE_DURATION.observe(time.perf_counter() - started)
            self._publish_snapshots(snapshots)
            log.info("issuer keys changed: %s", _versions(self.state.versions))
            return True

    def _build(self) -> dict[str, Snapshot] | list[PolicyError]:
        self.state.last_attempt = self._clock()
        metrics.SNAPSHOT_BUILDS.inc()
        started = time.perf_counter()
        try:
            files = read_policy_dir(self.root)
            policy, snapshots = compile_files(files, self._memo, self._snapshots, self._keys)
        except PolicyInvalid as invalid:
            return invalid.errors
        except OSError as error:
            return [PolicyError(str(self.root), 0, "", f"cannot read policy: {error}")]
        metrics.COMPILE_DURATION.observe(time.perf_counter() - started)
        self._policy = policy  # a successful build is always published (`_apply`)
        return snapshots

    def _apply(self, outcome: dict[str, Snapshot] | list[PolicyError]) -> bool:
        if isinstance(outcome, list):
            self._reject(outcome)
            return False
        self._publish(outcome)
        return True

    def _publish(self, snapshots: dict[str, Snapshot]) -> None:
        self._publish_snapshots(snapshots)
        self.state.last_good_load = self._clock()
        self.state.errors = []
        metrics.POLICY_CURRENT_ERRORS.set(0)
        metrics.POLICY_LAST_GOOD_LOAD.set(self.state.last_good_load)
        log.info("policy loaded from %s: %s", self.root, _versions(self.state.versions))

    def _publish_snapshots(self, snapshots: dict[str, Snapshot]) -> None:
        self._snapshots = snapshots
        for group in sorted(set(self.state.versions) - set(snapshots)):
            # A gateway removed from the policy: its Envoys now get nothing (never another group's config).
            self.cache.set(Snapshot.empty(group))
            metrics.SNAPSHOT_INFO.remove(group, self.state.versions.pop(group))
        for group, snapshot in sorted(snapshots.items()):
            self.cache.set(snapshot)
            previous = self.state.versions.get(group)
            if previous is not None and previous != snapshot.summary_version:
                metrics.SNAPSHOT_INFO.remove(group, previous)
            metrics.SNAPSHOT_INFO.labels(group, snapshot.summary_version).set(1)
            self.state.versions[group] = snapshot.summary_version

    def _reject(self, errors: list[PolicyError]) -> None:
        metrics.SNAPSHOT_BUILD_FAILURES.inc()
        metrics.POLICY_LOAD_ERRORS.inc(len(errors))
        metrics.POLICY_CURRENT_ERRORS.set(len(errors))
        self.state.errors = [str(e) for e in errors]
        kept = "keeping the last good snapshot" if self.state.last_good_load else "no snapshot served yet"
        log.error("policy rejected with %d error(s); %s", len(errors), kept)
        for error in errors:
            log.error("  %s", error)

    @property
    def ready(self) -> bool:
        return self.state.last_good_load is not None

    def status(self) -> dict[str, object]:
        return {
            "root": self.state.root,
            "last_good_load": self.state.last_good_load,
            "last_attempt": self.state.last_attempt,
            "errors": list(self.state.errors),
            "snapshot_versions": dict(self.state.versions),
        }


def _versions(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{g}@{v}" for g, v in sorted(versions.items())) or "no gateways"
