"""The gRPC access-log service (ALS) receiver: Envoy's access log entries → audit records.

Every gateway listener streams its HTTP access log to `envoy.service.accesslog.v3.AccessLogService/
StreamAccessLogs` on the control plane (compiler/access_log.py), over the same `xds_cluster` and the same
grpc.aio server as ADS. What an entry carries that the trail needs (verified on Envoy 1.40, tests/
test_e2e_audit.py):

- the first message of a stream: `identifier.log_name` (the gateway, as compiled) and `identifier.node`;
- `common_properties.start_time`, `route_name` (`<backend>-default`...; `upstream_cluster` is empty when
  RBAC denied, as the router never ran), and `metadata.filter_metadata`:
  `envoy.filters.http.jwt_authn` → `jwt_payload` (the verified claims, never the token) and
  `envoy.filters.http.rbac` → `enforced_engine_result` / `enforced_effective_policy_id` (`<binding>/<role>`);
- `request.request_method`, `request.path` (with its query: stripped here and again by the store),
  `request.original_path` when a route rewrote it, `response.response_code` and `response_code_details`
  (why: `rbac_access_denied_matched_policy[none]`, `jwt_authn_access_denied{Jwt_is_expired}`...).

Only the listed claims are read from the payload; a token in any other claim never reaches the store.

`cloud_identity` (the AWS role ARN or Google service account a request was sent upstream as) is not in the entry:
it is looked up in the policy in service when the entry arrives (`with_cloud_identity`), for allowed requests the
router sent to the backend's cluster only. Carrying it in the entry (dynamic metadata set per virtual host) would
name the identity of the snapshot Envoy actually used, but changes every compiled listener; the lookup can be
wrong only for a request in flight across a policy change of that backend's identity (docs/cloud-audit.md).

Only gateways write the trail. The first message's identifier (node id and cluster) is only a claim: the
stream is accepted when `Senders.attest` finds an ADS stream of that node and cluster, from the same host and,
with mTLS, the same certificate identity, in a group the policy defines (`XdsServer.attest`); otherwise it is
refused with PERMISSION_DENIED and counted (`controlplane_audit_streams_refused_total{reason}`). Records name
the attested gateway (group, node, host, certificate identity), never what the entries claim, and their `time`
is the control plane's when the entry arrived; Envoy's start time is kept as `reported_time`, clamped to a
window around it. In plain text that attestation is weak: any local process shares a gateway's host and may
claim its node, so the trail is attributable per gateway only with mTLS (one client certificate per gateway).

The handler never blocks the stream on the disk: records go to the store's bounded queue, one share per
sender (dropped and counted per gateway group when full, `controlplane_audit_records_dropped_total`). A sender
is what a forger cannot share with the gateway it impersonates: the certificate identity with mTLS, else the
access-log stream itself (`sender_key`). Keyed by node id, a forger claiming a real gateway's node on the same
host had its flood displace that gateway's records. When Envoy
ends a stream, the answer is sent only after the store has committed what it sent, so an answered stream is a
durable one. `AccessLogService.close()` ends open streams the same way before the
grpc server stops (a stream still open at `server.stop` is cancelled with a traceback per stream).

The receiver also tells `on_job` (a `JobSeen`, wired by `serve` to the credentials service) about every request a
job's raw GitLab ID token got through: its job, project, issuer and `iat`/`exp`. That is how a job whose Job Hook
was missed while the control plane was down is found at its first request on a raw-token backend (Envoy cannot
ask GitLab; docs/state-and-recovery.md). The callback must only enqueue: it runs on the entry's hot path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any, Final, Protocol

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import struct_pb2

from controlplane.audit.metrics import AUDIT_RECORDS_DROPPED, AUDIT_STREAMS_REFUSED, UNATTESTED_LABEL
from controlplane.audit.store import AuditRecord, AuditTrail
from controlplane.compiler.names import JWT_FILTER, PAYLOAD_KEY, RBAC_FILTER, backend_cluster
from controlplane.model.credentials import CREDENTIAL_ISSUER
from controlplane.model.policy import Policy
from controlplane.resolved.cloud import identities
from controlplane.telemetry.ratelog import RateLimitedLog
from controlplane.xds.server import WARNINGS_PER_MINUTE, Sender, clip, peer_address
from controlplane.xds.tls import peer_identity

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"
FLUSH_TIMEOUT = 10.0  # seconds an ending stream waits for its records to be committed
# The window Envoy's own start time is clamped to, around the time an entry arrives: a request is logged when
# it ends, at most a backend's longest timeout (24 h) after it started, and the flush adds seconds.
REPORTED_TIME_PAST = 25 * 3600.0
REPORTED_TIME_FUTURE = 300.0  # clock skew between a gateway and the control plane
REFUSED_DETAILS = "access logs are accepted only from a gateway that holds an xDS stream"
# A first message is held while its sender's ADS stream is awaited: an Envoy that reconnects (a replica died, the
# control plane restarted) opens its access-log stream before its ADS stream, and that first message carries
# everything it buffered meanwhile, often far more than one flush. All first messages held at once share this
# budget; one that would go past it is judged at once, so awaiting claims hold bounded memory.
MAX_AWAITED_BYTES = 16 * 1024 * 1024

_BACKEND_PREFIX = backend_cluster("")
_PUBLIC_ROUTE = "-public/"
_ROLE_ROUTE = "-role/"  # compiler/aws.py role_route_name
_ROUTE_SUFFIXES = ("-default", "-exchange")
_ENFORCED_RESULT = "enforced_engine_result"
_ENFORCED_POLICY = "enforced_effective_policy_id"
_DECISIONS = ("allowed", "denied")


def _claim(payload: struct_pb2.Struct, name: str) -> str | None:
    """A claim as the text GitLab would send: strings as-is, integral numbers without `.0`, bools lower-case.

    Lists and objects are not identities and are not kept."""
    value = payload.fields.get(name)
    if value is None:
        return None
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "number_value":
        number = value.number_value
        return str(int(number)) if number.is_integer() else str(number)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    return None


def _struct(metadata: Any, namespace: str) -> struct_pb2.Struct:
    found: struct_pb2.Struct = metadata.filter_metadata.get(namespace, struct_pb2.Struct())
    return found


def _decision(rbac: struct_pb2.Struct, status: int) -> str:
    """RBAC's own verdict when it ran; otherwise jwt_authn refused (401/403) or the route needs no RBAC."""
    result = _claim(rbac, _ENFORCED_RESULT)
    if result in _DECISIONS:
        return str(result)
    return "denied" if status in (401, 403) else "allowed"


