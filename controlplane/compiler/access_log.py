"""The access logs: which job called, and why it was allowed or denied, for every request.

Two copies of the same facts leave every gateway listener:
- a JSON line in a local file (`file_access_log`), readable on the proxy's host even when the control plane
  is down;
- a gRPC access-log stream (ALS) to the control plane (`grpc_access_log`), which keeps the audit trail that
  `controlplane audit` queries (controlplane/audit/). It rides the bootstrap's `xds_cluster`, so no extra
  cluster or address is compiled. Its entries carry the request, the response and Envoy's dynamic metadata:
  the jwt_authn payload (claims only, never the token) and the RBAC decision with its effective policy id.

Every field an auditor asks about (project, pipeline, job, ref, the RBAC decision and the policy that made
it) is in both. The token itself never is: no request header is added to the ALS entries.
"""

from __future__ import annotations

from types import MappingProxyType

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import config_source_pb2, extension_pb2, grpc_service_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.formatter.req_without_query.v3 import req_without_query_pb2
from google.protobuf import struct_pb2
from google.protobuf.wrappers_pb2 import UInt32Value

from controlplane.compiler.names import HEADER_KEY, JWT_FILTER, PAYLOAD_KEY, RBAC_FILTER, XDS_CLUSTER
from controlplane.compiler.util import millis, packed

# Envoy sends a batch when either limit is reached. Small, so an audit query sees a request within a fraction
# of a second and a crash of the proxy loses little; a busy gateway still sends few large messages.
ALS_FLUSH_INTERVAL_MS = 200
ALS_BUFFER_BYTES = 16 * 1024

_CLAIMS = (
    "iss",
    "sub",
    "project_id",
    "project_path",
    "namespace_id",
    "pipeline_id",
    "pipeline_source",
    "job_id",
    "ref",
    "ref_type",
    "ref_protected",
    "environment",
    "user_login",
)

_REQUEST_FIELDS = MappingProxyType(
    {
        "ts": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
        "method": "%REQ(:METHOD)%",
        "authority": "%REQ(:AUTHORITY)%",
        # Without the query: tokens sometimes travel in query strings, and they must never be logged.
        "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "route": "%ROUTE_NAME%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "code": "%RESPONSE_CODE%",
        # Why a token was refused (`jwt_authn_access_denied{Jwt_is_expired}`): the status Envoy answered with. Not
        # jwt_authn's per-provider failure metadata: requires_any tries every provider, and each whose issuer is
        # not the token's writes "Jwt issuer is not configured" there, on accepted tokens too, and last wins.
        "details": "%RESPONSE_CODE_DETAILS%",
        "flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "jwt_kid": f"%DYNAMIC_METADATA({JWT_FILTER}:{HEADER_KEY}:kid)%",
        "rbac_result": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_engine_result)%",
        "rbac_policy": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_effective_policy_id)%",
        # The whole RBAC struct also carries the shadow (dry-run) decision of each backend.
        "rbac": f"%DYNAMIC_METADATA({RBAC_FILTER})%",
    }
)


def json_fields() -> dict[str, str]:
    fields = dict(_REQUEST_FIELDS)
    for claim in _CLAIMS:
        fields[claim] = f"%DYNAMIC_METADATA({JWT_FILTER}:{PAYLOAD_KEY}:{claim})%"
    return fields


def file_access_log(path: str) -> accesslog_pb2.AccessLog:
    json_format = struct_pb2.Struct()
    json_format.update(json_fields())
    log_format = substitution_format_string_pb2.SubstitutionFormatString(
        json_format=json_format,
        formatters=[
            extension_pb2.TypedExtensionConfig(
                name="envoy.formatter.req_without_query",
                typed_config=packed(req_without_query_pb2.ReqWithoutQuery()),
            )
        ],
    )
    return accesslog_pb2.AccessLog(
        name="envoy.access_loggers.file",
        typed_config=packed(file_pb2.FileAccessLog(path=path, log_format=log_format)),
    )


def grpc_access_log(gateway: str) -> accesslog_pb2.AccessLog:
    """ALS to the control plane. `log_name` only labels the stream for Envoy's own stats: the receiver attributes
    entries to the gateway whose xDS stream it matched, never to what the stream claims (audit/als.py)."""
    config = als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=gateway,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
            ),
            transport_api_version=config_source_pb2.V3,
            buffer_flush_interval=millis(ALS_FLUSH_INTERVAL_MS),
            buffer_size_bytes=UInt32Value(value=ALS_BUFFER_BYTES),
        ),
        # additional_request_headers_to_log stays empty: Authorization must never leave the proxy.
    )
    return accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=packed(config))
