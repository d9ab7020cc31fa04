"""The commands issue 15 added speak alike: the audit trail's options are the same flags with the same help in
`audit`, `suggest` and `report`; `--format text|json` works wherever `--json` did; a GitLab token source not given
is a usage error (exit 2) naming the flags, one given but unreadable is an unreadable input (exit 1)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from controlplane.audit.store import DB_NAME, AuditStore
from controlplane.cli.main import _parser, main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "quickstart"
TRAIL_FLAGS = ("--db", "--store", "--store-dsn-env", "--store-dsn-file", "--store-dsn")


def _options(command: str) -> dict[str, argparse.Action]:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {flag: action for action in sub._actions for flag in action.option_strings}


def test_the_trail_options_are_the_same_flags_with_the_same_help() -> None:
    seen = {command: _options(command) for command in ("audit", "suggest", "report")}
    for flag in TRAIL_FLAGS:
        helps = {command: options[flag].help for command, options in seen.items()}
        assert len(set(helps.values())) == 1 and None not in helps.values(), (flag, helps)
    for options in seen.values():
        assert "--state-dir" in options and options["--store"].choices == ("file", "postgres")


@pytest.mark.parametrize("command", ["audit", "diff", "explain", "suggest"])
def test_every_text_or_json_command_takes_format(command: str) -> None:
    assert _options(command)["--format"].choices == ("text", "json")


def test_diff_format_json_is_what_json_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", str(EXAMPLE), str(EXAMPLE), "--json"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert main(["diff", str(EXAMPLE), str(EXAMPLE), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == short and short["changed"] is False
    assert main(["diff", str(EXAMPLE), str(EXAMPLE), "--json", "--format", "text"]) == 0  # the last one given
    assert not capsys.readouterr().out.startswith("{")  # text: nothing to say for two equal policies


def test_a_gitlab_token_source_not_given_is_a_usage_error_naming_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLI_CONSISTENCY_UNSET", raising=False)
    report = ["report", "--since", "1d", "--no-audit", "--policy-project", "acme/policy"]
    report += ["--gitlab-url", "http://127.0.0.1:9"]
    assert main(report) == 2
    assert "--gitlab-token-env" in capsys.readouterr().err
    assert main([*report, "--gitlab-token-env", "CLI_CONSISTENCY_UNSET"]) == 1
    assert "CLI_CONSISTENCY_UNSET is not set" in capsys.readouterr().err
    AuditStore(tmp_path / DB_NAME, retention=None).close(10)  # an empty trail: suggest reads it before GitLab
    suggest = ["suggest", str(EXAMPLE), "--state-dir", str(tmp_path), "--gitlab-url", "http://127.0.0.1:9"]
    assert main(suggest) == 2  # the quickstart's issuer has no api: block to take a token source from
    assert "--gitlab-token-env NAME or --gitlab-token-file PATH" in capsys.readouterr().err
    assert main([*suggest, "--gitlab-token-env", "CLI_CONSISTENCY_UNSET"]) == 1
    assert "CLI_CONSISTENCY_UNSET is not set" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["audit", "diff", "explain", "suggest", "report"])
def test_every_command_s_help_says_its_exit_status(command: str) -> None:
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    assert "exit status: 0" in (sub.epilog or "") and "2 usage" in (sub.epilog or "")