def _method(number: int) -> str:
    """Envoy's RequestMethod enum by name; a value newer than these protos is kept as UNKNOWN."""
    if number == base_pb2.METHOD_UNSPECIFIED:
        return ""
    try:
        return str(base_pb2.RequestMethod.Name(number))
    except ValueError:
        return "UNKNOWN"


def backend_of_route(route: str) -> str | None:
    """The backend (virtual host) a compiled route belongs to, from its name (compiler/route.py):
    `<backend>-default`, `<backend>-exchange`, `<backend>-public/<path>`, `<backend>-role/<binding>/<n>`.
    Backend names hold no `/`."""
    for marker in (_PUBLIC_ROUTE, _ROLE_ROUTE):
        head, found, _ = route.partition(marker)
        if found and head and "/" not in head:
            return head
    for suffix in _ROUTE_SUFFIXES:
        if route.endswith(suffix) and len(route) > len(suffix):
            return route.removesuffix(suffix)
    return None


def _backend(route: str, cluster: str) -> str | None:
    """By the route when there is one: `upstream_cluster` is empty when the router never ran (RBAC denied)."""
    by_route = backend_of_route(route)
    if by_route is not None:
        return by_route
    return cluster.removeprefix(_BACKEND_PREFIX) if cluster.startswith(_BACKEND_PREFIX) else None


def clamp_reported(reported: float | None, received: float) -> float | None:
    """Envoy's start time, kept within [received - 25 h, received + 5 min]: informational, never the key."""
    if reported is None:
        return None
    return min(max(reported, received - REPORTED_TIME_PAST), received + REPORTED_TIME_FUTURE)


