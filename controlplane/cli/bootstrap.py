"""The Envoy bootstrap that points a proxy at this control plane (``controlplane bootstrap --group G``).

Everything a proxy serves comes over ADS; the bootstrap only says who the proxy is and where the control plane
lives, so it can be generated once per gateway group and baked into an image or a ConfigMap.

Choices worth knowing:
- ``node.cluster`` is the gateway group: the control plane picks the snapshot by it, so every Envoy in a group
  gets identical config and the group survives pod restarts (``node.id`` may be a pod name).
- SotW ADS (``GRPC``) with ``set_node_on_first_message_only``: the node is sent once per stream, not per
  request.
- ``xds_cluster`` is HTTP/2 (gRPC needs it) with keepalive pings, so a half-dead control plane connection is
  noticed and re-established rather than waiting forever; STATIC for IPs, STRICT_DNS when a hostname is given:
  every address a name resolves to becomes an endpoint (a headless Service lists each replica), re-resolved
  as replicas come and go.
- Several addresses (replicas) are one priority each, in an order rotated by the node id: a fleet spreads over
  the replicas while each Envoy's streams (ADS and the access log, which a replica attests by an ADS stream on
  itself) go to the same one; round robin split them. One refused connect or reset stream ejects a replica, so
  Envoy's next attempt goes to the next; replicas serve identical content-hashed versions, so the resumed
  stream re-sends nothing (docs/shared-state.md, "Replicas: identical versions and failover").
- The admin interface defaults to loopback: it can dump config and quit the server, so it must not be exposed.
- With ``--tls-ca/--tls-cert/--tls-key`` the xds_cluster speaks mTLS (ALPN h2) and checks the control plane's
  certificate against the CA *and* its name (SNI as a DNS SAN, or the address as an IP SAN): Envoy checks no
  name unless told, so any certificate from the same CA, a proxy's own included, would otherwise pass. The
  files are referenced by path (no key material in the bootstrap). Inline in the transport socket Envoy reads
  them once, at start; with ``--tls-sds-dir`` they come through two file-based SDS secrets whose
  ``watched_directory`` is the certificates' directory, and Envoy 1.40 re-reads them when a file is renamed
  into it (a Secret volume's ``..data`` swap, cert-manager, ``mv``): new connections to the control plane use
  the new certificate with no restart (docs/certificate-rotation.md has what was observed).
- The overload manager caps downstream connections, which Envoy otherwise warns about at startup and which
  keeps one noisy client from exhausting file descriptors.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.compiler.names import XDS_CLUSTER
from controlplane.compiler.util import is_ip
from controlplane.serving import LOOPBACK
from controlplane.statefile import atomic_write_text

MAX_DOWNSTREAM_CONNECTIONS = 50_000
# With several replicas: one failed connect or reset stream (counted as a 503) takes a replica out of the
# proxy's choice, so its next stream goes to the next replica by priority; it is tried again after the ejection
# time (longer each time it fails again). Any share of the replicas may be out: with all out Envoy tries anyway.
FAILOVER_DETECTION: dict[str, Any] = {
    "consecutive_5xx": 1,
    "interval": "1s",
    "base_ejection_time": "10s",
    "max_ejection_percent": 100,
}
UPSTREAM_TLS_CONTEXT = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# The file-based SDS secrets of the xds_cluster (one secret per file: Envoy rejects a file holding two).
CLIENT_CERT_SECRET = "xds_client_certificate"
TRUSTED_CA_SECRET = "xds_trusted_ca"


@dataclass(frozen=True)
class ClientTls:
    """mTLS from Envoy to the control plane: PEM file paths as seen by the proxy, and the name to verify."""

    ca_file: str
    cert_file: str
    key_file: str
    sni: str | None = None  # default: the xDS host when it is a name
    # Where the SDS files go (a directory on the proxy); None: the files are inline and read once at start.
    sds_dir: str | None = None

    def sds_path(self, secret: str) -> str:
        assert self.sds_dir is not None
        return posixpath.join(self.sds_dir, f"{secret}.json")


def sds_files(tls: ClientTls) -> dict[str, str]:
    """The SDS files a ``--tls-sds-dir`` bootstrap refers to, path -> content: each holds one Secret that names
    the PEM files and the directory Envoy watches for their rotation (the directory holding the file, where a
    Secret volume swaps ``..data`` and an atomic writer renames)."""

    def secret(name: str, body: dict[str, Any]) -> str:
        return json.dumps({"resources": [{"@type": SECRET_TYPE, "name": name, **body}]}, indent=2) + "\n"

    certificate = {
        "certificate_chain": {"filename": tls.cert_file},
        "private_key": {"filename": tls.key_file},
        "watched_directory": {"path": posixpath.dirname(tls.cert_file) or "."},
    }
    trusted = {
        "trusted_ca": {"filename": tls.ca_file},
        "watched_directory": {"path": posixpath.dirname(tls.ca_file) or "."},
    }
    return {
        tls.sds_path(CLIENT_CERT_SECRET): secret(CLIENT_CERT_SECRET, {"tls_certificate": certificate}),
        tls.sds_path(TRUSTED_CA_SECRET): secret(TRUSTED_CA_SECRET, {"validation_context": trusted}),
    }


def write_sds_files(tls: ClientTls) -> None:
    """Write `sds_files(tls)`, each by the project's atomic write (an Envoy already watching one never reads half
    a file), readable by others as any new file (Envoy may run as another user); the directory is created as
    any new one too, not private as a state directory would be."""
    assert tls.sds_dir is not None
    Path(tls.sds_dir).mkdir(parents=True, exist_ok=True)
    for path, content in sds_files(tls).items():
        atomic_write_text(Path(path), content, mode=None)


def _check_watched_pair(tls: ClientTls) -> None:
    """With SDS files, the certificate and key must share a directory: a secret has one `watched_directory`,
    and the real Envoy 1.40 does not see a file renamed into any other. A rotation that renames the
    certificate first (cert-manager's order) is refused until the key follows (`key_rotation_failed`); a key
    renamed into an unwatched directory is never seen, so the gateway keeps the old certificate until it
    expires and then cannot reach the control plane (docs/certificate-rotation.md)."""
    if tls.sds_dir is None:
        return
    cert_dir, key_dir = (posixpath.dirname(path) or "." for path in (tls.cert_file, tls.key_file))
    if posixpath.normpath(cert_dir) != posixpath.normpath(key_dir):
        raise ValueError(
            f"--tls-sds-dir needs --tls-cert and --tls-key in one directory (Envoy watches one per secret and "
            f"would miss a rotation of the other): {cert_dir} and {key_dir}"
        )


def _sds_config(tls: ClientTls, secret: str) -> dict[str, Any]:
    return {
        "name": secret,
        "sds_config": {"path_config_source": {"path": tls.sds_path(secret)}, "resource_api_version": "V3"},
    }


def _server_name(tls: ClientTls, hosts: Sequence[str]) -> str | None:
    """The one name every replica's certificate must hold. One cluster sends one SNI, so several different
    hostnames need an explicit ``sni``; IPs alone are checked as IP SANs instead."""
    if tls.sni:
        return tls.sni
    names = sorted({host for host in hosts if not is_ip(host)})
    if len(names) > 1 or (names and len(set(hosts)) > 1):
        raise ValueError(
            f"several xDS hosts {', '.join(hosts)}: give tls sni, the name every replica's certificate holds"
        )
    return names[0] if names else None


def _transport_socket(tls: ClientTls, hosts: Sequence[str]) -> dict[str, Any]:
    sni = _server_name(tls, hosts)
    san = (
        [{"san_type": "DNS", "matcher": {"exact": sni}}]
        if sni
        else [{"san_type": "IP_ADDRESS", "matcher": {"exact": host}} for host in dict.fromkeys(hosts)]
    )
    common: dict[str, Any] = {"alpn_protocols": ["h2"]}
    if tls.sds_dir is None:
        common["tls_certificates"] = [
            {"certificate_chain": {"filename": tls.cert_file}, "private_key": {"filename": tls.key_file}}
        ]
        common["validation_context"] = {"trusted_ca": {"filename": tls.ca_file}, "match_typed_subject_alt_names": san}
    else:  # the CA from its SDS file, the name check stays in the bootstrap
        common["tls_certificate_sds_secret_configs"] = [_sds_config(tls, CLIENT_CERT_SECRET)]
        common["combined_validation_context"] = {
            "default_validation_context": {"match_typed_subject_alt_names": san},
            "validation_context_sds_secret_config": _sds_config(tls, TRUSTED_CA_SECRET),
        }
    context: dict[str, Any] = {"@type": UPSTREAM_TLS_CONTEXT, "common_tls_context": common}
    if sni:
        context["sni"] = sni
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


class _EnvoySafeDumper(yaml.SafeDumper):
    """Envoy's YAML loader reads ``y``/``n`` as booleans (YAML 1.1) but PyYAML writes them unquoted: a node id
    or group named ``n`` became ``node.id: false`` and Envoy refused the file. Registering them as booleans
    here makes PyYAML quote them. Aliases are off because ``&id001`` anchors only confuse a human reading the
    file."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_EnvoySafeDumper.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))


def _check_port(name: str, port: int, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise ValueError(f"{name} must be an integer in {low}..65535, got {port!r}")


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def replica_order(node_id: str, addresses: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The replicas in the order this proxy prefers them: rotated by a stable hash of its node id, so a fleet
    spreads over the replicas while each proxy keeps to one (its ADS and access-log streams on the same one)."""
    start = int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:8], "big") % len(addresses)
    return [*addresses[start:], *addresses[:start]]


def _xds_cluster(node_id: str, addresses: Sequence[tuple[str, int]], tls: ClientTls | None) -> dict[str, Any]:
    ip = all(is_ip(host) for host, _ in addresses)
    preferred = replica_order(node_id, addresses)
    endpoints = [
        {"priority": priority, "lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
        for priority, (host, port) in enumerate(preferred)
    ]
    cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if ip else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                    }
                },
            }
        },
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
        "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": endpoints},
    }
    if len(addresses) > 1:
        cluster["outlier_detection"] = FAILOVER_DETECTION
    if not ip:
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    if tls is not None:
        cluster["transport_socket"] = _transport_socket(tls, [host for host, _ in addresses])
    return cluster


# State of the World, or Delta (incremental: only changed resources travel, and a reconnect costs nothing).
API_TYPES: dict[str, str] = {"sotw": "GRPC", "delta": "DELTA_GRPC"}
DEFAULT_API = "sotw"
# Envoy's own admin interface: loopback (it can dump config and quit the server), on Envoy's customary port.
DEFAULT_ADMIN_ADDRESS = LOOPBACK
DEFAULT_ADMIN_PORT = 9901


# Envoy's runtime key for the largest RE2 program a regex may compile to; 50,000 revoked ids in one bucket need
# about 250,000 (docs/envoy-ecds.md §5).
RE2_PROGRAM_SIZE_KEY = "re2.max_program_size.error_level"
RE2_MAX_PROGRAM_SIZE = 1_000_000


def render_bootstrap(
    *,
    group: str,
    node_id: str,
    xds_host: str,
    xds_port: int,
    admin_address: str = DEFAULT_ADMIN_ADDRESS,
    admin_port: int = DEFAULT_ADMIN_PORT,
    tls: ClientTls | None = None,
    api: str = DEFAULT_API,
    more_xds_addresses: Sequence[tuple[str, int]] = (),
) -> dict[str, Any]:
    """A complete Envoy v3 bootstrap as plain data (JSON/YAML-serialisable), validated up front so a typo
    fails here rather than as an Envoy that never becomes ready.

    `more_xds_addresses`: further control plane replicas, (host, port) each, after `xds_host:xds_port`."""
    addresses = list(dict.fromkeys([(xds_host, xds_port), *more_xds_addresses]))
    for name, value in (("group", group), ("node_id", node_id), ("admin_address", admin_address)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    for host, port in addresses:
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"xds_host must be a non-empty string, got {host!r}")
        _check_port("xds_port", port)
    if api not in API_TYPES:
        raise ValueError(f"api must be one of {', '.join(API_TYPES)}, got {api!r}")
    _check_port("admin_port", admin_port, allow_zero=True)  # 0 = kernel-chosen, useful with --admin-address-path
    if tls is not None:
        for name, value in (
            ("tls ca_file", tls.ca_file),
            ("tls cert_file", tls.cert_file),
            ("tls key_file", tls.key_file),
        ):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty path, got {value!r}")
        _check_watched_pair(tls)
    if not is_ip(admin_address):
        raise ValueError(f"admin_address must be an IP address (Envoy does not resolve it), got {admin_address!r}")

    return {
        "node": {"id": node_id, "cluster": group},
        "admin": {"address": _socket_address(admin_address, admin_port)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": API_TYPES[api],
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [_xds_cluster(node_id, addresses, tls)]},
        "layered_runtime": {
            "layers": [
                # A revocation bucket's regex (compiler/revocations.py) is far over RE2's default program size
                # limit (100), which Envoy would refuse (NACK) and keep the previous bucket in force.
                {"name": "static_layer", "static_layer": {RE2_PROGRAM_SIZE_KEY: RE2_MAX_PROGRAM_SIZE}},
                {"name": "admin_layer", "admin_layer": {}},
            ]
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/"
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
    }


def bootstrap_yaml(
    *,
    group: str,
    node_id: str,
    xds_host: str,
    xds_port: int,
    admin_address: str = DEFAULT_ADMIN_ADDRESS,
    admin_port: int = DEFAULT_ADMIN_PORT,
    tls: ClientTls | None = None,
    api: str = DEFAULT_API,
    more_xds_addresses: Sequence[tuple[str, int]] = (),
) -> str:
    """The same bootstrap as YAML, in Envoy's field order (``sort_keys=False``) so it reads like the docs."""
    return yaml.dump(
        render_bootstrap(
            group=group,
            node_id=node_id,
            xds_host=xds_host,
            xds_port=xds_port,
            admin_address=admin_address,
            admin_port=admin_port,
            tls=tls,
            api=api,
            more_xds_addresses=more_xds_addresses,
        ),
        Dumper=_EnvoySafeDumper,
        sort_keys=False,
    )
