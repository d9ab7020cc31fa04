"""The image's runtime contract (issue 14): the Dockerfile's final stage, run as the image would run it.

No container engine here can pull a base image, so the image is never built in the tests; what made the old image
unable to start was its contract (uid 10001 running from `/`, whose default state directory it could not create),
and that contract is what these tests run: the Dockerfile's own USER, WORKDIR, ENV, VOLUMEs, EXPOSEd ports,
ENTRYPOINT + CMD and HEALTHCHECK, read from the file (tests/support/image_runtime.py), with a real Envoy
bootstrapped by the image's own `controlplane bootstrap` taking its configuration and serving a request.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support.backends import EchoBackend, http_request
from tests.support.envoy import EnvoyProcess
from tests.support.image_runtime import (
    INSTALL_DIR,
    FinalStage,
    ImageRuntime,
    can_switch_user,
    make_installation,
    parse_dockerfile,
    reachable_sources,
    runnable_interpreter,
    temporary_root,
)
from tests.support.ports import LOOPBACK, free_port, poll_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
STATE_ENV = "CONTROLPLANE_STATE_DIR"
POLICY_ENV = "CONTROLPLANE_POLICY"
# The listeners an operator moves with one variable each; webhooks are off until their address is set.
XDS, ADMIN, EXCHANGE = "CONTROLPLANE_XDS_ADDRESS", "CONTROLPLANE_ADMIN_ADDRESS", "CONTROLPLANE_EXCHANGE_ADDRESS"
WEBHOOK, WEBHOOK_PORT = "CONTROLPLANE_WEBHOOK_ADDRESS", 9903
GROUP = "ci-gateway"  # the quickstart's gateway
START_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def stage() -> FinalStage:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_the_final_stage_declares_the_contract(stage: FinalStage) -> None:
    """What an operator and the runtime test rely on, present in the file (a test that reads nothing would pass)."""
    uid, gid = stage.uid_gid
    assert uid != 0 and gid != 0, "the image must not run as root"
    state = stage.env[STATE_ENV]
    assert state in stage.volumes and stage.env[POLICY_ENV] in stage.volumes, stage.volumes
    assert stage.workdir not in ("/", state), "the working directory is the user's own, not / nor the state"
    # The state volume and the working directory are the user's: chowned in a RUN, created as its home.
    assert any(f"chown {uid}:{gid} {state}" in line for line in stage.run), stage.run
    assert any(f"--uid {uid}" in line and f"--home-dir {stage.workdir} --create-home" in line for line in stage.run)
    assert stage.env["HOME"] == stage.workdir  # python-gitlab's import needs a home directory (a bare uid has none)
    assert any(f"{INSTALL_DIR} {INSTALL_DIR}" in copy for copy in stage.copies)
    assert stage.env["PATH"].startswith(f"{INSTALL_DIR}/bin:")
    # Every EXPOSEd port is a listener's, each movable by its variable (webhooks: documented, off by default).
    listener_ports = {int(stage.env[name].rpartition(":")[2]) for name in (XDS, ADMIN, EXCHANGE)}
    assert set(stage.expose) == listener_ports | {WEBHOOK_PORT}, stage.expose
    assert stage.entrypoint == ["controlplane"] and stage.cmd == ["serve"]
    assert stage.healthcheck is not None and stage.healthcheck.command[:2] == ["controlplane", "healthcheck"]
    assert stage.stopsignal == "SIGTERM"


@pytest.fixture(scope="module")
def installation(stage: FinalStage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The image's /opt/controlplane: a venv the image's user can run, importing this checkout."""
    switch = can_switch_user()
    uid, gid = stage.uid_gid
    interpreter = runnable_interpreter(uid, gid) if switch else Path(sys.executable)
    if interpreter is None:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        pytest.skip(f"no python{version} here that uid {uid} may run (the test venv's lies out of its reach)")
    root = temporary_root(switch)
    try:
        if switch:
            source, packages = reachable_sources(ROOT, root / "copies")
        else:
            source, packages = ROOT, sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        yield make_installation(interpreter, root / "opt", source, packages)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def runtime(stage: FinalStage, installation: Path) -> Iterator[ImageRuntime]:
    root = temporary_root(can_switch_user())
    prepared: ImageRuntime | None = None
    try:
        owned = (stage.workdir, stage.env[STATE_ENV])  # what the Dockerfile chowns to its user
        prepared = ImageRuntime.prepare(stage, installation, root, switch_user=can_switch_user(), owned=owned)
        yield prepared  # started by the test, once it set what an operator would
    finally:
        if prepared is not None:
            prepared.stop()
        shutil.rmtree(root, ignore_errors=True)


def _quickstart_into(policy: Path, *, listen: int, backend: int) -> None:
    """examples/quickstart, its gateway on `listen` and both backends on `backend`: what an operator mounts."""
    for source in (ROOT / "examples" / "quickstart").iterdir():
        text = source.read_text()
        text = text.replace("port: 10000", f"port: {listen}")
        text = text.replace("port: 8081", f"port: {backend}").replace("port: 8082", f"port: {backend}")
        (policy / source.name).write_text(text)
        (policy / source.name).chmod(0o644)


def _ready(runtime: ImageRuntime) -> bool:
    process = runtime.process
    assert process is not None
    if process.poll() is not None:
        raise AssertionError(f"the image's command exited with {process.returncode}:\n{runtime.log_text()[-3000:]}")
    try:
        return http_request(f"http://{LOOPBACK}:{runtime.port(9902)}/readyz", timeout=1.0).status == 200
    except OSError:
        return False


