"""`controlplane report`'s content, assembled from what the caller read: pure (no I/O, no clock).

An auditor asks, for a window: which policy versions were in force and who changed them (and what each change
did to access), who could reach what, what was actually used per project and job, what was denied and why,
which jobs were revoked, and when signing keys rotated. Each answer is one `Section`: a title, a few lines
saying what it is built from, a table, and how many rows were left out (`more`). The three outputs (JSON, CSV,
HTML: report_render.py) are written from the same sections, so they never disagree.

Access is worded from the resolved policy, the one RBAC is compiled from (`resolved.render.condition_text`,
`resolved.diff.subject_text`), and changes between versions from `resolved.diff.compare`: never a second copy
of the matching rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from controlplane.audit.usage import Table, Usage
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.diff import PolicyDiff, cloud_text, compare, subject_text
from controlplane.resolved.diff import document as diff_document

FORMAT = "controlplane-report/1"

Value = str | int | float | None


class Column(NamedTuple):
    key: str
    title: str
    kind: str = "text"  # "text", "id" (short, kept on one line), "time" (Unix seconds, UTC), "count", "lines"


class Section(NamedTuple):
    key: str  # the JSON key and the CSV file name
    title: str
    about: tuple[str, ...]  # what the table is built from, what it leaves out
    columns: tuple[Column, ...]
    rows: tuple[Mapping[str, Any], ...]
    more: int = 0  # rows left out past the cap


class PolicyVersion(NamedTuple):
    """One version of the policy: a commit (or a directory, sha ""), and what it resolved to offline."""

    sha: str
    author: str
    email: str
    committer: str
    time: float | None
    subject: str
    resolved: ResolvedPolicy | None  # None: it did not load (`error` says why)
    gateways: Mapping[str, Sequence[str]]  # gateway -> backends it fronts
    error: str = ""
    in_force_at_start: bool = False
    out_of_order: bool = False  # dated before the commit it follows on the branch (policy_history.select)


class SigningKey(NamedTuple):
    """A signing key's public facts (never its private part): kid and the times the key store keeps."""

    kid: str
    created_at: float
    not_before: float
    retire_after: float | None


class Inputs(NamedTuple):
    since: float
    until: float
    generated: float
    versions: tuple[PolicyVersion, ...]  # oldest first; the last one is in force at the window's end
    versions_more: int  # commits in the window not loaded (past the cap)
    policy_source: str  # what the versions were read from, in words
    usage: Usage | None
    audit_source: str
    revocations: Mapping[str, float] | None  # job id -> denied until, as the deny list holds it now
    keys: tuple[SigningKey, ...] | None
    state_source: str
    cap: int


class Report(NamedTuple):
    since: float
    until: float
    generated: float
    summary: tuple[tuple[str, Value], ...]
    sections: tuple[Section, ...]
    changes: tuple[Mapping[str, object], ...]  # per version after the first: resolved.diff.document
    access_by_version: tuple[Mapping[str, Any], ...]  # JSON only: the access table under each version
    not_recorded: tuple[str, ...]


NOT_RECORDED: tuple[str, ...] = (
    "Who approved a policy change: the report names commit authors and committers only (approvals live in "
    "GitLab's merge requests).",
    "GitLab's live state in each version: access is resolved offline from the policy files (no pinned project "
    "ids, no withdrawn projects), as `controlplane validate --offline` and `controlplane diff` resolve it.",
    "When and why a job was revoked: the deny list keeps only each job id and the time it is denied until, and "
    "drops an entry once that time has passed; revocations are otherwise seen only through requests the "
    "gateways refused for them (policy `revoked-jobs`).",
    "Signing keys retired before the report ran: the key store drops a key once its last credential expired, "
    "so only rotations of keys still stored are listed; rotation times are those the store planned.",
    "Requests Envoy never logged (a gateway's access log stream down) and records the audit store dropped under "
    "load (counted in controlplane_audit_records_dropped_total, not in the trail); records past the audit "
    "retention (serve --audit-retention, 30 days by default) are gone.",
    "Credentials exchanged (token exchange) that were never used: the trail records requests, not exchanges.",
    "What a cloud identity was allowed to do in AWS or Google Cloud: its IAM policies live in the cloud, not in "
    "the policy; the report names the role or service account requests were sent as, and the cloud's own logs "
    "(CloudTrail, Cloud Audit Logs) what it did there.",
    "When a commit was pushed, and commits a force push erased: the policy's history is the branch as it is now, "
    "and a commit's time is the one its committer's git wrote (one dated out of the branch's order is "
    "marked); when a fast-forward brought several commits at once, each is listed though only the last was in "
    "force. GitLab's push events and protected branches are the record of pushes.",
    "Which GitLab instance a job id belongs to beyond the token's issuer: job ids are unique within one GitLab "
    "instance, and the totals count distinct job ids (two instances' job 5 is one).",
)


