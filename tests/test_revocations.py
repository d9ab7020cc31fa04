from __future__ import annotations

from pathlib import Path

from controlplane.credentials.revocations import Revocations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_age_out_and_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "revoked.json"
    deny = Revocations(path, clock=clock)
    assert deny.revoke("77", until=1600) and deny.revoke("78", until=1100)
    assert not deny.revoke("77", until=1500)  # an earlier expiry never shortens an entry
    assert deny.active() == ("77", "78") and deny.next_expiry() == 1100
    assert Revocations(path, clock=clock).active() == ("77", "78")
    clock.now = 1200
    assert deny.active() == ("77",) and deny.prune() and not deny.prune()
    assert Revocations(path, clock=clock).active() == ("77",)


def test_an_already_expired_revocation_is_not_recorded(tmp_path: Path) -> None:
    deny = Revocations(None, clock=Clock())
    assert not deny.revoke("1", until=999) and deny.active() == ()
