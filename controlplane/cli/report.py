"""``controlplane report --since 30d``: compliance evidence for a time window, as JSON, CSV or one HTML page.

This module does the reading (git, the audit store, the deny list, the signing keys) and the writing; what the
report says is assembled by controlplane/audit/report.py and written by audit/report_render.py, both pure. See
docs/compliance-report.md for what each section is built from and what is not recorded.

Read-only throughout: the audit store through a read-only connection (SQLite `mode=ro`, or a read-only
PostgreSQL transaction), the deny list and the signing keys' public fields only (a key's private part is never
taken from the file or selected from the table), the policy's history with `git log` and `git archive`.

Exit codes: 0 written, 1 a source could not be read or the output written, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit

from controlplane.audit.report import Inputs, PolicyVersion, Report, SigningKey, build, document
from controlplane.audit.report_render import render_csv, render_html
from controlplane.audit.store import open_readonly
from controlplane.cli.audit import parse_since
from controlplane.cli.trail import add_trail_arguments, read_only_session, trail_db, trail_dsn
from controlplane.cli.trail import state_dir as trail_state_dir
from controlplane.model.errors import PolicyInvalid
from controlplane.sources.policy_history import Commit, GitError, TreeUnreadable, history, tree_at
from controlplane.statefile import (
    DEFAULT_STATE_DIR,
    STATE_DIR_ENV,
    StateFileError,
    atomic_write_text,
    read_json,
)
from controlplane.store.dsn import DsnError, StoreDsn

if TYPE_CHECKING:
    from controlplane.audit.usage import Usage as AuditUsage
    from controlplane.sources.policy_dir import ReadLimits

# The state directory's files (credentials/keys.py KEYS_FILE, revocation_store.py REVOCATIONS_FILE), named here
# so that `controlplane --help` does not import the credentials layer (cryptography); a test holds them equal.
KEYS_FILE = "signing-keys.json"
REVOCATIONS_FILE = "revoked-jobs.json"

EXIT_OK = 0
EXIT_UNREADABLE = 1
EXIT_USAGE = 2
DEFAULT_MAX_ROWS = 500
DEFAULT_MAX_VERSIONS = 50
FORMATS = ("json", "csv", "html")
MAX_TIMESTAMP = 253_402_300_800.0  # 10000-01-01: the first time an ISO 8601 date cannot show


class Unreadable(Exception):
    """A source the report needs could not be read; the message names it (never a DSN's password)."""


class UsageError(Exception):
    """Arguments that do not go together, found while reading (a GitLab token source missing)."""


class StateRead(NamedTuple):
    usage: AuditUsage | None
    revocations: Mapping[str, float] | None
    keys: tuple[SigningKey, ...] | None
    audit_source: str
    state_source: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "exit status: 0 written, 1 a source cannot be read or the output written, 2 usage error. "
        "What each section is built from: docs/compliance-report.md."
    )
    parser.add_argument("--since", required=True, help="window start: a duration back from now (30d) or an ISO time")
    parser.add_argument("--until", help="window end, as --since (default: now)")
    parser.add_argument("--format", choices=FORMATS, default="json", help="json (default), csv or html")
    parser.add_argument(
        "--out", type=Path, help="file to write (json, html; default stdout), or the directory for csv (required)"
    )
    policy = parser.add_mutually_exclusive_group()
    policy.add_argument(
        "--policy-repo", type=Path, help="the policy directory in a git checkout: versions and their authors"
    )
    policy.add_argument("--policy", type=Path, help="a policy directory without history: access at the end only")
    policy.add_argument("--policy-project", help="the GitLab project (path or id) holding the policy, as serve's")
    parser.add_argument("--gitlab-url", help="GitLab base URL for --policy-project")
    parser.add_argument("--gitlab-token-env", help="environment variable holding a read_api token")
    parser.add_argument("--gitlab-token-file", help="file holding that token")
    parser.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS, help="rows per table at most, then 'N more'")
    parser.add_argument(
        "--max-versions", type=int, default=DEFAULT_MAX_VERSIONS, help="policy commits in the window loaded at most"
    )
    parser.add_argument("--no-audit", action="store_true", help="leave the audit trail out (policy sections only)")
    add_trail_arguments(
        parser,
        state_dir_help=f"serve's --state-dir: the audit store, deny list and keys (default: ${STATE_DIR_ENV} or "
        f"{DEFAULT_STATE_DIR})",
    )