OUT_OF_ORDER = "dated out of order (before the version it follows, or after the report ran)"


def format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def build(inputs: Inputs) -> Report:
    """The report's sections from what the caller read."""
    changes, change_rows = _changes(inputs.versions, inputs.cap)
    sections = [
        _versions_section(inputs, change_rows),
        _access_section(inputs),
    ]
    if inputs.usage is not None:
        sections.extend(_usage_sections(inputs.usage, inputs.audit_source))
    sections.append(_revocations_section(inputs))
    sections.append(_keys_section(inputs))
    return Report(
        inputs.since,
        inputs.until,
        inputs.generated,
        _summary(inputs),
        tuple(sections),
        tuple(changes),
        tuple(_access_by_version(inputs)),
        NOT_RECORDED,
    )


def _access_by_version(inputs: Inputs) -> list[Mapping[str, Any]]:
    columns = _ACCESS_COLUMNS
    out: list[Mapping[str, Any]] = []
    for version in inputs.versions:
        if version.resolved is None:
            continue
        rows, more = _capped(access_rows(version), inputs.cap)
        shown = [{c.key: json_value(c, row.get(c.key)) for c in columns} for row in rows]
        out.append({"commit": version.sha, "time": format_time(version.time), "rows": shown, "more": more})
    return out


def _summary(inputs: Inputs) -> tuple[tuple[str, Value], ...]:
    """(key, value): the keys are the JSON's and the CSV's; HTML shows them with spaces."""
    rows: list[tuple[str, Value]] = [
        ("window_from", format_time(inputs.since)),
        ("window_to", format_time(inputs.until)),
        ("generated", format_time(inputs.generated)),
        ("policy_read_from", inputs.policy_source),
        # serve never applies a version that does not load: those are counted apart (the skipped are unknown)
        ("policy_versions_in_force", sum(v.resolved is not None for v in inputs.versions) + inputs.versions_more),
        ("policy_versions_invalid", sum(v.resolved is None for v in inputs.versions)),
        ("audit_trail_read_from", inputs.audit_source),
    ]
    if inputs.usage is not None:
        totals = inputs.usage.totals
        rows.extend(
            [
                ("requests", totals["requests"]),
                ("allowed", totals["allowed"]),
                ("denied", totals["denied"]),
                ("jobs_seen", totals["jobs"]),
                ("projects_seen", totals["projects"]),
            ]
        )
    rows.append(("state_read_from", inputs.state_source))
    return tuple(rows)


def _capped_lines(lines: list[str], cap: int) -> list[str]:
    if len(lines) <= cap:
        return lines
    return [*lines[:cap], f"{len(lines) - cap} more change(s) not shown (controlplane diff lists them all)"]


def _changes(versions: Sequence[PolicyVersion], cap: int) -> tuple[list[Mapping[str, object]], dict[str, list[str]]]:
    """Each loaded version compared with the previous loaded one: JSON documents, and lines per sha."""
    documents: list[Mapping[str, object]] = []
    lines: dict[str, list[str]] = {}
    previous: PolicyVersion | None = None
    for version in versions:
        if version.resolved is None:
            lines[version.sha] = [f"did not load: {version.error}"]
            continue
        if previous is None or previous.resolved is None:
            lines[version.sha] = [] if version.in_force_at_start else ["first version read: compared with nothing"]
        else:
            diff = compare(previous.resolved, version.resolved, previous.gateways, version.gateways)
            documents.append({"from": previous.sha, "to": version.sha, "diff": diff_document(diff)})
            lines[version.sha] = _capped_lines(diff_lines(diff), cap) or ["access unchanged"]
        previous = version
    return documents, lines


