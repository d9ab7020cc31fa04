"""Every Prometheus metric the control plane exports, in one place so names stay consistent.

Names follow Prometheus conventions: a `controlplane_` namespace, base units (seconds, bytes),
`_total` for counters. They live in a private registry so tests and embedded use never collide. Beside ours, the
registry holds what every Prometheus target is expected to export: `controlplane_build_info`, and
prometheus_client's process (`process_*`: CPU, memory, file descriptors, start time) and platform (`python_info`)
collectors.
"""

from __future__ import annotations

import platform
import time
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from controlplane import __version__

# No `<counter>_created` series: one more series per counter and histogram child that no dashboard or alert of
# ours reads, and that the 0.0.4 text format shows as a gauge. prometheus_client reads the switch when a metric
# is made, so it is thrown here, before the registry every metric of ours is made for.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


BUILD_INFO = Gauge(
    "controlplane_build_info",
    "What this process runs (value is always 1): which version answers, and with which Python, grpc and protobuf.",
    ["version", "python_version", "grpc_version", "protobuf_version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(__version__, platform.python_version(), _package_version("grpcio"), _package_version("protobuf")).set(
    1
)

CONNECTED_PROXIES = Gauge(
    "controlplane_xds_connected_proxies",
    "ADS streams currently open, by gateway group.",
    ["group"],
    registry=REGISTRY,
)
SNAPSHOT_BUILDS = Counter(
    "controlplane_snapshot_builds_total",
    "Policy loads attempted, accepted or rejected (the rejected ones also count in "
    "controlplane_snapshot_build_failures_total).",
    registry=REGISTRY,
)
SNAPSHOT_BUILD_FAILURES = Counter(
    "controlplane_snapshot_build_failures_total",
    "Policy loads rejected, and recompiles of the policy in service that a live input (GitLab) made invalid; "
    "the last good policy stays in service, compiled with the fresh keys and deny list.",
    registry=REGISTRY,
)
COMPILE_DURATION = Histogram(
    "controlplane_compile_duration_seconds",
    "Time to compile the policy and serialize every snapshot.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
RECOMPILES_JOINED = Counter(
    "controlplane_recompiles_joined_total",
    "Live-input changes (revocations, keys, inventory) that joined a recompile already waiting, instead of "
    "compiling and pushing on their own.",
    registry=REGISTRY,
)
GC_COLLECTION_SECONDS = Histogram(
    "controlplane_gc_collection_seconds",
    "Pauses of the scheduled garbage collections (the event loop waits meanwhile), by kind: recent (objects "
    "since the last one) or full.",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
GC_FROZEN_OBJECTS = Gauge(
    "controlplane_gc_frozen_objects",
    "Objects the scheduled garbage collection left out of the automatic ones (gc.freeze).",
    registry=REGISTRY,
)
SNAPSHOT_INFO = Gauge(
    "controlplane_snapshot_info",
    "The snapshot version currently served to each group (value is always 1).",
    ["group", "version"],
    registry=REGISTRY,
)
XDS_PUSHES = Counter(
    "controlplane_xds_pushes_total",
    "DiscoveryResponses sent, by resource type.",
    ["type"],
    registry=REGISTRY,
)
XDS_PUSHED_BYTES = Counter(
    "controlplane_xds_pushed_bytes_total",
    "Bytes of the (Delta)DiscoveryResponses sent, by resource type: what pushes cost the proxies' links.",
    ["type"],
    registry=REGISTRY,
)
XDS_PUSHED_RESOURCES = Counter(
    "controlplane_xds_pushed_resources_total",
    "Resources carried by the (Delta)DiscoveryResponses sent, by resource type.",
    ["type"],
    registry=REGISTRY,
)
XDS_NACKS = Counter(
    "controlplane_xds_nacks_total",
    "DiscoveryRequests that rejected a pushed version (NACK), by resource type.",
    ["type"],
    registry=REGISTRY,
)
XDS_PROXIES_WITH_NACK = Gauge(
    "controlplane_xds_proxies_rejecting",
    "Connected proxies whose last response of this type was a NACK.",
    ["type"],
    registry=REGISTRY,
)
PUSH_ACK_LATENCY = Histogram(
    "controlplane_xds_push_ack_latency_seconds",
    "Time from sending a DiscoveryResponse to receiving its ACK or NACK.",
    ["type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
POLICY_LOAD_ERRORS = Counter(
    "controlplane_policy_load_errors_total",
    "Policy errors found by loads that were rejected (each error counts once per load).",
    registry=REGISTRY,
)
POLICY_CURRENT_ERRORS = Gauge(
    "controlplane_policy_errors",
    "Errors in the policy as last read; 0 when the last load was good.",
    registry=REGISTRY,
)
POLICY_WARNINGS = Gauge(
    "controlplane_policy_warnings",
    "Warnings of the policy in service: access GitLab withdrew, stale project paths.",
    registry=REGISTRY,
)
POLICY_LAST_GOOD_LOAD = Gauge(
    "controlplane_policy_last_good_load_timestamp_seconds",
    "Unix time of the last policy load that produced a snapshot.",
    registry=REGISTRY,
)
POLICY_SECONDS_SINCE_GOOD_LOAD = Gauge(
    "controlplane_policy_seconds_since_last_good_load",
    "Seconds since the last policy load that produced a snapshot (-1 before the first).",
    registry=REGISTRY,
)
POLICY_RELOAD_RUNNING = Gauge(
    "controlplane_policy_reload_running_seconds",
    "Seconds the policy reload (or recompile) in progress has been running; 0 when none is.",
    registry=REGISTRY,
)
POLICY_RELOAD_STUCK = Gauge(
    "controlplane_policy_reload_stuck",
    "1 while a policy reload has run longer than its timeout: policy changes and revocations are not applied.",
    registry=REGISTRY,
)


def _seconds_since_good_load() -> float:
    last = POLICY_LAST_GOOD_LOAD._value.get()
    return time.time() - last if last > 0 else -1.0


POLICY_SECONDS_SINCE_GOOD_LOAD.set_function(_seconds_since_good_load)
STORE_LEADER = Gauge(
    "controlplane_store_leader",
    "1 while this replica holds the leader lease (key rotation, GitLab polling, commit statuses, retention), "
    "else 0; always 1 with --store file.",
    registry=REGISTRY,
)
STORE_LEADER_TRANSITIONS = Counter(
    "controlplane_store_leader_transitions_total",
    "Times this replica became leader or stepped down.",
    registry=REGISTRY,
)
