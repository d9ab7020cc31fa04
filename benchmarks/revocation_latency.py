"""Job finished → a real Envoy denying its credential: the revocation latency.

Method: fake GitLab, an echo backend, `controlplane serve` (token exchange + webhooks) and a real Envoy on
loopback. For each of N jobs: exchange the job's ID token for a credential through the gateway, check it gets
200, then deliver GitLab's Job Hook (`build_status: success`) with its real headers and poll the backend through
Envoy every 2 ms until the credential gets 403. Reported: webhook delivery → 403 at Envoy.

Baseline in the same run: the time until the control plane acknowledged the webhook (its HTTP response),
which already includes the recompile; the difference is the push to Envoy and Envoy applying it.
Target (issue #4): denied within 1 s.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controlplane.cli.bootstrap import render_bootstrap  # noqa: E402
from controlplane.model.credentials import EXCHANGE_PATH  # noqa: E402
from tests.support.backends import EchoBackend, http_request  # noqa: E402
from tests.support.controlplane import ControlPlaneProcess  # noqa: E402
from tests.support.envoy import EnvoyProcess  # noqa: E402
from tests.support.fake_gitlab import FakeGitLab  # noqa: E402
from tests.support.gitlab_hooks import deliver  # noqa: E402
from tests.support.ports import LOOPBACK, free_port, poll_until  # noqa: E402

POLICY = """\
kind: Issuer
name: gitlab
type: gitlab
url: {issuer}
---
kind: Backend
name: reports-api
hosts: [reports.local]
credentials: exchanged
endpoints: [{{address: 127.0.0.1, port: {backend_port}}}]
---
kind: Role
name: reports-read
backend: reports-api
rules: [{{methods: [GET]}}]
---
kind: Binding
name: jobs-read-reports
roles: [reports-read]
subjects: [{{project: 42}}]
---
kind: Gateway
name: bench
listen: {{address: 127.0.0.1, port: {listen_port}}}
backends: [reports-api]
access_log: /dev/null
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeGitLab() as gitlab, EchoBackend("reports") as backend:
        policy, listen_port, hook_port = Path(tmp), free_port(), free_port()
        (policy / "policy.yaml").write_text(
            POLICY.format(issuer=gitlab.issuer, backend_port=backend.port, listen_port=listen_port)
        )
        secret = secrets.token_urlsafe(24)
        hooks = ("--webhook-address", f"{LOOPBACK}:{hook_port}", "--webhook-secret-env", "HOOK_SECRET")
        with ControlPlaneProcess(policy, log_level="WARNING", extra_args=hooks, env={"HOOK_SECRET": secret}) as cp:
            target = gitlab.add_system_hook(f"http://{LOOPBACK}:{hook_port}/webhooks/gitlab", secret)
            boot = render_bootstrap(group="bench", node_id="bench-1", xds_host=LOOPBACK, xds_port=cp.xds_port)
            with EnvoyProcess(boot, name="revocation-bench"):
                url = f"http://{LOOPBACK}:{listen_port}"
                acked, denied = [], []
                for job in range(1000, 1000 + args.jobs):
                    subject = gitlab.mint(aud="https://reports.local", project_id=42, job_id=job, ttl=3600)
                    form = urlencode({
                        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                        "subject_token": subject,
                        "audience": "reports-api",
                    }).encode()  # fmt: skip
                    headers = {"Host": "reports.local", "Content-Type": "application/x-www-form-urlencoded"}
                    exchanged = poll_until(
                        lambda f=form, h=headers: (
                            (r := http_request(url + EXCHANGE_PATH, method="POST", headers=h, body=f)).status == 200
                            and r
                        ),
                        20,
                        message="exchange",
                    )
                    auth = {"Host": "reports.local", "Authorization": "Bearer " + exchanged.json()["access_token"]}
                    poll_until(lambda a=auth: http_request(url + "/r", headers=a).status == 200, 10, message="200")
                    payload = {"object_kind": "build", "build_id": job, "build_status": "success", "pipeline_id": 1,
                               "project_id": 42, "ref": "main"}  # fmt: skip
                    started = time.perf_counter()
                    deliver(target, "Job Hook", payload)
                    acked.append(time.perf_counter() - started)
                    poll_until(lambda a=auth: http_request(url + "/r", headers=a).status == 403, 10, interval=0.002)
                    denied.append(time.perf_counter() - started)
    for label, samples in (("webhook → 403 at Envoy", denied), ("baseline: webhook acknowledged", acked)):
        ms = sorted(s * 1000 for s in samples)
        p90 = ms[max(0, round(0.9 * len(ms)) - 1)]
        print(f"{label:<32} median {statistics.median(ms):6.1f} ms  p90 {p90:6.1f}  max {ms[-1]:6.1f}  n={len(ms)}")
    print(f"target: within 1000 ms: {'met' if max(denied) < 1.0 else 'NOT met'} (worst {max(denied) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
