"""Short-lived AWS credentials for a role, obtained from STS and refreshed before they expire.

Two ways to a role (docs/aws-credentials.md):
- `AssumeRoleWithWebIdentity` with a token the control plane signs with its own signing keys
  (controlplane/credentials/keys.py) as an OIDC issuer: the team's role trusts the issuer URL, the audience and
  the subject; the control plane holds no AWS secret at all.
- `AssumeRole` from the control plane's own AWS credentials, read by botocore from the environment or the
  shared credentials file (never from the command line, where `ps` shows them).

When to refresh, how long to back off and whether a credential may still be used is the schedule both clouds
share (cloud/refresh.py, docs/cloud-refresh.md). `Refresher` applies it to a `CredentialSource` (the STS adapter)
and keeps the last good credential until it expires; after that `current()` returns None: a request signed with
nothing fails closed, never with a credential AWS would refuse anyway.

Secrets (the secret access key, the session token, the web identity token) are never logged, never in a repr
and never in an error message; botocore's own debug logging, which prints request and response bodies, is
capped at WARNING for the same reason.
"""

from __future__ import annotations

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

from controlplane.cloud import refresh
from controlplane.cloud.refresh import Failure, RefreshPolicy
from controlplane.credentials.keys import ALGORITHM, SigningKeys

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

    @property
    def expires_at(self) -> float:
        """What the shared schedule (cloud/refresh.py) plans with."""
        return self.expiration


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


# -- the refresher: the shared schedule and loop (cloud/refresh.py) on an STS source


def _failure(caught: Exception) -> Failure | None:
    """The shared metric's result (cloud/metrics.py): STS's refusals and its outages; anything else is a bug
    (None: counted as `error`, its text withheld)."""
    if isinstance(caught, StsError):
        return Failure("refused" if caught.refused else "unavailable", str(caught))
    return None


def _describe(credential: AwsCredential) -> str:
    """The access key id is logged: AWS treats it as an identifier, and it ties a log line to CloudTrail."""
    return f"role {credential.role_arn}, key {credential.access_key_id}"


class Refresher(refresh.Refresher[AwsCredential]):
    """Keeps one role's credential fresh: `poll()` does what is due and says when to come back; `start()` runs
    it on a thread. `on_change` hears every new credential, and None once the last one is past use (the caller
    then withdraws it from Envoy)."""

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
        super().__init__(
            "aws",
            backend,
            classify=_failure,
            describe=_describe,
            policy=policy,
            clock=clock,
            sample=sample,
            on_change=on_change,
            logger=log,
        )
        self._source = source

    def poll(self) -> float:
        return self.poll_blocking(self._source.fetch)

    def start(self) -> None:
        self.start_thread(self._source.fetch, f"aws-credentials-{self.backend}")
