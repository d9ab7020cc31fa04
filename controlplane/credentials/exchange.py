"""RFC 8693 token exchange: a GitLab ID token in, a short-lived credential for one backend out.

No I/O here but through the store interfaces (`exchange_store.py`): what must outlive the process (uses per
subject token, finished jobs, each job's credential expiry) is the store's, not a dict's.

Why exchange at all: an ID token lives as long as the job timeout and stays valid after the job ends. The
credential issued here is scoped to one backend and to named roles, lives minutes, names the job it belongs to
(so a finished job's credentials can be revoked fleet-wide by job_id), and is signed by keys the control plane
rotates itself.

Authorization is `Evaluator.grants_for` over the very grants the compiler turns into Envoy RBAC, so the
exchange grants a role exactly when Envoy would let the same ID token through under that role.

Errors follow RFC 6749 §5.2 (JSON `error`, `error_description`, status 400). A description never echoes a
request value unless it is a plain policy name (`^[a-z0-9-]+$`), which no token can be.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jwt

from controlplane.credentials import metrics
from controlplane.credentials.exchange_store import (
    ExchangeStoreError,
    JobLedger,
    MemoryExchangeStore,
    ReplayCounter,
)
from controlplane.credentials.keys import ALGORITHM, SigningKeys
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.model.policy import Backend, Binding, Policy
from controlplane.resolved.access import Grant, ResolvedPolicy
from controlplane.resolved.aws_roles import RoleChoice, backend_role_choices, chosen_role
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.evaluate import Evaluator

log = logging.getLogger("controlplane.credentials")

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN})
REQUESTED_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ACCESS_TOKEN})
SUBJECT_ALGORITHMS = frozenset({"RS256", "ES256"})
# What identifies the job in the credential: Envoy logs and forwards them, revocation keys on job_id.
COPIED_CLAIMS = (
    "job_id",
    "pipeline_id",
    "project_id",
    "project_path",
    "namespace_id",
    "ref",
    "ref_type",
    "ref_protected",
    "environment",
    "user_login",
)
# `\Z`, not `$`: `$` also matches before a final newline ("5\n" would pass).
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_LIFETIME = re.compile(r"^[0-9]{1,9}\Z")
_LIFETIME_PARAMETERS = ("requested_token_lifetime", "expires_in")
# How long a finished job is remembered, and so the oldest subject token (by `iat`) the exchange accepts: a
# token of a job that finished longer ago than this was minted longer ago still, and is refused for its age.
DEFAULT_MAX_SUBJECT_AGE = 7 * 86_400.0


# -- what the service knows, rebuilt on every policy change


@dataclass(frozen=True)
class ExchangeIssuer:
    name: str
    url: str  # the subject tokens' exact `iss`
    audiences: frozenset[str]  # `aud` a subject token may carry: the audiences of the backends it may reach
    clock_skew: float


@dataclass(frozen=True)
class ExchangeGrant:
    """One resolved grant with what the exchange needs beside it: its binding's credential TTL."""

    ttl: int
    grant: Grant


@dataclass(frozen=True)
class ExchangeBackend:
    name: str
    audience: str
    roles: tuple[str, ...]  # every role defined on this backend
    grants: tuple[ExchangeGrant, ...]
    # Accepts raw ID tokens and keeps every finished job that could reach it denied (Backend.covers_unseen_jobs).
    covers_unseen_jobs: bool = False
    # An AWS backend's bindings with a role of their own (resolved/aws_roles.py): a job one of them chooses is
    # refused a credential, which would be signed with the backend's role (see `_no_binding_role`).
    aws_roles: tuple[RoleChoice, ...] = ()

    @cached_property
    def resolved(self) -> tuple[Grant, ...]:
        return tuple(g.grant for g in self.grants)

    @cached_property
    def ttl_by_name(self) -> Mapping[str, int]:
        return {g.grant.name: g.ttl for g in self.grants}


