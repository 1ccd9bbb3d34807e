"""Process-wide settings a serving daemon applies once it has started.

Python's cyclic garbage collector now and then scans every tracked object. After start-up
a gateway or a shard holds hundreds of thousands of them (modules, the model, numba's
compiled kernels, aiohttp's app) that will live as long as the process, and each full
scan of them held the GIL for 60-80 ms: measured on the demo's singular gateway, four such
pauses in a 15 s run, the run's slowest requests. ``freeze_startup_heap`` moves everything
alive at that point out of the collector's view (``gc.freeze``), so later collections only
scan what serving allocates.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then exempt every surviving object from later collections; returns
    how many were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
