"""Start-up objects are taken out of the garbage collector's scans."""

from __future__ import annotations

import gc

from recserve.runtime.heap import freeze_startup_heap


def test_objects_alive_at_start_up_are_no_longer_scanned() -> None:
    model = {"tables": [list(range(3))]}  # a tracked container, as a loaded model is
    assert any(o is model for o in gc.get_objects())
    try:
        assert freeze_startup_heap() > 0
        assert not any(o is model for o in gc.get_objects())
        later = [model]
        assert any(o is later for o in gc.get_objects())  # what serving allocates still is
    finally:
        gc.unfreeze()