def _fail(code: int, message: str) -> int:
    print(f"controlplane report: {message}", file=sys.stderr)
    return code


def run_report(args: argparse.Namespace, limits: ReadLimits) -> int:
    now = time.time()
    try:
        since = parse_since(args.since, now)
    except ValueError as error:
        return _fail(EXIT_USAGE, str(error))
    try:
        until = now if args.until is None else parse_since(args.until, now)
    except ValueError as error:  # parse_since's words name --since
        return _fail(EXIT_USAGE, str(error).replace("--since", "--until", 1))
    for flag, moment in (("--since", since), ("--until", until)):
        if not 0.0 <= moment < MAX_TIMESTAMP:  # `999999999d` is before year 1: no date could show it
            return _fail(EXIT_USAGE, f"{flag}: out of range (from 1970 to the year 9999)")
    if until <= since:
        return _fail(EXIT_USAGE, "the window is empty: --until must be after --since")
    if args.max_rows < 1 or args.max_versions < 1:
        return _fail(EXIT_USAGE, "--max-rows and --max-versions must be at least 1")
    if args.format == "csv" and args.out is None:
        return _fail(EXIT_USAGE, "--format csv writes one file per table: give --out DIRECTORY")
    try:
        dsn = trail_dsn(args)
    except DsnError as error:
        return _fail(EXIT_USAGE, str(error))
    try:
        versions, more, policy_source = _policy_versions(args, limits, since, until, now)
        state = _read_state(args, dsn, since, until)
    except UsageError as error:
        return _fail(EXIT_USAGE, str(error))
    except Unreadable as error:
        return _fail(EXIT_UNREADABLE, str(error))
    report = build(
        Inputs(
            since=since,
            until=until,
            generated=now,
            versions=versions,
            versions_more=more,
            policy_source=policy_source,
            usage=state.usage,
            audit_source=state.audit_source,
            revocations=state.revocations,
            keys=state.keys,
            state_source=state.state_source,
            cap=args.max_rows,
        )
    )
    try:
        _write(args.format, args.out, report)
    except OSError as error:
        return _fail(EXIT_UNREADABLE, f"cannot write {args.out}: {error.strerror or error}")
    except StateFileError as error:  # names the file and why
        return _fail(EXIT_UNREADABLE, str(error))
    return EXIT_OK


def _write(kind: str, out: Path | None, report: Report) -> None:
    """Each file written beside its final name and renamed over it (statefile.atomic_write_text): never through
    a link planted at that name (`--out /tmp/evidence`, a directory others can write), never half-written."""
    if kind == "csv":
        assert out is not None
        out.mkdir(parents=True, exist_ok=True)
        for name, text in render_csv(report).items():
            atomic_write_text(out / name, text, mode=None)
        return
    text = json.dumps(document(report), indent=2) + "\n" if kind == "json" else render_html(report)
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(out, text, mode=None)


# -- the policy


def _policy_versions(
    args: argparse.Namespace, limits: ReadLimits, since: float, until: float, now: float
) -> tuple[tuple[PolicyVersion, ...], int, str]:
    if args.policy is not None:
        if not args.policy.is_dir():
            raise Unreadable(f"{args.policy}: not a directory")
        version = _load(args.policy, limits, None, in_force_at_start=False)
        return (version,), 0, f"the directory {args.policy} (no history: versions and authors not reported)"
    if args.policy_project is not None:
        return _gitlab_versions(args, limits, since, until, now)
    if args.policy_repo is None:
        return (), 0, "no policy given (--policy-repo DIR, --policy-project P or --policy DIR)"
    try:
        found = history(args.policy_repo, since, until, args.max_versions, now)
        starts = [(found.in_force_at_start, True)] if found.in_force_at_start is not None else []
        versions = [
            _load_commit(args.policy_repo, limits, commit, in_force_at_start=at_start)._replace(
                out_of_order=commit.sha in found.out_of_order
            )
            for commit, at_start in [*starts, *((c, False) for c in found.commits)]
            if commit is not None
        ]
    except GitError as error:
        raise Unreadable(f"{args.policy_repo}: {error}") from None
    return tuple(versions), found.more, f"the git history of {args.policy_repo}"


