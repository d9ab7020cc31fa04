"""Carrying unchanged model objects over from the previous load, so the compiler's memo recognises them.

The loader rebuilds every object from the files on each load, and the compiler's memo is keyed by object
identity (comparing by value at every lookup would cost what it saves). Swapping each new object for the
previous one it equals makes a one-file commit recompile only what that file changed: at 100 backends a
one-binding commit went from ~50 ms to a few ms of compile.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

from controlplane.model.policy import Named, Policy

N = TypeVar("N", bound=Named)


def reuse_unchanged(new: Policy, previous: Policy | None) -> Policy:
    """``new`` with every object equal to its namesake in ``previous`` replaced by that previous object.

    Equal objects are interchangeable (the model is frozen, and sources are part of equality, so an error
    still points at the line the object now comes from); the result is equal to ``new``.
    """
    if previous is None:
        return new
    return replace(
        new,
        issuers=_reuse(new.issuers, previous.issuers),
        backends=_reuse(new.backends, previous.backends),
        roles=_reuse(new.roles, previous.roles),
        bindings=_reuse(new.bindings, previous.bindings),
        gateways=_reuse(new.gateways, previous.gateways),
    )


def _reuse(new: tuple[N, ...], previous: tuple[N, ...]) -> tuple[N, ...]:
    if new == previous:
        return previous
    before = {item.name: item for item in previous}
    return tuple(_same_or(before.get(item.name), item) for item in new)


def _same_or(old: N | None, item: N) -> N:
    return old if old is not None and (old is item or old == item) else item