def test_the_image_command_serves_a_real_envoy_as_its_user_and_stops_cleanly(runtime: ImageRuntime) -> None:
    stage = runtime.stage
    assert stage.healthcheck is not None
    listen = free_port()
    secrets = runtime.root / "secrets"  # a mounted Secret: the webhook token, readable by the image's user
    secrets.mkdir(mode=0o755)
    (secrets / "webhook").write_text("hook-secret\n")
    (secrets / "webhook").chmod(0o644)
    with EchoBackend(name="reports") as backend:
        _quickstart_into(runtime.host(stage.env[POLICY_ENV]), listen=listen, backend=backend.port)
        runtime.extra_env = {
            WEBHOOK: f"0.0.0.0:{WEBHOOK_PORT}",  # moved to a loopback port as the image's own listeners are
            "CONTROLPLANE_WEBHOOK_SECRET_FILE": str(secrets / "webhook"),
        }
        exchange_address = runtime.environment()[EXCHANGE]  # every listener's loopback port picked
        # What an operator sets: where gateways dial the exchange (the image's 0.0.0.0 means nothing to them).
        runtime.extra_env = {**runtime.extra_env, "CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS": exchange_address}

        # Before serve runs, the HEALTHCHECK fails: it asks the listener, it does not just exit 0.
        assert runtime.run(stage.healthcheck.command, timeout=30).returncode == 1

        runtime.start()
        poll_until(lambda: _ready(runtime), START_TIMEOUT, interval=0.05, message="the image's /readyz")
        admin = f"http://{LOOPBACK}:{runtime.port(9902)}"
        assert http_request(f"{admin}/healthz").status == 200
        healthcheck = runtime.run(stage.healthcheck.command, timeout=_seconds(stage.healthcheck.options["timeout"]))
        assert healthcheck.returncode == 0, healthcheck.stderr

        # Its state went to the state volume, owned by the image's user; nothing into the working directory.
        state = runtime.host(stage.env[STATE_ENV])
        assert (state / "lock").stat().st_uid == runtime.uid
        assert {path.name for path in state.iterdir()} >= {"lock", "signing-keys.json"}
        assert not (runtime.host(stage.workdir) / ".controlplane").exists()

        # Every listener answers on the port its variable moved it to.
        webhook = http_request(f"http://{LOOPBACK}:{runtime.port(WEBHOOK_PORT)}/webhooks/gitlab", method="POST")
        assert webhook.status == 401, webhook.text  # there, and refusing a request without the secret
        exchange = http_request(f"http://{LOOPBACK}:{runtime.port(9904)}/.controlplane/token", method="POST")
        assert 400 <= exchange.status < 500, exchange.text

        # A real Envoy, bootstrapped by the image's own `controlplane bootstrap`, gets its config and serves.
        bootstrap = runtime.run(
            ["controlplane", "bootstrap", "--group", GROUP, "--xds-address", f"{LOOPBACK}:{runtime.port(18000)}"]
        )
        assert bootstrap.returncode == 0, bootstrap.stderr
        with EnvoyProcess(yaml.safe_load(bootstrap.stdout), name="image-gateway") as envoy:

            def served() -> bool:
                try:
                    answer = http_request(f"http://{LOOPBACK}:{listen}/healthz", headers={"Host": "reports.local"})
                except OSError:
                    return False
                return answer.status == 200 and answer.json()["backend"] == "reports"

            poll_until(served, 20, interval=0.05, message="a request through the gateway to the public path")
            assert envoy.stats("control_plane.connected_state").get("control_plane.connected_state") == 1

            # docker stop: STOPSIGNAL, the streams drained, exit 0, within the engine's default 10 s.
            assert runtime.stop_signal() == signal.SIGTERM
            code = runtime.terminate(timeout=10)
            log = runtime.log_text()
            assert code == 0, log[-3000:]
            assert "draining xDS streams" in log and "stopped" in log, log[-3000:]
            assert "Traceback" not in log, log[-3000:]


def _seconds(duration: str) -> float:
    """A HEALTHCHECK duration as Docker writes it: 5s, 1m, 500ms."""
    for suffix, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * factor
    raise ValueError(f"unexpected duration {duration!r}")


@pytest.mark.parametrize("where", ["state volume owned by root", "no state dir: the default under /"])
def test_a_state_directory_the_user_cannot_write_is_one_line_naming_it(runtime: ImageRuntime, where: str) -> None:
    """The old image's failure: uid 10001 could not create its state directory. Now it says which, and stops
    (exit 3: a state file unusable, fail closed) without a traceback."""
    if not can_switch_user():
        pytest.skip("run as root to take the image's user: the current user may write where the image's could not")
    stage = runtime.stage
    state = runtime.host(stage.env[STATE_ENV])
    env = runtime.environment()
    cwd = runtime.host(stage.workdir)
    if where.startswith("state volume"):
        state.chmod(0o755)
        os.chown(state, 0, 0)
        expected = str(state)
    else:
        del env[STATE_ENV]  # the default `.controlplane`, relative to a directory the user cannot write: /
        cwd = Path("/")
        expected = "/.controlplane"
    result = runtime.run(stage.command, env=env, cwd=cwd, timeout=START_TIMEOUT)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 3, stderr
    assert expected in stderr and "Permission denied" in stderr, stderr
    assert "Traceback" not in stderr, stderr
