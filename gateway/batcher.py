"""The dynamic batcher: concurrent requests become one batch, one lookup per shard.

A request waits at most ``max_queue_delay_us`` for company, and only while company is
expected: while requests arrive on average (a moving average of the gaps between them) at
least that often. At a lower rate a lone request would wait for nothing (up to the whole
delay; under uvloop, whose timers count whole milliseconds, a delay below 1 ms ends at the
next loop turn or the next millisecond), so it goes at once. A batch holds at most
``max_batch_samples`` (a larger request is a batch of its own). Admission is bounded: more
than ``max_inflight_samples`` queued or running is refused at once with ``Overloaded``; a
request's samples count until it leaves the queue or its batch ends, so a request that gave
up still holds its place while it is queued, and a stall cannot grow the queue past the
bound. Each request keeps its own deadline: one that expires while queued is answered
``deadline_exceeded`` and dropped from its batch; one whose batch is running when it
expires gets the batch's answer if it comes within ``ANSWER_GRACE_S`` (the batch's lookups
end a little before the deadline, so a silent shard is named, not a bare timeout). Up to
``max_concurrent_batches`` batches run at once, so a batch's shard lookups overlap the
previous batch's dense MLP; while all run, requests gather in the queue, and the next batch
takes them together when a slot frees.

A batch is merged and routed (the pooler's ``prepare``) in the executor, one hop from the
loop. A request that will likely be a batch of its own (nothing queued, a slot free, no
company expected) is routed right after its parse, in the parse's own hop (``route_alone``),
and its batch skips that hop: at low rates, and with few requests in flight, every request.

Every request's future is resolved exactly once, on one path: scores, or the error of its
batch. An unexpected error in a batch of several requests is not blamed on all of them:
each is scored again alone, so only the request that causes it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from gateway.config import BatchSettings
from gateway.metrics import GatewayMetrics
from gateway.pooler import Pooler
from gateway.requests import merge
from recserve.contracts.batch import Batch
from recserve.contracts.errors import (
    BadRequest,
    DeadlineExceeded,
    NotReady,
    Overloaded,
    RecserveError,
)
from recserve.rpc.deadline import Deadline

log = logging.getLogger(__name__)
GAP_WEIGHT = 0.25  # of the newest gap between requests in their moving average
MAX_GAP_S = 1.0  # a longer gap counts as this long (a burst after a quiet hour still batches)
ANSWER_GRACE_S = 0.1  # how long past its deadline a request waits for its running batch


def lookup_deadline(deadline: Deadline) -> Deadline:
    """The deadline for a batch's lookups: a little before the requests', so a silent shard
    is reported (503, naming it) before the requests themselves time out (504)."""
    return deadline.sooner(min(20.0, 0.2 * max(deadline.left_ms(), 0.0)))


@dataclass(frozen=True)
class Routed:
    """A request's batch prepared for the pooler right after its parse (``route_alone``)."""

    prepared: object
    seconds: float


@dataclass
class Pending:
    batch: Batch
    deadline: Deadline
    future: asyncio.Future[tuple[np.ndarray, int]]  # scores and the version they are at
    routed: Routed | None = None  # used when the request is a batch of its own
    enqueued: float = field(default_factory=time.perf_counter)
    running: bool = False  # its batch left the queue and is being scored


