"""How long a policy reload may run before the server says it is not ready (PolicyService owns the check).

Its own small module so that the command line can show and default the flag without importing the policy
service, which pulls in the compiler: `controlplane --version` and `status` should not pay for it.
"""

from __future__ import annotations

from typing import Final

DEFAULT_RELOAD_TIMEOUT: Final = 60.0
"""Seconds a policy reload may run before the server says it is not ready: a few seconds at thousands of
backends, longer only when a GitLab policy project is read under its rate bound."""
