"""`kind: Backend`: an upstream, the host names it is served under, and how Envoy reaches it.

Host names are claimed in the tree-wide registry (`Env.hosts`): two backends serving one host is an error.
"""

from __future__ import annotations

import re
from functools import partial
from types import MappingProxyType
from typing import cast

from controlplane.model import scalars
from controlplane.model.documents import COMMON_KEYS, Doc, Env
from controlplane.model.errors import quoted
from controlplane.model.fields import Conv, Ctx, Fields, list_of, need, record, schema_of, with_schema
from controlplane.model.kinds.aws import aws_signing
from controlplane.model.policy import (
    DEFAULT_BACKEND_CREDENTIALS,
    DEFAULT_BACKEND_REVOKE,
    DEFAULT_INJECTION_HEADER,
    DEFAULT_INJECTION_PREFIX,
    Backend,
    Endpoint,
    GcpCredentials,
    Injection,
    ServiceRef,
    UpstreamTLS,
)
from controlplane.model.yaml_source import YMap, YNode, YScalar, YSeq, child_path

DEFAULT_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"

_BACKEND_KEYS = (
    *COMMON_KEYS,
    *(
        "hosts",
        "audience",
        "endpoints",
        "tls",
        "connect_timeout",
        "timeout",
        "public_paths",
        "credentials",
        "inject",
        "revoke",
        "aws",
        "gcp",
    ),
)
# "any": GitLab ID tokens (per bindings) or the control plane's exchanged credentials; "exchanged": only the latter.
_BACKEND_CREDENTIALS = (DEFAULT_BACKEND_CREDENTIALS, "exchanged")
# Which finished jobs stay denied for a backend accepting raw ID tokens (model/policy.py DEFAULT_BACKEND_REVOKE).
_BACKEND_REVOKE = (DEFAULT_BACKEND_REVOKE, "seen-jobs")


def _exact_path_check(value: str) -> str | None:
    if not value.startswith("/"):
        return f"must start with '/', got {quoted(value)}"
    if any(c in value for c in "*?#") or any(c.isspace() for c in value):
        return f"expected an exact path (no globs, query, fragment or spaces), got {quoted(value)}"
    return None


_exact_path = scalars.checked(scalars.string, _exact_path_check)


# A Kubernetes namespace or Service port name is a DNS-1123 label; a Service name a DNS-1035 label (starts with a
# letter). Checked here so a typo is a policy error with its line, not a watch that never matches.
_SERVICE_RE = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)/([a-z]([a-z0-9-]{0,61}[a-z0-9])?)\Z")
_service = scalars.matching(_SERVICE_RE, "expected a Kubernetes Service as namespace/name, such as shop/api")


def _service_port(ctx: Ctx, node: YNode, path: str) -> str | int | None:
    """A Service port's name (as in the Service's `ports[].name`) or its number."""
    if isinstance(node, YScalar) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return scalars.port(ctx, node, path)
    return _port_name(ctx, node, path)


with_schema(_service_port, {"anyOf": [schema_of(scalars.port), schema_of(scalars.name)]})


# All digits is a legal DNS label, but as a port name it is a quoted number ('80'): taken as a name it matches no
# slice's port and the backend serves nothing. No Service names a port that way in practice.
_port_name = scalars.checked(
    scalars.name,
    lambda v: f"a port name, not a number: write the number unquoted ({v}) or the port's name" if v.isdigit() else None,
)


def _endpoint_fields(f: Fields) -> Endpoint | ServiceRef:
    """`{address, port}`, or `{service: namespace/name, port: name-or-number}` for addresses discovered from the
    Service's EndpointSlices (docs/kubernetes-endpoints.md)."""
    if f.has("service"):
        service = f.required("service", _service)
        # cast: mypy cannot solve `T | None` for a union T (it widens to object)
        service_port = cast("str | int | None", f.required("port", _service_port))
        if service_port is None:
            return need(None)
        if f.has("address"):
            f.error("address", "an endpoint names either an address or a service, not both")
        namespace, _, name = need(service).partition("/")
        return ServiceRef(namespace, name, service_port)
    address, port = f.required("address", scalars.address), f.required("port", scalars.port)
    return Endpoint(need(address), need(port))


_endpoint: Conv[Endpoint | ServiceRef] = record(_endpoint_fields, ("address", "port", "service"))


