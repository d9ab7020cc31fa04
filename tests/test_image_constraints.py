"""constraints.txt pins what the image and `make setup` install (issue 14): every dependency pyproject declares, at
one exact version that satisfies its range, the one this test venv runs, and both installs read it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)$")


def pins(text: str) -> dict[str, Version]:
    """name -> exact version; anything but `name==version` lines and comments is refused (a range pins nothing)."""
    found: dict[str, Version] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"constraints.txt:{number}: {line!r} is not NAME==VERSION")
        name = canonicalize_name(match["name"])
        if name in found:
            raise ValueError(f"constraints.txt:{number}: {name} pinned twice")
        found[name] = Version(match["version"])
    return found


def declared() -> list[Requirement]:
    """The project's dependencies and its test extra (what `make setup` installs; the image takes the first)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in (*project["dependencies"], *project["optional-dependencies"]["test"])]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins(CONSTRAINTS.read_text())
    problems = []
    for requirement in declared():
        version = pinned.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(f"{requirement.name}: not pinned (make constraints)")
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name}=={version} outside {requirement.specifier}")
    assert not problems, problems


def test_the_pins_are_what_this_venv_runs() -> None:
    """The image gets what the tests ran against: a package upgraded in the venv without `make constraints`, or a
    pin edited by hand and never installed, shows here."""
    pinned = pins(CONSTRAINTS.read_text())
    differing = {}
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # the previous test says whether it is pinned
        if name in pinned and pinned[name] != installed:
            differing[name] = f"pinned {pinned[name]}, installed {installed}"
    assert not differing, differing


def test_the_project_itself_and_url_installs_are_not_pinned() -> None:
    """The project is built from the checkout, never from an index; a `name @ URL` line would point the image's
    build at a file on one machine."""
    text = CONSTRAINTS.read_text()
    assert "controlplane" not in pins(text)
    assert " @ " not in text


def test_both_installs_read_the_constraints() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\): .*constraints\.txt", makefile, re.M), "make setup must rerun when it changes"
    assert "pip install --quiet -c constraints.txt -e '.[test]'" in makefile
    assert re.search(r"^constraints:", makefile, re.M)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt \.", dockerfile), "the image must install the pinned set"
    assert re.search(r"^COPY constraints\.txt ", dockerfile, re.M)
    assert "!constraints.txt" in (ROOT / ".dockerignore").read_text()


@pytest.mark.parametrize("line", ["requests>=2", "requests", "-e .", "x @ file:///tmp/x.whl"])
def test_a_line_that_pins_nothing_is_refused(line: str) -> None:
    with pytest.raises(ValueError, match="NAME==VERSION"):
        pins(f"# header\n{line}\n")