def record_from_entry(
    entry: accesslog_pb2.HTTPAccessLogEntry,
    *,
    gateway: str,
    node: str,
    received: float | None = None,
    peer: str | None = None,
    identity: str | None = None,
) -> AuditRecord:
    """One ALS HTTP entry as an audit record (the store sanitizes it again before writing).

    `gateway`, `node`, `peer` and `identity` are the attested sender's; `received` (default now) is the time
    recorded, so no sender can date a record."""
    common = entry.common_properties
    request = entry.request
    status = int(entry.response.response_code.value)
    payload = _struct(common.metadata, JWT_FILTER).fields.get(PAYLOAD_KEY)
    claims = payload.struct_value if payload is not None else struct_pb2.Struct()
    rbac = _struct(common.metadata, RBAC_FILTER)
    issuer = _claim(claims, "iss")
    started = common.start_time.seconds + common.start_time.nanos / 1e9 if common.HasField("start_time") else None
    now = time.time() if received is None else received
    return AuditRecord(
        time=now,
        gateway=gateway,
        node=node,
        backend=_backend(common.route_name, common.upstream_cluster),
        method=_method(request.request_method),
        path=request.original_path or request.path,
        status=status,
        decision=_decision(rbac, status),
        details=entry.response.response_code_details or None,
        policy=_claim(rbac, _ENFORCED_POLICY),
        project_id=_claim(claims, "project_id"),
        project_path=_claim(claims, "project_path"),
        pipeline_id=_claim(claims, "pipeline_id"),
        job_id=_claim(claims, "job_id"),
        ref=_claim(claims, "ref"),
        user=_claim(claims, "user_login"),
        # A credential's jti names it in revocation and exchange logs; a GitLab token's jti is GitLab's business.
        credential_jti=_claim(claims, "jti") if issuer == CREDENTIAL_ISSUER else None,
        issuer=issuer,
        peer=peer,
        identity=identity,
        reported_time=clamp_reported(started, now),
        ref_type=_claim(claims, "ref_type"),
        ref_protected=_claim(claims, "ref_protected"),
        pipeline_source=_claim(claims, "pipeline_source"),
        environment=_claim(claims, "environment"),
    )


def cloud_identities(policy: Policy | None) -> dict[str, str]:
    """Backend name → the cloud identity its requests are sent upstream as: an `aws:` backend's `role_arn` (SigV4
    signed with that role's credentials), a `gcp:` backend's `service_account` (its token injected); and for each
    binding's own AWS role, `<backend>-role/<binding>` (the name of the routes choosing it, less their index) →
    that role's ARN.

    Why the route and not the record's `policy` (`<binding>/<role>`, the RBAC policy that allowed): the role is
    chosen by the route Envoy took (the first binding by name whose subject the token matches,
    resolved/aws_roles.py), while RBAC names whichever allowing policy it found; a job matching two bindings may be
    allowed by one and signed by the other. The route name is what Envoy itself reports it did. Keys cannot
    collide: backend names hold no '/'."""
    if policy is None:
        return {}
    found: dict[str, str] = {}
    for backend, cloud in identities(policy).items():
        found[backend] = cloud.identity
        found.update((_role_route_key(backend, binding), arn) for binding, arn in cloud.roles)
    return found


def _role_route_key(backend: str, binding: str) -> str:
    """compiler/aws.py `role_route_name` without its `/<index>`."""
    return f"{backend}{_ROLE_ROUTE}{binding}"


def _identity_key(route: str, backend: str) -> str:
    """The key of `cloud_identities` for a request Envoy routed by `route` to `backend`."""
    head, role, rest = route.partition(_ROLE_ROUTE)
    if role and head == backend:
        return _role_route_key(backend, rest.rpartition("/")[0])
    return backend


def with_cloud_identity(
    record: AuditRecord, entry: accesslog_pb2.HTTPAccessLogEntry, identities: Mapping[str, str]
) -> AuditRecord:
    """The record with the cloud identity its request was sent as, if it was: allowed, and routed by the router to
    the backend's cluster (`upstream_cluster`). A denied request, or one answered by Envoy itself (the 503 route of
    a role with no valid credential, a missing injected token), reached no backend and was sent as no one."""
    if record.decision != "allowed" or record.backend is None:
        return record
    if entry.common_properties.upstream_cluster != backend_cluster(record.backend):
        return record
    identity = identities.get(_identity_key(entry.common_properties.route_name, record.backend))
    return record if identity is None else replace(record, cloud_identity=identity)


