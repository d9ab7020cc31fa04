"""The control plane as users run it: `python -m controlplane serve` in its own process.

Tests and the demo drive it from outside (admin HTTP, signals), so a restart is a real restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from .backends import http_request
from .ports import LOOPBACK, free_port, poll_until


class ControlPlaneProcess:
    def __init__(
        self,
        policy: Path,
        *,
        xds_port: int | None = None,
        admin_port: int | None = None,
        log_level: str = "INFO",
        extra_args: tuple[str, ...] = (),
        log_path: Path | None = None,
        inherit_output: bool = False,
        env: Mapping[str, str] | None = None,
        open_files: int | None = None,
        state_dir: Path | None = None,
    ) -> None:
        """`state_dir`: serve's --state-dir, kept as it is; without one, a temp dir this instance removes."""
        self.policy = policy
        self.xds_port = xds_port or free_port()
        self.admin_port = admin_port or free_port()
        self.log_level = log_level
        self.extra_args = extra_args
        self.inherit_output = inherit_output
        self.env = dict(env or {})  # secrets go through the environment, never argv
        self.open_files = open_files  # soft and hard RLIMIT_NOFILE of the child, to reproduce fd exhaustion
        self.exchange_port = free_port()
        self._state_dir: Path | None = state_dir
        self._remove_state: weakref.finalize[[str], None] | None = None
        if log_path is None:
            fd, made_log = tempfile.mkstemp(prefix="controlplane-", suffix=".log")
            os.close(fd)
            log_path = Path(made_log)
            weakref.finalize(self, log_path.unlink, True)  # missing_ok
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        policy = [] if "--policy-project" in self.extra_args else ["--policy", str(self.policy)]
        if not {"--exchange-address", "--no-exchange"} & set(self.extra_args):
            policy += ["--exchange-address", f"{LOOPBACK}:{self.exchange_port}"]
        if "--state-dir" not in self.extra_args:
            policy += ["--state-dir", str(self.state_dir)]
        return [
            sys.executable, "-m", "controlplane", "--log-level", self.log_level, "serve",
            *policy,
            "--xds-address", f"{LOOPBACK}:{self.xds_port}",
            "--admin-address", f"{LOOPBACK}:{self.admin_port}",
            *self.extra_args,
        ]  # fmt: skip

    @property
    def state_dir(self) -> Path:
        """One per instance, kept across stop/start (a restart must find its keys and remembered ids)."""
        if self._state_dir is None:
            made = tempfile.mkdtemp(prefix="controlplane-state-")
            self._state_dir = Path(made)
            # Removed by `close` (the `with` block's end), or when the instance goes or the interpreter exits
            # for users of start/stop alone: never left behind in /tmp.
            self._remove_state = weakref.finalize(self, shutil.rmtree, made, True)
        return self._state_dir

    def close(self) -> None:
        """Stop, and remove the temp state dir this instance made (a given `state_dir` is kept)."""
        self.stop()
        if self._remove_state is not None:
            self._remove_state()
            self._remove_state, self._state_dir = None, None

    def start(self, *, wait_ready: bool = True, timeout: float = 30.0) -> Self:
        # A second start would lose the first process (`with cp.start():` starts twice): it outlived the suite,
        # and /readyz answered by the first made the second look ready.
        assert not self.running, "already started: `with cp:` starts it, `cp.start()` too, not both"
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        limit = self._limit_open_files if self.open_files is not None else None
        if self.inherit_output:
            self._proc = subprocess.Popen(self.command(), env=env, preexec_fn=limit)
        else:
            with self.log_path.open("ab") as log:
                self._proc = subprocess.Popen(
                    self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit
                )
        if wait_ready:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()  # never ready: a `with` block's exit will not run, so nothing else would stop it
                raise
        return self

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.running:
                raise AssertionError(f"controlplane exited early:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError):
                return http_request(f"{self.admin_url}/readyz", timeout=1.0).status == 200
            return False

        poll_until(ready, timeout, interval=0.02, message="controlplane /readyz")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(5)
        return proc.returncode

    def kill(self) -> int:
        """SIGKILL, as a crashed pod or an OOM kill ends it: no graceful shutdown, no goodbye to its streams."""
        proc, self._proc = self._proc, None
        assert proc is not None, "not running"
        proc.kill()
        return proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    def status(self, query: str = "") -> dict[str, Any]:
        response = http_request(f"{self.admin_url}/status{query}")
        assert response.status == 200, response.text
        return dict(json.loads(response.body))

    def metrics(self) -> str:
        return http_request(f"{self.admin_url}/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample, 0.0 when absent."""
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            sample, _, label_text = series.partition("{")
            if sample == name and ",".join(sorted(label_text.rstrip("}").split(","))) == wanted:
                return float(value)
        return 0.0

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
