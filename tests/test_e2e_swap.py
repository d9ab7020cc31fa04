"""The direct backend swap of test_e2e_delta, on Envoy speaking State-of-the-World xDS (`api_type: GRPC`).

The test is imported and runs against this module's `stack`: test_e2e's SotW stack fixture, started once more
for this module so the swap cannot disturb test_e2e's own tests (module-scoped fixtures are per module).
"""

from __future__ import annotations

import pytest

from tests import test_e2e
from tests.support.ports import poll_until
from tests.test_e2e_delta import test_a_backend_swapped_in_one_change_never_fails_a_request

pytestmark = pytest.mark.e2e

__all__ = ["test_a_backend_swapped_in_one_change_never_fails_a_request"]

stack = test_e2e.stack


def test_the_swap_runs_on_a_proxy_speaking_sotw(stack: test_e2e.Stack) -> None:
    proxy = poll_until(lambda: test_e2e._proxy(stack), 10, message="proxy in status")
    assert proxy is not None and proxy["protocol"] == "sotw"
