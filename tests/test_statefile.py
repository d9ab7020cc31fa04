"""The one way state files are written and read: atomic, durable, private, and strict on read."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from controlplane import statefile
from controlplane.statefile import OffLoopWriter, StateFileError, atomic_write_json, ensure_state_dir, read_json
from controlplane.telemetry.metrics import REGISTRY


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


@pytest.mark.parametrize(
    ("document", "kind"), [("null", "null"), ("[]", "a list"), ("0", "a number"), ('""', "a string")]
)
def test_a_document_that_is_not_an_object_is_an_error_not_a_first_start(
    tmp_path: Path, document: str, kind: str
) -> None:
    """Only a missing file means "nothing yet": `null` used to come back as None, like a missing file."""
    path = tmp_path / "state.json"
    path.write_text(document)
    with pytest.raises(StateFileError, match=rf"state\.json: malformed: expected a JSON object, found {kind}"):
        read_json(path)
    assert read_json(tmp_path / "missing.json") is None


def test_a_symlink_is_never_followed_even_a_dangling_one(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_text("{}")
    for target in ("real.json", "gone.json"):
        link = tmp_path / f"to-{target}"
        link.symlink_to(tmp_path / target)
        with pytest.raises(StateFileError, match=rf"to-{target}: is a symbolic link"):
            read_json(link)


def test_start_makes_the_state_dir_and_every_state_file_private(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A directory restored 0755 with 0644 files (signing keys included) used to get a warning and stay so."""
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    for name in ("signing-keys.json", "audit.sqlite3", "audit.sqlite3-wal", "unrelated.txt"):
        (state / name).write_text("x")
        (state / name).chmod(0o644)
    with caplog.at_level("WARNING", logger="controlplane.state"):
        statefile.secure_state_dir(state, ("signing-keys.json", "audit.sqlite3", "pins.json"))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
    assert modes == {
        "signing-keys.json": 0o600,
        "audit.sqlite3": 0o600,
        "audit.sqlite3-wal": 0o600,
        "unrelated.txt": 0o644,
    }
    tightened = [r.getMessage() for r in caplog.records if "made private" in r.getMessage()]
    assert len(tightened) == 1 and "signing-keys.json" in tightened[0] and "audit.sqlite3-wal" in tightened[0]


def test_start_refuses_a_state_file_that_is_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "exchange.sqlite3").symlink_to(tmp_path / "gone")
    with pytest.raises(StateFileError, match=r"exchange\.sqlite3: is a symbolic link"):
        statefile.secure_state_dir(tmp_path, ("exchange.sqlite3",))


def test_one_holder_of_the_state_dir_lock_at_a_time(tmp_path: Path) -> None:
    """flock conflicts between two open files even in one process, so this stands for a second serve."""
    held = statefile.lock_state_dir(tmp_path)
    try:
        with pytest.raises(
            statefile.StateDirInUse,
            match=rf"state dir {tmp_path} is in use by another controlplane serve \(pid {os.getpid()}\)",
        ):
            statefile.lock_state_dir(tmp_path)
        assert stat.S_IMODE((tmp_path / "lock").stat().st_mode) == 0o600
    finally:
        os.close(held)
    os.close(statefile.lock_state_dir(tmp_path))  # released with its descriptor (the kernel does it on kill -9)


def _new_file_mode(directory: Path) -> int:
    """What the umask gives a file created the ordinary way (`open(..., "w")`, `Path.write_text`)."""
    probe = directory / "probe"
    probe.write_text("")
    try:
        return stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.unlink()


def test_text_is_written_whole_in_utf8_and_private_by_default(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    statefile.atomic_write_text(target, "grüße\n")
    assert target.read_bytes() == "grüße\n".encode()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_shared_file_gets_the_mode_any_new_file_gets(tmp_path: Path) -> None:
    old_umask = os.umask(0o027)
    try:
        expected = _new_file_mode(tmp_path)
        target = tmp_path / "out.yaml"
        statefile.atomic_write_text(target, "a: 1\n", mode=None)
        assert stat.S_IMODE(target.stat().st_mode) == expected == 0o640
        statefile.atomic_write_text(target, "a: 2\n", mode=None)  # a replacement too, not only a first write
        assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "a: 2\n"
    finally:
        os.umask(old_umask)


def test_an_explicit_mode_is_applied_whatever_the_umask(tmp_path: Path) -> None:
    old_umask = os.umask(0o277)  # would take the owner's write bit away
    try:
        target = tmp_path / "state.bin"
        statefile.atomic_write_bytes(target, b"x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_process_killed_between_the_write_and_the_rename_leaves_the_old_file(tmp_path: Path) -> None:
    """A real crash (no cleanup runs): the old file is intact and only a dot-named `.tmp` file is left over."""
    target = tmp_path / "out.yaml"
    target.write_text("old\n")
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from controlplane import statefile\n"
        "statefile.os.replace = lambda src, dst: os._exit(3)\n"
        "statefile.atomic_write_text(Path(sys.argv[1]), 'new\\n', mode=None)\n"
    )
    crashed = subprocess.run([sys.executable, "-c", script, str(target)], check=False, timeout=30)
    assert crashed.returncode == 3
    assert target.read_text() == "old\n"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert [p.name.startswith(".out.yaml.") and p.name.endswith(".tmp") for p in leftovers] == [True]
    assert leftovers[0].read_text() == "new\n"  # written and fsynced, never renamed


def test_compile_output_is_written_whole_with_the_mode_of_any_new_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    root = Path(__file__).resolve().parent.parent
    compiled = subprocess.run(
        [sys.executable, "-m", "controlplane", "compile", str(root / "examples" / "quickstart"), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert compiled.returncode == 0, compiled.stderr
    written = list(out.rglob("*.yaml"))
    assert written
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {_new_file_mode(tmp_path)}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
