"""Envoy access-log entries as the ALS stream carries them, built for the audit receiver's tests."""

from __future__ import annotations

from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2

from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY, RBAC_FILTER

ALLOWED = {"enforced_engine_result": "allowed", "enforced_effective_policy_id": "b/r"}


def entry(
    *,
    path: str = "/reports/1",
    method: str = "GET",
    status: int = 200,
    route: str = "reports-api-default",
    cluster: str = "backend-reports-api",
    claims: dict[str, Any] | None = None,
    rbac: dict[str, str] | None = None,
    details: str = "via_upstream",
    start: float = 1_700_000_000.25,
) -> accesslog_pb2.HTTPAccessLogEntry:
    built = accesslog_pb2.HTTPAccessLogEntry()
    common = built.common_properties
    common.start_time.seconds, common.start_time.nanos = int(start), int((start % 1) * 1e9)
    common.route_name, common.upstream_cluster = route, cluster
    if claims is not None:
        common.metadata.filter_metadata[JWT_FILTER].update({PAYLOAD_KEY: claims})
    if rbac is not None:
        common.metadata.filter_metadata[RBAC_FILTER].update(rbac)
    built.request.request_method = (
        accesslog_pb2.HTTPRequestProperties.DESCRIPTOR.fields_by_name["request_method"]
        .enum_type.values_by_name[method]
        .number
    )
    built.request.path = path
    built.response.response_code.value = status
    built.response.response_code_details = details
    return built
