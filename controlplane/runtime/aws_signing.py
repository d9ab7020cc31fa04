"""The AWS role credentials Envoy signs with: one `Refresher` per role the policy in service names, and what the
compiler gets from them (only credentials still usable: the compiler has no clock, docs in compiler/aws.py).

`follow` hears the policy in service (PolicyService's `published`): it starts a refresher for each role that
policy names (its first credential then comes with a recompile, the routes answering 503 until then) and stops
those no longer named. `for_policy`, handed to the policy service like the injected secrets, only reads. Every
new credential, and the expiry of the last one, calls `changed` (from the refresher's thread): serve recompiles,
so the new credential goes out as one ECDS resource.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from controlplane.cloud.aws import (
    AssumeRoleSource,
    AwsCredential,
    CredentialSource,
    Refresher,
    Sts,
    StsError,
    WebIdentity,
    WebIdentitySource,
)
from controlplane.compiler.aws import SigningCredential
from controlplane.credentials.keys import SigningKeys
from controlplane.model.policy import AwsSigning, Policy, binding_aws_backends

log = logging.getLogger(__name__)

# (backend name, how): the backend is the identity asserted to AWS, see `web_identity_subject`.
SourceFactory = Callable[[str, AwsSigning], CredentialSource]
DEFAULT_SESSION_NAME = "controlplane"


@dataclass(frozen=True)
class _NoIssuer:
    """`source: web_identity` on a control plane that is no OIDC issuer (serve without --issuer-url): every
    attempt fails, so the backend answers 503 and the refresher logs why."""

    role_arn: str

    def fetch(self) -> AwsCredential:
        raise StsError("NoIssuerUrl", self.role_arn, refused=True)


def web_identity_subject(backend: str) -> str:
    """What the control plane asserts to AWS about who asks: the backend (as for Google Cloud, cloud/gcp.py).

    Never a constant: the role's trust policy conditions on `sub`, and with one subject for everything any policy
    author could name any role that trusts the issuer (another team's deploy role) on a backend of theirs and have
    their jobs' requests signed with it. With the backend in `sub` a role trusts the backends it names; a policy
    names each role on one backend only (model/kinds/aws.py `shared_role_errors`). Also AssumeRole's `ExternalId`,
    which AWS designed for this confused deputy: the role's trust policy may require it."""
    return f"backend:{backend}"


def source_factory(issuer_url: str | None, keys: SigningKeys | None) -> SourceFactory:
    """How serve obtains each role's credentials. STS is reached as botocore is configured (the region's endpoint,
    or `AWS_ENDPOINT_URL_STS`); AssumeRole signs with botocore's own chain (environment, shared credentials file),
    never with anything in the policy."""

    def source_for(backend: str, how: AwsSigning) -> CredentialSource:
        sts = Sts(region=how.region)
        session = how.session_name or DEFAULT_SESSION_NAME
        subject = web_identity_subject(backend)
        if how.source == "assume_role":
            return AssumeRoleSource(sts, how.role_arn, session_name=session, external_id=subject)
        if issuer_url is None or keys is None:
            return _NoIssuer(how.role_arn)
        identity = WebIdentity(issuer_url, subject=subject)
        return WebIdentitySource(sts, keys, identity, how.role_arn, session_name=session)

    return source_for


def roles_of(policy: Policy) -> dict[str, tuple[str, AwsSigning]]:
    """Each AWS role the policy signs with, by ARN: the backend it signs for (whose name is the identity asserted
    to STS, `web_identity_subject`) and how to get it. Backends' roles, then bindings' own (`aws_role_arn`): a
    binding's role is obtained as its first AWS backend's (by name) with that ARN (same source, region, session
    name), as a binding names only the role. A loaded policy has each role sign for one backend
    (`shared_role_errors`); were it not so, the first would say."""
    roles: dict[str, tuple[str, AwsSigning]] = {}
    backends = sorted(policy.backends, key=lambda b: b.name)
    for backend in backends:
        if backend.aws is not None:
            roles.setdefault(backend.aws.role_arn, (backend.name, backend.aws))
    if not roles:
        return roles  # no AWS backend, so no binding role either: each compile asks (`for_policy`)
    for _, arn, on in sorted(binding_aws_backends(policy), key=lambda found: found[0].name):
        if arn in roles or not on:
            continue
        first = next(b.aws for b in backends if b.name == on[0] and b.aws is not None)
        roles[arn] = (on[0], replace(first, role_arn=arn))
    return roles


class AwsSigners:
    """Refreshers by role ARN. `start_threads=False` leaves polling to the caller (tests drive `poll`)."""

    def __init__(
        self,
        source_for: SourceFactory,
        changed: Callable[[], None],
        *,
        start_threads: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._source_for = source_for
        self._clock = clock
        self._changed = changed
        self._start_threads = start_threads
        self._lock = threading.Lock()
        self._refreshers: dict[str, tuple[tuple[str, AwsSigning], Refresher]] = {}

    def follow(self, policy: Policy | None) -> None:
        """The policy in service changed (accepted or not): start a refresher for each role it names, stop those it
        no longer names (or names differently). Never for a candidate being judged: a refused policy starts no STS
        call. A new refresher's first credential recompiles through `changed`."""
        if policy is None:
            return
        wanted = roles_of(policy)
        with self._lock:
            stale = [arn for arn, (use, _) in self._refreshers.items() if wanted.get(arn) != use]
            stopping = [self._refreshers.pop(arn)[1] for arn in stale]
            for arn, use in wanted.items():
                if arn not in self._refreshers:
                    self._refreshers[arn] = (use, self._refresher(*use))
        for refresher in stopping:  # joins its thread, which may be inside an STS call: not on the caller's
            threading.Thread(target=refresher.stop, name="aws-credentials-stop", daemon=True).start()

    def for_policy(self, policy: Policy) -> Mapping[str, SigningCredential]:
        """The usable credential of each role `policy` names, by role ARN. Only reads (see `follow`)."""
        wanted = roles_of(policy)
        with self._lock:
            current = {
                arn: refresher.current() for arn, (use, refresher) in self._refreshers.items() if wanted.get(arn) == use
            }
        return {arn: _signing(c) for arn, c in sorted(current.items()) if c is not None}

    def status(self) -> dict[str, object]:
        """For the admin status, per role ARN: how its credentials are obtained, how long the held one stays usable,
        its access key id (an identifier AWS shows in CloudTrail, as Envoy's config dump does) and the last failure.
        Never the secret key nor the session token."""
        with self._lock:
            refreshers = sorted(self._refreshers.items(), key=lambda item: item[0])
        out: dict[str, object] = {}
        for arn, ((_, how), refresher) in refreshers:
            held = refresher.current()
            out[arn] = {
                "source": how.source,
                "access_key_id": held.access_key_id if held is not None else None,
                "valid_seconds": round(refresher.valid_seconds()),
                "last_error": refresher.state.last_error,
            }
        return out

    def poll(self) -> None:
        """One round of every refresher (when threads are not started)."""
        with self._lock:
            refreshers = [r for _, r in self._refreshers.values()]
        for refresher in refreshers:
            refresher.poll()

    def stop(self) -> None:
        with self._lock:
            refreshers, self._refreshers = [r for _, r in self._refreshers.values()], {}
        for refresher in refreshers:
            refresher.stop()

    def _refresher(self, backend: str, how: AwsSigning) -> Refresher:
        source = self._source_for(backend, how)
        refresher = Refresher(how.role_arn, source, clock=self._clock, on_change=self._on_change)
        if self._start_threads:
            refresher.start()
        log.info("AWS role %s: credentials refreshed from now on, backend %s (%s)", how.role_arn, backend, how.source)
        return refresher

    def _on_change(self, _credential: AwsCredential | None) -> None:
        self._changed()


def _signing(credential: AwsCredential) -> SigningCredential:
    return SigningCredential(credential.access_key_id, credential.secret_access_key, credential.session_token)