ExchangeMemo = dict[str, tuple[Backend, tuple[Grant, ...], tuple[str, ...], "ExchangeBackend"]]
"""Per backend name: the inputs its entry was built from, and the entry (see `ExchangePolicy.build`)."""


def _exchange_grants(grants: tuple[Grant, ...], bindings: Mapping[str, Binding]) -> tuple[ExchangeGrant, ...]:
    return tuple(ExchangeGrant(bindings[grant.binding].credential_ttl_seconds, grant) for grant in grants)


@dataclass(frozen=True)
class ExchangePolicy:
    issuers: tuple[ExchangeIssuer, ...]
    backends: tuple[ExchangeBackend, ...]
    # Evaluates this policy's grants; its compiled globs go with the policy.
    evaluator: Evaluator = field(default_factory=Evaluator, compare=False, repr=False)

    @classmethod
    def build(cls, policy: Policy, resolved: ResolvedPolicy, memo: ExchangeMemo | None = None) -> ExchangePolicy:
        """From the policy and its resolution: the very grants Envoy's RBAC is compiled from.

        With `memo` (kept by the caller between builds), a backend whose model object, grants (a resolution
        keeps the same tuple until a grant on it changes) and roles are unchanged keeps its entry: a
        one-binding commit rebuilds one backend, not ten thousand grants.
        """
        bindings = {b.name: b for b in policy.bindings}  # their credential TTLs and own AWS roles
        roles_of: dict[str, list[str]] = {}
        for declared in policy.roles:
            roles_of.setdefault(declared.backend, []).append(declared.name)
        memo = {} if memo is None else memo
        backends = []
        for backend in policy.backends:
            grants = resolved.grants(backend.name)
            roles = tuple(sorted(roles_of.get(backend.name, ())))
            # A binding's aws_role_arn may change with its grants unchanged: compared by value, not identity.
            choices = backend_role_choices(grants, bindings) if backend.aws is not None else ()
            hit = memo.get(backend.name)
            if (
                hit is not None
                and hit[0] is backend
                and hit[1] is grants
                and hit[2] == roles
                and hit[3].aws_roles == choices
            ):
                entry = hit[3]
            else:
                entry = ExchangeBackend(
                    backend.name,
                    backend.audience,
                    roles,
                    _exchange_grants(grants, bindings),
                    backend.covers_unseen_jobs,
                    choices,
                )
                memo[backend.name] = (backend, grants, roles, entry)
            backends.append(entry)
        for gone in memo.keys() - {b.name for b in policy.backends}:
            del memo[gone]
        issuers = tuple(
            ExchangeIssuer(
                issuer.name,
                issuer.url,
                frozenset(b.audience for b in policy.backends if issuer.name in resolved.issuers(b.name)),
                float(issuer.clock_skew_seconds),
            )
            for issuer in policy.issuers
        )
        return cls(issuers, tuple(backends))

    def issuer_by_url(self, url: str) -> ExchangeIssuer | None:
        return next((i for i in self.issuers if i.url == url), None)

    def covers(self, project_id: str | None) -> bool:
        """Whether a finished job of `project_id` (None: unknown) must be denied though no gateway saw its tokens
        and it holds no credential: some backend accepting raw ID tokens, not opted out (`revoke: seen-jobs`),
        has a grant whose subjects do not provably exclude the project (docs/revocation-coverage.md).

        Narrowed only by what a Job Hook states (the project id), against grants that pin `project_id`; any
        other condition (ref, environment, user, ...) could hold for the job, so it is assumed to."""
        return any(
            backend.covers_unseen_jobs and any(_may_admit(g.grant, project_id) for g in backend.grants)
            for backend in self.backends
        )

    def backends_named(self, target: str) -> list[ExchangeBackend]:
        """A backend by name, else every backend with that audience (more than one is ambiguous)."""
        by_name = [b for b in self.backends if b.name == target]
        return by_name or [b for b in self.backends if b.audience == target]


