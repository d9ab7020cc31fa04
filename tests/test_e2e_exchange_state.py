"""The token exchange's rules that depend on state, end to end: `controlplane serve` with
`--deny-id-tokens-for 0`, a real Envoy, the fake GitLab's webhooks, and kill -9 restarts on one state directory.

- a subject token is exchanged only for the backend whose audience it carries (as Envoy checks it);
- a job GitLab reported finished gets no credential, even with no ID-token deny window;
- a credential issued before a crash is still revoked when its job finishes after the restart;
- the "3 exchanges per subject token" bound survives kill -9.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from tests.support.controlplane import ControlPlaneProcess
from tests.support.policy_parts import TTL_10M, backend, binding, documents, gateway, issuer, role
from tests.support.ports import poll_until
from tests.support.stack import EnvoySpec, PolicyInputs, Served, serve_exchange_stack

pytestmark = pytest.mark.e2e


def policy(given: PolicyInputs) -> str:
    """One binding over an exchanged backend (reports) and a raw-token one (billing)."""
    return documents(
        issuer(given.issuer),
        backend("reports-api", given.ports["reports"], extra="credentials: exchanged"),
        backend("billing-api", given.ports["billing"]),
        role("reports-read", "reports-api"),
        role("billing-read", "billing-api"),
        binding("deployer", ["reports-read", "billing-read"], "{project: 42, ref_protected: true}", extra=TTL_10M),
        gateway(given.listen_port, ["reports-api", "billing-api"]),
    )


@dataclass
class ExchangeStack(Served):
    exchange_host: ClassVar[str | None] = None  # the exchange's own port: one state, whichever route

    def crash_and_restart(self) -> None:
        """kill -9: no shutdown path runs; whatever was not on disk is gone."""
        proc = self.controlplane._proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        self.controlplane._proc = None
        self.controlplane.start()
        poll_until(lambda: self.exchange(self.subject(1)).status == 200, 20, message="exchange up again")


@pytest.fixture(scope="module")
def exchange_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExchangeStack]:
    root = tmp_path_factory.mktemp("exchange-state")
    with serve_exchange_stack(
        root,
        policy,
        kind=ExchangeStack,
        envoy=EnvoySpec("state-1", "exchange-state-envoy"),
        backends=("reports", "billing"),
        serve_args=("--deny-id-tokens-for", "0"),
    ) as built:
        yield built
    assert "eyJ" not in (root / "controlplane.log").read_text(), "a token was logged"


def test_a_token_for_billing_is_not_exchanged_for_reports(exchange_stack: ExchangeStack) -> None:
    for_billing = exchange_stack.subject(501, aud="https://billing.local")
    poll_until(lambda: exchange_stack.call("billing.local", for_billing) == 200, 10, message="billing token on billing")
    assert exchange_stack.call("reports.local", for_billing) in (401, 403)  # Envoy refuses it on reports...
    refused = exchange_stack.exchange(for_billing, audience="reports-api")  # ...so the exchange must too
    assert (refused.status, refused.json()["error"]) == (400, "invalid_grant"), refused.text
    granted = exchange_stack.exchange(for_billing, audience="billing-api")  # for its own backend it is exchanged
    assert granted.status == 200, granted.text
    assert exchange_stack.call("billing.local", granted.json()["access_token"]) == 200


def test_a_job_finished_before_its_first_exchange_gets_no_credential(exchange_stack: ExchangeStack) -> None:
    minted_while_running = exchange_stack.subject(502)
    exchange_stack.job_finished(502)
    refused = exchange_stack.exchange(minted_while_running)
    assert (refused.status, refused.json()["error"]) == (400, "invalid_grant"), refused.text
    assert "finished" in refused.json()["error_description"]
    assert exchange_stack.exchange(exchange_stack.subject(503)).status == 200  # a running job is not affected


def test_a_credential_from_before_a_crash_is_revoked_when_its_job_finishes(exchange_stack: ExchangeStack) -> None:
    granted = exchange_stack.exchange(exchange_stack.subject(504))
    assert granted.status == 200, granted.text
    credential = granted.json()["access_token"]
    assert exchange_stack.call("reports.local", credential) == 200
    exchange_stack.crash_and_restart()
    poll_until(
        lambda: exchange_stack.call("reports.local", credential) == 200, 10, message="credential valid after restart"
    )
    exchange_stack.job_finished(504)  # --deny-id-tokens-for 0: the deny entry lasts as long as the credential
    poll_until(lambda: exchange_stack.call("reports.local", credential) == 403, 5, interval=0.02, message="revoked")
    assert exchange_stack.exchange(exchange_stack.subject(504)).status == 400


def test_the_replay_bound_survives_kill_9(exchange_stack: ExchangeStack) -> None:
    subject = exchange_stack.subject(505)
    assert [exchange_stack.exchange(subject).status for _ in range(3)] == [200, 200, 200]
    exchange_stack.crash_and_restart()
    replay = exchange_stack.exchange(subject)
    assert (replay.status, replay.json()["error"]) == (400, "invalid_grant"), replay.text
    assert "too many times" in replay.json()["error_description"]


def test_a_damaged_exchange_state_file_stops_serve_with_a_clear_error(tmp_path: Path) -> None:
    """Starting with an empty replay count and no finished jobs would hand out what the file refused."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "exchange.sqlite3").write_bytes(b"\x00damaged\xff" * 600)
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "gateway.yaml").write_text("kind: Gateway\nname: gw\nlisten: {port: 10000}\nbackends: []\n")
    cp = ControlPlaneProcess(tmp_path / "policy", extra_args=("--state-dir", str(state)), log_path=tmp_path / "cp.log")
    cp.start(wait_ready=False)
    proc = cp._proc
    assert proc is not None
    assert proc.wait(30) == 3
    log = cp.log_text()
    assert "refusing to start" in log and str(state / "exchange.sqlite3") in log and "Traceback" not in log
