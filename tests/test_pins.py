from __future__ import annotations

from pathlib import Path

from controlplane.sources.pins import PinStore


def test_pins_survive_a_restart_and_merge(tmp_path: Path) -> None:
    store = PinStore(tmp_path / "state" / "pins.json")
    assert store.load() == {}
    store.save({"gitlab": {"acme/app": 42}})
    store.save({"gitlab": {"acme/other": 43}})
    again = PinStore(tmp_path / "state" / "pins.json")
    assert again.load() == {"gitlab": {"acme/app": 42, "acme/other": 43}}


def test_a_corrupt_file_is_reported_not_fatal(tmp_path: Path, caplog: object) -> None:
    path = tmp_path / "pins.json"
    path.write_text("{not json")
    assert PinStore(path).load() == {}
