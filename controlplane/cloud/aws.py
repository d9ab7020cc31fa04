"""Short-lived AWS credentials for a role, obtained from STS and refreshed before they expire.

Two ways to a role (docs/aws-credentials.md):
- `AssumeRoleWithWebIdentity` with a token the control plane signs with its own signing keys
  (controlplane/credentials/keys.py) as an OIDC issuer: the team's role trusts the issuer URL, the audience and
  the subject; the control plane holds no AWS secret at all.
- `AssumeRole` from the control plane's own AWS credentials, read by botocore from the environment or the
  shared credentials file (never from the command line, where `ps` shows them).

The decisions (when to refresh, how long to back off, whether a credential may still be used) are pure functions
of a `RefreshState`, the clock reading and a random sample handed in, so they are tested without I/O or time.
`Refresher` applies them to a `CredentialSource` (the STS adapter) and keeps the last good credential until it
expires; after that `current()` returns None: a request signed with nothing fails closed, never with a
credential AWS would refuse anyway.

Secrets (the secret access key, the session token, the web identity token) are never logged, never in a repr
and never in an error message; botocore's own debug logging, which prints request and response bodies, is
capped at WARNING for the same reason.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import botocore.config
import botocore.exceptions
import botocore.parsers
import botocore.session
import jwt

from controlplane.cloud import metrics
from controlplane.credentials.keys import ALGORITHM, SigningKeys
from controlplane.retry import Backoff

log = logging.getLogger("controlplane.cloud.aws")

# botocore logs whole request and response bodies at DEBUG: the web identity token going out, the secret access
# key and session token coming back. Nothing of it may reach a log, whatever level the operator chooses.
logging.getLogger("botocore").setLevel(logging.WARNING)

# -- values


@dataclass(frozen=True)
class AwsCredential:
    """Temporary credentials for one role. The secret parts never appear in a repr."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: float  # epoch seconds
    role_arn: str
    issued_at: float  # when the control plane received it (its own clock)


_DEFAULT_BACKOFF: Final = Backoff(base_seconds=1.0, cap_seconds=60.0, jitter=False)  # jittered by RefreshPolicy


@dataclass(frozen=True)
class RefreshPolicy:
    """When to refresh and how to retry.

    A credential is refreshed once `refresh_fraction` of its lifetime has passed, minus up to `jitter_fraction` of
    its lifetime (so control planes sharing a role do not call STS in step), and always at least
    `min_margin_seconds` before it expires. It is used until `expiry_skew_seconds` before its expiration: a
    request signed in its last seconds could reach AWS after it.
    """

    refresh_fraction: float = 0.5
    jitter_fraction: float = 0.1
    min_margin_seconds: float = 300.0
    expiry_skew_seconds: float = 60.0
    backoff: Backoff = _DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if not 0 < self.refresh_fraction < 1 or not 0 <= self.jitter_fraction < self.refresh_fraction:
            raise ValueError("refresh_fraction must be in (0, 1) and jitter_fraction in [0, refresh_fraction)")
        if self.min_margin_seconds < 0 or self.expiry_skew_seconds < 0:
            raise ValueError("min_margin_seconds and expiry_skew_seconds must not be negative")


class Phase(enum.Enum):
    EMPTY = "empty"  # no credential yet: nothing to sign with
    FRESH = "fresh"  # usable, refresh not yet due
    DUE = "due"  # usable, a refresh is due or failing
    EXPIRED = "expired"  # the last credential is past use: fail closed


@dataclass(frozen=True)
class RefreshState:
    credential: AwsCredential | None
    failures: int  # consecutive failed attempts since the last success
    next_attempt_at: float


# -- pure decisions


def initial_state(now: float) -> RefreshState:
    """Nothing held, first attempt at once."""
    return RefreshState(None, 0, now)


def refresh_at(credential: AwsCredential, policy: RefreshPolicy, sample: float) -> float:
    """When to refresh `credential`; `sample` in [0, 1) draws the jitter."""
    lifetime = max(0.0, credential.expiration - credential.issued_at)
    planned = credential.issued_at + lifetime * (policy.refresh_fraction - policy.jitter_fraction * sample)
    latest = credential.expiration - policy.min_margin_seconds
    return max(credential.issued_at, min(planned, latest))


def usable_until(credential: AwsCredential, policy: RefreshPolicy) -> float:
    return credential.expiration - policy.expiry_skew_seconds


def on_success(credential: AwsCredential, policy: RefreshPolicy, sample: float) -> RefreshState:
    return RefreshState(credential, 0, refresh_at(credential, policy, sample))


