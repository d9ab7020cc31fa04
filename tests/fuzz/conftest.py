"""Hypothesis profiles for the fuzz harnesses, and the per-target figures printed after a run.

`ci` (the default, part of `make test`) runs a few hundred cases per target in seconds; `fuzz` (`make fuzz`,
`FUZZ_PROFILE=fuzz`) runs tens of thousands. Deadlines are off in both: a shared CI machine makes per-example
wall time noisy, so the harnesses that promise a time bound measure it themselves, with a margin.
"""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.figures import CASES, PEAKS

_RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=_RELAXED, print_blob=True)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=None,
    suppress_health_check=_RELAXED,
    print_blob=True,
)
settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))

_FAILED: dict[str, str] = {}
_STARTED = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and "tests/fuzz/" in report.nodeid:
        crash = getattr(report.longrepr, "reprcrash", None)
        _FAILED[report.nodeid.split("::")[-1]] = crash.message.splitlines()[0][:100] if crash else "failed"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CASES:
        return
    write = terminalreporter.write_line
    profile = settings.get_current_profile_name()
    write(f"fuzz figures (profile {profile}, {time.monotonic() - _STARTED:.0f} s wall):")
    for target, cases in sorted(CASES.items()):
        write(f"  {target:<34} {cases:>7} cases")
    for measure, value in sorted(PEAKS.items()):
        write(f"  largest {measure}: {value:,.3f}")
    write(f"  failing tests: {len(_FAILED)}")
    for test, message in sorted(_FAILED.items()):
        write(f"    {test}: {message}")
