"""Replacing a backend under load: traffic from a thread while the policy moves a host to a new backend, and the
checks that no request failed across the move. Used by the Delta make-before-break test and by the one-change
swap that runs on both xDS protocols.
"""

from __future__ import annotations

import threading

from .ports import poll_until
from .stack import Stack

REPLACEMENT = """\
kind: Backend
name: reports-v2
hosts: [{host}]
audience: https://reports.local
endpoints: [{{address: 127.0.0.1, port: {port}}}]
public_paths: [/healthz]
"""


class Traffic:
    """Requests back to back from a thread while the policy changes: every answer is recorded."""

    def __init__(self, stack: Stack, token: str) -> None:
        self.answers: list[tuple[int, str]] = []
        self._stack, self._token = stack, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            response = self._stack.request("reports.local", "/r", self._token)
            backend = response.json().get("backend", "") if response.status == 200 else response.text
            self.answers.append((response.status, backend))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def served_by(self, backend: str) -> bool:
        return any(answer == (200, backend) for answer in self.answers[-3:])

    def wait_for_the_replacement(self) -> None:
        """The replacement answers the traffic and the replaced backend's cluster has left Envoy."""
        poll_until(lambda: self.served_by("reports-v2"), 10, message="the replacement answers")
        poll_until(lambda: "backend-reports-api" not in self._stack.envoy_clusters(), 10, message="old cluster gone")

    def wait_for_the_original(self) -> None:
        """After the policy is restored: the replacement's cluster is gone and the original backend serves."""
        stack = self._stack
        poll_until(lambda: "backend-reports-v2" not in stack.envoy_clusters(), 10, message="replacement removed")
        stack.wait_status("reports.local", "/r", stack.token(), 200)

    def assert_none_failed(self, cds_rejected: int) -> None:
        """Every request answered 200, from both backends, and Envoy rejected no cluster update since."""
        failures = [a for a in self.answers if a[0] != 200]
        assert not failures, f"{len(failures)} of {len(self.answers)} requests failed: {failures[:5]}"
        assert {b for status, b in self.answers if status == 200} == {"reports", "reports-v2"}
        assert self._stack.envoy.stats().get("cluster_manager.cds.update_rejected", 0) == cds_rejected