def on_failure(state: RefreshState, now: float, policy: RefreshPolicy, sample: float) -> RefreshState:
    """Back off (exponential, capped, jittered down to half); the credential held is kept. With one held, the
    next attempt never waits past the moment it stops being usable, so a long backoff cannot eat its margin."""
    delay = policy.backoff.delay(state.failures) * (0.5 + 0.5 * sample)
    next_attempt = now + delay
    if state.credential is not None:
        end = usable_until(state.credential, policy)
        if now < end:
            next_attempt = min(next_attempt, end)
    return RefreshState(state.credential, state.failures + 1, next_attempt)


def phase(state: RefreshState, now: float, policy: RefreshPolicy) -> Phase:
    if state.credential is None:
        return Phase.EMPTY
    if now >= usable_until(state.credential, policy):
        return Phase.EXPIRED
    return Phase.DUE if now >= state.next_attempt_at else Phase.FRESH


def usable(state: RefreshState, now: float, policy: RefreshPolicy) -> AwsCredential | None:
    """The credential to sign with now, or None (fail closed)."""
    return state.credential if phase(state, now, policy) in (Phase.FRESH, Phase.DUE) else None


def attempt_due(state: RefreshState, now: float) -> bool:
    return now >= state.next_attempt_at


# -- the web identity token


@dataclass(frozen=True)
class WebIdentity:
    """What the control plane asserts to STS: the role's trust policy names the issuer URL (as an IAM OIDC
    provider), the audience and the subject."""

    issuer_url: str
    audience: str = "sts.amazonaws.com"
    subject: str = "controlplane"
    token_ttl_seconds: int = 300  # only long enough to reach STS


def web_identity_claims(identity: WebIdentity, now: float, jti: str) -> dict[str, Any]:
    issued = int(now)
    return {
        "iss": identity.issuer_url,
        "aud": identity.audience,
        "sub": identity.subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + identity.token_ttl_seconds,
        "jti": jti,
    }


def sign_web_identity(keys: SigningKeys, identity: WebIdentity, now: float, jti: str) -> str:
    """A token signed by the control plane's current signing key, whose JWKS the issuer URL publishes."""
    active = keys.signing_key()
    return jwt.encode(
        web_identity_claims(identity, now, jti), active.private_key, algorithm=ALGORITHM, headers={"kid": active.kid}
    )


# -- STS over HTTP


class StsError(Exception):
    """STS did not answer with credentials. The message holds the AWS error code and the role, nothing secret."""

    def __init__(self, code: str, role_arn: str, *, refused: bool) -> None:
        super().__init__(f"STS refused or failed for {role_arn}: {code}")
        self.code = code
        self.refused = refused  # True: STS said no (configuration); False: may work on retry


# STS errors a retry cannot fix: the request itself is refused.
_REFUSALS: Final = frozenset(
    {
        "AccessDenied",
        "InvalidIdentityToken",
        "IDPRejectedClaim",
        "ExpiredTokenException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "MalformedPolicyDocument",
        "ValidationError",
        "RegionDisabledException",
    }
)


