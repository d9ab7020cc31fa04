"""The audit trail: which job did what through which gateway, and which policy allowed or denied it.

Envoy streams its access log to the control plane over gRPC ALS (`als`); each entry becomes one row of an
append-only SQLite store (`store`), or with `--store postgres` of a PostgreSQL table shared by the replicas
(`store_pg`), that `controlplane audit` queries; both behind `store.AuditTrail`. No token value is ever stored.
"""
