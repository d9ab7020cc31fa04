"""The one way state files are written and read: atomic, durable, private, and strict on read."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from controlplane import statefile
from controlplane.admin.metrics import REGISTRY
from controlplane.statefile import OffLoopWriter, StateFileError, atomic_write_json, ensure_state_dir, read_json


def test_a_write_is_fsynced_then_renamed_then_the_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    target = tmp_path / "state.json"

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(statefile.os, "fsync", fsync)
    monkeypatch.setattr(statefile.os, "replace", replace)
    atomic_write_json(target, {"a": 1})
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert json.loads(target.read_text()) == {"a": 1}


def test_a_crash_before_the_rename_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"old": True})

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", crash)
    with pytest.raises(StateFileError, match=r"state\.json.*No space left"):
        atomic_write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_files_are_0600_and_a_new_state_dir_0700(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ensure_state_dir(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    target = state / "x.json"
    target.write_text("{}")
    target.chmod(0o644)  # an older version, or a hand edit, left it readable
    atomic_write_json(target, {})
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_reading_is_strict_and_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "revoked-jobs.json"
    assert read_json(target) is None  # first start: nothing yet
    target.write_text('{"version": 1, "revo')  # truncated by a crash of an older, non-atomic writer
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json: not valid JSON"):
        read_json(target)
    target.write_text("")
    with pytest.raises(StateFileError, match=r"revoked-jobs\.json: empty"):
        read_json(target)


async def test_the_off_loop_writer_writes_in_a_thread_and_coalesces_a_burst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync costs ~10 ms on a disk: the event loop serving xDS must not wait for it."""
    target = tmp_path / "revoked-jobs.json"
    writer = OffLoopWriter(target, "kept in memory")
    threads: list[str] = []
    real_write = statefile.atomic_write_json

    def recording(path: Path, document: object) -> None:
        threads.append(threading.current_thread().name)
        real_write(path, document)

    monkeypatch.setattr(statefile, "atomic_write_json", recording)
    results = await asyncio.gather(*(writer.write({"n": n}) for n in range(20)))
    assert all(results) and json.loads(target.read_text()) == {"n": 19}  # the newest document wins
    assert 1 <= len(threads) < 20 and threading.main_thread().name not in threads


async def test_the_off_loop_writer_reports_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", full)
    target = tmp_path / "revoked-jobs.json"
    before = REGISTRY.get_sample_value("controlplane_state_write_failures_total", {"file": target.name}) or 0.0
    assert not await OffLoopWriter(target, "kept in memory").write({})
    assert REGISTRY.get_sample_value("controlplane_state_write_failures_total", {"file": target.name}) == before + 1
