"""runtime/aws_signing.py: refreshers follow the policy's AWS roles; the compiler gets only usable credentials."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from controlplane.cloud.aws import AwsCredential, StsError
from controlplane.model.loader import parse_policy
from controlplane.model.policy import AwsSigning, Policy
from controlplane.runtime.aws_signing import AwsSigners, roles_of, source_factory
from controlplane.xds.tls import pushes_secrets

ARN = "arn:aws:iam::123456789012:role/ci-read"
OTHER = "arn:aws:iam::123456789012:role/ci-deploy"
BASE = (
    "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://g.example.com\n---\n"
    "kind: Gateway\nname: gw\nlisten: {address: 127.0.0.1, port: 10000}\nbackends: [a]\n---\n"
)


def _policy(arn: str | None) -> Policy:
    aws = f"aws: {{service: s3, region: eu-west-1, role_arn: '{arn}'}}\n" if arn else ""
    backend = f"kind: Backend\nname: a\nhosts: [a.local]\nendpoints: [{{address: 127.0.0.1, port: 1}}]\n{aws}"
    return parse_policy({"p.yaml": BASE + backend})


@dataclass
class Clock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Source:
    """Mints a new credential per fetch, valid `lifetime` seconds; `down` makes STS unavailable."""

    how: AwsSigning
    clock: Clock
    lifetime: float = 3600.0
    down: bool = False
    minted: list[str] = field(default_factory=list)

    def fetch(self) -> AwsCredential:
        if self.down:
            raise StsError("ServiceUnavailable", self.how.role_arn, refused=False)
        key = f"ASIA{len(self.minted):04d}"
        self.minted.append(key)
        now = self.clock()
        return AwsCredential(key, "secret-" + key, "token-" + key, now + self.lifetime, self.how.role_arn, now)


def _signers(clock: Clock) -> tuple[AwsSigners, dict[str, Source], list[int]]:
    sources: dict[str, Source] = {}
    changes: list[int] = []

    def source_for(_backend: str, how: AwsSigning) -> Source:
        sources[how.role_arn] = Source(how, clock)
        return sources[how.role_arn]

    signers = AwsSigners(source_for, lambda: changes.append(1), start_threads=False, clock=clock)
    return signers, sources, changes


def test_roles_of_the_policy() -> None:
    assert list(roles_of(_policy(ARN))) == [ARN]
    assert roles_of(_policy(None)) == {}


def test_a_role_is_refreshed_once_named_and_dropped_once_not() -> None:
    clock = Clock()
    signers, sources, changes = _signers(clock)
    assert signers.for_policy(_policy(ARN)) == {}  # only reads: no refresher for a policy not in service
    assert sources == {}
    signers.follow(_policy(ARN))
    assert signers.for_policy(_policy(ARN)) == {}  # none yet: the backend answers 503
    signers.poll()
    assert changes == [1]
    (credential,) = signers.for_policy(_policy(ARN)).values()
    assert credential.access_key_id == "ASIA0000" and credential.session_token == "token-ASIA0000"
    signers.follow(_policy(OTHER))
    assert signers.for_policy(_policy(ARN)) == {}  # the old role's refresher stopped
    assert signers.for_policy(_policy(OTHER)) == {}  # the new one not polled yet
    assert set(sources) == {ARN, OTHER}
    signers.poll()
    assert list(signers.for_policy(_policy(OTHER))) == [OTHER]
    signers.follow(_policy(None))
    assert signers.for_policy(_policy(OTHER)) == {}
    signers.stop()


def test_sts_down_keeps_the_last_credential_until_it_expires_then_none() -> None:
    clock = Clock()
    signers, sources, changes = _signers(clock)
    signers.follow(_policy(ARN))
    signers.poll()
    sources[ARN].down = True
    clock.now += 3000  # refresh due, STS down: the last credential still signs
    signers.poll()
    assert list(signers.for_policy(_policy(ARN))) == [ARN]
    clock.now += 600  # past its expiry
    signers.poll()
    assert signers.for_policy(_policy(ARN)) == {}
    assert len(changes) == 2  # the first credential, then its expiry with none to follow
    sources[ARN].down = False
    clock.now += 120
    signers.poll()
    assert signers.for_policy(_policy(ARN))[ARN].access_key_id == "ASIA0001"


def test_status_shows_each_role_its_key_id_and_last_failure_never_the_secret() -> None:
    clock = Clock()
    signers, sources, _ = _signers(clock)
    signers.follow(_policy(ARN))
    assert signers.status() == {
        ARN: {"source": "web_identity", "access_key_id": None, "valid_seconds": 0, "last_error": None}
    }
    signers.poll()
    sources[ARN].down = True
    clock.now += 3000
    signers.poll()
    (shown,) = signers.status().values()
    valid = shown["valid_seconds"]
    assert shown["access_key_id"] == "ASIA0000" and isinstance(valid, int) and 0 < valid <= 600
    assert "ServiceUnavailable" in str(shown["last_error"])
    assert "secret-ASIA0000" not in repr(signers.status()) and "token-ASIA0000" not in repr(signers.status())
    signers.stop()


def test_aws_credentials_count_as_secrets_for_the_xds_transport() -> None:
    """They travel inline in ECDS: serve must refuse such a policy over plain-text xDS, as injected secrets."""
    assert pushes_secrets(_policy(ARN).backends)
    assert not pushes_secrets(_policy(None).backends)


def test_web_identity_without_an_issuer_url_never_gets_a_credential() -> None:
    how = _policy(ARN).backends[0].aws
    assert how is not None
    source = source_factory(None, None)("a", how)
    with pytest.raises(StsError, match="NoIssuerUrl"):
        source.fetch()