def _gitlab_versions(
    args: argparse.Namespace, limits: ReadLimits, since: float, until: float, now: float
) -> tuple[tuple[PolicyVersion, ...], int, str]:
    """The versions from GitLab's API, as `serve --policy-project` reads the policy (its default branch)."""
    from controlplane.sources.gitlab import GitLabSource
    from controlplane.sources.gitlab_client import GitLabTokenError, GitLabUnavailable, token_from
    from controlplane.sources.gitlab_repo import PolicyRepo, PolicyRepoError
    from controlplane.sources.policy_history import gitlab_history

    if not args.gitlab_url:
        raise UsageError("--policy-project needs --gitlab-url")
    if "@" in urlsplit(args.gitlab_url).netloc:  # the report names the URL it read from: a ticket would keep it
        raise UsageError(
            "--gitlab-url: the URL holds credentials, and a command line is visible to every user (and the report "
            "names its source); give the token through --gitlab-token-env NAME or --gitlab-token-file PATH"
        )
    if args.gitlab_token_env is None and args.gitlab_token_file is None:
        raise UsageError("--policy-project needs --gitlab-token-env NAME or --gitlab-token-file PATH (read_api)")
    where = f"GitLab project {args.policy_project}"
    try:
        client = GitLabSource(args.gitlab_url, token_from(args.gitlab_token_env, args.gitlab_token_file))
        found = gitlab_history(client, args.policy_project, since, until, args.max_versions, now)
        repo = PolicyRepo(client, args.policy_project, limits)
        versions = []
        starts = [(found.in_force_at_start, True)] if found.in_force_at_start is not None else []
        for commit, at_start in [*starts, *((c, False) for c in found.commits)]:
            assert commit is not None
            try:
                files: dict[str, str] | PolicyInvalid = repo.read_tree(commit.sha)
            except PolicyInvalid as invalid:
                files = invalid
            version = _load_files(files, commit, f"{where}@{commit.sha[:12]}", in_force_at_start=at_start)
            versions.append(version._replace(out_of_order=commit.sha in found.out_of_order))
    except GitLabTokenError as error:  # a variable not set, a file not readable: a source, as for suggest
        raise Unreadable(str(error)) from None
    except (GitLabUnavailable, PolicyRepoError, GitError) as error:
        raise Unreadable(f"{where}: {error}") from None
    return tuple(versions), found.more, f"the default branch of {where} at {args.gitlab_url}"


def _load_commit(repo: Path, limits: ReadLimits, commit: Commit, *, in_force_at_start: bool) -> PolicyVersion:
    """One commit's version; a tree that cannot be read (the directory removed in it) is that version's error."""
    try:
        with tree_at(repo, commit.sha, limits.max_file_bytes) as tree:
            return _load(tree, limits, commit, in_force_at_start=in_force_at_start)
    except TreeUnreadable as error:
        return _load_files(OSError(str(error)), commit, str(repo), in_force_at_start=in_force_at_start)


def _load(tree: Path, limits: ReadLimits, commit: Commit | None, *, in_force_at_start: bool) -> PolicyVersion:
    """One version read from a directory (a checkout's tree, or --policy)."""
    from controlplane.sources.policy_dir import read_policy_dir

    try:
        files: dict[str, str] | PolicyInvalid | OSError = read_policy_dir(tree, limits)
    except (PolicyInvalid, OSError) as error:
        files = error
    return _load_files(files, commit, str(tree), in_force_at_start=in_force_at_start)


def _load_files(
    files: dict[str, str] | PolicyInvalid | OSError, commit: Commit | None, origin: str, *, in_force_at_start: bool
) -> PolicyVersion:
    """One version resolved offline (the policy alone, as `diff` reads a side); an invalid one is kept, with why."""
    from controlplane.model.loader import parse_policy
    from controlplane.resolved.index import Resolution

    sha, author, email, committer, when, subject = commit or ("", "", "", "", None, origin)
    try:
        if isinstance(files, Exception):
            raise files
        policy = parse_policy(files)
        resolved = Resolution().update(policy)
    except PolicyInvalid as invalid:
        first = invalid.lines(1)
        reason = f"{invalid.total} error(s)" + (f", first: {first[0]}" if first else "")
        return PolicyVersion(sha, author, email, committer, when, subject, None, {}, reason, in_force_at_start)
    except OSError as error:
        return PolicyVersion(sha, author, email, committer, when, subject, None, {}, str(error), in_force_at_start)
    gateways = {g.name: tuple(g.backends) for g in policy.gateways}
    return PolicyVersion(sha, author, email, committer, when, subject, resolved, gateways, "", in_force_at_start)


