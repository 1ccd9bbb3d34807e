"""A shard's replicas over in-process fake clients: routing, failover, budgets, ejection and
readmission, hedging."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from gateway.config import ReplicaSettings
from gateway.metrics import GatewayMetrics
from gateway.replicas import ReplicaSet
from recserve.contracts.errors import IdOutOfRange, NotReady, ShardUnavailable
from recserve.rpc.client import Pooled, PooledGroup
from recserve.rpc.deadline import Deadline
from recserve.rpc.wire import PartRequest

PARTS = [PartRequest("t", 0, 1)]
PACKED = (np.zeros(1, np.int64), np.ones(1, np.int32), None)


class Fake:
    """A replica that answers after ``delay`` s, or raises ``error``, or stalls until the
    caller's deadline (``stall``)."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.error: Exception | None = None
        self.stall = False
        self.ready = True
        self.calls = 0

    async def lookup(self, *args: Any, deadline: Deadline, **kw: Any) -> Pooled:
        self.calls += 1
        if self.stall:
            await asyncio.sleep(deadline.left_s())
            raise ShardUnavailable(f"shard {self.name} did not answer")
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        groups = Pooled([PooledGroup((0,), np.full((1, 1, 2), float(self.name[-1]), np.float32))])
        groups.on_shard = self.delay
        return groups

    async def simple(self, op: str, deadline: Deadline) -> dict[str, Any]:
        if self.stall:
            raise ShardUnavailable("no answer")
        return {"ok": True, "ready": self.ready}

    async def close(self) -> None:
        return None


def replica_set(n: int = 2, **settings: Any) -> tuple[ReplicaSet, list[Fake]]:
    fakes = [Fake(f"0/{r}") for r in range(n)]
    rs = ReplicaSet(0, fakes, GatewayMetrics.create(), ReplicaSettings(**settings))  # type: ignore[arg-type]
    return rs, fakes


async def lookup(rs: ReplicaSet, ms: float = 2000) -> list[PooledGroup]:
    return await rs.lookup(PARTS, PACKED, Deadline.after(ms), dim=2)


def test_lookups_spread_over_the_replicas() -> None:
    rs, fakes = replica_set()

    async def run() -> None:
        await asyncio.gather(*(lookup(rs) for _ in range(10)))

    asyncio.run(run())
    assert fakes[0].calls == fakes[1].calls == 5


@pytest.mark.parametrize("error", [NotReady("draining"), ShardUnavailable("gone")])
def test_retryable_errors_fail_over(error: Exception) -> None:
    rs, fakes = replica_set()
    fakes[0].error = error
    for _ in range(4):  # whichever replica goes first, the answer comes from 0/1
        groups = asyncio.run(lookup(rs))
        assert groups[0].pooled[0, 0, 0] == 1.0


def test_client_errors_do_not_fail_over() -> None:
    rs, fakes = replica_set()
    for fake in fakes:
        fake.error = IdOutOfRange("bad id", field="parts[0]")
    with pytest.raises(IdOutOfRange):
        asyncio.run(lookup(rs))
    assert fakes[0].calls + fakes[1].calls == 1


def test_retries_stop_when_their_budget_is_spent() -> None:
    rs, fakes = replica_set(retry_budget=0.0)
    for fake in fakes:
        fake.error = ShardUnavailable("gone")
    rs.retries.tokens = 1.0  # one retry left
    with pytest.raises(ShardUnavailable):
        asyncio.run(lookup(rs))
    assert fakes[0].calls + fakes[1].calls == 2
    with pytest.raises(ShardUnavailable):
        asyncio.run(lookup(rs))
    assert fakes[0].calls + fakes[1].calls == 3  # no retry without budget


def test_a_failing_replica_is_ejected_then_readmitted_by_its_probe() -> None:
    rs, fakes = replica_set(eject_after=2)
    fakes[0].error = ShardUnavailable("gone")

    async def run() -> None:
        for _ in range(6):
            await lookup(rs)
        assert rs.replicas[0].ejected_until > time.monotonic()
        calls = fakes[0].calls
        for _ in range(6):
            await lookup(rs)
        assert fakes[0].calls == calls  # out of rotation
        fakes[0].error = None
        rs.replicas[0].ejected_until = time.monotonic()  # its backoff is over
        await rs.probe(Deadline.after(1000))
        assert rs.replicas[0].ejected_until == 0.0
        for _ in range(6):
            await lookup(rs)
        assert fakes[0].calls > calls  # back in rotation

    asyncio.run(run())


def test_a_hedge_answers_for_a_stalled_replica() -> None:
    rs, fakes = replica_set(hedge_after_ms="20")
    fakes[0].stall = True

    async def run() -> list[float]:
        times = []
        for _ in range(4):
            start = time.perf_counter()
            groups = await lookup(rs, 2000)
            times.append(time.perf_counter() - start)
            assert groups[0].pooled[0, 0, 0] == 1.0
        return times

    times = asyncio.run(run())
    assert max(times) < 0.5, times  # without the hedge: half the deadline, 1 s
    labels = {"shard": "0", "outcome": "sent"}
    sent = rs.metrics.registry.get_sample_value("recserve_gateway_hedges_total", labels)
    assert sent is not None and sent >= 1


def test_without_a_hedge_a_stalled_replica_costs_its_share_of_the_deadline() -> None:
    rs, fakes = replica_set()
    fakes[0].stall = True

    async def run() -> float:
        rs.turn = iter([0, 0, 0])  # type: ignore[assignment]  # 0/0 first
        start = time.perf_counter()
        groups = await lookup(rs, 400)
        assert groups[0].pooled[0, 0, 0] == 1.0
        return time.perf_counter() - start

    assert 0.15 < asyncio.run(run()) < 0.4