def diff_lines(diff: PolicyDiff) -> list[str]:
    """One line per gain, loss, mode change and cloud identity change, in `controlplane diff`'s words."""
    out = []
    for backend in diff.backends:
        if backend.status != "changed":
            out.append(f"backend {backend.name} {backend.status}")
        out.extend(
            f"+ {backend.name}: {c.subject} gains {', '.join(c.methods)} {c.path} (via {', '.join(c.via)})"
            for c in backend.gains
        )
        out.extend(
            f"- {backend.name}: {c.subject} loses {', '.join(c.methods)} {c.path} (via {', '.join(c.via)})"
            for c in backend.losses
        )
        out.extend(f"! {backend.name}: {m.grant} {m.old} -> {m.new}" for m in backend.modes)
        out.extend(f"* {backend.name}: {cloud_text(c)}" for c in backend.cloud)
    out.extend(f"gateway {name} added" for name in diff.gateways_added)
    out.extend(f"gateway {name} removed" for name in diff.gateways_removed)
    out.extend(
        f"gateway {f.gateway} {'now fronts' if f.added else 'no longer fronts'} backend {f.backend}"
        for f in diff.fronts
    )
    return out


def _capped(rows: Sequence[Mapping[str, Any]], cap: int) -> tuple[tuple[Mapping[str, Any], ...], int]:
    return tuple(rows[:cap]), max(0, len(rows) - cap)


def _in_force(version: PolicyVersion) -> str:
    """When the version took effect; an invalid one never did (serve keeps serving the one before it)."""
    if version.resolved is None:
        when = "never: did not load" + (" (in the tree at window start)" if version.in_force_at_start else "")
    else:
        when = "at window start" if version.in_force_at_start else "from this commit"
    return when + (f"; {OUT_OF_ORDER}" if version.out_of_order else "")


def _versions_section(inputs: Inputs, lines: Mapping[str, list[str]]) -> Section:
    rows = [
        {
            "in_force": _in_force(v),
            "time": v.time,
            "commit": v.sha,
            "author": f"{v.author} <{v.email}>" if v.email else v.author,
            "committer": v.committer,
            "message": v.subject,
            "access_changes": lines.get(v.sha, []),
        }
        for v in inputs.versions
    ]
    shown, more = _capped(rows, inputs.cap)
    return Section(
        "policy_versions",
        "Policy versions in force and who changed them",
        (
            f"Read from {inputs.policy_source}: the version in force when the window opened, then every commit "
            "that changed the policy in the window (first parents of the branch: each merge is one version).",
            "Access changes compare each version with the one before, resolved as RBAC is compiled from them.",
            *(
                (
                    f"{inputs.versions_more} earlier commit(s) in the window were not loaded (--max-versions): the "
                    "first one listed after the window's start is compared with the version in force at the start, "
                    "so its changes include theirs.",
                )
                if inputs.versions_more
                else ()
            ),
            "Times are those the committers' git wrote; the branch's order decides what is in the window: a commit "
            f"between two dated in it is listed whatever its date, and one marked `{OUT_OF_ORDER}` is a wrong "
            "clock or a date chosen to mislead.",
        ),
        (
            Column("in_force", "In force"),
            Column("time", "Committed", "time"),
            Column("commit", "Commit"),
            Column("author", "Author"),
            Column("committer", "Committer"),
            Column("message", "Message"),
            Column("access_changes", "Access changes", "lines"),
        ),
        shown,
        more + inputs.versions_more,
    )


_ACCESS_COLUMNS = (
    Column("backend", "Backend"),
    Column("gateways", "Gateways"),
    Column("grant", "Grant"),
    Column("mode", "Mode", "id"),
    Column("subject", "Tokens admitted"),
    Column("allows", "Allows", "lines"),
    Column("cloud_identity", "Sent to the cloud as"),
)


