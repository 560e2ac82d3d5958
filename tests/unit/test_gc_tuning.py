"""gc_tuning.tune: start-up's objects frozen, the young generation collected less often."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gehirn_ts import gc_tuning


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_freezes_what_is_alive_and_raises_the_first_threshold(restored: None) -> None:
    kept = [object() for _ in range(10)], {"a": [1, 2]}
    cycle: list[object] = []
    cycle.append(cycle)  # start-up garbage: collected, not frozen
    del cycle
    _, middle, old = gc.get_threshold()
    gc.unfreeze()
    gc_tuning.tune()
    assert gc.get_threshold() == (gc_tuning.YOUNG_THRESHOLD, middle, old)
    assert gc.get_freeze_count() > 0
    # What was alive is out of the collector's sight; garbage made after is not.
    assert all(o is not kept for o in gc.get_objects())
    later: list[object] = []
    later.append(later)
    assert any(o is later for o in gc.get_objects())
