"""The dynamic batcher: concurrent requests become one batch, one lookup per shard.

A request waits at most ``max_queue_delay_us`` for company, and a batch holds at most
``max_batch_samples`` (a larger request is a batch of its own). Admission is bounded: more
than ``max_inflight_samples`` queued or running is refused at once with ``Overloaded``.
Each request keeps its own deadline: one that expires while queued is answered
``deadline_exceeded`` and dropped from its batch. Up to ``max_concurrent_batches`` batches run
at once, so a batch's shard lookups overlap the previous batch's dense MLP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gateway.metrics import GatewayMetrics
from gateway.pooler import Pooler
from recserve.batch import Batch, merge
from recserve.errors import BadRequest, DeadlineExceeded, NotReady, Overloaded, RecserveError
from recserve.shardclient import now_ms

log = logging.getLogger(__name__)


def lookup_deadline(deadline_ms: float) -> float:
    """The deadline for a batch's lookups: a little before the requests', so a silent shard
    is reported (503, naming it) before the requests themselves time out (504)."""
    budget = deadline_ms - now_ms()
    return deadline_ms - min(20.0, 0.2 * max(budget, 0.0))


@dataclass(frozen=True)
class BatchSettings:
    max_batch_samples: int = 1024
    max_queue_delay_us: int = 500
    max_inflight_samples: int = 32768
    max_concurrent_batches: int = 2


@dataclass
class Pending:
    batch: Batch
    deadline_ms: float
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        pooler: Pooler,
        dense: Callable[[np.ndarray, np.ndarray], np.ndarray],
        settings: BatchSettings,
        executor: Executor,
        metrics: GatewayMetrics,
    ) -> None:
        self.pooler = pooler
        self.dense = dense
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.queue: deque[Pending] = deque()
        self.inflight_samples = 0
        self.wakeup = asyncio.Event()
        self.slots = asyncio.Semaphore(settings.max_concurrent_batches)
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def score(self, batch: Batch, deadline_ms: float) -> np.ndarray:
        if self.closed:
            raise NotReady("the gateway is shutting down")
        if self.inflight_samples + batch.size > self.settings.max_inflight_samples:
            raise Overloaded(
                f"{self.inflight_samples} samples are already queued or running", retry_after=0.1
            )
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.inflight_samples += batch.size
        self.metrics.inflight.set(self.inflight_samples)
        self.queue.append(Pending(batch, deadline_ms, future))
        self.wakeup.set()
        try:
            async with asyncio.timeout(max(0.0, (deadline_ms - now_ms()) / 1e3)):
                return await asyncio.shield(future)
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before it was scored") from None
        finally:
            self.inflight_samples -= batch.size
            self.metrics.inflight.set(self.inflight_samples)

    async def run(self) -> None:
        """Form batches until cancelled."""
        delay = self.settings.max_queue_delay_us / 1e6
        while True:
            while not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            first = self.queue[0]
            while self._queued() < self.settings.max_batch_samples:
                left = first.enqueued + delay - time.perf_counter()
                if left <= 0:
                    break
                self.wakeup.clear()
                try:
                    async with asyncio.timeout(left):
                        await self.wakeup.wait()
                except TimeoutError:
                    break
            items = [self.queue.popleft()]
            size = items[0].batch.size
            while self.queue and size + self.queue[0].batch.size <= self.settings.max_batch_samples:
                size += self.queue[0].batch.size
                items.append(self.queue.popleft())
            await self.slots.acquire()
            task = asyncio.get_running_loop().create_task(self._process(items))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _queued(self) -> int:
        return sum(p.batch.size for p in self.queue)

    async def _process(self, items: list[Pending]) -> None:
        try:
            now = now_ms()
            live = []
            for p in items:
                self.metrics.queue_wait.observe(time.perf_counter() - p.enqueued)
                if p.future.done():
                    continue  # its caller gave up
                if p.deadline_ms <= now:
                    p.future.set_exception(DeadlineExceeded("expired while queued"))
                else:
                    live.append(p)
            if not live:
                return
            loop = asyncio.get_running_loop()
            start = time.perf_counter()
            batch, prepared = await loop.run_in_executor(
                self.executor, self._assemble, [p.batch for p in live]
            )
            self.metrics.batch_samples.observe(batch.size)
            self.metrics.assembly.observe(time.perf_counter() - start)
            deadline = min(p.deadline_ms for p in live)
            try:
                start = time.perf_counter()
                scores, dense_s = await self.pooler.pool(
                    batch,
                    prepared,
                    lookup_deadline(deadline),
                    lambda pooled: self._dense(batch, pooled),
                )
                self.metrics.pooling.observe(time.perf_counter() - start - dense_s)
                self.metrics.dense.observe(dense_s)
            except RecserveError as exc:
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            except Exception as exc:
                log.exception("a batch of %d samples failed", batch.size)
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(RecserveError(f"internal error: {exc}"))
                return
            offset = 0
            for p in live:
                mine = scores[offset : offset + p.batch.size]
                offset += p.batch.size
                if p.future.done():
                    continue
                if np.isnan(mine).any():
                    bad = int(np.flatnonzero(np.isnan(mine))[0])
                    p.future.set_exception(
                        BadRequest(
                            f"samples[{bad}]: the model's output is not a number for these dense "
                            "values (they overflow it)",
                            field=f"samples[{bad}].dense",
                        )
                    )
                else:
                    p.future.set_result(mine)
        finally:
            self.slots.release()

    def _assemble(self, batches: list[Batch]) -> tuple[Batch, object]:
        """In the executor: one batch of the requests, prepared for the pooler (the sharded
        one routes it), in one hop."""
        batch = merge(batches)
        return batch, self.pooler.prepare(batch)

    def _dense(self, batch: Batch, pooled: np.ndarray) -> tuple[np.ndarray, float]:
        """In the executor, right after pooling: the scores and the seconds they took."""
        start = time.perf_counter()
        return self.dense(batch.dense, pooled), time.perf_counter() - start

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to ``timeout`` s for queued and running ones."""
        self.closed = True
        end = time.monotonic() + timeout
        while (self.queue or self.tasks) and time.monotonic() < end:
            await asyncio.sleep(0.01)