def access_rows(version: PolicyVersion) -> list[dict[str, Any]]:
    """Who could reach what under one version: a row per backend, grant and subject."""
    rows: list[dict[str, Any]] = []
    if version.resolved is None:
        return rows
    fronting: dict[str, list[str]] = {}
    for gateway, backends in version.gateways.items():
        for backend in backends:
            fronting.setdefault(backend, []).append(gateway)
    for backend in sorted(version.resolved.backends):
        cloud = version.resolved.cloud.get(backend)
        own_roles = dict(cloud.roles) if cloud is not None else {}
        for grant in version.resolved.grants(backend):
            identity = own_roles.get(grant.binding) or (cloud.identity if cloud is not None else None)
            rules = [f"{', '.join(r.methods) or 'any method'} {', '.join(r.paths) or 'any path'}" for r in grant.rules]
            for subject in grant.subjects or (None,):
                rows.append(
                    {
                        "backend": backend,
                        "gateways": ", ".join(sorted(fronting.get(backend, []))),
                        "grant": grant.name,
                        "mode": grant.mode.value,
                        "subject": "no one (every subject withdrawn)" if subject is None else subject_text(subject),
                        "allows": rules,
                        "cloud_identity": identity,
                    }
                )
    return rows


def _access_section(inputs: Inputs) -> Section:
    current = next((v for v in reversed(inputs.versions) if v.resolved is not None), None)
    rows = [] if current is None else access_rows(current)
    shown, more = _capped(rows, inputs.cap)
    version = "" if current is None else (current.sha or current.subject)
    return Section(
        "access",
        "Who could reach what at the end of the window",
        (
            f"The policy in force at the window's end ({version or 'none loaded'}; the last version that loaded: "
            "serve never applies an invalid one), resolved: per backend, each "
            "grant (binding/role), the tokens it admits (every condition must hold) and the methods and paths it "
            "allows. Shadow grants allow nothing: Envoy only logs what they would allow. On an AWS or Google "
            "Cloud backend, the role or service account its requests are sent upstream as (a binding's own "
            "aws_role_arn, else the backend's).",
        ),
        _ACCESS_COLUMNS,
        shown,
        more,
    )


def _from_table(table: Table) -> tuple[tuple[Mapping[str, Any], ...], int]:
    return tuple(table.rows), max(0, table.total - len(table.rows))


def _usage_sections(usage: Usage, source: str) -> list[Section]:
    where = f"Aggregated by the audit store ({source}) over the window."
    return [*_job_sections(usage, where), *_cloud_sections(usage, where)]


def _job_sections(usage: Usage, where: str) -> list[Section]:
    """What each job used and was refused."""
    jobs, jobs_more = _from_table(usage.tables["jobs"])
    used, used_more = _from_table(usage.tables["usage"])
    denied, denied_more = _from_table(usage.tables["denials"])
    return [
        Section(
            "jobs",
            "What was used, per project and job",
            (
                where,
                "A request without a valid token has no project or job: it is counted on an empty line.",
                "The token issuer is the token's `iss`: a job's GitLab ID token, or the control plane's own "
                "credentials exchanged for it, on lines of their own; claims alike from two issuers are two jobs.",
            ),
            (
                Column("project_path", "Project"),
                Column("project_id", "Project id", "id"),
                Column("job_id", "Job", "id"),
                Column("pipeline_id", "Pipeline", "id"),
                Column("ref", "Ref"),
                Column("user", "User"),
                Column("issuer", "Token issuer"),
                Column("requests", "Requests", "count"),
                Column("allowed", "Allowed", "count"),
                Column("denied", "Denied", "count"),
                Column("first", "First", "time"),
                Column("last", "Last", "time"),
            ),
            jobs,
            jobs_more,
        ),
        Section(
            "usage",
            "Requests per project, job, backend, method and path",
            (where, "Paths as the trail keeps them: without their query string, cut at 2,048 characters."),
            (
                Column("project_path", "Project"),
                Column("job_id", "Job", "id"),
                Column("backend", "Backend"),
                Column("method", "Method", "id"),
                Column("path", "Path"),
                Column("decision", "Decision"),
                Column("requests", "Requests", "count"),
                Column("first", "First", "time"),
                Column("last", "Last", "time"),
            ),
            used,
            used_more,
        ),
        Section(
            "denials",
            "Denials: who, what, why",
            (
                where,
                "Why: the policy that decided (`binding/role`, or `revoked-jobs` for a revoked job) and Envoy's "
                "response details (which filter refused, e.g. `rbac_access_denied_matched_policy[none]`, "
                "`jwt_authn_access_denied{...}`).",
            ),
            (
                Column("project_path", "Project"),
                Column("job_id", "Job", "id"),
                Column("user", "User"),
                Column("backend", "Backend"),
                Column("method", "Method", "id"),
                Column("path", "Path"),
                Column("status", "Status", "id"),
                Column("policy", "Policy"),
                Column("details", "Details"),
                Column("requests", "Requests", "count"),
                Column("first", "First", "time"),
                Column("last", "Last", "time"),
            ),
            denied,
            denied_more,
        ),
    ]


