"""A part that others must call before it can be built: the run time's cycles, made explicit.

`serve` has true cycles (the policy service compiles in the credential service's keys, and the credential
service recompiles the policy when they change; the GitLab link reports to the event router, which drives the
GitLab link). One side of each is built first and given a `Forward` to the other, connected once the other
exists. A call that comes too early is a clear error naming the part, not a NameError from a closure.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class NotConnected(RuntimeError):
    """A part was called through a `Forward` before the part it forwards to was built."""


class Forward(Generic[T]):
    """Stands for a part built later; `connect` it once, then calling it returns the part."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._target: T | None = None

    def connect(self, target: T) -> T:
        if self._target is not None:
            raise RuntimeError(f"{self.name} is already connected")
        self._target = target
        return target

    def __call__(self) -> T:
        if self._target is None:
            raise NotConnected(f"{self.name} was used before it was built")
        return self._target
