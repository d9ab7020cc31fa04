"""The current Snapshot of every gateway group, and who to tell when one changes.

The policy service is the only writer; the xDS server is the main reader and listens for changes. Listeners
are called synchronously, in the caller's thread, right after `set`: the fan-out to streams is cheap (state
machine work plus queueing bytes) and doing it inline keeps the order of snapshots exactly the order of sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from controlplane.snapshots.snapshot import Snapshot

log = logging.getLogger("controlplane.snapshots")

Listener = Callable[[Snapshot], None]


def same_versions(a: Snapshot, b: Snapshot) -> bool:
    """Versions are content hashes, so equal per-type versions mean equal config for Envoy."""
    return a.group == b.group and {t: s.version for t, s in a.types.items()} == {
        t: s.version for t, s in b.types.items()
    }


class SnapshotCache:
    """Snapshot per group. `get` never fails: an unknown group is served the empty snapshot."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._listeners: list[Listener] = []

    def set(self, snapshot: Snapshot) -> bool:
        """Make `snapshot` current for its group; True (and listeners called) unless nothing changed."""
        previous = self._snapshots.get(snapshot.group)
        if previous is not None and same_versions(previous, snapshot):
            return False
        self._snapshots[snapshot.group] = snapshot
        for listener in tuple(self._listeners):  # a listener may unsubscribe while we notify
            try:
                listener(snapshot)
            except Exception:
                # One broken listener must not stop the others or fail the policy load that called set().
                log.exception("snapshot listener failed for group %s", snapshot.group)
        return True

    def get(self, group: str) -> Snapshot:
        snapshot = self._snapshots.get(group)
        return snapshot if snapshot is not None else Snapshot.empty(group)

    def known(self, group: str) -> bool:
        return group in self._snapshots

    def groups(self) -> list[str]:
        return sorted(self._snapshots)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(snapshot)` after every effective `set`; returns an idempotent unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe
