"""The resolved policy: who may do what on which backend, with GitLab's live state applied.

Between the model and its consumers: the RBAC compiler encodes it, the token exchange evaluates it, and a
reviewer reads it (`snapshots/<case>/resolved.yaml`). No protobuf here: its meaning stands on its own.
"""
