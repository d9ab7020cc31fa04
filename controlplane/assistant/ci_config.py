"""`.gitlab-ci.yml` and its local includes → which jobs ask for ID tokens, for which audience, and where they run.

Pure: the caller hands in a `read(path) -> text | None` function (controlplane/sources/gitlab_ci.py reads the
repository at its default branch through the API); nothing here touches the network or the disk.

What is understood, and how the rest is treated. The assistant must never propose a subject narrower than the
jobs that really run, so everything this module cannot read is taken as *no constraint* (a superset of where the
job may run) and listed in the job's `unknown`, never guessed:

- jobs: top-level mappings whose key is not a keyword (`default`, `include`, `stages`, `variables`, `workflow`...)
  and does not start with `.` (hidden templates); `extends` (a name or a list) is merged in, depth-bounded;
- `id_tokens: NAME: {aud: X | [X...]}` (and `default: id_tokens`, inherited unless the job has its own);
- `environment:` a name or `{name, deployment_tier}`; a name holding `$` is dynamic (kept, flagged);
- `rules:` each `if:` in disjunctive normal form over `==` comparisons of `$CI_COMMIT_BRANCH`,
  `$CI_COMMIT_REF_NAME`, `$CI_COMMIT_TAG`, `$CI_COMMIT_REF_PROTECTED`, `$CI_PIPELINE_SOURCE` with a string or
  `$CI_DEFAULT_BRANCH`; bare `$CI_COMMIT_TAG` / `$CI_COMMIT_BRANCH` (tag or branch pipelines). Other atoms (`!=`,
  `=~`, other variables) are no constraint; `when: never` rules are skipped (a superset); `changes`/`exists` too;
- `only:`/`only: refs:` names, `branches`, `tags` and the pipeline-source keywords; `except:` is skipped;
- `workflow: rules:` is intersected with every job's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import yaml

MAX_INCLUDE_DEPTH = 10
MAX_FILES = 50
MAX_FILE_BYTES = 1024 * 1024
MAX_EXTENDS_DEPTH = 10
MAX_CASES = 64  # disjunctive-normal-form terms of one job; past it the job is "anywhere"
MAX_TOTAL_BYTES = 4 * 1024 * 1024  # all files of one configuration together
MAX_MERGE_STEPS = 1_000_000  # keys visited merging includes and `extends` (aliases make small files huge trees)
MAX_UNKNOWN = 20  # what a job lists as not understood, then "and N more"
MAX_SHOWN = 200  # characters of a condition or a path quoted in a note
CI_FILE = ".gitlab-ci.yml"

KEYWORDS = frozenset(
    {"default", "include", "stages", "variables", "workflow", "image", "services", "cache", "before_script"}
    | {"after_script", "types", "spec"}
)
# `only:` keywords and the pipeline source each stands for.
_ONLY_SOURCES = MappingProxyType(
    {
        "merge_requests": "merge_request_event",
        "schedules": "schedule",
        "pushes": "push",
        "web": "web",
        "api": "api",
        "triggers": "trigger",
        "pipelines": "pipeline",
        "external": "external",
        "chat": "chat",
        "external_pull_requests": "external_pull_request_event",
    }
)


@dataclass(frozen=True)
class RuleCase:
    """One way a job may run: every field None is "any". `text` is where it came from, for the evidence."""

    refs: frozenset[str] | None = None
    ref_type: str | None = None  # "branch" | "tag"
    protected: bool | None = None
    sources: frozenset[str] | None = None
    text: str = "always"


ANYWHERE = RuleCase()


@dataclass(frozen=True)
class CiJob:
    name: str
    id_tokens: tuple[tuple[str, tuple[str, ...]], ...]  # (variable, audiences), sorted
    environment: str | None = None
    tier: str | None = None
    cases: tuple[RuleCase, ...] = (ANYWHERE,)
    unknown: tuple[str, ...] = ()  # what was not understood (taken as no constraint)
    # its audiences could not all be read (a variable, a `!reference`, a template not found): it may ask for any
    audience_unknown: bool = False

    @property
    def audiences(self) -> frozenset[str]:
        return frozenset(aud for _, auds in self.id_tokens for aud in auds)

    @property
    def refs(self) -> frozenset[str] | None:
        """The literal refs it may run on, or None when any (or not understood)."""
        found: set[str] = set()
        for case in self.cases:
            if case.refs is None:
                return None
            found |= case.refs
        return frozenset(found)

    @property
    def sources(self) -> frozenset[str] | None:
        found: set[str] = set()
        for case in self.cases:
            if case.sources is None:
                return None
            found |= case.sources
        return frozenset(found)

    @property
    def always_protected(self) -> bool:
        return bool(self.cases) and all(case.protected is True for case in self.cases)


@dataclass(frozen=True)
class CiConfig:
    project: str
    files: tuple[str, ...]  # read, in order
    jobs: tuple[CiJob, ...]  # sorted by name
    notes: tuple[str, ...] = ()  # includes not read, bounds reached, YAML errors
    default_branch: str | None = None  # where it was read: the configuration jobs of other refs ran may differ

    @property
    def complete(self) -> bool:
        """Every file was read and merged: no job can be missing. Without it, nothing may be pinned from CI (a
        job not read may run elsewhere, with another environment)."""
        return not self.notes

    def jobs_for(self, audience: str) -> tuple[CiJob, ...]:
        """The jobs that may ask for `audience`: those naming it, and those whose audiences are not known."""
        return tuple(job for job in self.jobs if audience in job.audiences or job.audience_unknown)


# --- YAML: GitLab's own tags are opaque values, never an error


class _Opaque(str):
    """A value behind a tag this module does not evaluate (`!reference [.x, rules]`)."""


def _opaque(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Opaque:
    return _Opaque(f"!{suffix}")


def parse_yaml(text: str) -> Any:
    """Safe YAML (anchors and merge keys as GitLab reads them), any `!tag` an opaque value. The tag constructor is
    set on this one loader instance, never on a class: nothing is registered module-wide."""
    loader = yaml.SafeLoader(text)
    loader.yaml_multi_constructors = {**yaml.SafeLoader.yaml_multi_constructors, "!": _opaque}  # type: ignore[misc]  # per instance, on purpose
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


# --- loading: the file, its local includes, merged as GitLab merges them


@dataclass
class _Reading:
    read: Callable[[str], str | None]
    max_file_bytes: int
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    total_bytes: int = 0
    budget: _Budget = field(default_factory=lambda: _Budget(MAX_MERGE_STEPS))


class _TooLarge(Exception):
    """The merge budget ran out: YAML aliases can make a kilobyte a tree of billions of nodes."""


@dataclass
class _Budget:
    """Merge steps left for one configuration; spent by `deep_merge` and `extends`, shared by every job."""

    left: int

    def spend(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise _TooLarge()


def load_ci_config(
    project: str,
    read: Callable[[str], str | None],
    *,
    default_branch: str | None,
    max_file_bytes: int = MAX_FILE_BYTES,
    ci_file: str | None = None,
) -> CiConfig:
    """The project's CI configuration as jobs; `read(path)` gives a repository file's text or None. A text longer
    than `max_file_bytes` (a reader cuts one past its bound) is reported and not parsed: a cut file is not one."""
    reading = _Reading(read, max_file_bytes)
    root = _repository_path(ci_file) if ci_file else CI_FILE
    if root is None or (ci_file is not None and ("@" in ci_file or ci_file.startswith(("http://", "https://")))):
        # the project's CI file lives in another project or at a URL: its jobs are not known here
        note = f"the project's CI configuration is {shown(str(ci_file))} (another project, a URL): not read"
        return CiConfig(project, (), (), (note,), default_branch)
    try:
        merged = _load_file(root, reading, depth=0, seen=())
    except _TooLarge:
        reading.notes.append(f"includes: more than {MAX_MERGE_STEPS} steps to merge (YAML aliases?): not read")
        merged = None
    if merged is None:
        return CiConfig(project, tuple(reading.files), (), tuple(reading.notes), default_branch)
    jobs, notes = jobs_of(merged, default_branch=default_branch, budget=reading.budget)
    return CiConfig(project, tuple(reading.files), jobs, tuple(reading.notes) + notes, default_branch)


def _load_file(path: str, reading: _Reading, *, depth: int, seen: tuple[str, ...]) -> dict[str, Any] | None:
    if path in seen:
        reading.notes.append(f"{path}: include cycle ({' -> '.join((*seen, path))}): not read again")
        return None
    if len(reading.files) >= MAX_FILES:
        reading.notes.append(f"{path}: not read: more than {MAX_FILES} files")
        return None
    text = reading.read(path)
    if text is None:
        reading.notes.append(f"{path}: not found at the default branch")
        return None
    reading.files.append(path)
    size = len(text.encode())
    reading.total_bytes += size
    if size > reading.max_file_bytes:
        reading.notes.append(f"{path}: larger than {reading.max_file_bytes} bytes: not parsed")
        return None
    if reading.total_bytes > MAX_TOTAL_BYTES:
        reading.notes.append(f"{path}: not parsed: the files read exceed {MAX_TOTAL_BYTES} bytes together")
        return None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        reading.notes.append(f"{path}{line}: not valid YAML: {getattr(error, 'problem', None) or 'parse error'}")
        return None
    except RecursionError:  # PyYAML composes recursively: `[[[[...` thousands deep
        reading.notes.append(f"{path}: nested too deep: not parsed")
        return None
    if data is None:
        return {}
    if not isinstance(data, dict):
        reading.notes.append(f"{path}: not a mapping")
        return None
    merged: dict[str, Any] = {}
    for target in _local_includes(data.get("include"), path, reading):
        if depth + 1 > MAX_INCLUDE_DEPTH:
            reading.notes.append(f"{target}: not read: includes nest deeper than {MAX_INCLUDE_DEPTH}")
            continue
        included = _load_file(target, reading, depth=depth + 1, seen=(*seen, path))
        if included is not None:
            merged = deep_merge(merged, included, reading.budget)
    own = {k: v for k, v in data.items() if k != "include"}
    return deep_merge(merged, own, reading.budget)


def _local_includes(value: Any, path: str, reading: _Reading) -> list[str]:
    items = value if isinstance(value, list) else ([] if value is None else [value])
    found: list[str] = []
    for item in items:
        if isinstance(item, _Opaque):
            reading.notes.append(f"{path}: include {item}: not read (a tag)")
        elif isinstance(item, str) and not item.startswith(("http://", "https://")):
            found.append(item)
        elif isinstance(item, dict) and isinstance(item.get("local"), str) and not isinstance(item["local"], _Opaque):
            found.append(str(item["local"]))
        else:
            kind = next(iter(item), "?") if isinstance(item, dict) else "remote"
            reading.notes.append(f"{path}: include {shown(str(kind))}: not read (only local includes are)")
    targets = []
    for target in found:
        normal = _repository_path(target)
        if normal is None:
            reading.notes.append(f"{path}: include {shown(target)}: wildcards, variables, `..` and queries not read")
        else:
            targets.append(normal)
    return targets


def _repository_path(target: str) -> str | None:
    """A local include as one spelling of a path in the repository (`./a.yml`, `/a.yml` and `a.yml` are one
    file, so a cycle through spellings is seen), or None for what is not a plain path: a wildcard, a variable, a
    `..` (it would leave the repository), a query, a control character."""
    if any(c in target for c in "*$?#\\") or not target.isprintable():
        return None
    parts = [p for p in target.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def shown(text: str) -> str:
    """`text` for a note: cut to `MAX_SHOWN` characters (a condition can be a megabyte)."""
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any], budget: _Budget | None = None) -> dict[str, Any]:
    """GitLab's merge of includes and `extends`: mappings merge key by key, anything else is replaced. Each key
    visited spends a step of `budget` (`_TooLarge` when it runs out)."""
    out = dict(base)
    for key, value in over.items():
        if budget is not None:
            budget.spend()
        old = out.get(key)
        out[key] = deep_merge(old, value, budget) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


# --- jobs


def jobs_of(
    config: Mapping[str, Any], *, default_branch: str | None, budget: _Budget | None = None
) -> tuple[tuple[CiJob, ...], tuple[str, ...]]:
    """Every job of a merged configuration, sorted by name; and notes about the configuration as a whole."""
    notes: list[str] = []
    budget = budget or _Budget(MAX_MERGE_STEPS)
    templates: dict[str, dict[str, Any] | None] = {}  # `extends` resolved once per template, whatever the fan-out
    default = config.get("default")
    default_tokens = default.get("id_tokens") if isinstance(default, dict) else None
    workflow = config.get("workflow")
    workflow_cases: tuple[RuleCase, ...] = (ANYWHERE,)
    workflow_unknown: list[str] = []
    overridden = _overridden(config.get("variables"))
    if isinstance(workflow, dict) and "rules" in workflow:
        workflow_cases = _rule_cases(workflow["rules"], default_branch, workflow_unknown, overridden)
    workflow_unknown = _capped(workflow_unknown)
    jobs = []
    for name in sorted(k for k in config if isinstance(k, str)):
        body = config[name]
        if name in KEYWORDS or name.startswith(".") or not isinstance(body, dict):
            continue
        unknown = [f"workflow: {u}" for u in workflow_unknown]
        try:
            resolved = _extended(body, config, unknown, budget, templates)
        except _TooLarge:
            unknown.append(f"extends: more than {MAX_MERGE_STEPS} steps to merge (YAML aliases?): not read")
            jobs.append(CiJob(name, (), unknown=tuple(_capped(unknown)), audience_unknown=True))
            continue
        if "trigger" in resolved:  # a child pipeline's jobs run in this project, from a file not read here
            notes.append(f"job {shown(name)}: triggers a pipeline whose configuration is not read")
        overrides = overridden | _overridden(resolved.get("variables"))
        jobs.append(_job(name, resolved, default_tokens, default_branch, workflow_cases, unknown, overrides))
    return tuple(jobs), tuple(notes)


INTERPRETED = frozenset(
    {"CI_COMMIT_BRANCH", "CI_COMMIT_TAG", "CI_COMMIT_REF_NAME", "CI_COMMIT_REF_PROTECTED", "CI_PIPELINE_SOURCE"}
    | {"CI_DEFAULT_BRANCH"}
)


def _overridden(variables: Any) -> frozenset[str]:
    """The predefined variables the rules are read by that the file itself sets (`variables:` outranks GitLab's
    predefined ones): `$CI_COMMIT_BRANCH == "main"` then holds on every branch, so it constrains nothing."""
    return INTERPRETED & frozenset(variables) if isinstance(variables, dict) else frozenset()


def _capped(unknown: list[str]) -> list[str]:
    if len(unknown) <= MAX_UNKNOWN:
        return unknown
    return [*unknown[:MAX_UNKNOWN], f"and {len(unknown) - MAX_UNKNOWN} more"]


_MISSING = "extends: a template not found or nested too deep"


def _extended(
    body: dict[str, Any],
    config: Mapping[str, Any],
    unknown: list[str],
    budget: _Budget,
    templates: dict[str, dict[str, Any] | None],
) -> dict[str, Any]:
    """The job with its `extends` merged in. A template is resolved once (memo `templates`, None while being
    resolved: a cycle), so `extends: [.a, .a, ...]` fanned out ten deep costs ten merges, not ten billion."""

    def template(parent: Any, depth: int) -> dict[str, Any] | None:
        found = config.get(parent) if isinstance(parent, str) else None
        cycle = parent in templates and templates[parent] is None
        if not isinstance(found, dict) or depth >= MAX_EXTENDS_DEPTH or cycle:
            return None
        if parent not in templates:
            templates[parent] = None
            templates[parent] = walk(found, depth + 1)
        return templates[parent]

    def walk(current: dict[str, Any], depth: int) -> dict[str, Any]:
        parents = current.get("extends")
        names = [parents] if isinstance(parents, str) else parents if isinstance(parents, list) else []
        merged: dict[str, Any] = {}
        for parent in names:
            budget.spend()
            resolved = template(parent, depth)
            if resolved is None:
                unknown.append(f"extends {shown(str(parent))}: not found, in a cycle or nested too deep")
                merged = {**merged, _MISSING: True}
                continue
            merged = deep_merge(merged, resolved, budget)
        return deep_merge(merged, {k: v for k, v in current.items() if k != "extends"}, budget)

    return walk(body, 0)


def _job(
    name: str,
    body: Mapping[str, Any],
    default_tokens: Any,
    default_branch: str | None,
    workflow: tuple[RuleCase, ...],
    unknown: list[str],
    overridden: frozenset[str] = frozenset(),
) -> CiJob:
    tokens = body.get("id_tokens", default_tokens)
    inherit = body.get("inherit")
    if "id_tokens" not in body and isinstance(inherit, dict) and inherit.get("default") is False:
        tokens = None
    environment, tier = _environment(body.get("environment"), unknown)
    if "rules" in body:
        cases = _rule_cases(body["rules"], default_branch, unknown, overridden)
    elif "only" in body:
        cases = _only_cases(body["only"], unknown)
    else:
        cases = (ANYWHERE,)
    if "except" in body:
        unknown.append("except: not applied")
    id_tokens, audience_unknown = _id_tokens(tokens, unknown)
    if _MISSING in body:
        audience_unknown = True  # the template not read may hold its id_tokens
    return CiJob(
        name=name,
        id_tokens=id_tokens,
        environment=environment,
        tier=tier,
        cases=_intersect_all(workflow, cases, unknown),
        unknown=tuple(_capped(unknown)),
        audience_unknown=audience_unknown,
    )


def _id_tokens(value: Any, unknown: list[str]) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], bool]:
    """The tokens and their literal audiences; and whether some audience could not be read (a variable, a tag),
    so the job may ask for any audience."""
    if value is None:
        return (), False
    if not isinstance(value, dict):
        unknown.append("id_tokens: not a mapping (a !reference?): may ask for any audience")
        return (), True
    out = []
    unreadable = False
    for var, spec in value.items():
        aud = spec.get("aud") if isinstance(spec, dict) else None
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        opaque = not auds or any(not isinstance(a, str) or isinstance(a, _Opaque) for a in auds)
        kept = tuple(sorted({str(a) for a in auds if isinstance(a, str) and not isinstance(a, _Opaque)}))
        if any("$" in a for a in kept) or opaque:
            unknown.append(f"id_tokens {shown(str(var))}: audience holds a variable or a tag: may ask for any")
            unreadable = True
        out.append((str(var), tuple(a for a in kept if "$" not in a)))
    return tuple(sorted(out)), unreadable


def _environment(value: Any, unknown: list[str]) -> tuple[str | None, str | None]:
    name: Any = value
    tier: Any = None
    if isinstance(value, dict):
        name, tier = value.get("name"), value.get("deployment_tier")
    if name is not None and (not isinstance(name, str) or isinstance(name, _Opaque)):
        unknown.append("environment: not a name (a !reference?)")
        return None, None
    if isinstance(name, str) and "$" in name:
        unknown.append(f"environment {name}: dynamic (holds a variable)")
    return name, tier if isinstance(tier, str) else None


# --- rules


def _rule_cases(
    rules: Any, default_branch: str | None, unknown: list[str], overridden: frozenset[str] = frozenset()
) -> tuple[RuleCase, ...]:
    if not isinstance(rules, list):
        unknown.append("rules: not a list (a !reference?)")
        return (ANYWHERE,)
    cases: list[RuleCase] = []
    for rule in rules:
        if not isinstance(rule, dict):
            unknown.append("rules: an entry that is not a mapping")
            cases.append(ANYWHERE)
            continue
        if rule.get("when") == "never":
            if "if" in rule:
                unknown.append(f"when: never rule skipped: {shown(str(rule['if']))}")
            continue
        condition = rule.get("if")
        if condition is None:
            cases.append(replace(ANYWHERE, text="a rule without if"))
            continue
        cases.extend(condition_cases(str(condition), default_branch, unknown, overridden=overridden))
    return tuple(cases[:MAX_CASES]) if len(cases) <= MAX_CASES else (ANYWHERE,)


def _only_cases(only: Any, unknown: list[str]) -> tuple[RuleCase, ...]:
    refs = only.get("refs") if isinstance(only, dict) else only
    if isinstance(only, dict) and set(only) - {"refs"}:
        unknown.append(f"only: {', '.join(sorted(set(only) - {'refs'}))} not applied")
    if refs is None:
        return (ANYWHERE,)
    items = [refs] if isinstance(refs, str) else refs if isinstance(refs, list) else []
    cases = []
    for item in items:
        text = f"only: {item}"
        if not isinstance(item, str) or isinstance(item, _Opaque) or item.startswith("/"):
            unknown.append(f"only: {item}: not understood")
            cases.append(replace(ANYWHERE, text=text))
        elif item == "branches":
            cases.append(RuleCase(ref_type="branch", text=text))
        elif item == "tags":
            cases.append(RuleCase(ref_type="tag", text=text))
        elif item in _ONLY_SOURCES:
            cases.append(RuleCase(sources=frozenset({_ONLY_SOURCES[item]}), text=text))
        else:
            cases.append(RuleCase(refs=frozenset({item}), text=text))
    return tuple(cases) or (ANYWHERE,)


_TOKEN = re.compile(
    r"\s*(?:(?P<op>&&|\|\||==|!=|=~|!~|\(|\))|(?P<var>\$\{?[A-Za-z_][A-Za-z0-9_]*\}?)"
    r"|(?P<str>\"[^\"]*\"|'[^']*')|(?P<re>/(?:\\.|[^/\\])*/[a-z]*)|(?P<null>null))"
)


class _Unparsable(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise _Unparsable(text[pos : pos + 20])
        kind = match.lastgroup or "op"
        out.append((kind, match.group(kind)))
        pos = match.end()
    return out


Atom = tuple[str, str, str | None]  # (variable, operator, operand) - operand None for a bare variable
Dnf = list[list[Atom]]


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise _Unparsable("unexpected end")
        self.pos += 1
        return token

    def parse(self) -> Dnf:
        result = self.disjunction()
        if self.peek() is not None:
            raise _Unparsable(f"unexpected {self.peek()}")
        return result

    def disjunction(self) -> Dnf:
        terms = self.conjunction()
        while self.peek() == ("op", "||"):
            self.take()
            terms = terms + self.conjunction()
        return terms

    def conjunction(self) -> Dnf:
        terms = self.primary()
        while self.peek() == ("op", "&&"):
            self.take()
            right = self.primary()
            terms = [a + b for a in terms for b in right]
            if len(terms) > MAX_CASES:
                raise _Unparsable("too many cases")
        return terms

    def primary(self) -> Dnf:
        kind, value = self.take()
        if (kind, value) == ("op", "("):
            inner = self.disjunction()
            if self.take() != ("op", ")"):
                raise _Unparsable("unbalanced parentheses")
            return inner
        following = self.peek()
        if following is not None and following[0] == "op" and following[1] in ("==", "!=", "=~", "!~"):
            op = self.take()[1]
            right_kind, right = self.take()
            if "op" in (kind, right_kind):
                raise _Unparsable(f"{op} needs two operands")
            if kind != "var":
                kind, value, right_kind, right = right_kind, right, kind, value
            if kind != "var":
                return [[("", op, right)]]
            return [[(_var(value), op, _operand(right_kind, right))]]
        if kind == "var":
            return [[(_var(value), "set", None)]]
        return [[("", "literal", value)]]


def _var(token: str) -> str:
    return token.strip("${}")


def _operand(kind: str, token: str) -> str:
    if kind == "str":
        return "=" + token[1:-1]
    if kind == "var":
        return "$" + _var(token)
    return kind + ":" + token


def condition_cases(
    condition: str, default_branch: str | None, unknown: list[str], *, overridden: frozenset[str] = frozenset()
) -> list[RuleCase]:
    """One `if:` as the cases it allows (an OR of ANDs); what is not understood is no constraint."""
    try:
        dnf = _Parser(_tokens(condition)).parse()
    except (_Unparsable, RecursionError):  # RecursionError: parentheses thousands deep
        unknown.append(f"if: {shown(condition)}: not parsed")
        return [replace(ANYWHERE, text=f"if: {shown(condition)}")]
    cases = []
    for term in dnf:
        case: RuleCase | None = replace(ANYWHERE, text=f"if: {shown(condition)}")
        for atom in term:
            if case is None:
                break
            case = _apply(case, atom, default_branch, condition, unknown, overridden)
        if case is not None:
            cases.append(case)
    return cases


def _apply(
    case: RuleCase,
    atom: Atom,
    default_branch: str | None,
    condition: str,
    unknown: list[str],
    overridden: frozenset[str] = frozenset(),
) -> RuleCase | None:
    """The case narrowed by one atom; None when the atom contradicts it (this term never runs)."""
    var, op, operand = atom
    value: str | None = None
    if operand is not None and operand.startswith("="):
        value = operand[1:]
    elif operand == "$CI_DEFAULT_BRANCH" and default_branch is not None and "CI_DEFAULT_BRANCH" not in overridden:
        value = default_branch
    narrowed: RuleCase | None
    if var in overridden:
        unknown.append(f"if: {shown(condition)}: ${var} is set by the file's variables: taken as no constraint")
        return case
    if op == "set" and var == "CI_COMMIT_TAG":
        narrowed = _narrow(case, ref_type="tag")
    elif op == "set" and var == "CI_COMMIT_BRANCH":
        narrowed = _narrow(case, ref_type="branch")
    elif op == "==" and value is not None and var in ("CI_COMMIT_BRANCH", "CI_COMMIT_TAG", "CI_COMMIT_REF_NAME"):
        kind = {"CI_COMMIT_BRANCH": "branch", "CI_COMMIT_TAG": "tag"}.get(var)
        narrowed = _narrow(case, refs=frozenset({value}), ref_type=kind)
    elif op == "==" and value in ("true", "false") and var == "CI_COMMIT_REF_PROTECTED":
        narrowed = _narrow(case, protected=value == "true")
    elif op == "==" and value is not None and var == "CI_PIPELINE_SOURCE":
        narrowed = _narrow(case, sources=frozenset({value}))
    else:
        atom_text = f"${var} {op} {operand[1:] if operand and operand[0] in '=$' else operand or ''}".strip()
        unknown.append(f"if: {shown(condition)}: `{shown(atom_text)}` taken as no constraint")
        return case
    return narrowed


def _narrow(
    case: RuleCase,
    *,
    refs: frozenset[str] | None = None,
    ref_type: str | None = None,
    protected: bool | None = None,
    sources: frozenset[str] | None = None,
) -> RuleCase | None:
    other = RuleCase(refs, ref_type, protected, sources, case.text)
    return _intersect(case, other)


def _intersect(a: RuleCase, b: RuleCase) -> RuleCase | None:
    refs = _meet(a.refs, b.refs)
    sources = _meet(a.sources, b.sources)
    if (refs is not None and not refs) or (sources is not None and not sources):
        return None
    if a.ref_type and b.ref_type and a.ref_type != b.ref_type:
        return None
    if a.protected is not None and b.protected is not None and a.protected != b.protected:
        return None
    text = a.text if b.text in ("always", a.text) else b.text if a.text == "always" else f"{a.text} and {b.text}"
    return RuleCase(
        refs,
        a.ref_type or b.ref_type,
        a.protected if a.protected is not None else b.protected,
        sources,
        text,
    )


def _meet(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _intersect_all(workflow: Sequence[RuleCase], cases: Sequence[RuleCase], unknown: list[str]) -> tuple[RuleCase, ...]:
    """Workflow cases AND job cases; past `MAX_CASES` terms the job is "anywhere" (64 x 64 cases for each of
    20,000 jobs would be gigabytes)."""
    if len(workflow) * len(cases) > MAX_CASES:
        unknown.append(f"workflow and job rules: more than {MAX_CASES} cases together: taken as no constraint")
        return (replace(ANYWHERE, text="too many cases"),)
    out = []
    for w in workflow:
        for c in cases:
            met = _intersect(w, c)
            if met is not None:
                out.append(met)
    return tuple(out)
