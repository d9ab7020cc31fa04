"""A policy repository in git, as the merge-request check and `controlplane diff` tests build it, and the policy
texts they share: the grant a merge request adds (the frontend project reading reports) and a reports backend
with its read role, so each suite says only what differs."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

# The binding a merge request adds in these suites; GRANT pins protected refs too.
FRONTEND_READS_REPORTS = """kind: Binding
name: frontend-reads-reports
issuer: gitlab
roles: [reports-read]
subjects:
  - project: acme/web/frontend
"""
GRANT = FRONTEND_READS_REPORTS + "    ref_protected: true\n"

# A reports backend on loopback and the role that reads it (documents to join with an issuer and more).
REPORTS_READ = """kind: Backend
name: reports-api
hosts: [reports.local]
audience: https://reports.local
endpoints:
  - {address: 127.0.0.1, port: 8081}
---
kind: Role
name: reports-read
backend: reports-api
rules:
  - methods: [GET]
    paths: ["/**"]
"""


def live_issuer(url: str, *, api: str | None = None, token_env: str = "POLICY_READ_TOKEN") -> str:
    """A GitLab issuer read live through its API (`api.url` only when given), its token in `token_env`."""
    api_url = f"  url: {api}\n" if api is not None else ""
    return f"kind: Issuer\nname: gitlab\ntype: gitlab\nurl: {url}\napi:\n{api_url}  token_env: {token_env}\n"


def git(repo: Path, *args: str) -> str:
    """git in `repo` with a fixed author; its output, stripped. A failure raises, with git's stderr kept."""
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def commit(repo: Path, message: str, files: Mapping[str, str | None]) -> str:
    """Write each of `files` (a path under `repo`; None deletes it), commit everything, and return the new head."""
    for name, text in files.items():
        path = repo / name
        if text is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def init_main(repo: Path, *, branch: str | None = None) -> str:
    """`repo` (its files already written) as a repository whose main branch has one commit, `base`; then checked
    out on a new `branch` when one is named. Returns the base commit."""
    git(repo, "init", "-q", "-b", "main")
    base = commit(repo, "base", {})
    if branch is not None:
        git(repo, "checkout", "-q", "-b", branch)
    return base