_CLOUD_ABOUT = (
    "The cloud identity is the AWS role ARN or Google service account a request was sent upstream as, recorded "
    "when the control plane received it (docs/cloud-audit.md): only allowed requests routed to a backend with "
    "`aws:` or `gcp:`; records written before the audit store kept it (SQLite schema 4, PostgreSQL migration "
    "10) have none."
)


def _cloud_sections(usage: Usage, where: str) -> list[Section]:
    """Who requests reached the cloud as: per identity and backend, and per project and job."""
    empty = Table([], 0)
    identities, identities_more = _from_table(usage.tables.get("cloud_identities", empty))
    per_job, per_job_more = _from_table(usage.tables.get("cloud_use", empty))
    return [
        Section(
            "cloud_identities",
            "Cloud identities: who requests reached AWS and Google Cloud as",
            (where, _CLOUD_ABOUT, "Jobs: distinct job ids that sent requests as that identity to that backend."),
            (
                Column("cloud_identity", "Identity"),
                Column("backend", "Backend"),
                Column("requests", "Requests", "count"),
                Column("jobs", "Jobs", "count"),
                Column("first", "First seen", "time"),
                Column("last", "Last seen", "time"),
            ),
            identities,
            identities_more,
        ),
        Section(
            "cloud_use",
            "Cloud identities used, per project and job",
            (where, _CLOUD_ABOUT),
            (
                Column("project_path", "Project"),
                Column("job_id", "Job", "id"),
                Column("cloud_identity", "Identity"),
                Column("backend", "Backend"),
                Column("requests", "Requests", "count"),
                Column("first", "First", "time"),
                Column("last", "Last", "time"),
            ),
            per_job,
            per_job_more,
        ),
    ]


def _revocations_section(inputs: Inputs) -> Section:
    refused: dict[str, Mapping[str, Any]] = {}
    cut = 0  # jobs with refused requests past the database's cap: none of them is in `refused`
    last: tuple[int, str] | None = None
    if inputs.usage is not None:
        table = inputs.usage.tables["revoked_use"]
        refused = {str(row["job_id"] or ""): row for row in table.rows}  # one group per job
        cut = max(0, table.total - len(table.rows))
        # The database returns jobs in `_job_order`: a job sorting before the last one returned had no refused
        # request; one after it, when groups were cut, may have had some: unknown (empty), never a false 0.
        last = _job_order(str(table.rows[-1]["job_id"])) if table.rows else None
    listed = dict(inputs.revocations or {})
    rows = []
    for job in sorted(listed.keys() | refused.keys(), key=_job_order):
        seen = refused.get(job)
        unknown = cut > 0 and (last is None or _job_order(job) > last)
        rows.append(
            {
                "job_id": job,
                "project_path": None if seen is None else _projects(seen),
                "denied_until": listed.get(job),
                "in_deny_list": "yes" if job in listed else "no (expired or pruned)",
                "refused_requests": seen["requests"] if seen else (None if unknown else 0),
                "first_refused": None if seen is None else seen["first"],
                "last_refused": None if seen is None else seen["last"],
            }
        )
    shown, more = _capped(rows, inputs.cap)
    more += cut  # may count a listed job twice (shown, and among the cut): only past --max-rows
    deny_list = (
        "The deny list was not read."
        if inputs.revocations is None
        else f"The deny list as {inputs.state_source} holds it now (job id and denied-until only)."
    )
    return Section(
        "revocations",
        "Revoked jobs",
        (
            deny_list,
            "Refused requests: the audit trail's requests denied by the `revoked-jobs` policy in the window.",
        ),
        (
            Column("job_id", "Job", "id"),
            Column("project_path", "Project"),
            Column("in_deny_list", "In deny list"),
            Column("denied_until", "Denied until", "time"),
            Column("refused_requests", "Refused requests", "count"),
            Column("first_refused", "First refused", "time"),
            Column("last_refused", "Last refused", "time"),
        ),
        shown,
        more,
    )


