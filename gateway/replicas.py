"""One shard's replicas: a lookup goes to one, and to the next when the error says another
replica may answer (``RETRYABLE``), each try within its share of the deadline."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import numpy as np
import zmq

from gateway.metrics import GatewayMetrics
from recserve.contracts.errors import RecserveError, ShardUnavailable
from recserve.contracts.plan import ShardPlan
from recserve.rpc.client import PooledGroup, ShardClient
from recserve.rpc.curve import CurveKeys
from recserve.rpc.deadline import Deadline, now_ms
from recserve.rpc.wire import PartRequest

log = logging.getLogger(__name__)

# Kinds that say "this replica, now": down or stalled, draining, or full. Anything else
# (a bad request, an id out of range) would fail on every replica alike.
RETRYABLE = frozenset({"shard_unavailable", "not_ready", "overloaded"})


class ReplicaSet:
    def __init__(
        self,
        shard: ShardPlan,
        ctx: zmq.Context[Any],
        metrics: GatewayMetrics,
        keys: CurveKeys | None = None,
    ) -> None:
        self.id = shard.id
        self.clients = [
            ShardClient(ep, ctx, name=f"{shard.id}/{r}", keys=keys)
            for r, ep in enumerate(shard.endpoints)
        ]
        self.metrics = metrics
        self.rpc = metrics.shard_rpc.labels(shard=str(shard.id))
        self.turn = itertools.count()

    async def lookup(
        self,
        parts: list[PartRequest],
        packed: tuple[np.ndarray, np.ndarray, np.ndarray | None],
        deadline: Deadline,
        dim: int,
    ) -> list[PooledGroup]:
        ids, lengths, weights = packed
        n = len(self.clients)
        first = next(self.turn) % n
        error: RecserveError | None = None
        for r in range(n):
            client = self.clients[(first + r) % n]
            left = deadline.left_ms()
            if left <= 0:
                break
            # Each remaining replica gets an equal share of the time left, so a stalled one
            # leaves room to fail over.
            share = Deadline(now_ms() + left / (n - r))
            try:
                start = time.perf_counter()
                groups = await client.lookup(
                    parts, ids, lengths, weights=weights, deadline=share, dim=dim
                )
            except RecserveError as exc:
                if exc.kind not in RETRYABLE:
                    raise
                log.warning("shard %s: %s", client.name, exc.message)
                error = exc
                continue
            self.rpc.observe(time.perf_counter() - start)
            sent = ids.nbytes + lengths.nbytes + (weights.nbytes if weights is not None else 0)
            self.metrics.shard_bytes.labels(direction="sent").inc(sent)
            self.metrics.shard_bytes.labels(direction="received").inc(
                sum(g.pooled.nbytes for g in groups)
            )
            return groups
        raise error or ShardUnavailable(f"shard {self.id}: no replica answered in time")

    async def probe(self, deadline: Deadline) -> list[str]:
        """Names of replicas that do not answer ``health`` as ready."""

        async def one(client: ShardClient) -> str | None:
            try:
                reply = await client.simple("health", deadline)
                return None if reply.get("ready") else client.name
            except RecserveError:
                return client.name

        names = await asyncio.gather(*(one(c) for c in self.clients))
        return [n for n in names if n]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
