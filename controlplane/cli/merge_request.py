"""`controlplane mr-check`: a policy merge request judged in its own pipeline, where reviewers look.

Run by the CI component (templates/policy-check.yml) in a merge-request pipeline, in the job's checkout of the
MR's head. It does four things, each visible in a different place of the MR:

1. validates the head's policy as `validate --offline` does (the policy alone);
2. writes every error (and warning) as a GitLab code-quality report: GitLab shows them on the MR's diff, at the
   file and line, and its widget lists those the MR adds or fixes (fingerprints stay stable across pushes);
3. computes `controlplane diff` between the MR's diff base (`CI_MERGE_REQUEST_DIFF_BASE_SHA`, a revision of the
   checkout) and the head, and writes it as a Markdown artifact;
4. posts that Markdown as an MR note, updating its own note of the previous push (found by a hidden marker).

The note needs a token allowed to write notes: `CI_JOB_TOKEN` is not (the job token reaches a short list of
endpoints and merge-request notes are not among them), so a team sets a project access token as a masked CI/CD
variable. It is read from that variable or a file, never from argv, and never printed. Without it the note is
skipped with one line and the artifact still written. A GitLab error on the note is printed and does not change
the exit status, which is the policy's verdict alone: 0 valid, 1 invalid, 2 a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from controlplane.cli.diff import UsageError, policy_tree, resource_changes, text_lines
from controlplane.model.errors import PolicyError, PolicyInvalid
from controlplane.model.policy import GitLabApi, Policy
from controlplane.runtime.policy_check import CheckedPolicy, LiveInputs, check_policy_files
from controlplane.sources.policy_dir import ReadLimits, read_policy_dir

MARKER = "<!-- controlplane:mr-check -->"  # how the note of a previous push is found again
TOKEN_ENV = "CONTROLPLANE_MR_TOKEN"
ApiSetting = tuple[str, str | None, str | None]  # an `api:`'s url, token_env and token_file
CHECK_ERROR = "controlplane/policy-error"
CHECK_WARNING = "controlplane/policy-warning"
SEVERITY = {CHECK_ERROR: "major", CHECK_WARNING: "minor"}
MAX_LISTED = 50  # errors listed in the note (all of them are in the code-quality report)
MAX_NOTE_CHARS = 100_000  # far under GitLab's 1,000,000: a note reviewers can read; the artifact has it all
MAX_NOTES_SCANNED = 1_000  # notes looked through for our own before a new one is made
API_TIMEOUT = 30.0


class GitLabReader:
    """GitLab as it is now for the `api:` issuers of the policies judged, read once per issuer and name.

    A policy naming projects by path under an `api:` issuer resolves them through GitLab (serve watches it). In CI
    the same read is made when the issuer's token (its `api.token_env` / `api.token_file`, e.g. a masked CI/CD
    variable with a `read_api` token) is in the job; without it the issuer is judged offline, as `validate
    --offline` judges it, and `notes` says so. Paths are never pinned here (serve's memory of ids is not in CI).
    """

    def __init__(self) -> None:
        self.notes: list[str] = []
        # In an MR the policy read is the MR's: it could name any URL and any variable or file as an issuer's token
        # (`api: {url: https://elsewhere, token_env: CONTROLPLANE_MR_TOKEN}`) and have the job send that secret
        # there. So only the `api:` settings of the target branch's policy (reviewed, merged) are read with;
        # None: no base, the checkout is the target branch itself.
        self.trusted: frozenset[ApiSetting] | None = None
        self.untrusted = "its api: url, token_env or token_file is not the target branch's"  # why, when not trusted

    def __call__(self, policy: Policy) -> LiveInputs:
        from controlplane.model.inventory import Inventory
        from controlplane.runtime.gitlab_link import policy_scope
        from controlplane.sources.gitlab import GitLabSource
        from controlplane.sources.gitlab_client import GitLabTokenError, GitLabUnavailable, token_from

        inventories = {}
        for issuer in policy.issuers:
            if issuer.api is None:
                continue
            offline = issuer.inventory or Inventory()
            if self.trusted is not None and _api_setting(issuer.api) not in self.trusted:
                why = f"{self.untrusted}; no token sent"
                self._note(f"issuer {issuer.name}: judged without GitLab ({why})")
                inventories[issuer.name] = offline
                continue
            try:
                token = token_from(issuer.api.token_env, issuer.api.token_file)
            except GitLabTokenError as error:
                self._note(f"issuer {issuer.name}: judged without GitLab ({error})")
                inventories[issuer.name] = offline
                continue
            scope = policy_scope(policy, issuer)
            source = GitLabSource(issuer.api.url, token, max_retries=2)
            try:
                inventories[issuer.name] = source.fetch_inventory(groups=scope.groups, projects=scope.projects)
            except GitLabUnavailable as error:
                self._note(f"issuer {issuer.name}: judged without GitLab ({error})")
                inventories[issuer.name] = offline
        return LiveInputs(inventories, {})

    def _note(self, line: str) -> None:
        if line not in self.notes:
            self.notes.append(line)


class Outcome(NamedTuple):
    """What the check found: the head's errors (empty when valid) and, when both sides loaded, the diff lines."""

    errors: list[PolicyError]
    total: int  # errors found, shown or not
    warnings: list[PolicyError]
    diff: list[str] | None
    changed: bool
    diff_note: str  # why there is no diff, or what it compares
    notes: tuple[str, ...] = ()  # what the verdict could not take into account (an issuer's GitLab not read)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", nargs="?", default=".", help="policy directory, relative to the repository root")
    parser.add_argument(
        "--base",
        default=os.environ.get("CI_MERGE_REQUEST_DIFF_BASE_SHA"),
        help="revision to diff against (default: $CI_MERGE_REQUEST_DIFF_BASE_SHA)",
    )
    parser.add_argument(
        "--codequality",
        type=Path,
        default=Path("gl-code-quality-report.json"),
        help="where to write GitLab's code-quality report (default %(default)s)",
    )
    parser.add_argument(
        "--diff-report",
        type=Path,
        default=Path("controlplane-access-diff.md"),
        help="where to write the note's Markdown (default %(default)s)",
    )
    parser.add_argument("--no-note", action="store_true", help="write the artifacts only, post no MR note")
    parser.add_argument(
        "--token-env", default=TOKEN_ENV, help=f"variable holding the API token for the note (default {TOKEN_ENV})"
    )
    parser.add_argument("--token-file", help="file holding the API token (a CI/CD variable of type File)")


def run_mr_check(args: argparse.Namespace, limits: ReadLimits) -> int:
    prefix = _repo_relative(args.policy)
    if prefix is None:
        print(
            f"controlplane mr-check: {args.policy}: give the policy directory relative to the repo root",
            file=sys.stderr,
        )
        return 2
    outcome = check(Path(args.policy), prefix, args.base, limits, GitLabReader())
    write_json(args.codequality, codequality_report(outcome.errors, outcome.warnings, prefix))
    body = note_body(outcome, os.environ)
    args.diff_report.parent.mkdir(parents=True, exist_ok=True)
    args.diff_report.write_text(body, encoding="utf-8")
    for error in outcome.errors:  # one line each: a file name cannot forge lines of the job's log
        print(_one_line(str(error)), file=sys.stderr)
    verdict = f"invalid policy ({outcome.total} error(s))" if outcome.errors else "valid policy"
    for note in outcome.notes:
        print(f"controlplane mr-check: note: {_one_line(note)}")
    print(f"controlplane mr-check: {verdict}; {_one_line(outcome.diff_note)}")
    print(f"controlplane mr-check: wrote {args.codequality} and {args.diff_report}")
    if args.no_note:
        print("controlplane mr-check: MR note off (--no-note)")
    else:
        post_note(body, args.token_env, args.token_file, os.environ)
    return 1 if outcome.errors else 0


def check(
    policy_dir: Path, prefix: str, base: str | None, limits: ReadLimits, gitlab: GitLabReader | None = None
) -> Outcome:
    """The head (the checkout) judged, and diffed against `base` when both sides are valid; `gitlab` reads the
    live state of `api:` issuers (None: every issuer judged offline)."""
    outcome = _check(policy_dir, prefix, base, limits, gitlab)
    return outcome._replace(notes=tuple(gitlab.notes)) if gitlab is not None else outcome


def _check(policy_dir: Path, prefix: str, base: str | None, limits: ReadLimits, gitlab: GitLabReader | None) -> Outcome:
    old_tree = _read_base(f"{base}:{prefix}" if prefix else base, limits) if base else None
    if gitlab is not None and base:  # the MR's own `api:` settings are not trusted: the target branch's are
        gitlab.trusted = _api_settings(old_tree) if isinstance(old_tree, dict) else frozenset()
        if not isinstance(old_tree, dict):
            gitlab.untrusted = "the target branch's policy, whose api: settings alone are trusted, was not read"
    head, errors, total = _judge(lambda: read_policy_dir(policy_dir, limits), gitlab)
    warnings = head.warnings if head is not None else []
    if head is None:
        return Outcome(errors, total, warnings, None, False, "no access diff: the head's policy is invalid")
    if not base or old_tree is None:
        return Outcome(errors, total, warnings, None, False, "no access diff: no base revision (not an MR pipeline?)")
    if isinstance(old_tree, str):
        return Outcome(errors, total, warnings, None, False, f"no access diff: {old_tree}")
    old, old_errors, old_total = _judge(lambda: _texts(old_tree), gitlab)
    if old is None:
        first = f": {old_errors[0]}" if old_errors else ""
        why = f"the base's policy is invalid ({old_total} error(s){first})"
        return Outcome(errors, total, warnings, None, False, f"no access diff: {why}")
    from controlplane.resolved.diff import compare

    diff = compare(old.resolved, head.resolved, _fronted(old.policy), _fronted(head.policy))
    lines = text_lines(diff, resource_changes(old.snapshots, head.snapshots))
    what = "access changes" if diff.changed else "access unchanged"
    return Outcome(errors, total, warnings, lines, diff.changed, f"{what} against {base[:12]}")


def _judge(
    read: Callable[[], Mapping[str, str]], gitlab: GitLabReader | None
) -> tuple[CheckedPolicy | None, list[PolicyError], int]:
    """The tree `read` returns, checked: (the result, []) or (None, its errors, how many there were)."""
    try:
        return check_policy_files(read(), gitlab), [], 0
    except PolicyInvalid as invalid:
        return None, list(invalid.errors), invalid.total
    except OSError as error:
        return None, [PolicyError(".", 0, "", str(error))], 1
    except Exception as error:  # a bug: one error, as validate reports it, so the pipeline still fails
        return None, [PolicyError(".", 0, "", f"internal error: {type(error).__name__}: {error}")], 1


def _read_base(spec: str, limits: ReadLimits) -> dict[str, str] | Exception | str:
    """The base's policy files, or why they could not be read: the policy's own error (judged later, as the
    head's are), or the reason git could not give the tree (a string)."""
    try:
        with policy_tree(spec) as tree:
            try:
                return read_policy_dir(tree, limits)
            except (PolicyInvalid, OSError) as error:
                return error
    except UsageError as error:
        return str(error)
    except OSError as error:  # no git in the image
        return f"git failed: {error}"


def _texts(tree: dict[str, str] | Exception) -> Mapping[str, str]:
    if isinstance(tree, Exception):
        raise tree
    return tree


def _api_settings(texts: Mapping[str, str]) -> frozenset[ApiSetting]:
    """Where the target branch's policy sends which token: all the MR's head may have read for it."""
    from controlplane.model.loader import parse_policy

    try:
        policy = parse_policy(texts)
    except Exception:  # an invalid base trusts nothing: the head is judged offline
        return frozenset()
    return frozenset(_api_setting(i.api) for i in policy.issuers if i.api is not None)


def _api_setting(api: GitLabApi) -> ApiSetting:
    return (api.url, api.token_env, api.token_file)


def _fronted(policy: Policy) -> dict[str, tuple[str, ...]]:
    return {g.name: g.backends for g in policy.gateways}


def _repo_relative(policy: str) -> str | None:
    """The policy directory as a path from the repository root ("" for the root), or None if it leaves it."""
    path = posixpath.normpath(policy.replace(os.sep, "/"))
    if posixpath.isabs(path) or path == ".." or path.startswith("../"):
        return None
    return "" if path == "." else path


# -- the code-quality report


def codequality_report(
    errors: Sequence[PolicyError], warnings: Sequence[PolicyError], prefix: str
) -> list[dict[str, Any]]:
    """GitLab's code-quality report: a JSON array of issues, each with a description, a check name, a
    fingerprint, a severity and a location (path from the repository root, first line). The fingerprint hashes
    what the problem is and where (file, field, message) but not the line, so an error moved by an edit above it
    stays the same issue, and GitLab's widget shows only what an MR adds or fixes."""
    issues = []
    seen: dict[str, int] = {}
    for check_name, found in ((CHECK_ERROR, errors), (CHECK_WARNING, warnings)):
        for error in found:
            path = _report_path(error.file, prefix)
            key = "\0".join((check_name, path, error.field, error.message))
            seen[key] = seen.get(key, 0) + 1  # the same problem twice in a file: two issues, two fingerprints
            fingerprint = hashlib.sha256(f"{key}\0{seen[key]}".encode()).hexdigest()[:32]
            issues.append(
                {
                    "description": f"{error.field}: {error.message}" if error.field else error.message,
                    "check_name": check_name,
                    "fingerprint": fingerprint,
                    "severity": SEVERITY[check_name],
                    "location": {"path": path, "lines": {"begin": max(error.line, 1)}},
                }
            )
    return issues


def _report_path(file: str, prefix: str) -> str:
    """Errors name files relative to the policy directory; the directory itself is named when it is the problem."""
    if not file or file == "." or posixpath.isabs(file) or file.startswith(".."):
        return prefix or "."
    return posixpath.join(prefix, file) if prefix else file


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# -- the note


def note_body(outcome: Outcome, env: Mapping[str, str]) -> str:
    """Markdown: the verdict, the errors (bounded), and the access diff in a `diff` block. Starts with the marker."""
    sha = env.get("CI_COMMIT_SHORT_SHA") or env.get("CI_COMMIT_SHA", "")[:8]
    at = f" at `{sha}`" if sha else ""
    lines = [MARKER, "### controlplane: policy check" + at, ""]
    if outcome.errors:
        lines.append(f"**Invalid policy: {outcome.total} error(s).** The pipeline fails until they are fixed:")
        lines.append("")
        lines.extend(f"- `{_code(str(e))}`" for e in outcome.errors[:MAX_LISTED])
        if outcome.total > MAX_LISTED:
            lines.append(f"- ... and {outcome.total - MAX_LISTED} more (see the code-quality report)")
    else:
        lines.append("**Valid policy.**" + (f" {len(outcome.warnings)} warning(s)." if outcome.warnings else ""))
    lines.extend(f"> `{_code(note)}`" for note in outcome.notes)
    lines.extend(["", "#### Access changes", ""])
    why = _prose(outcome.diff_note)  # may quote git's words or the base's first error
    if outcome.diff is None:
        lines.append(f"_{why}_")
    elif not outcome.changed and not outcome.diff:
        lines.append(f"None: {why}.")
    else:
        lines.append(f"{why[:1].upper()}{why[1:]}:")
        lines.extend(["", "```diff", *(_diff_line(line) for line in outcome.diff), "```"])
    pipeline = env.get("CI_PIPELINE_URL")
    lines.extend(["", f"<sub>Updated by `controlplane mr-check`{f' in {pipeline}' if pipeline else ''}.</sub>", ""])
    body = "\n".join(lines)
    if len(body) > MAX_NOTE_CHARS:
        cut = body[: MAX_NOTE_CHARS - 200].rsplit("\n", 1)[0]
        body = cut + "\n```\n\n_Cut here: the job's `controlplane-access-diff.md` artifact has all of it._\n"
    return body


def _diff_line(line: str) -> str:
    """Gains and losses at the start of the line, where GitLab's `diff` highlighting colours them. A fence in a
    value the policy wrote (a claim, a path) is broken up, so nothing an MR writes can end the code block."""
    safe = _one_line(line).replace("```", "'''")
    stripped = safe.lstrip()
    return stripped if stripped[:2] in ("+ ", "- ") else " " + safe


def _code(text: str) -> str:
    """`text` for an inline code span: one line, no backtick that could end the span. In the span GitLab renders
    no HTML (`</details>`), no mention (`@all`), no reference; and quick actions (`/merge`, `/label`, run with the
    note token's rights when the note is saved) are read only at the start of a line, which `text` cannot reach."""
    return _one_line(text).replace("`", "'")


# What ends a line for GitLab's Markdown or its quick-action parser (LF, CR, and Unicode's other breaks) and the
# other control characters: a file name (`x<LF>/label ~y.yaml`) or a GitLab error message may carry them.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, 0x85)} | {0x2028: "\\u2028", 0x2029: "\\u2029"}
_ESCAPES |= {0x0A: "\\n", 0x0D: "\\r", 0x09: " "}


def _prose(text: str) -> str:
    """`text` in running Markdown: one line, no HTML tag (`<` written as an entity) and no mention (a zero-width
    space after `@`: GitLab links `@name` in rendered text, whatever escaping, but not in code), no code span."""
    return _code(text).replace("&", "&amp;").replace("<", "&lt;").replace("@", "@\u200b")


def _one_line(text: str) -> str:
    """`text` on one line: line breaks and control characters written as escapes (`\\n`, `\\x1b`)."""
    return text.translate(_ESCAPES)


def post_note(body: str, token_env: str | None, token_file: str | None, env: Mapping[str, str]) -> bool:
    """Create or update this check's note on the MR. Every outcome is one line on stdout; never raises."""
    from controlplane.sources.gitlab_client import GitLabTokenError, token_from

    # The MR's own project: in a pipeline of a fork's MR that runs in the fork, CI_PROJECT_ID is the fork's,
    # while the IID numbers the MR in the project it targets.
    project = env.get("CI_MERGE_REQUEST_PROJECT_ID") or env.get("CI_PROJECT_ID")
    iid, api = env.get("CI_MERGE_REQUEST_IID"), env.get("CI_API_V4_URL")
    if not (iid and project and api):
        print("controlplane mr-check: MR note skipped: not a merge-request pipeline (no CI_MERGE_REQUEST_IID)")
        return False
    named = env.get(token_env) if token_env else None
    if token_file is None and named and os.path.isabs(named) and os.path.isfile(named):
        token_env, token_file = None, named  # a CI/CD variable of type File: GitLab gives the file's path
    try:
        token = token_from(token_env, token_file)
    except GitLabTokenError as error:
        print(f"controlplane mr-check: MR note skipped: {error} (CI_JOB_TOKEN cannot write notes; see the docs)")
        return False
    try:
        note_id, created = _upsert_note(api, token, project, int(iid), body)
    except Exception as error:  # the note is a convenience: the verdict above stands
        print(f"controlplane mr-check: MR note not posted: {_api_error(error)}")
        return False
    print(f"controlplane mr-check: MR !{iid}: note {note_id} {'created' if created else 'updated'}")
    return True


def _upsert_note(api: str, token: str, project: str, iid: int, body: str) -> tuple[int, bool]:
    import gitlab
    from gitlab.exceptions import GitlabUpdateError

    url = api.rstrip("/").removesuffix("/api/v4")
    # One try, no retry loop: the note is best-effort, the job must not hang on a GitLab outage, and the next
    # push updates it anyway.
    gl = gitlab.Gitlab(url, private_token=token, timeout=API_TIMEOUT)
    mr = gl.projects.get(project, lazy=True).mergerequests.get(iid, lazy=True)
    for n, note in enumerate(mr.notes.list(sort="asc", order_by="created_at", iterator=True)):
        if n >= MAX_NOTES_SCANNED:
            break
        if not note.system and str(note.body).startswith(MARKER):
            note.body = body
            try:
                note.save()
                return int(note.id), False
            except GitlabUpdateError as error:
                if error.response_code != 403:  # someone else's note quoting our marker: make our own
                    raise
    created = mr.notes.create({"body": body})
    return int(created.id), True


def _api_error(error: Exception) -> str:
    """The error without anything the request carried: python-gitlab's messages hold the status and GitLab's
    answer, never the token; a connection error is named by its type."""
    from gitlab.exceptions import GitlabError

    if isinstance(error, GitlabError):
        return f"GitLab answered {error.response_code}: {error.error_message}"
    return type(error).__name__