def _job_order(job: str) -> tuple[int, str]:
    """Job ids are numbers: shortest first, then as text, the order the database is asked for (usage.py)."""
    return (len(job), job)


def _projects(row: Mapping[str, Any]) -> str | None:
    """The project a job's refused requests named; several (job ids reused across issuers): the first, and how
    many others, so no request is attributed to one project silently."""
    path, count = row.get("project_path"), int(row.get("projects") or 0)
    return f"{path} (and {count - 1} other project(s))" if path is not None and count > 1 else path


def _keys_section(inputs: Inputs) -> Section:
    rows = []
    for key in sorted(inputs.keys or (), key=lambda k: k.not_before):
        rows.append(
            {
                "kid": key.kid,
                "created": key.created_at,
                "signs_from": key.not_before,
                "retired_after": key.retire_after,
                "in_window": "yes" if inputs.since <= key.not_before < inputs.until else "no",
            }
        )
    shown, more = _capped(rows, inputs.cap)
    return Section(
        "signing_keys",
        "Signing-key rotations",
        (
            "The signing keys were not read."
            if inputs.keys is None
            else f"The signing keys {inputs.state_source} holds now: when each was created (published), began "
            "signing, and stays published until (its last credential's expiry). `Rotated in window`: it began "
            "signing inside the window.",
        ),
        (
            Column("kid", "Key id", "id"),
            Column("created", "Created", "time"),
            Column("signs_from", "Signs from", "time"),
            Column("retired_after", "Published until", "time"),
            Column("in_window", "Rotated in window"),
        ),
        shown,
        more,
    )


def cell_text(column: Column, value: Any) -> str:
    """A value as CSV and HTML show it: times in UTC, lists one per line, missing values empty."""
    if value is None:
        return ""
    if column.kind == "time" and isinstance(value, int | float):
        return format_time(float(value))
    if column.kind == "lines" and isinstance(value, list | tuple):
        return "\n".join(str(v) for v in value)
    return str(value)


def json_value(column: Column, value: Any) -> Any:
    """A value as the JSON shows it: times as ISO 8601 UTC strings, counts as numbers, lists as lists."""
    if value is None:
        return None
    if column.kind == "time" and isinstance(value, int | float):
        return format_time(float(value))
    if column.kind == "lines" and isinstance(value, list | tuple):
        return [str(v) for v in value]
    if column.kind == "count":
        return int(value)
    return value if isinstance(value, str | int | float) else str(value)


def document(report: Report) -> dict[str, Any]:
    """The JSON output: stable keys (docs/compliance-report.md)."""
    return {
        "format": FORMAT,
        "window": {"since": format_time(report.since), "until": format_time(report.until)},
        "generated": format_time(report.generated),
        "summary": {name: value for name, value in report.summary},
        "sections": {
            s.key: {
                "title": s.title,
                "about": list(s.about),
                "columns": [c.key for c in s.columns],
                "rows": [{c.key: json_value(c, row.get(c.key)) for c in s.columns} for row in s.rows],
                "more": s.more,
            }
            for s in report.sections
        },
        "policy_changes": list(report.changes),
        "access_by_version": list(report.access_by_version),
        "not_recorded": list(report.not_recorded),
    }
