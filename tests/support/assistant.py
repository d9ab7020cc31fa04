"""Trail observations and the example policy the proposer's tests share (tests/test_assistant_*.py)."""

from __future__ import annotations

from pathlib import Path

from controlplane.assistant.propose import Observation

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "gitlab-and-oidc"
GITLAB = "https://gitlab.example.com"
DAY = 86_400.0
NOW = 1_796_500_000.0  # 2026-12-05


def obs(path: str, *, method: str = "GET", job: str = "1", project: str = "3001", ref: str = "main",
         days_ago: float = 1, decision: str = "allowed", policy: str | None = "ci-reads-flags/flags-read",
         issuer: str = GITLAB) -> Observation:  # fmt: skip
    return Observation(NOW - days_ago * DAY, "feature-flags", method, path, decision, policy, project,
                       f"acme/p{project}", job, ref, issuer)  # fmt: skip
