"""The batcher alone, over an in-process pooler: batching, admission, and errors that reach
only the requests they belong to."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from gateway.batcher import ANSWER_GRACE_S, GAP_WEIGHT, Batcher
from gateway.config import BatchSettings
from gateway.metrics import GatewayMetrics
from recserve.contracts.batch import Bags, Batch
from recserve.contracts.errors import DeadlineExceeded, NotReady, Overloaded, ShardUnavailable
from recserve.rpc.deadline import Deadline

POISON = 666.0  # a dense value the fake pooler fails on, as a routing bug would


def batch(n: int, value: float = 1.0) -> Batch:
    ids = np.arange(n, dtype=np.int64)
    return Batch(np.full((n, 2), value, np.float32), {"f": Bags(ids, np.arange(n + 1))})


class FakePooler:
    """Pools each sample to its dense values; ``gate`` holds pooling until set."""

    def __init__(self) -> None:
        self.version = 7
        self.versions: list[int | None] = []
        self.sizes: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def prepare(self, b: Batch) -> None:
        if (b.dense == POISON).any():
            raise ValueError("cannot route this batch")
        self.sizes.append(b.size)

    async def pool(
        self, b: Batch, prepared: Any, deadline: Deadline, finish: Any, version: int | None = None
    ) -> Any:
        self.versions.append(version)
        await self.gate.wait()
        return finish(b.dense[:, None, :])

    async def probe(self, deadline: Deadline) -> list[str]:
        return []

    async def close(self) -> None:
        return None


def dense_sum(dense: np.ndarray, pooled: np.ndarray) -> np.ndarray:
    return dense.sum(axis=1) + pooled.sum(axis=(1, 2))


async def with_batcher(settings: BatchSettings, fn: Any) -> Any:
    pooler = FakePooler()
    executor = ThreadPoolExecutor(2)
    batcher = Batcher(
        pooler, lambda version: dense_sum, settings, executor, GatewayMetrics.create()
    )
    runner = asyncio.get_running_loop().create_task(batcher.run())
    try:
        return await fn(batcher, pooler)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        executor.shutdown()


def test_concurrent_requests_share_a_batch_and_get_their_own_scores() -> None:
    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        results = await asyncio.gather(
            *(batcher.score(batch(n, float(n)), Deadline.after(5000)) for n in (1, 2, 3))
        )
        for n, (scores, version) in zip((1, 2, 3), results, strict=True):
            np.testing.assert_allclose(scores, [4.0 * n] * n)
            assert version == 7  # the version the pooler held when the batch was run
        assert pooler.sizes == [6] and pooler.versions == [7]
        assert batcher.inflight_samples == 0

    asyncio.run(with_batcher(BatchSettings(max_queue_delay_us=50_000), check))


def test_the_gaps_between_requests_are_averaged() -> None:
    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        await batcher.score(batch(1), Deadline.after(5000))
        assert batcher.gap == 0.0  # one request: no gap yet
        await asyncio.sleep(0.2)
        await batcher.score(batch(1), Deadline.after(5000))
        assert GAP_WEIGHT * 0.2 <= batcher.gap < GAP_WEIGHT * 0.6

    asyncio.run(with_batcher(BatchSettings(max_queue_delay_us=0), check))


def test_a_request_waits_for_company_only_when_company_is_expected() -> None:
    """Requests seconds apart do not wait a 2 s queue delay; requests arriving together
    still share a batch."""
    settings = BatchSettings(max_queue_delay_us=2_000_000, max_batch_samples=3)

    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        batcher.gap = 3.0  # as if requests came 3 s apart
        start = time.perf_counter()
        await batcher.score(batch(2), Deadline.after(5000))
        assert time.perf_counter() - start < 1.0  # not the 2 s delay
        batcher.gap, batcher.last = 0.0, None  # as if they came in a burst
        await asyncio.gather(
            batcher.score(batch(1), Deadline.after(5000)),
            batcher.score(batch(2), Deadline.after(5000)),
        )
        assert pooler.sizes == [2, 3]

    asyncio.run(with_batcher(settings, check))


def test_a_request_routed_after_its_parse_skips_the_batchs_hop() -> None:
    """``route_alone`` routes a request that will be a batch of its own (the batch then
    does not route it again); with company expected it leaves the routing to the batch,
    and a routed request that joins a batch anyway is scored in it."""
    settings = BatchSettings(max_queue_delay_us=50_000, max_batch_samples=3)

    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        assert batcher.route_alone(batch(2)) is None  # no gaps seen yet: company expected
        batcher.gap = 1.0  # requests a second apart
        routed = batcher.route_alone(batch(2, 2.0))
        assert routed is not None and pooler.sizes == [2]
        scores, _ = await batcher.score(batch(2, 2.0), Deadline.after(5000), routed)
        np.testing.assert_allclose(scores, [8.0, 8.0])
        assert pooler.sizes == [2]  # not routed again
        lone = batch(1)
        routed = batcher.route_alone(lone)
        assert routed is not None and pooler.sizes == [2, 1]
        batcher.gap, batcher.last = 0.0, None  # then a burst: it shares a batch after all
        results = await asyncio.gather(
            batcher.score(lone, Deadline.after(5000), routed),
            batcher.score(batch(2, 2.0), Deadline.after(5000)),
        )
        np.testing.assert_allclose(results[0][0], [4.0])
        np.testing.assert_allclose(results[1][0], [8.0, 8.0])
        assert pooler.sizes == [2, 1, 3]

    asyncio.run(with_batcher(settings, check))


def test_requests_queued_behind_busy_slots_become_one_batch() -> None:
    """With every slot busy, requests gather in the queue (past their queue delay) and the
    next batch takes them all, rather than the first alone."""
    settings = BatchSettings(max_queue_delay_us=0, max_concurrent_batches=1)

    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        pooler.gate.clear()  # the first batch stalls in its lookups
        first = asyncio.ensure_future(batcher.score(batch(1), Deadline.after(5000)))
        await asyncio.sleep(0.02)
        queued = []
        for n in (2, 3):  # one after the other, each well past its queue delay
            queued.append(
                asyncio.ensure_future(batcher.score(batch(n, float(n)), Deadline.after(5000)))
            )
            await asyncio.sleep(0.02)
        pooler.gate.set()
        np.testing.assert_allclose((await first)[0], [4.0])
        for n, fut in zip((2, 3), queued, strict=True):
            np.testing.assert_allclose((await fut)[0], [4.0 * n] * n)
        assert pooler.sizes == [1, 5]

    asyncio.run(with_batcher(settings, check))


def test_an_error_in_a_merged_batch_fails_only_its_request() -> None:
    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        good, bad, other = await asyncio.gather(
            batcher.score(batch(2), Deadline.after(5000)),
            batcher.score(batch(1, POISON), Deadline.after(5000)),
            batcher.score(batch(3), Deadline.after(5000)),
            return_exceptions=True,
        )
        np.testing.assert_allclose(good[0], [4.0, 4.0])
        np.testing.assert_allclose(other[0], [4.0] * 3)
        assert type(bad).__name__ == "RecserveError" and "cannot route" in str(bad)
        assert batcher.inflight_samples == 0

    asyncio.run(with_batcher(BatchSettings(max_queue_delay_us=50_000), check))


def test_a_request_that_timed_out_in_the_queue_still_holds_its_samples() -> None:
    """Under a stall the queue stays bounded by max_inflight_samples: a request that gave
    up is counted until it leaves the queue."""
    settings = BatchSettings(
        max_batch_samples=4, max_queue_delay_us=0, max_inflight_samples=8, max_concurrent_batches=1
    )

    async def check(batcher: Batcher, pooler: FakePooler) -> None:
        pooler.gate.clear()  # the first batch stalls in its lookups
        first = asyncio.ensure_future(batcher.score(batch(4), Deadline.after(5000)))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.score(batch(4), Deadline.after(50))
        assert batcher.inflight_samples == 8  # the stalled batch and the queued request
        with pytest.raises(Overloaded):
            await batcher.score(batch(1), Deadline.after(5000))
        pooler.gate.set()
        np.testing.assert_allclose((await first)[0], [4.0] * 4)
        for _ in range(100):
            if batcher.inflight_samples == 0:
                break
            await asyncio.sleep(0.01)
        assert batcher.inflight_samples == 0
        np.testing.assert_allclose((await batcher.score(batch(1), Deadline.after(5000)))[0], [4.0])

    asyncio.run(with_batcher(settings, check))


def test_stopping_fails_queued_requests_at_once() -> None:
    settings = BatchSettings(max_batch_samples=1, max_queue_delay_us=0, max_concurrent_batches=1)

    async def check() -> None:
        pooler = FakePooler()
        pooler.gate.clear()
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(
            pooler, lambda version: dense_sum, settings, executor, GatewayMetrics.create()
        )
        runner = asyncio.get_running_loop().create_task(batcher.run())
        stalled = asyncio.ensure_future(batcher.score(batch(1), Deadline.after(30_000)))
        queued = asyncio.ensure_future(batcher.score(batch(1), Deadline.after(30_000)))
        await asyncio.sleep(0.05)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        with pytest.raises(NotReady):
            await asyncio.wait_for(queued, 1.0)  # not after its 30 s deadline
        stalled.cancel()
        executor.shutdown()

    asyncio.run(check())


class LatePooler(FakePooler):
    """Fails every batch ``late_s`` after its lookup deadline: a silent shard reported by a
    loop that lagged past the margin between the lookups' deadline and the request's."""

    def __init__(self, late_s: float) -> None:
        super().__init__()
        self.late_s = late_s

    async def pool(
        self, b: Batch, prepared: Any, deadline: Deadline, finish: Any, version: int | None = None
    ) -> Any:
        await asyncio.sleep(deadline.left_s() + self.late_s)
        raise ShardUnavailable("shard 1: no replica answered in time")


@pytest.mark.parametrize(("late_s", "error"), [(0.03, ShardUnavailable), (1.0, DeadlineExceeded)])
def test_a_running_batchs_own_error_is_waited_for_briefly_past_the_deadline(
    late_s: float, error: type[Exception]
) -> None:
    async def check() -> None:
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(
            LatePooler(late_s),
            lambda version: dense_sum,
            BatchSettings(max_queue_delay_us=0),
            executor,
            GatewayMetrics.create(),
        )
        runner = asyncio.get_running_loop().create_task(batcher.run())
        try:
            start = time.perf_counter()
            with pytest.raises(error):
                await batcher.score(batch(1), Deadline.after(100))
            elapsed = time.perf_counter() - start
            assert elapsed < 0.1 + ANSWER_GRACE_S + 0.5, elapsed  # never the batch's 1 s
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            executor.shutdown()

    asyncio.run(check())
