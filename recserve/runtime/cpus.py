"""Which CPUs a process's threads run on (``gateway --pin-workers``, ``shardd --cpus``).

On the 2-vCPU KVM guests we measure on, waking a thread that sleeps on the other CPU costs
the waker tens of microseconds (an inter-processor interrupt and the VM exits it causes),
and every ZeroMQ message wakes the I/O thread of its socket's context. A process whose
threads share a CPU wakes them there: cheaper, and with warm caches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence


def pin_process(cpus: frozenset[int]) -> None:
    """Run every thread the process has now (OpenBLAS starts its pool when numpy is
    imported) and every thread started later only on ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)


def share(cpus: Sequence[int], index: int, count: int) -> frozenset[int]:
    """The CPUs of process ``index`` of ``count`` that split ``cpus`` between them: blocks of
    consecutive CPUs in the given order, as even as they divide (with 4 CPUs and 2 processes
    ``{0, 1}`` and ``{2, 3}``); with more processes than CPUs one CPU each, round robin."""
    if not cpus or count < 1 or not 0 <= index < count:
        raise ValueError(f"process {index} of {count} over CPUs {list(cpus)}")
    n = len(cpus)
    if count >= n:
        return frozenset({cpus[index % n]})
    return frozenset(cpus[index * n // count : (index + 1) * n // count])