# -- the control plane's state


def _read_state(args: argparse.Namespace, dsn: StoreDsn | None, since: float, until: float) -> StateRead:
    if dsn is not None:
        where = f"PostgreSQL at {dsn.redacted()}"
        try:
            usage, revoked, keys = asyncio.run(_read_postgres(dsn, since, until, args.max_rows, not args.no_audit))
        except Exception as error:  # StoreUnavailable names the redacted DSN; a server error: its first line
            lines = str(error).strip().splitlines()
            raise Unreadable(f"cannot read {where}: {lines[0] if lines else type(error).__name__}") from None
        return StateRead(usage, revoked, keys, where, where)
    state_dir = trail_state_dir(args)
    usage = None
    db = trail_db(args)
    if not args.no_audit:
        from controlplane.audit.usage import summarise

        try:
            conn = open_readonly(db)
            try:
                usage = summarise(conn, since, until, args.max_rows)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as error:
            raise Unreadable(f"cannot read {db}: {error}") from None
    try:
        revoked = _revocations_file(state_dir / REVOCATIONS_FILE)
        stored_keys = _keys_file(state_dir / KEYS_FILE)
    except (OSError, StateFileError) as error:
        raise Unreadable(str(error)) from None
    return StateRead(usage, revoked, stored_keys, "not read (--no-audit)" if args.no_audit else str(db), str(state_dir))


def _revocations_file(path: Path) -> dict[str, float]:
    """revoked-jobs.json's entries; none when there is no file (no job was ever revoked here)."""
    found = read_json(path)
    revoked = (found or {}).get("revoked", {})
    if not isinstance(revoked, dict):
        raise StateFileError(f"{path}: malformed: no revoked object")
    try:
        return {str(job): _timestamp(until) for job, until in revoked.items()}
    except (TypeError, ValueError):
        raise StateFileError(f"{path}: malformed: a revocation's time is not a number") from None


def _keys_file(path: Path) -> tuple[SigningKey, ...] | None:
    """signing-keys.json's public fields (the private part is dropped unread); None when there is no file."""
    found = read_json(path)
    if found is None:
        return None
    entries = found.get("keys")
    if not isinstance(entries, list):
        raise StateFileError(f'{path}: malformed: expected a "keys" list')
    try:
        return tuple(_key(entry) for entry in entries)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise StateFileError(f"{path}: malformed: a key entry lacks a field or has a wrong type") from None


def _timestamp(value: object) -> float:
    """A time read from a state file or table, as Unix seconds a date can show: NaN, infinities and times past
    year 9999 are refused (ValueError) here, where the source can be named, not in the middle of writing."""
    found = float(str(value))
    if not 0.0 <= found < MAX_TIMESTAMP:
        raise ValueError(f"not a time: {value!r}")
    return found


def _key(entry: Any) -> SigningKey:
    retire = entry.get("retire_after")
    return SigningKey(
        str(entry["kid"]),
        _timestamp(entry["created_at"]),
        _timestamp(entry["not_before"]),
        None if retire is None else _timestamp(retire),
    )


async def _read_postgres(
    dsn: StoreDsn, since: float, until: float, cap: int, audit: bool
) -> tuple[AuditUsage | None, dict[str, float], tuple[SigningKey, ...]]:
    """One connection, one read-only transaction: the aggregates, the deny list, the keys' public columns."""
    from psycopg import IsolationLevel

    from controlplane.audit.usage import summarise_pg

    async with read_only_session(dsn, statement_timeout=300.0) as conn:
        await conn.set_isolation_level(IsolationLevel.REPEATABLE_READ)  # one snapshot: see usage.summarise
        usage = await summarise_pg(conn, since, until, cap) if audit else None
        cursor = await conn.execute("SELECT job_id, denied_until FROM revocations")
        revoked = {str(job): _timestamp(until_) for job, until_ in await cursor.fetchall()}
        cursor = await conn.execute("SELECT kid, created_at, not_before, retire_after FROM signing_keys")
        keys = tuple(
            SigningKey(str(kid), _timestamp(created), _timestamp(nb), None if retire is None else _timestamp(retire))
            for kid, created, nb, retire in await cursor.fetchall()
        )
        with contextlib.suppress(Exception):
            await conn.rollback()
        return usage, revoked, keys