class JobSeen(Protocol):
    """Told about each request a GitLab ID token got through at a gateway (never called for our own credentials).

    Called on the event loop for every such entry: it must return at once (enqueue, never ask GitLab inline)."""

    def __call__(
        self, *, job_id: str, project_id: str | None, issuer: str, issued_at: float, expires_at: float | None
    ) -> None: ...


def _number(payload: struct_pb2.Struct, name: str) -> float | None:
    value = payload.fields.get(name)
    return value.number_value if value is not None and value.WhichOneof("kind") == "number_value" else None


def report_job(record: AuditRecord, entry: accesslog_pb2.HTTPAccessLogEntry, on_job: JobSeen) -> None:
    """Tell `on_job` about an allowed request of a raw ID token naming a job (with an `iat`, else `nbf`)."""
    if record.decision != "allowed" or record.job_id is None or record.issuer in (None, CREDENTIAL_ISSUER):
        return
    found = _struct(entry.common_properties.metadata, JWT_FILTER).fields.get(PAYLOAD_KEY)
    if found is None:
        return
    payload = found.struct_value
    issued_at = _number(payload, "iat")
    if issued_at is None:
        issued_at = _number(payload, "nbf")
    if issued_at is None:
        return
    on_job(
        job_id=record.job_id,
        project_id=record.project_id,
        issuer=record.issuer,
        issued_at=issued_at,
        expires_at=_number(payload, "exp"),
    )


def sender_key(sender: Sender, peer: str, stream: int) -> str:
    """The audit queue share a stream's records go to, worded to name the sender in a log line.

    With mTLS, the certificate identity: a forger without the key cannot share it, and one certificate holder
    gets one share however many streams it opens. In plain text, the stream (`stream` numbers it): a process
    claiming a gateway's node from the same host is attested too, but its flood fills only its own share."""
    if sender.identity is not None:
        return f"certificate {sender.identity!r}"
    return f"stream {stream} ({peer_address(peer)}, node {clip(sender.node_id, 64)!r})"


class Senders(Protocol):
    """Who vouches for an access-log stream's sender: `XdsServer.attest` (a `Sender`, or why not)."""

    async def attest(
        self, node_id: str, cluster: str, peer: str, identity: str | None, *, wait: float | None = None
    ) -> Sender | str: ...


