"""Threads of a process as the kernel sees them (``/proc``), for tests of how daemons run."""

from __future__ import annotations

import os
from pathlib import Path


def io_threads(pid: int | str = "self") -> dict[int, int]:
    """Thread id -> scheduling policy of the ZeroMQ I/O threads of process ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("ZMQbg/IO"):
                out[int(task.name)] = os.sched_getscheduler(int(task.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return out
