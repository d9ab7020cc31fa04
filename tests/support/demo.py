"""`make demo`: the quickstart example, live, on this machine.

Starts a fake GitLab (OIDC discovery, JWKS, token minting) on :8090, two echo backends on :8081 and
:8082, `controlplane serve` on examples/quickstart (xDS :18000, admin :9902) and a real Envoy
(listener :10000) bootstrapped by `controlplane bootstrap`. Prints curl commands; Ctrl-C stops all.
The ports are the ones examples/quickstart names.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from controlplane.cli.bootstrap import render_bootstrap
from tests.support.backends import EchoBackend, http_request
from tests.support.controlplane import ControlPlaneProcess
from tests.support.envoy import EnvoyProcess
from tests.support.fake_gitlab import FakeGitLab
from tests.support.ports import LOOPBACK, poll_until

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "examples" / "quickstart"
STATE = ROOT / ".demo"
# serve's --state-dir: signing keys, revocations, remembered ids and the audit trail, which the README's
# `controlplane audit --state-dir .demo/state` reads (and `make clean` removes with the rest of .demo/).
SERVE_STATE = STATE / "state"
LISTENER = f"http://{LOOPBACK}:10000"
DEPLOYER = {"project_id": 42, "project_path": "acme/platform/deployer", "namespace_id": 11}
FRONTEND = {"project_id": 43, "project_path": "acme/web/frontend", "namespace_id": 12}


def _tokens(gitlab: FakeGitLab) -> dict[str, str]:
    hour = 3600
    return {
        "ALLOWED_TOKEN": gitlab.mint(aud="https://reports.local", ttl=hour, job_id=1001, **DEPLOYER),
        "DENIED_TOKEN": gitlab.mint(aud="https://reports.local", ttl=hour, job_id=1002, **FRONTEND),
        "DEPLOY_TOKEN": gitlab.mint(aud="https://deploy.local", ttl=hour, job_id=1003, **DEPLOYER),
        "FEATURE_BRANCH_TOKEN": gitlab.mint(
            aud="https://deploy.local", ttl=hour, job_id=1004, ref="feature-x", ref_protected=False, **DEPLOYER
        ),
    }


def _write_tokens(tokens: dict[str, str]) -> Path:
    path = STATE / "tokens.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"export {name}={value}\n" for name, value in tokens.items())
    return path


def _check(tokens: dict[str, str]) -> list[str]:
    cases = [
        ("200", "reports.local", "GET", "/reports/2026", "ALLOWED_TOKEN", "deployer reads reports (protected main)"),
        ("403", "reports.local", "GET", "/reports/2026", "DENIED_TOKEN", "frontend has no binding on reports"),
        ("401", "reports.local", "GET", "/reports/2026", None, "no token"),
        ("200", "deploy.local", "POST", "/deployments/prod", "DEPLOY_TOKEN", "deploy from protected main on push"),
        ("403", "deploy.local", "POST", "/deployments/prod", "FEATURE_BRANCH_TOKEN", "deploy from a feature branch"),
    ]
    lines = []
    for expected, host, method, path, token, why in cases:
        headers = {"Host": host}
        if token:
            headers["Authorization"] = f"Bearer {tokens[token]}"
        got = http_request(LISTENER + path, method=method, headers=headers).status
        auth = f' -H "Authorization: Bearer ${token}"' if token else ""
        verb = "" if method == "GET" else f" -X {method}"
        mark = "ok " if str(got) == expected else "!! "
        lines.append(f"{mark}# {expected}: {why} (just now: {got})")
        lines.append(f"    curl -s -o /dev/null -w '%{{http_code}}\\n'{verb} -H 'Host: {host}'{auth} {LISTENER}{path}")
    return lines


def controlplane() -> ControlPlaneProcess:
    return ControlPlaneProcess(
        POLICY, xds_port=18000, admin_port=9902, log_path=STATE / "controlplane.log", state_dir=SERVE_STATE
    )


def main() -> int:
    STATE.mkdir(exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with (
            FakeGitLab(port=8090) as gitlab,
            EchoBackend("reports-api", port=8081),
            EchoBackend("deploy-api", port=8082),
            controlplane() as cp,
        ):
            bootstrap = render_bootstrap(group="ci-gateway", node_id="demo-envoy", xds_host=LOOPBACK, xds_port=18000)
            with EnvoyProcess(bootstrap, name="demo-envoy", workdir=STATE / "envoy", keep_workdir=True) as envoy:
                poll_until(
                    lambda: http_request(LISTENER + "/healthz", headers={"Host": "reports.local"}).status == 200,
                    20,
                    message="Envoy serving the quickstart policy",
                )
                tokens = _tokens(gitlab)
                token_file = _write_tokens(tokens)
                print(f"\ncontrolplane demo: policy {POLICY.relative_to(ROOT)}, gateway group ci-gateway\n")
                print(f"  Envoy listener   {LISTENER}   (admin {envoy.admin_url})")
                print(f"  control plane    xDS 127.0.0.1:18000, admin {cp.admin_url}  (log: .demo/controlplane.log)")
                print(f"  fake GitLab      {gitlab.issuer}  (JWKS {gitlab.jwks_uri})\n")
                print(f"Load the demo tokens (valid 1 h, file mode 600), then try:\n\n    source {token_file}\n")
                print("\n".join(_check(tokens)))
                print(
                    "\nMore: `.venv/bin/controlplane status`, "
                    "`.venv/bin/controlplane audit --state-dir .demo/state --since 1h` (what the requests did), "
                    f"`curl {cp.admin_url}/metrics`, edit examples/quickstart/*.yaml and watch it apply."
                )
                print("Ctrl-C stops every process.\n")
                while not stop.wait(0.5):
                    if not cp.running or not envoy.running:
                        print("a demo process exited unexpectedly; see .demo/", file=sys.stderr)
                        return 1
    except OSError as error:
        print(f"demo: {error} (is another demo, or something else, using ports 8081/8082/8090/9902/10000/18000?)")
        return 1
    print("stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
