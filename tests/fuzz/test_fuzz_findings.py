"""Minimal reproducers of the crashes and contract breaks the fuzz harnesses found (docs/fuzzing.md, Findings).

Each test states the behaviour the contract asks for, so it fails on the code the finding was made on and passes
once the product is fixed. They run in `make test` with the harnesses; none is marked xfail on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest

from controlplane.admin.http import BadQuery, parse_status_query
from controlplane.cli.status import add_status_arguments
from controlplane.credentials.exchange import GRANT_TYPE, TOKEN_TYPE_JWT
from controlplane.model.errors import PolicyInvalid
from controlplane.model.loader import parse_policy
from controlplane.model.yaml_source import parse_yaml
from tests.fuzz.exchange_harness import KID, Token, make_exchange, pristine_claims

ISSUER = "kind: Issuer\nname: gitlab\ntype: gitlab\nurl: https://gitlab.example.com\n"
BACKEND = "kind: Backend\nname: api\nhosts: [api.example.com]\nendpoints: [{{address: 10.0.0.1, port: {port}}}]\n"


def errors_of(files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyInvalid) as invalid:
        parse_policy(files)
    return [str(e) for e in invalid.value.errors]


# F1 (known, being fixed elsewhere): nesting within libyaml's limit of 1000 exhausts the recursive tree walker.
def test_f1_deep_flow_nesting_is_a_located_error() -> None:
    text = "kind: Role\nname: r\nbackend: b\nrules: " + "[" * 999 + "]" * 999 + "\n"
    assert any(e.startswith("role.yaml:4:") for e in errors_of({"role.yaml": text}))


# F2: a decimal integer of more than 4,300 digits: PyYAML's int() raises ValueError out of parse_yaml.
@pytest.mark.parametrize("value", ["9" * 4301, "-" + "9" * 4301])
def test_f2_integer_past_the_conversion_limit_is_a_located_error(value: str) -> None:
    assert any(e.startswith("b.yaml:4:") for e in errors_of({"b.yaml": BACKEND.format(port=value)}))


def test_f2_duration_past_the_conversion_limit_is_a_located_error() -> None:
    text = BACKEND.format(port=80) + "connect_timeout: " + "9" * 4301 + "s\n"
    assert any(e.startswith("b.yaml:5:") for e in errors_of({"b.yaml": text}))


# F3: a hex id is not limited by int(), so the loader accepts a 4,800-digit project id; `validate` and `compile`
# then crash in resolved/resolve.py (_sorted_ids: str(id) raises ValueError).
def test_f3_project_id_beyond_any_gitlab_id_is_an_error() -> None:
    binding = "kind: Binding\nname: b\nroles: [r]\nsubjects:\n  - project: 0x" + "f" * 4000 + "\n"
    role = "kind: Role\nname: r\nbackend: api\nrules: [{paths: ['/**']}]\n"
    files = {"i.yaml": ISSUER, "b.yaml": BACKEND.format(port=80), "r.yaml": role, "bind.yaml": binding}
    assert any(e.startswith("bind.yaml:5:") for e in errors_of(files))


# F4: a syntax error at end of input points one line past the end of a file without a final newline.
@pytest.mark.parametrize(("text", "lines"), [("{", 1), ("a: [", 1), ("- a\nb", 2)])
def test_f4_end_of_input_error_points_at_a_line_of_the_file(text: str, lines: int) -> None:
    (error,) = parse_yaml("f.yaml", text).errors
    assert 1 <= error.line <= lines


# F5: the loader's patterns end in `$`, which also matches before a final newline, and `\d` takes any Unicode digit.
@pytest.mark.parametrize(
    "document",
    [
        BACKEND.format(port=80).replace("name: api", 'name: "api\\n"'),
        BACKEND.format(port=80).replace("[api.example.com]", '["api.example.com\\n"]'),
        ISSUER + 'jwks_cache: "300s\\n"\n',
        ISSUER + 'jwks_cache: "\u0663\u0660\u0660s"\n',
    ],
)
def test_f5_a_trailing_newline_or_a_non_ascii_digit_is_not_a_valid_value(document: str) -> None:
    errors_of({"p.yaml": document if "Issuer" in document else ISSUER + "---\n" + document})


# F12 (found by atheris): an unbalanced bracket in a URL field makes urlsplit raise ValueError ("Invalid IPv6 URL")
# out of _url_check (model/scalars.py), so the whole load fails with a traceback instead of a located error.
@pytest.mark.parametrize("url", ["http://[", "https://gitlab.ex]mple.com"])
def test_f12_url_with_an_unbalanced_bracket_is_a_located_error(url: str) -> None:
    assert any(
        e.startswith("i.yaml:4:") for e in errors_of({"i.yaml": ISSUER.replace("https://gitlab.example.com", url)})
    )


def _form(token: Token, **fields: str) -> dict[str, str]:
    return {
        "grant_type": GRANT_TYPE,
        "subject_token_type": TOKEN_TYPE_JWT,
        "audience": "reports-api",
        "subject_token": token.text(),
        **fields,
    }


# F6: a JWT header whose `alg` is a list or an object: `alg not in frozenset` raises TypeError; over HTTP a 500.
@pytest.mark.parametrize("alg", [["RS256"], {"a": 1}])
def test_f6_unhashable_jwt_alg_is_refused_not_raised(tmp_path: Path, alg: object) -> None:
    exchange = make_exchange(tmp_path).exchange
    result = asyncio.run(exchange.exchange(_form(Token({"alg": alg, "kid": KID}, pristine_claims("f6")))))
    assert (result.status, result.body.get("error")) == (400, "invalid_grant")


# F14: an issuer-signed token with `"exp": Infinity` passes the time checks, then int(inf - now) raises OverflowError.
def test_f14_infinite_exp_is_refused_not_raised(tmp_path: Path) -> None:
    exchange = make_exchange(tmp_path).exchange
    claims = {**pristine_claims("f14"), "exp": float("inf")}
    token = Token({"alg": "RS256", "kid": KID}, claims, claims_json=json.dumps(claims))
    result = asyncio.run(exchange.exchange(_form(token)))
    assert (result.status, result.body.get("error")) == (400, "invalid_grant")


# F7: `requested_token_lifetime=5\n` passes `^[0-9]{1,9}$` (the `$` again) and is granted.
def test_f7_lifetime_with_a_trailing_newline_is_an_invalid_request(tmp_path: Path) -> None:
    exchange = make_exchange(tmp_path).exchange
    token = Token({"alg": "RS256", "kid": KID}, pristine_claims("f7"))
    result = asyncio.run(exchange.exchange(_form(token, requested_token_lifetime="5\n")))
    assert (result.status, result.body.get("error")) == (400, "invalid_request")


# F8 (known, being fixed elsewhere): /status?limit=<more than 4,300 digits> answers 500; offset too; and the CLI
# accepts such a --limit and sends it.
@pytest.mark.parametrize("name", ["limit", "offset"])
def test_f8_huge_status_count_is_a_bad_query(name: str) -> None:
    with pytest.raises(BadQuery):
        parse_status_query({name: "9" * 4301})


# F13: `proxies` is read first and `and` short-circuits, so with proxies=0 a mistyped `summary` is never checked.
def test_f13_a_bad_flag_is_a_bad_query_whatever_the_other_flags() -> None:
    with pytest.raises(BadQuery):
        parse_status_query({"proxies": "0", "summary": "01"})


def test_f8_cli_refuses_a_limit_the_server_cannot_read() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_status_arguments(parser)
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args(["--limit", "9" * 4301])