class Sts:
    """STS through botocore. Credentials for `AssumeRole` come from botocore's chain (environment variables, the
    shared credentials file given here or by AWS_SHARED_CREDENTIALS_FILE); `AssumeRoleWithWebIdentity` is unsigned
    and needs none."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        credentials_file: str | None = None,
        clock: Callable[[], float] = time.time,
        timeout_seconds: float = 10.0,
        deadline_seconds: float | None = None,
    ) -> None:
        """`timeout_seconds` bounds connecting and each read; `deadline_seconds` (default three times it) the
        whole call, which botocore does not: an endpoint trickling a byte per read would hold it for ever."""
        session = botocore.session.Session()
        if credentials_file is not None:
            session.set_config_variable("credentials_file", credentials_file)
        config = botocore.config.Config(
            connect_timeout=timeout_seconds, read_timeout=timeout_seconds, retries={"max_attempts": 1}
        )
        self._client = session.create_client("sts", region_name=region, endpoint_url=endpoint_url, config=config)
        self._clock = clock
        self._deadline = deadline_seconds if deadline_seconds is not None else 3 * timeout_seconds
        self._stuck: threading.Thread | None = None  # a call past its deadline, still held by the endpoint

    def assume_role_with_web_identity(
        self, role_arn: str, token: str, session_name: str, duration_seconds: int
    ) -> AwsCredential:
        return self._call(
            "assume_role_with_web_identity",
            role_arn,
            {
                "RoleArn": role_arn,
                "WebIdentityToken": token,
                "RoleSessionName": session_name,
                "DurationSeconds": duration_seconds,
            },
        )

    def assume_role(
        self, role_arn: str, session_name: str, duration_seconds: int, external_id: str | None = None
    ) -> AwsCredential:
        params: dict[str, Any] = {
            "RoleArn": role_arn,
            "RoleSessionName": session_name,
            "DurationSeconds": duration_seconds,
        }
        if external_id is not None:
            params["ExternalId"] = external_id
        return self._call("assume_role", role_arn, params)

    def _call(self, operation: str, role_arn: str, params: Mapping[str, Any]) -> AwsCredential:
        answer = self._within_deadline(lambda: self._answer(operation, role_arn, params), role_arn)
        if not _assumed(role_arn, answer.get("AssumedRoleUser")):
            raise StsError("OtherRoleAnswered", role_arn, refused=False)
        return _credential(answer["Credentials"], role_arn, self._clock(), float(params["DurationSeconds"]))

    def _within_deadline(self, call: Callable[[], Mapping[str, Any]], role_arn: str) -> Mapping[str, Any]:
        """`call` on a thread of its own, waited for `deadline` seconds: past it the caller (the refresher, which
        also withdraws an expired credential) goes on. At most one call is left behind: while it is still held,
        the next attempt fails at once instead of leaving another thread."""
        if self._stuck is not None and self._stuck.is_alive():
            raise StsError("PreviousCallStillHeld", role_arn, refused=False)
        outcome: list[Mapping[str, Any] | BaseException] = []

        def run() -> None:
            try:
                outcome.append(call())
            except BaseException as error:  # handed to the caller's thread
                outcome.append(error)

        worker = threading.Thread(target=run, name="aws-sts-call", daemon=True)
        worker.start()
        worker.join(self._deadline)
        if worker.is_alive():
            self._stuck = worker
            raise StsError("DeadlineExceeded", role_arn, refused=False)
        (result,) = outcome
        if isinstance(result, BaseException):
            raise result
        return result

    def _answer(self, operation: str, role_arn: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            answer: Mapping[str, Any] = getattr(self._client, operation)(**params)
        except botocore.exceptions.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", "Unknown"))[:_CODE_LIMIT]
            raise StsError(code, role_arn, refused=code in _REFUSALS) from None
        except botocore.exceptions.NoCredentialsError:
            raise StsError("NoCredentials", role_arn, refused=True) from None
        except (botocore.exceptions.BotoCoreError, botocore.parsers.ResponseParserError) as error:
            # connection, timeout, an answer that is no STS XML: retried with backoff; the message (which may
            # quote the answer) is not kept
            raise StsError(type(error).__name__, role_arn, refused=False) from None
        return answer


_CODE_LIMIT = 64  # an error code from the endpoint goes into logs: AWS's are short


def _assumed(role_arn: str, user: object) -> bool:
    """Whether STS's `AssumedRoleUser.Arn` (`arn:<partition>:sts::<account>:assumed-role/<name>/<session>`) is a
    session of `role_arn`: an answer for another role (a misrouted or hostile endpoint) must never sign requests
    meant for this one."""
    arn = user.get("Arn") if isinstance(user, Mapping) else None
    if not isinstance(arn, str):
        return False
    partition, _, rest = role_arn.removeprefix("arn:").partition(":iam::")
    account, _, path = rest.partition(":role/")
    return arn.startswith(f"arn:{partition}:sts::{account}:assumed-role/{path.rsplit('/', 1)[-1]}/")


def _credential(answer: Mapping[str, Any], role_arn: str, now: float, asked_seconds: float) -> AwsCredential:
    """The credential STS answered, its expiration believed only up to the duration asked: a later one (year 9999
    from a hostile or broken endpoint) would never be refreshed while AWS ends the session on time."""
    return AwsCredential(
        access_key_id=str(answer["AccessKeyId"]),
        secret_access_key=str(answer["SecretAccessKey"]),
        session_token=str(answer["SessionToken"]),
        expiration=min(float(answer["Expiration"].timestamp()), now + asked_seconds),
        role_arn=role_arn,
        issued_at=now,
    )


# -- sources


class CredentialSource(Protocol):
    def fetch(self) -> AwsCredential: ...


@dataclass
class WebIdentitySource:
    """AssumeRoleWithWebIdentity with a token signed now by the control plane's current key."""

    sts: Sts
    keys: SigningKeys
    identity: WebIdentity
    role_arn: str
    session_name: str = "controlplane"
    duration_seconds: int = 3600
    clock: Callable[[], float] = time.time

    def fetch(self) -> AwsCredential:
        token = sign_web_identity(self.keys, self.identity, self.clock(), uuid.uuid4().hex)
        return self.sts.assume_role_with_web_identity(self.role_arn, token, self.session_name, self.duration_seconds)


