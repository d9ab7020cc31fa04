"""`controlplane diff`: access changes read from the resolved policies, checked against the Evaluator.

Every case edits a copy of the quickstart policy. Besides the expected lines, each gain is checked to be real:
some request of that subject is allowed by the NEW policy's evaluation and denied by the OLD one's (and each
loss the other way round), so the diff cannot claim what evaluation does not do.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.cli.diff import load_side
from controlplane.cli.main import main
from controlplane.resolved.access import ResolvedPolicy
from controlplane.resolved.conditions import Condition, ResolvedSubject
from controlplane.resolved.diff import ANY, Change, PolicyDiff, compare, path_pattern
from controlplane.resolved.evaluate import Evaluator
from controlplane.sources.policy_dir import ReadLimits
from tests.support.policy_parts import Edit
from tests.support.policy_parts import replace_in as _replace
from tests.support.policy_repo import GRANT, git

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart"


def _append(name: str, text: str) -> Edit:
    def edit(root: Path) -> None:
        with (root / name).open("a") as out:
            out.write(text)

    return edit


def _reorder(root: Path) -> None:
    """The same documents, in another order and another file layout."""
    roles = (root / "roles.yaml").read_text().split("\n---\n")
    (root / "roles.yaml").write_text("\n---\n".join(reversed(roles)))
    (root / "more").mkdir()
    (root / "bindings.yaml").rename(root / "more" / "z-bindings.yaml")


NEW_BINDING = "\n---\n" + GRANT

NEW_BACKEND_ROLE = """
---
kind: Role
name: deploy-read
backend: deploy-api
rules:
  - methods: [GET]
    paths: ["/status"]
"""


def _tree(tmp_path: Path, name: str, *edits: Edit) -> Path:
    root = tmp_path / name
    shutil.copytree(QUICKSTART, root)
    for edit in edits:
        edit(root)
    return root


def _load(root: Path) -> tuple[ResolvedPolicy, dict[str, tuple[str, ...]]]:
    side = load_side(root, str(root), ReadLimits())
    assert side is not None
    return side.resolved, {g.name: g.backends for g in side.policy.gateways}


# (case id, edits of NEW, expected text lines (substrings, in order), expected exit)
CASES: list[tuple[str, list[Edit], list[str], int]] = [
    ("unchanged-reordered", [_reorder], [], 0),
    (
        "binding-added",
        [_append("bindings.yaml", NEW_BINDING)],
        ["backend reports-api", "+ iss = http://127.0.0.1:8090 and project_id = 43", "gains GET, HEAD /**"],
        1,
    ),
    (
        "path-narrowed",
        [_replace("roles.yaml", '["/**"]', '["/reports/*"]')],
        ["backend reports-api", "- iss = http://127.0.0.1:8090 and project_id = 42", "loses GET, HEAD /**"],
        1,
    ),
    (
        "method-added",
        [_replace("roles.yaml", "methods: [GET]\n", "methods: [GET, DELETE]\n")],
        ["backend deploy-api", "+ ", "gains DELETE /deployments/*"],
        1,
    ),
    (
        "claims-condition-changed",
        [_replace("bindings.yaml", "pipeline_source: push", "pipeline_source: web")],
        ["backend deploy-api", "+ ", "pipeline_source = web", "- ", "pipeline_source = push"],
        1,
    ),
    (
        "shadow-to-enforce",
        [],  # OLD is the shadow one here, see test below
        [],
        0,
    ),
]


def _shadow(root: Path) -> None:
    _replace("bindings.yaml", "name: deployer-deploys\n", "name: deployer-deploys\nmode: shadow\n")(root)


@pytest.mark.parametrize(("case", "edits", "expected", "code"), [c for c in CASES if c[0] != "shadow-to-enforce"])
def test_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, edits: list[Edit], expected: list[str], code: int
) -> None:
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", *edits)
    assert main(["diff", str(old), str(new)]) == code
    out = capsys.readouterr().out
    if not expected:
        assert out == ""
    _in_order(out, expected)
    _check_against_evaluation(old, new)


def test_shadow_to_enforce(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _tree(tmp_path, "old", _shadow), _tree(tmp_path, "new")
    assert main(["diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    _in_order(
        out,
        [
            "backend deploy-api",
            "+ ",
            "gains",
            "! deployer-deploys/deploy-trigger: shadow -> enforce: would start enforcing",
        ],
    )
    _check_against_evaluation(old, new)
    assert main(["diff", str(new), str(old)]) == 1
    back = capsys.readouterr().out
    _in_order(back, ["- ", "loses", "enforce -> shadow: would stop enforcing"])


def test_backend_and_gateway_removed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def drop_deploy(root: Path) -> None:
        docs = (root / "backends.yaml").read_text().split("\n---\n")
        (root / "backends.yaml").write_text("\n---\n".join(d for d in docs if "deploy-api" not in d))
        roles = (root / "roles.yaml").read_text().split("\n---\n")
        (root / "roles.yaml").write_text("\n---\n".join(d for d in roles if "deploy-api" not in d))
        bindings = (root / "bindings.yaml").read_text().split("\n---\n")
        (root / "bindings.yaml").write_text("\n---\n".join(d for d in bindings if "deploy-trigger" not in d))
        _replace("gateway.yaml", "backends: [reports-api, deploy-api]", "backends: [reports-api]")(root)
        _replace("gateway.yaml", "name: ci-gateway", "name: ci-gateway-2")(root)

    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", drop_deploy)
    assert main(["diff", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    _in_order(
        out,
        ["backend deploy-api (removed)", "- ", "loses", "gateway ci-gateway-2: added", "gateway ci-gateway: removed"],
    )
    _in_order(out, ["envoy resources:", "gateway ci-gateway:"])
    _check_against_evaluation(old, new)


def test_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", _append("roles.yaml", NEW_BACKEND_ROLE))
    new_binding = NEW_BINDING.replace("frontend-reads-reports", "frontend-reads-deploys").replace(
        "reports-read", "deploy-read"
    )
    _append("bindings.yaml", new_binding)(new)
    assert main(["diff", "--json", str(old), str(new)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert sorted(data) == ["backends", "changed", "gateways", "resources"]
    assert data["changed"] is True
    assert data["gateways"] == {"added": [], "removed": [], "fronts": []}
    [backend] = data["backends"]
    assert backend["name"] == "deploy-api" and backend["status"] == "changed"
    assert backend["losses"] == [] and backend["modes"] == []
    assert backend["shadow"] == {"added": [], "removed": []}
    [gain] = backend["gains"]
    assert sorted(gain) == ["methods", "path", "subject", "via"]
    assert gain["methods"] == ["GET"] and gain["path"] == "/status"
    assert gain["via"] == ["frontend-reads-deploys/deploy-read"]
    assert "project_id = 43" in gain["subject"]
    assert "ci-gateway" in data["resources"]
    counts = data["resources"]["ci-gateway"]
    assert counts and all(sorted(c) == ["added", "changed", "removed"] for c in counts.values())
    assert counts["RouteConfiguration"]["changed"] >= 1
    assert main(["diff", "--json", str(old), str(old)]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same == {
        "backends": [],
        "changed": False,
        "gateways": {"added": [], "removed": [], "fronts": []},
        "resources": {},
    }


def test_invalid_side(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _tree(tmp_path, "old")
    new = _tree(tmp_path, "new", _replace("bindings.yaml", "roles: [deploy-trigger]", "roles: [no-such-role]"))
    assert main(["diff", str(old), str(new)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "bindings.yaml:" in captured.err and "no-such-role" in captured.err
    assert main(["diff", str(old), str(tmp_path / "nowhere")]) == 2
    assert "not a directory nor a git revision" in capsys.readouterr().err


def test_git_revisions(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    shutil.copytree(QUICKSTART, repo / "policy")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    _append("bindings.yaml", NEW_BINDING)(repo / "policy")
    git(repo, "commit", "-q", "-am", "two")
    monkeypatch.chdir(repo)
    assert main(["diff", "HEAD~1:policy", "HEAD:policy"]) == 1
    _in_order(capsys.readouterr().out, ["backend reports-api", "+ ", "project_id = 43", "gains GET, HEAD /**"])
    assert main(["diff", "HEAD~1:policy", "policy"]) == 1  # a revision against the work tree
    capsys.readouterr()
    assert main(["diff", "HEAD:policy", "policy"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["diff", "no-such-rev", "policy"]) == 2
    assert "not a directory nor a git revision" in capsys.readouterr().err


def test_path_coverage() -> None:
    assert path_pattern("/**").fullmatch("/a/b/**")
    assert path_pattern("/a/*").fullmatch("/a/*")
    assert path_pattern("/a/*").fullmatch("/a/b")
    assert not path_pattern("/a/*").fullmatch("/a/b/c")
    assert not path_pattern("/a/b").fullmatch("/a/*")


# -- the diff against evaluation


def _in_order(text: str, parts: list[str]) -> None:
    at = 0
    for part in parts:
        found = text.find(part, at)
        assert found >= 0, f"{part!r} not found after position {at} in:\n{text}"
        at = found + len(part)


def _check_against_evaluation(old: Path, new: Path) -> int:
    """Every gain and loss has a witness; returns how many lines were checked."""
    before, old_gateways = _load(old)
    after, new_gateways = _load(new)
    diff = compare(before, after, old_gateways, new_gateways)
    for backend in diff.backends:
        for change in backend.gains:
            assert _witness(change, allowed=after, denied=before, backend=backend.name), change
        for change in backend.losses:
            assert _witness(change, allowed=before, denied=after, backend=backend.name), change
    _check_complete(before, after, diff)
    return sum(len(b.gains) + len(b.losses) for b in diff.backends)


def _check_complete(before: ResolvedPolicy, after: ResolvedPolicy, diff: PolicyDiff) -> None:
    """The other way round: every generated request whose decision differs between the sides is on a line."""
    evaluator = Evaluator()
    listed = {b.name: b for b in diff.backends}
    for backend in sorted(before.backends.keys() | after.backends.keys()):
        grants = [*before.grants(backend), *after.grants(backend)]
        claims_sets = [c for g in grants for s in g.subjects for c in _claims_for(s)]
        methods = sorted({m for g in grants for r in g.rules for m in r.methods} | {"GET"})
        paths = sorted({p for g in grants for r in g.rules for rp in r.paths or (ANY,) for p in _paths_for(rp)})
        for claims, method, path in itertools.product(claims_sets, methods, paths):
            was = _allows(evaluator, before, backend, claims, method, path)
            now = _allows(evaluator, after, backend, claims, method, path)
            if was == now:
                continue
            lines = listed[backend].gains if now else listed[backend].losses
            assert any(_line_covers(evaluator, c, claims, method, path) for c in lines), (backend, claims, method, path)


def _line_covers(evaluator: Evaluator, change: Change, claims: dict[str, Any], method: str, path: str) -> bool:
    methods_ok = ANY in change.methods or method in change.methods
    path_ok = change.path == ANY or path_pattern(change.path).fullmatch(path) is not None
    return methods_ok and path_ok and evaluator.subject_matches(claims, change.resolved)


def _witness(change: Change, allowed: ResolvedPolicy, denied: ResolvedPolicy, backend: str) -> bool:
    """Whether some generated (claims, method, path) of the change is allowed by one side and denied by the other."""
    evaluator = Evaluator()
    for claims in _claims_for(change.resolved):
        for method in change.methods:
            for path in _paths_for(change.path):
                concrete = "GET" if method == ANY else method
                yes = _allows(evaluator, allowed, backend, claims, concrete, path)
                no = _allows(evaluator, denied, backend, claims, concrete, path)
                if yes and not no:
                    return True
    return False


def _allows(
    evaluator: Evaluator, resolved: ResolvedPolicy, backend: str, claims: dict[str, Any], method: str, path: str
) -> bool:
    for grant in evaluator.grants_for(claims, resolved.grants(backend)):
        for rule in grant.rules:
            methods_ok = not rule.methods or method in rule.methods
            if methods_ok and (not rule.paths or any(path_pattern(p).fullmatch(path) for p in rule.paths)):
                return True
    return False


def _paths_for(pattern: str) -> list[str]:
    """Concrete paths the pattern matches: the pattern's own stem and something below it."""
    if pattern == ANY:
        return ["/", "/x"]
    stem = pattern[: -len("/**")] if pattern.endswith("/**") else pattern
    concrete = stem.replace("*", "x") or "/"
    return [concrete, concrete.rstrip("/") + "/deeper"] if pattern.endswith("/**") else [concrete]


def _claims_for(subject: ResolvedSubject) -> Iterator[dict[str, Any]]:
    """Claims satisfying the subject, one per choice of value of each condition (and alternative)."""
    alternatives = subject.alternatives or ((),)
    for alternative in alternatives:
        conditions = [*subject.conditions, *alternative]
        choices = [_values(c) for c in conditions]
        for picked in itertools.product(*choices):
            claims: dict[str, Any] = {}
            for condition, value in zip(conditions, picked, strict=True):
                if value is not None:
                    claims[condition.claim] = value
            yield claims


def _values(condition: Condition) -> list[str | None]:
    if condition.negated:
        return [None, "something-else"]
    return [v.replace("*", "x").replace("?", "y") for v in condition.values]


def test_new_shadow_binding_changes_no_access(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shadow = NEW_BINDING.replace("issuer: gitlab", "issuer: gitlab\nmode: shadow")
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", _append("bindings.yaml", shadow))
    assert main(["diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    _in_order(out, ["backend reports-api", "~ frontend-reads-reports/reports-read: new shadow grant"])
    assert "+ " not in out and "- " not in out
    assert main(["diff", str(new), str(old)]) == 0
    assert "shadow grant removed" in capsys.readouterr().out


def test_gateway_stops_fronting_a_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit = _replace("gateway.yaml", "backends: [reports-api, deploy-api]", "backends: [reports-api]")
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", edit)
    assert main(["diff", str(old), str(new)]) == 1
    assert "gateway ci-gateway: no longer fronts backend deploy-api" in capsys.readouterr().out
    assert main(["diff", str(new), str(old)]) == 1
    assert "gateway ci-gateway: now fronts backend deploy-api" in capsys.readouterr().out


EXAMPLES = ["quickstart", "multi-backend", "gitlab-and-oidc", "gitlab-state"]


@pytest.mark.parametrize(("old", "new"), list(itertools.permutations(EXAMPLES, 2)))
def test_every_line_between_examples_is_real(old: str, new: str) -> None:
    """Larger policies (globs, several issuers, shadow bindings): every gain and loss has a witness request."""
    root = QUICKSTART.parent
    assert _check_against_evaluation(root / old, root / new) > 0