class AccessLogService:
    """The ALS receiver for one store: `handler()` goes into the grpc server, `close()` before it stops."""

    def __init__(
        self,
        store: AuditTrail,
        senders: Senders | None = None,
        *,
        log: logging.Logger | None = None,
        clock: Callable[[], float] = time.time,
        on_job: JobSeen | None = None,
        policy: Callable[[], Policy | None] = lambda: None,
    ) -> None:
        """`senders` attests each stream's gateway; without one (None), every stream is refused. `on_job`
        hears of each request a GitLab ID token got through (see `JobSeen`). `policy` is the policy in service,
        read as each entry arrives for the cloud identity of its backend (`with_cloud_identity`)."""
        self.store = store
        self.senders: Final = senders
        self.on_job = on_job
        self.log = log or logging.getLogger("controlplane.audit")
        self._clock = clock
        self._refused_log = RateLimitedLog(self.log, burst=WARNINGS_PER_MINUTE)
        self._readers: set[asyncio.Task[str | None]] = set()
        self._streams = itertools.count(1)  # numbers accepted streams, for their queue share's key
        self._closing = False
        self.awaited_bytes_limit = MAX_AWAITED_BYTES
        self._awaited_bytes = 0  # first messages held now, waiting for their sender's ADS stream
        self._policy = policy
        self._identities: tuple[Policy | None, dict[str, str]] = (None, {})  # cached per policy in service

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                METHOD: grpc.stream_unary_rpc_method_handler(
                    self._stream,
                    request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                    response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
                )
            },
        )

    async def close(self) -> None:
        """End every open stream (its records committed, then answered); new streams are refused."""
        self._closing = True
        readers = tuple(self._readers)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    async def _stream(
        self,
        requests: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "control plane shutting down")
        reader = asyncio.create_task(self._read(requests, context.peer(), peer_identity(context)))
        self._readers.add(reader)
        try:
            await asyncio.wait({reader})
        finally:
            self._readers.discard(reader)
            reader.cancel()  # a no-op unless grpc cancelled this handler (the peer went away)
        if not reader.cancelled() and reader.result() is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{REFUSED_DETAILS} ({reader.result()})")
        if not await asyncio.to_thread(self.store.flush, FLUSH_TIMEOUT):
            self.log.warning("audit records from %s not yet committed after %.0fs", context.peer(), FLUSH_TIMEOUT)
        return als_pb2.StreamAccessLogsResponse()

    async def _read(
        self, requests: AsyncIterator[als_pb2.StreamAccessLogsMessage], peer: str, identity: str | None
    ) -> str | None:
        """Store what an attested gateway sends; returns why the stream is refused, or None."""
        sender: Sender | None = None
        key = ""
        try:
            async for message in requests:
                if sender is None:  # Envoy identifies itself on a stream's first message only
                    verdict = await self._attest(message, peer, identity)
                    if isinstance(verdict, str):
                        self._refuse(verdict, message, peer)
                        return verdict
                    sender, key = verdict, sender_key(verdict, peer, next(self._streams))
                received = self._clock()
                for entry in message.http_logs.log_entry:
                    self._submit(entry, sender, key, received)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a broken peer: what it sent so far is kept, the stream ends
            node = clip(sender.node_id) if sender is not None else "unattested"
            self.log.warning("access log stream from %s (%s) failed: %r", peer, node, error)
        return None

    async def _attest(self, message: als_pb2.StreamAccessLogsMessage, peer: str, identity: str | None) -> Sender | str:
        if not message.HasField("identifier") or self.senders is None:
            return "unidentified" if self.senders is not None else "no_xds_stream"
        node = message.identifier.node
        size = message.ByteSize()
        if self._awaited_bytes + size > self.awaited_bytes_limit:
            return await self.senders.attest(node.id, node.cluster, peer, identity, wait=0.0)
        self._awaited_bytes += size
        try:
            return await self.senders.attest(node.id, node.cluster, peer, identity)
        finally:
            self._awaited_bytes -= size

    def _refuse(self, reason: str, message: als_pb2.StreamAccessLogsMessage, peer: str) -> None:
        AUDIT_STREAMS_REFUSED.labels(reason).inc()
        entries = len(message.http_logs.log_entry)
        if entries:
            AUDIT_RECORDS_DROPPED.labels(gateway=UNATTESTED_LABEL, reason="refused").inc(entries)
        self._refused_log.log(
            logging.WARNING,
            "refused access log stream from %s claiming node %r of %r: %s",
            peer,
            clip(message.identifier.node.id),
            clip(message.identifier.node.cluster),
            reason,
        )

    def _submit(self, entry: accesslog_pb2.HTTPAccessLogEntry, sender: Sender, key: str, received: float) -> None:
        try:
            record = record_from_entry(
                entry,
                gateway=sender.group,
                node=sender.node_id,
                received=received,
                peer=sender.peer,
                identity=sender.identity,
            )
            record = with_cloud_identity(record, entry, self._cloud_identities())
        except Exception as error:  # a malformed entry (or a parser bug) costs that entry only, not the stream
            AUDIT_RECORDS_DROPPED.labels(gateway=sender.label, reason="unreadable").inc()
            self.log.warning("unreadable access log entry from %s: %r", clip(sender.node_id), error)
            return
        self.store.submit(record, sender=key, label=sender.label)
        if self.on_job is not None:
            try:
                report_job(record, entry, self.on_job)
            except Exception:  # the trail is already queued; a failed check request costs that check only
                self.log.exception("job check request from an access log entry failed")

    def _cloud_identities(self) -> dict[str, str]:
        """The backends' cloud identities under the policy in service now, computed once per policy."""
        policy = self._policy()
        cached, identities = self._identities
        if policy is not cached:
            identities = cloud_identities(policy)
            self._identities = (policy, identities)
        return identities


def als_handler(store: AuditTrail, senders: Senders) -> grpc.GenericRpcHandler:
    """The ALS generic handler for `XdsServer.start(extra_handlers=...)`, attested by `senders` (that server). To end
    its streams cleanly on shutdown, keep an `AccessLogService` and call its `close()` before stopping."""
    return AccessLogService(store, senders).handler()