@dataclass
class AssumeRoleSource:
    """AssumeRole from the control plane's own AWS credentials (environment or shared credentials file)."""

    sts: Sts
    role_arn: str
    session_name: str = "controlplane"
    duration_seconds: int = 3600
    external_id: str | None = field(default=None, repr=False)

    def fetch(self) -> AwsCredential:
        return self.sts.assume_role(self.role_arn, self.session_name, self.duration_seconds, self.external_id)


# -- the refresher


def _result(caught: Exception) -> str:
    """The shared metric's result (cloud/metrics.py): STS's refusals, its outages, and anything else (a bug)."""
    if isinstance(caught, StsError):
        return "refused" if caught.refused else "unavailable"
    return "error"


class Refresher:
    """Keeps one backend's credential fresh: `poll()` does what is due and says when to come back; `start()` runs
    it on a thread. `on_change` hears every new credential, and None once the last one expired (the caller then
    withdraws it from Envoy)."""

    def __init__(
        self,
        backend: str,
        source: CredentialSource,
        policy: RefreshPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sample: Callable[[], float] = random.random,
        on_change: Callable[[AwsCredential | None], None] | None = None,
    ) -> None:
        self.backend = backend
        self._source = source
        self._policy = policy or RefreshPolicy()
        self._clock = clock
        self._sample = sample
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = initial_state(clock())
        self._reported_expired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.track_valid_seconds("aws", backend, self, self.valid_seconds)

    @property
    def state(self) -> RefreshState:
        return self._state

    def current(self) -> AwsCredential | None:
        """The credential to sign with, or None: fail closed."""
        return usable(self._state, self._clock(), self._policy)

    def valid_seconds(self) -> float:
        """How long the credential held stays usable; 0: none, requests fail closed (the gauge's reading)."""
        credential = self.current()
        return 0.0 if credential is None else max(0.0, usable_until(credential, self._policy) - self._clock())

    def poll(self) -> float:
        """Refresh if due; report a credential that just expired. Returns when to call again."""
        with self._lock:
            now = self._clock()
            if attempt_due(self._state, now):
                self._attempt(now)
            now = self._clock()
            if phase(self._state, now, self._policy) is Phase.EXPIRED and not self._reported_expired:
                self._reported_expired = True
                metrics.EXPIRED.labels("aws", self.backend).inc()
                log.error("AWS credentials for backend %s expired with no fresh ones: failing closed", self.backend)
                self._notify(None)
            return self._next_wake()

    def _attempt(self, now: float) -> None:
        try:
            credential = self._source.fetch()
        except Exception as caught:  # a bug or an unexpected error must not end the thread: retried like an outage
            self._failed(now, caught)
            return
        if usable_until(credential, self._policy) <= self._clock():
            # Expired on arrival (a hostile or broken STS, a clock far off): as a success it would be due again at
            # once, an STS call and a recompile in a tight loop; as a failure it backs off, the held one kept.
            self._failed(now, StsError("ExpiredOnArrival", credential.role_arn, refused=False))
            return
        metrics.count_refresh("aws", self.backend, "ok")
        self._state = on_success(credential, self._policy, self._sample())
        self._reported_expired = False
        log.info(
            "AWS credentials for backend %s refreshed: role %s, key %s, expire in %.0fs",
            self.backend,
            credential.role_arn,
            credential.access_key_id,
            credential.expiration - now,
        )
        self._notify(credential)

    def _failed(self, now: float, caught: Exception) -> None:
        error = caught if isinstance(caught, StsError) else StsError(type(caught).__name__, "?", refused=False)
        result = _result(caught)
        metrics.count_refresh("aws", self.backend, result)
        self._state = on_failure(self._state, now, self._policy, self._sample())
        log.warning(
            "AWS credentials for backend %s not refreshed (%s, attempt %d; next in %.0fs): %s",
            self.backend,
            result,
            self._state.failures,
            self._state.next_attempt_at - now,
            error,
        )

    def _next_wake(self) -> float:
        wake = self._state.next_attempt_at
        if self._state.credential is not None and not self._reported_expired:
            wake = min(wake, usable_until(self._state.credential, self._policy))
        return wake

    def _notify(self, credential: AwsCredential | None) -> None:
        """A failing listener is logged, not raised: the refresher's thread must outlive it, and the credential
        stays available through `current()`."""
        if self._on_change is None:
            return
        try:
            self._on_change(credential)
        except Exception:
            log.exception("the listener of backend %s's AWS credentials failed", self.backend)

    # -- on a thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"aws-credentials-{self.backend}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        metrics.forget("aws", self.backend, self)

    def _run(self) -> None:
        while not self._stop.is_set():
            wake = self.poll()
            self._stop.wait(max(0.0, wake - self._clock()))
