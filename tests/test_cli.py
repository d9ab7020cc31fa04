"""The `controlplane` command as users run it."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.controlplane import ControlPlaneProcess

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, timeout=60)


def test_validate_accepts_an_example() -> None:
    result = run("validate", str(ROOT / "examples" / "multi-backend"))
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout and "gateway ci-gateway: version" in result.stdout


def test_validate_lists_every_error_with_file_and_line(tmp_path: Path) -> None:
    for source in (ROOT / "examples" / "quickstart").iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    bindings = tmp_path / "bindings.yaml"
    bindings.write_text(bindings.read_text().replace("ref_protected: true", "ref_protected: yes", 1))
    roles = tmp_path / "roles.yaml"
    roles.write_text(roles.read_text().replace("backend: deploy-api", "backend: deploy-apj"))
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.endswith(")") or ": " in line]
    assert any(line.startswith("bindings.yaml:9: subjects[0].ref_protected:") for line in errors), result.stderr
    assert any(line.startswith("roles.yaml:") and "deploy-apj" in line for line in errors), result.stderr
    assert "error(s) in" in result.stderr


def test_validate_reports_unresolvable_paths(tmp_path: Path) -> None:
    for source in (ROOT / "examples" / "quickstart").iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    bindings = tmp_path / "bindings.yaml"
    bindings.write_text(bindings.read_text().replace("project: acme/platform/deployer", "project: acme/gone", 1))
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    assert "bindings.yaml:8: project: no project with path 'acme/gone'" in result.stderr


UNFRONTED = """\
kind: Backend
name: orphan-api
hosts: [orphan.local]
endpoints: [{address: 127.0.0.1, port: 9}]
---
kind: Role
name: orphan-read
backend: orphan-api
rules: [{methods: [GET]}]
"""


def test_validate_warns_about_a_role_on_a_backend_no_gateway_fronts(tmp_path: Path) -> None:
    """Valid (exit 0), but its bindings grant nothing anywhere: a warning with file:line, not an error."""
    for source in (ROOT / "examples" / "quickstart").iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    (tmp_path / "orphan.yaml").write_text(UNFRONTED)
    result = run("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout
    assert "warning: orphan.yaml:6: backend: role orphan-read is on backend orphan-api, which no Gateway fronts" in (
        result.stderr
    ), result.stderr


def test_validate_reads_serves_inputs_with_serves_defaults_and_writes_nothing(tmp_path: Path) -> None:
    from controlplane.cli.main import _parser

    validate = vars(_parser().parse_args(["validate", "p"]))
    serve = vars(_parser().parse_args(["serve"]))
    shared = ("state_dir", "exchange_address", "exchange_public_address", "no_exchange", "key_rotation",
              "key_publish_lead")  # fmt: skip
    assert {k: validate[k] for k in (*shared, "max_credential_ttl")} == {
        k: serve[k] for k in (*shared, "max_credential_ttl")
    }
    state = tmp_path / "state"
    result = run("validate", str(ROOT / "examples" / "multi-backend"), "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert f"note: no signing keys in {state} yet" in result.stdout  # what it could not reproduce, said
    assert not state.exists()  # never creates or rotates a running serve's keys


def test_compile_writes_the_golden_layout(tmp_path: Path) -> None:
    result = run("compile", str(ROOT / "examples" / "quickstart"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.yaml"))
    groups = [f"ci-gateway/{n}.yaml" for n in ("clusters", "endpoints", "filter_configs", "listeners", "routes")]
    assert written == [*groups, "resolved.yaml"]  # the resolved policy beside the groups it compiles to
    for name in ("ci-gateway/routes.yaml", "resolved.yaml"):
        expected = ROOT / "snapshots" / "quickstart" / name
        assert (tmp_path / "out" / name).read_text() == expected.read_text()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_compile_refuses_an_out_holding_yaml_it_did_not_write(tmp_path: Path) -> None:
    """Compile replaces every YAML file below --out: a directory with anyone else's YAML is refused whole."""
    out = tmp_path / "out"
    result = run("compile", str(ROOT / "examples" / "quickstart"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for foreign in ("notes.yaml", "ci-gateway/extra.yaml", "ci-gateway/deep/routes.yaml"):
        (out / foreign).parent.mkdir(parents=True, exist_ok=True)
        (out / foreign).write_text("kept: true\n")
        before = _tree(out)
        result = run("compile", str(ROOT / "examples" / "multi-backend"), "--out", str(out))
        assert result.returncode == 2, result.stdout
        assert result.stderr.startswith(f"error: {out}: holds YAML that is not a compiled snapshot ({foreign})")
        assert result.stdout == "" and _tree(out) == before  # nothing deleted, nothing written
        (out / foreign).unlink()
    # Only its own files there (and an empty folder left by the last one removed): replaced whole.
    result = run("compile", str(ROOT / "examples" / "multi-backend"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert _tree(out) == _tree(ROOT / "snapshots" / "multi-backend")


@pytest.mark.parametrize(
    "name, text",
    [
        ("ci-gateway/routes.yaml", "x: 1\n"),  # one of compile's names, someone else's content
        ("resolved.yaml", "# my notes\n"),
        ("ci-gateway/routes.yaml", "# type.googleapis.com/envoy.config.cluster.v3.Cluster\n"),  # another file's
        ("ci-gateway/clusters.yaml", ""),
    ],
)
def test_compile_owns_a_file_by_its_content_not_only_its_name(tmp_path: Path, name: str, text: str) -> None:
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_text(text)
    before = _tree(out)
    result = run("compile", str(ROOT / "examples" / "quickstart"), "--out", str(out))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"error: {out}: holds YAML that is not a compiled snapshot ({name})")
    assert result.stdout == "" and _tree(out) == before


def test_compile_to_an_out_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """`--out afile/x`: the directory cannot be created below a regular file; an error line, not a traceback."""
    (tmp_path / "afile").write_text("mine\n")
    out = tmp_path / "afile" / "x"
    result = run("compile", str(ROOT / "examples" / "quickstart"), "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {out}: ") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize("where", [".", "snapshots", "..", "../.."])
def test_compile_refuses_an_out_in_or_around_the_policy_directory(tmp_path: Path, where: str) -> None:
    """`compile examples/quickstart --out examples/quickstart` once deleted the policy it compiled."""
    policy = tmp_path / "policy" / "quickstart"
    policy.mkdir(parents=True)
    for source in (ROOT / "examples" / "quickstart").iterdir():
        (policy / source.name).write_text(source.read_text())
    before = _tree(tmp_path)
    out = policy / where
    result = run("compile", str(policy), "--out", str(out))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"error: {out}: the output directory "), result.stderr
    assert "policy directory" in result.stderr and result.stdout == ""
    assert _tree(tmp_path) == before and not (policy / "snapshots").exists()


def test_bootstrap_names_the_group_and_the_control_plane() -> None:
    result = run("bootstrap", "--group", "ci-gateway", "--node-id", "n1", "--xds-address", "10.1.2.3:18000")
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load(result.stdout)
    assert bootstrap["node"] == {"id": "n1", "cluster": "ci-gateway"}
    assert "10.1.2.3" in result.stdout and "18000" in result.stdout


def test_serve_is_ready_after_the_first_snapshot_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = ControlPlaneProcess(ROOT / "examples" / "quickstart", log_path=tmp_path / "cp.log").start()
    try:
        status = server.status()
        assert status["policy"]["snapshot_versions"].keys() == {"ci-gateway"}
        assert server.metric("controlplane_snapshot_builds_total") == 1
    finally:
        code = server.stop()
    assert code == 0, server.log_text()
    assert "stopped" in server.log_text()


def test_serve_with_a_broken_policy_is_alive_but_not_ready(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: Gateway\nname: x\n")
    server = ControlPlaneProcess(tmp_path, log_path=tmp_path / "cp.log").start(wait_ready=False)
    try:
        from tests.support.backends import http_request
        from tests.support.ports import poll_until

        def alive() -> bool:
            try:
                return http_request(f"{server.admin_url}/healthz").status == 200
            except OSError:
                return False

        poll_until(alive, 20, message="admin up")
        assert "policy rejected" in server.log_text()
        assert http_request(f"{server.admin_url}/readyz").status == 503
        assert "bad.yaml:1" in server.log_text()
    finally:
        server.stop()


def test_serve_refuses_nonsense_collector_settings(tmp_path: Path) -> None:
    result = run("serve", "--policy", str(ROOT / "examples" / "quickstart"), "--gc-full-every", "0")
    assert result.returncode == 2 and "--gc-full-every >= 1" in result.stderr


def test_serve_refuses_a_rotation_not_longer_than_its_publish_lead(tmp_path: Path) -> None:
    """A usage error naming both flags, not a traceback from the credential service once serving started."""
    policy = str(ROOT / "examples" / "quickstart")
    for args in (("--key-rotation", "1"), ("--key-rotation", "10", "--key-publish-lead", "10")):
        result = run("serve", "--policy", policy, "--state-dir", str(tmp_path / "s"), *args)
        assert result.returncode == 2 and "must be longer than --key-publish-lead" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    negative = run("serve", "--policy", policy, "--key-rotation", "-5")
    assert negative.returncode == 2 and "expected a positive number of seconds" in negative.stderr


def _quickstart(tmp_path: Path) -> Path:
    for source in (ROOT / "examples" / "quickstart").iterdir():
        (tmp_path / source.name).write_text(source.read_text())
    return tmp_path


def test_validate_reports_deep_nesting_with_file_and_line_not_a_traceback(tmp_path: Path) -> None:
    (_quickstart(tmp_path) / "deep.yaml").write_text("kind: Role\nname: deep\nrules: " + "[" * 900 + "]" * 900 + "\n")
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 10, result.stderr[-2000:]
    assert "deep.yaml:3: rules" + "[0]" * 63 + ": lists and mappings nested deeper than 64 levels" in result.stderr


def test_validate_size_bounds_are_flags(tmp_path: Path) -> None:
    policy = _quickstart(tmp_path)
    result = run("validate", "--max-policy-file-bytes", "400", str(policy))
    assert result.returncode == 1 and "file is larger than the 400-byte limit" in result.stderr, result.stderr
    result = run("validate", "--max-policy-tree-bytes", "1500", str(policy))
    assert result.returncode == 1 and "more than the 1500-byte limit" in result.stderr, result.stderr
    assert run("validate", "--max-policy-file-bytes", "0", str(policy)).returncode == 2


def test_validate_reports_an_internal_error_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from controlplane.cli.main import main
    from controlplane.snapshots import build

    def explode(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(build, "compile_model", explode)
    assert main(["validate", str(_quickstart(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert err == f"{tmp_path}: internal error: RecursionError: maximum recursion depth exceeded\n"


def test_a_fifo_in_the_tree_is_an_error_and_validate_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(_quickstart(tmp_path) / "p.yaml")
    result = run("validate", str(tmp_path))
    assert result.returncode == 1 and "p.yaml:1: not a regular file (a named pipe)" in result.stderr, result.stderr


def test_a_job_sweep_interval_below_a_second_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane.cli.main import main

    assert main(["serve", "--job-sweep-interval", "0"]) == 2
    assert "--job-sweep-interval" in capsys.readouterr().err


def test_validate_shows_the_first_errors_of_a_file_and_counts_the_rest(tmp_path: Path) -> None:
    """2,000 repeats of a 2-line document once printed 6,000 errors and 108 MB naming every other repeat."""
    (_quickstart(tmp_path) / "dup.yaml").write_text("kind: Role\nname: x\n---\n" * 2000)
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 102 and len(result.stderr) < 20_000, len(result.stderr)
    assert lines[-2].startswith("... and ") and lines[-2].endswith("more errors not shown"), lines[-2]
    counted = re.fullmatch(rf"(at least )?(\d+) error\(s\) in {re.escape(str(tmp_path))}", lines[-1])
    assert counted is not None and int(counted.group(2)) > 2000, lines[-1]


def test_serve_flags_default_to_the_options_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each default is written once, in the option dataclasses: `serve` with no flags is the options' defaults."""
    from controlplane.cli.main import _parser, serve_options
    from controlplane.cli.options import ServeOptions, StoreOptions
    from controlplane.credentials.service import DEFAULT_EXCHANGE_ADDRESS, CredentialOptions
    from controlplane.statefile import DEFAULT_STATE_DIR

    monkeypatch.delenv("CONTROLPLANE_STATE_DIR", raising=False)
    parsed = serve_options(_parser().parse_args(["serve", "--policy", "p"]))
    credentials = CredentialOptions(DEFAULT_EXCHANGE_ADDRESS, DEFAULT_EXCHANGE_ADDRESS, DEFAULT_STATE_DIR)
    assert parsed == ServeOptions(policy=Path("p"), credentials=credentials)
    bootstrap = _parser().parse_args(["bootstrap", "--group", "g"])
    assert bootstrap.xds_addresses is None  # `_bootstrap` then dials serve's default xDS address
    args = _parser().parse_args(["serve", "--policy", "p"])
    store = StoreOptions()
    assert (args.store, args.store_dsn, args.store_dsn_env, args.store_dsn_file) == (
        store.kind,
        store.dsn,
        store.dsn_env,
        store.dsn_file,
    )
    assert not isinstance(parsed, str) and parsed.store == store


def test_serve_store_flags_name_one_dsn_source_without_a_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--store postgres` needs exactly one DSN source; a DSN argument with a password is refused (store/dsn.py);
    DSN sources without `--store postgres` are a mistake, not ignored. Each is a usage error: exit 2."""
    from controlplane.cli.main import _parser, main, serve_options
    from controlplane.cli.options import StoreOptions

    def options(*flags: str) -> object:
        return serve_options(_parser().parse_args(["serve", "--policy", "p", *flags]))

    monkeypatch.setenv("CP_STORE_DSN", "postgresql://cp:s3cret@db.internal/cp")
    monkeypatch.setenv("CP_STORE_KEY", base64.b64encode(b"k" * 32).decode())
    parsed = options("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN", "--store-key-env", "CP_STORE_KEY")
    assert not isinstance(parsed, str)
    assert parsed.store == StoreOptions("postgres", dsn_env="CP_STORE_DSN", key_env="CP_STORE_KEY")
    no_kek = options("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN")
    assert isinstance(no_kek, str) and "--store-key-env NAME or --store-key-file PATH" in no_kek
    bad_kek = options("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN", "--store-key-env", "CP_STORE_DSN")
    assert isinstance(bad_kek, str) and "is not base64" in bad_kek and "s3cret" not in bad_kek
    without_exchange = options("--store", "postgres", "--store-dsn-env", "CP_STORE_DSN", "--no-exchange")
    assert not isinstance(without_exchange, str)  # nothing to seal
    stray_kek = options("--store-key-env", "CP_STORE_KEY")
    assert isinstance(stray_kek, str) and "need --store postgres" in stray_kek
    assert main(["serve", "--policy", str(tmp_path), "--store", "postgres", "--store-dsn-env", "CP_STORE_DSN"]) == 2
    missing = options("--store", "postgres")
    assert isinstance(missing, str) and "--store-dsn-env" in missing and "got none" in missing
    with_password = options("--store", "postgres", "--store-dsn", "postgresql://cp:s3cret@db.internal/cp")
    assert isinstance(with_password, str) and with_password.startswith("--store-dsn:")
    assert "s3cret" not in with_password
    stray = options("--store-dsn-env", "CP_STORE_DSN")
    assert isinstance(stray, str) and "need --store postgres" in stray
    assert main(["serve", "--policy", str(tmp_path), "--store", "postgres"]) == 2


def test_serve_options_find_the_state_dir_where_the_command_line_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` used as a library agrees with `controlplane serve`: both honour $CONTROLPLANE_STATE_DIR."""
    from controlplane.cli.main import _parser, serve_options
    from controlplane.cli.options import ServeOptions

    monkeypatch.setenv("CONTROLPLANE_STATE_DIR", "/srv/controlplane")
    parsed = serve_options(_parser().parse_args(["serve", "--policy", "p"]))
    assert not isinstance(parsed, str)
    assert ServeOptions(policy=Path("p")).state_dir == parsed.state_dir == Path("/srv/controlplane")


def test_bootstrap_and_status_flags_default_to_their_owners_constants() -> None:
    """`bootstrap` and `status` take their defaults from the code that owns the behaviour, as `serve` does."""
    from controlplane.cli import bootstrap as envoy_bootstrap
    from controlplane.cli.main import _parser
    from controlplane.cli.options import ServeOptions
    from controlplane.cli.status import ADMIN_ENV, PROTOCOLS
    from controlplane.xds import fleet_status

    bootstrap = _parser().parse_args(["bootstrap", "--group", "g"])
    assert (bootstrap.admin_port, bootstrap.api) == (envoy_bootstrap.DEFAULT_ADMIN_PORT, envoy_bootstrap.DEFAULT_API)
    rendered = envoy_bootstrap.render_bootstrap(group="g", node_id="n", xds_host="127.0.0.1", xds_port=1)
    assert rendered["admin"]["address"]["socket_address"] == {
        "address": envoy_bootstrap.DEFAULT_ADMIN_ADDRESS,
        "port_value": envoy_bootstrap.DEFAULT_ADMIN_PORT,
    }
    assert set(envoy_bootstrap.API_TYPES) == set(PROTOCOLS) == set(fleet_status.PROTOCOLS)
    if ADMIN_ENV not in os.environ:
        status = _parser().parse_args(["status"])
        assert status.admin == f"http://{ServeOptions.admin_host}:{ServeOptions.admin_port}"


def test_run_time_defaults_are_the_options_defaults() -> None:
    """Each part's own default is the one `serve` uses: a part built without the option behaves as `serve`."""
    import inspect

    from controlplane.audit.store import AuditStore
    from controlplane.cli.options import ServeOptions
    from controlplane.runtime.gc_control import CollectorSchedule
    from controlplane.runtime.keyrelay import KeyRelay
    from controlplane.runtime.policy_service import PolicyService
    from controlplane.sources.jwks import JwksFetcher
    from controlplane.sources.watch import watch_policy_dir

    def default(function: Callable[..., object], name: str) -> object:
        return inspect.signature(function).parameters[name].default

    assert default(watch_policy_dir, "quiet") == ServeOptions.debounce
    assert default(watch_policy_dir, "max_wait") == ServeOptions.max_wait
    assert default(CollectorSchedule, "interval") == ServeOptions.gc_interval
    assert default(CollectorSchedule, "full_every") == ServeOptions.gc_full_every
    assert (
        default(KeyRelay, "refresh_interval") == default(JwksFetcher, "refresh_interval") == ServeOptions.jwks_refresh
    )
    assert default(AuditStore, "retention") == ServeOptions.audit_retention == 30 * 86_400.0  # README: 30 days
    assert default(PolicyService, "reload_timeout") == ServeOptions.reload_timeout


def test_a_policy_project_is_an_id_when_it_is_digits_and_a_path_otherwise() -> None:
    from controlplane.cli.options import GitLabPolicyOptions

    assert GitLabPolicyOptions("https://gitlab.example.com", "42").project_ref == 42
    assert GitLabPolicyOptions("https://gitlab.example.com", "acme/policy").project_ref == "acme/policy"
