"""Open-loop and closed-loop load against ``POST /v1/predict``, latencies in HdrHistogram.

Open loop: Poisson arrivals at the target rate; each request's latency counts from its
*intended* send time, so a stalled server shows in the tail instead of slowing the load
(no coordinated omission). Closed loop: ``concurrency`` workers, each sending the next
request when the last one returned.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
from hdrh.histogram import HdrHistogram

MAX_US = 120_000_000


@dataclass
class Run:
    samples_per_request: int
    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_US, 3))
    statuses: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    started: float = 0.0
    elapsed: float = 0.0

    def record(self, intended: float, status: str) -> None:
        self.statuses[status] += 1
        if status == "200":
            self.histogram.record_value(max(1, int((time.perf_counter() - intended) * 1e6)))

    def percentile_ms(self, p: float) -> float:
        return self.histogram.get_value_at_percentile(p) / 1e3

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    @property
    def errors(self) -> int:
        return sum(self.statuses.values()) - self.ok


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, ctype: str, timeout: float
) -> str:
    try:
        async with session.post(
            url,
            data=body,
            headers={"Content-Type": ctype},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            await r.read()
            return str(r.status)
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def open_loop(
    url: str,
    bodies: list[bytes],
    ctype: str,
    run: Run,
    *,
    rate: float,
    duration: float,
    seed: int,
    timeout: float = 30.0,
    progress: Callable[[Run], None] | None = None,
) -> Run:
    rng = np.random.default_rng(seed)
    target = url.rstrip("/") + "/v1/predict"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks: set[asyncio.Task[None]] = set()

        async def one(body: bytes, intended: float) -> None:
            run.record(intended, await _post(session, target, body, ctype, timeout))

        run.started = time.perf_counter()
        due, last_report = run.started, run.started
        while due - run.started < duration:
            due += float(rng.exponential(1.0 / rate))
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.ensure_future(one(bodies[run.sent % len(bodies)], due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            run.sent += 1
            if progress and time.perf_counter() - last_report >= 1.0:
                last_report = time.perf_counter()
                progress(run)
        await asyncio.gather(*tasks)
    run.elapsed = time.perf_counter() - run.started
    return run


async def closed_loop(
    url: str,
    bodies: list[bytes],
    ctype: str,
    run: Run,
    *,
    concurrency: int,
    duration: float,
    timeout: float = 30.0,
    progress: Callable[[Run], None] | None = None,
) -> Run:
    target = url.rstrip("/") + "/v1/predict"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        run.started = time.perf_counter()
        end = run.started + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                body = bodies[run.sent % len(bodies)]
                run.sent += 1
                start = time.perf_counter()
                run.record(start, await _post(session, target, body, ctype, timeout))

        async def reporter() -> None:
            while True:
                await asyncio.sleep(1.0)
                if progress:
                    progress(run)

        ticker = asyncio.ensure_future(reporter())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ticker.cancel()
    run.elapsed = time.perf_counter() - run.started
    return run
