"""The read-only policy assistant (`controlplane suggest`): pure analysis of CI configuration and observed traffic.

Nothing here does I/O: the GitLab reading is in `controlplane.sources.gitlab_ci`, the audit reading in the CLI.
"""
