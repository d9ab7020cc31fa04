"""The run time's cycles are cut by a `Forward` (controlplane/runtime/forward.py): a call before the part exists
fails naming it."""

from __future__ import annotations

import pytest

from controlplane.runtime.forward import Forward, NotConnected


def test_a_forward_used_before_its_part_is_built_names_the_part() -> None:
    policy: Forward[list[str]] = Forward("policy service")
    recompile = lambda: policy().append("recompiled")  # noqa: E731 - as serve hands it to a part
    with pytest.raises(NotConnected, match="policy service was used before it was built"):
        recompile()
    built = policy.connect([])
    recompile()
    assert built == ["recompiled"]


def test_a_forward_is_connected_once() -> None:
    events: Forward[object] = Forward("event router")
    events.connect(object())
    with pytest.raises(RuntimeError, match="already connected"):
        events.connect(object())
