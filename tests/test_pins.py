from __future__ import annotations

import stat
from pathlib import Path

import pytest

from controlplane import statefile
from controlplane.sources.pins import PinStore
from controlplane.statefile import StateFileError


def test_pins_survive_a_restart_and_merge(tmp_path: Path) -> None:
    store = PinStore(tmp_path / "state" / "pins.json")
    assert store.load() == {}
    store.save({"gitlab": {"acme/app": 42}})
    store.save({"gitlab": {"acme/other": 43}})
    again = PinStore(tmp_path / "state" / "pins.json")
    assert again.load() == {"gitlab": {"acme/app": 42, "acme/other": 43}}


@pytest.mark.parametrize(
    "document", ["{not json", "", '{"version": 1, "pins": {"gitlab": {"acme/app": "x"}}}', '{"version": 1}']
)
def test_a_corrupt_file_stops_the_start_naming_it(tmp_path: Path, document: str) -> None:
    """Starting without the remembered ids would let a re-used path silently gain what the old project had."""
    path = tmp_path / "pins.json"
    path.write_text(document)
    with pytest.raises(StateFileError, match=r"pins\.json"):
        PinStore(path).load()


def test_a_null_document_is_refused_not_rewritten_without_the_pins(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text("null")
    with pytest.raises(StateFileError, match=r"pins\.json: malformed: expected a JSON object, found null"):
        PinStore(path).load()
    assert path.read_text() == "null"


def test_pins_are_private_and_a_failed_write_keeps_them_in_memory_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "pins.json"
    store = PinStore(path)
    store.load()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(statefile.os, "replace", full)
    store.save({"gitlab": {"acme/app": 42}})
    assert store.current == {"gitlab": {"acme/app": 42}}
    assert "pins.json" in caplog.text and not path.exists()
    monkeypatch.undo()
    store.save({"gitlab": {"acme/app": 42}})  # nothing new, but the last write failed: written now
    assert PinStore(path).load() == {"gitlab": {"acme/app": 42}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
