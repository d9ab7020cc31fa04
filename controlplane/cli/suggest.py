"""`controlplane suggest POLICY`: least-privilege Roles and Bindings from what CI jobs really did.

Read-only: it reads the policy directory, the audit trail (read-only SQLite connection, or one read-only
PostgreSQL session, as `controlplane audit`), and with a GitLab token (`--gitlab-token-env`/`--gitlab-token-file`,
never argv; `read_api` is enough) the projects' `.gitlab-ci.yml` and ref protections. It writes only where it is
told: stdout, `--out DIR` (the patched policy tree, which must not exist yet) and `--diff FILE`. The analysis is
controlplane.assistant's (pure, deterministic); docs/policy-assistant.md lists its rules and limits.

Exit codes: 0 done, 1 an input cannot be read (the trail, GitLab, an invalid policy), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from controlplane.assistant.ci_config import CiConfig, load_ci_config
from controlplane.assistant.propose import (
    Inputs,
    Observation,
    ShadowSeen,
    observation,
    patched_tree,
    render_yaml,
    shadow_matches,
    suggest,
    text_lines,
    unified_diff,
)
from controlplane.assistant.propose import document as report_document
from controlplane.audit.store import open_readonly, record_filter
from controlplane.cli.audit import _query_postgres, parse_since
from controlplane.cli.trail import add_trail_arguments, trail_db, trail_dsn
from controlplane.model.errors import PolicyInvalid
from controlplane.model.policy import IssuerKind, Policy
from controlplane.sources.policy_dir import ReadLimits
from controlplane.store.dsn import DsnError

EXIT_OK = 0
EXIT_UNREADABLE = 1
EXIT_USAGE = 2
DEFAULT_MAX_RECORDS = 1_000_000
DAY = 86_400.0
MAX_LOG_LINE = 64 * 1024


class SuggestError(Exception):
    """An input that cannot be read; the message names it, never a secret."""


class SuggestUsage(SuggestError):
    """Arguments that do not say where to read (no GitLab URL or token source, a DSN source missing or given with
    a password): exit 2, as `audit` and `report` treat the same arguments."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 done, 1 an input cannot be read (the trail, GitLab, an invalid policy), 2 usage error. "
        "Read-only: it writes only stdout, --out and --diff. Rules and limits: docs/policy-assistant.md."
    )
    parser.add_argument("policy", type=Path, help="the current policy directory")
    parser.add_argument("--since", default="30d", help="observations since (30d, 12h, or an ISO time; default 30d)")
    parser.add_argument(
        "--unused-days", type=int, default=30, help="a granted rule unused this many days is flagged (default 30)"
    )
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")
    parser.add_argument("--out", type=Path, help="write the patched policy tree here (a new directory)")
    parser.add_argument("--diff", type=Path, help="write a unified diff of the policy tree to this file")
    parser.add_argument(
        "--project", action="append", default=[], help="a project (path or id) whose CI to read; repeatable"
    )
    parser.add_argument("--gitlab-url", help="GitLab base URL (default: the GitLab issuer's api url, else its url)")
    parser.add_argument("--gitlab-token-env", help="environment variable holding a read_api token")
    parser.add_argument("--gitlab-token-file", help="file holding a read_api token")
    parser.add_argument("--no-gitlab", action="store_true", help="do not read GitLab (no CI, no protections)")
    parser.add_argument(
        "--access-log",
        action="append",
        type=Path,
        default=[],
        help="a gateway's JSON access log (file), for what shadow bindings would have matched; repeatable",
    )
    parser.add_argument("--max-records", type=int, default=DEFAULT_MAX_RECORDS, help="audit records read at most")
    add_trail_arguments(parser)


