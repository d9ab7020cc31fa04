"""Injected upstream credentials: read where the policy says (environment or file), follow file changes.

The policy names only where each backend's secret lives; the value is read here, at run time, and goes to
Envoy over SDS. Files are polled by mtime (and inode and size, so an atomic rename of a same-second write is
seen too): secret managers and Kubernetes projected volumes replace files by rename, which inotify-based
watchers on the file itself miss. Values are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType

from controlplane.model.policy import Injection, Policy
from controlplane.sources.policy_dir import read_regular_file

log = logging.getLogger("controlplane.secrets")

MAX_SECRET_BYTES = 64 * 1024
"""A credential put into a header: a few KB at most (a JWT); anything larger is not one."""

_FileStamp = tuple[int, int, int] | None  # (inode, size, mtime_ns); None: unreadable


def read_secret(injection: Injection, environ: Mapping[str, str] = os.environ) -> str | None:
    """The value, stripped of surrounding whitespace (files usually end with a newline); None when it cannot be
    read, is empty, or holds control characters (it becomes a header value: no header splitting)."""
    try:
        if injection.secret_env is not None:
            value = environ.get(injection.secret_env, "")
        elif injection.secret_file is not None:
            data = read_regular_file(injection.secret_file, MAX_SECRET_BYTES)  # never blocks: read in a reload
            if isinstance(data, str):
                log.warning("cannot read secret file %s: %s", injection.secret_file, data)
                return None
            value = data.decode("utf-8")
        else:
            return None
    except (OSError, UnicodeDecodeError) as error:
        log.warning("cannot read secret file %s: %s", injection.secret_file, type(error).__name__)
        return None
    value = value.strip()
    if not value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        log.warning("secret %s is empty or holds control characters; not injected", _where(injection))
        return None
    return value


def read_secrets(policy: Policy, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Backend name → secret for every backend with an injection whose secret could be read."""
    values = {}
    for backend in policy.backends:
        if backend.inject is not None and (value := read_secret(backend.inject, environ)) is not None:
            values[backend.name] = value
    return values


class SecretsSource:
    """The secrets of the policy in service, re-read when their files change; a change calls `on_change`
    (which recompiles, so only the Secret resources change and Envoy gets an SDS push, nothing else)."""

    def __init__(
        self,
        on_change: Callable[[], Awaitable[object]],
        *,
        interval: float = 1.0,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._on_change = on_change
        self._interval = interval
        self._environ = environ
        self._injections: Mapping[str, Injection] = MappingProxyType({})
        self._stamps: dict[str, _FileStamp] = {}
        self.current: Mapping[str, str] = MappingProxyType({})

    def for_policy(self, policy: Policy) -> Mapping[str, str]:
        """Read the secrets `policy` declares and follow them from now on (the PolicyService's `secrets`)."""
        injections = {b.name: b.inject for b in policy.backends if b.inject is not None}
        stamps = {name: _stamp(i.secret_file) for name, i in injections.items() if i.secret_file is not None}
        values = read_secrets(policy, self._environ)
        self._injections, self._stamps = MappingProxyType(injections), stamps
        self.current = MappingProxyType(values)
        return self.current

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the files until `stop`; a changed file whose value differs triggers one recompile."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
            except TimeoutError:
                await self._check()

    async def _check(self) -> None:
        files = {n: i.secret_file for n, i in self._injections.items() if i.secret_file is not None}
        stamps = await asyncio.to_thread(lambda: {name: _stamp(path) for name, path in files.items()})
        changed = sorted(n for n, s in stamps.items() if self._stamps.get(n) != s)
        if not changed:
            return
        self._stamps.update(stamps)
        values = await asyncio.to_thread(lambda: {n: read_secret(self._injections[n], self._environ) for n in changed})
        if all(self.current.get(n) == v for n, v in values.items()):
            return  # touched or rewritten with the same value: nothing to push
        log.info("backend secret changed: %s", ", ".join(changed))
        await self._on_change()


def _stamp(path: str) -> _FileStamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _where(injection: Injection) -> str:
    return f"env {injection.secret_env}" if injection.secret_env else f"file {injection.secret_file}"
