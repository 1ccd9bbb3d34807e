"""The ZeroMQ context of a serving process: its I/O threads do not preempt their senders.

Every message a gateway or a shard sends wakes its context's I/O thread, and every message
it receives is handed over by that thread. On busy cores Linux lets a woken thread preempt
the one that woke it, so a send could switch the event loop out mid-step for a thread with
a few microseconds of work (py-spy found a third of the shards' loop samples inside their
sends). Under ``SCHED_BATCH`` a woken thread does not preempt: it runs on an idle core at
once, or when the sender blocks or its slice ends, so the loop finishes its step and the
I/O thread takes several messages per wake-up (the shards' CPU per sample fell ~6 % in the
4-shard throughput benchmark; ``benchmarks/RESULTS.md``).

``SCHED_BATCH`` needs no privilege on Linux, but libzmq aborts the process if it cannot set
the policy, so it is asked for only where a thread of this process was just allowed to.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import zmq


@functools.cache
def batch_policy_allowed() -> bool:
    """Whether a thread of this process may switch itself to ``SCHED_BATCH`` (tried on a
    short-lived thread, so no serving thread changes)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None:
        return False
    allowed: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            allowed.append(False)
        else:
            allowed.append(True)

    thread = threading.Thread(target=attempt, name="recserve-sched-probe")
    thread.start()
    thread.join()
    return allowed == [True]


def serving_context() -> zmq.Context[Any]:
    """A new context whose I/O threads run ``SCHED_BATCH`` where that is allowed."""
    ctx: zmq.Context[Any] = zmq.Context()
    if batch_policy_allowed():
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx
