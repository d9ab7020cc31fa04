"""The published JSON Schema (schema/controlplane-policy.schema.json) against the loader it is generated from.

It must be current (the committed file is what the generator writes), accept every document of every example
(the golden cases' inputs), and reject, as the loader does, what a schema can express: unknown keys, missing
required keys, wrong types, enum values, patterns and ranges.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.schema import LOADER_ONLY, policy_schema, render
from controlplane.sources.policy_dir import read_policy_dir

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schema" / "controlplane-policy.schema.json"
CASES = sorted(p.name for p in (ROOT / "examples").iterdir() if p.is_dir())
VALIDATOR = jsonschema.Draft202012Validator(policy_schema())


def test_committed_schema_is_what_the_generator_writes() -> None:
    assert SCHEMA_FILE.read_text() == render(), "stale schema: run `make schema` and commit the result"


def test_schema_is_valid_draft_2020_12_and_says_what_only_the_loader_checks() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert LOADER_ONLY in schema["$comment"]


def _documents(case: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Every policy document of an example; inventory files (named by an Issuer) are not policy documents."""
    files = read_policy_dir(ROOT / "examples" / case)
    loaded = {name: list(yaml.safe_load_all(text)) for name, text in files.items()}
    inventories = {d["inventory"] for docs in loaded.values() for d in docs if d and d.get("inventory")}
    for name, docs in sorted(loaded.items()):
        if name not in inventories:
            yield from ((name, i, d) for i, d in enumerate(docs) if d is not None)


@pytest.mark.parametrize("case", CASES)
def test_every_example_document_validates(case: str) -> None:
    parse_policy(read_policy_dir(ROOT / "examples" / case))  # the loader accepts the case...
    documents = list(_documents(case))
    assert documents
    for name, index, doc in documents:  # ...and so does the schema, document by document
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]
        assert not errors, f"{case}/{name} document {index}: {errors}"


# --- what both reject ------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: tuple[str | int, ...], value: object) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


def _drop(path: tuple[str | int, ...]) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


# (file of examples/quickstart, document index, what is wrong): a table of the shapes a schema can express.
TABLE: list[tuple[str, int, str, Mutation]] = [
    ("issuer.yaml", 0, "unknown key", _set(("jwks_url",), "https://x")),
    ("issuer.yaml", 0, "token in policy", _set(("token",), "glpat-x")),
    ("issuer.yaml", 0, "enum: issuer type", _set(("type",), "github")),
    ("issuer.yaml", 0, "enum: jwks mode", _set(("jwks",), "fetch")),
    ("issuer.yaml", 0, "pattern: duration", _set(("clock_skew",), "30 seconds")),
    ("issuer.yaml", 0, "wrong type: url", _set(("url",), 8090)),
    ("issuer.yaml", 0, "const: apiVersion", _set(("apiVersion",), "controlplane/v2")),
    ("issuer.yaml", 0, "pattern: name", _set(("name",), "GitLab_Main")),
    ("issuer.yaml", 0, "wrong type: name", _set(("name",), 7)),
    ("backends.yaml", 0, "wrong type: hosts", _set(("hosts",), "reports.local")),
    ("backends.yaml", 0, "empty list: hosts", _set(("hosts",), [])),
    ("backends.yaml", 0, "pattern: host", _set(("hosts",), ["Reports.Local"])),
    ("backends.yaml", 0, "range: port", _set(("endpoints", 0, "port"), 70000)),
    ("backends.yaml", 0, "unknown endpoint key", _set(("endpoints", 0, "weight"), 3)),
    ("backends.yaml", 0, "missing endpoint port", _drop(("endpoints", 0, "port"))),
    ("backends.yaml", 0, "enum: credentials", _set(("credentials",), "none")),
    ("backends.yaml", 0, "wrong type: tls", _set(("tls",), "yes please")),
    ("backends.yaml", 0, "secret in policy", _set(("inject",), {"secret": "s3cr3t"})),
    ("backends.yaml", 0, "pattern: secret_env", _set(("inject",), {"secret_env": "lower_case"})),
    ("roles.yaml", 0, "enum: method", _set(("rules", 0, "methods"), ["FETCH"])),
    ("roles.yaml", 0, "duplicate method", _set(("rules", 0, "methods"), ["GET", "GET"])),
    ("roles.yaml", 0, "wrong type: rules", _set(("rules",), {"methods": ["GET"]})),
    ("roles.yaml", 0, "unknown rule key", _set(("rules", 0, "hosts"), ["a"])),
    ("bindings.yaml", 0, "enum: mode", _set(("mode",), "audit")),
    ("bindings.yaml", 0, "enum: claim value", _set(("subjects", 0, "ref_protected"), "yes")),
    ("bindings.yaml", 1, "enum: ref_type", _set(("subjects", 0, "ref_type"), "commit")),
    ("bindings.yaml", 0, "pattern: project", _set(("subjects", 0, "project"), "acme")),
    ("bindings.yaml", 0, "range: project id", _set(("subjects", 0, "project"), 0)),
    ("bindings.yaml", 0, "empty subjects", _set(("subjects",), [])),
    ("gateway.yaml", 0, "range: listen port", _set(("listen", "port"), 0)),
    ("gateway.yaml", 0, "missing listen port", _drop(("listen", "port"))),
    ("gateway.yaml", 0, "unknown listen key", _set(("listen", "tls"), True)),
    ("gateway.yaml", 0, "wrong type: access_log", _set(("access_log",), ["/dev/stdout"])),
]


def _required_drops() -> list[tuple[str, int, str, Mutation]]:
    """Generated from the schema itself: every required key of every kind, and an unknown key for each kind."""
    where = {"Issuer": "issuer.yaml", "Backend": "backends.yaml", "Role": "roles.yaml"}
    where |= {"Binding": "bindings.yaml", "Gateway": "gateway.yaml"}
    found = []
    for kind, definition in policy_schema()["$defs"].items():
        for key in definition["required"]:
            found.append((where[kind], 0, f"{kind}: missing {key}", _drop((key,))))
        found.append((where[kind], 0, f"{kind}: unknown key", _set(("colour",), "blue")))
    return found


@pytest.mark.parametrize(
    ("file", "index", "what", "mutate"),
    [pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}") for case in TABLE + _required_drops()],
)
def test_schema_rejects_what_the_loader_rejects(file: str, index: int, what: str, mutate: Mutation) -> None:
    files = read_policy_dir(ROOT / "examples" / "quickstart")
    docs = list(yaml.safe_load_all(files[file]))
    bad = copy.deepcopy(docs[index])
    mutate(bad)
    assert not VALIDATOR.is_valid(bad), f"schema accepts {what}: {bad}"
    docs[index] = bad
    with pytest.raises(PolicyInvalid):
        parse_policy({**files, file: yaml.safe_dump_all(docs)})


# --- never stricter than the loader ----------------------------------------------------------------------

_KEYS = sorted({key for d in policy_schema()["$defs"].values() for key in d["properties"]} | {"port", "address"})
_VALUES = st.one_of(
    st.sampled_from([0, 1, 80, 65536, -1, 2**63, True, False, None]),
    st.sampled_from(["", "x", "GET", "get", "Bad Name", "/a", "/a/**", "a.example", "*.a.example", "5m", "0ms"]),
    st.sampled_from(["true", "shadow", "gitlab", "oidc", "acme/app", "10.0.0.1", "https://a.example", "A_B"]),
    st.sampled_from([[], ["x"], ["GET", "GET"], [{}], {}, {"port": 80}, {"address": "10.0.0.1", "port": 80}]),
)


def _slots(value: Any, out: list[tuple[Any, Any]]) -> None:
    """Every (container, key or index) in a document, so one of them can be replaced."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        out.append((value, key))
        _slots(item, out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schema_rejects_only_what_the_loader_rejects(data: st.DataObject) -> None:
    """An example with one value replaced, one key added or one removed: if the schema rejects the document,
    the loader rejects the tree (the schema is never stricter), whatever the mutation."""
    case = data.draw(st.sampled_from(CASES))
    files = read_policy_dir(ROOT / "examples" / case)
    documents = list(_documents(case))
    name, index, doc = data.draw(st.sampled_from(documents))
    doc = copy.deepcopy(doc)
    slots: list[tuple[Any, Any]] = []
    _slots(doc, slots)
    container, key = data.draw(st.sampled_from(slots))
    action = data.draw(st.sampled_from(["replace", "add", "drop"]))
    if action == "replace":
        container[key] = data.draw(_VALUES)
    elif action == "add" and isinstance(container, dict):
        container[data.draw(st.sampled_from(_KEYS))] = data.draw(_VALUES)
    elif action == "drop":
        del container[key]
    if VALIDATOR.is_valid(doc):
        return
    docs = list(yaml.safe_load_all(files[name]))
    docs[index] = doc
    with pytest.raises(PolicyInvalid):
        parse_policy({**files, name: yaml.safe_dump_all(docs)})
