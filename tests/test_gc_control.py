"""Scheduled garbage collection: automatic full collections off, collections only at quiet moments."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from controlplane.runtime.gc_control import AUTOMATIC_FULL_OFF, CollectorSchedule
from controlplane.telemetry import metrics
from tests.support.ports import eventually


@pytest.fixture(autouse=True)
def restore_collector() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_start_turns_automatic_full_collections_off_and_freezes_what_start_up_left() -> None:
    young, middle, _ = gc.get_threshold()
    schedule = CollectorSchedule(60)
    schedule.start()
    assert gc.get_threshold() == (young, middle, AUTOMATIC_FULL_OFF)
    assert gc.get_freeze_count() > 0
    schedule.stop()
    assert gc.get_threshold()[2] != AUTOMATIC_FULL_OFF and gc.get_freeze_count() == 0


def _cycles() -> list[int]:
    """Ids of the live `_Cycle`s, frozen ones included (gc.get_objects does not list frozen objects)."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    found = [id(o) for o in gc.get_objects() if isinstance(o, _Cycle)]
    if frozen:
        gc.freeze()
    return found


def test_a_recent_collection_frees_new_cycles_and_a_full_one_old_cycles() -> None:
    schedule = CollectorSchedule(60)
    old = _Cycle()
    schedule.start()  # `old` is frozen now: only a full collection may look at it again
    old_id = id(old)
    del old
    _Cycle()  # garbage from birth, and a cycle: only the collector can free it
    schedule.collect(full=False)
    assert _cycles() == [old_id]
    schedule.collect(full=True)
    assert _cycles() == []
    schedule.stop()


def test_every_collection_is_measured() -> None:
    schedule = CollectorSchedule(60)
    before = metrics.GC_COLLECTION_SECONDS.labels("recent")._sum.get()
    schedule.start()
    schedule.collect(full=False)
    assert metrics.GC_COLLECTION_SECONDS.labels("recent")._sum.get() > before
    assert metrics.GC_FROZEN_OBJECTS._value.get() == gc.get_freeze_count()
    schedule.stop()


def _recording(schedule: CollectorSchedule) -> list[bool]:
    """The kinds (full or not) of the collections `schedule` makes, instead of making them."""
    kinds: list[bool] = []
    schedule.collect = lambda *, full: kinds.append(full) or 0.0  # type: ignore[method-assign]
    return kinds


async def test_collections_wait_for_a_quiet_moment_and_every_nth_is_full() -> None:
    idle = {"for": 0.0, "asked": 0.0}

    def idle_for() -> float:
        idle["asked"] += 1
        return idle["for"]

    schedule = CollectorSchedule(0.001, full_every=3, quiet=0.05, max_delay=10.0, idle_for=idle_for)
    kinds = _recording(schedule)
    stop = asyncio.Event()
    task = asyncio.create_task(schedule.run(stop))
    await eventually(lambda: idle["asked"] >= 3, "the schedule asking whether pushes stopped")
    assert kinds == []  # pushes keep coming: it keeps waiting
    idle["for"] = 1.0
    await eventually(lambda: len(kinds) >= 3, "three collections once quiet")
    stop.set()
    await asyncio.wait_for(task, 1)
    assert kinds[:3] == [False, False, True]


async def test_a_busy_server_is_still_collected_after_one_more_interval() -> None:
    schedule = CollectorSchedule(0.02, quiet=10.0, idle_for=lambda: 0.0)
    kinds = _recording(schedule)
    stop = asyncio.Event()
    task = asyncio.create_task(schedule.run(stop))
    await eventually(lambda: kinds, "a collection although pushes never stop")
    stop.set()
    await asyncio.wait_for(task, 1)


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval > 0"):
        CollectorSchedule(0)


def test_two_schedules_in_one_process_leave_cpythons_collector_on_when_both_stopped() -> None:
    first, second = CollectorSchedule(60), CollectorSchedule(60)
    first.start()
    second.start()
    first.stop()
    second.stop()
    assert gc.get_threshold()[2] != AUTOMATIC_FULL_OFF