def _split_endpoints(
    f: Fields, endpoints: tuple[Endpoint | ServiceRef, ...] | None
) -> tuple[tuple[Endpoint, ...] | None, tuple[ServiceRef, ...]]:
    """Addresses and services are not mixed in one backend: a Service backend is one EDS cluster fed by the watch
    alone, so what it serves is exactly what Kubernetes says is ready (a static address in it would keep getting
    traffic whatever the Service's pods do)."""
    if endpoints is None:
        return None, ()
    addresses = tuple(e for e in endpoints if isinstance(e, Endpoint))
    services = tuple(e for e in endpoints if isinstance(e, ServiceRef))
    if addresses and services:
        node = f.node.get("endpoints")
        items = node.items if isinstance(node, YSeq) else ()
        first = next((i for i, e in enumerate(endpoints) if type(e) is not type(endpoints[0])), 0)
        line = items[first].line if first < len(items) else f.line("endpoints")
        f.ctx.error(
            line,
            child_path(f.at("endpoints"), first),
            "a backend's endpoints are either all addresses ({address, port}) or all Kubernetes services "
            "({service, port}), not both",
        )
        return None, ()
    return addresses, services


def build(doc: Doc, env: Env) -> Backend:
    f = Fields(doc.ctx, doc.node, "", _BACKEND_KEYS)
    hosts = f.required("hosts", list_of(scalars.host_pattern))
    _register_hosts(doc, f, hosts, env)
    first = hosts[0] if hosts else None
    audience = f.maybe("audience", scalars.string)
    if audience is None and first is not None and not f.has("audience"):
        if first.startswith("*."):
            f.ctx.error(f.node.line, "audience", "missing required key when hosts[0] is a wildcard")
        audience = f"https://{first}"
    listed = cast("tuple[Endpoint | ServiceRef, ...] | None", f.required("endpoints", list_of(_endpoint)))
    endpoints, services = _split_endpoints(f, listed)
    tls = _tls(f, first)
    connect_timeout = f.optional("connect_timeout", scalars.duration(1, 60_000), 2000)
    timeout = f.optional("timeout", scalars.duration(1, 86_400_000), 15_000)
    public_paths = f.optional_tuple("public_paths", list_of(_exact_path, non_empty=False))
    credentials = f.optional(
        "credentials", scalars.enum("credentials", _BACKEND_CREDENTIALS), DEFAULT_BACKEND_CREDENTIALS
    )
    inject = f.maybe("inject", _injection)
    aws = f.maybe("aws", aws_signing)
    if f.has("aws") and (f.has("inject") or f.has("gcp")):
        f.error("aws", "a backend either signs for AWS or injects a credential (inject, gcp), not both")
    if f.has("aws") and f.has("public_paths"):
        f.error(
            "public_paths",
            "an AWS backend signs every request with its role: a public path would lend the role to anyone",
        )
    gcp = f.maybe("gcp", _gcp)
    if gcp is not None:
        if f.has("inject"):
            f.error("gcp", "a gcp backend's credential is injected as Authorization: Bearer; drop inject")
        if f.has("public_paths"):  # the injector stays on there, for requests with no verified job at all
            f.error(
                "public_paths",
                "a gcp backend injects its service account's token: a public path would lend it to anyone",
            )
        if any(h.startswith("*") for h in hosts or ()):  # Google's shared front ends route by Host
            f.error(
                "hosts",
                "a wildcard host on a gcp: backend would send its token to whichever service the job names in "
                "Host (e.g. a Cloud Run service of its own); list the host names",
            )
        inject = Injection(header="Authorization", prefix="Bearer ")
    revoke = f.optional("revoke", scalars.enum("revoke", _BACKEND_REVOKE), DEFAULT_BACKEND_REVOKE)
    if f.has("revoke") and credentials == "exchanged":
        f.error(
            "revoke",
            "applies only to a backend accepting raw ID tokens (credentials: any): an exchanged "
            "credential is refused once its job is over, whatever this says",
        )
    return Backend(
        name=need(doc.name),
        hosts=need(hosts),
        audience=need(audience),
        endpoints=need(endpoints),
        tls=tls,
        connect_timeout_ms=need(connect_timeout),
        request_timeout_ms=need(timeout),
        public_paths=need(public_paths),
        source=doc.source,
        credentials=need(credentials),
        inject=inject,
        revoke=need(revoke),
        services=services,
        aws=aws,
        gcp=gcp,
    )


_INJECT_KEYS = ("header", "value_prefix", "secret_env", "secret_file")
_NO_SECRETS = MappingProxyType(
    {
        key: "secrets never go in policy files (they are read by many and kept in git history): "
        "name where to find it with secret_env or secret_file"
        for key in ("secret", "value", "token")
    }
)
# An HTTP field name (RFC 9110 token); pseudo-headers and Host are routing, not credentials.
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_header_name = scalars.checked(
    scalars.matching(_HEADER_RE, "expected an HTTP header name such as Authorization"),
    lambda v: "the Host header cannot carry a credential" if v.lower() == "host" else None,
)
_value_prefix = scalars.checked(
    scalars.string, lambda v: "no control characters in a header value" if any(ord(c) < 0x20 for c in v) else None
)


