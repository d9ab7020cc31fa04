"""Fixtures shared by the test modules: the real-process gateway stack of tests/support/stack.py.

A module that wants the stack asks for `stack`; it gets one of its own (module scope), so the policy changes
of one suite never leak into another. The xDS protocol Envoy speaks is the `protocol` fixture: SotW unless
the module overrides it, or parametrizes it to run the same tests on both.

A suite with a policy of its own builds its stack with the same `serve_stack`, in a fixture named for the suite
(`credentials_stack`, `gitlab_stack`, ...), so no module's `stack` means anything but the reference stack.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresServer, running_server
from tests.support.stack import Protocol, Stack, running_stack


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return "sotw"


@pytest.fixture(scope="module")
def stack(protocol: Protocol, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp(f"e2e-{protocol}"), protocol) as built:
        yield built


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL 18 server for the whole session (about half a second to start), stopped at the end."""
    with running_server() as server:
        yield server


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> Iterator[str]:
    """A DSN to a fresh, empty database of its own for one test, dropped after it."""
    with postgres.database() as dsn:
        yield dsn
