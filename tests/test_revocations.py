from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controlplane import statefile
from controlplane.credentials.revocations import Revocations
from controlplane.statefile import StateFileError
from controlplane.telemetry.metrics import REGISTRY


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_entries_age_out_and_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "revoked.json"
    deny = Revocations(path, clock=clock)
    assert deny.revoke("77", until=1600) and deny.revoke("78", until=1100)
    assert not deny.revoke("77", until=1500)  # an earlier expiry never shortens an entry
    # 78 leaves the list at the next 300 s boundary after its expiry (the same moment on every replica)
    assert deny.active() == ("77", "78") and deny.next_expiry() == 1200
    assert await deny.persist()
    assert Revocations(path, clock=clock).active() == ("77", "78")
    clock.now = 1200
    assert deny.active() == ("77",) and deny.prune() and not deny.prune()
    await deny.persist()
    assert Revocations(path, clock=clock).active() == ("77",)


def test_an_already_expired_revocation_is_not_recorded(tmp_path: Path) -> None:
    deny = Revocations(None, clock=Clock())
    assert not deny.revoke("1", until=999) and deny.active() == ()


async def test_a_truncated_deny_list_stops_the_start_instead_of_emptying_it(tmp_path: Path) -> None:
    path = tmp_path / "revoked-jobs.json"
    deny = Revocations(path, clock=Clock())
    deny.revoke("77", until=1600)
    await deny.persist()
    path.write_text(path.read_text()[:12])
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json"):
        Revocations(path, clock=Clock())


@pytest.mark.parametrize(
    "document",
    ['{"version": 1}', '{"version": 1, "revoked": []}', '{"version": 1, "revoked": {"7": "soon"}}', "[]"],
)
def test_a_deny_list_of_the_wrong_shape_is_refused(tmp_path: Path, document: str) -> None:
    path = tmp_path / "revoked-jobs.json"
    path.write_text(document)
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json"):
        Revocations(path, clock=Clock())


@pytest.mark.parametrize("document", ["null", "3", '"revoked"'])
def test_a_deny_list_that_is_not_an_object_is_refused_not_taken_for_a_first_start(
    tmp_path: Path, document: str
) -> None:
    """`null` used to read as "no file yet": the server started with an empty deny list."""
    path = tmp_path / "revoked-jobs.json"
    path.write_text(document)
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json: malformed: expected a JSON object"):
        Revocations(path, clock=Clock())


def test_a_deny_list_that_is_a_dangling_symlink_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "revoked-jobs.json"
    path.symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json: is a symbolic link"):
        Revocations(path, clock=Clock())


async def test_a_failed_write_is_reported_and_the_revocation_still_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "revoked-jobs.json"
    deny = Revocations(path, clock=Clock())
    failures = _write_failures(path)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", full)
    assert deny.revoke("77", until=1600)
    assert not await deny.persist()
    assert deny.active() == ("77",) and deny.status()["revocations_store"]["pending"] == 1  # type: ignore[index]
    assert _write_failures(path) == failures + 1
    assert "revoked-jobs.json" in caplog.text and "No space left" in caplog.text
    monkeypatch.undo()
    assert deny.revoke("78", until=1600)
    assert await deny.persist(now=True)  # the outbox carries the failed change too
    assert Revocations(path, clock=Clock()).active() == ("77", "78")


async def test_the_deny_list_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "revoked-jobs.json"
    deny = Revocations(path, clock=Clock())
    deny.revoke("77", until=1600)
    await deny.persist()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _write_failures(path: Path) -> float:
    value = REGISTRY.get_sample_value("controlplane_state_write_failures_total", {"file": path.name})
    return value or 0.0
