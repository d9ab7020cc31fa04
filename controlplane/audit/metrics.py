"""Audit metrics, registered on the control plane's one registry so `/metrics` exports them with the rest.

Dropped records are the number an operator must watch: the store never slows Envoy down, so when the disk
cannot keep up it sheds records and says so here rather than back-pressuring the proxies.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from controlplane.telemetry.metrics import REGISTRY

AUDIT_RECORDS_WRITTEN = Counter(
    "controlplane_audit_records_written_total",
    "Audit records committed to the audit store.",
    registry=REGISTRY,
)
UNKNOWN_LABEL = "unknown"  # the gateway label of records submitted without one (als.py always gives the group)
UNATTESTED_LABEL = "unattested"  # the gateway label of streams refused because no gateway stands behind them

AUDIT_RECORDS_DROPPED = Counter(
    "controlplane_audit_records_dropped_total",
    "Audit records lost, by sending gateway (a policy group, or unattested) and reason: queue_full "
    "(that sender's share or the whole queue; the log names the stream that dropped the most), closed, "
    "unreadable, write_failed, refused (an unattested stream), buffer_full (PostgreSQL away past the in-memory "
    "buffer's bound, store_pg.py).",
    ["gateway", "reason"],
    registry=REGISTRY,
)
AUDIT_STREAMS_REFUSED = Counter(
    "controlplane_audit_streams_refused_total",
    "Access-log streams refused because no gateway stands behind them, by reason: unidentified (no node in the "
    "first message), no_xds_stream, peer_mismatch, identity_mismatch, unknown_group (a group no policy "
    "defines), overloaded (too many awaiting attestation).",
    ["reason"],
    registry=REGISTRY,
)
AUDIT_WRITE_DURATION = Histogram(
    "controlplane_audit_write_duration_seconds",
    "Time to commit one batch of audit records (including the fsync).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
AUDIT_BUFFERED = Gauge(
    "controlplane_audit_buffered_records",
    "Audit records waiting in memory for PostgreSQL (--store postgres): near zero while it answers; growing while "
    "it is away, up to the buffer's bound, past which records are dropped (reason buffer_full).",
    registry=REGISTRY,
)
