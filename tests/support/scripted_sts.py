"""A scripted STS source and a credential maker, for driving the AWS refresher (controlplane/cloud/aws.py) without
any AWS: each fetch answers the next credential or StsError of a script.

Shared by the refresher's own tests (tests/test_cloud_aws.py) and the schedule attacks (tests/test_attack_roles.py);
it lives here because test modules do not import each other (tests/test_no_test_imports.py).
"""

from __future__ import annotations

from collections.abc import Callable

from controlplane.cloud.aws import AwsCredential, StsError


def cred(issued: float = 1000.0, lifetime: float = 3600.0, key: str = "ASIAEXAMPLE") -> AwsCredential:
    return AwsCredential(key, "secret-" + key, "session-" + key, issued + lifetime, "arn:aws:iam::1:role/r", issued)


class Scripted:
    """A source answering from a script: a credential, or an StsError to raise."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.script: list[AwsCredential | StsError | None] = []
        self.calls = 0

    def fetch(self) -> AwsCredential:
        self.calls += 1
        item = self.script.pop(0) if self.script else None
        if isinstance(item, StsError):
            raise item
        if item is None:
            return cred(issued=self.clock(), key=f"ASIA{self.calls}")
        return item
