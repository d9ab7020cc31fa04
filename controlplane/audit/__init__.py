"""The audit trail: which job did what through which gateway, and which policy allowed or denied it.

Envoy streams its access log to the control plane over gRPC ALS (`als`); each entry becomes one row of an
append-only SQLite store (`store`) that `controlplane audit` queries. No token value is ever stored.
"""
