"""Background threads that yield the CPU to serving.

Online updates share the cores with lookups and requests; their threads run at a lower
priority (Linux nice is per thread), so building an update waits and serving does not.
Not ``SCHED_IDLE``: such a thread preempted while holding the GIL would stall the event loop
for as long as the cores stay busy; nice 10 still gets a share of them.
"""

from __future__ import annotations

import contextlib
import os
import threading

BACKGROUND_NICE = 10


def lower_priority() -> None:
    """Lower the calling thread's priority (a thread pool's initializer); where that is not
    allowed the thread runs as it is."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
