"""The policy pipeline at run time: read → validate → compile → publish, keeping the last good snapshot.

A bad change never reaches Envoy: every error is logged with file:line and counted, the previous
snapshots stay in service, and status shows what is wrong until a good change arrives.

What Envoy gets depends on more than the policy files: GitLab's live inventory (projects, refs,
protections), the relayed issuer keys, and the ids project paths resolved to before. When only those change,
the policy in service is recompiled without reading the files again, so a half-edited policy on disk never
holds back a withdrawal or a key rotation. When the live inputs themselves make the policy in service invalid (a
path GitLab now gives another project), the last good *policy* stays, not the last good snapshots: the model and
resolution of the last good compile are compiled again with the fresh keys, deny list and secrets, so a withdrawn
key or a revoked job is never held back by an error nobody has fixed yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from controlplane.compiler.aws import SigningCredential
from controlplane.compiler.compile import check_reserved_names
from controlplane.compiler.memo import CompilerMemo
from controlplane.credentials.exchange import ExchangeMemo, ExchangePolicy
from controlplane.model.credentials import CredentialInputs
from controlplane.model.errors import QUOTE_LIMIT, PolicyError, PolicyInvalid
from controlplane.model.inventory import Inventory
from controlplane.model.loader import PolicyLoader, policy_warnings
from controlplane.model.policy import Backend, Endpoint, Policy
from controlplane.model.reuse import reuse_unchanged
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.index import Resolution
from controlplane.runtime.gc_control import no_cyclic_gc
from controlplane.runtime.readiness import DEFAULT_RELOAD_TIMEOUT
from controlplane.snapshots.build import Pins, compile_model, with_revocations
from controlplane.snapshots.snapshot import Snapshot
from controlplane.sources.policy_source import DirectorySource, PolicyFiles, PolicySource
from controlplane.telemetry import metrics

if TYPE_CHECKING:
    from controlplane.snapshots.cache import SnapshotCache
    from controlplane.sources.pins import RememberedPins

log = logging.getLogger("controlplane.policy")

LOGGED_ERRORS = 20
"""Error lines logged per rejected load, then one line counting the rest: 2 million errors were 225 MB of log."""


@dataclass
class _Batch:
    """One recompile and the callers sharing it (see `PolicyService.recompile`)."""

    task: asyncio.Future[bool]
    reasons: dict[str, None] = field(default_factory=dict)  # ordered, without repeats: for the log line
    started: bool = False


@dataclass
class PolicyState:
    root: str
    last_good_load: float | None = None
    last_attempt: float | None = None
    errors: list[str] = field(default_factory=list)  # of the policy as last read
    live_errors: list[str] = field(default_factory=list)  # of the policy in service against GitLab as it is now
    error_count: int = 0  # errors found, shown or not (`errors` keeps the loader's bounded list)
    live_error_count: int = 0
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    revision: str | None = None


class PolicyService:
    """Owns policy source + live inputs → snapshot cache. Only `reload` and `recompile` change snapshots."""

    def __init__(
        self,
        source: PolicySource | Path,
        cache: SnapshotCache,
        *,
        inventories: Callable[[], Mapping[str, Inventory]] = dict,
        pin_store: RememberedPins | None = None,
        clock: Callable[[], float] = time.time,
        reload_timeout: float = DEFAULT_RELOAD_TIMEOUT,
        credentials: Callable[[], CredentialInputs | None] = lambda: None,
        exchange_policy_changed: Callable[[], None] = lambda: None,
        secrets: Callable[[Policy], Mapping[str, str]] = lambda policy: {},
        aws_credentials: Callable[[Policy], Mapping[str, SigningCredential]] = lambda policy: {},
        accept: Callable[[Policy], str | None] = lambda policy: None,
        prepare: Callable[[Policy], str | None] = lambda policy: None,
        endpoints: Callable[[Backend], tuple[Endpoint, ...]] = lambda backend: (),
        published: Callable[[Policy | None], None] = lambda policy: None,
    ) -> None:
        """The callables are what the policy alone does not say; each defaults to "nothing", as `validate` and
        the tests want. `credentials`: the control plane's own (signing keys, revoked jobs, exchange route).
        `secrets`: the injected upstream credentials of the policy being compiled, by backend; given the policy
        so a newly declared injection has its value in the very compile that introduces it. `accept`: a last
        word on a valid policy before it is compiled (serve refuses secrets over plain-text xDS); an answer is
        why not. `prepare`: reads from GitLab what a valid policy names beyond the watched set, before it is
        compiled (in the worker thread); an answer is why it cannot be judged. `endpoints`: the ready endpoints
        discovered for a backend naming Kubernetes Services (called in the worker thread; the same tuple while they
        did not change). `published`: told the policy in service after each load, accepted or not (None before the
        first good one): the Kubernetes watch set follows it, and `prepare` may have started watches for a
        candidate that was then refused."""
        self.source: PolicySource = DirectorySource(source) if isinstance(source, Path) else source
        self.cache = cache
        self.state = PolicyState(root=self.source.description)
        self._inventories = inventories
        self._pin_store = pin_store
        self._pins: Pins = pin_store.load() if pin_store else {}
        self._memo = CompilerMemo()
        self._resolution = Resolution()  # who may do what, kept between compiles: read by compiler and exchange
        self._exchange_memo: ExchangeMemo = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._loader = PolicyLoader()  # keeps what unchanged files gave, so a commit rebuilds only its own files
        self._parsed: tuple[Mapping[str, str], Policy] | None = None  # last parse, reused when files are equal
        self._policy: Policy | None = None  # the policy in service (last good), before live inputs
        self._world: tuple[Policy, tuple[object, ...], Policy] | None = None  # (policy, inventories) → model
        # The model (policy + inventories) and resolution of the last compile that succeeded: what stays enforced
        # while live inputs make the policy in service invalid (`_publish_last_good`).
        self._last_good: tuple[Policy, ResolvedPolicy] | None = None
        self._keys: Mapping[str, str] = {}  # relayed issuers' JWKS, by issuer name
        self.credentials: Final = credentials
        self.exchange_policy_changed: Final = exchange_policy_changed
        self.secrets: Final = secrets
        self.aws_credentials: Final = aws_credentials  # usable AWS role credentials by ARN (runtime/aws_signing.py)
        self.accept: Final = accept
        self.prepare: Final = prepare
        self.endpoints: Final = endpoints
        self.published: Final = published
        # Per Service-backed backend: (backend as read, endpoints, backend with them), so an unchanged one stays
        # the same object and the compiler's memo keeps it.
        self._discovered: dict[str, tuple[Backend, tuple[Endpoint, ...], Backend]] = {}
        # What the token exchange evaluates: built from the same grants as the snapshot in service.
        self.exchange_policy: ExchangePolicy | None = None
        self._pending_exchange: ExchangePolicy | None = None
        self._clock = clock
        self._lock = asyncio.Lock()
        self._batch: _Batch | None = None  # the recompile callers join until it starts
        # A reload that never ends (a read that blocks) holds the lock: every later reload and recompile, job
        # revocations included, waits behind it. It cannot be interrupted, so it is made visible instead.
        self.reload_timeout = reload_timeout
        self._running_since: float | None = None
        # Read at scrape time, so they move while the reload thread is stuck (a process has one service).
        metrics.POLICY_RELOAD_RUNNING.set_function(self.reload_running_seconds)
        metrics.POLICY_RELOAD_STUCK.set_function(lambda: 1.0 if self.reload_stuck else 0.0)

    # -- the two ways snapshots change

    def reload(self) -> bool:
        """Read the policy again. True when it was accepted (even if it compiled to the same snapshots)."""
        with self._running():
            outcome = self._build()
        return self._apply(outcome)

    async def reload_off_loop(self) -> bool:
        """The same, reading and compiling in a worker thread so xDS streams keep being served.

        Snapshots are still published from the event loop, where the xDS server's listeners run; the lock
        keeps compiles (which share the memo) one at a time.
        """
        async with self._lock:
            with self._running():
                outcome = await asyncio.to_thread(self._build)
            return self._apply(outcome)

    async def recompile(self, reason: str, *, gather: float = 0.0) -> bool:
        """Recompile the policy in service because a live input changed (inventory, keys). No file is read.

        False when no policy is in service yet (the first good load will use the inputs), or when the live
        inputs make it invalid (a path now owned by another project): the last good snapshot then stays.

        Callers share one compile while it has not started: it reads the inputs once it holds the lock, so it
        holds every change made before it started, and a burst of changes (a busy GitLab finishing jobs) is a
        handful of compiles and pushes, not one each. `gather`: how long a new compile waits for others to
        join before it takes its turn. A caller's cancellation never cancels the shared compile.
        """
        batch = self._batch
        if batch is None or batch.started:
            batch = self._batch = _Batch(asyncio.ensure_future(self._batched(gather)))
        else:
            metrics.RECOMPILES_JOINED.inc()
        batch.reasons.setdefault(reason)
        return await asyncio.shield(batch.task)

    async def _batched(self, gather: float) -> bool:
        if gather > 0:
            await asyncio.sleep(gather)  # a deliberate delay: let a burst join, not synchronisation
        async with self._lock:
            batch = self._batch
            assert batch is not None
            batch.started = True  # changes made from now on may be missed: later callers start a new batch
            return await self._recompile_locked("; ".join(batch.reasons))

    async def _recompile_locked(self, reason: str) -> bool:
        policy = self._policy
        if policy is None:
            return False
        started = time.perf_counter()
        try:
            with self._running():
                snapshots = await asyncio.to_thread(self._compile, policy)
        except PolicyInvalid as invalid:
            self._reject(invalid, live=True)
            await self._publish_last_good()
            return False
        except Exception as error:
            self._reject(PolicyInvalid([self._internal_error("compiling", error)]), live=True)
            await self._publish_last_good()
            return False
        metrics.COMPILE_DURATION.observe(time.perf_counter() - started)
        self._publish_snapshots(snapshots)  # errors of a newer, broken policy on disk stay reported
        self.state.live_errors, self.state.live_error_count = [], 0
        metrics.POLICY_CURRENT_ERRORS.set(self.state.error_count)
        log.info("%s: %s", reason, _versions(self.state.versions))
        return True

    async def _publish_last_good(self) -> None:
        """The policy in service cannot be compiled with the live inputs as they are now (GitLab's inventory or
        the remembered pins make it invalid, or the compiler failed): its errors stay reported, and what stays
        enforced is the last good model (policy and inventories) with its resolution, but with the fresh keys,
        deny list and secrets. A withdrawn issuer key, a rotated signing key or a revoked job must reach Envoy now:
        a revocation's caller (the Job Hook) is answered after this, and nothing else would push any of them until
        the policy compiles again. No route, RBAC rule or exchange decision moves (the resolution is the last
        good one)."""
        try:
            snapshots = await asyncio.to_thread(self._compile_last_good)
        except Exception:
            log.exception("the live inputs could not be compiled with the last good policy; publishing the deny list")
            await self._publish_revocations()
            return
        if snapshots is None:
            return
        self._set_snapshots(snapshots)
        log.warning("live inputs published with the last good policy: %s", _versions(self.state.versions))

    def _compile_last_good(self) -> dict[str, Snapshot] | None:
        """The last good model and resolution with today's keys, credentials and secrets; None before any."""
        last = self._last_good
        if last is None:
            return None
        model, resolved = last
        model = self._rediscovered(model)
        with no_cyclic_gc():
            return compile_model(
                model,
                self._memo,
                self._snapshots,
                self._keys,
                credentials=self.credentials(),
                secrets=self.secrets(model),
                aws_credentials=self.aws_credentials(model),
                resolved=resolved,
            )

    async def _publish_revocations(self) -> None:
        """The last resort, when even the last good model cannot be compiled with the fresh inputs (a compiler
        bug, or an input the compiler chokes on): the last good snapshots with the current deny list, since a
        revoked job must not keep its access until the compiler is fixed. Only the buckets change."""
        credentials = self.credentials()
        if not self._snapshots or credentials is None:
            return
        try:
            snapshots = await asyncio.to_thread(with_revocations, self._snapshots, credentials, self._memo)
        except Exception:
            log.exception("the deny list could not be published with the last good snapshot")
            return
        self._set_snapshots(snapshots)
        log.warning("deny list published with the last good snapshot: %s", _versions(self.state.versions))

    async def set_keys(self, keys: Mapping[str, str]) -> bool:
        """New relayed issuer keys: recompile the policy in service with them."""
        self._keys = dict(keys)
        return await self.recompile("issuer keys changed")

    @property
    def pins(self) -> Pins:
        """Project path → id resolutions remembered so far, by issuer."""
        return self._pins

    @property
    def in_service(self) -> tuple[Policy, ResolvedPolicy] | None:
        """The model (live inputs applied) and resolution last compiled with success: what `explain` reads."""
        return self._last_good

    @property
    def current(self) -> Policy | None:
        """The policy in service (the last good one), None before the first good load."""
        return self._policy

    # -- building

    def _build(self) -> dict[str, Snapshot] | PolicyInvalid:
        """Never raises: whatever goes wrong becomes a reported error, and the last good snapshot stays."""
        try:
            return self._build_or_raise()
        except Exception as error:
            return PolicyInvalid([self._internal_error("loading", error)])

    def _internal_error(self, doing: str, error: Exception) -> PolicyError:
        """A bug, not a policy mistake: one short error line (the traceback only at debug level)."""
        log.debug("unexpected error while %s the policy", doing, exc_info=error)
        text = str(error)
        if len(text) > QUOTE_LIMIT:
            text = text[: QUOTE_LIMIT - 1] + "…"
        what = f"{type(error).__name__}: {text}" if text else type(error).__name__
        return PolicyError(self.source.description, 0, "", f"internal error while {doing} the policy: {what}")

    def _build_or_raise(self) -> dict[str, Snapshot] | PolicyInvalid:
        self.state.last_attempt = self._clock()
        metrics.SNAPSHOT_BUILDS.inc()
        started = time.perf_counter()
        try:
            read = self.source.read()
        except PolicyInvalid as invalid:  # a file that is not text, in a GitLab tree
            return invalid
        except Exception as error:  # a directory gone, GitLab unreachable: keep the last good policy
            return PolicyInvalid([PolicyError(self.source.description, 0, "", f"cannot read policy: {error}")])
        try:
            policy = self._parse(read.files)
            refusal = self.accept(policy) or self.prepare(policy)
            if refusal is not None:
                raise PolicyInvalid([PolicyError(read.origin, 0, "", refusal)])
            snapshots = self._compile(policy)
        except PolicyInvalid as invalid:
            self._report(read, False, _first_errors(invalid))
            return invalid
        metrics.COMPILE_DURATION.observe(time.perf_counter() - started)
        self._policy = policy  # a successful build is always published (`_apply`)
        self.state.revision = read.revision
        self._report(read, True, "accepted: " + _versions(_summary_versions(snapshots)))
        return snapshots

    def _parse(self, files: Mapping[str, str]) -> Policy:
        if self._parsed is not None and self._parsed[0] == files:
            return self._parsed[1]  # same objects: the compiler's memo then reuses everything
        previous = self._parsed[1] if self._parsed is not None else None
        policy = reuse_unchanged(self._loader.load(files), previous)
        self._parsed = (dict(files), policy)
        return policy

    def _compile(self, policy: Policy) -> dict[str, Snapshot]:
        if self._pin_store is not None:  # pins another replica wrote (a shared store) are compiled in too
            remembered = self._pin_store.current
            if remembered != self._pins:
                self._pins = remembered
        model = self._with_live_inputs(policy)
        credentials = self.credentials()
        check_reserved_names(model, credentials)  # before resolving: its errors come first, as they always have
        with no_cyclic_gc():
            resolved = self._resolution.update(model, self._pins)
            snapshots = compile_model(
                model,
                self._memo,
                self._snapshots,
                self._keys,
                credentials=credentials,
                secrets=self.secrets(model),
                aws_credentials=self.aws_credentials(model),
                resolved=resolved,
            )
            self._note_resolution(policy_warnings(policy), resolved)
            # Built here, under the compile lock, from the very resolution Envoy's RBAC was compiled from;
            # published with the snapshots, so the exchange never grants what Envoy is not told (or the reverse).
            self._pending_exchange = ExchangePolicy.build(model, resolved, self._exchange_memo)
        self._last_good = (model, resolved)  # a compile that succeeded is always published (reload and recompile)
        return snapshots

    def _with_live_inputs(self, policy: Policy) -> Policy:
        """The policy with each watched GitLab issuer's inventory as GitLab reports it now, and each backend naming
        Kubernetes Services with the ready endpoints discovered for it.

        The result is cached on the identity of its inputs, so an unchanged world keeps the very same
        objects and the compiler's memo stays warm.
        """
        inventories = self._inventories()
        watched = tuple(inventories.get(i.name) or _NEVER_READ for i in policy.issuers if i.api is not None)
        discovered = tuple(self._discover(b) for b in policy.backends if b.services)
        if self._world is not None and self._world[0] is policy and _same(self._world[1], (*watched, *discovered)):
            return self._world[2]
        live = iter(watched)
        issuers = tuple(replace(i, inventory=next(live)) if i.api is not None else i for i in policy.issuers)
        model = replace(policy, issuers=issuers) if watched else policy
        if discovered:
            by_name = {b.name: b for b in discovered}
            model = replace(model, backends=tuple(by_name.get(b.name, b) for b in policy.backends))
        if len(self._discovered) > len(discovered):  # backends renamed or removed: forget them
            self._discovered = {b.name: self._discovered[b.name] for b in discovered}
        self._world = (policy, (*watched, *discovered), model)
        return model

    def _rediscovered(self, model: Policy) -> Policy:
        """The last good model with the Service backends' endpoints as discovered now: a pod going away must leave
        Envoy's assignment even while GitLab makes the policy in service invalid."""
        if not any(b.services for b in model.backends):
            return model
        backends = tuple(
            replace(b, endpoints=found) if b.services and (found := self.endpoints(b)) != b.endpoints else b
            for b in model.backends
        )
        return replace(model, backends=backends)

    def _discover(self, backend: Backend) -> Backend:
        endpoints = self.endpoints(backend)
        hit = self._discovered.get(backend.name)
        if hit is not None and hit[0] is backend and (hit[1] is endpoints or hit[1] == endpoints):
            return hit[2]
        live = replace(backend, endpoints=endpoints)
        self._discovered[backend.name] = (backend, endpoints, live)
        return live

    def _note_resolution(self, policy_warnings: list[PolicyError], resolved: ResolvedPolicy) -> None:
        """`policy_warnings`: those of the policy itself (see model.loader.policy_warnings); the resolution adds
        GitLab's (access withdrawn, stale paths)."""
        warnings = [str(w) for w in sorted([*policy_warnings, *resolved.warnings])]
        for new in sorted(set(warnings) - set(self.state.warnings)):
            log.warning("%s", new)
        self.state.warnings = warnings
        metrics.POLICY_WARNINGS.set(len(warnings))
        pins = resolved.pins
        if self._pin_store is not None and pins:
            self._pin_store.save(pins)
            remembered = self._pin_store.current
            if remembered != self._pins:  # a new pins object makes the next compile re-resolve every binding
                self._pins = remembered

    def _report(self, files: PolicyFiles, accepted: bool, summary: str) -> None:
        try:
            self.source.report(files, accepted, summary)
        except Exception as error:  # a verdict that cannot be posted must not stop the policy
            log.warning("could not report the policy verdict to %s: %s", self.source.description, error)

    # -- publishing

    def _apply(self, outcome: dict[str, Snapshot] | PolicyInvalid) -> bool:
        if isinstance(outcome, PolicyInvalid):
            self._reject(outcome)
            return False
        self._publish(outcome)
        return True

    def _publish(self, snapshots: dict[str, Snapshot]) -> None:
        self._publish_snapshots(snapshots)
        self.state.last_good_load = self._clock()
        self.state.errors, self.state.error_count = [], 0
        self.state.live_errors, self.state.live_error_count = [], 0
        metrics.POLICY_CURRENT_ERRORS.set(0)
        metrics.POLICY_LAST_GOOD_LOAD.set(self.state.last_good_load)
        if self._policy is not None:
            self._follow(self._policy)
        log.info("policy loaded from %s: %s", self.source.description, _versions(self.state.versions))

    def _follow(self, policy: Policy | None) -> None:
        try:
            self.published(policy)
        except Exception:  # the snapshot is published; a watch set not updated is logged, not fatal
            log.exception("following the policy in service failed")

    def _publish_snapshots(self, snapshots: dict[str, Snapshot]) -> None:
        changed = self.exchange_policy is not self._pending_exchange
        self.exchange_policy = self._pending_exchange
        self._set_snapshots(snapshots)
        if changed:
            try:
                self.exchange_policy_changed()
            except Exception:  # the snapshot is published; coverage of earlier jobs is best effort
                log.exception("re-judging finished jobs against the new policy failed")

    def _set_snapshots(self, snapshots: dict[str, Snapshot]) -> None:
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

    def _reject(self, invalid: PolicyInvalid, *, live: bool = False) -> None:
        """Runs on the event loop: everything here is bounded by the loader's error bound, and the log by
        `LOGGED_ERRORS` (`/status` and `validate` show the rest)."""
        metrics.SNAPSHOT_BUILD_FAILURES.inc()
        metrics.POLICY_LOAD_ERRORS.inc(invalid.total)
        if live:
            self.state.live_errors, self.state.live_error_count = invalid.lines(), invalid.total
        else:
            self.state.errors, self.state.error_count = invalid.lines(), invalid.total
            self._follow(self._policy)  # watches a refused candidate started are stopped
        metrics.POLICY_CURRENT_ERRORS.set(self.state.error_count + self.state.live_error_count)
        kept = "keeping the last good snapshot" if self.state.last_good_load else "no snapshot served yet"
        log.error("policy rejected with %s error(s); %s", _count(invalid), kept)
        for line in invalid.lines(LOGGED_ERRORS):
            log.error("  %s", line)

    # -- the reload watchdog

    @contextmanager
    def _running(self) -> Iterator[None]:
        self._running_since = time.monotonic()
        try:
            yield
        finally:
            self._running_since = None

    def reload_running_seconds(self) -> float:
        """How long the reload (or recompile) in progress has been running; 0.0 when none is."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def reload_stuck(self) -> bool:
        return self.reload_running_seconds() > self.reload_timeout

    def _stuck_message(self) -> str | None:
        running = self.reload_running_seconds()
        if running <= self.reload_timeout:
            return None
        return (
            f"policy reload running for {running:.0f}s, over the {self.reload_timeout:g}s limit: policy changes and "
            "job revocations are not applied until it ends"
        )

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if self.state.last_good_load is None:
            return "startup not complete (no good policy load yet)"
        return self._stuck_message()

    def status(self) -> dict[str, object]:
        running = self.reload_running_seconds()
        stuck = self._stuck_message()
        return {
            "root": self.state.root,
            "revision": self.state.revision,
            "last_good_load": self.state.last_good_load,
            "last_attempt": self.state.last_attempt,
            "errors": [*self.state.errors, *self.state.live_errors, *([stuck] if stuck else [])],
            "warnings": list(self.state.warnings),
            "snapshot_versions": dict(self.state.versions),
            "reload": {
                "running_seconds": round(running, 3) if running else None,
                "timeout_seconds": self.reload_timeout,
                "stuck": stuck is not None,
            },
        }


_NEVER_READ = Inventory(stale=True)


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _summary_versions(snapshots: Mapping[str, Snapshot]) -> dict[str, str]:
    return {group: snapshot.summary_version for group, snapshot in snapshots.items()}


def _count(invalid: PolicyInvalid) -> str:
    return f"at least {invalid.total}" if invalid.stopped else str(invalid.total)


def _first_errors(invalid: PolicyInvalid, limit: int = 3) -> str:
    shown = "; ".join(str(e) for e in invalid.errors[:limit])
    left = invalid.total - min(limit, len(invalid.errors))
    more = f" (+{'at least ' if invalid.stopped else ''}{left} more)" if left or invalid.stopped else ""
    return f"{_count(invalid)} error(s): {shown}{more}"


def _versions(versions: Mapping[str, str]) -> str:
    return ", ".join(f"{g}@{v}" for g, v in sorted(versions.items())) or "no gateways"