class Batcher:
    def __init__(
        self,
        pooler: Pooler,
        dense: Callable[[int], Callable[[np.ndarray, np.ndarray], np.ndarray]],
        settings: BatchSettings,
        executor: Executor,
        metrics: GatewayMetrics,
    ) -> None:
        self.pooler = pooler
        self.dense = dense  # the dense forward of a model version
        self.version: Callable[[], int] = lambda: pooler.version  # the version to read
        self.settings = settings
        self.executor = executor
        self.metrics = metrics
        self.queue: deque[Pending] = deque()
        self.inflight_samples = 0
        self.wakeup = asyncio.Event()
        self.slots = asyncio.Semaphore(settings.max_concurrent_batches)
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.gap = 0.0  # moving average of the seconds between requests (0: company expected)
        self.last: float | None = None  # when the last request came

    def route_alone(self, batch: Batch) -> Routed | None:
        """In the executor, right after a request's parse: its batch prepared for the pooler
        when it will likely be a batch of its own (nothing queued, a slot free, no company
        expected), else None. A guess read from another thread: when it is wrong the
        request joins a batch as usual and this work is lost."""
        delay = self.settings.max_queue_delay_us / 1e6
        busy = len(self.tasks) >= self.settings.max_concurrent_batches  # (len: atomic)
        if self.queue or busy or (delay > 0 and self.gap <= delay):
            return None
        start = time.perf_counter()
        try:
            with self.metrics.cpu("assembly"):
                prepared = self.pooler.prepare(batch)
        except Exception:  # the batch's own hop fails it, on the batch's one error path
            return None
        return Routed(prepared, time.perf_counter() - start)

    async def score(
        self, batch: Batch, deadline: Deadline, routed: Routed | None = None
    ) -> tuple[np.ndarray, int]:
        """The batch's scores and the model version they were computed at (``routed``:
        ``route_alone``'s, for when the request is a batch of its own)."""
        self._admit(batch.size)
        pending = Pending(batch, deadline, asyncio.get_running_loop().create_future(), routed)
        self._count(batch.size)
        if self.last is not None:
            gap = min(pending.enqueued - self.last, MAX_GAP_S)
            self.gap += GAP_WEIGHT * (gap - self.gap)
        self.last = pending.enqueued
        self.queue.append(pending)
        self.wakeup.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline.left_s()):
                return await asyncio.shield(pending.future)
        if pending.running and not pending.future.done():
            # Every wait in its batch ends at the lookup deadline, before this one, so the
            # batch's own answer (a silent shard, named) is due: a loop that lagged past the
            # margin between the two must not turn it into a bare timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ANSWER_GRACE_S):
                    await asyncio.shield(pending.future)
        if pending.future.done():
            return pending.future.result()
        raise DeadlineExceeded("the request's deadline passed before it was scored")

    @contextlib.asynccontextmanager
    async def admitted(self, samples: int, deadline: Deadline) -> AsyncIterator[None]:
        """Admission for work outside the batches (``/v1/embeddings``): its samples count
        against ``max_inflight_samples`` and it takes one of the concurrent-batch slots."""
        self._admit(samples)
        self._count(samples)
        try:
            try:
                async with asyncio.timeout(deadline.left_s()):
                    await self.slots.acquire()
            except TimeoutError:
                raise DeadlineExceeded("no batch slot before the request's deadline") from None
            try:
                yield
            finally:
                self.slots.release()
        finally:
            self._count(-samples)

    def _admit(self, samples: int) -> None:
        if self.closed:
            raise NotReady("the gateway is shutting down")
        if self.inflight_samples + samples > self.settings.max_inflight_samples:
            raise Overloaded(
                f"{self.inflight_samples} samples are already queued or running", retry_after=0.1
            )

    def _count(self, samples: int) -> None:
        self.inflight_samples += samples
        self.metrics.inflight.set(self.inflight_samples)

    async def run(self) -> None:
        """Form batches until cancelled; then fail whatever is still queued (or was taken
        from the queue for a batch that never started)."""
        items: list[Pending] = []
        try:
            while True:
                # The slot first: while every slot is busy the queue keeps growing, and the
                # next batch takes what gathered (up to max_batch_samples) once one frees.
                await self.slots.acquire()
                try:
                    items = await self._next_batch()
                except BaseException:
                    self.slots.release()
                    raise
                task = asyncio.get_running_loop().create_task(self._process(items))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
                items = []
        finally:
            left = [*items, *self.queue]
            self.queue.clear()
            self._resolve(left, NotReady("the gateway stopped before this request was scored"))
            self._count(-sum(p.batch.size for p in left))

    async def _next_batch(self) -> list[Pending]:
        while not self.queue:
            self.wakeup.clear()
            await self.wakeup.wait()
        delay = self.settings.max_queue_delay_us / 1e6
        if self.gap > delay:  # no company expected within the delay
            delay = 0.0
        first = self.queue[0]
        while sum(p.batch.size for p in self.queue) < self.settings.max_batch_samples:
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
        return items

    async def _process(self, items: list[Pending]) -> None:
        live = []
        try:
            for p in items:
                self.metrics.queue_wait.observe(time.perf_counter() - p.enqueued)
                if p.future.done():
                    continue  # its caller gave up
                if p.deadline.expired():
                    self._resolve([p], DeadlineExceeded("expired while queued"))
                else:
                    p.running = True
                    live.append(p)
            if live:
                await self._score(live)
        except Exception as exc:  # the one error path: every request not yet answered
            self._resolve(live, exc)
        finally:
            self._count(-sum(p.batch.size for p in items))
            self.slots.release()

    async def _score(self, live: list[Pending]) -> None:
        try:
            routed = live[0].routed if len(live) == 1 else None
            scores = await self._run([p.batch for p in live], min(p.deadline for p in live), routed)
        except RecserveError:
            raise  # a shard, a deadline or overload: it concerns the whole batch
        except Exception:
            if len(live) == 1:
                raise
            log.exception("a batch of %d requests failed; scoring each alone", len(live))
            for p in live:  # the batch's error belongs to one request: find it
                try:
                    self._deliver([p], await self._run([p.batch], p.deadline, p.routed))
                except Exception as exc:
                    self._resolve([p], exc)
            return
        self._deliver(live, scores)

    async def _run(
        self, batches: list[Batch], deadline: Deadline, routed: Routed | None = None
    ) -> tuple[np.ndarray, int]:
        """Scores of ``batches`` as one batch (``routed``: given only with a lone batch)."""
        loop = asyncio.get_running_loop()
        version = self.version()  # one version for the whole batch, on every shard
        forward = self.dense(version)  # and its dense weights
        if routed is not None:  # the only batch, routed after its parse: no hop
            batch, prepared = batches[0], routed.prepared
            self.metrics.assembly.observe(routed.seconds)
        else:
            start = time.perf_counter()
            batch, prepared = await loop.run_in_executor(self.executor, self._assemble, batches)
            self.metrics.assembly.observe(time.perf_counter() - start)
        self.metrics.batch_samples.observe(batch.size)
        start = time.perf_counter()
        scores, dense_s = await self.pooler.pool(
            batch,
            prepared,
            lookup_deadline(deadline),
            lambda pooled: self._dense(forward, batch, pooled),
            version,
        )
        self.metrics.pooling.observe(time.perf_counter() - start - dense_s)
        self.metrics.dense.observe(dense_s)
        return scores, version

    def _deliver(self, live: list[Pending], scored: tuple[np.ndarray, int]) -> None:
        scores, version = scored
        offset = 0
        for p in live:
            mine = scores[offset : offset + p.batch.size]
            offset += p.batch.size
            nan = np.flatnonzero(np.isnan(mine))
            if nan.size:
                bad = int(nan[0])
                self._resolve(
                    [p],
                    BadRequest(
                        f"samples[{bad}]: the model's output is not a number for these dense "
                        "values (they overflow it)",
                        field=f"samples[{bad}].dense",
                    ),
                )
            elif not p.future.done():
                p.future.set_result((mine, version))

    @staticmethod
    def _resolve(items: list[Pending], exc: BaseException) -> None:
        if not isinstance(exc, RecserveError):
            log.error("scoring failed", exc_info=exc)
            exc = RecserveError(f"internal error: {exc}")
        for p in items:
            if not p.future.done():
                p.future.set_exception(exc)

    def _assemble(self, batches: list[Batch]) -> tuple[Batch, object]:
        """In the executor: one batch of the requests, prepared for the pooler (the sharded
        one routes it), in one hop."""
        with self.metrics.cpu("assembly"):
            batch = merge(batches)
            return batch, self.pooler.prepare(batch)

    def _dense(
        self,
        forward: Callable[[np.ndarray, np.ndarray], np.ndarray],
        batch: Batch,
        pooled: np.ndarray,
    ) -> tuple[np.ndarray, float]:
        """In the executor, right after pooling: the scores and the seconds they took."""
        start = time.perf_counter()
        with self.metrics.cpu("dense"):
            return forward(batch.dense, pooled), time.perf_counter() - start

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to ``timeout`` s for queued and running ones."""
        self.closed = True
        end = time.monotonic() + timeout
        while (self.queue or self.tasks) and time.monotonic() < end:
            await asyncio.sleep(0.01)