def _injection_fields(i: Fields) -> Injection:
    secret_env, secret_file = scalars.secret_source(i, "secret_env", "secret_file")
    header = i.optional("header", _header_name, DEFAULT_INJECTION_HEADER)
    prefix = i.optional("value_prefix", _value_prefix, DEFAULT_INJECTION_PREFIX)
    return Injection(header=need(header), prefix=need(prefix), secret_env=secret_env, secret_file=secret_file)


_injection = record(_injection_fields, _INJECT_KEYS, _NO_SECRETS)


_GCP_KEYS = ("workload_identity_provider", "service_account", "scopes", "id_token_audience", "lifetime")
# Google's resource name of a workload identity pool provider and a service account email (cloud/gcp.py checks
# the same at run time; here a typo is a policy error with its line).
_PROVIDER_RE = re.compile(
    r"^projects/[0-9]+/locations/global/workloadIdentityPools/[a-z0-9-]{4,32}/providers/[a-z0-9-]{4,32}\Z"
)
_SERVICE_ACCOUNT_RE = re.compile(r"^[a-z0-9-]{6,30}@[a-z0-9.-]+\Z")
_SCOPE_RE = re.compile(r"^https://www\.googleapis\.com/auth/[A-Za-z0-9._/-]+\Z")
_provider = scalars.matching(
    _PROVIDER_RE,
    "expected projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER",
)
_service_account = scalars.matching(_SERVICE_ACCOUNT_RE, "expected a service account email")
_scope = scalars.matching(_SCOPE_RE, "expected an OAuth scope such as https://www.googleapis.com/auth/cloud-platform")
_https_audience = scalars.checked(
    scalars.string,
    lambda v: None if v.startswith("https://") and not any(c.isspace() for c in v) else "expected an https:// URL",
)
GCP_MAX_LIFETIME_S = 43_200  # Google's ceiling (with the lifetime-extension organisation policy; else 3600)
DEFAULT_GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def _gcp_fields(g: Fields) -> GcpCredentials:
    """Either `scopes` (an access token; default cloud-platform) or `id_token_audience` (an ID token), not both."""
    provider = g.required("workload_identity_provider", _provider)
    account = g.required("service_account", _service_account)
    scopes = g.optional_tuple("scopes", list_of(_scope))
    audience = g.maybe("id_token_audience", _https_audience)
    if g.has("scopes") and g.has("id_token_audience"):
        g.error("id_token_audience", "an ID token has an audience, not scopes: give one of scopes, id_token_audience")
    lifetime = g.optional("lifetime", scalars.seconds(1, GCP_MAX_LIFETIME_S), 3600)
    return GcpCredentials(
        workload_identity_provider=need(provider),
        service_account=need(account),
        scopes=() if audience is not None else (need(scopes) or (DEFAULT_GCP_SCOPE,)),
        id_token_audience=audience,
        lifetime_s=need(lifetime),
    )


_gcp = record(
    _gcp_fields,
    _GCP_KEYS,
    MappingProxyType(
        {
            key: "no secret in a gcp block: the control plane obtains the token itself (workload identity)"
            for key in ("secret", "value", "token", "credentials", "secret_env", "secret_file")
        }
    ),
)


def _register_hosts(doc: Doc, f: Fields, hosts: tuple[str, ...] | None, env: Env) -> None:
    node = f.node.get("hosts")
    if hosts is None or not isinstance(node, YSeq):
        return
    label = f"Backend {quoted(doc.name)}"
    for i, (host, item) in enumerate(zip(hosts, node.items, strict=True)):
        env.hosts.add(host, doc.ctx.source(item.line), f"hosts[{i}]", label)


def _tls(f: Fields, first_host: str | None) -> UpstreamTLS | None:
    """`tls: true` means every default; `false` or no key means plain text to the upstream."""
    node = f.node.get("tls")
    if isinstance(node, YScalar) and isinstance(node.value, bool) and not node.reported:
        node = YMap({}, node.line) if node.value else None
    if node is None:
        return None
    return record(partial(_tls_fields, first_host=first_host), ("sni", "ca_file"))(f.ctx, node, f.at("tls"))


def _tls_fields(t: Fields, first_host: str | None) -> UpstreamTLS:
    """SNI defaults to the first host, unless that is a wildcard (no single name to present)."""
    sni = t.maybe("sni", scalars.hostname)
    if not t.has("sni") and first_host is not None:
        if first_host.startswith("*."):
            t.ctx.error(t.node.line, t.at("sni"), "missing required key when hosts[0] is a wildcard")
        else:
            sni = first_host
    ca_file = t.optional("ca_file", scalars.absolute_path, DEFAULT_CA_FILE)
    return UpstreamTLS(need(sni), need(ca_file))
