"""The serving context's I/O threads run SCHED_BATCH, read back from the kernel."""

from __future__ import annotations

import os
import time

import pytest
import zmq

from recserve.rpc.context import batch_policy_allowed, serving_context
from tests.threads import io_threads


def test_the_serving_contexts_io_threads_run_sched_batch() -> None:
    if not batch_policy_allowed():
        pytest.skip("this process may not use SCHED_BATCH")
    before = set(io_threads())
    ctx = serving_context()
    sock = ctx.socket(zmq.DEALER)  # the I/O threads start with the first socket
    try:
        mine: dict[int, int] = {}
        for _ in range(200):  # each names itself once running
            mine = {t: p for t, p in io_threads().items() if t not in before}
            if mine:
                break
            time.sleep(0.01)
        assert mine and set(mine.values()) == {os.SCHED_BATCH}, mine
        # The probe changed no thread of ours: this one still runs the default policy.
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        sock.close(linger=0)
        ctx.term()