def _may_admit(grant: Grant, project_id: str | None) -> bool:
    return any(_subject_may_admit(subject, project_id) for subject in grant.subjects)


def _subject_may_admit(subject: ResolvedSubject, project_id: str | None) -> bool:
    """False only when a `project_id` condition every admitted token must meet rules the project out."""
    if project_id is None:
        return True
    if any(_excludes(condition, project_id) for condition in subject.conditions):
        return False
    return not subject.alternatives or any(
        not any(_excludes(condition, project_id) for condition in alternative) for alternative in subject.alternatives
    )


def _excludes(condition: Condition, project_id: str) -> bool:
    if condition.claim != "project_id" or condition.listy:
        return False
    return (project_id in condition.values) == condition.negated


# -- results


@dataclass(frozen=True)
class ExchangeResult:
    """The HTTP answer, and what may be logged about it (never a token)."""

    status: int
    body: dict[str, Any] = field(repr=False)
    result: str  # metric label: granted, or the refusal
    backend: str | None = None
    project_id: str | None = None
    job_id: str | None = None
    roles: tuple[str, ...] = ()
    jti: str | None = None  # the issued credential's
    # Not an answer yet: ask GitLab about this job first, then exchange again (see `MissedHooks`).
    verify: JobToVerify | None = None

    @property
    def granted(self) -> bool:
        return self.result == "granted"


@dataclass(frozen=True)
class JobToVerify:
    """A job whose Job Hook may have been missed: the exchange waits for GitLab's word on it."""

    job_id: str
    project_id: str
    issuer: str  # the issuer's name (gaps are per issuer)
    issuer_url: str  # the tokens' `iss`: which GitLab to ask
    until: float  # the subject token's expiry: how long a "still running" answer is worth remembering


class _VerifyFirst(Exception):
    def __init__(self, job: JobToVerify) -> None:
        super().__init__(job.job_id)
        self.job = job


class MissedHooks:
    """When webhook delivery may have had a gap, and which jobs GitLab said were running since it ended.

    A job whose subject token was minted (`iat`) before the latest gap ended may have finished during the gap
    with its Job Hook lost; a token minted after it belongs to a job whose end would be reported. So the exchange
    asks GitLab about the former once per gap (`needs_check`), the latter never. A gap ends at start (the
    webhook listener is up) and when an issuer's GitLab answers again after failures: the same moments the
    recovery sweep runs. Until `gap_ended` follows `gap_open`, every job is asked about and none is remembered.

    Memory is bounded: a verification is kept until the token it was asked for expires, and at most `capacity`
    (the oldest-expiring are dropped first; a dropped job is just asked about again). No I/O, no clock but the
    injected one.
    """

    def __init__(self, clock: Callable[[], float] = time.time, capacity: int = 100_000) -> None:
        self._clock = clock
        self.capacity = capacity
        self._gap_end: dict[str | None, float] = {}  # by issuer name; None: every issuer
        self._verified: dict[str, tuple[float, float]] = {}  # job_id -> (asked at, keep until)
        self._expiry: list[tuple[float, str]] = []

    def gap_open(self, issuer: str | None = None) -> None:
        """Delivery may be broken right now (e.g. the webhook listener is not up yet)."""
        self._gap_end[issuer] = float("inf")

    def gap_ended(self, issuer: str | None = None, at: float | None = None) -> None:
        self._gap_end[issuer] = self._clock() if at is None else at

    def gap_end(self, issuer: str) -> float | None:
        ends = [self._gap_end[k] for k in (None, issuer) if k in self._gap_end]
        return max(ends, default=None)

    def needs_check(self, job_id: str, issuer: str, issued_at: float, skew: float) -> bool:
        """`skew`: GitLab's clock may run ahead of ours, so a token stamped just after the gap may predate it."""
        end = self.gap_end(issuer)
        if end is None or issued_at >= end + skew:
            return False
        entry = self._verified.get(job_id)
        return entry is None or entry[0] < end

    def verified(self, job_id: str, asked_at: float, until: float) -> None:
        """GitLab said the job was running when asked at `asked_at` (before the request was sent)."""
        now = self._clock()
        self._prune(now)
        if until <= now:
            return
        previous = self._verified.get(job_id)
        if previous is not None and previous[1] > until:
            until = previous[1]
        self._verified[job_id] = (asked_at, until)
        heapq.heappush(self._expiry, (until, job_id))
        while len(self._verified) > self.capacity:
            self._drop_first()

    def __len__(self) -> int:
        self._prune(self._clock())
        return len(self._verified)

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            self._drop_first()

    def _drop_first(self) -> None:
        until, job_id = heapq.heappop(self._expiry)
        entry = self._verified.get(job_id)
        if entry is not None and entry[1] == until:
            del self._verified[job_id]


