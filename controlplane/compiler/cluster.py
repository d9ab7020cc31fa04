"""Upstream clusters: one per backend, one per REMOTE issuer's JWKS endpoint (relayed keys are inline), and the
control plane's token exchange when it is enabled."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from controlplane.compiler.names import EXCHANGE_CA_SECRET, EXCHANGE_CLUSTER, backend_cluster, jwks_cluster
from controlplane.compiler.util import is_ip, millis, packed, seconds
from controlplane.model.policy import Backend, Endpoint, Issuer

SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"


def uses_eds(backend: Backend) -> bool:
    """IP endpoints are delivered over EDS; host names need Envoy's own DNS resolution. A backend naming Kubernetes
    Services is always EDS: its endpoints are the ready addresses the run time discovered, none at all when nothing
    is known (an empty assignment: Envoy answers 503, it fails closed)."""
    return bool(backend.services) or all(is_ip(e.address) for e in backend.endpoints)


def backend_cluster_config(backend: Backend) -> cluster_pb2.Cluster:
    name = backend_cluster(backend.name)
    cluster = cluster_pb2.Cluster(name=name, connect_timeout=millis(backend.connect_timeout_ms))
    if uses_eds(backend):
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.CopyFrom(
            cluster_pb2.Cluster.EdsClusterConfig(
                eds_config=config_source_pb2.ConfigSource(
                    ads=config_source_pb2.AggregatedConfigSource(),
                    resource_api_version=config_source_pb2.V3,
                ),
            )
        )
    else:
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.load_assignment.CopyFrom(load_assignment(name, backend.endpoints))
    if backend.tls is not None:
        cluster.transport_socket.CopyFrom(_tls_socket(backend.tls.sni, backend.tls.ca_file))
    return cluster


def jwks_cluster_config(issuer: Issuer, host: str, port: int, tls: bool) -> cluster_pb2.Cluster:
    return _service_cluster(jwks_cluster(issuer.name), host, port, tls)


def exchange_cluster_config(host: str, port: int, server_name: str | None = None) -> cluster_pb2.Cluster:
    """The control plane's token-exchange listener. Plain text unless `server_name` is given (the ID tokens
    cross this hop: without TLS, run it on a trusted network). With it, TLS that checks the exchange's
    certificate against the CA bundle in the EXCHANGE_CA_SECRET secret (over ADS) and for `server_name`
    (a DNS SAN, or an IP SAN when it is an address)."""
    cluster = _service_cluster(EXCHANGE_CLUSTER, host, port, tls=False)
    if server_name is not None:
        cluster.transport_socket.CopyFrom(_exchange_tls_socket(server_name))
    return cluster


def exchange_ca_secret(ca_pem: str) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=EXCHANGE_CA_SECRET,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_string=ca_pem)
        ),
    )


def _exchange_tls_socket(server_name: str) -> base_pb2.TransportSocket:
    ip = is_ip(server_name)
    san = common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS if ip else common_pb2.SubjectAltNameMatcher.DNS,
        matcher=string_pb2.StringMatcher(exact=server_name),
    )
    context = tls_pb2.UpstreamTlsContext(
        sni="" if ip else server_name,
        common_tls_context=tls_pb2.CommonTlsContext(
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[san]),
                validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                    name=EXCHANGE_CA_SECRET,
                    sds_config=config_source_pb2.ConfigSource(
                        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
                    ),
                ),
            )
        ),
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed(context))


def _service_cluster(name: str, host: str, port: int, tls: bool) -> cluster_pb2.Cluster:
    """A single service the gateway calls by address: no EDS, Envoy resolves a host name itself."""
    cluster = cluster_pb2.Cluster(
        name=name,
        connect_timeout=seconds(2),
        type=cluster_pb2.Cluster.STATIC if is_ip(host) else cluster_pb2.Cluster.LOGICAL_DNS,
        load_assignment=load_assignment(name, (Endpoint(host, port),)),
    )
    if not is_ip(host):
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    if tls:
        cluster.transport_socket.CopyFrom(_tls_socket(host, SYSTEM_CA))
    return cluster


def load_assignment(cluster: str, endpoints: tuple[Endpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    """No endpoints (a Service with no ready pod): no locality at all, Envoy has no host and answers 503."""
    if not endpoints:
        return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster)
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(address=e.address, port_value=e.port)
                            )
                        )
                    )
                    for e in endpoints
                ]
            )
        ],
    )


def _tls_socket(sni: str, ca_file: str) -> base_pb2.TransportSocket:
    context = tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=ca_file),
                match_typed_subject_alt_names=[
                    common_pb2.SubjectAltNameMatcher(
                        san_type=common_pb2.SubjectAltNameMatcher.DNS,
                        matcher=string_pb2.StringMatcher(exact=sni),
                    )
                ],
            )
        ),
    )
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=packed(context))
