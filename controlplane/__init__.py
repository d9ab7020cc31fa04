"""Envoy xDS control plane for GitLab CI identities."""

__version__ = "0.1.0"
