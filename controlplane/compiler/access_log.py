"""The access log: one JSON line per request that says which job called, and why it was allowed or denied.

This is the raw material of the audit trail: every field an auditor asks about (project, pipeline, job,
ref, the RBAC decision and the policy that made it) is on the line. The token itself never is.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import extension_pb2, substitution_format_string_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.formatter.req_without_query.v3 import req_without_query_pb2
from google.protobuf import struct_pb2

from controlplane.compiler.names import FAILURE_KEY, HEADER_KEY, JWT_FILTER, PAYLOAD_KEY, RBAC_FILTER
from controlplane.compiler.util import packed

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

_REQUEST_FIELDS = {
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
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "jwt_kid": f"%DYNAMIC_METADATA({JWT_FILTER}:{HEADER_KEY}:kid)%",
    "jwt_failure": f"%DYNAMIC_METADATA({JWT_FILTER}:{FAILURE_KEY})%",
    "rbac_result": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_engine_result)%",
    "rbac_policy": f"%DYNAMIC_METADATA({RBAC_FILTER}:enforced_effective_policy_id)%",
    # The whole RBAC struct also carries the shadow (dry-run) decision of each backend.
    "rbac": f"%DYNAMIC_METADATA({RBAC_FILTER})%",
}


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
