"""The shared store of issue 12: PostgreSQL behind a bounded async pool, with migrations the control plane runs.

A leaf: it imports the standard library, psycopg and (at most) telemetry and statefile, never a layer above, so
every later part (exchange store, keys, revocations, audit) can stand on it. Nothing here opens a connection
at import; a pool exists only between `StorePool.open()` and `close()`.
"""