class Refused(Exception):
    """An RFC 6749 §5.2 error. `result` is the metric label (a replay is `invalid_grant` on the wire)."""

    def __init__(self, error: str, description: str, *, result: str | None = None, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.result = result or error
        self.status = status


def _invalid_request(description: str) -> Refused:
    return Refused("invalid_request", description)


def _invalid_grant(description: str) -> Refused:
    return Refused("invalid_grant", description)


def _job_finished() -> Refused:
    return Refused("invalid_grant", "the job has finished: its tokens are no longer exchanged", result="job_finished")


def _named(value: str) -> str:
    """A request value fit to echo: only a policy name, never anything that could be a token."""
    return repr(value) if _NAME.match(value) else "(not a valid name)"


# -- the request


@dataclass(frozen=True)
class ExchangeRequest:
    subject_token: str = field(repr=False)
    targets: tuple[str, ...]  # `audience` and/or `resource`
    scope: tuple[str, ...]  # empty: every role granted
    lifetime: int | None

    @classmethod
    def parse(cls, form: Mapping[str, str]) -> ExchangeRequest:
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _invalid_request("grant_type is required")
        if grant_type != GRANT_TYPE:
            raise Refused("unsupported_grant_type", f"only {GRANT_TYPE} is supported", result="invalid_request")
        token = form.get("subject_token", "")
        if not token:
            raise _invalid_request("subject_token is required")
        if form.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
            raise _invalid_request(f"subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}")
        if form.get("requested_token_type", TOKEN_TYPE_JWT) not in REQUESTED_TOKEN_TYPES:
            raise _invalid_request(f"requested_token_type must be {TOKEN_TYPE_JWT} if given")
        if "actor_token" in form or "actor_token_type" in form:
            raise _invalid_request("delegation (actor_token) is not supported")
        targets = tuple(form[name] for name in ("audience", "resource") if form.get(name))
        if not targets:
            raise _invalid_request("audience or resource must name a backend")
        return cls(token, targets, tuple(sorted(set(form.get("scope", "").split()))), _lifetime(form))


def _lifetime(form: Mapping[str, str]) -> int | None:
    asked = [form[name] for name in _LIFETIME_PARAMETERS if name in form]
    for value in asked:
        if not _LIFETIME.match(value) or int(value) == 0:
            raise _invalid_request("requested_token_lifetime must be a positive number of seconds")
    return min((int(v) for v in asked), default=None)


# -- the exchange


class TokenExchange:
    """Validates, authorizes and issues; counts subject-token uses (replay) and records issued credentials
    (revocation) in the store.

    `issuer_keys(name)` is the JWKS the control plane relays for that issuer; `policy()` the current
    `ExchangePolicy`, None while none is loaded. Not thread-safe: call it from the control plane's event loop
    (an exchange is a signature check, a signature and two short fsynced store writes: 0.4 ms median measured
    on SQLite, see docs/token-exchange.md).
    """

    def __init__(
        self,
        *,
        keys: SigningKeys,
        issuer_keys: Callable[[str], str | None],
        policy: Callable[[], ExchangePolicy | None],
        clock: Callable[[], float] = time.time,
        max_uses_per_subject: int = 3,
        credential_issuer: str = CREDENTIAL_ISSUER,
        max_tracked_subjects: int = 100_000,
        replay: ReplayCounter | None = None,
        ledger: JobLedger | None = None,
        max_subject_age: float = DEFAULT_MAX_SUBJECT_AGE,
    ) -> None:
        """`replay` and `ledger` default to one in-memory store (`max_tracked_subjects` bounds it): enough
        for one process that never restarts; `serve` passes the state directory's SQLite store."""
        self._keys = keys
        self._issuer_keys = issuer_keys
        self._policy = policy
        self._clock = clock
        self.max_uses_per_subject = max_uses_per_subject
        self.credential_issuer = credential_issuer
        self.max_subject_age = max_subject_age
        memory = MemoryExchangeStore(capacity=max_tracked_subjects, clock=clock)
        self._replay: ReplayCounter = replay or memory
        self._ledger: JobLedger = ledger or memory
        self._issued = _IssuedIndex()
        self.missed_hooks = MissedHooks(clock)
        metrics.track_active_credentials(lambda: self._issued.active(self._clock()))

    # -- revocation support

    def credentials_of(self, job_id: str) -> list[tuple[str, float]]:
        """(jti, exp) of this job's credentials that have not expired yet."""
        return self._issued.of(job_id, self._clock())

    async def latest_expiry(self, job_id: str) -> float | None:
        """When the job's last credential expires: a deny entry on the job is useless after it.

        The ledger knows credentials issued before a restart (or by another replica); this process's own index
        answers if the ledger cannot, so a store failure never shortens a revocation.
        """
        own = max((exp for _, exp in self.credentials_of(job_id)), default=None)
        try:
            recorded = await self._ledger.credentials_until(job_id)
        except ExchangeStoreError as error:
            log.error("%s; revoking job %s by this process's own record", error, job_id)
            recorded = None
        return max((t for t in (own, recorded) if t is not None), default=None)

    def active_credentials(self) -> int:
        return self._issued.active(self._clock())

    # -- the exchange

    async def exchange(self, form: Mapping[str, str], *, checked: str | None = None) -> ExchangeResult:
        """The answer, or (result `verify`, not counted) a job GitLab must be asked about first: the caller
        asks (`CredentialService.verify_job`) and exchanges again with `checked` naming the job GitLab just said
        is running, else sends `unverified(result)`."""
        context: dict[str, Any] = {}
        try:
            result = await self._exchange(form, context, checked)
        except _VerifyFirst as first:
            body = {"error": "temporarily_unavailable", "error_description": "the job's status is being checked"}
            return ExchangeResult(503, body, "verify", verify=first.job, **context)
        except ExchangeStoreError as error:
            log.error("token exchange refused: %s", error)
            body = {"error": "temporarily_unavailable", "error_description": "the exchange state is unavailable"}
            result = ExchangeResult(503, body, "unavailable", **context)
        except Refused as refusal:
            body = {"error": refusal.error, "error_description": refusal.description}
            result = ExchangeResult(refusal.status, body, refusal.result, **context)
        metrics.count_exchange(result.result)
        return result

    def unverified(self, result: ExchangeResult) -> ExchangeResult:
        """Fail closed: GitLab could not say whether the job finished while its Job Hook may have been lost."""
        body = {
            "error": "temporarily_unavailable",
            "error_description": "GitLab could not confirm that the job is still running; try again later",
        }
        refused = ExchangeResult(
            503, body, "unavailable", backend=result.backend, project_id=result.project_id, job_id=result.job_id
        )
        metrics.count_exchange(refused.result)
        return refused

    async def _exchange(self, form: Mapping[str, str], context: dict[str, Any], checked: str | None) -> ExchangeResult:
        policy = self._policy()
        if policy is None:
            raise Refused("temporarily_unavailable", "no policy is loaded yet", result="unavailable", status=503)
        request = ExchangeRequest.parse(form)
        now = self._clock()
        backend = _target(policy, request.targets)
        context["backend"] = backend.name
        claims, issuer = self._validate_subject(request.subject_token, policy, backend, now)
        context.update(project_id=_string(claims, "project_id"), job_id=_string(claims, "job_id"))
        await self._check_job(claims, context["job_id"], now)
        if context["job_id"] != checked:
            self._check_missed_hook(claims, issuer, context)
        roles, policy_ttl = _authorize(policy.evaluator, claims, backend, request.scope)
        _no_binding_role(policy.evaluator, claims, backend)
        context["roles"] = roles
        remaining = int(claims["exp"] - now)
        ttl = min(policy_ttl, request.lifetime or policy_ttl, remaining, int(self._keys.max_credential_ttl))
        if ttl < 1:
            raise _invalid_grant("the subject token has expired")
        # Counted last, once everything else agreed (a refusal uses nothing up), and durably before issuing.
        subject = json.dumps([issuer.url, claims["jti"]])
        if not await self._replay.claim(subject, claims["exp"] + issuer.clock_skew, self.max_uses_per_subject):
            raise Refused("invalid_grant", "the subject token was exchanged too many times", result="replayed")
        # Recorded before the credential exists, and refused if the job finished since `_check_job` (another
        # replica may have been told): the ledger answers both in one step. Project and issuer say where the
        # recovery sweep asks whether the job has finished.
        job_id = context["job_id"]
        if job_id is not None and not await self._ledger.issued(
            job_id,
            int(now) + ttl,
            project_id=context["project_id"],
            issuer=issuer.url,
            subject_expires_at=float(claims["exp"]) + issuer.clock_skew,
        ):
            raise _job_finished()
        token, jti, exp = self._issue(claims, backend, roles, ttl, now)
        self._issued.add(context["job_id"], jti, exp)
        body = {
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_JWT,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": " ".join(roles),
        }
        return ExchangeResult(200, body, "granted", jti=jti, **context)

    async def _check_job(self, claims: Mapping[str, Any], job_id: str | None, now: float) -> None:
        """A job GitLab reported finished gets nothing, however long its ID token still lives.

        The ledger remembers a finished job for `max_subject_age`; a token older than that (by `iat`) is refused
        outright, so no token of a job the ledger has forgotten can still be exchanged.
        """
        issued_at = claims.get("iat", claims.get("nbf"))
        if not _is_number(issued_at):
            raise _invalid_grant("the subject token has no iat: its age cannot be checked")
        if now - issued_at > self.max_subject_age:
            raise _invalid_grant(f"the subject token is older than {int(self.max_subject_age)} s")
        if job_id is not None and await self._ledger.is_finished(job_id):
            raise _job_finished()

    def _check_missed_hook(self, claims: Mapping[str, Any], issuer: ExchangeIssuer, context: dict[str, Any]) -> None:
        """A job minted before a gap in webhook delivery may have finished unseen: GitLab is asked first."""
        job_id, issued_at = context["job_id"], claims.get("iat", claims.get("nbf"))  # a number: `_check_job`
        if job_id is None or not self.missed_hooks.needs_check(job_id, issuer.name, issued_at, issuer.clock_skew):
            return
        if context["project_id"] is None:
            raise _invalid_grant("the subject token has no project_id: the job's status cannot be checked")
        until = float(claims["exp"]) + issuer.clock_skew
        raise _VerifyFirst(JobToVerify(job_id, context["project_id"], issuer.name, issuer.url, until))

    # -- the subject token

    def _validate_subject(
        self, token: str, policy: ExchangePolicy, backend: ExchangeBackend, now: float
    ) -> tuple[dict[str, Any], ExchangeIssuer]:
        """Signature, iss, aud, exp, nbf (with the issuer's clock skew); jti and sub must be strings.

        The audience must be the target backend's, as Envoy requires of the same token on that backend: a token
        minted for one backend is not a ticket to the others.
        """
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _invalid_grant("the subject token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in SUBJECT_ALGORITHMS:
            raise _invalid_grant("the subject token's algorithm is not accepted (RS256 or ES256)")
        iss = unverified.get("iss")
        issuer = policy.issuer_by_url(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _invalid_grant("the subject token's issuer is not trusted")
        if not issuer.audiences:
            raise _invalid_grant("no backend accepts tokens of this issuer")
        claims = self._verified_claims(token, header, issuer, backend.audience)
        _check_times(claims, issuer.clock_skew, now)
        if not isinstance(claims["jti"], str) or not claims["jti"]:
            raise _invalid_grant("the subject token has no jti: its uses could not be counted")
        return claims, issuer

    def _verified_claims(
        self, token: str, header: Mapping[str, Any], issuer: ExchangeIssuer, audience: str
    ) -> dict[str, Any]:
        keys = _candidate_keys(self._issuer_keys(issuer.name), header)
        if not keys:
            raise _invalid_grant("the subject token's signing key is not known")
        failure: Refused = _invalid_grant("the subject token's signature is not valid")
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[header["alg"]],
                    audience=audience,
                    issuer=issuer.url,
                    options={
                        "verify_exp": False,  # checked against our clock in _check_times
                        "verify_nbf": False,
                        "verify_iat": False,
                        "require": ["iss", "aud", "exp", "sub", "jti"],
                    },
                )
                return claims
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
                continue
            except jwt.PyJWTError as error:
                failure = _invalid_grant(_describe(error))
                break
        raise failure

    # -- the credential

    def _issue(
        self, claims: Mapping[str, Any], backend: ExchangeBackend, roles: tuple[str, ...], ttl: int, now: float
    ) -> tuple[str, str, int]:
        key = self._keys.signing_key()
        issued_at = int(now)
        jti = str(uuid.uuid4())
        payload: dict[str, Any] = {
            "iss": self.credential_issuer,
            "sub": claims["sub"],
            "aud": backend.audience,
            "iat": issued_at,
            "nbf": issued_at,
            "exp": issued_at + ttl,
            "jti": jti,
            "roles": list(roles),
            "scope": " ".join(roles),
            **{name: claims[name] for name in COPIED_CLAIMS if isinstance(claims.get(name), str)},
            "act": {"sub": claims["sub"], "iss": claims["iss"]},
        }
        token = jwt.encode(payload, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": "JWT"})
        return token, jti, issued_at + ttl


def _candidate_keys(jwks: str | None, header: Mapping[str, Any]) -> list[jwt.PyJWK]:
    """The relayed keys that may have signed the token: its kid (any key when it names none) and its alg."""
    if jwks is None:
        return []
    try:
        keys = jwt.PyJWKSet.from_json(jwks).keys
    except jwt.PyJWTError:
        return []
    kid = header.get("kid")
    return [k for k in keys if (kid is None or k.key_id == kid) and k.algorithm_name == header["alg"]]


def _check_times(claims: Mapping[str, Any], skew: float, now: float) -> None:
    exp, nbf = claims["exp"], claims.get("nbf")
    if not _is_number(exp) or ("nbf" in claims and not _is_number(nbf)):  # a null nbf is not "no nbf"
        raise _invalid_grant("the subject token's exp or nbf is not a number")
    if now > exp + skew:
        raise _invalid_grant("the subject token has expired")
    if nbf is not None and now + skew < nbf:
        raise _invalid_grant("the subject token is not valid yet")


def _is_number(value: object) -> bool:
    """A JSON number a clock can be compared with: JSON parsers also accept Infinity and NaN."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _describe(error: jwt.PyJWTError) -> str:
    """Our own words: a library message is not guaranteed never to quote the token."""
    if isinstance(error, jwt.InvalidAudienceError):
        return "the subject token's audience is not the backend's: ask for a token with that audience"
    if isinstance(error, jwt.InvalidIssuerError):
        return "the subject token's issuer is not trusted"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the subject token has no {error.claim} claim"
    return "the subject token is not valid"


def _string(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None


def _target(policy: ExchangePolicy, targets: Sequence[str]) -> ExchangeBackend:
    found: set[str] = set()
    backend: ExchangeBackend | None = None
    for target in targets:
        named = policy.backends_named(target)
        if not named:
            raise Refused("invalid_target", f"no backend is named {_named(target)} or has that audience")
        if len(named) > 1:
            raise Refused("invalid_target", "several backends have this audience: name the backend")
        backend = named[0]
        found.add(backend.name)
    if backend is None or len(found) > 1:
        raise Refused("invalid_target", "audience and resource name different backends")
    return backend


def _no_binding_role(evaluator: Evaluator, claims: Mapping[str, Any], backend: ExchangeBackend) -> None:
    """A job whose ID token a binding's own AWS role signs gets no credential for that backend: the credential
    carries roles, not the job's claims, so Envoy would sign its requests with the backend's role instead (its
    `iss` matches no binding role's route; docs/aws-backends.md), a way out of the role its policy gave it."""
    binding, _ = chosen_role(backend.aws_roles, "", claims, evaluator)
    if binding is not None:
        raise Refused(
            "invalid_target",
            f"backend {_named(backend.name)} signs this job's requests with the AWS role of binding "
            f"{_named(binding)}, which a credential cannot carry: send the job's ID token itself",
        )


def _authorize(
    evaluator: Evaluator, claims: Mapping[str, Any], backend: ExchangeBackend, requested: tuple[str, ...]
) -> tuple[tuple[str, ...], int]:
    """The roles to issue and the longest TTL the policy allows for them.

    A role granted by several bindings may live as long as the longest of them; a credential carrying several
    roles lives no longer than its shortest-lived role, so no role outlives what its own bindings allow.
    """
    ttl_by_role: dict[str, int] = {}
    for grant in evaluator.grants_for(claims, backend.resolved):
        ttl_by_role[grant.role] = max(ttl_by_role.get(grant.role, 0), backend.ttl_by_name[grant.name])
    roles = requested or tuple(sorted(ttl_by_role))
    if not roles:
        raise Refused("invalid_scope", f"no role on backend {_named(backend.name)} is granted to this token")
    refused = [r for r in roles if r not in ttl_by_role]
    if refused:
        names = ", ".join(_named(r) for r in refused)
        raise Refused("invalid_scope", f"not granted on backend {_named(backend.name)}: {names}")
    return roles, min(ttl_by_role[r] for r in roles)


# -- bounded in-memory records


class _IssuedIndex:
    """Unexpired credentials by job_id (None for tokens without one), pruned as they expire."""

    def __init__(self) -> None:
        self._by_job: dict[str | None, dict[str, float]] = {}
        self._expiry: list[tuple[float, str, str | None]] = []
        self._count = 0

    def add(self, job_id: str | None, jti: str, exp: float) -> None:
        self._by_job.setdefault(job_id, {})[jti] = exp
        heapq.heappush(self._expiry, (exp, jti, job_id))
        self._count += 1

    def of(self, job_id: str, now: float) -> list[tuple[str, float]]:
        self._prune(now)
        return sorted(self._by_job.get(job_id, {}).items(), key=lambda item: (item[1], item[0]))

    def active(self, now: float) -> int:
        self._prune(now)
        return self._count

    def _prune(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, jti, job_id = heapq.heappop(self._expiry)
            credentials = self._by_job[job_id]
            del credentials[jti]
            self._count -= 1
            if not credentials:
                del self._by_job[job_id]
