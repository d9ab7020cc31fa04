"""The Kubernetes manifests (deploy/kubernetes) render, validate and agree with the code they run.

Each documented combination of the kustomize base and its components is rendered with `kubectl kustomize` (the
renderer `kubectl apply -k` uses) and every object is checked against the Kubernetes API schemas of a pinned
version, strictly (an unknown field is an error), offline with `kubernetes-validate`. The operators' kinds it
does not know (Prometheus Operator's ServiceMonitor and PodMonitor, cert-manager's Certificate and Issuer) are
checked against the fields their operators document, written down below. Then the cross-references no schema
sees: the `serve` and `bootstrap` arguments go through the real parsers (and `serve`'s own option checks, on
Secret volumes laid out as kubelet lays them out), the gateway's bootstrap is accepted by the real Envoy with the
container's own flags, ports named by probes, Services and NetworkPolicies exist, selectors select pods, every
Secret and ConfigMap key a pod mounts is declared and documented.

`kubectl` is required: without it the tests fail, saying so, rather than skip (a skipped check is a silent one).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.cli.main import _parser, serve_options
from controlplane.cli.options import ServeOptions
from controlplane.runtime.supervisor import DEFAULT_STOP_DEADLINE
from controlplane.secretfile import SecretFileError, read_secret_file
from tests.support.certs import make_pki
from tests.support.envoy import EnvoyProcess, envoy_binary
from tests.support.ports import poll_until

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
DOC = KUBE / "README.md"
# The API version the manifests are validated against: the oldest Kubernetes they are meant for (the native
# `preStop: sleep` needs 1.30+; 1.32 is the kubectl here).
KUBERNETES_VERSION = "1.32.0"
NAMESPACE = "controlplane"

# The combinations deploy/kubernetes/README.md documents: every component at least once, all together once.
# cert-manager issues the certificates xds-tls mounts, so it comes with it.
COMBINATIONS: dict[str, tuple[str, ...]] = {
    "base": (),
    "gitlab-policy": ("gitlab-policy",),
    "xds-tls": ("xds-tls",),
    "cert-manager": ("xds-tls", "cert-manager"),
    "servicemonitor": ("servicemonitor",),
    "kubernetes-endpoints": ("kubernetes-endpoints",),
    "all": ("gitlab-policy", "xds-tls", "cert-manager", "servicemonitor", "kubernetes-endpoints"),
}

# Every Secret a pod mounts, with the keys it reads: deploy/kubernetes/README.md tells how to create each.
SECRETS: dict[str, set[str]] = {
    "controlplane-postgres": {"dsn"},
    "controlplane-store-key": {"kek"},
    "controlplane-webhook": {"secret"},
    "controlplane-gitlab": {"token"},
    "controlplane-xds-tls": {"tls.crt", "tls.key", "ca.crt"},
    "ci-gateway-xds-tls": {"tls.crt", "tls.key", "ca.crt"},
}
# What the test puts in each key when it lays a Secret volume out (values shaped as the docs say to make them).
SAMPLE_SECRET_VALUES: dict[str, bytes] = {
    "dsn": b"postgresql://controlplane:not-a-real-password@postgres.example.internal:5432/controlplane\n",
    "kek": base64.b64encode(bytes(range(32))) + b"\n",
    "secret": b"webhook-secret-for-tests\n",
    "token": b"glpat-not-a-real-token\n",
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail(
            "kubectl is not installed (or not on PATH): these tests render deploy/kubernetes with "
            "`kubectl kustomize`, as `kubectl apply -k` does. Install kubectl (kustomize is built in) and rerun.",
            pytrace=False,
        )
    return found


@functools.cache
def render(combination: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl apply -k` would create for an overlay of the base with these components."""
    components = COMBINATIONS[combination]
    overlay = Path(tempfile.mkdtemp(prefix=f"controlplane-k8s-{combination}-"))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(KUBE / "base", overlay)],
        "components": [os.path.relpath(KUBE / "components" / name, overlay) for name in components],
    }
    try:
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        done = subprocess.run(
            [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        shutil.rmtree(overlay, ignore_errors=True)
    assert done.returncode == 0, f"kubectl kustomize ({combination}) failed:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_templates(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def containers(template: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def server(objects: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The control plane's StatefulSet and its container."""
    statefulset = one(objects, "StatefulSet", "controlplane")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return statefulset, container


def gateway(objects: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The gateway Deployment, its bootstrap initContainer and its Envoy container."""
    deployment = one(objects, "Deployment", "ci-gateway")
    spec = deployment["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    (envoy,) = spec["containers"]
    return deployment, init, envoy


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(args: list[str], container: Mapping[str, Any], objects: tuple[dict[str, Any], ...], pod: str) -> list[str]:
    """The arguments as kubelet passes them: `$(VAR)` replaced by the container's env (a pod field or a
    ConfigMap key). A reference to an undeclared variable is left as is by Kubernetes, silently: an error here."""
    values: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom", {})
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            values[entry["name"]] = pod
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            values[entry["name"]] = one(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            raise AssertionError(f"env {entry['name']}: a source this test does not know: {entry}")

    def substitute(match: re.Match[str]) -> str:
        assert match.group(1) in values, f"$({match.group(1)}) names no env variable of {container['name']}"
        return values[match.group(1)]

    return [_REFERENCE.sub(substitute, arg) for arg in args]


def flag_value(args: list[str], flag: str) -> str:
    found = [arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")]
    assert len(found) == 1, f"{flag}: expected once in {args}"
    return found[0]


# --- the CRDs kubernetes-validate does not know: their operators' documented fields -----------------------------
#
# A shape is a type (str, int, bool), a frozenset of allowed strings, a compiled pattern, a one-element list (every
# item has that shape) or a Fields (a mapping whose keys must be among `fields`, with `required` ones present).
# Written from the operators' API references: Prometheus Operator `monitoring.coreos.com/v1` ServiceMonitor and
# PodMonitor; cert-manager `cert-manager.io/v1` Certificate and Issuer. Only fields these manifests use or may soon
# use are listed: a key outside them is an error, so a typo never passes as "unknown to the schema".


class Fields:
    def __init__(self, fields: Mapping[str, Any], required: tuple[str, ...] = ()) -> None:
        self.fields = dict(fields)
        self.required = required


DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Prometheus's duration, as the ServiceMonitor CRD's pattern for interval and scrapeTimeout.
PROMETHEUS_DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
# cert-manager's durations are Go `time.Duration` strings.
GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
LABELS = Fields({})  # any keys: checked by the caller as strings
LABEL_SELECTOR = Fields(
    {"matchLabels": LABELS, "matchExpressions": [Fields({"key": str, "operator": str, "values": [str]})]}
)
METADATA = Fields({"name": DNS_NAME, "namespace": DNS_NAME, "labels": LABELS, "annotations": LABELS}, ("name",))
KEY_USAGES = frozenset(
    {"signing", "digital signature", "content commitment", "key encipherment", "key agreement",
     "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
     "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
     "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}
)  # fmt: skip
ISSUER_REF = Fields({"name": DNS_NAME, "kind": frozenset({"Issuer", "ClusterIssuer"}), "group": str}, ("name",))
# One scrape target of a ServiceMonitor (`endpoints`) or PodMonitor (`podMetricsEndpoints`).
SCRAPE_ENDPOINT = Fields(
    {
        "port": str,
        "path": str,
        "scheme": frozenset({"http", "https"}),
        "interval": PROMETHEUS_DURATION,
        "scrapeTimeout": PROMETHEUS_DURATION,
        "honorLabels": bool,
    }
)
CRD_SPECS: dict[tuple[str, str], Fields] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): Fields(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": Fields({"any": bool, "matchNames": [str]}),
            "jobLabel": str,
            "endpoints": [SCRAPE_ENDPOINT],
        },
        ("selector", "endpoints"),
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): Fields(
        {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": Fields({"any": bool, "matchNames": [str]}),
            "jobLabel": str,
            "podMetricsEndpoints": [SCRAPE_ENDPOINT],
        },
        ("selector", "podMetricsEndpoints"),
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): Fields(
        {
            "groups": [
                Fields(
                    {
                        "name": str,
                        "interval": PROMETHEUS_DURATION,
                        "rules": [
                            Fields(
                                {
                                    "alert": str,
                                    "record": str,
                                    "expr": str,
                                    "for": PROMETHEUS_DURATION,
                                    "labels": LABELS,
                                    "annotations": LABELS,
                                },
                                ("expr",),
                            )
                        ],
                    },
                    ("name", "rules"),
                )
            ]
        },
        ("groups",),
    ),
    ("cert-manager.io/v1", "Certificate"): Fields(
        {
            "secretName": DNS_NAME,
            "issuerRef": ISSUER_REF,
            "commonName": str,
            "dnsNames": [str],
            "ipAddresses": [str],
            "duration": GO_DURATION,
            "renewBefore": GO_DURATION,
            "usages": [KEY_USAGES],
            "isCA": bool,
            "privateKey": Fields(
                {
                    "algorithm": frozenset({"RSA", "ECDSA", "Ed25519"}),
                    "size": int,
                    "encoding": frozenset({"PKCS1", "PKCS8"}),
                    "rotationPolicy": frozenset({"Never", "Always"}),
                }
            ),
        },
        ("secretName", "issuerRef"),
    ),
    ("cert-manager.io/v1", "Issuer"): Fields(
        {"selfSigned": Fields({}), "ca": Fields({"secretName": DNS_NAME}, ("secretName",))}
    ),
}


def shape_errors(value: Any, shape: Any, where: str) -> list[str]:
    if isinstance(shape, Fields):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {value!r}"]
        if shape is LABELS:
            return [f"{where}.{k}: expected a string" for k, v in value.items() if not isinstance(v, str)]
        errors = [f"{where}.{key}: required" for key in shape.required if key not in value]
        for key, item in value.items():
            if key not in shape.fields:
                errors.append(f"{where}.{key}: not a documented field (known: {', '.join(sorted(shape.fields))})")
            else:
                errors += shape_errors(item, shape.fields[key], f"{where}.{key}")
        return errors
    if isinstance(shape, list):
        if not isinstance(value, list) or not value:
            return [f"{where}: expected a non-empty list, got {value!r}"]
        return [error for i, item in enumerate(value) for error in shape_errors(item, shape[0], f"{where}[{i}]")]
    if isinstance(shape, frozenset):
        return [] if value in shape else [f"{where}: {value!r} is not one of {sorted(shape)}"]
    if isinstance(shape, re.Pattern):
        return [] if isinstance(value, str) and shape.match(value) else [f"{where}: {value!r} !~ {shape.pattern}"]
    if shape is int:
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{where}: expected an integer"]
    return [] if isinstance(value, shape) else [f"{where}: expected {shape.__name__}, got {value!r}"]


def crd_errors(obj: Mapping[str, Any]) -> list[str]:
    spec = CRD_SPECS[(obj["apiVersion"], obj["kind"])]
    top = Fields({"apiVersion": str, "kind": str, "metadata": METADATA, "spec": spec}, ("metadata", "spec"))
    errors = shape_errors(obj, top, obj["kind"])
    if obj["kind"] == "Issuer" and len(obj["spec"]) != 1:
        errors.append(f"Issuer {obj['metadata']['name']}: exactly one issuer type, got {sorted(obj['spec'])}")
    return errors


def validation_errors(obj: dict[str, Any]) -> list[str]:
    if (obj["apiVersion"], obj["kind"]) in CRD_SPECS:
        return crd_errors(obj)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{obj['kind']} {obj['metadata']['name']}: {error.message} at {'.'.join(map(str, error.path))}"]
    return []


# --- rendering and schemas ----------------------------------------------------------------------------------------


def test_every_component_is_rendered_and_documented() -> None:
    on_disk = {path.name for path in (KUBE / "components").iterdir() if (path / "kustomization.yaml").is_file()}
    rendered = {name for components in COMBINATIONS.values() for name in components}
    assert on_disk == rendered, "a component no combination renders, or a combination naming a missing one"
    assert set(COMBINATIONS["all"]) == on_disk
    doc = DOC.read_text()
    for name in on_disk:
        assert f"components/{name}" in doc, f"deploy/kubernetes/README.md does not document component {name}"


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_object_validates_against_the_schemas(combination: str) -> None:
    objects = render(combination)
    errors = [error for obj in objects for error in validation_errors(obj)]
    assert not errors, "\n".join(errors)
    # Everything lands in one namespace (a component's own objects included), so names resolve in it; only
    # cluster-scoped kinds have none.
    for obj in objects:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"


def test_the_checks_reject_what_they_should() -> None:
    """The validators can fail: an unknown field, a wrong type, an operator field misspelt or out of range."""
    objects = render("all")
    statefulset = json.loads(json.dumps(one(objects, "StatefulSet", "controlplane")))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validation_errors(statefulset)
    statefulset = json.loads(json.dumps(one(objects, "StatefulSet", "controlplane")))
    statefulset["spec"]["replicas"] = "3"
    assert validation_errors(statefulset)
    monitor = json.loads(json.dumps(one(objects, "ServiceMonitor", "controlplane")))
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    assert validation_errors(monitor)
    pods = json.loads(json.dumps(one(objects, "PodMonitor", "ci-gateway")))
    pods["spec"]["podMetricsEndpoints"][0]["interval"] = "30 seconds"
    assert validation_errors(pods)
    certificate = json.loads(json.dumps(one(objects, "Certificate", "controlplane-xds-tls")))
    certificate["spec"]["usages"] = ["server-auth"]
    certificate["spec"]["duration"] = "90d"
    assert len(validation_errors(certificate)) == 2


def test_kubectl_missing_fails_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="kubectl is not installed"):
        kubectl()


def test_the_overlay_example_of_the_docs_renders(tmp_path: Path) -> None:
    """deploy/kubernetes/README.md's overlay, as printed, next to a checkout: every component, the image moved,
    the GitLab project and URL patched in (and the ConfigMap's hashed name follows, so a change rolls)."""
    (block,) = re.findall(r"```yaml\n(# my-overlay/kustomization.yaml\n.*?)```", DOC.read_text(), re.S)
    (tmp_path / "deploy").symlink_to(ROOT / "deploy")
    (tmp_path / "my-overlay").mkdir()
    (tmp_path / "my-overlay" / "kustomization.yaml").write_text(block)
    done = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path / "my-overlay")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    objects = tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)
    assert {obj["kind"] for obj in objects} >= {"ServiceMonitor", "PodMonitor", "Certificate", "StatefulSet"}
    _, container = server(objects)
    assert container["image"] == "<your registry>/controlplane:0.1.0"
    args = expand(container["args"], container, objects, pod="controlplane-0")
    assert flag_value(args, "--gitlab-url") == "https://gitlab.your.domain"
    assert flag_value(args, "--policy-project") == "platform/gateway-policy"
    assert not [obj for obj in objects if obj["metadata"]["name"] == "controlplane-policy"]


# --- the control plane's pods -----------------------------------------------------------------------------------


def serve_flags() -> set[str]:
    subcommands = next(a for a in _parser()._actions if a.dest == "command")
    return set(subcommands.choices["serve"]._option_string_actions)  # type: ignore[attr-defined]


def lay_out_secret_volume(
    directory: Path, items: list[dict[str, str]], values: Mapping[str, bytes] = SAMPLE_SECRET_VALUES
) -> None:
    """A Secret volume as kubelet writes it: the data in a timestamped directory, `..data` a link to it, and
    each key a link through `..data` (so an update is one atomic rename of `..data`)."""
    data = directory / "..2026_12_06_18_00_00.000000001"
    data.mkdir(parents=True)
    for item in items:
        (data / item["path"]).write_bytes(values[item["key"]])
        (directory / item["path"]).symlink_to(Path("..data") / item["path"])
    (directory / "..data").symlink_to(data.name)


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_serve_arguments_are_accepted_by_serve(combination: str, tmp_path: Path) -> None:
    """Every flag is `serve`'s own, spelt out (argparse would take an abbreviation), and the arguments kubelet
    passes, with the Secret volumes laid out as kubelet lays them out, make valid ServeOptions: the strict
    secret readers accept the `..data/` paths (DSN, KEK)."""
    objects = render(combination)
    statefulset, container = server(objects)
    args = expand(container["args"], container, objects, pod="controlplane-0")
    assert args[0] == "serve"
    known = serve_flags()
    for arg in args[1:]:
        assert arg.startswith("--") and arg.split("=", 1)[0] in known, f"not a serve flag: {arg}"
    volumes = {volume["name"]: volume for volume in statefulset["spec"]["template"]["spec"]["volumes"]}
    pki = make_pki(tmp_path / "pki")
    values = {**SAMPLE_SECRET_VALUES, "tls.crt": pki.server.cert.read_bytes(), "tls.key": pki.server.key.read_bytes()}
    values["ca.crt"] = pki.ca.read_bytes()
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            local = tmp_path / mount["name"]
            lay_out_secret_volume(local, secret["items"], values)
            args = [arg.replace("=" + mount["mountPath"] + "/", f"={local}/") for arg in args]
    parsed = _parser().parse_args(args)
    options = serve_options(parsed)
    assert isinstance(options, ServeOptions), options
    assert options.store.kind == "postgres"


def test_a_secret_volume_key_itself_is_refused_by_the_strict_reader(tmp_path: Path) -> None:
    """Why the flags name `<mount>/..data/<key>`: the key itself is a symbolic link, which the secret readers
    refuse by design (controlplane/secretfile.py); the file under `..data/` is a regular file, and follows
    the Secret when kubelet swaps `..data`."""
    lay_out_secret_volume(tmp_path, [{"key": "kek", "path": "kek"}])
    with pytest.raises(SecretFileError, match="symbolic link"):
        read_secret_file(tmp_path / "kek", flag="--store-key-file", max_bytes=256, holds="a KEK")
    read = read_secret_file(tmp_path / "..data" / "kek", flag="--store-key-file", max_bytes=256, holds="a KEK")
    assert read == SAMPLE_SECRET_VALUES["kek"]


_SECURE_STATE_DIR = """
import os, sys
from pathlib import Path
from controlplane.statefile import StateFileError, secure_state_dir
os.setgid(10001)
os.setuid(10001)
for directory in sys.argv[1:]:
    try:
        secure_state_dir(Path(directory), [])
        print("ok")
    except StateFileError as error:
        print("refused:", error)
"""


def test_the_state_directory_is_one_serve_creates_inside_the_volume() -> None:
    """serve makes its state directory 0700 at start (controlplane/statefile.py), which only the owner may do; an
    emptyDir is root's, mode 0777 (fsGroup changes its group, not its owner). So --state-dir names a directory
    serve creates inside the mount, never the mount itself. As root, this is shown as uid 10001 does it: refused
    on a root-owned 0777 directory, accepted on one it creates inside."""
    _, container = server(render("base"))
    state = flag_value(container["args"], "--state-dir")
    (mount,) = [m for m in container["volumeMounts"] if state.startswith(m["mountPath"] + "/")]
    volumes = one(render("base"), "StatefulSet", "controlplane")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == mount["name"])["emptyDir"] == {}
    assert not mount.get("readOnly")
    if os.geteuid() != 0:
        return  # cannot act as another user here; the layout above is what the demonstration below supports
    base = Path(tempfile.mkdtemp(prefix="k8s-emptydir-"))
    try:
        base.chmod(0o755)
        empty_dir = base / "volume"
        empty_dir.mkdir(mode=0o777)
        empty_dir.chmod(0o777)
        done = subprocess.run(
            [sys.executable, "-c", _SECURE_STATE_DIR, str(empty_dir), str(empty_dir / "state")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr
        refused, accepted = done.stdout.splitlines()
        assert refused.startswith("refused:") and "0700" in refused, refused
        assert accepted == "ok"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def listen_port(args: list[str], flag: str) -> int:
    host, port = flag_value(args, flag).rsplit(":", 1)
    assert host == "0.0.0.0", f"{flag} must listen on every interface in a pod, got {host}"
    return int(port)


@pytest.mark.parametrize("combination", ["base", "all"])
def test_the_server_pods_ports_probes_and_stop(combination: str) -> None:
    objects = render(combination)
    statefulset, container = server(objects)
    args = container["args"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {
        "xds": listen_port(args, "--xds-address"),
        "admin": listen_port(args, "--admin-address"),
        "webhooks": listen_port(args, "--webhook-address"),
        "exchange": listen_port(args, "--exchange-address"),
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"]["port"] == "admin"
    spec = statefulset["spec"]["template"]["spec"]
    # kubelet's SIGKILL must come after serve's own bound on stopping (the drain included), never before.
    assert spec["terminationGracePeriodSeconds"] > DEFAULT_STOP_DEADLINE
    assert statefulset["spec"]["replicas"] >= 3
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert matches(anti[0]["labelSelector"]["matchLabels"], statefulset["spec"]["template"]["metadata"]["labels"])
    # What the gateways dial for the exchange is a Service of the exchange port.
    host, port = flag_value(args, "--exchange-public-address").rsplit(":", 1)
    exchange = one(objects, "Service", host)
    assert [(p["port"], p["targetPort"]) for p in exchange["spec"]["ports"]] == [(int(port), "exchange")]


@pytest.mark.parametrize("combination", ["base", "all"])
def test_every_pod_is_locked_down_and_sized(combination: str) -> None:
    objects = render(combination)
    # Only the control plane, and only when it watches EndpointSlices, holds an API token.
    api_clients = {"controlplane"} if of_kind(objects, "ClusterRoleBinding") else set()
    for template in pod_templates(objects):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is (spec["serviceAccountName"] in api_clients)
        context = spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in containers(template):
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }, container["name"]
            resources = container["resources"]
            assert set(resources) == {"requests", "limits"}, container["name"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}


def test_the_policy_configmap_is_a_valid_policy() -> None:
    """The base's example policy passes `controlplane validate` (offline: no GitLab here)."""
    done = subprocess.run(
        [sys.executable, "-m", "controlplane", "validate", "--offline", str(KUBE / "base" / "policy")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = one(render("base"), "ConfigMap", "controlplane-policy")["data"]
    assert set(rendered) == {path.name for path in (KUBE / "base" / "policy").glob("*.yaml")}


# --- cross-references ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_mounted_secrets_and_configmaps_are_declared(combination: str) -> None:
    objects = render(combination)
    doc = DOC.read_text()
    for template in pod_templates(objects):
        volumes = {volume["name"]: volume for volume in template["spec"]["volumes"]}
        for container in containers(template):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']} mounts undeclared volume {mount['name']}"
            for entry in container.get("env", []):
                ref = entry.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    assert ref["key"] in one(objects, "ConfigMap", ref["name"])["data"]
        for volume in volumes.values():
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                keys = {item["key"] for item in volume["secret"]["items"]}
                assert name in SECRETS and keys <= SECRETS[name], f"undeclared secret or key: {name} {keys}"
                assert f"`{name}`" in doc, f"deploy/kubernetes/README.md does not say how to create {name}"
                for key in keys:
                    assert f"`{key}`" in doc, f"deploy/kubernetes/README.md does not name key {key} of {name}"
            if "configMap" in volume:
                data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
                assert data, volume
        # No Secret is created by the manifests (they hold no secret value), except by cert-manager at run time.
        assert not of_kind(objects, "Secret")


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_secret_files_named_by_flags_are_mounted(combination: str) -> None:
    """Every file flag points into a mounted volume at a key it holds: `..data/<key>` for serve (its readers
    refuse the key's symbolic link), the key itself for Envoy (it follows links)."""
    objects = render(combination)
    statefulset, container = server(objects)
    _, init, envoy = gateway(objects)
    pairs = [
        (statefulset, container, container["args"], "..data/"),
        (one(objects, "Deployment", "ci-gateway"), envoy, init["args"], ""),
    ]
    for workload, reader, args, via in pairs:
        volumes = {volume["name"]: volume for volume in workload["spec"]["template"]["spec"]["volumes"]}
        for arg in args:
            flag, _, value = arg.partition("=")
            if not value.startswith("/") or flag == "--policy":
                continue
            inside = [
                m for m in reader["volumeMounts"] if value == m["mountPath"] or value.startswith(m["mountPath"] + "/")
            ]
            mount = inside[0] if inside else None
            assert mount is not None, f"{arg}: no volume of {reader['name']} is mounted there"
            secret = volumes[mount["name"]].get("secret")
            if secret is None:
                continue
            relative = value[len(mount["mountPath"]) + 1 :]
            assert relative.startswith(via), f"{arg}: a Secret's file must be read as {mount['mountPath']}/{via}KEY"
            assert relative[len(via) :] in {item["path"] for item in secret["items"]}, arg


@pytest.mark.parametrize("combination", ["base", "all"])
def test_named_ports_and_selectors_resolve(combination: str) -> None:
    objects = render(combination)
    templates = pod_templates(objects)

    def selected(selector: Mapping[str, str]) -> list[dict[str, Any]]:
        chosen = [t for t in templates if matches(selector, t["metadata"]["labels"])]
        assert chosen, f"selector {selector} selects no pod"
        return chosen

    def port_names(template: Mapping[str, Any]) -> set[str]:
        return {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}

    for template in templates:
        names = port_names(template)
        for container in template["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                handler = container.get(probe, {})
                port = (handler.get("httpGet") or handler.get("tcpSocket") or {}).get("port")
                if probe in container:
                    assert port in names, f"{container['name']} {probe} names port {port}"
    for service in of_kind(objects, "Service"):
        for pod in selected(service["spec"]["selector"]):
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in port_names(pod), f"Service {service['metadata']['name']}: {port}"
    for budget in of_kind(objects, "PodDisruptionBudget"):
        selected(budget["spec"]["selector"]["matchLabels"])
    for policy in of_kind(objects, "NetworkPolicy"):
        pods = selected(policy["spec"]["podSelector"]["matchLabels"])
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    selected(peer["podSelector"]["matchLabels"])  # a peer in this namespace: must exist
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    assert all(port["port"] in port_names(pod) for pod in pods), f"{policy['metadata']}: {port}"
    for monitor in of_kind(objects, "ServiceMonitor"):
        services = [
            s
            for s in of_kind(objects, "Service")
            if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, "the ServiceMonitor must select exactly the admin Service"
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    for monitor in of_kind(objects, "PodMonitor"):
        for pod in selected(monitor["spec"]["selector"]["matchLabels"]):
            assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= port_names(pod)


def test_xds_is_reachable_only_by_gateways() -> None:
    objects = render("base")
    policy = one(objects, "NetworkPolicy", "controlplane")
    gateway_labels = one(objects, "Deployment", "ci-gateway")["spec"]["template"]["metadata"]["labels"]
    server_labels = one(objects, "StatefulSet", "controlplane")["spec"]["template"]["metadata"]["labels"]
    xds_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "xds" for p in r.get("ports", []))]
    assert len(xds_rules) == 1 and len(xds_rules[0]["from"]) == 1
    peer = xds_rules[0]["from"][0]
    assert set(peer) == {"podSelector"}
    assert matches(peer["podSelector"]["matchLabels"], gateway_labels)
    assert not matches(peer["podSelector"]["matchLabels"], server_labels)
    admin_rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "admin" for p in r.get("ports", []))]
    assert [rule["from"] for rule in admin_rules] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    ]
    egress_ports = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert egress_ports == {53, 5432, 443}


# --- the gateway: its bootstrap, and the real Envoy ---------------------------------------------------------------

BOOTSTRAP_COMMAND = ["/bin/sh", "-c", 'exec controlplane bootstrap "$@" > /etc/envoy/bootstrap.yaml', "bootstrap"]


def envoy_config_yaml(envoy: Mapping[str, Any]) -> dict[str, Any]:
    args = envoy["args"]
    loaded: dict[str, Any] = yaml.safe_load(args[args.index("--config-yaml") + 1])
    return loaded


def render_bootstrap(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> tuple[Path, list[str]]:
    """Run the initContainer as kubelet would: its own command (the shell and its redirection) and arguments, with
    the `controlplane` script of this checkout on PATH, its output directory and the Envoy container's Secret files
    moved under tmp_path. Returns the bootstrap written and Envoy's arguments reading it."""
    _, init, envoy = gateway(objects)
    assert init["command"] == BOOTSTRAP_COMMAND
    args = expand(init["args"], init, objects, pod="ci-gateway-7d9f8b6c5-x2x4q")
    pki = make_pki(tmp_path / "pki")
    files = {"ca.crt": pki.ca, "tls.crt": pki.client.cert, "tls.key": pki.client.key}
    for mount in envoy["volumeMounts"]:
        if mount["mountPath"] != "/etc/envoy":
            local = tmp_path / mount["mountPath"].strip("/").replace("/", "_")
            local.mkdir()
            for name, source in files.items():
                (local / name).write_bytes(source.read_bytes())
            args = [arg.replace("=" + mount["mountPath"] + "/", f"={local}/") for arg in args]
    output = tmp_path / "etc-envoy"
    output.mkdir()
    command = [part.replace("/etc/envoy/", f"{output}/") for part in init["command"]]
    args = [arg.replace("=/etc/envoy/", f"={output}/") for arg in args]  # --tls-sds-dir writes there too
    scripts = Path(sys.executable).parent  # the venv's bin: its `controlplane` is the image's entry point
    assert (scripts / "controlplane").is_file()
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{scripts}:/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    path = output / "bootstrap.yaml"
    assert yaml.safe_load(path.read_text())["node"]["id"] == "ci-gateway-7d9f8b6c5-x2x4q"
    envoy_args = list(envoy["args"])
    envoy_args[envoy_args.index("-c") + 1] = str(path)
    return path, envoy_args


def test_the_bootstrap_lists_every_replica_by_its_own_name() -> None:
    objects = render("base")
    statefulset, container = server(objects)
    _, init, envoy = gateway(objects)
    addresses = flag_value(init["args"], "--xds-address").split(",")
    service = statefulset["spec"]["serviceName"]
    assert one(objects, "Service", service)["spec"]["clusterIP"] == "None"
    xds_port = listen_port(container["args"], "--xds-address")
    assert addresses == [f"controlplane-{i}.{service}:{xds_port}" for i in range(statefulset["spec"]["replicas"])]
    # The bootstrap is written where Envoy reads it, on a volume both containers mount.
    (shared,) = [m for m in init["volumeMounts"] if m["mountPath"] == "/etc/envoy"]
    assert any(m["name"] == shared["name"] and m["mountPath"] == "/etc/envoy" for m in envoy["volumeMounts"])
    assert envoy["args"][envoy["args"].index("-c") + 1] == "/etc/envoy/bootstrap.yaml"
    # The group is a Gateway of the policy, and Envoy's listener port is that Gateway's.
    group = flag_value(init["args"], "--group")
    policy = yaml.safe_load(one(objects, "ConfigMap", "controlplane-policy")["data"]["gateway.yaml"])
    assert policy["kind"] == "Gateway" and policy["name"] == group
    listener = next(p for p in envoy["ports"] if p["name"] == "listener")
    assert listener["containerPort"] == policy["listen"]["port"]


def test_envoy_admin_port_matches_its_container_port_and_probes() -> None:
    _, _, envoy = gateway(render("base"))
    admin = envoy_config_yaml(envoy)["admin"]
    port = next(p for p in envoy["ports"] if p["name"] == "envoy-admin")
    assert admin["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": port["containerPort"]}
    allowed = {entry["exact"] for entry in admin["allow_paths"]}
    assert envoy["readinessProbe"]["httpGet"]["path"] in allowed
    assert allowed == {"/ready", "/stats/prometheus"}


@pytest.mark.parametrize("combination", ["base", "xds-tls"])
def test_envoy_accepts_the_gateway_bootstrap(combination: str, tmp_path: Path) -> None:
    """`envoy --mode validate` (the real binary) on what the initContainer writes, with the container's flags."""
    path, envoy_args = render_bootstrap(render(combination), tmp_path)
    if combination == "xds-tls":
        tls = yaml.safe_load(path.read_text())["static_resources"]["clusters"][0]["transport_socket"]
        assert tls["typed_config"]["sni"] == "controlplane-xds"
        # the client certificate and CA come through file-based SDS, so that Envoy re-reads them on rotation
        common = tls["typed_config"]["common_tls_context"]
        (sds,) = common["tls_certificate_sds_secret_configs"]
        assert Path(sds["sds_config"]["path_config_source"]["path"]).is_file()
    done = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", *envoy_args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.e2e
def test_envoys_admin_serves_only_the_probe_and_metrics_paths(tmp_path: Path) -> None:
    """The container's --config-yaml, merged over the bootstrap by the real Envoy: /ready and /stats/prometheus
    answer, the rest of admin (config dump, quit) is refused. The admin address is moved to loopback here."""
    objects = render("base")
    path, _ = render_bootstrap(objects, tmp_path)
    _, _, envoy_container = gateway(objects)
    overlay = envoy_config_yaml(envoy_container)
    del overlay["admin"]["address"]  # EnvoyProcess puts admin on 127.0.0.1, a kernel-chosen port
    bootstrap = yaml.safe_load(path.read_text())
    with EnvoyProcess(bootstrap, wait_ready=False, extra_args=["--config-yaml", json.dumps(overlay)]) as envoy:

        def status(admin_path: str) -> int | None:
            try:
                return envoy.admin_get(admin_path, timeout=2.0)[0]
            except OSError:
                return None

        assert poll_until(lambda: status("/ready"), 20.0, 0.05, "Envoy admin never answered") in (200, 503)
        assert status("/stats/prometheus") == 200
        for refused in ("/config_dump", "/quitquitquit", "/server_info", "/clusters"):
            assert status(refused) == 403, refused
        assert envoy.running


def test_the_prometheus_rule_is_the_alert_rule_file() -> None:
    """The PrometheusRule is written from deploy/monitoring's rule file (`make prometheusrule`), never edited apart,
    and the ServiceMonitor gives the scraped series the job the rules' `up{job=...}` names."""
    from deploy.monitoring.prometheusrule import TARGET
    from deploy.monitoring.prometheusrule import render as written

    assert TARGET.read_text() == written(), "run `make prometheusrule` after editing deploy/monitoring"
    objects = render("servicemonitor")
    rule = one(objects, "PrometheusRule", "controlplane")
    monitor = one(objects, "ServiceMonitor", "controlplane")
    (service,) = [s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "controlplane-admin"]
    job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
    jobs = set(re.findall(r'job="([^"]+)"', yaml.safe_dump(rule["spec"])))
    assert jobs == {job}


def test_endpoint_discovery_gets_exactly_the_access_its_watch_uses() -> None:
    """With Service-backed backends the control plane lists and watches EndpointSlices with its ServiceAccount's
    token: the component mounts that token (the base mounts none) and grants list + watch on EndpointSlices to
    that account, nothing more; the base grants nothing."""
    assert not of_kind(render("base"), "ClusterRole")
    objects = render("kubernetes-endpoints")
    statefulset, _ = server(objects)
    assert statefulset["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    (role,) = of_kind(objects, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
    ]
    (binding,) = of_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = statefulset["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    # the source asks for nothing else: one list call (a watch is that list with watch=true)
    source = (ROOT / "controlplane" / "sources" / "kubernetes.py").read_text()
    calls = set(re.findall(r"\b(list|read|create|patch|replace|delete)_\w+", source))
    assert calls <= {"list"}, calls