def run_suggest(args: argparse.Namespace, limits: ReadLimits) -> int:
    if args.out is not None and (args.out.exists() or args.out.is_symlink()):
        print(f"controlplane suggest: --out {args.out}: exists (give a new directory)", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    try:
        since = parse_since(args.since, now)
    except ValueError as error:
        print(f"controlplane suggest: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.unused_days < 1 or args.max_records < 1:
        print("controlplane suggest: --unused-days and --max-records must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    unused_days = min(args.unused_days, max(1, math.ceil((now - since) / DAY)))
    if unused_days < args.unused_days:
        print(
            f"note: the trail is read since {args.since}: unused grants are judged on {unused_days} day(s)",
            file=sys.stderr,
        )
    try:
        files, policy, resolved = _load_policy(args.policy, limits)
        observations = _observations(args, since)
        ci, protected = ({}, {}) if args.no_gitlab else _gitlab(args, policy, observations)
        shadow = _shadow(args.access_log) if args.access_log else None
    except SuggestError as error:
        print(f"controlplane suggest: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, SuggestUsage) else EXIT_UNREADABLE
    given = Inputs(policy, resolved, observations, ci, protected, now=now, unused_days=unused_days, shadow=shadow)
    report = suggest(given)
    tree = patched_tree(files, report)
    patch = unified_diff(files, tree)
    if args.out is not None:
        try:
            _write_tree(args.out, tree)
        except OSError as error:
            print(f"controlplane suggest: --out {args.out}: {error.strerror or type(error).__name__}", file=sys.stderr)
            return EXIT_USAGE
    if args.diff is not None:
        args.diff.write_text(patch)
    if args.format == "json":
        out = {**report_document(report), "yaml": render_yaml(report), "diff": patch}
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print("\n".join(text_lines(report)))
        print()
        print(render_yaml(report), end="")
    return EXIT_OK


def _load_policy(root: Path, limits: ReadLimits) -> tuple[dict[str, str], Policy, Any]:
    from controlplane.model.loader import parse_policy
    from controlplane.resolved.index import Resolution
    from controlplane.sources.policy_dir import read_policy_dir

    try:
        files = read_policy_dir(root, limits)
        policy = parse_policy(files)
        return files, policy, Resolution().update(policy)
    except PolicyInvalid as invalid:
        for line in invalid.lines():
            print(line, file=sys.stderr)
        raise SuggestError(f"{root}: invalid policy ({invalid.total} error(s))") from None


def _observations(args: argparse.Namespace, since: float) -> list[Observation]:
    """The trail's records since `since` (the most recent `--max-records`) as observations. From SQLite they are
    streamed from a cursor, only the columns read, repeated strings shared: a million records was a million
    dicts of 22 columns (about 2 GB); now a few hundred MB."""
    try:
        dsn = trail_dsn(args)
    except DsnError as error:
        raise SuggestUsage(str(error)) from None
    if dsn is not None:
        try:
            rows = asyncio.run(_query_postgres(dsn, None, None, since, args.max_records))
        except Exception as error:  # never the DSN: only its redacted form
            raise SuggestError(f"cannot read the trail at {dsn.redacted()}: {type(error).__name__}") from None
        return [observation(row) for row in rows]
    db = trail_db(args)
    try:
        conn = open_readonly(db)
        try:
            return _streamed(conn, since, args.max_records)
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as error:
        raise SuggestError(f"cannot read {db}: {error}") from None


OBSERVED_COLUMNS = tuple(Observation.__dataclass_fields__)


def _streamed(conn: sqlite3.Connection, since: float, limit: int) -> list[Observation]:
    """`query_records`' selection (the most recent `limit` since `since`), without building a dict per row."""
    clause, params = record_filter(None, None, since, "?")
    present = {str(row[1]) for row in conn.execute("PRAGMA table_info(audit)")}
    # NULL for a column an older serve's file does not have yet (selected_columns' rule, for these columns)
    listed = ", ".join(c if c in present else f"NULL AS {c}" for c in OBSERVED_COLUMNS)
    sql = f"SELECT {listed} FROM audit {clause} ORDER BY time DESC, id DESC LIMIT ?"
    shared: dict[Any, Any] = {}
    out = []
    for row in conn.execute(sql, (*params, max(0, limit))):
        values = [row[0], *(shared.setdefault(v, v) for v in tuple(row)[1:])]
        out.append(Observation(*values))
    out.reverse()  # oldest first, as query_records gives them
    return out


def _gitlab(
    args: argparse.Namespace, policy: Policy, observations: list[Observation]
) -> tuple[dict[str, CiConfig], dict[str, dict[str, bool]]]:
    from controlplane.sources.gitlab import GitLabSource
    from controlplane.sources.gitlab_ci import ci_project
    from controlplane.sources.gitlab_client import GitLabTokenError, GitLabUnavailable, token_from

    issuers = [i for i in policy.issuers if i.kind is IssuerKind.GITLAB]
    api = issuers[0].api if len(issuers) == 1 else None
    url = args.gitlab_url or (api.url if api is not None else issuers[0].url if len(issuers) == 1 else None)
    token_env = args.gitlab_token_env or (api.token_env if api is not None and not args.gitlab_token_file else None)
    token_file = args.gitlab_token_file or (api.token_file if api is not None and not args.gitlab_token_env else None)
    if url is None:
        raise SuggestUsage("no GitLab to read: give --gitlab-url (or --no-gitlab)")
    shown = _without_userinfo(url)
    if token_env is None and token_file is None:
        raise SuggestUsage(
            "no GitLab API token: give --gitlab-token-env NAME or --gitlab-token-file PATH (or the GitLab issuer's "
            "api: token_env/token_file; or --no-gitlab)"
        )
    try:
        source = GitLabSource(url, token_from(token_env, token_file))
    except GitLabTokenError as error:
        raise SuggestError(f"{error} (or --no-gitlab)") from None  # a variable not set, a file unreadable
    ci: dict[str, CiConfig] = {}
    protected: dict[str, dict[str, bool]] = {}
    try:
        for ref in _projects(args, policy, observations):
            project = ci_project(source, ref)
            if project is None or str(project.id) in ci:
                continue
            ci[str(project.id)] = load_ci_config(
                project.path,
                project.read,
                default_branch=project.default_branch,
                max_file_bytes=project.max_file_bytes,
                ci_file=project.ci_config_path,
            )
            protected[str(project.id)] = project.protected
    except GitLabUnavailable as error:
        raise SuggestError(f"GitLab at {shown}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # an answer not shaped as GitLab's
        raise SuggestError(f"GitLab at {shown}: an answer not shaped as GitLab's ({type(error).__name__})") from None
    return ci, protected


def _without_userinfo(url: str) -> str:
    """The URL as shown in a message: a `user:password@` in it is a credential, never printed."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def _projects(args: argparse.Namespace, policy: Policy, observations: list[Observation]) -> list[str | int]:
    """--project, or the projects the policy's GitLab subjects name and those observed, ids first, each once."""
    if args.project:
        return [int(p) if p.isdigit() else p for p in args.project]
    named: set[str | int] = {o.project_id for o in observations if o.project_id}
    for binding in policy.bindings:
        if policy.issuer(binding.issuer).kind is IssuerKind.GITLAB:
            named.update(ref for subject in binding.subjects for ref in subject.projects)
    as_ids = {int(r) if isinstance(r, str) and r.isdigit() else r for r in named}
    return sorted(as_ids, key=lambda r: (isinstance(r, str), str(r).zfill(20) if isinstance(r, int) else r))


def _shadow(paths: list[Path]) -> dict[str, ShadowSeen]:
    """Every line of every access log, read as text, bounded per line; a file that cannot be read stops it."""

    def lines() -> Iterator[str]:
        for path in paths:
            try:
                with path.open(encoding="utf-8", errors="replace") as handle:
                    yield from _bounded_lines(handle)
            except OSError as error:
                raise SuggestError(f"cannot read {path}: {error.strerror or type(error).__name__}") from None

    return shadow_matches(lines())


def _bounded_lines(handle: TextIO) -> Iterator[str]:
    """The file's lines, each read `MAX_LOG_LINE` characters at most: a line longer than that (a file with no
    line break, gigabytes long) is yielded cut and the rest skipped, never held whole."""
    while line := handle.readline(MAX_LOG_LINE):
        yield line
        while not line.endswith("\n") and (line := handle.readline(MAX_LOG_LINE)):
            pass


def _write_tree(root: Path, tree: dict[str, str]) -> None:
    """A new directory (`mkdir` without exist_ok: one made meanwhile, or a symbolic link, even dangling, is
    refused rather than written through), its files created exclusively ("x"): nothing outside it is touched."""
    root.mkdir()
    for name, text in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as handle:
            handle.write(text)
