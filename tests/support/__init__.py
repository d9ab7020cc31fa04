"""Test-only infrastructure: the real Envoy binary, fake identity providers and echo backends on loopback.

Nothing here may be imported by the ``controlplane`` package: the fakes mint tokens that a production control
plane must never trust. Import the submodules directly (``support.envoy``, ``support.fake_gitlab``, ...); this
package stays empty so that importing one helper does not start generating RSA keys for another.

Its one statement turns gRPC's fork handlers off before anything loads gRPC. Envoy and PostgreSQL are spawned
from the main thread with a `preexec_fn` (a plain fork, for PDEATHSIG); with a gRPC server's threads running in
this process, gRPC's handlers in the child between fork and exec now and then aborted it (SIGABRT, "epoll_wait
error: Bad file descriptor"; about 3 in 500 spawns measured, and once in CI). The child runs no gRPC, so it
needs no handlers; `test_support_smoke` reproduces the spawn under a live gRPC server.
"""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"
