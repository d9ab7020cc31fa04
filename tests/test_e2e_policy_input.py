"""Hostile policy input against `controlplane serve` as users run it: the server stays up, says what is wrong
(file:line in /status, /readyz, metrics) and keeps following later edits.

No Envoy here: what is under test is the control plane's own reading of the tree, seen from its admin port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.ports import poll_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DEEP = "kind: Role\nname: deep\nbackend: deploy-api\nrules: " + "[" * 900 + "]" * 900 + "\n"
DEEP_ERROR = "deep.yaml:4: rules" + "[0]" * 63 + ": lists and mappings nested deeper than 64 levels"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "examples" / "quickstart", tmp_path / "policy")
    return tmp_path / "policy"


@pytest.fixture
def started(policy: Path, tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    server = ControlPlaneProcess(policy, log_path=tmp_path / "cp.log", extra_args=("--no-exchange",))
    try:
        yield server
    finally:
        server.stop()


def _admin_up(server: ControlPlaneProcess) -> bool:
    if not server.running:
        raise AssertionError(f"controlplane exited:\n{server.log_text()[-3000:]}")
    try:
        return http_request(f"{server.admin_url}/healthz", timeout=1.0).status == 200
    except OSError:
        return False


def test_serve_started_on_a_deeply_nested_policy_stays_up_and_reports_it(
    started: ControlPlaneProcess, policy: Path
) -> None:
    """It used to exit 1 with a 3,000-line RecursionError traceback: a crash loop under a supervisor."""
    (policy / "deep.yaml").write_text(DEEP)
    server = started.start(wait_ready=False)
    poll_until(lambda: _admin_up(server), 20, message="admin up")
    poll_until(lambda: server.status()["policy"]["last_attempt"], 20, message="first load attempted")
    ready = http_request(f"{server.admin_url}/readyz")
    assert ready.status == 503 and "no good policy load" in ready.text
    status = server.status()["policy"]
    assert DEEP_ERROR in status["errors"] and status["snapshot_versions"] == {}
    assert server.metric("controlplane_policy_errors") >= 1
    log = server.log_text()
    assert "Traceback" not in log and DEEP_ERROR in log
    (policy / "deep.yaml").unlink()  # fixed: the same process starts serving
    server.wait_ready(20)
    assert server.status()["policy"]["errors"] == []


def test_a_fifo_added_to_a_served_tree_is_reported_and_later_edits_still_apply(
    started: ControlPlaneProcess, policy: Path
) -> None:
    """A named pipe saved as p.yaml froze every later reload while /healthz and /readyz said 200."""
    server = started.start()
    before = server.status()["policy"]["snapshot_versions"]["ci-gateway"]
    os.mkfifo(policy / "p.yaml")
    fifo_error = "p.yaml:1: not a regular file (a named pipe): only regular files are read"
    poll_until(lambda: fifo_error in server.status()["policy"]["errors"], 20, message="the FIFO reported")
    assert http_request(f"{server.admin_url}/readyz").status == 200  # the last good policy is still served
    assert server.metric("controlplane_policy_reload_stuck") == 0
    (policy / "p.yaml").unlink()
    backends = policy / "backends.yaml"
    backends.write_text(backends.read_text() + "timeout: 16s\n")

    def edited() -> bool:
        policy_status = server.status()["policy"]
        return policy_status["errors"] == [] and policy_status["snapshot_versions"]["ci-gateway"] != before

    poll_until(edited, 20, message="the later edit served")
